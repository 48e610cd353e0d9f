"""`verispec serve` (verispec.serve): the official `openai` client against a real uvicorn server on 127.0.0.1 serving
a tiny gguf-backend Qwen2 pair in-process. On the gguf backend a sequence's logits do not depend on what shares
the batch, so every greedy answer must equal `verispec.generate`'s solo run token for token."""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import threading
import time
from pathlib import Path

import httpx2
import openai
import pytest
import torch
from transformers import DynamicCache
from prometheus_client.parser import text_string_to_metric_families

import verispec
from tests.conftest import word_tokenizer
from tests.test_native import K_QUANTS, _tiny
from verispec.backends.native import NativeLinear, to_native
from verispec.batch import BatchEngine
from verispec.kernels.ggml_blocks import decode, quantize
from verispec.models import LoadedModel
from verispec.serve import create_app, make_server

WORDS = ["<unk>"] + [f"w{i}" for i in range(63)]  # 64 words, as conftest's `pair`
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w1{% endif %}")
PROMPT = "w9 w19 w29 w39 w49 w59"  # ids 10 20 30 40 50 60: a prompt whose greedy output varies
NAME = "tiny-qwen"
TIMEOUT = 30.0


class Live:
    """A uvicorn server in a background thread on an ephemeral loopback port."""

    def __init__(self, app, grace: float = 30.0):
        self.app = app
        self.server = make_server(app, "127.0.0.1", 0, grace=grace, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def service(self):
        return self.app.state.verispec

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def _models():
    t = to_native(_tiny("qwen2"), types=K_QUANTS)
    d = copy.deepcopy(t)  # a drafter on the same backend with a perturbed output layer: accepts some, rejects some
    W = t.lm_head.weight + torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.1
    d.lm_head = NativeLinear(decode("Q8_0", quantize(W, "Q8_0"), 256))
    tok = word_tokenizer(WORDS)
    tok.chat_template = CHAT_TEMPLATE
    return LoadedModel(t, tok, NAME), LoadedModel(d, tok, "tiny-drafter")


@pytest.fixture(scope="module")
def pair():
    return _models()


@pytest.fixture(scope="module")
def live(pair):
    target, drafter = pair
    engine = BatchEngine(target, drafter, method="sd", gamma=4, max_batch=4)
    srv = Live(create_app(engine, model_name=NAME, max_queue=64))
    yield srv
    srv.close()
    assert not srv.service.worker.alive


@pytest.fixture(scope="module")
def aux(pair):
    """A second server: an API key, a queue of one, and a tokenizer without a chat template (same model objects;
    the tests use one server at a time)."""
    target, drafter = pair
    tok = word_tokenizer(WORDS)
    engine = BatchEngine(LoadedModel(target.model, tok, NAME), drafter, max_batch=1)
    srv = Live(create_app(engine, model_name=NAME, api_key="sekret", max_queue=1))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def solo(pair, prompt, n: int, method: str = "sd", **kw) -> str:
    target, drafter = pair
    return verispec.generate(target, prompt, method=method, drafter=drafter if method != "ar" else None, gamma=4,
                             max_new_tokens=n, **kw).text


def wait_idle(srv: Live, timeout: float = 30.0) -> None:
    engine = srv.service.engine
    deadline = time.monotonic() + timeout
    while not (engine.idle and not srv.service.jobs):
        assert time.monotonic() < deadline, (len(engine.running), engine.waiting, len(srv.service.jobs))
        time.sleep(0.01)


def scrape(srv: Live) -> dict:
    """Every sample of /metrics: {(name, frozenset(labels)): value}."""
    text = httpx2.get(srv.url + "/metrics", timeout=TIMEOUT).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def extra(resp) -> dict:
    return resp.model_extra["verispec"]


# -- the endpoints --

def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    r = httpx2.get(live.url + "/health", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_greedy_completion_is_the_solo_run(live, client, pair):
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.model == NAME
    assert r.choices[0].text == solo(pair, PROMPT, 24)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 24, 30)
    v = extra(r)
    assert v["method"] == "sd" and 0 < v["num_accepted_draft_tokens"] < v["num_draft_tokens"]
    assert v["num_drafts"] > 0 and v["mean_acceptance_length"] == 1 + v["num_accepted_draft_tokens"] / v["num_drafts"]
    assert v["draft_acceptance_rate"] == v["num_accepted_draft_tokens"] / v["num_draft_tokens"]
    assert sum(v["acceptance_by_position"]) == v["num_accepted_draft_tokens"] and len(v["acceptance_by_position"]) == 4
    assert v["target_forwards"] < 24  # several tokens a forward
    # a list holding one string is the same prompt; without max_tokens, OpenAI's default of 16
    r1 = client.completions.create(model=NAME, prompt=[PROMPT], temperature=0)
    assert r1.usage.completion_tokens == 16 and r.choices[0].text.startswith(r1.choices[0].text)
    wait_idle(live)


def test_chat_completion(live, client, pair):
    messages = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w9 w19"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    rendered = pair[0].tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "w3 w4 w9 w19 w1"
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == solo(pair, rendered, 12)
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    assert extra(r)["num_draft_tokens"] > 0
    # streamed: a role chunk first, then text that concatenates to the same answer
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"
    # without max_tokens chat runs to the context (512 positions)
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0)
    assert r.usage.completion_tokens == 512 - 5 and r.choices[0].finish_reason == "length"


def test_streaming_concatenates_to_the_whole_text(live, client):
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 3  # it streamed, round by round
    assert "".join(texts) == whole
    fin = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(fin) == 1 and fin[0].choices[0].finish_reason == "length" and extra(fin[0])["num_draft_tokens"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])
    # on the wire: SSE events, the last one [DONE]
    with httpx2.stream("POST", live.url + "/v1/completions", timeout=TIMEOUT,
                       json={"model": NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-2])
    assert streamed and whole.startswith(streamed)
    wait_idle(live)


def test_stop_strings_cut_the_text(live, client):
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    words = whole.split()
    stop = " " + words[len(words) // 2]  # a word from the middle: the text ends right before its first occurrence
    cut = whole[:whole.index(stop)]
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40  # generation ended there, not at max_tokens
    # a list, one of which never occurs; streamed, the text before the stop arrives (held back where it could be the
    # start of the stop string) and nothing after it
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0,
                                            stop=["w99999", stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a stop string spanning two tokens, streamed one token a round (ar): the first word must be held back until
    # the second shows whether it is the stop string
    ws = whole.split()
    k = next(i for i in range(3, len(ws)) if ws[i] not in ws[:i])  # a word first seen at i
    stop2 = f"{ws[k - 1]} {ws[k]}"
    cut2 = whole[:whole.index(stop2)]
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop2,
                                            stream=True, extra_body={"verispec": {"method": "ar"}}))
    assert "".join(c.choices[0].text for c in chunks) == cut2 and chunks[-1].choices[0].finish_reason == "stop"
    # chat too
    msgs = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0)
    text = whole.choices[0].message.content
    stop = text.split()[3]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    wait_idle(live)


def test_a_seed_reproduces_a_sampled_output(live, client):
    def gen(**kw):
        return client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, **kw).choices[0].text

    a = gen(seed=7)  # temperature defaults to 1.0, as OpenAI's
    assert gen(seed=7, temperature=1.0) == a
    assert len({gen(seed=s) for s in range(8, 12)} | {a}) > 1  # sampled, not greedy
    assert len({gen() for _ in range(4)}) > 1  # no seed: a fresh one each request
    assert gen(seed=7, extra_body={"top_k": 1}) == gen(temperature=0)  # top_k (an extension) = 1 is greedy


def test_the_verispec_extension_chooses_the_method(live, client, pair):
    ar = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0,
                                   extra_body={"verispec": {"method": "ar"}})
    sd = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0,
                                   extra_body={"verispec": {"method": "sd", "gamma": 2}})
    assert ar.choices[0].text == sd.choices[0].text == solo(pair, PROMPT, 20, method="ar")  # lossless
    va, vs = extra(ar), extra(sd)
    assert va["method"] == "ar" and va["num_draft_tokens"] == va["num_drafts"] == 0
    assert va["mean_acceptance_length"] is None and va["draft_acceptance_rate"] is None
    assert va["target_forwards"] == 20  # one token a forward
    assert vs["method"] == "sd" and len(vs["acceptance_by_position"]) == 2 and vs["target_forwards"] < 20


# -- errors --

def _post(live, path: str, body, **kw) -> httpx2.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx2.post(live.url + path, content=content, headers={"Content-Type": "application/json",
                                                                 **kw.pop("headers", {})}, timeout=TIMEOUT, **kw)


@pytest.mark.parametrize("body,param,match", [
    ('{"model": "tiny-qwen", "prompt": "w1", ', None, "not valid JSON"),
    ({"model": NAME, "prompt": "w1", "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
    ({"model": NAME, "prompt": "w1", "max_tokens": "many"}, "max_tokens", "integer"),
    ({"model": NAME}, "prompt", "Field required"),
    ({"model": NAME, "prompt": ""}, "prompt", "empty"),
    ({"model": NAME, "prompt": ["w1", "w2"]}, "prompt", "one string"),
    ({"model": NAME, "prompt": "w1", "n": 2}, "n", "n=1"),
    ({"model": NAME, "prompt": "w1", "temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"model": NAME, "prompt": "w1", "top_p": 0}, "top_p", "top_p"),
    ({"model": NAME, "prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": NAME, "prompt": "w1", "logprobs": 2}, "logprobs", "not supported"),
    ({"model": NAME, "prompt": "w1", "verispec": {"method": "nope"}}, "verispec", "unknown method 'nope'"),
    ({"model": NAME, "prompt": "w1", "verispec": {"options": {"no_such_option": 1}}}, "verispec", "no_such_option"),
    ({"model": NAME, "prompt": "w1", "verispec": {"methd": "ar"}}, "verispec.methd", "Extra inputs"),
    ({"model": NAME, "prompt": "w1 " * 10, "max_tokens": 510}, "max_tokens", "context of 512"),
])
def test_bad_requests_get_400_with_an_openai_error(live, body, param, match):
    r = _post(live, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and match in err["message"], err


def test_the_openai_client_sees_the_errors(live, client):
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.completions.create(model=NAME, prompt="w1", n=2)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w1"}], max_tokens=600)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="w1")
    r = _post(live, "/v1/nothing", {})
    assert r.status_code == 404 and "error" in r.json()
    wait_idle(live)
    assert not live.service.jobs


def test_the_api_key_is_required(aux):
    with pytest.raises(openai.AuthenticationError):
        aux.client().completions.create(model=NAME, prompt="w1", max_tokens=2)
    r = _post(aux, "/v1/completions", "not json")  # no key: 401 before the body is looked at
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = aux.client("sekret").completions.create(model=NAME, prompt="w1", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    assert httpx2.get(aux.url + "/health", timeout=TIMEOUT).status_code == 200  # health and metrics stay open
    assert httpx2.get(aux.url + "/metrics", timeout=TIMEOUT).status_code == 200


def test_a_model_without_a_chat_template_gets_400(aux):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        aux.client("sekret").chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w1"}])


def test_a_full_queue_gets_429(aux):
    """max_queue=1: with the worker paused, one request waits; the next is refused; on resume the first finishes."""
    c = aux.client("sekret")
    aux.service.worker.pause()
    try:
        box = {}
        t = threading.Thread(target=lambda: box.setdefault(
            "r", c.completions.create(model=NAME, prompt="w1", max_tokens=3, temperature=0)), daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while aux.service.engine.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            c.completions.create(model=NAME, prompt="w1", max_tokens=3)
    finally:
        aux.service.worker.resume()
    t.join(TIMEOUT)
    assert box["r"].usage.completion_tokens == 3
    wait_idle(aux)


def test_a_failing_request_gets_500_and_the_others_go_on(live, client, pair, monkeypatch):
    """An exception inside the engine for one stream (stream.finish_reason == "error") fails that request only."""
    import verispec.batch as batch

    bad = live.service.encode("w5 w5 w5 w5")
    real = batch.settle

    def settle(lm, drafter, verifier, policy, tokens, *a, **kw):
        if tokens[:4] == bad:
            raise RuntimeError("injected failure")
        return real(lm, drafter, verifier, policy, tokens, *a, **kw)

    monkeypatch.setattr(batch, "settle", settle)
    out = {}

    def good():
        out["good"] = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)

    def failing():
        try:
            client.completions.create(model=NAME, prompt="w5 w5 w5 w5", max_tokens=24)
        except openai.InternalServerError as e:
            out["bad"] = e

    threads = [threading.Thread(target=f, daemon=True) for f in (good, failing, good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert out["good"].choices[0].text == solo(pair, PROMPT, 24)
    assert out["bad"].status_code == 500 and "injected failure" in str(out["bad"])
    with pytest.raises(openai.APIError, match="injected failure"):  # streamed: an error event
        for _ in client.completions.create(model=NAME, prompt="w5 w5 w5 w5", max_tokens=24, stream=True):
            pass
    wait_idle(live)
    assert scrape(live)[("verispec:request_success_total", frozenset({("finish_reason", "error")}))] >= 2


def test_metrics_add_up(live, client):
    before = scrape(live)
    rs = [client.completions.create(model=NAME, prompt=f"w{i} w{2 * i} w{i + 1}", max_tokens=10 + i, temperature=0)
          for i in range(1, 4)]
    rs.append(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"verispec": {"method": "ar"}}))
    after = scrape(live)

    def delta(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    vs = [extra(r) for r in rs]
    assert delta("verispec:spec_decode_num_drafts_total") == sum(v["num_drafts"] for v in vs) > 0
    assert delta("verispec:spec_decode_num_draft_tokens_total") == sum(v["num_draft_tokens"] for v in vs)
    assert delta("verispec:spec_decode_num_accepted_tokens_total") == sum(v["num_accepted_draft_tokens"] for v in vs)
    for p in range(4):
        assert delta("verispec:spec_decode_num_accepted_tokens_per_pos_total", position=str(p)) == sum(
            v["acceptance_by_position"][p] for v in vs if len(v["acceptance_by_position"]) > p)
    assert delta("verispec:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in rs)
    assert delta("verispec:generation_tokens_total") == sum(r.usage.completion_tokens for r in rs)
    assert delta("verispec:request_success_total", finish_reason="length") == 4
    for h in ("e2e_request_latency_seconds", "time_to_first_token_seconds"):
        assert delta(f"verispec:{h}_count") == 4
    assert delta("verispec:inter_token_latency_seconds_count") > 0
    assert after[("verispec:num_requests_running", frozenset())] == 0
    assert after[("verispec:num_requests_waiting", frozenset())] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(live, client):
    before = scrape(live)
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=480, temperature=0, stream=True,
                                       extra_body={"verispec": {"method": "ar"}})  # ~0.7 s of tokens at least
    try:
        it = iter(stream)
        next(it), next(it)
        (job,) = live.service.jobs
        s = job.stream
    finally:
        stream.close()
    wait_idle(live)
    # "cancelled" at the next round, or "stop" where on_tokens saw the client gone first (the engine names every
    # on_tokens refusal "stop"; the server counts both as cancelled)
    assert s.finish_reason in ("cancelled", "stop") and len(s.output_ids) < 480
    assert s.lm.cache is None  # the KV cache is freed
    after = scrape(live)
    key = ("verispec:request_success_total", frozenset({("finish_reason", "cancelled")}))
    assert after[key] - before.get(key, 0) == 1
    # and it still serves
    assert client.completions.create(model=NAME, prompt="w1", max_tokens=2).usage.completion_tokens == 2


def test_sigterm_ends_streams_cleanly_and_stops_the_worker(pair):
    """uvicorn's SIGTERM handler (handle_exit): open streams get a final chunk and [DONE] (here after a 0.05 s
    grace, cancelled), the server exits, the worker thread stops."""
    import signal

    target, drafter = pair
    srv = Live(create_app(BatchEngine(target, drafter, max_batch=2), model_name=NAME), grace=0.05)
    events, signalled = [], False
    with httpx2.stream("POST", srv.url + "/v1/completions", timeout=TIMEOUT,
                       json={"model": NAME, "prompt": PROMPT, "max_tokens": 500, "temperature": 0, "stream": True,
                             "verispec": {"method": "ar"}}) as r:
        for line in r.iter_lines():
            if line:
                events.append(line)
            if len(events) == 2 and not signalled:
                srv.server.handle_exit(signal.SIGTERM, None)
                signalled = True
    srv.thread.join(30)
    assert not srv.thread.is_alive() and not srv.service.worker.alive
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "cancelled"
    assert srv.service.engine.idle


def test_the_cli_parses_serve_with_loopback_defaults():
    from verispec.cli import build_parser

    a = build_parser().parse_args(["serve"])
    bench = build_parser().parse_args(["bench"])
    assert (a.target, a.drafter) == (bench.target, bench.drafter)
    assert (a.host, a.port, a.max_batch, a.max_queue, a.gamma) == ("127.0.0.1", 8000, 8, 64, 4)
    a = build_parser().parse_args(["serve", "./m", "--drafter", "none", "--method", "pld", "--option", "max_n=3",
                                   "--api-key", "k", "--port", "9000"])
    assert (a.target, a.drafter, a.method, a.option, a.api_key, a.port) == ("./m", "none", "pld", ["max_n=3"], "k",
                                                                           9000)


# -- the load test --

@pytest.mark.slow
def test_loadtest(live, pair):
    """scripts/loadtest.py: 64 concurrent streaming clients, malformed requests and disconnects mixed in."""
    spec = importlib.util.spec_from_file_location("loadtest", Path(__file__).parent.parent / "scripts/loadtest.py")
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    engine = live.service.engine
    streams = []
    real_submit = engine.submit

    def submit(request):  # keep every stream the server makes, to check their caches afterwards
        s = real_submit(request)
        streams.append(s)
        return s

    engine.submit = submit
    gc.collect()
    caches_before = sum(isinstance(o, DynamicCache) for o in gc.get_objects())
    try:
        report = lt.run(live.url + "/v1", model=NAME, clients=64,
                        solo=lambda prompt, n, method: solo(pair, prompt, n, method=method))
    finally:
        del engine.submit
    assert report["ok"], report["problems"]
    assert report["completed"] >= 30 and report["disconnected"] >= 5 and report["malformed"] >= 10
    wait_idle(live)
    assert streams and all(s.done and s.lm.cache is None for s in streams)
    assert not engine.running and engine.waiting == 0
    del streams[:]
    gc.collect()  # memory back to its baseline: no KV cache of the 64 streams is still alive anywhere
    assert sum(isinstance(o, DynamicCache) for o in gc.get_objects()) <= caches_before
