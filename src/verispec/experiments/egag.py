"""`verispec experiment egag`: the study EGAG (entropy-guided adaptive γ) needs, on the real pair.

Every condition is one `verispec bench` run (same prompts, interleaved methods, warm-up, AR baseline in the same
run), so numbers are comparable inside a condition. Parts:
1. main table: AR, SD with fixed γ (several), NASD, EGAG and the other policies, the cost-aware controller and its
   calibrated-entropy form (`verispec.policies.cost`);
2. γ_max sweep: fixed γ = g vs EGAG with γ_max = g;
3. ablations: EMA on/off, temperature-consistent entropy on/off, per-block vs per-token, bounds (γ_min);
4. conditions: greedy and sampling (T = 0.7 and 1.0) — sampling runs the main methods only, to bound runtime;
5. a per-round trace for one prompt: H_norm, γ chosen and accepted length.
"""

from __future__ import annotations

import json
from pathlib import Path

from verispec.backends import drafter_backend as default_drafter_backend
from verispec.bench.report import _f
from verispec.sampling import Sampling

MAIN = ["sd:gamma=2", "sd:gamma=4", "sd:gamma=6", "nasd", "sd:policy=egag:gamma_max=8", "sd:policy=heuristic",
        "sd:policy=confidence:gamma_max=8", "sd:policy=adaedl:gamma_max=8", "sd:policy=cost:gamma_max=8",
        "sd:policy=cost:gamma_max=8:estimate=entropy"]
SWEEP = [4, 8, 12]
ABLATIONS = {"EMA 0.5": "sd:policy=egag:gamma_max=8:ema=0.5",
             "entropy at T=1 (not temperature-consistent)": "sd:policy=egag:gamma_max=8:consistent=false",
             "per-token (threshold 0.2)": "sd:policy=egag:gamma_max=8:mode=token:threshold=0.2",
             "bounds γ_min=2": "sd:policy=egag:gamma_max=8:gamma_min=2"}
EGAG_MAIN = "sd:policy=egag:gamma_max=8"
COST, CALIBRATED = "sd:policy=cost:gamma_max=8", "sd:policy=cost:gamma_max=8:estimate=entropy"


def methods_for(condition: str) -> list[str]:
    if condition != "greedy":
        return MAIN
    sweep = [m for g in SWEEP for m in (f"sd:gamma={g}", f"sd:policy=egag:gamma_max={g}")]
    out = []
    for m in MAIN + sweep + list(ABLATIONS.values()):
        if m not in out:
            out.append(m)
    return out


CONDITIONS = {"greedy": Sampling(), "T=0.7": Sampling(temperature=0.7, seed=0),
              "T=1.0": Sampling(temperature=1.0, seed=0)}


def run(out_dir: str | Path = "runs/egag", target: str = "qwen2.5-coder-1.5b", drafter: str = "qwen2.5-coder-0.5b",
        dataset: str = "humaneval,nl", num_prompts: int = 4, max_new_tokens: int = 48,
        conditions: list[str] | None = None, resume: bool = False, progress: bool = True,
        backend: str = "auto", drafter_backend: str | None = None) -> dict:
    from verispec.bench.runner import run_bench

    out = Path(out_dir)
    conditions = conditions or list(CONDITIONS)
    for c in conditions:
        if c not in CONDITIONS:
            raise ValueError(f"unknown condition {c!r}; known: {', '.join(CONDITIONS)}")
    summaries = {}
    for i, c in enumerate(conditions):
        summaries[c] = run_bench(target, drafter, ",".join(methods_for(c)), dataset, num_prompts, max_new_tokens,
                                 4, CONDITIONS[c], out / c.replace("=", ""), cost_model=(i == 0), resume=resume,
                                 backend=backend, drafter_backend=drafter_backend, progress=progress)
    result = {"conditions": summaries, "config": {"target": target, "drafter": drafter, "dataset": dataset,
                                                  "num_prompts": num_prompts, "max_new_tokens": max_new_tokens,
                                                  "conditions": conditions, "backend": backend,
                                                  "drafter_backend": default_drafter_backend(backend, drafter_backend),
                                                  "main": MAIN, "sweep": SWEEP,
                                                  "ablations": ABLATIONS}}
    (out / "egag.json").write_text(json.dumps(result, indent=1))
    (out / "egag.md").write_text(report(result, out))
    return result


def _h_norm(row: dict) -> float | None:
    ex = [e for e in (row["steps"] or {}).get("extra") or [] if e and "h_norm" in e]
    return sum(e["h_norm"] for e in ex) / len(ex) if ex else None


def report(result: dict, out: Path) -> str:
    conds = result["conditions"]
    L = ["# EGAG experiment", "",
         f"Target `{result['config']['target']}`, drafter `{result['config']['drafter']}`, dataset "
         f"`{result['config']['dataset']}`, {result['config']['num_prompts']} prompts per dataset, max_new_tokens "
         f"{result['config']['max_new_tokens']}. Each condition is one bench run; its own report is in its folder. "
         "Speedup is against AR in the same run."]
    for c, s in conds.items():
        t = s["groups"]["overall"]
        rows = [json.loads(x) for x in open(out / c.replace("=", "") / "prompts.jsonl")]
        L += ["", f"## Main table — {c}", "",
              "| method | tok/s | speedup | MAT | α̂ | avg γ | avg H_norm | quality |", "|---|---|---|---|---|---|---|---|"]
        for m in ["ar"] + MAIN:
            if m not in t:
                continue
            r = t[m]
            hs = [h for row in rows if row["method"] == m and (h := _h_norm(row)) is not None]
            q = _f(r["exact_match_ar"], ".0%") + " exact" if c == "greedy" else _f(r["mean_loglik"], ".3f") + " ll"
            L.append(f"| {m} | {_f(r['tokens_per_s'])} | {_f(r['speedup'])}x | {_f(r['mat'])} | "
                     f"{_f(r['acceptance_rate'])} | {_f(r['mean_gamma'])} | "
                     f"{_f(sum(hs) / len(hs) if hs else None, '.3f')} | {q} |")
        fixed = [m for m in t if m.startswith("sd:gamma=")]
        if fixed and EGAG_MAIN in t:
            best = max(fixed, key=lambda m: t[m]["speedup"])
            d = t[EGAG_MAIN]["speedup"] / t[best]["speedup"] - 1
            L += ["", f"EGAG (γ_max = 8) vs the best fixed γ in this condition ({best}): "
                      f"{t[EGAG_MAIN]['speedup']:.2f}x vs {t[best]['speedup']:.2f}x, {'+' if d >= 0 else ''}{d:.1%}."]
            for label, m in (("cost-aware controller", COST), ("calibrated-entropy controller", CALIBRATED)):
                if m in t:
                    L.append(f"The {label} vs the best fixed γ: {t[m]['speedup'] / t[best]['speedup']:.3f}x; vs "
                             f"EGAG as the seed defines it: {t[m]['speedup'] / t[EGAG_MAIN]['speedup']:.3f}x.")
    g = conds.get("greedy")
    if g:
        t = g["groups"]["overall"]
        L += ["", "## γ_max sweep (greedy)", "", "| γ or γ_max | fixed speedup | fixed α̂ | EGAG speedup | EGAG α̂ | "
              "EGAG avg γ |", "|---|---|---|---|---|---|"]
        for n in sorted({2, 4, 6, 8, *SWEEP}):
            f, e = t.get(f"sd:gamma={n}"), t.get(f"sd:policy=egag:gamma_max={n}")
            L.append(f"| {n} | {_f(f and f['speedup'])} | {_f(f and f['acceptance_rate'])} | "
                     f"{_f(e and e['speedup'])} | {_f(e and e['acceptance_rate'])} | {_f(e and e['mean_gamma'])} |")
        L += ["", "## Ablations (greedy)", "", "| variant | speedup | MAT | α̂ | avg γ |", "|---|---|---|---|---|",
              f"| EGAG γ_max=8 (reference) | {_f(t[EGAG_MAIN]['speedup'])} | {_f(t[EGAG_MAIN]['mat'])} | "
              f"{_f(t[EGAG_MAIN]['acceptance_rate'])} | {_f(t[EGAG_MAIN]['mean_gamma'])} |"]
        for name, m in ABLATIONS.items():
            r = t[m]
            L.append(f"| {name} | {_f(r['speedup'])} | {_f(r['mat'])} | {_f(r['acceptance_rate'])} | "
                     f"{_f(r['mean_gamma'])} |")
        plots(g, out)
        L += ["", "![sweep](plots/sweep.png)", "", "![trace](plots/trace.png)"]
    return "\n".join(L) + "\n"


def plots(greedy: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    t = greedy["groups"]["overall"]
    ns = sorted({2, 4, 6, 8, *SWEEP})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, fmt in (("fixed γ", "sd:gamma={}"), ("EGAG γ_max", "sd:policy=egag:gamma_max={}")):
        xs = [n for n in ns if fmt.format(n) in t]
        a1.plot(xs, [t[fmt.format(n)]["speedup"] for n in xs], marker="o", label=label)
        a2.plot(xs, [t[fmt.format(n)]["acceptance_rate"] for n in xs], marker="o", label=label)
    a1.axhline(1.0, color="k", lw=0.8, ls="--")
    a1.set(xlabel="γ / γ_max", ylabel="speedup vs AR", title="Speedup")
    a2.set(xlabel="γ / γ_max", ylabel="acceptance rate", title="Acceptance", ylim=(0, 1.05))
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "sweep.png", dpi=110)
    plt.close(fig)

    rows = [json.loads(x) for x in open(out / "greedy" / "prompts.jsonl")]
    row = next((r for r in rows if r["method"] == EGAG_MAIN and r["repeat"] == 0), None)
    if row is None:
        return
    ex = row["steps"]["extra"] or [{}] * len(row["steps"]["d"])
    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = range(len(row["steps"]["d"]))
    ax.step(x, row["steps"]["d"], where="mid", label="γ drafted")
    ax.step(x, row["steps"]["a"], where="mid", label="accepted")
    ax2 = ax.twinx()
    ax2.plot(x, [e.get("h_norm", float("nan")) for e in ex], color="C3", marker=".", lw=0.8, label="H_norm")
    ax2.set_ylabel("H_norm")
    ax2.set_ylim(0, 1)
    ax.set(xlabel="verify round", ylabel="tokens", title=f"EGAG trace, {row['prompt_id']}")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "trace.png", dpi=110)
    plt.close(fig)
