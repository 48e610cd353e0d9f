"""`verispec bench`: time methods on the same prompts in the same run and report ratios against AR.

Every method is produced by the same engine and counted the same way (new token ids, never re-tokenised text).
Before timing, one warm-up generation per method; then, for each prompt, the methods run in an order that
rotates from prompt to prompt so that drift in machine speed does not favour one method.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

import verispec
from verispec.bench.datasets import load_prompts
from verispec.models import LoadedModel, check_compatible, load_model
from verispec.sampling import Sampling


def run_bench(target: str, drafter: str | None, methods: list[str], dataset: str = "humaneval",
              num_prompts: int = 5, max_new_tokens: int = 64, gamma: int = 4, sampling: Sampling | None = None,
              out_dir: str | Path = "runs/bench", seed: int = 0, warmup: bool = True, progress: bool = True) -> dict:
    sampling = sampling or Sampling()
    if "ar" not in methods:
        methods = ["ar", *methods]  # every ratio is against AR from the same run
    prompts = load_prompts(dataset, num_prompts, seed)
    tgt = load_model(target)
    drf: LoadedModel | None = load_model(drafter) if drafter else None
    if drf is not None:
        check_compatible(tgt, drf)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "prompts.jsonl"
    rows_path.unlink(missing_ok=True)

    def one(method: str, text: str):
        return verispec.generate(tgt, text, drafter=drf if method != "ar" else None, method=method, gamma=gamma,
                                 sampling=sampling, max_new_tokens=max_new_tokens)

    if warmup:
        for m in methods:
            one(m, prompts[0].text[:200])
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(prompts) * len(methods), disable=not progress, desc="bench", unit="gen")
    for i, pr in enumerate(prompts):
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        res = {}
        for m in order:
            res[m] = one(m, pr.text)
            bar.update(1)
        ref = res["ar"].token_ids
        for m in methods:
            s = res[m].stats.summary()
            row = {"prompt_id": pr.id, "category": pr.category, "method": m, **s,
                   "exact_match_ar": res[m].token_ids == ref, "token_ids": res[m].token_ids}
            rows.append(row)
            with open(rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    bar.close()
    summary = summarize(rows, methods)
    summary["config"] = {"target": target, "drafter": drafter, "methods": methods, "dataset": dataset,
                         "num_prompts": len(prompts), "max_new_tokens": max_new_tokens, "gamma": gamma,
                         "sampling": asdict(sampling), "seed": seed, "warmup": warmup}
    summary["environment"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                              "verispec": verispec.__version__, "python": platform.python_version(),
                              "machine": platform.processor() or platform.machine(),
                              "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(render_markdown(summary))
    return summary


def summarize(rows: list[dict], methods: list[str]) -> dict:
    by = {m: [r for r in rows if r["method"] == m] for m in methods}
    ar_time = sum(r["t_total"] for r in by["ar"])
    table = {}
    for m, rs in by.items():
        t = sum(r["t_total"] for r in rs)
        toks = sum(r["new_tokens"] for r in rs)
        drafted = sum(r["drafted"] for r in rs)
        steps = sum(r["steps"] for r in rs)
        per_prompt_speedup = [a["t_total"] / r["t_total"] for a, r in zip(by["ar"], rs)]
        table[m] = {
            "prompts": len(rs), "new_tokens": toks, "wall_s": t, "tokens_per_s": toks / t if t else None,
            "speedup": ar_time / t if t else None,
            "speedup_per_prompt_min_median_max": [min(per_prompt_speedup), statistics.median(per_prompt_speedup),
                                                  max(per_prompt_speedup)],
            "mat": sum(r["accepted"] + r["recovered"] + r["bonus"] for r in rs) / steps if steps else None,
            "acceptance_rate": sum(r["accepted"] for r in rs) / drafted if drafted else None,
            "target_forwards": sum(r["target_forwards"] for r in rs),
            "drafter_forwards": sum(r["drafter_forwards"] for r in rs),
            "t_draft": sum(r["t_draft"] for r in rs), "t_verify": sum(r["t_verify"] for r in rs),
            "t_other": sum(r["t_other"] + r["t_prefill"] for r in rs),
            "exact_match_ar": sum(r["exact_match_ar"] for r in rs) / len(rs),
        }
    return {"methods": table}


def _f(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def render_markdown(summary: dict) -> str:
    c = summary["config"]
    lines = [f"# verispec bench: {c['target']}" + (f" ← {c['drafter']}" if c["drafter"] else ""), "",
             f"{c['num_prompts']} prompts from `{c['dataset']}`, max_new_tokens={c['max_new_tokens']}, "
             f"γ={c['gamma']}, sampling={c['sampling']}. Speedup = AR wall time / method wall time, same prompts, "
             "same run; tokens are counted as generated ids for every method.", "",
             "| method | tokens | wall s | tok/s | speedup | per-prompt speedup min/med/max | MAT | α̂ | "
             "target fwd | drafter fwd | draft s | verify s | other s | exact match vs AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        lo, med, hi = r["speedup_per_prompt_min_median_max"]
        lines.append(
            f"| {m} | {r['new_tokens']} | {_f(r['wall_s'], '.1f')} | {_f(r['tokens_per_s'])} | "
            f"{_f(r['speedup'])}x | {lo:.2f} / {med:.2f} / {hi:.2f} | {_f(r['mat'])} | {_f(r['acceptance_rate'])} | "
            f"{r['target_forwards']} | {r['drafter_forwards']} | {_f(r['t_draft'], '.1f')} | "
            f"{_f(r['t_verify'], '.1f')} | {_f(r['t_other'], '.1f')} | {r['exact_match_ar']:.0%} |")
    bad = [m for m, r in summary["methods"].items() if c["sampling"]["temperature"] == 0 and r["exact_match_ar"] < 1]
    if bad:
        lines += ["", f"**WARNING: greedy output differs from AR for {', '.join(bad)}: not lossless on these "
                      "prompts (see prompts.jsonl).**"]
    e = summary["environment"]
    lines += ["", f"torch {e['torch']}, transformers {e['transformers']}, verispec {e['verispec']}, "
                  f"{e['threads']} threads, {e['machine']}, {e['time']}."]
    return "\n".join(lines) + "\n"
