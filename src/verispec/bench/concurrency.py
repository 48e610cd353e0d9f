"""`verispec bench --concurrency 1,2,4,8`: throughput and latency of N concurrent streams on the batched engine.

For every method and every N: a `BatchEngine(target, drafter, method=m, max_batch=N)` gets N requests at once,
each a different prompt of the bench's prompt set; whenever a stream finishes, the next prompt of the set is
submitted in its slot, until every prompt is done (a closed-loop load of N clients). Before the measured pass, an
unmeasured warm-up round: N short requests (8 new tokens) on the same engine. Every (method, N) runs the same
prompts, with the same max_new_tokens, counted the same way (each stream's new ids, up to and including its first
stop token). Greedy unless the bench's sampling options say otherwise; sampled request i draws from its own seed
(seed + i) whatever N is, so on a batch-invariant target (gguf) even sampled outputs must not depend on N.

Per stream: time to first token (TTFT: submit -> the first committed token, `Stream.t_submit` /
`Stream.t_first_token`), inter-token latency (ITL), end-to-end latency (submit -> done) and tokens. The engine
commits several tokens a round, so ITL comes from an `on_tokens` callback that timestamps every round: each round
after a stream's first gives each of its n committed tokens the gap since the stream's previous round divided by n
(the first round's tokens are what TTFT measures). Per (method, N): total tok/s (all new tokens / wall time from
the first submit to the last stream's end), per-stream tok/s (mean of tokens / end-to-end), TTFT / ITL / end-to-end
percentiles (p50 / p90 / p99, linear interpolation: monotone by construction), target forwards per committed token
(engine rounds / tokens: one shared forward a round on a ragged decoder; and the streams' own forwards / tokens,
i.e. 1 / MAT), the total tok/s as a multiple of the same method's at N = 1, and the correctness column
"identical: k/k" (streams whose tokens equal the same prompt's at N = 1; under greedy also "= AR": equal to `ar`
at N = 1). A stream that differs from its N = 1 output makes `verispec bench` exit with status 3.

`--server URL` drives a running OpenAI-compatible server instead (`serve_closed_loop`: the official `openai` client,
N client threads, streaming; TTFT and ITL from chunk arrival, ITL = the gap between content chunks).

Writes concurrency.md, concurrency.json and plots/concurrency.png (server: concurrency-server.*) into the bench's
output folder. No other file there is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from verispec.bench.datasets import Prompt, load_prompts
from verispec.sampling import Sampling

PERCENTILES = (50, 90, 99)
WARMUP_TOKENS = 8


@dataclass
class StreamRecord:
    """One stream of a closed-loop pass."""

    prompt: int  # index in the prompt set
    prompt_id: str
    tokens: int
    ttft: float | None
    e2e: float
    itl: list[float]  # one per token after the stream's first round (server: one per content chunk after the first)
    token_ids: list[int] = field(default_factory=list)
    target_forwards: int | None = None
    finish_reason: str | None = None
    text: str | None = None  # the server driver's output (it sees text, not ids)


def parse_concurrency(text: str | list[int]) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8]; 1 is always included (every identity check and ratio is against N = 1)."""
    if isinstance(text, str):
        try:
            ns = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--concurrency takes comma-separated integers, e.g. 1,2,4,8; got {text!r}") from None
    else:
        ns = [int(x) for x in text]
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"--concurrency levels must be integers >= 1, got {text!r}")
    return sorted(set(ns) | {1})


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in PERCENTILES}
    v = np.percentile(np.asarray(values, dtype=float), PERCENTILES)
    return {f"p{q}": float(x) for q, x in zip(PERCENTILES, v)}


def _itl(times: list[tuple[float, int]]) -> list[float]:
    out: list[float] = []
    for (t_prev, _), (t, n) in zip(times, times[1:]):
        if n:
            out += [(t - t_prev) / n] * n
    return out


def request_sampling(sampling: Sampling, i: int) -> Sampling:
    """Prompt i's sampling: its own seed, the same at every N and for every method."""
    return dataclasses.replace(sampling, seed=sampling.seed + i)


def closed_loop(engine, prompt_ids: list[list[int]], n: int, max_new_tokens: int, sampling: Sampling,
                names: list[str] | None = None) -> tuple[list[StreamRecord], float, int]:
    """N clients in a closed loop on `engine` (which nobody else steps): N requests at once, the next prompt
    submitted as soon as a stream ends. Returns (one record per prompt, in prompt order; wall seconds from the
    first submit to the last end; engine rounds in the pass)."""
    from verispec.batch import Request

    queue = deque(range(len(prompt_ids)))
    live: dict[int, tuple[int, list]] = {}
    records: list[StreamRecord | None] = [None] * len(prompt_ids)

    def launch() -> None:
        i = queue.popleft()
        times: list[tuple[float, int]] = []

        def on_tokens(_s, new, times=times) -> bool:
            times.append((time.perf_counter(), len(new)))
            return True

        s = engine.submit(Request(prompt_ids[i], max_new_tokens, request_sampling(sampling, i), on_tokens=on_tokens))
        live[s.id] = (i, times)

    r0 = engine.rounds
    t0 = time.perf_counter()
    for _ in range(min(n, len(queue))):
        launch()
    while live:
        for s in engine.step():
            if s.id not in live:
                continue
            i, times = live.pop(s.id)
            if s.finish_reason == "error":
                raise RuntimeError(f"stream for prompt {i} failed: {s.error}")
            records[i] = StreamRecord(
                i, names[i] if names else str(i), len(s.output_ids),
                None if s.t_first_token is None else s.t_first_token - s.t_submit, s.t_done - s.t_submit,
                _itl(times), list(s.output_ids), s.stats.target_forwards, s.finish_reason)
            if queue:
                launch()
    wall = time.perf_counter() - t0
    return records, wall, engine.rounds - r0  # type: ignore[return-value]


# -- the in-process driver ------------------------------------------------------------------------------------------

def load_models(target, drafter, specs, backend: str = "auto", drafter_backend: str | None = None):
    """(the target, {drafter backend: drafter}) as `verispec bench` loads them (names, folders or LoadedModels)."""
    from verispec.backends import check_target, drafter_backend as default_drafter_backend
    from verispec.api import check_pair
    from verispec.models import load_model

    check_target(backend)
    default_db = default_drafter_backend(backend, drafter_backend)
    wanted = list(dict.fromkeys([default_db] + [s.drafter_backend(default_db) for s in specs if s.needs_drafter]))
    tgt = load_model(target, backend=backend)
    check_target(tgt.backend)
    drafters = {}
    if drafter is not None and any(s.needs_drafter for s in specs):
        drafters = {b: load_model(drafter, backend=b) for b in wanted}
        for d in drafters.values():  # same vocabulary, or (for uag alone) both tokenizers
            check_pair([s.record for s in specs if s.needs_drafter], tgt, d)
    return tgt, drafters, default_db


def describe_backends(tgt, drafters: dict, default_db: str) -> dict:
    """Backends and kernel paths, named as `verispec bench` names them in config.json; and whether the target's
    decoder has a ragged forward (one forward a round for every stream) or scores the streams one by one."""
    from verispec.cache import CachedLM

    drf = drafters.get(default_db)
    return {"target": tgt.backend, "drafter": drf.backend if drf else None,
            "drafters": {b: d.backend for b, d in drafters.items()},
            "kernels": {"target": tgt.kernel, **{f"drafter {b}": d.kernel for b, d in drafters.items()}},
            "ragged_target_forward": hasattr(CachedLM(tgt.model).lean, "ragged")}


def _engine(tgt, drafters, default_db, spec, n: int, gamma: int):
    from verispec.batch import BatchEngine

    params = dict(spec.params)
    db = str(params.pop("drafter_backend", default_db))
    kw = dict(method=spec.name, gamma=params.pop("gamma", gamma), policy=params.pop("policy", None),
              verifier=params.pop("verifier", None), max_batch=n)
    # the models are loaded already: "auto" keeps them as they are
    return BatchEngine(tgt, drafters.get(db) if spec.needs_drafter else None, **kw, **params)


def check_specs(methods: str):
    from verispec.bench.methods import parse_methods

    specs = parse_methods(methods)
    bad = [s.label for s in specs if s.record.kind != "speculative"]
    if bad:
        raise ValueError(f"--concurrency runs the batched engine, which serves speculative methods (ar, sd, pld, "
                         f"...); not {', '.join(bad)}")
    if not specs:
        raise ValueError("no method given")
    return specs


def _prompts(prompts, num_prompts, seed, ns) -> tuple[list[Prompt], str]:
    if isinstance(prompts, str):
        name = prompts
        if num_prompts is None:
            num_prompts = max(2 * max(ns), 4)
        prompts = load_prompts(prompts, num_prompts, seed)
    else:
        name = "custom"
        prompts = list(prompts)
    if len(prompts) < max(ns):
        raise ValueError(f"--concurrency {max(ns)} needs at least {max(ns)} prompts (each stream its own prompt); the "
                         f"set has {len(prompts)}: raise --num-prompts (twice the largest N is a good choice)")
    return prompts, name


def run_concurrency(target, drafter, methods: str = "ar,sd", concurrency="1,2,4,8", prompts="humaneval",
                    num_prompts: int | None = None, max_new_tokens: int = 64, gamma: int = 4,
                    sampling: Sampling | None = None, out_dir: str | Path = "runs/bench", seed: int = 0,
                    warmup: bool = True, backend: str = "auto", drafter_backend: str | None = None,
                    progress: bool = True) -> dict:
    """Every (method, N) on the same prompts; writes concurrency.{md,json} and plots/concurrency.png into out_dir
    and returns the summary. prompts: a dataset name as the bench takes it, or a list of `Prompt`s. num_prompts:
    per dataset (default: twice the largest N, at least 4)."""
    from tqdm import tqdm

    from verispec.batch import Request
    from verispec.bench.runner import encode, environment

    sampling = sampling or Sampling()
    ns = parse_concurrency(concurrency)
    specs = check_specs(methods)
    if any(s.needs_drafter for s in specs) and drafter is None:
        raise ValueError(f"methods {[s.label for s in specs if s.needs_drafter]} need --drafter")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    prompt_set, dataset = _prompts(prompts, num_prompts, seed, ns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tgt, drafters, default_db = load_models(target, drafter, specs, backend, drafter_backend)
    encoded = [encode(tgt, p) for p in prompt_set]
    names = [p.id for p in prompt_set]
    cells = []
    todo = [(n, s) for k, n in enumerate(ns) for s in (specs[k % len(specs):] + specs[:k % len(specs)])]
    bar = tqdm(total=len(todo), disable=not progress, desc="concurrency", unit="cell")
    for n, spec in todo:  # the method order rotates from one N to the next (slow drift favours no method)
        bar.set_postfix_str(f"{spec.label} N={n}")
        engine = _engine(tgt, drafters, default_db, spec, n, gamma)
        if warmup:
            engine.run([Request(encoded[i % len(encoded)], min(WARMUP_TOKENS, max_new_tokens),
                                request_sampling(sampling, i)) for i in range(n)])
        records, wall, rounds = closed_loop(engine, encoded, n, max_new_tokens, sampling, names)
        cells.append({"method": spec.label, "n": n, "wall_s": wall, "rounds": rounds,
                      "streams": [asdict(r) for r in records]})
        bar.update(1)
    bar.close()
    config = {"target": tgt.name, "drafter": next(iter(drafters.values())).name if drafters else None,
              "methods": [s.label for s in specs], "concurrency": ns, "dataset": dataset,
              "num_prompts": len(prompt_set), "prompt_ids": names, "seed": seed, "max_new_tokens": max_new_tokens,
              "gamma": gamma, "sampling": asdict(sampling), "warmup": warmup, "backend": backend,
              "drafter_backend": default_db, "driver": "in-process BatchEngine",
              "itl": "on_tokens timestamps: per round, the gap since the stream's previous round / tokens committed"}
    s = summarize(config, cells, environment(), describe_backends(tgt, drafters, default_db))
    write(s, out, "concurrency")
    return s


# -- aggregation, report, plot ----------------------------------------------------------------------------------------

def summarize(config: dict, cells: list[dict], env: dict, backends: dict | None = None) -> dict:
    """One row per (method, N) from the cells' stream records."""
    greedy = config["sampling"]["temperature"] == 0
    by = {(c["method"], c["n"]): c for c in cells}

    def key(st):  # what identity compares: ids in-process, text from a server
        return st["token_ids"] if st.get("text") is None else st["text"]

    rows = []
    for c in sorted(cells, key=lambda c: (config["methods"].index(c["method"]), c["n"])):
        st = c["streams"]
        tokens = sum(x["tokens"] for x in st)
        ref = by.get((c["method"], 1))
        ar = by.get(("ar", 1)) if greedy and "ar" in config["methods"] else None
        fwd = [x["target_forwards"] for x in st if x.get("target_forwards") is not None]
        row = {"method": c["method"], "n": c["n"], "streams": len(st), "tokens": tokens, "wall_s": c["wall_s"],
               "total_tok_s": tokens / c["wall_s"] if c["wall_s"] else None,
               "per_stream_tok_s": float(np.mean([x["tokens"] / x["e2e"] for x in st if x["e2e"]])) if st else None,
               "ttft_s": percentiles([x["ttft"] for x in st if x["ttft"] is not None]),
               "itl_s": percentiles([v for x in st for v in x["itl"]]),
               "e2e_s": percentiles([x["e2e"] for x in st]),
               "rounds": c.get("rounds"),
               "target_fwd_per_token": c["rounds"] / tokens if c.get("rounds") is not None and tokens else None,
               "stream_fwd_per_token": sum(fwd) / tokens if fwd and tokens else None,
               "identical": None, "matches_ar": None,
               "finish": {r: sum(x["finish_reason"] == r for x in st) for r in sorted({x["finish_reason"] for x in st
                                                                                      if x["finish_reason"]})}}
        if ref is not None:
            row["identical"] = [sum(key(a) == key(b) for a, b in zip(st, ref["streams"])), len(st)]
            row["differs"] = [a["prompt_id"] for a, b in zip(st, ref["streams"]) if key(a) != key(b)]
        if ar is not None:
            row["matches_ar"] = [sum(key(a) == key(b) for a, b in zip(st, ar["streams"])), len(st)]
        rows.append(row)
    base = {r["method"]: r["total_tok_s"] for r in rows if r["n"] == 1}
    for r in rows:
        b = base.get(r["method"])
        r["scaling_vs_n1"] = r["total_tok_s"] / b if b and r["total_tok_s"] is not None else None
    violations = {f"{r['method']} N={r['n']}": r["differs"] for r in rows if r.get("differs")}
    return {"config": config, "environment": env, "backends": backends, "rows": rows,
            "identity_violations": violations, "cells": cells}


def _f(x, spec=".2f", suffix=""):
    return "—" if x is None else format(x, spec) + suffix


def _ms(x):
    return _f(None if x is None else 1000 * x, ".0f")


def markdown(s: dict) -> str:
    c, env, b = s["config"], s["environment"], s.get("backends") or {}
    greedy = c["sampling"]["temperature"] == 0
    server = c.get("server")
    L = [f"# verispec bench --concurrency — target `{c['target']}`" +
         (f", drafter `{c['drafter']}`" if c.get("drafter") else "") + (f" (server {server})" if server else ""), ""]
    setup = (f"{c['num_prompts']} prompts from `{c['dataset']}` (seed {c['seed']}): "
             f"{', '.join(c['prompt_ids'][:12])}{' ...' if len(c['prompt_ids']) > 12 else ''}; "
             f"max_new_tokens={c['max_new_tokens']}, sampling={c['sampling']}, concurrency N = "
             f"{', '.join(map(str, c['concurrency']))}, warm-up {'on' if c['warmup'] else 'off'}.")
    if server:
        L += [setup + f" Driver: `openai` client against {server} (model `{c.get('server_model')}`), N client "
                      "threads, streaming.", ""]
    else:
        L += [setup + f" γ={c['gamma']} unless the method says otherwise. Driver: the in-process `BatchEngine`, "
                      f"max_batch = N.", "",
              f"Backends: target `{b.get('target')}`, drafter `{b.get('drafter')}`; kernels: " +
              "; ".join(f"{k} {v}" for k, v in b.get("kernels", {}).items()) + ". Ragged target forward (one "
              "forward a round for all streams): " +
              ("yes." if b.get("ragged_target_forward") else
               "**no** — this decoder scores the streams of a round one by one (correct, no batching gain)."), ""]
    L += [f"Machine: {env.get('cpu')} ({env.get('cores')} cores, {env.get('threads')} threads), {env.get('machine')}; "
          f"torch {env.get('torch')}, transformers {env.get('transformers')}, verispec {env.get('verispec')}, "
          f"Python {env.get('python')}; started {env.get('time')}.", "",
          "Closed loop: N streams at once, each a different prompt; a finished stream's slot takes the next prompt "
          "until the set is done. Total tok/s = all new tokens / wall time (first submit to last end); per-stream "
          "tok/s = mean of tokens / end-to-end; TTFT = submit → first committed token" +
          (" (first content chunk)" if server else "") + "; ITL = " +
          ("the gap between content chunks" if server else
           "per round, the gap since the stream's previous round / tokens committed in it (each token one sample; "
           "`on_tokens` timestamps)") + ". Scaling = total tok/s / the same method's at N = 1. Identical = streams "
          "whose output equals the same prompt's at N = 1" + ("; = AR: equal to `ar` at N = 1 (greedy)" if greedy
                                                              else "") + "." +
          ("" if server else " Target fwd / token = engine rounds / tokens (one shared forward a round on a ragged "
                             "decoder; prefill excluded); per stream = the streams' own forwards / tokens (1 / MAT)."),
          ""]
    if s["identity_violations"]:
        L += ["**WARNING — output depends on N (not expected on a batch-invariant target):** " +
              "; ".join(f"{k}: {', '.join(v)}" for k, v in s["identity_violations"].items()), ""]
    head = ["method", "N", "tokens", "total tok/s", "scaling", "per-stream tok/s", "TTFT p50 / p90 / p99 ms",
            "ITL p50 / p90 / p99 ms", "e2e p50 / p90 s"]
    if not server:
        head += ["target fwd / token", "per stream"]
    head += ["identical"] + (["= AR"] if greedy and not server else [])
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in s["rows"]:
        t, i, e = r["ttft_s"], r["itl_s"], r["e2e_s"]
        cells = [r["method"], str(r["n"]), str(r["tokens"]), _f(r["total_tok_s"], ".1f"),
                 _f(r["scaling_vs_n1"], ".2f", "x"), _f(r["per_stream_tok_s"], ".1f"),
                 f"{_ms(t['p50'])} / {_ms(t['p90'])} / {_ms(t['p99'])}",
                 f"{_ms(i['p50'])} / {_ms(i['p90'])} / {_ms(i['p99'])}",
                 f"{_f(e['p50'], '.2f')} / {_f(e['p90'], '.2f')}"]
        if not server:
            cells += [_f(r["target_fwd_per_token"], ".3f"), _f(r["stream_fwd_per_token"], ".3f")]
        cells.append("—" if r["identical"] is None else f"{r['identical'][0]}/{r['identical'][1]}")
        if greedy and not server:
            cells.append("—" if r["matches_ar"] is None else f"{r['matches_ar'][0]}/{r['matches_ar'][1]}")
        L.append("| " + " | ".join(cells) + " |")
    L += ["", "Files: concurrency*.json (every number and every stream's record), plots/concurrency*.png."]
    return "\n".join(L) + "\n"


def plot(s: dict, path: Path) -> Path:
    """Total tok/s vs N and TTFT p50 vs N, one line per method (`verispec.bench.plots` style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    for m in s["config"]["methods"]:
        rows = [r for r in s["rows"] if r["method"] == m]
        ns = [r["n"] for r in rows]
        a.plot(ns, [r["total_tok_s"] or 0 for r in rows], marker="o", label=m)
        b.plot(ns, [1000 * (r["ttft_s"]["p50"] or 0) for r in rows], marker="o", label=m)
    for ax, title, ylab in ((a, "Total throughput vs concurrency", "tok/s"), (b, "TTFT p50 vs concurrency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["config"]["concurrency"], [str(n) for n in s["config"]["concurrency"]])
        ax.set_xlabel("concurrent streams N")
        ax.set_ylabel(ylab)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(s: dict, out: Path, stem: str) -> None:
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(s, indent=1))
    tmp.replace(out / f"{stem}.json")
    (out / f"{stem}.md").write_text(markdown(s))
    plot(s, out / "plots" / f"{stem}.png")


# -- the server driver ----------------------------------------------------------------------------------------------

def _server_request(client, model: str, p: Prompt, max_tokens: int, sampling: Sampling, usage: list[bool]
                    ) -> tuple[str, int | None, float | None, list[float], float, str | None]:
    """One streamed request: (text, completion tokens if reported, TTFT, chunk gaps, end-to-end, finish reason)."""
    import openai

    kw = dict(model=model, max_tokens=max_tokens, temperature=sampling.temperature, stream=True)
    if sampling.top_p != 1.0:
        kw["top_p"] = sampling.top_p
    if not sampling.greedy:
        kw["seed"] = sampling.seed
    if sampling.top_k:
        kw["extra_body"] = {"top_k": sampling.top_k}
    t0 = time.perf_counter()

    def call(with_usage: bool):
        extra = {"stream_options": {"include_usage": True}} if with_usage else {}
        if p.chat:
            return client.chat.completions.create(messages=[{"role": "user", "content": p.text}], **kw, **extra)
        return client.completions.create(prompt=p.text, **kw, **extra)

    try:
        resp = call(usage[0])
    except openai.BadRequestError:
        if not usage[0]:
            raise
        usage[0] = False  # a server that does not take stream_options: count content chunks instead
        resp = call(False)
    parts, times, tokens, reason = [], [], None, None
    for chunk in resp:
        if getattr(chunk, "usage", None) is not None and chunk.usage.completion_tokens is not None:
            tokens = chunk.usage.completion_tokens
        for ch in chunk.choices or []:
            piece = ch.delta.content if p.chat else ch.text
            if piece:
                times.append(time.perf_counter())
                parts.append(piece)
            reason = ch.finish_reason or reason
    e2e = time.perf_counter() - t0
    return ("".join(parts), tokens if tokens is not None else (len(times) if not usage[0] else None),
            times[0] - t0 if times else None, [b - a for a, b in zip(times, times[1:])], e2e, reason)


def serve_closed_loop(client, model: str, prompts: list[Prompt], n: int, max_tokens: int, sampling: Sampling,
                      usage: list[bool] | None = None) -> tuple[list[StreamRecord], float]:
    """N client threads, each taking the next prompt of the set when its stream ends, until the set is done."""
    usage = usage if usage is not None else [True]
    queue = deque(range(len(prompts)))
    lock = threading.Lock()
    records: list[StreamRecord | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not queue or errors:
                    return
                i = queue.popleft()
            try:
                text, tokens, ttft, gaps, e2e, reason = _server_request(client, model, prompts[i], max_tokens,
                                                                        request_sampling(sampling, i), usage)
            except BaseException as e:  # noqa: BLE001 — reported after the threads end
                errors.append(e)
                return
            records[i] = StreamRecord(i, prompts[i].id, tokens or 0, ttft, e2e, gaps, finish_reason=reason,
                                      text=text)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(n, len(prompts)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a server request failed: {errors[0]}") from errors[0]
    return records, time.perf_counter() - t0  # type: ignore[return-value]


def run_server_concurrency(url: str, concurrency="1,2,4,8", prompts="humaneval", num_prompts: int | None = None,
                           max_new_tokens: int = 64, sampling: Sampling | None = None,
                           out_dir: str | Path = "runs/bench", seed: int = 0, warmup: bool = True,
                           model: str | None = None, api_key: str | None = None, progress: bool = True) -> dict:
    """The closed loop against a running OpenAI-compatible server at `url` (its /v1 API); writes
    concurrency-server.{md,json} and plots/concurrency-server.png. model: the name to ask for (default: the first
    the server lists)."""
    import openai
    from tqdm import tqdm

    from verispec.bench.runner import environment

    sampling = sampling or Sampling()
    ns = parse_concurrency(concurrency)
    prompt_set, dataset = _prompts(prompts, num_prompts, seed, ns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1",
                           api_key=api_key or os.environ.get("VERISPEC_API_KEY", "verispec"), max_retries=0)
    if model is None:
        listed = client.models.list().data
        if not listed:
            raise ValueError(f"{url} lists no model: name one")
        model = listed[0].id
    label = "server"
    usage = [True]
    cells = []
    for n in tqdm(ns, disable=not progress, desc="concurrency (server)", unit="N"):
        if warmup:
            serve_closed_loop(client, model, prompt_set[:n], n, min(WARMUP_TOKENS, max_new_tokens), sampling, usage)
        records, wall = serve_closed_loop(client, model, prompt_set, n, max_new_tokens, sampling, usage)
        cells.append({"method": label, "n": n, "wall_s": wall, "rounds": None,
                      "streams": [asdict(r) for r in records]})
    config = {"target": model, "drafter": None, "methods": [label], "concurrency": ns, "dataset": dataset,
              "num_prompts": len(prompt_set), "prompt_ids": [p.id for p in prompt_set], "seed": seed,
              "max_new_tokens": max_new_tokens, "sampling": asdict(sampling), "warmup": warmup, "server": url,
              "server_model": model, "driver": "openai client, streaming",
              "tokens": "the server's usage.completion_tokens" if usage[0] else "content chunks (no usage reported)",
              "itl": "gaps between content chunks"}
    s = summarize(config, cells, environment())
    write(s, out, "concurrency-server")
    return s
