"""PNG plots of a bench summary (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_all(s: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    table = s["groups"]["overall"]
    names = list(table)
    made = []

    def save(fig, fname):
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        made.append(folder / fname)

    def bar(key, title, fname, ref=None):
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names)), 3.2))
        vals = [table[m][key] or 0 for m in names]
        ax.bar(names, vals, color=["#888" if table[m]["peer"] else "#3572a5" for m in names])
        if ref is not None:
            ax.axhline(ref, color="k", lw=0.8, ls="--")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        save(fig, fname)

    bar("speedup", "Speedup vs AR (measured, this machine)", "speedup.png", 1.0)
    bar("mat", "MAT: tokens per target forward", "mat.png", 1.0)

    pos = {m: r["acceptance_by_position"] for m, r in table.items() if r["acceptance_by_position"]}
    if pos:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for m, v in pos.items():
            ax.plot(range(1, len(v) + 1), [x if x is not None else float("nan") for x in v], marker="o", label=m)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        ax.set_title("Acceptance by draft position")
        save(fig, "acceptance_by_position.png")

    pred = [m for m in names if table[m].get("predicted") is not None]
    if pred:
        fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(pred)), 3.2))
        x = range(len(pred))
        w = 0.27
        ax.bar([i - w for i in x], [table[m]["speedup"] for m in pred], w, label="measured")
        ax.bar(list(x), [table[m]["predicted"] for m in pred], w, label="predicted (this machine)")
        ax.bar([i + w for i in x], [table[m]["projected"] for m in pred], w, label="projected (accelerator)",
               hatch="//", alpha=0.6)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(x), pred, rotation=30)
        ax.legend(fontsize=7)
        ax.set_title("Speedup: measured vs predicted vs projected")
        save(fig, "measured_vs_predicted.png")
    return made
