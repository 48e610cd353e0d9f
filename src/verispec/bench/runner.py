"""`verispec bench`: time methods on the same prompts in the same run and report ratios against AR.

Stages, each its own function: `plan` (check every name and option, choose prompts; nothing is loaded or written),
`open_dir` (the configuration, and the rows already done when resuming), `load` (the models: the target, one drafter
per drafter backend in use, and plain transformers copies for the peers), `warm_up`, `run` (one row per
generation, appended to prompts.jsonl as it finishes), `measure` (the cost model's T(k) curves) and `report`
(aggregate the rows and write summary.json, report.md and plots: `verispec.bench.report.render`).

Honesty rules: every method gets the same prompt ids, the same max_new_tokens and the same
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import verispec
from verispec.api import check_pair, encode_prompt
from verispec.backends import check_target, drafter_backend as default_drafter_backend, resolve_backend
from verispec.bench.datasets import Prompt, load_prompts
from verispec.bench.methods import MethodSpec, parse_methods, run_method
from verispec.bench.metrics import steps_log
from verispec.models import LoadedModel, load_model
from verispec.sampling import Sampling

CONFIG, ROWS, COST = "config.json", "prompts.jsonl", "cost.json"


def encode(model: LoadedModel, p: Prompt) -> list[int]:
    tok = model.tokenizer
    if p.chat and tok is not None and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = p.text
    return encode_prompt(model, text)


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


@dataclass
class BenchPlan:
    """Everything a run is decided by, checked before any model is loaded."""

    target: str
    drafter: str | None
    specs: list[MethodSpec]
    prompts: list[Prompt]
    config: dict
    out: Path
    sampling: Sampling
    gamma: int
    max_new_tokens: int
    repeats: int
    warmup: bool
    cost_model: bool
    resume: bool
    backend: str
    drafter_backends: list[str]  # the run's default first, then any a method names (sd:drafter_backend=B)
    compare_backends: tuple[str, ...] = ()
    execute: bool = True  # run code prompts' completions against their tests (HumanEval pass@1), untimed

    @property
    def default_drafter_backend(self) -> str:
        return self.drafter_backends[0]


@dataclass
class BenchModels:
    """The models of a run: ours, and the plain transformers copies the peers run on."""

    target: LoadedModel
    drafters: dict[str, LoadedModel]  # by drafter backend
    peer_target: LoadedModel | None = None
    peer_drafter: LoadedModel | None = None
    encoded: list[list[int]] = field(default_factory=list)  # the prompts' token ids

    def for_method(self, spec: MethodSpec, default_db: str) -> tuple[LoadedModel, LoadedModel | None]:
        if spec.peer and not spec.on_our_kernels:
            return self.peer_target, self.peer_drafter
        return self.target, self.drafters.get(spec.drafter_backend(default_db))


def plan(target: str, drafter: str | None, methods: str | list[MethodSpec], dataset: str = "humaneval",
         num_prompts: int | None = 5, max_new_tokens: int = 64, gamma: int = 4, sampling: Sampling | None = None,
         out_dir: str | Path = "runs/bench", seed: int = 0, warmup: bool = True, repeats: int = 1,
         cost_model: bool = True, resume: bool = False, backend: str = "auto", drafter_backend: str | None = None,
         compare_backends: tuple[str, ...] = (), execute: bool = True) -> BenchPlan:
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
    check_target(backend)
    default_db = default_drafter_backend(backend, drafter_backend)
    wanted = list(dict.fromkeys([default_db] + [s.drafter_backend(default_db) for s in specs if s.needs_drafter]))
    for b in (*wanted, *compare_backends):
        resolve_backend(b)
    for b in compare_backends:
        check_target(b)
    prompts = load_prompts(dataset, num_prompts, seed)
    config = {"target": target, "drafter": drafter, "methods": [s.label for s in specs], "dataset": dataset,
              "num_prompts": len(prompts), "prompt_ids": [p.id for p in prompts], "max_new_tokens": max_new_tokens,
              "gamma": gamma, "sampling": asdict(sampling), "seed": seed, "warmup": warmup, "repeats": repeats,
              "backend": backend, "drafter_backend": default_db}
    return BenchPlan(target, drafter, specs, prompts, config, Path(out_dir), sampling, gamma, max_new_tokens,
                     repeats, warmup, cost_model, resume, backend, wanted, tuple(compare_backends), execute)


def open_dir(p: BenchPlan) -> set[tuple]:
    """Write config.json; return the (prompt, method, repeat) rows already done when resuming."""
    out = p.out
    out.mkdir(parents=True, exist_ok=True)
    done: set[tuple] = set()
    if p.resume and (out / CONFIG).is_file():
        old = json.loads((out / CONFIG).read_text())
        if {k: v for k, v in old.items() if k not in ("environment", "backends")} != p.config:
            raise ValueError(f"--resume: {out / CONFIG} was written for a different configuration")
        if (out / ROWS).is_file():
            done = {(r["prompt_id"], r["method"], r["repeat"]) for r in map(json.loads, open(out / ROWS))}
    else:
        for f in (ROWS, COST, "summary.json", "report.md"):
            (out / f).unlink(missing_ok=True)
    (out / CONFIG).write_text(json.dumps({**p.config, "environment": environment()}, indent=1))
    return done


def load(p: BenchPlan) -> BenchModels:
    """The target, one drafter per drafter backend in use, and (for peers that run as their users run them) plain
    transformers copies; records every model's backend and kernel path in config.json. llama.cpp peers need no
    copy (they run the GGUF files) and are dropped, with a one-line message, when llama.cpp is not built."""
    from verispec.bench import llamacpp
    from verispec.bench.peers import prepare

    p.specs, lcp = llamacpp.prepare_specs(p.specs, p.target, p.drafter)  # checked before any model is loaded
    tgt = load_model(p.target, backend=p.backend)
    drafters = {b: load_model(p.drafter, backend=b) for b in p.drafter_backends} if p.drafter else {}
    for d in drafters.values():  # same vocabulary, or (for uag alone) both tokenizers
        check_pair([s.record for s in p.specs if s.needs_drafter], tgt, d)
    models = BenchModels(tgt, drafters)
    plain = [s for s in p.specs if s.peer and not s.on_our_kernels and not llamacpp.is_peer(s)]
    if plain:
        models.peer_target = prepare(load_model(p.target, backend="torch"))
        if any(s.needs_drafter for s in plain):
            models.peer_drafter = prepare(load_model(p.drafter, backend="torch"))
    for s in p.specs:
        if s.on_our_kernels:
            prepare(tgt)  # HF's algorithm on our models: its generation defaults are set aside there too
            for d in drafters.values():
                prepare(d)
    cfg = json.loads((p.out / CONFIG).read_text())
    drf = drafters.get(p.default_drafter_backend)
    cfg["backends"] = {"target": tgt.backend, "drafter": drf.backend if drf else None,
                       "drafters": {b: d.backend for b, d in drafters.items()},
                       "kernels": {"target": tgt.kernel, **{f"drafter {b}": d.kernel for b, d in drafters.items()}},
                       "peers": {"target": models.peer_target.backend if models.peer_target else None,
                                 "drafter": models.peer_drafter.backend if models.peer_drafter else None}}
    if lcp is not None:
        cfg["backends"]["llamacpp"] = lcp.describe()
    (p.out / CONFIG).write_text(json.dumps(cfg, indent=1))
    models.encoded = [encode(tgt, q) for q in p.prompts]
    if models.peer_target is not None:
        from verispec.bench.peers import check_processors, generation_config

        for s in plain:  # the peers must sample exactly verispec's distribution
            gen = generation_config(p.sampling, tgt.stop_ids, p.max_new_tokens, s.name, s.params)
            check_processors(models.peer_target.model, gen, len(models.encoded[0]), p.sampling)
    if lcp is not None:  # llama.cpp peers read only .name and .stop_ids (an HF copy, when loaded, serves too)
        models.peer_target = models.peer_target or llamacpp.GGUFModel(p.target, llamacpp.gguf_path(p.target),
                                                                      tgt.stop_ids)
        if any(s.name == llamacpp.SD for s in p.specs) and models.peer_drafter is None:
            models.peer_drafter = llamacpp.GGUFModel(p.drafter, llamacpp.gguf_path(p.drafter))
    return models


def warm_up(p: BenchPlan, models: BenchModels) -> None:
    """One short untimed generation per method (first-call costs: allocations, kernel selection, lazy imports)."""
    if p.warmup:
        for s in p.specs:
            run_method(s, *models.for_method(s, p.default_drafter_backend), models.encoded[0],
                       min(16, p.max_new_tokens), p.sampling, p.gamma)


def run(p: BenchPlan, models: BenchModels, done: set[tuple], progress: bool = True) -> None:
    """Every (repeat, prompt, method), the method order rotated per prompt; one row each, appended as it ends."""
    from tqdm import tqdm

    todo = [(r, i, s) for r in range(p.repeats) for i in range(len(p.prompts))
            for s in _rotate(p.specs, r * len(p.prompts) + i)]
    bar = tqdm(total=len(todo), disable=not progress, desc="bench", unit="gen")
    tgt = models.target
    for rep, i, spec in todo:
        bar.update(1)
        q, prompt_ids = p.prompts[i], models.encoded[i]
        if (q.id, spec.label, rep) in done:
            continue
        model, drafter = models.for_method(spec, p.default_drafter_backend)
        ids, stats = run_method(spec, model, drafter, prompt_ids, p.max_new_tokens, p.sampling, p.gamma)
        row = {"prompt_id": q.id, "category": q.category, "method": spec.label, "repeat": rep, "peer": spec.peer,
               "backend": stats.extra.get("backend", model.backend) if spec.peer else model.backend,  # llama.cpp
               "prompt_tokens": len(prompt_ids), "new_tokens": len(ids), "token_ids": ids,
               "t_total": stats.t_total, "t_prefill": stats.t_prefill, "t_draft": stats.t_draft,
               "t_verify": stats.t_verify, "t_other": stats.t_other,
               "target_forwards": None if spec.peer else stats.target_forwards,
               "drafter_forwards": None if spec.peer else stats.drafter_forwards,
               "target_tokens_processed": stats.target_tokens_processed if not spec.peer else
               len(prompt_ids) + len(ids),  # a lower bound for peers: HF does not report its forwards
               "drafter_tokens_processed": stats.drafter_tokens_processed,
               "stop_reason": stats.stop_reason, "steps": None if spec.peer else steps_log(stats),
               "peer_info": (stats.extra or None) if spec.peer else None}  # llama.cpp: its timings, draft counts
        if not p.sampling.greedy:
            row["loglik"] = loglik(tgt, prompt_ids, ids)
        if q.reference is not None and tgt.tokenizer is not None:
            row["bleu"] = bleu(tgt.tokenizer.decode(ids, skip_special_tokens=True), q.reference)
        if p.execute and q.tests and q.entry_point and tgt.tokenizer is not None:  # pass@1, after the timing
            from verispec.bench.quality import check_completion, completion_text

            row.update(check_completion(q.text, completion_text(tgt.tokenizer, prompt_ids, ids), q.tests,
                                        q.entry_point))
        with open(p.out / ROWS, "a") as f:
            f.write(json.dumps(row) + "\n")
    bar.close()


def measure(p: BenchPlan, models: BenchModels) -> None:
    """The cost model's inputs (once per directory): the target's T(k), each drafter's T(1), T(2), and the target's
    T(k) on other backends when asked."""
    if not p.cost_model or (p.out / COST).is_file():
        return
    from verispec.bench.costcurve import drafter_curve, measure_costs

    tgt, drf = models.target, models.drafters.get(p.default_drafter_backend)
    costs = measure_costs(tgt, drf)
    if drf is not None:
        costs["drafter_backend"] = drf.backend
    for d in models.drafters.values():  # the other drafter backends' T(1), T(2)
        if d is not drf:
            costs.setdefault("other_drafters", {})[d.backend] = drafter_curve(d)
    for b in p.compare_backends:  # the target's T(k) curve on other backends, from a fresh copy each
        if b != tgt.backend:
            other = load_model(p.target, backend=b)
            costs.setdefault("other_backends", {})[other.backend] = measure_costs(other, None)["target_curve_ms"]
            del other
    (p.out / COST).write_text(json.dumps({**costs, "backend": tgt.backend}, indent=1))


def run_bench(target: str, drafter: str | None, methods: str | list[MethodSpec], dataset: str = "humaneval",
              num_prompts: int | None = 5, max_new_tokens: int = 64, gamma: int = 4,
              sampling: Sampling | None = None, out_dir: str | Path = "runs/bench", seed: int = 0,
              warmup: bool = True, repeats: int = 1, cost_model: bool = True, resume: bool = False,
              backend: str = "auto", drafter_backend: str | None = None, compare_backends: tuple[str, ...] = (),
              progress: bool = True, execute: bool = True) -> dict:
    """plan -> open_dir -> load -> warm_up -> run -> measure -> report; returns the summary."""
    from verispec.bench.report import render

    p = plan(target, drafter, methods, dataset, num_prompts, max_new_tokens, gamma, sampling, out_dir, seed, warmup,
             repeats, cost_model, resume, backend, drafter_backend, compare_backends, execute)
    done = open_dir(p)
    models = load(p)
    warm_up(p, models)
    run(p, models, done, progress)
    measure(p, models)
    return render(p.out)


def _rotate(specs: list[MethodSpec], k: int) -> list[MethodSpec]:
    k %= len(specs)
    return specs[k:] + specs[:k]
