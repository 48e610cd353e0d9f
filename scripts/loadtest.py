"""Load test for `verispec serve`: many concurrent streaming clients on one server, with malformed requests and
mid-stream disconnects mixed in, then checks that nothing leaked and every answer is right.

    python scripts/loadtest.py --url http://127.0.0.1:8000/v1 --model qwen2.5-coder-1.5b [--clients 64] \\
        [--api-key KEY] [--solo-target qwen2.5-coder-1.5b --solo-drafter qwen2.5-coder-0.5b]

Phase 1 (`clients` at once, greedy): normal streaming requests (methods sd and ar, some with stop strings), clients
that close their stream after 2 chunks, and malformed requests (bad JSON, negative max_tokens, an unknown method,
an empty prompt). Phase 2: a quarter as many clean streaming requests, for exact metric sums. Checks:
- every malformed request got 400 with an OpenAI error object; no request failed otherwise;
- every completed text equals its solo run (`solo(prompt, max_tokens, method)`, e.g. `verispec.generate`), when a
  solo function is given (on the gguf backend greedy batched output equals the solo run token for token);
- the server still answers afterwards, and /metrics shows nothing running or waiting;
- /metrics: finished requests by finish_reason add up to what the clients saw (a disconnected client's request is
  "cancelled", or finished if it ended before the server noticed); phase 2's counter deltas equal the sums of the
  per-request `verispec` metrics and usage exactly.
Every request has a timeout and every wait a deadline. `run()` returns a report; `ok` is whether every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import httpx2
import openai

REQUEST_TIMEOUT_S = 120.0
MALFORMED = [
    ("bad json", '{"model": "M", "prompt": "w1 w2", "max_tokens": '),
    ("negative max_tokens", {"prompt": "w1 w2", "max_tokens": -3}),
    ("unknown method", {"prompt": "w1 w2", "max_tokens": 4, "verispec": {"method": "no-such-method"}}),
    ("empty prompt", {"prompt": "", "max_tokens": 4}),
]


def _prompt(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))


def plan(clients: int, seed: int = 0, words: list[str] | None = None) -> list[dict]:
    """What each client does: 1 in 4 malformed, 1 in 8 disconnecting, the rest normal streaming (greedy)."""
    rng = random.Random(seed)
    words = words or [f"w{i}" for i in range(63)]
    out = []
    for i in range(clients):
        if i % 4 == 3:
            name, body = MALFORMED[(i // 4) % len(MALFORMED)]
            out.append({"kind": "malformed", "what": name, "body": body})
        elif i % 8 == 1:
            out.append({"kind": "disconnect", "prompt": _prompt(rng, words), "max_tokens": 200, "method": "ar"})
        else:
            out.append({"kind": "normal", "prompt": _prompt(rng, words), "max_tokens": rng.randint(8, 40),
                        "method": rng.choice(["sd", "sd", "ar"]), "stop": rng.random() < 0.25})
    return out


def _scrape(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sum(metrics: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= ls)


async def _stream_one(client: openai.AsyncOpenAI, model: str, job: dict, stop_after: int | None = None) -> dict:
    kw = {}
    if job.get("stop_str"):
        kw["stop"] = job["stop_str"]
    t0 = time.perf_counter()
    stream = await client.completions.create(model=model, prompt=job["prompt"], max_tokens=job["max_tokens"],
                                             temperature=0, stream=True, stream_options={"include_usage": True},
                                             extra_body={"verispec": {"method": job["method"]}}, **kw)
    text, finish, verispec, usage, n, ttft = [], None, None, None, 0, None
    try:
        async for chunk in stream:
            if chunk.choices:
                c = chunk.choices[0]
                if c.text and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(c.text or "")
                if c.finish_reason:
                    finish = c.finish_reason
                    verispec = (chunk.model_extra or {}).get("verispec")
            if chunk.usage is not None:
                usage = chunk.usage
            n += 1
            if stop_after is not None and n >= stop_after:
                return {"disconnected": True, "chunks": n}
    finally:
        await stream.close()
    return {"text": "".join(text), "finish_reason": finish, "verispec": verispec, "usage": usage,
            "latency": time.perf_counter() - t0, "ttft": ttft}


async def _malformed(http: httpx2.AsyncClient, url: str, model: str, body, headers: dict) -> dict:
    if isinstance(body, str):
        content = body.replace('"M"', json.dumps(model))
    else:
        content = json.dumps({"model": model, **body})
    r = await http.post(url + "/completions", content=content, headers={"Content-Type": "application/json", **headers})
    try:
        err = r.json().get("error")
    except ValueError:
        err = None
    return {"status": r.status_code, "error": err}


async def _phase(url: str, model: str, api_key: str, jobs: list[dict]) -> list[dict]:
    headers = {"Authorization": f"Bearer {api_key}"}
    async with openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=REQUEST_TIMEOUT_S) as client, \
            httpx2.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:

        async def one(job):
            try:
                if job["kind"] == "malformed":
                    out = await _malformed(http, url, model, job["body"], headers)
                elif job["kind"] == "disconnect":
                    out = await _stream_one(client, model, job, stop_after=2)
                else:
                    out = await _stream_one(client, model, job)
            except Exception as e:  # noqa: BLE001 — recorded, checked below
                out = {"exception": f"{type(e).__name__}: {e}"}
            return {**job, **out}

        return await asyncio.wait_for(asyncio.gather(*(one(j) for j in jobs)), REQUEST_TIMEOUT_S * 2)


async def _get(url: str, path: str, api_key: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.get(url.rstrip("/").removesuffix("/v1") + path,
                              headers={"Authorization": f"Bearer {api_key}"})


async def _settle(url: str, api_key: str, timeout: float = 30.0) -> dict:
    """/metrics once nothing is running or waiting (cancelled streams leave at the next round), or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        m = _scrape((await _get(url, "/metrics", api_key)).text)
        idle = _sum(m, "verispec:num_requests_running") == 0 and _sum(m, "verispec:num_requests_waiting") == 0
        if idle or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.05)


async def _run(url: str, model: str, clients: int, solo, api_key: str, seed: int) -> dict:
    problems: list[str] = []
    solo_cache: dict = {}

    def solo_text(job) -> str:
        key = (job["prompt"], job["max_tokens"], job["method"])
        if key not in solo_cache:
            solo_cache[key] = solo(*key)
        return solo_cache[key]

    def stop_for(job) -> str | None:
        """A stop string that occurs in the middle of the solo text (so the cut is checkable)."""
        words = solo_text(job).split()
        return " " + words[len(words) // 2] if len(words) >= 4 else None

    def check_text(r) -> None:
        if solo is None:
            return
        want = solo_text(r)
        if r.get("stop_str"):
            i = want.find(r["stop_str"])
            want = want[:i] if i >= 0 else want
        if r["text"] != want:
            problems.append(f"text differs from the solo run for {r['prompt']!r} ({r['method']}, "
                            f"{r['max_tokens']}): {r['text']!r} != {want!r}")

    # Solo runs happen while the server is idle (before the load, and after it has settled): they share the model
    # objects with the server when run in its process.
    jobs = plan(clients, seed)
    if solo is not None:
        for j in jobs:
            if j.get("stop"):
                j["stop_str"] = stop_for(j)
    before = _scrape((await _get(url, "/metrics", api_key)).text)
    t0 = time.perf_counter()
    results = await _phase(url, model, api_key, jobs)
    wall1 = time.perf_counter() - t0
    mid = await _settle(url, api_key)
    completed, disconnected, malformed = [], [], []
    for r in results:
        if "exception" in r:
            problems.append(f"{r['kind']} request failed: {r['exception']}")
        elif r["kind"] == "malformed":
            malformed.append(r)
            e = r["error"]
            if r["status"] != 400 or not isinstance(e, dict) or e.get("type") != "invalid_request_error":
                problems.append(f"malformed ({r['what']}) got {r['status']} {e}")
        elif r["kind"] == "disconnect":
            disconnected.append(r)
        else:
            completed.append(r)
            check_text(r)
            if r["finish_reason"] not in ("length", "stop") or r["usage"] is None or r["verispec"] is None:
                problems.append(f"bad end: finish_reason {r['finish_reason']}, usage {r['usage']}")

    def delta(a, b, name, **labels):
        return _sum(b, name, **labels) - _sum(a, name, **labels)

    finished = delta(before, mid, "verispec:request_success_total")
    cancelled = delta(before, mid, "verispec:request_success_total", finish_reason="cancelled")
    if finished != len(completed) + len(disconnected):
        problems.append(f"request_success rose by {finished}, clients saw {len(completed)} completed + "
                        f"{len(disconnected)} disconnected")
    if not 1 <= cancelled <= len(disconnected):
        problems.append(f"{cancelled} requests cancelled for {len(disconnected)} disconnects")
    errors = delta(before, mid, "verispec:request_success_total", finish_reason="error")
    if errors:
        problems.append(f"{errors} requests failed in the engine")
    if delta(before, mid, "verispec:spec_decode_num_draft_tokens_total") < sum(
            r["verispec"]["num_draft_tokens"] for r in completed if r["verispec"]):
        problems.append("fewer draft tokens counted than the completed requests report")

    # phase 2: clean requests, exact sums
    clean = [j for j in plan(max(4, clients // 4), seed + 1) if j["kind"] == "normal"]
    for j in clean:
        j["stop"] = False
    results2 = await _phase(url, model, api_key, clean)
    after = await _settle(url, api_key)
    for r in results2:
        if "exception" in r:
            problems.append(f"clean request failed: {r['exception']}")
        else:
            check_text(r)
    ok2 = [r for r in results2 if "exception" not in r and r["verispec"] is not None]
    sums = {
        "verispec:spec_decode_num_drafts_total": sum(r["verispec"]["num_drafts"] for r in ok2),
        "verispec:spec_decode_num_draft_tokens_total": sum(r["verispec"]["num_draft_tokens"] for r in ok2),
        "verispec:spec_decode_num_accepted_tokens_total": sum(r["verispec"]["num_accepted_draft_tokens"] for r in ok2),
        "verispec:spec_decode_num_accepted_tokens_per_pos_total": sum(
            sum(r["verispec"]["acceptance_by_position"]) for r in ok2),
        "verispec:prompt_tokens_total": sum(r["usage"].prompt_tokens for r in ok2),
        "verispec:generation_tokens_total": sum(r["usage"].completion_tokens for r in ok2),
        "verispec:request_success_total": len(ok2),
        "verispec:e2e_request_latency_seconds_count": len(ok2),
    }
    for name, want in sums.items():
        got = delta(mid, after, name)
        if got != want:
            problems.append(f"{name} rose by {got}, the requests add up to {want}")
    if _sum(after, "verispec:num_requests_running") or _sum(after, "verispec:num_requests_waiting"):
        problems.append("requests still running or waiting at the end")
    # still serving
    health = await _get(url, "/health", api_key)
    if health.status_code != 200:
        problems.append(f"/health answered {health.status_code}")
    lat = sorted(r["latency"] for r in completed)
    return {
        "ok": not problems, "problems": problems, "clients": clients, "completed": len(completed),
        "disconnected": len(disconnected), "cancelled": int(cancelled), "malformed": len(malformed),
        "clean": len(ok2), "wall_s": round(wall1, 2),
        "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "latency_p95_s": round(lat[int(len(lat) * 0.95)], 3) if lat else None,
        "tokens": sum(r["usage"].completion_tokens for r in completed if r["usage"]),
    }


def run(url: str, *, model: str, clients: int = 64, solo=None, api_key: str = "none", seed: int = 0) -> dict:
    """Run both phases against the server at `url` (its /v1 base). solo(prompt, max_tokens, method) -> the text a
    solo greedy run produces (None: skip the text checks)."""
    return asyncio.run(_run(url.rstrip("/"), model, clients, solo, api_key, seed))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--api-key", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solo-target", help="check texts against verispec.generate with this target (and drafter)")
    p.add_argument("--solo-drafter")
    p.add_argument("--solo-gamma", type=int, default=4, help="the server's --gamma")
    a = p.parse_args(argv)
    solo = None
    if a.solo_target:
        import verispec
        from verispec.models.load import load_model

        target = load_model(a.solo_target)
        drafter = load_model(a.solo_drafter, backend="auto-draft") if a.solo_drafter else None

        def solo_run(prompt, n, method):
            return verispec.generate(target, prompt, method=method, drafter=drafter if method != "ar" else None,
                                     gamma=a.solo_gamma, max_new_tokens=n).text

        solo = solo_run

    report = run(a.url, model=a.model, clients=a.clients, solo=solo, api_key=a.api_key, seed=a.seed)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
