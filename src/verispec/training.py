"""The training loop every trained drafter shares (Medusa, EAGLE, blockwise heads): AdamW, a progress bar with
tokens/s and loss, resumable checkpoints, a loss-curve PNG and a budget (`minutes`, `tokens`, `steps`).

Batches are a pure function of the step index (`batch(step)`), so a run resumed from its checkpoint (weights,
optimizer state, step, losses) takes exactly the steps an uninterrupted run takes and ends in the same state.
Checkpoints are written to a temporary file and renamed, so an interrupted write never replaces a good one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

CKPT = "checkpoint.pt"


@dataclass
class TrainReport:
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    stopped_by: str = "steps"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(model: nn.Module, batch: Callable[[int], tuple], loss_fn: Callable[..., torch.Tensor], *, steps: int,
          lr: float, workdir: str | Path | None = None, minutes: float | None = None, tokens: int | None = None,
          checkpoint_every: int = 50, weight_decay: float = 0.0, warmup: int = 0, progress: bool = True,
          label: str = "train") -> TrainReport:
    """Minimise loss_fn(model, *batch(step)) for `steps` steps (fewer when a budget runs out).

    batch(step) -> (n_tokens, *args): the number of tokens the step trains on (for tokens/s and the budget) and the
    loss's arguments. workdir: where the checkpoint lives (resumed from when present) and the loss curve goes."""
    params = [p for p in model.parameters() if p.requires_grad]
    # a parameter may carry `lr_scale` (its own learning rate = lr x lr_scale), e.g. input embeddings beside heads
    scales = sorted({float(getattr(p, "lr_scale", 1.0)) for p in params})
    groups = [{"params": [p for p in params if float(getattr(p, "lr_scale", 1.0)) == c], "lr": lr * c} for c in scales]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 10%
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * (0.55 + 0.45 * math.cos(math.pi * min(s / steps, 1.0))))
    start, seen, losses, spent = 0, 0, [], 0.0
    ckpt = Path(workdir) / CKPT if workdir is not None else None
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    if ckpt is not None and ckpt.exists():
        try:
            state = torch.load(ckpt, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        except Exception as e:  # noqa: BLE001 — a truncated or foreign checkpoint: say so, do not train on it
            raise ValueError(f"the checkpoint {ckpt} cannot be resumed ({e}); delete it to start over") from e
        start, seen, losses, spent = state["step"], state["tokens"], state["losses"], state["seconds"]
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, desc=label, disable=not progress, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - spent
    step, stopped_by = start, "steps"
    model.train()
    while step < steps:
        if minutes is not None and time.perf_counter() - t0 > 60 * minutes:
            stopped_by = "minutes"
            break
        if tokens is not None and seen >= tokens:
            stopped_by = "tokens"
            break
        n, *args = batch(step)
        loss = loss_fn(model, *args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        seen += int(n)
        losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{seen / max(elapsed, 1e-9):.0f}")
        if ckpt is not None and (step % checkpoint_every == 0 or step == steps):
            _save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "step": step, "tokens": seen, "losses": losses, "seconds": elapsed})
    bar.close()
    model.eval()
    if ckpt is not None and step > start:  # the budget's last state is resumable too
        _save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "step": step, "tokens": seen, "losses": losses, "seconds": time.perf_counter() - t0})
    report = TrainReport(step, seen, time.perf_counter() - t0, losses, start, stopped_by)
    if workdir is not None and losses:
        plot_losses(report, Path(workdir) / "loss.png", label)
    return report


def plot_losses(report: TrainReport, path: Path, label: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(report.losses) + 1), report.losses, lw=0.8, label="step loss")
    w = max(1, len(report.losses) // 20)
    if len(report.losses) >= 2 * w > 2:
        smooth = torch.tensor(report.losses).unfold(0, w, 1).mean(1).tolist()
        ax.plot(range(w, len(report.losses) + 1), smooth, lw=1.6, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{label}: {report.tokens} tokens, {report.seconds / 60:.1f} min")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
