"""`verispec bench`: time methods on the same prompts in the same run and report ratios against AR.

Honesty rules (DEVELOPERS.md rule 2): every method gets the same prompt ids, the same max_new_tokens and the same
token count (new ids up to and including the first stop token); one warm-up generation per method before any
timing; the method order rotates from prompt to prompt and repeat to repeat, so slow drift of the machine does not
favour one method; spreads are reported next to every ratio. Rows are appended to prompts.jsonl as they finish,
so an interrupted run can be resumed (`--resume`) and any run re-rendered (`verispec report DIR`) without
re-running models.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

import verispec
from verispec.backends import drafter_backend as default_drafter_backend, resolve_backend
from verispec.bench.datasets import Prompt, load_prompts
from verispec.bench.methods import MethodSpec, parse_methods, run_method
from verispec.bench.metrics import steps_log
from verispec.models import LoadedModel, check_compatible, load_model
from verispec.sampling import Sampling

CONFIG, ROWS, COST = "config.json", "prompts.jsonl", "cost.json"


def encode(model: LoadedModel, p: Prompt) -> list[int]:
    tok = model.tokenizer
    if p.chat and tok is not None and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = p.text
    return verispec.api.encode_prompt(model, text)


def environment() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "verispec": verispec.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def loglik(model: LoadedModel, prompt_ids: list[int], ids: list[int]) -> float | None:
    """Mean log-probability per generated token under the target (untimed)."""
    if not ids:
        return None
    with torch.inference_mode():
        logits = model.model(torch.tensor([prompt_ids + ids]), logits_to_keep=len(ids) + 1).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), -1)  # (n, V)
        return float(logp[torch.arange(len(ids)), torch.tensor(ids)].mean())


def bleu(hyp: str, ref: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hyp, [ref]).score)


def run_bench(target: str, drafter: str | None, methods: str | list[MethodSpec], dataset: str = "humaneval",
              num_prompts: int | None = 5, max_new_tokens: int = 64, gamma: int = 4,
              sampling: Sampling | None = None, out_dir: str | Path = "runs/bench", seed: int = 0,
              warmup: bool = True, repeats: int = 1, cost_model: bool = True, resume: bool = False,
              backend: str = "auto", drafter_backend: str | None = None, compare_backends: tuple[str, ...] = (),
              progress: bool = True) -> dict:
    from verispec.bench.report import render

    sampling = sampling or Sampling()
    specs = parse_methods(methods) if isinstance(methods, str) else list(methods)
    if "ar" not in [s.label for s in specs]:
        specs = [MethodSpec("ar", "ar"), *specs]  # every ratio is against AR from the same run
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if any(s.needs_drafter for s in specs) and not drafter:
        raise ValueError(f"methods {[s.label for s in specs if s.needs_drafter]} need --drafter")
    # One drafter per drafter backend in use: the run's default plus any a method names (sd:drafter_backend=B);
    # names are checked before anything is loaded or written.
    default_db = default_drafter_backend(backend, drafter_backend)
    wanted = dict.fromkeys([default_db] + [s.drafter_backend(default_db) for s in specs if s.needs_drafter])
    for b in (backend, *wanted):
        resolve_backend(b)
    prompts = load_prompts(dataset, num_prompts, seed)
    config = {"target": target, "drafter": drafter, "methods": [s.label for s in specs], "dataset": dataset,
              "num_prompts": len(prompts), "prompt_ids": [p.id for p in prompts], "max_new_tokens": max_new_tokens,
              "gamma": gamma, "sampling": asdict(sampling), "seed": seed, "warmup": warmup, "repeats": repeats,
              "backend": backend, "drafter_backend": default_db}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: set[tuple] = set()
    if resume and (out / CONFIG).is_file():
        old = json.loads((out / CONFIG).read_text())
        if {k: v for k, v in old.items() if k not in ("environment", "backends")} != config:
            raise ValueError(f"--resume: {out / CONFIG} was written for a different configuration")
        if (out / ROWS).is_file():
            done = {(r["prompt_id"], r["method"], r["repeat"]) for r in map(json.loads, open(out / ROWS))}
    else:
        for f in (ROWS, COST, "summary.json", "report.md"):
            (out / f).unlink(missing_ok=True)
    (out / CONFIG).write_text(json.dumps({**config, "environment": environment()}, indent=1))

    tgt = load_model(target, backend=backend)
    drafters: dict[str, LoadedModel] = {b: load_model(drafter, backend=b) for b in wanted} if drafter else {}
    drf: LoadedModel | None = drafters.get(default_db)
    for d in drafters.values():
        check_compatible(tgt, d)

    def drafter_for(spec: MethodSpec) -> LoadedModel | None:
        return drafters.get(spec.drafter_backend(default_db))

    cfg_path = out / CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["backends"] = {"target": tgt.backend, "drafter": drf.backend if drf else None,
                       "drafters": {b: d.backend for b, d in drafters.items()}}
    cfg_path.write_text(json.dumps(cfg, indent=1))
    encoded = [encode(tgt, p) for p in prompts]

    if warmup:
        for s in specs:
            run_method(s, tgt, drafter_for(s), encoded[0], min(16, max_new_tokens), sampling, gamma)
    from tqdm import tqdm

    todo = [(r, i, s) for r in range(repeats) for i in range(len(prompts))
            for s in _rotate(specs, r * len(prompts) + i)]
    bar = tqdm(total=len(todo), disable=not progress, desc="bench", unit="gen")
    for rep, i, spec in todo:
        bar.update(1)
        p = prompts[i]
        if (p.id, spec.label, rep) in done:
            continue
        ids, stats = run_method(spec, tgt, drafter_for(spec), encoded[i], max_new_tokens, sampling, gamma)
        row = {"prompt_id": p.id, "category": p.category, "method": spec.label, "repeat": rep, "peer": spec.peer,
               "prompt_tokens": len(encoded[i]), "new_tokens": len(ids), "token_ids": ids,
               "t_total": stats.t_total, "t_prefill": stats.t_prefill, "t_draft": stats.t_draft,
               "t_verify": stats.t_verify, "t_other": stats.t_other,
               "target_forwards": None if spec.peer else stats.target_forwards,
               "drafter_forwards": None if spec.peer else stats.drafter_forwards,
               "target_tokens_processed": stats.target_tokens_processed if not spec.peer else
               len(encoded[i]) + len(ids),  # a lower bound for peers: HF does not report its forwards
               "drafter_tokens_processed": stats.drafter_tokens_processed,
               "stop_reason": stats.stop_reason, "steps": None if spec.peer else steps_log(stats)}
        if not sampling.greedy:
            row["loglik"] = loglik(tgt, encoded[i], ids)
        if p.reference is not None and tgt.tokenizer is not None:
            row["bleu"] = bleu(tgt.tokenizer.decode(ids, skip_special_tokens=True), p.reference)
        with open(out / ROWS, "a") as f:
            f.write(json.dumps(row) + "\n")
    bar.close()

    if cost_model and not (out / COST).is_file():
        from verispec.bench.costcurve import drafter_curve, measure_costs

        costs = measure_costs(tgt, drf)
        if drf is not None:
            costs["drafter_backend"] = drf.backend
        for d in drafters.values():  # the other drafter backends' T(1), T(2)
            if d is not drf:
                costs.setdefault("other_drafters", {})[d.backend] = drafter_curve(d)
        for b in compare_backends:  # the target's T(k) curve on other backends, from a fresh copy each
            if b != tgt.backend:
                other = load_model(target, backend=b)
                costs.setdefault("other_backends", {})[other.backend] = measure_costs(other, None)["target_curve_ms"]
                del other
        (out / COST).write_text(json.dumps({**costs, "backend": tgt.backend}, indent=1))
    return render(out)


def _rotate(specs: list[MethodSpec], k: int) -> list[MethodSpec]:
    k %= len(specs)
    return specs[k:] + specs[:k]
