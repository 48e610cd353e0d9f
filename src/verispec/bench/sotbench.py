"""`verispec bench --sot`: Skeleton-of-Thought (`sot-lossy`, **lossy**) against plain AR on the same prompts.

Per prompt, each prompt's text is asked as a question (a user turn through the chat template when the tokenizer has
one): the plain answer by AR (and by the stage method too when it is not `ar`, e.g. `sd`) with max_new_tokens, and
the Skeleton-of-Thought answer (`verispec.sot.sot`: the skeleton, then every point in one batch on the same
`BatchEngine`). Reported: end-to-end latency of each (SoT: skeleton + expansion stages), tokens generated, the
AR / SoT latency ratio, and — because SoT changes the output — how far its answer is from AR's: chrF (sacrebleu,
SoT's answer against AR's as the reference) and both answers' lengths. Every line of the report says lossy; there is
no losslessness check (there is nothing to be lossless to). One untimed warm-up of each first; the order of AR and
SoT alternates from prompt to prompt.

The bench's normal path (`verispec bench --methods ...`) would compare SoT's tokens with AR's and flag every prompt
as a lossless violation, and it feeds completion prompts rather than questions; hence this mode.

Writes sot.md and sot.json into the bench's output folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from verispec.bench.datasets import load_prompts
from verispec.sampling import Sampling
from verispec.sot import LABEL, render, sot

WARMUP_TOKENS = 8


def chrf(hyp: str, ref: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(hyp, [ref]).score)


def _plain(engine, tok, question: str, method: str, max_new_tokens: int, sampling: Sampling) -> dict:
    from verispec.batch import Request

    (s,) = engine.run([Request(render(tok, question), max_new_tokens, sampling, method=method)])
    if s.finish_reason == "error":
        raise RuntimeError(f"{method}: a generation failed: {s.error}")
    return {"latency_s": s.t_done - s.t_submit, "tokens": len(s.output_ids),
            "text": tok.decode(s.output_ids, skip_special_tokens=True)}


def run_sot_bench(target, drafter=None, prompts="humaneval", num_prompts: int | None = 3, max_new_tokens: int = 64,
                  sampling: Sampling | None = None, out_dir: str | Path = "runs/bench", seed: int = 0,
                  warmup: bool = True, backend: str = "auto", drafter_backend: str | None = None,
                  method: str = "ar", skeleton_tokens: int = 64, point_tokens: int = 48, max_points: int = 8,
                  progress: bool = True) -> dict:
    """sot-lossy vs AR on the same prompts; writes sot.md and sot.json into out_dir and returns the summary.
    method: the engine method of SoT's stages ("ar" or e.g. "sd", which needs the drafter)."""
    from tqdm import tqdm

    from verispec.batch import BatchEngine
    from verispec.bench.concurrency import check_specs, describe_backends, load_models
    from verispec.bench.runner import environment

    sampling = sampling or Sampling()
    specs = check_specs(method)
    if len(specs) != 1:
        raise ValueError(f"--sot-method takes one method, got {method!r}")
    spec = specs[0]
    if spec.params:
        raise ValueError(f"--sot-method takes a plain method name, got {method!r}")
    if spec.needs_drafter and drafter is None:
        raise ValueError(f"--sot-method {method} needs --drafter")
    prompt_set = load_prompts(prompts, num_prompts, seed) if isinstance(prompts, str) else list(prompts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tgt, drafters, default_db = load_models(target, drafter, specs, backend, drafter_backend)
    tok = tgt.tokenizer
    if tok is None:
        raise ValueError("--sot works on text: the target needs a tokenizer")
    engine = BatchEngine(tgt, drafters.get(default_db), method=method, max_batch=max_points)
    baselines = list(dict.fromkeys(["ar", method]))
    kw = dict(sampling=sampling, skeleton_tokens=skeleton_tokens, point_tokens=point_tokens, max_points=max_points,
              method=method)
    if warmup:
        for m in baselines:
            _plain(engine, tok, prompt_set[0].text, m, WARMUP_TOKENS, sampling)
        sot(engine, prompt_set[0].text, **{**kw, "skeleton_tokens": WARMUP_TOKENS, "point_tokens": WARMUP_TOKENS})
    rows = []
    for k, p in enumerate(tqdm(prompt_set, disable=not progress, desc="sot", unit="prompt")):
        plain, r = {}, None
        order = ["sot", *baselines] if k % 2 else [*baselines, "sot"]
        for what in order:
            if what == "sot":
                r = sot(engine, p.text, **kw)
            else:
                plain[what] = _plain(engine, tok, p.text, what, max_new_tokens, sampling)
        ar = plain["ar"]
        rows.append({"prompt_id": p.id, "category": p.category, "plain": plain,
                     "sot": {**r.summary(), "latency_s": r.t_total, "text": r.text, "expansions": r.expansions,
                             "skeleton_text": r.skeleton_text},
                     "chrf_vs_ar": chrf(r.text, ar["text"]) if ar["text"].strip() else None,
                     "chars": {"sot": len(r.text), "ar": len(ar["text"])},
                     "words": {"sot": len(r.text.split()), "ar": len(ar["text"].split())}})
    config = {"target": tgt.name, "drafter": next(iter(drafters.values())).name if drafters else None,
              "dataset": prompts if isinstance(prompts, str) else "custom", "num_prompts": len(prompt_set),
              "prompt_ids": [p.id for p in prompt_set], "seed": seed, "max_new_tokens": max_new_tokens,
              "sampling": asdict(sampling), "warmup": warmup, "stage_method": method,
              "skeleton_tokens": skeleton_tokens, "point_tokens": point_tokens, "max_points": max_points,
              "baselines": baselines}
    s = summarize(config, rows, environment(), describe_backends(tgt, drafters, default_db))
    tmp = out / "sot.json.tmp"
    tmp.write_text(json.dumps(s, indent=1))
    tmp.replace(out / "sot.json")
    (out / "sot.md").write_text(markdown(s))
    return s


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(config: dict, rows: list[dict], env: dict, backends: dict) -> dict:
    sot_lat = sum(r["sot"]["latency_s"] for r in rows)
    overall = {"sot_latency_s": sot_lat, "sot_generated_tokens": sum(r["sot"]["generated_tokens"] for r in rows),
               "mean_chrf_vs_ar": _mean([r["chrf_vs_ar"] for r in rows]),
               "mean_points": _mean([len(r["sot"]["points"]) for r in rows]),
               "fallbacks": sum(r["sot"]["fallback"] for r in rows),
               "peak_batch": max((r["sot"]["peak_batch"] for r in rows), default=0),
               "mean_chars": {"sot": _mean([r["chars"]["sot"] for r in rows]),
                              "ar": _mean([r["chars"]["ar"] for r in rows])},
               "baselines": {}}
    for m in config["baselines"]:
        lat = sum(r["plain"][m]["latency_s"] for r in rows)
        overall["baselines"][m] = {"latency_s": lat, "tokens": sum(r["plain"][m]["tokens"] for r in rows),
                                   "latency_ratio_vs_sot": lat / sot_lat if sot_lat else None}
    return {"config": config, "environment": env, "backends": backends, "label": LABEL, "lossy": True,
            "overall": overall, "rows": rows}


def _f(x, spec=".2f", suffix=""):
    return "—" if x is None else format(x, spec) + suffix


def markdown(s: dict) -> str:
    c, env, b, o = s["config"], s["environment"], s["backends"], s["overall"]
    L = [f"# verispec bench --sot — {LABEL} vs AR — target `{c['target']}`", "",
         "**Lossy**: Skeleton-of-Thought answers another prompt (an outline, then each point written out in one "
         "batch), so its text is not the target's answer; it is compared with AR for latency and similarity, never "
         "for losslessness (Ning et al. 2024).", "",
         f"{c['num_prompts']} prompts from `{c['dataset']}` (seed {c['seed']}), each asked as a question; AR "
         f"max_new_tokens={c['max_new_tokens']}; SoT: skeleton ≤ {c['skeleton_tokens']} tokens, ≤ "
         f"{c['max_points']} points of ≤ {c['point_tokens']} tokens, stages on `{c['stage_method']}`; "
         f"sampling={c['sampling']}. Backends: target `{b.get('target')}`, drafter `{b.get('drafter')}`; kernels: " +
         "; ".join(f"{k} {v}" for k, v in b.get("kernels", {}).items()) + ".", "",
         "| method | latency s (sum) | tokens generated | latency / sot-lossy's | chrF vs AR | mean chars |",
         "|---|---|---|---|---|---|"]
    for m, r in o["baselines"].items():
        L.append(f"| {m} (plain answer, lossless) | {r['latency_s']:.2f} | {r['tokens']} | "
                 f"{_f(r['latency_ratio_vs_sot'], '.2f', 'x')} | {'100 (reference)' if m == 'ar' else '—'} | "
                 f"{_f(o['mean_chars']['ar'], '.0f') if m == 'ar' else '—'} |")
    L.append(f"| **sot-lossy (lossy)** | {o['sot_latency_s']:.2f} | {o['sot_generated_tokens']} | 1.00x | "
             f"{_f(o['mean_chrf_vs_ar'], '.1f')} | {_f(o['mean_chars']['sot'], '.0f')} |")
    L += ["", f"sot-lossy (lossy): {_f(o['mean_points'], '.1f')} points on average, {o['fallbacks']} fall-back(s) to "
              f"a plain answer (no numbered point parsed), at most {o['peak_batch']} points written in the same "
              "engine round.", "",
          "| prompt | AR s | sot-lossy (lossy) s: skeleton + points | points | chrF vs AR (lossy) | chars SoT / AR |",
          "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        t = r["sot"]
        L.append(f"| {r['prompt_id']} | {r['plain']['ar']['latency_s']:.2f} | {t['latency_s']:.2f}: "
                 f"{t['t_skeleton']:.2f} + {t['t_expand']:.2f} | {len(t['points'])}"
                 f"{' (fall-back)' if t['fallback'] else ''} | {_f(r['chrf_vs_ar'], '.1f')} | "
                 f"{r['chars']['sot']} / {r['chars']['ar']} |")
    L += ["", f"Machine: {env.get('cpu')} ({env.get('cores')} cores, {env.get('threads')} threads); torch "
              f"{env.get('torch')}, transformers {env.get('transformers')}, verispec {env.get('verispec')}; started "
              f"{env.get('time')}.", "", "Files: sot.json (every answer's text, skeleton, points and timings)."]
    return "\n".join(L) + "\n"
