"""`verispec bench --concurrency`: the closed-loop driver on the batched engine, its report, plot and identity column,
the CLI mode, and the server driver (against a stand-in OpenAI-compatible server, and `verispec.serve` when it
exists). Tiny models in-process; no timing assertions (performance claims belong in benchmarks)."""

from __future__ import annotations

import copy
import importlib.util
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import word_tokenizer
from test_native import K_QUANTS, _tiny
from verispec.backends.native import NativeLinear, to_native
from verispec.batch import BatchEngine
from verispec.bench.concurrency import (_itl, check_specs, closed_loop, parse_concurrency, percentiles,
                                        run_concurrency, run_server_concurrency, summarize)
from verispec.bench.datasets import Prompt
from verispec.kernels.ggml_blocks import decode, quantize
from verispec.models import LoadedModel
from verispec.sampling import Sampling

WORDS = ["<unk>"] + [f"w{i}" for i in range(63)]
PROMPTS = [Prompt(f"p{i}", " ".join(f"w{(i * 7 + j) % 60 + 1}" for j in range(6)), "t") for i in range(6)]
NS = [1, 2, 4]


@pytest.fixture(scope="module")
def tiny():
    """The tiny Qwen2 on the gguf backend (test_native's) and a drafter with a perturbed output layer."""
    tok = word_tokenizer(WORDS)
    target = to_native(_tiny("qwen2"), types=K_QUANTS)
    drafter = copy.deepcopy(target)
    W = target.lm_head.weight + torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.1
    drafter.lm_head = NativeLinear(decode("Q8_0", quantize(W, "Q8_0"), 256))
    return LoadedModel(target, tok, "tiny-qwen"), LoadedModel(drafter, tok, "tiny-drafter")


@pytest.fixture(scope="module")
def greedy_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("conc")
    s = run_concurrency(*tiny, "ar,sd", NS, PROMPTS, max_new_tokens=12, out_dir=out, progress=False)
    return s, out


def test_the_report_has_every_method_and_n(greedy_run):
    s, out = greedy_run
    assert [(r["method"], r["n"]) for r in s["rows"]] == [(m, n) for m in ("ar", "sd") for n in NS]
    for r in s["rows"]:
        assert r["streams"] == len(PROMPTS) and r["tokens"] == 12 * len(PROMPTS)  # every prompt, full budget
        assert r["total_tok_s"] > 0 and r["per_stream_tok_s"] > 0 and r["wall_s"] > 0
        assert r["target_fwd_per_token"] <= r["stream_fwd_per_token"] <= 1.0
    n1 = {r["method"]: r for r in s["rows"] if r["n"] == 1}
    assert n1["ar"]["scaling_vs_n1"] == 1.0 and n1["ar"]["target_fwd_per_token"] == 1.0  # AR: a token a forward
    assert n1["sd"]["stream_fwd_per_token"] < 1.0  # drafts were kept
    for r in s["rows"]:
        if r["n"] > 1:  # streams share the rounds: fewer shared forwards than the streams' own
            assert r["target_fwd_per_token"] < r["stream_fwd_per_token"]
    md = (out / "concurrency.md").read_text()
    for m in ("ar", "sd"):
        for n in NS:
            assert f"| {m} | {n} | " in md
    assert "TTFT p50 / p90 / p99 ms" in md and "identical" in md and "`gguf`" in md and "p0, p1" in md
    assert "Ragged target forward (one forward a round for all streams): yes" in md
    assert s["backends"]["target"] == "gguf" and "Q4_K" in s["backends"]["kernels"]["target"]
    assert s["environment"]["cpu"] and "on_tokens" in s["config"]["itl"]
    assert json.loads((out / "concurrency.json").read_text())["rows"] == s["rows"]


def test_every_stream_equals_its_n1_output(greedy_run):
    s, _ = greedy_run
    assert s["identity_violations"] == {}
    for r in s["rows"]:
        assert r["identical"] == [len(PROMPTS), len(PROMPTS)] and r["matches_ar"] == [len(PROMPTS), len(PROMPTS)]
    cells = {(c["method"], c["n"]): c for c in s["cells"]}
    assert [x["token_ids"] for x in cells["sd", 4]["streams"]] == [x["token_ids"] for x in cells["ar", 1]["streams"]]


def test_percentiles_are_monotone(greedy_run):
    s, _ = greedy_run
    for r in s["rows"]:
        for k in ("ttft_s", "itl_s", "e2e_s"):
            p = r[k]
            assert 0 <= p["p50"] <= p["p90"] <= p["p99"], (r["method"], r["n"], k, p)
        assert r["ttft_s"]["p99"] <= r["e2e_s"]["p99"]


def test_the_plot_is_written(greedy_run):
    _, out = greedy_run
    png = out / "plots" / "concurrency.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_closed_loop_keeps_n_streams_busy(tiny):
    engine = BatchEngine(tiny[0], None, method="ar", max_batch=3)
    sizes = []
    orig = engine._round
    engine._round = lambda streams: (sizes.append(len(streams)), orig(streams))[1]
    ids = [tiny[0].tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    budgets = [3, 9, 5, 4, 6, 2]  # streams end at different rounds: slots are refilled one by one
    records = []
    for i, b in enumerate(budgets):
        recs, wall, rounds = closed_loop(engine, [ids[i]], 1, b, Sampling())
        records.append(recs[0])
    assert [r.tokens for r in records] == budgets
    sizes.clear()
    recs, wall, rounds = closed_loop(engine, ids, 3, 8, Sampling(), [p.id for p in PROMPTS])
    assert max(sizes) == 3 and rounds == len(sizes) and sizes[:8] == [3] * 8  # 3 running until prompts run out
    assert sum(sizes) == 8 * len(PROMPTS)  # AR: every stream a token a round
    assert [r.prompt_id for r in recs] == [p.id for p in PROMPTS] and all(r.finish_reason == "length" for r in recs)
    assert all(len(r.itl) == r.tokens - 1 for r in recs)  # AR: one token a round; the first one is TTFT's


def test_sampled_outputs_do_not_depend_on_n(tiny, tmp_path):
    s = run_concurrency(*tiny, "ar,sd", [1, 3], PROMPTS[:4], max_new_tokens=6, sampling=Sampling(1.0, seed=7),
                        out_dir=tmp_path, warmup=False, progress=False)
    assert s["identity_violations"] == {} and all(r["identical"] == [4, 4] for r in s["rows"])
    assert all(r["matches_ar"] is None for r in s["rows"])  # sampled sd and ar need not agree token for token
    assert "= AR" not in (tmp_path / "concurrency.md").read_text()


def test_a_stream_that_depends_on_n_is_flagged():
    def cell(n, ids):
        return {"method": "ar", "n": n, "wall_s": 1.0, "rounds": 2, "streams": [
            {"prompt": 0, "prompt_id": "a", "tokens": len(ids), "ttft": 0.1, "e2e": 0.5, "itl": [0.1],
             "token_ids": ids, "target_forwards": 2, "finish_reason": "length", "text": None}]}

    config = {"methods": ["ar"], "sampling": {"temperature": 0.0}}
    s = summarize(config, [cell(1, [1, 2]), cell(2, [1, 3])], {})
    assert s["identity_violations"] == {"ar N=2": ["a"]} and s["rows"][1]["identical"] == [0, 1]


def test_helpers():
    assert parse_concurrency("2,8,4") == [1, 2, 4, 8] and parse_concurrency([3]) == [1, 3]
    for bad in ("0,2", "a,b", ""):
        with pytest.raises(ValueError):
            parse_concurrency(bad)
    assert _itl([(0.0, 1), (1.0, 2), (1.5, 1)]) == [0.5, 0.5, 0.5]
    p = percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert p == {"p50": 3.0, "p90": pytest.approx(4.6), "p99": pytest.approx(4.96)}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    for bad in ("beam", "ar,sot-lossy", "hf-ar"):
        with pytest.raises(ValueError, match="speculative"):
            check_specs(bad)


def test_too_few_prompts_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="at least 8 prompts"):
        run_concurrency(tiny[0], None, "ar", [1, 8], PROMPTS, out_dir=tmp_path, progress=False)


def test_the_cli_mode(folders, capsys):
    """`verispec bench --concurrency` on saved tiny Llama folders (the fast backend: no ragged decoder, so the
    streams of a round are scored one by one — still identical to N = 1)."""
    from verispec.cli import main

    out = folders / "c"
    rc = main(["bench", "--concurrency", "2", "--methods", "ar,sd", "--target", str(folders / "t"), "--drafter",
               str(folders / "d"), "--dataset", str(folders / "p.jsonl"), "--prompts", "4", "--max-new-tokens", "4",
               "--out", str(out), "--no-warmup"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| ar | 2 | " in printed and "| sd | 1 | " in printed
    assert "**no**" in printed  # the ragged-forward line names the fallback
    assert (out / "concurrency.json").is_file() and (out / "plots" / "concurrency.png").is_file()
    assert not (out / "report.md").exists()  # the usual bench's files are neither written nor removed
    assert main(["bench", "--server", "http://127.0.0.1:9", "--out", str(out)]) == 2
    assert main(["bench", "--concurrency", "1", "--sot", "--out", str(out)]) == 2


# -- the server driver ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FakeOpenAI(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible server: streams the prompt's words reversed, one word a chunk."""

    def log_message(self, *args):
        pass

    def _send(self, code, body: bytes, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, json.dumps({"object": "list", "data": [
                {"id": "fake-model", "object": "model", "created": 0, "owned_by": "test"}]}).encode())
        self._send(404, b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path == "/v1/chat/completions"
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        words = text.split()[::-1][: body["max_tokens"]]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"id": "x", "created": 0, "model": body["model"],
                "object": "chat.completion.chunk" if chat else "text_completion"}
        for i, w in enumerate(words):
            piece = (" " if i else "") + w
            choice = {"index": 0, "finish_reason": None, **({"delta": {"content": piece}} if chat else
                                                           {"text": piece, "logprobs": None})}
            self.wfile.write(f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.002)
        last = {"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": "", "logprobs": None})}
        self.wfile.write(f"data: {json.dumps({**base, 'choices': [last]})}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(words),
                     "total_tokens": len(text.split()) + len(words)}
            self.wfile.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def test_the_server_driver_against_a_stand_in_server(tmp_path):
    pytest.importorskip("openai")
    port = _free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _FakeOpenAI)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        prompts = PROMPTS[:3] + [Prompt("chat", "a b c d e", "t", chat=True)]
        s = run_server_concurrency(f"http://127.0.0.1:{port}", "1,2", prompts, max_new_tokens=4, out_dir=tmp_path,
                                   progress=False)
    finally:
        httpd.shutdown()
    assert [(r["method"], r["n"]) for r in s["rows"]] == [("server", 1), ("server", 2)]
    assert s["config"]["server_model"] == "fake-model" and "usage" in s["config"]["tokens"]
    for r in s["rows"]:
        assert r["tokens"] == 16 and r["identical"] == [4, 4]
        assert r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] and r["itl_s"]["p50"] <= r["itl_s"]["p99"]
    streams = s["cells"][0]["streams"]
    assert streams[3]["text"] == "e d c b" and all(len(x["itl"]) == 3 for x in streams)
    md = (tmp_path / "concurrency-server.md").read_text()
    assert "| server | 2 | " in md and "content chunks" in md
    assert (tmp_path / "plots" / "concurrency-server.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("verispec.serve") is None, reason="verispec/serve.py not written yet")
def test_the_server_driver_against_verispec_serve(tiny, tmp_path):
    pytest.importorskip("openai")
    from verispec.serve import create_app, make_server

    engine = BatchEngine(tiny[0], None, method="ar", max_batch=4)
    port = _free_port()
    server = make_server(create_app(engine, model_name="tiny-qwen"), "127.0.0.1", port, grace=1.0,
                         log_level="warning")
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        s = run_server_concurrency(f"http://127.0.0.1:{port}", "1,2", PROMPTS[:4], max_new_tokens=5,
                                   out_dir=tmp_path, progress=False)
    finally:
        server.should_exit = True
        t.join(timeout=10)
    assert s["config"]["server_model"] == "tiny-qwen"
    for r in s["rows"]:
        assert r["tokens"] == 20 and r["identical"] == [4, 4]  # greedy, batch-invariant target
