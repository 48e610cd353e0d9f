"""llama.cpp as a benchmark peer, without a real binary: a fake llama-server (in a thread, or as a process started
the way the real one is) answers /health and /completion as llama-server does, and a fake cmake builds fake
binaries."""

from __future__ import annotations

import json
import os
import sys
import tarfile
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from verispec.bench import llamacpp
from verispec.bench.methods import MethodSpec, parse_methods
from verispec.registry import METHODS
from verispec.sampling import Sampling

QWEN_STOPS = frozenset({151643, 151645})

# A fake llama-server: its /completion continues any prompt with CONTINUATION (token ids), stops after an
# end-of-generation id of its own (EOG, which includes the returned token, as llama-server 0.3.36 does) or at
# n_predict, and answers with llama-server's fields. Used in a thread and, written to a file, as a "binary".
FAKE_SERVER = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler

CONTINUATION = [11, 12, 13, 151645, 14, 15]
EOG = {151643, 151645, 151664}


class Handler(BaseHTTPRequestHandler):
    state = {"health_calls": 0, "loading": 2, "requests": [], "speculative": False, "drop_eos": False,
             "continuation": CONTINUATION}

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        raw = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        if self.path != "/health":
            return self._send(404, {"error": "not found"})
        self.state["health_calls"] += 1
        if self.state["health_calls"] <= self.state["loading"]:
            return self._send(503, {"error": {"code": 503, "message": "Loading model"}})
        self._send(200, {"status": "ok"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.state["requests"].append(body)
        if self.path != "/completion" or not isinstance(body.get("prompt"), list):
            return self._send(400, {"error": {"code": 400, "message": "bad request"}})
        out, stop = [], "limit"
        for t in self.state["continuation"]:
            if len(out) == body["n_predict"]:
                break
            out.append(t)
            if t in EOG:
                stop = "eos"
                break
        predicted = len(out)
        if stop == "eos" and self.state["drop_eos"]:
            out = out[:-1]
        timings = {"cache_n": 0, "prompt_n": len(body["prompt"]), "prompt_ms": 12.5, "prompt_per_token_ms": 1.0,
                   "prompt_per_second": 80.0, "predicted_n": predicted, "predicted_ms": 40.0,
                   "predicted_per_token_ms": 10.0, "predicted_per_second": 100.0}
        if self.state["speculative"]:
            timings.update(draft_n=6, draft_n_accepted=4)
        self._send(200, {"index": 0, "content": "...", "tokens": out if body.get("return_tokens") else [],
                         "id_slot": 0, "stop": True, "model": "m", "tokens_predicted": predicted,
                         "tokens_evaluated": len(body["prompt"]), "stop_type": stop, "stopping_word": "",
                         "tokens_cached": 0, "timings": timings})


def main(argv):
    from http.server import ThreadingHTTPServer

    if "--version" in argv:
        print("version: 1 (fake)")
        return 0
    if os.environ.get("FAKE_LLAMA_ARGV"):
        with open(os.environ["FAKE_LLAMA_ARGV"], "w") as f:
            json.dump(argv, f)
    if os.environ.get("FAKE_LLAMA_CRASH"):
        print("error: failed to load model", file=sys.stderr)
        return 1
    Handler.state["speculative"] = "-md" in argv
    srv = ThreadingHTTPServer((argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])), Handler)
    srv.serve_forever()
'''


def _fake_module() -> dict:
    ns: dict = {}
    exec(FAKE_SERVER, ns)
    return ns


@pytest.fixture
def fake_server():
    """A fake llama-server in a thread: (Client, its state)."""
    ns = _fake_module()
    handler = ns["Handler"]
    handler.state = dict(handler.state, loading=0, requests=[])
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield llamacpp.Client(f"http://127.0.0.1:{srv.server_address[1]}"), handler.state
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fake_binary(tmp_path):
    """A fake llama-server executable (this Python running FAKE_SERVER) in a fake build folder."""
    b = tmp_path / "build" / "bin" / "llama-server"
    b.parent.mkdir(parents=True)
    b.write_text(f"#!{sys.executable}\n{FAKE_SERVER}\nif __name__ == '__main__':\n    sys.exit(main(sys.argv[1:]))\n")
    b.chmod(0o755)
    yield llamacpp.Build(tmp_path / "build", {"version": llamacpp.VERSION, "flags": ["-DGGML_NATIVE=OFF"]})
    llamacpp.stop_all()


def spec(label: str) -> MethodSpec:
    return parse_methods(label)[0]


class Named:
    def __init__(self, name, stop_ids=QWEN_STOPS):
        self.name, self.stop_ids = name, stop_ids


# ----------------------------------------------------------------------------------------------- request, response


def test_the_request_sends_our_ids_and_our_sampling_rule():
    b = llamacpp.request_body([1, 2, 3], 16, Sampling())
    assert b["prompt"] == [1, 2, 3] and b["n_predict"] == 16 and b["cache_prompt"] is False
    assert b["return_tokens"] is True and b["stream"] is False
    assert b["temperature"] == 0.0 and b["top_k"] == 1 and b["samplers"] == ["top_k", "temperature"]
    s = llamacpp.request_body([1], 8, Sampling(temperature=0.7, top_k=5, top_p=0.9, seed=3))
    assert (s["temperature"], s["top_k"], s["top_p"], s["seed"]) == (0.7, 5, 0.9, 3)
    assert s["samplers"] == ["temperature", "top_k", "top_p"]  # HF's order: top-p sees the tempered distribution
    for off in (s, b):  # llama.cpp's own filters, on by default there, are off
        assert off["min_p"] == 0.0 and off["repeat_penalty"] == 1.0 and off["typical_p"] == 1.0
        assert off["dry_multiplier"] == 0.0 and off["xtc_probability"] == 0.0 and off["mirostat"] == 0
        assert off["presence_penalty"] == off["frequency_penalty"] == 0.0


def test_the_client_talks_to_a_llama_server(fake_server):
    client, state = fake_server
    assert client.health() == 200
    resp, t = client.complete(llamacpp.request_body([5, 6], 3, Sampling()))
    assert resp["tokens"] == [11, 12, 13] and resp["stop_type"] == "limit" and t > 0
    assert state["requests"][-1]["prompt"] == [5, 6]
    assert llamacpp.Client("http://127.0.0.1:9").health() == 0  # nothing there
    with pytest.raises(llamacpp.LlamaCppError, match="did not answer"):
        llamacpp.Client("http://127.0.0.1:9", timeout=2).complete({})


@pytest.mark.parametrize("case", ["stop", "limit", "past_stop", "eos_not_returned", "engine_eos", "over"])
def test_tokens_are_counted_as_verispec_counts_them(case):
    def resp(tokens, stop_type, predicted=None):
        return {"tokens": tokens, "stop_type": stop_type, "tokens_predicted": len(tokens) if predicted is None
                else predicted}

    if case == "stop":  # up to and including the first stop token
        assert llamacpp.count_tokens(resp([4, 5, 151645], "eos"), QWEN_STOPS, 8) == ([4, 5, 151645],
                                                                                   "stop_token", {})
    elif case == "limit":
        assert llamacpp.count_tokens(resp([4, 5, 6], "limit"), QWEN_STOPS, 3) == ([4, 5, 6], "max_new_tokens", {})
    elif case == "past_stop":  # a stop id of ours that is no end-of-generation token to llama.cpp: cut there
        assert llamacpp.count_tokens(resp([4, 9, 5, 6], "limit"), frozenset({9}), 4) == (
            [4, 9], "stop_token", {"ran_past_stop": 2})
    elif case == "eos_not_returned":  # llama.cpp stopped on EOS without returning it: appended, and said so
        ids, why, notes = llamacpp.count_tokens(resp([4, 5], "eos", predicted=3), frozenset({7}), 8)
        assert (ids, why, notes) == ([4, 5, 7], "stop_token", {"eos_appended": True})
    elif case == "engine_eos":  # an end-of-generation token of llama.cpp's own that verispec would not stop on
        ids, why, notes = llamacpp.count_tokens(resp([4, 151664], "eos"), QWEN_STOPS, 8)
        assert (ids, why, notes) == ([4, 151664], "engine_eos", {"engine_eos": 151664})
    else:  # n_predict may be exceeded slightly: never more than max_new_tokens
        assert llamacpp.count_tokens(resp([4, 5, 6], "limit"), QWEN_STOPS, 2)[0] == [4, 5]
    with pytest.raises(llamacpp.LlamaCppError, match="return_tokens"):
        llamacpp.count_tokens({"tokens": [], "tokens_predicted": 3, "stop_type": "limit"}, QWEN_STOPS, 3)


def test_a_generation_returns_ids_and_llamacpps_own_numbers(fake_server, monkeypatch, tmp_path):
    client, state = fake_server
    client.ctx = llamacpp.CTX
    state["speculative"] = True
    started = []
    monkeypatch.setattr(llamacpp, "require_build", lambda: llamacpp.Build(tmp_path, {}))
    monkeypatch.setattr(llamacpp, "gguf_path", lambda name: tmp_path / f"{name}.gguf")
    monkeypatch.setattr(llamacpp, "server_for", lambda *a: started.append(a) or client)
    ids, stats = llamacpp.run_llamacpp(spec("llamacpp-sd:draft_max=8"), Named("qwen2.5-coder-1.5b"),
                                       Named("qwen2.5-coder-0.5b"), [1, 2, 3, 4], 16, Sampling())
    assert ids == [11, 12, 13, 151645] and stats.new_tokens == 4 and stats.stop_reason == "stop_token"
    assert stats.prompt_tokens == 4 and stats.t_total > 0 and stats.t_prefill == pytest.approx(0.0125)
    e = stats.extra
    assert e["backend"] == "llama.cpp" and e["draft_n"] == 6 and e["draft_n_accepted"] == 4
    assert e["draft_acceptance"] == pytest.approx(4 / 6) and e["prompt_ms"] == 12.5 and e["predicted_ms"] == 40.0
    binary, target, drafter, options, threads = started[0]
    assert target.name == "qwen2.5-coder-1.5b.gguf" and drafter.name == "qwen2.5-coder-0.5b.gguf"
    assert options == {"--spec-draft-n-max": "8"} and threads >= 1
    state["drop_eos"], state["speculative"] = True, False  # llama.cpp that keeps the EOS to itself
    ids, stats = llamacpp.run_llamacpp(spec("llamacpp-ar"), Named("qwen2.5-coder-1.5b", frozenset({151645})), None,
                                       [1], 16, Sampling())
    assert ids == [11, 12, 13, 151645] and stats.extra["eos_appended"] and "draft_n" not in stats.extra
    assert started[1][2] is None  # plain decoding: no drafter
    with pytest.raises(ValueError, match="context"):
        llamacpp.run_llamacpp(spec("llamacpp-ar"), Named("x"), None, [1] * 4000, 200, Sampling())


# ---------------------------------------------------------------------------------------------------- the server


def test_the_server_is_started_waited_for_reused_and_stopped(fake_binary, tmp_path, monkeypatch):
    argv = tmp_path / "argv.json"
    monkeypatch.setenv("FAKE_LLAMA_ARGV", str(argv))
    opts = llamacpp.server_options(spec("llamacpp-sd:draft_max=8:p_min=0.5"))
    with llamacpp.LlamaServer(fake_binary.server, tmp_path / "t.gguf", tmp_path / "d.gguf", opts, threads=2) as s:
        assert s.client.health() == 200  # it answered 503 ("loading") twice first: start() waited
        resp, _ = s.complete(llamacpp.request_body([1, 2], 2, Sampling()))
        assert resp["tokens"] == [11, 12]
        proc = s.proc
        cmd = json.loads(argv.read_text())
    assert proc.poll() is not None  # stopped on exit
    pairs = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1)}
    assert pairs["-m"].endswith("t.gguf") and pairs["-md"].endswith("d.gguf") and pairs["--spec-type"] == "draft-simple"
    assert pairs["--spec-draft-n-max"] == "8" and pairs["--spec-draft-p-min"] == "0.5"
    assert pairs["-t"] == pairs["-tb"] == "2" and pairs["-c"] == str(llamacpp.CTX) and pairs["--host"] == "127.0.0.1"
    assert pairs["-np"] == "1"
    a = llamacpp.server_for(fake_binary.server, tmp_path / "t.gguf", None, {}, 1)
    assert llamacpp.server_for(fake_binary.server, tmp_path / "t.gguf", None, {}, 1) is a  # one per configuration
    assert "-md" not in a.command(1)
    llamacpp.stop_all()
    assert a.proc is None


def test_a_server_that_dies_while_starting_is_an_error(fake_binary, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    with pytest.raises(llamacpp.LlamaCppError, match="(?s)exited with 1.*failed to load model"):
        llamacpp.LlamaServer(fake_binary.server, tmp_path / "t.gguf").start()


# ------------------------------------------------------------------------------------------------------- building


ZEN3 = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall "
        "nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq "
        "pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor "
        "lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext invpcid_single ssbd ibrs ibpb "
        "stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni "
        "xsaveopt xsavec xgetbv1 xsaves clzero xsaveerptr wbnoinvd arat npt nrip_save umip pku ospke vaes vpclmulqdq "
        "rdpid fsrm")
INTEL = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
         "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni "
         "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand "
         "hypervisor lahf_lm abm 3dnowprefetch cpuid_fault ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 "
         "avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni "
         "avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd arat vnmi avx512vbmi umip pku "
         "ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq la57 rdpid "
         "bus_lock_detect cldemote movdiri movdir64b fsrm md_clear serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile "
         "amx_int8 flush_l1d arch_capabilities")


def _opts(flags: list[str]) -> dict:
    return dict(f[2:].split("=", 1) for f in flags)


def test_flags_come_from_the_cpus_own_flags():
    assert llamacpp.cpu_flags(f"processor\t: 0\nflags\t\t: {ZEN3}\n\nprocessor\t: 1\nflags\t\t: {ZEN3}\n") == \
        frozenset(ZEN3.split())
    zen3 = _opts(llamacpp.cmake_flags(frozenset(ZEN3.split())))
    intel = _opts(llamacpp.cmake_flags(frozenset(INTEL.split())))
    for o in (zen3, intel):
        assert o["GGML_NATIVE"] == "OFF" and o["LLAMA_CURL"] == "OFF" and o["CMAKE_BUILD_TYPE"] == "Release"
        assert o["GGML_AMX_TILE"] == o["GGML_AMX_INT8"] == o["GGML_AMX_BF16"] == "OFF"  # even where listed
        assert o["GGML_AVX2"] == o["GGML_FMA"] == o["GGML_F16C"] == "ON"
        assert "GGML_OPENMP" not in o  # its default
    assert all(zen3[k] == "OFF" for k in ("GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX512_VBMI",
                                          "GGML_AVX_VNNI"))
    assert all(intel[k] == "ON" for k in ("GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX512_VBMI",
                                          "GGML_AVX_VNNI"))
    no_avx512f = frozenset(INTEL.split()) - {"avx512f"}  # the extensions need the base set
    assert _opts(llamacpp.cmake_flags(no_avx512f))["GGML_AVX512_VNNI"] == "OFF"
    assert _opts(llamacpp.cmake_flags(frozenset()))["GGML_AVX2"] == "OFF"  # nothing assumed
    assert llamacpp.build_id(llamacpp.cmake_flags(frozenset(ZEN3.split()))) != \
        llamacpp.build_id(llamacpp.cmake_flags(frozenset(INTEL.split())))


FAKE_CMAKE = r'''#!{python}
import os, sys
args = sys.argv[1:]
if "-S" in args:
    print("-- Configuring done")
    os.makedirs(args[args.index("-B") + 1], exist_ok=True)
    sys.exit(0)
build = args[args.index("--build") + 1]
if os.environ.get("FAKE_CMAKE_FAIL"):
    print("c++: fatal error: Killed signal terminated program cc1plus")
    sys.exit(1)
os.makedirs(os.path.join(build, "bin"), exist_ok=True)
for name in ("llama-server", "llama-bench"):
    p = os.path.join(build, "bin", name)
    with open(p, "w") as f:
        f.write("#!/bin/sh\necho 'version: 1 (fake)'\n")
    os.chmod(p, 0o755)
    print(f"[100%] Built target {name}")
'''


@pytest.fixture
def fake_toolchain(tmp_path, monkeypatch):
    """VERISPEC_HOME in tmp, a fake sdist (sha256 pinned to it) and a fake cmake on PATH."""
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path / "home"))
    src = tmp_path / "sdist" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "sdist" / "llama_cpp_python-0.3.36", arcname="llama_cpp_python-0.3.36")
    monkeypatch.setattr(llamacpp, "SDIST_SHA256", llamacpp._sha256(archive))
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    (bindir / "cmake").write_text(FAKE_CMAKE.replace("{python}", sys.executable))
    (bindir / "cmake").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return archive


def test_a_build_is_finished_or_absent(fake_toolchain, tmp_path, monkeypatch):
    lines = []
    monkeypatch.setenv("FAKE_CMAKE_FAIL", "1")
    with pytest.raises(llamacpp.LlamaCppError, match="Killed signal"):
        llamacpp.ensure_built(progress=lines.append, sdist=fake_toolchain)
    root = tmp_path / "home" / "llamacpp"
    assert llamacpp.find_build() is None and [p.name for p in root.iterdir()] == ["build-failed.log"]
    monkeypatch.delenv("FAKE_CMAKE_FAIL")
    b = llamacpp.ensure_built(progress=lines.append, sdist=fake_toolchain)
    assert "[100%] Built target llama-server" in lines  # cmake's own lines are the progress
    assert b.dir == llamacpp.build_dir() and b.dir.parent == root and b.server.is_file()
    assert b.marker["flags"] == llamacpp.cmake_flags() and b.marker["version"] == llamacpp.VERSION
    assert b.marker["llama_cpp"] == "version: 1 (fake)" and set(b.marker["binaries"]) == {"llama-server", "llama-bench"}
    assert sorted(p.name for p in root.iterdir()) == sorted(["build-failed.log", b.dir.name])  # no temporaries left
    assert llamacpp.find_build() == b
    assert llamacpp.ensure_built(progress=lines.append, sdist=fake_toolchain) == b and "already built" in lines[-1]
    b.server.write_text("#!/bin/sh\necho tampered\n")  # a binary that is not the one recorded: not a build
    assert llamacpp.find_build() is None
    other = tmp_path / "other.tar.gz"
    other.write_bytes(b"not the sdist")
    with pytest.raises(llamacpp.LlamaCppError, match="sha256"):
        llamacpp.ensure_built(progress=lines.append, sdist=other, force=True)


def test_the_cli_builds_and_reports(fake_toolchain, capsys):
    from verispec.cli import main

    assert main(["build-llamacpp", "--status"]) == 0
    out = capsys.readouterr().out
    assert "-DGGML_NATIVE=OFF" in out and "built: no" in out
    assert main(["build-llamacpp", "--sdist", str(fake_toolchain)]) == 0
    assert capsys.readouterr().out.strip().endswith("bin/llama-server")
    assert main(["build-llamacpp", "--status"]) == 0 and "built: yes" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- options, models, skips


def test_options_parse_and_map_to_llama_servers_flags():
    s = spec("llamacpp-sd:draft_max=8:p_min=0.5")
    assert s.params == {"draft_max": 8, "p_min": 0.5} and s.peer and s.needs_drafter
    assert llamacpp.server_options(s) == {"--spec-draft-n-max": "8", "--spec-draft-p-min": "0.5"}
    assert llamacpp.server_options(spec("llamacpp-sd:draft_min=2")) == {"--spec-draft-n-min": "2"}
    assert llamacpp.server_options(spec("llamacpp-sd")) == {} and not spec("llamacpp-ar").needs_drafter
    assert METHODS["llamacpp-sd"].options == llamacpp.SD_OPTIONS and METHODS["llamacpp-ar"].options == ()
    for bad, msg in (("llamacpp-sd:gamma=4", "unknown option.*gamma"), ("llamacpp-ar:draft_max=8", "unknown option"),
                     ("llamacpp-sd:kernels=verispec", "unknown option")):
        with pytest.raises(ValueError, match=msg):
            parse_methods(bad)
    for bad, msg in (("llamacpp-sd:draft_max=-1", "draft_max"), ("llamacpp-sd:p_min=2", "p_min"),
                     ("llamacpp-sd:draft_max=2.5", "draft_max"), ("llamacpp-sd:drafter_backend=fast", "drafter")):
        with pytest.raises(ValueError, match=msg):
            llamacpp.server_options(spec(bad))


def test_only_registry_gguf_files_are_run(tmp_path, monkeypatch):
    from verispec.models.registry import REGISTRY

    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="not a registry model"):
        llamacpp.gguf_path(str(tmp_path / "my-hf-folder"))
    with pytest.raises(ValueError, match="models pull smollm2-135m"):
        llamacpp.gguf_path("smollm2-135m")
    spec_ = REGISTRY["smollm2-135m"]
    f = tmp_path / "models" / "smollm2-135m" / spec_.gguf_name
    f.parent.mkdir(parents=True)
    with open(f, "wb") as h:
        h.truncate(spec_.size - 1)  # incomplete
    with pytest.raises(ValueError, match="missing or incomplete"):
        llamacpp.gguf_path("smollm2-135m")
    with open(f, "wb") as h:
        h.truncate(spec_.size)  # sparse: the size is what is checked
    assert llamacpp.gguf_path("smollm2-135m") == f


def test_unbuilt_peers_are_skipped_with_one_line(folders, monkeypatch, capsys):
    from verispec.bench import runner

    monkeypatch.setattr(llamacpp, "find_build", lambda flags=None: None)
    lines = []
    specs, build = llamacpp.prepare_specs(parse_methods("ar,llamacpp-ar,llamacpp-sd"), "x", "y", lines.append)
    assert [s.label for s in specs] == ["ar"] and build is None
    assert lines == ["llamacpp-ar skipped: llama.cpp is not built (run `verispec build-llamacpp`)",
                     "llamacpp-sd skipped: llama.cpp is not built (run `verispec build-llamacpp`)"]
    loaded = []
    real = runner.load_model
    monkeypatch.setattr(runner, "load_model", lambda name, **kw: loaded.append(kw["backend"]) or real(name, **kw))
    out = folders / "skip"
    s = runner.run_bench(str(folders / "t"), str(folders / "d"), "llamacpp-ar,llamacpp-sd", str(folders / "p.jsonl"),
                         num_prompts=1, max_new_tokens=4, out_dir=out, cost_model=False, progress=False,
                         warmup=False)
    assert "llamacpp-ar skipped: llama.cpp is not built" in capsys.readouterr().err
    assert set(s["groups"]["overall"]) == {"ar"} and "torch" not in loaded  # no transformers copies


def test_a_built_peer_refuses_a_model_that_is_not_a_registry_gguf(folders, fake_binary, monkeypatch):
    from verispec.bench import runner

    monkeypatch.setattr(llamacpp, "find_build", lambda flags=None: fake_binary)
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("refused only after loading models"))
    with pytest.raises(ValueError, match="not a registry model"):
        runner.run_bench(str(folders / "t"), str(folders / "d"), "llamacpp-ar", str(folders / "p.jsonl"),
                         num_prompts=1, max_new_tokens=4, out_dir=folders / "refuse", cost_model=False,
                         progress=False, warmup=False)


def test_the_bench_runs_the_peers_on_gguf_files_only(folders, fake_binary, monkeypatch, tmp_path):
    """The whole bench with a fake llama-server process: llama.cpp rows, their draft counts, no transformers copy."""
    from verispec.bench import runner

    monkeypatch.setattr(llamacpp, "find_build", lambda flags=None: fake_binary)
    monkeypatch.setattr(llamacpp, "gguf_path", lambda name: Path(name) / "model.gguf")
    loaded = []
    real = runner.load_model
    monkeypatch.setattr(runner, "load_model", lambda name, **kw: loaded.append(kw["backend"]) or real(name, **kw))
    out = folders / "lcp"
    runner.run_bench(str(folders / "t"), str(folders / "d"), "llamacpp-ar,llamacpp-sd:draft_max=4",
                     str(folders / "p.jsonl"), num_prompts=2, max_new_tokens=3, out_dir=out, cost_model=False,
                     progress=False, warmup=True)
    assert "torch" not in loaded  # the GGUF files only: no plain transformers copies of target or drafter
    rows = [json.loads(r) for r in (out / "prompts.jsonl").read_text().splitlines()]
    lcp = [r for r in rows if r["method"].startswith("llamacpp")]
    assert len(lcp) == 4 and all(r["backend"] == "llama.cpp" and r["peer"] for r in lcp)
    assert all(r["token_ids"] == [11, 12, 13] and r["new_tokens"] == 3 for r in lcp)
    sd = [r for r in lcp if r["method"] == "llamacpp-sd:draft_max=4"]
    assert all(r["peer_info"]["draft_n"] == 6 and r["peer_info"]["draft_n_accepted"] == 4 for r in sd)
    assert all("draft_n" not in r["peer_info"] for r in lcp if r["method"] == "llamacpp-ar")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backends"]["llamacpp"]["version"] == llamacpp.VERSION and cfg["backends"]["peers"]["target"] is None
    assert len(llamacpp._SERVERS) == 2  # one server per configuration, reused by every prompt


def test_llamacpp_rows_say_llamacpp_next_to_an_hf_peer(folders, fake_binary, monkeypatch):
    """With an HF peer in the run the plain transformers copy is loaded for it; the llama.cpp row still names
    llama.cpp (and runs the GGUF file of the same model)."""
    monkeypatch.setattr(llamacpp, "find_build", lambda flags=None: fake_binary)
    monkeypatch.setattr(llamacpp, "gguf_path", lambda name: Path(name) / "model.gguf")
    out = folders / "mixed"
    from verispec.bench.runner import run_bench

    run_bench(str(folders / "t"), str(folders / "d"), "hf-ar,llamacpp-ar", str(folders / "p.jsonl"), num_prompts=1,
              max_new_tokens=3, out_dir=out, cost_model=False, progress=False, warmup=False)
    rows = {r["method"]: r for r in map(json.loads, (out / "prompts.jsonl").read_text().splitlines())}
    assert rows["hf-ar"]["backend"] == "torch" and rows["hf-ar"]["peer_info"] is None
    assert rows["llamacpp-ar"]["backend"] == "llama.cpp" and rows["llamacpp-ar"]["peer_info"]["prompt_ms"] == 12.5
