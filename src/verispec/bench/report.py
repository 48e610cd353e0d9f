"""Render a bench directory (config.json, prompts.jsonl, cost.json) into summary.json, report.md and PNG plots.
Needs no model: `verispec report DIR` re-renders any run."""

from __future__ import annotations

import json
from pathlib import Path

from verispec.bench.costmodel import conditional_acceptance, predict, verify_ratio
from verispec.bench.metrics import aggregate
from verispec.bench.quality import agreement, markdown_lines as quality_lines, pass_at_1
from verispec.registry import METHODS

CONFIG, ROWS, COST = "config.json", "prompts.jsonl", "cost.json"


def load_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in open(out / ROWS) if line.strip()]
    ar = {(r["prompt_id"], r["repeat"]): r["token_ids"] for r in rows if r["method"] == "ar"}
    for r in rows:
        ref = ar.get((r["prompt_id"], r["repeat"]))
        r["exact_match_ar"] = None if ref is None else r["token_ids"] == ref
    return rows


def uses_draft_model(label: str) -> bool:
    """Whether the method of a bench label ("sd:gamma=8", "nasd", ...) runs a draft model, from the registry."""
    m = METHODS.get(label.split(":", 1)[0])
    return bool(m and m.needs_draft_model)


def summarize(config: dict, rows: list[dict], cost: dict | None) -> dict:
    cost = cost or {}
    curve = {int(k): v for k, v in cost.get("target_curve_ms", {}).items()} or None
    t1 = curve[1] if curve else None
    params = {"target": cost.get("target_params"), "drafter": cost.get("drafter_params")}
    methods = config["methods"]
    categories = sorted({r["category"] for r in rows})
    groups = {"overall": rows, **{c: [r for r in rows if r["category"] == c] for c in categories}}
    out = {}
    for g, rs in groups.items():
        ar_rows = [r for r in rs if r["method"] == "ar"]
        table = {}
        for m in methods:
            mr = [r for r in rs if r["method"] == m]
            if not mr:
                continue
            agg = aggregate(mr, ar_rows, params if not mr[0].get("peer") else {"target": params["target"]})
            agg["peer"] = bool(mr[0].get("peer"))
            agg["backend"] = mr[0].get("backend")  # the target backend it ran on (peers: plain "torch" unless asked)
            info = [r["peer_info"] for r in mr if r.get("peer_info") and r["peer_info"].get("draft_n")]
            if info:  # llama.cpp reports its own draft counts: α̂ from them (its forwards are not reported)
                drafted = sum(i["draft_n"] for i in info)
                agg["acceptance_rate"] = sum(i.get("draft_n_accepted") or 0 for i in info) / drafted if drafted else None
            logged = [r["steps"] for r in mr if r.get("steps")]
            rounds = ([x for s in logged for x in s["d"]], [x for s in logged for x in s["a"]],
                      [x for s in logged for x in (s.get("n") or s["d"])]) if logged else None
            agg.update(predict(agg, t1, curve, cost.get("size_ratio") if uses_draft_model(m) else 0.0, rounds))
            agg["conditional_acceptance"] = conditional_acceptance(*rounds[:2]) if rounds else None
            table[m] = agg
        out[g] = table
    greedy = config["sampling"]["temperature"] == 0
    # Peers compute on other arithmetic (transformers' fp32, llama.cpp's kernels): their tokens may differ from our AR's
    # without any method being lossy; their agreement is reported separately (`agreement`).
    flagged = {m: r["mismatched_prompts"] for m, r in out["overall"].items()
               if greedy and not r["peer"] and r["mismatched_prompts"]}
    return {"config": config, "cost": cost, "groups": out, "lossless_violations": flagged,
            "verify_ratio": {k: verify_ratio(curve, k) for k in sorted(curve)} if curve else None,
            "pass_at_1": pass_at_1(rows, methods), "agreement": agreement(rows, methods) if greedy else None}


def _f(x, spec=".2f", suffix=""):
    return "—" if x is None else format(x, spec) + suffix


def _table(table: dict, greedy: bool) -> list[str]:
    q = "exact match vs AR" if greedy else "mean log-lik"
    lines = [f"| method | tokens | tok/s | speedup | spread (min / med / max) | MAT | α̂ | γ used | target fwd | "
             f"drafter fwd | draft / verify / other s | p50 / p90 latency s | {q} | BLEU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in table.items():
        sp = r["speedup_spread"]
        qual = _f(r["exact_match_ar"], ".0%") if greedy else _f(r["mean_loglik"], ".3f")
        name = f"{m} (peer on `{r['backend'] or 'torch'}`)" if r["peer"] else m
        lines.append(
            f"| {name} | {r['new_tokens']} | {_f(r['tokens_per_s'])} | **{_f(r['speedup'])}x** | "
            f"{_f(sp['min'])} / {_f(sp['median'])} / {_f(sp['max'])} ({sp['of']}) | {_f(r['mat'])} | "
            f"{_f(r['acceptance_rate'])} | {_f(r['mean_gamma'])} | {_f(r['target_forwards'], 'd')} | "
            f"{_f(r['drafter_forwards'], 'd')} | {r['t_draft']:.1f} / {r['t_verify']:.1f} / {r['t_other']:.1f} | "
            f"{_f(r['latency_s']['p50'], '.1f')} / {_f(r['latency_s']['p90'], '.1f')} | {qual} | "
            f"{_f(r['bleu'], '.1f')} |")
    return lines


def markdown(s: dict) -> str:
    c, cost = s["config"], s["cost"]
    env = c.get("environment", {})
    greedy = c["sampling"]["temperature"] == 0
    extra = [b for b in c.get("backends", {}).get("drafters", {}).values() if b != c.get("backends", {}).get("drafter")]
    L = [f"# verispec bench — target `{c['target']}`" + (f", drafter `{c['drafter']}`" if c["drafter"] else ""), "",
         f"{c['num_prompts']} prompts from `{c['dataset']}` (seed {c['seed']}), max_new_tokens={c['max_new_tokens']}, "
         f"γ={c['gamma']} unless the method says otherwise, sampling={c['sampling']}, repeats={c['repeats']}, "
         f"backends: target `{c.get('backends', {}).get('target', c.get('backend'))}`, drafter "
         f"`{c.get('backends', {}).get('drafter', c.get('drafter_backend'))}`" +
         (f" (also {', '.join(f'`{b}`' for b in extra)} where a method says `drafter_backend=`)" if extra else "") +
         "; kernels: " + "; ".join(f"{k} {v}" for k, v in c.get("backends", {}).get("kernels", {}).items()) +
         (f"; HF peers on `{c['backends']['peers']['target']}` (plain transformers, as their users run them)"
          if c.get("backends", {}).get("peers", {}).get("target") else "") + ".", "",
         "Speedup = AR wall time / method wall time over the same prompts and repeats, in this run (AR is "
         "verispec's own autoregressive decoding with a KV cache). Tokens are counted as generated ids up to and "
         "including the first stop token, for every method. MAT = (accepted + recovered + bonus) / target "
         "forwards; α̂ = accepted / drafted. Wall time includes prefill; the split shows draft / verify / other "
         "(prefill not included in the split)."]
    if s["lossless_violations"]:
        L += ["", "**WARNING — greedy output differs from AR (not lossless on these prompts):** " +
              "; ".join(f"{m}: {', '.join(ps)}" for m, ps in s["lossless_violations"].items())]
    for g, table in s["groups"].items():
        if g == "overall" and len(s["groups"]) == 2:
            continue  # one category: its table is the overall one
        L += ["", f"## {'Overall' if g == 'overall' else 'Category: ' + g}", ""] + _table(table, greedy)
    L += quality_lines(s.get("pass_at_1") or {}, s.get("agreement"))
    if cost.get("target_params"):
        L += ["", "## FLOPs estimate", "",
              "2 × parameters × tokens processed, per model (prefill included; HF peers: target lower bound).", "",
              "| method | TFLOPs |", "|---|---|"]
        L += [f"| {m} | {_f(r['flops'] / 1e12 if r['flops'] else None, '.2f')} |"
              for m, r in s["groups"]["overall"].items()]
    curve = cost.get("target_curve_ms")
    if curve:
        t1 = curve["1"]
        curves = {cost.get("backend", "this run"): curve, **cost.get("other_backends", {})}
        L += ["", "## Cost model", "",
              "Target forward of k new tokens on a warm 150-token cache, median ms, per backend (the run used "
              f"`{cost.get('backend', '?')}`):", "",
              "| backend | " + " | ".join(f"T({k})" for k in curve) + " | T(8)/T(1) | T(16)/T(1) |",
              "|---|" + "---|" * (len(curve) + 2)]
        for b, cv in curves.items():
            L.append(f"| {b} | " + " | ".join(f"{v:.0f}" for v in cv.values()) +
                     f" | {cv['8'] / cv['1']:.2f} | {cv['16'] / cv['1']:.2f} |" if "16" in cv and "8" in cv else
                     f"| {b} | " + " | ".join(f"{v:.0f}" for v in cv.values()) + " | — | — |")
        drafter_t1 = {cost.get("drafter_backend", "drafter"): cost["drafter_curve_ms"]["1"]} \
            if cost.get("drafter_curve_ms") else {}
        drafter_t1.update({b: cv["1"] for b, cv in cost.get("other_drafters", {}).items()})
        L += ["",
              f"T(1) = {t1:.0f} ms" + "".join(
                  f"; drafter T(1) = {v:.0f} ms" + (f" on `{b}`" if len(drafter_t1) > 1 else "") +
                  f" (c = {v / t1:.3f})" for b, v in drafter_t1.items()) + "." +
              " Times are of the forward the engine runs (on `gguf` the NativeDecoder and its C++ layer loop;"
              + (" drafters: the lean forward for Qwen2 / Llama, `verispec.rewrites.lean`, C++ on fast-int4)."
                 if drafter_t1 else ")."), "",
              "Three predictions for this machine, each from the run's measured draft cost c (draft seconds per "
              "drafted position / T(1)) and T(k): **i.i.d.** = (1 − α^(γ+1)) / ((1 − α)(γc + T(γ+1)/T(1))) from "
              "one α̂ and the mean γ; **per-position** = Σ E(d_r) / Σ (d_r·c + T(n_r+1)/T(1)) over the rounds, "
              "E(d) = 1 + Σ_{i≤d} Π_{j≤i} β_j with β_i = P(draft i kept | 1..i−1 kept) measured; **accepted-length** "
              "= Σ (a_r + 1) / the same costs (`verispec.bench.costmodel`). None counts the per-round overhead outside "
              "drafting and T(k). **Projected** = the i.i.d. formula for a memory-bound accelerator (T(γ+1)/T(1) = 1, "
              "c = drafter/target parameter ratio): a projection, not a measurement.", "",
              "| method | measured speedup | i.i.d. | per-position | accepted-length | β by position | c measured | "
              "projected (accelerator) |", "|---|---|---|---|---|---|---|---|"]
        errs: dict[str, list[float]] = {"i.i.d.": [], "per-position": [], "accepted-length": []}
        for m, r in s["groups"]["overall"].items():
            if m == "ar" or r["peer"]:
                continue
            beta = ", ".join(_f(b) for b in (r.get("conditional_acceptance") or [])[:6])
            L.append(f"| {m} | {_f(r['speedup'])}x | {_f(r['predicted'], '.2f', 'x')} | "
                     f"{_f(r.get('predicted_by_position'), '.2f', 'x')} | "
                     f"{_f(r.get('predicted_from_lengths'), '.2f', 'x')} | {beta or '—'} | "
                     f"{_f(r['c_measured'], '.3f')} | {_f(r['projected'], '.2f', 'x')} (projection) |")
            for k, key in (("i.i.d.", "predicted"), ("per-position", "predicted_by_position"),
                           ("accepted-length", "predicted_from_lengths")):
                if r.get(key) is not None and r["speedup"]:
                    errs[k].append(abs(r[key] / r["speedup"] - 1))
        if any(errs.values()):
            L += ["", "Mean |predicted / measured − 1| over these methods: " + "; ".join(
                f"{k} {sum(v) / len(v):.0%}" for k, v in errs.items() if v) + "."]
    inv = cost.get("invariance")
    if inv:
        L += ["", "## Batch invariance of the target", "",
              f"On `{cost.get('backend', '?')}`, a position's logits moved by at most {inv['max_abs']:.2e} (relative "
              f"{inv['max_rel']:.1e}) between the 1-row AR forward and the chain / tree forwards of up to 16 rows that "
              f"verification runs (bit-identical: {'yes' if inv['bit_identical'] else 'no'}; by k: " +
              ", ".join(f"{k}: {v:.1e}" for k, v in inv["chain_max_abs_by_k"].items()) + "). Greedy speculative output "
              "equals greedy AR wherever the top-2 logit gap exceeds twice that; the smallest gap on the check's "
              f"random context was {inv['min_top2_gap']:.2e} ({inv['at_risk']} positions at risk). A mismatch in the "
              "exact-match column is a near tie or a bug: check `verispec invariance`."]
    pos = {m: r["acceptance_by_position"] for m, r in s["groups"]["overall"].items() if r["acceptance_by_position"]}
    if pos:
        L += ["", "## Acceptance by draft position", "", "| method | " +
              " | ".join(str(i + 1) for i in range(max(map(len, pos.values())))) + " |",
              "|---|" + "---|" * max(map(len, pos.values()))]
        L += [f"| {m} | " + " | ".join(_f(x) for x in v) + " |" for m, v in pos.items()]
    L += ["", f"Environment: torch {env.get('torch')}, transformers {env.get('transformers')}, verispec "
              f"{env.get('verispec')}, Python {env.get('python')}, {env.get('cpu')} ({env.get('cores')} cores, "
              f"{env.get('threads')} threads), started {env.get('time')}.",
          "", "Files: prompts.jsonl (one row per generation), summary.json (every number), plots/*.png."]
    return "\n".join(L) + "\n"


def render(out: str | Path) -> dict:
    out = Path(out)
    if not (out / CONFIG).is_file() or not (out / ROWS).is_file():
        raise FileNotFoundError(f"{out} has no {CONFIG} and {ROWS}: not a bench directory")
    config = json.loads((out / CONFIG).read_text())
    cost = json.loads((out / COST).read_text()) if (out / COST).is_file() else None
    s = summarize(config, load_rows(out), cost)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(s, indent=1))
    tmp.replace(out / "summary.json")
    (out / "report.md").write_text(markdown(s))
    from verispec.bench.plots import plot_all

    plot_all(s, out / "plots")
    return s
