"""llama.cpp as a benchmark peer: `llamacpp-ar` (`llama-server -m TARGET`, plain decoding) and `llamacpp-sd` (its
draft-model speculation, `llama-server -m TARGET -md DRAFT --spec-type draft-simple`, with its own default draft
settings unless `draft_max=`, `draft_min=`, `p_min=` are given), on the registry's own GGUF files.

Built on request, once per machine: `verispec build-llamacpp` (`ensure_built`) downloads the sdist of
llama-cpp-python (it vendors llama.cpp's source under vendor/llama.cpp), builds `llama-server` and `llama-bench`
with cmake into `cache_root()/llamacpp/<version>-<hash of the cmake flags>/`, in a temporary folder renamed when
complete, with a marker json (flags, version, binaries' sha256) written last: an interrupted build leaves nothing
that looks finished. The instruction sets are chosen from the CPU's own /proc/cpuinfo flags with
`-DGGML_NATIVE=OFF` (a native build emitted AMX on a VM that forbids it and died with SIGILL); AMX is always off.

A run sends llama-server the SAME prompt token ids verispec's methods get (`/completion` takes a list of ids), with
`cache_prompt: false` so every prompt is prefilled as ours are, verispec's sampling rule (greedy: temperature 0,
top-k 1; sampled: temperature, top-k, top-p in HF's order and every other llama.cpp sampler off) and asks for the
token ids back (`return_tokens`). Tokens are counted as verispec counts them: new ids up to and including the first
stop token (the target's `stop_ids`). t_total is the wall time of the HTTP request, measured here; llama.cpp's
own timings (prompt_ms, predicted_ms) and draft counts (draft_n, draft_n_accepted) go to `GenerationStats.extra`.

llama.cpp runs its own kernels on the quantized file (8-bit activations in its quantized dot products) and verifies a
draft in one batch, whose logits are not bit-identical to one-token decoding, so greedy tokens can differ from
verispec's AR (and llamacpp-sd's, rarely, from llamacpp-ar's) on near-ties: the same rule on other arithmetic, which
is why the records say lossless=False.

A server is started once per (binary, target file, drafter file, options, threads) and reused for every prompt of
a run, on 127.0.0.1 with a free port, waited for via GET /health and stopped at exit (atexit; `LlamaServer` is also
a context manager).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from verispec.home import cache_root

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp
DIST = "llama-cpp-python"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MARKER = "verispec-llamacpp.json"
BINARIES = ("llama-server", "llama-bench")
PEERS = ("llamacpp-ar", "llamacpp-sd")
SD = "llamacpp-sd"
BACKEND = "llama.cpp"  # what a row names as its backend
CTX = 4096  # context of the server's one slot: prompt + new tokens must fit
HOST = "127.0.0.1"
NOT_BUILT = "{label} skipped: llama.cpp is not built (run `verispec build-llamacpp`)"

# method option -> llama-server flag (this version's names; the old --draft-max / --draft-min were removed)
SD_FLAGS = {"draft_max": "--spec-draft-n-max", "draft_min": "--spec-draft-n-min", "p_min": "--spec-draft-p-min"}
SD_OPTIONS = tuple(SD_FLAGS)

_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")  # what GGML_AVX512 compiles for (-mavx512*)
# (cmake option, the /proc/cpuinfo flags it needs): each is set ON only where the CPU has all of them, OFF otherwise
# (with GGML_NATIVE=OFF ggml turns SSE4.2 / AVX / AVX2 / BMI2 / FMA / F16C on by default, so every one is explicit).
CPU_OPTIONS = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", _AVX512),
    ("GGML_AVX512_VBMI", (*_AVX512, "avx512vbmi")),
    ("GGML_AVX512_VNNI", (*_AVX512, "avx512_vnni")),
    ("GGML_AVX512_BF16", (*_AVX512, "avx512_bf16")),
)
# AMX off: a VM may list it and forbid it; and where tiles do run (verispec's own AMX kernels pass their probe on the
# Intel VM of 2026-12-03), this version's AMX build died with SIGILL in ggml_backend_amx_mul_mat (`tilezero` on a
# worker thread that had loaded no tile configuration)
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
FIXED_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: the build folder is renamed, an rpath would break
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # its default downloads the web UI from a model hub at build time
)


class LlamaCppError(RuntimeError):
    """llama.cpp could not be built, started or asked."""


def _log(msg: str) -> None:
    print(f"[verispec] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- build


def cpu_flags(text: str | None = None) -> frozenset[str]:
    """The CPU's flags from /proc/cpuinfo (or from `text`, its contents)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cmake_flags(cpu: frozenset[str] | set[str] | None = None) -> list[str]:
    """The cmake configure flags for a CPU with these /proc/cpuinfo flags (default: this machine's)."""
    cpu = cpu_flags() if cpu is None else cpu
    flags = list(FIXED_FLAGS)
    flags += [f"-D{opt}={'ON' if all(f in cpu for f in needs) else 'OFF'}" for opt, needs in CPU_OPTIONS]
    return flags + [f"-D{opt}=OFF" for opt in ALWAYS_OFF]


def build_id(flags: list[str]) -> str:
    return f"{VERSION}-{hashlib.sha256(chr(10).join(flags).encode()).hexdigest()[:12]}"


def build_dir(flags: list[str] | None = None) -> Path:
    return cache_root() / "llamacpp" / build_id(cmake_flags() if flags is None else flags)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Build:
    """A finished build: its folder and its marker."""

    dir: Path
    marker: dict

    def binary(self, name: str = "llama-server") -> Path:
        return self.dir / "bin" / name

    @property
    def server(self) -> Path:
        return self.binary("llama-server")

    def describe(self) -> dict:
        """What a run records about the engine (config.json)."""
        return {"dir": str(self.dir), "version": self.marker.get("version"),
                "llama_cpp": self.marker.get("llama_cpp"), "flags": self.marker.get("flags")}


def find_build(flags: list[str] | None = None) -> Build | None:
    """The finished build for these flags (default: this CPU's), or None; a folder whose marker is missing or whose
    binaries do not match their recorded sha256 is not a build."""
    d = build_dir(flags)
    try:
        marker = json.loads((d / MARKER).read_text())
        stamp = tuple((n, (d / "bin" / n).stat().st_mtime_ns, (d / "bin" / n).stat().st_size) for n in BINARIES)
    except (OSError, ValueError):
        return None
    binaries = marker.get("binaries", {})
    if set(binaries) != set(BINARIES):
        return None
    if _VERIFIED.get(d) != (stamp, binaries):  # hashed once per process while the files stay as they were
        if any(_sha256(d / "bin" / n) != sha for n, sha in binaries.items()):
            return None
        _VERIFIED[d] = (stamp, binaries)
    return Build(d, marker)


_VERIFIED: dict[Path, tuple] = {}


def _stream(cmd: list[str], log, progress, cwd: Path | None = None) -> None:
    """Run `cmd`, every output line to the log and to `progress`; raise with the last lines when it fails."""
    log.write("$ " + " ".join(map(str, cmd)) + "\n")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", cwd=cwd)
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        log.write(line + "\n")
        tail = (tail + [line])[-20:]
        progress(line)
    if proc.wait() != 0:
        raise LlamaCppError(f"`{' '.join(map(str, cmd[:3]))} ...` failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _download_sdist(dest: Path, progress) -> Path:
    progress(f"downloading the {DIST}=={VERSION} sdist (it vendors llama.cpp's source)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet", "-d", str(dest),
           f"{DIST}=={VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.tar.gz"))
    if res.returncode != 0 or len(found) != 1:
        raise LlamaCppError(f"could not download {DIST}=={VERSION} from PyPI:\n{res.stderr.strip()}")
    return found[0]


def _extract_llamacpp(archive: Path, dest: Path) -> Path:
    """Extract only vendor/llama.cpp from the sdist; return its folder."""
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        if not members:
            raise LlamaCppError(f"{archive.name} holds no vendor/llama.cpp")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(dest, members=members, **kwargs)
    src = next(dest.glob("*/vendor/llama.cpp"), None)
    if src is None or not (src / "CMakeLists.txt").is_file():
        raise LlamaCppError(f"{archive.name}: no CMakeLists.txt under vendor/llama.cpp")
    return src


def probe(binary: Path) -> str:
    """Run `binary --version`; return what it says (its version and compiler), raise unless it runs."""
    try:
        res = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LlamaCppError(f"{binary} does not run: {e}") from e
    out = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        hint = " (SIGILL: an instruction set the CPU lists but does not allow)" if res.returncode == -4 else ""
        raise LlamaCppError(f"{binary} --version exited with {res.returncode}{hint}:\n{out}")
    return out


def ensure_built(progress=_log, force: bool = False, sdist: str | Path | None = None,
                 jobs: int | None = None) -> Build:
    """Build llama-server and llama-bench for this CPU unless already built; return the build.

    `sdist`: a local copy of the llama-cpp-python sdist (checked against its sha256) instead of downloading it."""
    flags = cmake_flags()
    found = None if force else find_build(flags)
    if found is not None:
        progress(f"llama.cpp ({DIST} {VERSION}) is already built in {found.dir}")
        return found
    root = cache_root() / "llamacpp"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / build_id(flags)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=root))
    t0 = time.time()
    try:
        if sdist is None:
            archive = _download_sdist(tmp / "dl", progress)
        else:
            archive = Path(sdist)
        if _sha256(archive) != SDIST_SHA256:
            raise LlamaCppError(f"{archive} does not match the sha256 recorded for {DIST}=={VERSION}")
        progress(f"extracting vendor/llama.cpp from {archive.name}")
        src = _extract_llamacpp(archive, tmp / "src")
        out = tmp / "out"
        (out / "bin").mkdir(parents=True)
        jobs = jobs or os.cpu_count() or 1
        progress(f"cmake flags: {' '.join(flags)}")
        with open(out / "build.log", "w") as log:
            try:
                _stream(["cmake", "-S", src, "-B", tmp / "build", *flags], log, progress)
                _stream(["cmake", "--build", tmp / "build", "--config", "Release", "--target", *BINARIES,
                         "-j", str(jobs)], log, progress)
            except (LlamaCppError, OSError):
                log.flush()
                shutil.copy2(out / "build.log", root / "build-failed.log")
                progress(f"the full log is in {root / 'build-failed.log'}")
                raise
        for name in BINARIES:
            shutil.copy2(tmp / "build" / "bin" / name, out / "bin" / name)
        said = probe(out / "bin" / "llama-server")
        marker = {"dist": DIST, "version": VERSION, "sdist_sha256": SDIST_SHA256, "flags": flags,
                  "cpu": sorted(cpu_flags() & {f for _, needs in CPU_OPTIONS for f in needs}),
                  "binaries": {n: _sha256(out / "bin" / n) for n in BINARIES}, "llama_cpp": said,
                  "jobs": jobs, "seconds": round(time.time() - t0, 1), "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        (out / MARKER).write_text(json.dumps(marker, indent=1))  # written last: it marks the build as finished
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"llama.cpp built in {dest} ({time.time() - t0:.0f} s)")
    return Build(dest, marker)


def require_build() -> Build:
    b = find_build()
    if b is None:
        raise LlamaCppError("llama.cpp is not built (run `verispec build-llamacpp`)")
    return b


# ----------------------------------------------------------------------------------------------- models, options


def gguf_path(name: str) -> Path:
    """The GGUF file of registry model `name` (model_dir(name) / spec.gguf_name); refuses anything else."""
    from verispec.models.registry import REGISTRY
    from verispec.models.store import model_dir

    if name not in REGISTRY:
        raise ValueError(f"llama.cpp peers run the registry's GGUF files; {name!r} is not a registry model "
                         f"(known: {', '.join(REGISTRY)})")
    spec = REGISTRY[name]
    path = model_dir(name) / spec.gguf_name
    if not path.is_file() or path.stat().st_size != spec.size:
        raise ValueError(f"llama.cpp peers need {path} ({name}'s GGUF file), which is missing or incomplete; "
                         f"run `verispec models pull {name} --force`")
    return path


def server_options(spec) -> dict:
    """Checked llama-server options of a llama.cpp peer spec (a MethodSpec): {flag: value}."""
    params = dict(spec.params)
    if "drafter_backend" in params:
        raise ValueError(f"{spec.label!r}: llama.cpp runs its own drafter; drafter_backend= does not apply")
    unknown = sorted(set(params) - (set(SD_OPTIONS) if spec.name == SD else set()))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} in {spec.label!r}; {spec.name} takes: "
                         f"{', '.join(SD_OPTIONS) if spec.name == SD else 'none'}")
    out = {}
    for key in ("draft_max", "draft_min"):
        if key in params:
            v = params[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{spec.label!r}: {key} must be an integer >= 0, got {v!r}")
            out[SD_FLAGS[key]] = str(v)
    if "p_min" in params:
        v = params["p_min"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{spec.label!r}: p_min must be a number in [0, 1], got {v!r}")
        out[SD_FLAGS["p_min"]] = str(float(v))
    return out


@dataclass(frozen=True)
class GGUFModel:
    """What a llama.cpp peer runs on: a registry name, its GGUF file and the stop ids verispec counts by (the
    runner's stand-in for a peer model, so no transformers copy is loaded for llama.cpp)."""

    name: str
    path: Path
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    backend: str = BACKEND
    tokenizer: object = None


def is_peer(spec) -> bool:
    return spec.name in PEERS


def prepare_specs(specs: list, target: str, drafter: str | None, progress=_log) -> tuple[list, Build | None]:
    """The benchmark's specs without the llama.cpp peers when llama.cpp is not built (one line each says so), and
    the build; with a build, the peers' options and GGUF files are checked here, before any model is loaded."""
    peers = [s for s in specs if is_peer(s)]
    if not peers:
        return list(specs), None
    build = find_build()
    if build is None:
        for s in peers:
            progress(NOT_BUILT.format(label=s.label))
        return [s for s in specs if not is_peer(s)], None
    for s in peers:
        server_options(s)
    gguf_path(target)
    if any(s.name == SD for s in peers):
        if not drafter:
            raise ValueError(f"{[s.label for s in peers if s.name == SD]} need --drafter")
        gguf_path(drafter)
    return list(specs), build


# ---------------------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Client:
    """HTTP to a llama-server (stdlib only; proxies bypassed: the server is on loopback)."""

    def __init__(self, url: str, timeout: float = 900.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._open = urllib.request.build_opener(urllib.request.ProxyHandler({})).open

    def health(self) -> int:
        """HTTP status of GET /health (200 ready, 503 loading); 0 when nothing answers."""
        try:
            with self._open(self.url + "/health", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def complete(self, body: dict) -> tuple[dict, float]:
        """POST /completion; returns (its JSON, wall seconds of the request as measured here)."""
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        t0 = time.perf_counter()
        try:
            with self._open(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise LlamaCppError(f"llama-server answered {e.code}: {e.read().decode(errors='replace')[:500]}") from e
        except (urllib.error.URLError, OSError) as e:
            raise LlamaCppError(f"llama-server at {self.url} did not answer: {e}") from e
        t = time.perf_counter() - t0
        return json.loads(raw), t


class LlamaServer:
    """One llama-server process on loopback; `start()` waits for GET /health, `stop()` ends it."""

    def __init__(self, binary: Path, target: Path, drafter: Path | None = None, options: dict | None = None,
                 threads: int = 1, ctx: int = CTX, startup_timeout: float = 600.0):
        self.binary, self.target, self.drafter = Path(binary), Path(target), drafter and Path(drafter)
        self.options, self.threads, self.ctx = dict(options or {}), int(threads), int(ctx)
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None
        self.log_path: Path | None = None

    def command(self, port: int) -> list[str]:
        t = str(self.threads)
        cmd = [str(self.binary), "-m", str(self.target), "--host", HOST, "--port", str(port), "-c", str(self.ctx),
               "-np", "1",  # one slot: one request at a time, the whole context
               "-t", t, "-tb", t,
               "--cache-ram", "0",  # no prompt cache kept between requests (every prompt is prefilled)
               "--no-webui"]
        if self.drafter is not None:  # -md alone loads a drafter but does not speculate: the type is named
            cmd += ["-md", str(self.drafter), "--spec-type", "draft-simple"]
            for flag, value in self.options.items():
                cmd += [flag, value]
        return cmd

    def start(self) -> "LlamaServer":
        if self.proc is not None:
            return self
        fd, log = tempfile.mkstemp(prefix="verispec-llama-server-", suffix=".log")
        self.log_path = Path(log)
        self.port = free_port()
        with os.fdopen(fd, "w") as f:
            self.proc = subprocess.Popen(self.command(self.port), stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.client = Client(f"http://{HOST}:{self.port}")
        _LIVE.append(self)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                hint = " (SIGILL: rebuild without that instruction set)" if rc == -4 else ""
                raise LlamaCppError(f"llama-server exited with {rc}{hint} while starting; its log ends:\n"
                                    f"{self.log_tail()}")
            if self.client.health() == 200:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise LlamaCppError(f"llama-server did not become ready in {self.startup_timeout:.0f} s; its log "
                                    f"ends:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AttributeError):
            return ""

    def complete(self, body: dict) -> tuple[dict, float]:
        if self.client is None:
            raise LlamaCppError("llama-server is not started")
        return self.client.complete(body)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self in _LIVE:
            _LIVE.remove(self)
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_LIVE: list[LlamaServer] = []  # started servers, stopped at exit
_SERVERS: dict[tuple, LlamaServer] = {}  # one per (binary, target, drafter, options, threads), reused by a run


def stop_all() -> None:
    for s in list(_LIVE):
        s.stop()
    _SERVERS.clear()


atexit.register(stop_all)


def server_for(binary: Path, target: Path, drafter: Path | None, options: dict, threads: int) -> LlamaServer:
    key = (str(binary), str(target), str(drafter), tuple(sorted(options.items())), threads)
    s = _SERVERS.get(key)
    if s is None or s.proc is None or s.proc.poll() is not None:
        s = _SERVERS[key] = LlamaServer(binary, target, drafter, options, threads).start()
    return s


# --------------------------------------------------------------------------------------------- request, response


def request_body(prompt_ids: list[int], max_new_tokens: int, sampling) -> dict:
    """The /completion request: the same ids, verispec's sampling rule and nothing of llama.cpp's own filters."""
    body = {"prompt": [int(i) for i in prompt_ids], "n_predict": int(max_new_tokens), "stream": False,
            "cache_prompt": False, "return_tokens": True, "seed": int(sampling.seed),
            # every other sampler off (its defaults: repeat penalty 1.1 over 64 tokens, min-p 0.05, top-k 40 ...)
            "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "repeat_last_n": 0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0, "mirostat": 0,
            "dynatemp_range": 0.0, "top_n_sigma": -1.0, "n_probs": 0}
    if sampling.greedy:
        body.update(temperature=0.0, top_k=1, top_p=1.0, samplers=["top_k", "temperature"])
    else:  # HF's (verispec's) order: temperature, then top-k (0 = off for both), then top-p
        body.update(temperature=float(sampling.temperature), top_k=int(sampling.top_k),
                    top_p=float(sampling.top_p), samplers=["temperature", "top_k", "top_p"])
    return body


def count_tokens(resp: dict, stop_ids: frozenset[int], max_new_tokens: int) -> tuple[list[int], str, dict]:
    """(new ids as verispec counts them, stop reason, notes) from a /completion response: up to and including the
    first stop id, at most max_new_tokens."""
    got = [int(x) for x in resp.get("tokens") or []]
    predicted = int(resp.get("tokens_predicted", len(got)))
    if predicted and not got:
        raise LlamaCppError("llama-server returned no token ids (`return_tokens` not honoured)")
    stop_type = resp.get("stop_type", "")
    notes: dict = {}
    hit = next((i for i, x in enumerate(got) if x in stop_ids), None)
    if hit is not None:
        if hit + 1 < len(got):  # our stop id is not an end-of-generation token to llama.cpp: it went on
            notes["ran_past_stop"] = len(got) - hit - 1
        return got[: hit + 1], "stop_token", notes
    if stop_type == "eos" and predicted == len(got) + 1 and stop_ids:
        # llama.cpp stopped on an end-of-generation token it did not return in `tokens` (this version returns it;
        # others may not): append a stop id so the count is verispec's (up to and including the stop token). When
        # several ids stop generation (Qwen: 151643, 151645) the appended id is the smallest, a stand-in.
        notes["eos_appended"] = True
        return (got + [min(stop_ids)])[:max_new_tokens], "stop_token", notes
    if stop_type == "eos":  # an end-of-generation token of llama.cpp's that is not one of verispec's stop ids
        notes["engine_eos"] = got[-1] if got else None
        return got[:max_new_tokens], "engine_eos", notes
    if len(got) > max_new_tokens:  # n_predict "may exceed the limit slightly" (a partial multibyte character)
        notes["returned"] = len(got)
    return got[:max_new_tokens], "max_new_tokens", notes


def engine_info(resp: dict) -> dict:
    """llama.cpp's own numbers for one request: its timings (ms) and draft counts (speculation only)."""
    t = resp.get("timings") or {}
    info = {"backend": BACKEND, "engine": f"llama.cpp ({DIST} {VERSION})", "stop_type": resp.get("stop_type"),
            "tokens_evaluated": resp.get("tokens_evaluated"), "tokens_cached": resp.get("tokens_cached"),
            **{k: t.get(k) for k in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms",
                                     "predicted_per_second", "cache_n")}}
    if "draft_n" in t:
        info["draft_n"], info["draft_n_accepted"] = t["draft_n"], t.get("draft_n_accepted")
        info["draft_acceptance"] = t["draft_n_accepted"] / t["draft_n"] if t["draft_n"] else None
    return info


def run_llamacpp(spec, target, drafter, prompt_ids: list[int], max_new_tokens: int, sampling):
    """One generation by llama-server; `target` / `drafter` name registry models (`.name`) and `target.stop_ids`
    are the ids verispec counts by. Returns (new token ids, GenerationStats) like `peers.run_hf`."""
    import torch

    from verispec.types import GenerationStats

    build = require_build()
    drf = gguf_path(drafter.name) if spec.name == SD else None
    server = server_for(build.server, gguf_path(target.name), drf, server_options(spec), torch.get_num_threads())
    if len(prompt_ids) + max_new_tokens > server.ctx:
        raise ValueError(f"{spec.label}: prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceed "
                         f"llama-server's context of {server.ctx}")
    resp, t = server.complete(request_body(prompt_ids, max_new_tokens, sampling))
    if resp.get("tokens_evaluated") not in (None, len(prompt_ids)):
        raise LlamaCppError(f"llama-server evaluated {resp['tokens_evaluated']} prompt tokens, not the "
                            f"{len(prompt_ids)} it was sent")
    ids, reason, notes = count_tokens(resp, frozenset(target.stop_ids), max_new_tokens)
    info = {**engine_info(resp), **notes}
    stats = GenerationStats(method=spec.label, prompt_tokens=len(prompt_ids), new_tokens=len(ids), t_total=t,
                            t_prefill=(info.get("prompt_ms") or 0.0) / 1000, stop_reason=reason, extra=info)
    return ids, stats
