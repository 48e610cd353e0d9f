"""`verispec bench --osd`: online speculative decoding's A/B — the drafter before and after adapting on a domain.

Liu et al. 2024, "Online Speculative Decoding" (`verispec.drafters.online`). Over one stream of prompts of one domain
(a seeded shuffle of the dataset, split into two disjoint parts): `osd` adapts on the first N (`--osd-adapt`,
default 50) as a server would, updating every `update_every` requests in the background; the positions still
buffered at the end go into one last update, waited for. Then, on M held-out prompts (`--osd-eval`, default 20; none
of them in the adaptation part, checked by id and by text), each prompt is generated twice in the same run: A with
the unadapted drafter (`version=0`) and B with the adapted one (the last published version), both `learn=False`
(nothing is learned from the held-out prompts), their order alternating from prompt to prompt. Reported per arm:
acceptance α̂ = accepted / drafted, mean accepted tokens per target forward, tok/s (new tokens / generation time);
the adaptation phase's own α̂ curve; the training budget (updates, positions, optimiser steps, seconds, loss before /
after each update); the checkpoint version B drafts with and its folder; backends and kernels of the target, the
drafter and the adapted drafter; the machine. Greedy by default, where A's and B's tokens must be identical (both
are the target's greedy output): a difference is counted as an identity violation.

Writes osd.md and osd.json into the bench's output folder (checkpoints into `<out>/osd-checkpoints` unless
checkpoint_dir= is given).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from verispec.bench.datasets import Prompt, load_prompts
from verispec.sampling import Sampling


def split_stream(prompts: list[Prompt], n_adapt: int, n_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(adaptation prompts, held-out prompts): a seeded shuffle cut in two; disjoint by id and by text."""
    if n_adapt < 1 or n_eval < 1:
        raise ValueError("--osd-adapt and --osd-eval must be >= 1")
    unique = list({p.text: p for p in prompts}.values())  # a repeated text would leak into both parts
    if n_adapt + n_eval > len(unique):
        raise ValueError(f"--osd-adapt {n_adapt} + --osd-eval {n_eval} prompts asked, the dataset has {len(unique)} "
                         f"distinct prompts")
    order = random.Random(seed).sample(range(len(unique)), n_adapt + n_eval)
    adapt, held = [unique[i] for i in order[:n_adapt]], [unique[i] for i in order[n_adapt:]]
    assert not {p.id for p in adapt} & {p.id for p in held}, "a held-out prompt id is in the adaptation set"
    return adapt, held


def _row(p: Prompt, out, arm: str) -> dict:
    s = out.stats
    return {"prompt_id": p.id, "arm": arm, "new_tokens": s.new_tokens, "drafted": s.drafted, "accepted": s.accepted,
            "target_forwards": s.target_forwards, "t_total": s.t_total, "acceptance_rate": s.acceptance_rate,
            "token_ids": out.token_ids}


def _arm(rows: list[dict]) -> dict:
    D, A = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
    N, F = sum(r["new_tokens"] for r in rows), sum(r["target_forwards"] for r in rows)
    T = sum(r["t_total"] for r in rows)
    return {"prompts": len(rows), "drafted": D, "accepted": A, "acceptance_rate": A / D if D else None,
            "new_tokens": N, "tokens_per_target_forward": N / F if F else None, "seconds": T,
            "tok_per_s": N / T if T else None}


def run_osd_bench(target, drafter, prompts="humaneval", n_adapt: int = 50, n_eval: int = 20,
                  max_new_tokens: int = 64, gamma: int = 4, sampling: Sampling | None = None,
                  out_dir: str | Path = "runs/bench", seed: int = 0, warmup: bool = True, backend: str = "auto",
                  drafter_backend: str | None = None, options: dict | None = None, progress: bool = True) -> dict:
    """The A/B above; writes osd.md and osd.json into out_dir and returns the summary. options: osd's own options
    (update_every, loss, lr, steps, ...; not learn / version, which the A/B sets)."""
    from tqdm import tqdm

    import verispec
    from verispec.api import _Ctx
    from verispec.backends import backend_of, kernel_path
    from verispec.bench.concurrency import check_specs, describe_backends, load_models
    from verispec.bench.runner import encode, environment
    from verispec.drafters.online import OnlineDrafter, read_manifest

    sampling = sampling or Sampling()
    options = dict(options or {})
    if {"learn", "version"} & set(options):
        raise ValueError("the OSD A/B sets learn= and version= itself")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options.setdefault("checkpoint_dir", str(out / "osd-checkpoints"))
    stream = load_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    adapt, held = split_stream(stream, n_adapt, n_eval, seed)
    specs = check_specs("osd")
    tgt, drafters, default_db = load_models(target, drafter, specs, backend, drafter_backend)
    if not drafters:
        raise ValueError("the OSD A/B needs --drafter")
    drf = drafters[default_db]
    state = OnlineDrafter.from_ctx(_Ctx(tgt, drf, tgt.stop_ids, dict(options))).state  # the state osd will use
    if state.requests or state.current[0]:
        raise ValueError("this drafter object has already adapted; the A/B needs a fresh one")

    def gen(p_ids, n, **kw):
        return verispec.generate(tgt, p_ids, drafter=drf, method="osd", gamma=gamma, sampling=sampling,
                                 max_new_tokens=n, **options, **kw)

    enc = {p.id: encode(tgt, p) for p in adapt + held}
    if warmup:  # untimed; version=0 learns nothing and counts no request
        gen(enc[adapt[0].id], 8, learn=False, version=0)
    adapt_rows = []
    for p in tqdm(adapt, disable=not progress, desc="osd adapt", unit="prompt"):
        v = state.current[0]  # published before this request starts (one may land just after this read)
        o = gen(enc[p.id], max_new_tokens, learn=True)
        adapt_rows.append({**_row(p, o, "adapt"), "version_at_start": v})
    state.wait()
    state.update(drf.model, wait=True)  # the positions still buffered: one last update, waited for
    version = state.current[0]
    eval_rows = []
    for k, p in enumerate(tqdm(held, disable=not progress, desc="osd eval", unit="prompt")):
        arms = [("A", 0), ("B", None)] if k % 2 == 0 else [("B", None), ("A", 0)]
        got = {}
        for arm, v in arms:
            o = gen(enc[p.id], max_new_tokens, learn=False, **({"version": v} if v == 0 else {}))
            got[arm] = o
            eval_rows.append(_row(p, o, arm))
        if state.current[0] != version:
            raise RuntimeError("the adapted drafter changed during the evaluation")
    A = _arm([r for r in eval_rows if r["arm"] == "A"])
    B = _arm([r for r in eval_rows if r["arm"] == "B"])
    by = {(r["prompt_id"], r["arm"]): r["token_ids"] for r in eval_rows}
    violations = [p.id for p in held if by[(p.id, "A")] != by[(p.id, "B")]] if sampling.greedy else []
    ok = [h for h in state.history if h.status == "ok"]
    training = {"updates": len(ok), "failed_updates": len(state.history) - len(ok),
                "positions": sum(h.positions for h in ok), "steps": sum(h.steps for h in ok),
                "seconds": sum(h.seconds for h in ok), "history": [asdict(h) for h in state.history]}
    ckpt = state.config.checkpoint_dir
    adapted = state.current[1]
    backends = describe_backends(tgt, drafters, default_db)
    backends["adapted_drafter"] = backend_of(adapted) if adapted is not None else None
    backends["kernels"]["adapted drafter"] = kernel_path(adapted) if adapted is not None else None
    config = {"target": tgt.name, "drafter": drf.name, "dataset": prompts if isinstance(prompts, str) else "custom",
              "n_adapt": len(adapt), "n_eval": len(held), "adapt_ids": [p.id for p in adapt],
              "eval_ids": [p.id for p in held], "seed": seed, "max_new_tokens": max_new_tokens, "gamma": gamma,
              "sampling": asdict(sampling), "warmup": warmup, "osd": asdict(state.config)}
    s = {"config": config, "environment": environment(), "backends": backends, "training": training,
         "checkpoint": {"dir": ckpt, "version": version,
                        "manifest": read_manifest(ckpt, version) if ckpt is not None and version else None},
         "adapt": _arm(adapt_rows), "A": A, "B": B,
         "delta_acceptance": (B["acceptance_rate"] - A["acceptance_rate"])
         if A["acceptance_rate"] is not None and B["acceptance_rate"] is not None else None,
         "speedup_B_over_A": B["tok_per_s"] / A["tok_per_s"] if A["tok_per_s"] and B["tok_per_s"] else None,
         "identity_violations": violations, "adapt_rows": adapt_rows, "eval_rows": eval_rows}
    tmp = out / "osd.json.tmp"
    tmp.write_text(json.dumps(s, indent=1))
    tmp.replace(out / "osd.json")
    (out / "osd.md").write_text(markdown(s))
    return s


def _f(x, spec=".3f", suffix=""):
    return "—" if x is None else format(x, spec) + suffix


def markdown(s: dict) -> str:
    c, env, b, t, k = s["config"], s["environment"], s["backends"], s["training"], s["checkpoint"]
    o = c["osd"]
    L = [f"# verispec bench --osd — online speculative decoding A/B — target `{c['target']}`, drafter "
         f"`{c['drafter']}`", "",
         f"Adapted on {c['n_adapt']} prompts of `{c['dataset']}`, measured on {c['n_eval']} held-out prompts of it "
         f"(seed {c['seed']}; disjoint sets); γ = {c['gamma']}, max_new_tokens = {c['max_new_tokens']}, sampling = "
         f"{c['sampling']}. A = the unadapted drafter, B = the adapted one (checkpoint version {k['version']}), the "
         f"same prompts in the same run, order alternating. OSD options: update_every={o['update_every']}, "
         f"loss={o['loss']}, positions={o['positions']}, LoRA rank {o['lora_rank']} on "
         f"{'every block' if not o.get('train_layers') else 'the last %d blocks' % o['train_layers']}, lr={o['lr']}, "
         f"steps={o['steps']} per update, teacher top-{o['teacher_top_k']} (Liu et al. 2024).", "",
         "| arm | α̂ (accepted / drafted) | tokens / target forward | tok/s | new tokens | seconds |",
         "|---|---|---|---|---|---|"]
    for name, label in (("A", "A: unadapted drafter"), ("B", f"B: adapted (v{k['version']})"),
                        ("adapt", "during adaptation (mixed versions)")):
        r = s[name]
        L.append(f"| {label} | {_f(r['acceptance_rate'])} ({r['accepted']} / {r['drafted']}) | "
                 f"{_f(r['tokens_per_target_forward'], '.2f')} | {_f(r['tok_per_s'], '.2f')} | {r['new_tokens']} | "
                 f"{r['seconds']:.1f} |")
    if s["identity_violations"]:
        same = f"**Identity violations** (A ≠ B under greedy): {', '.join(map(str, s['identity_violations']))}."
    elif c["sampling"]["temperature"] == 0:
        same = "Greedy: A and B wrote identical tokens on every held-out prompt (both are the target's output)."
    else:
        same = "Sampling: A's and B's tokens differ by their draws; not compared."
    L += ["", f"Δα̂ (B − A) = {_f(s['delta_acceptance'], '+.3f')}; tok/s B / A = "
              f"{_f(s['speedup_B_over_A'], '.2f', 'x')}. {same}", "",
          f"Training budget: {t['updates']} update(s) ({t['failed_updates']} failed), {t['positions']} buffered "
          f"positions, {t['steps']} optimiser steps, {t['seconds']:.1f} s of background training (on the same cores "
          f"as the adaptation-phase generations). Checkpoints: `{k['dir']}`.", "",
          "| update | status | version | positions | requests seen | steps | seconds | loss before → after |",
          "|---|---|---|---|---|---|---|---|"]
    for i, h in enumerate(t["history"], 1):
        L.append(f"| {i} | {h['status']} | {h['version'] if h['version'] is not None else '—'} | {h['positions']} | "
                 f"{h['requests']} | {h['steps']} | {h['seconds']:.1f} | {_f(h['loss_before'])} → "
                 f"{_f(h['loss_after'])} |")
    L += ["", "| held-out prompt | α̂ A | α̂ B | tok/s A | tok/s B |", "|---|---|---|---|---|"]
    rows = {(r["prompt_id"], r["arm"]): r for r in s["eval_rows"]}
    for pid in c["eval_ids"]:
        a, bb = rows[(pid, "A")], rows[(pid, "B")]
        L.append(f"| {pid} | {_f(a['acceptance_rate'])} | {_f(bb['acceptance_rate'])} | "
                 f"{_f(a['new_tokens'] / a['t_total'] if a['t_total'] else None, '.2f')} | "
                 f"{_f(bb['new_tokens'] / bb['t_total'] if bb['t_total'] else None, '.2f')} |")
    kern = "; ".join(f"{n} {v}" for n, v in b.get("kernels", {}).items())
    L += ["", f"Backends: target `{b.get('target')}`, drafter `{b.get('drafter')}`, adapted drafter "
              f"`{b.get('adapted_drafter')}`; kernels: {kern}.",
          f"Machine: {env.get('cpu')} ({env.get('cores')} cores, {env.get('threads')} threads); torch "
          f"{env.get('torch')}, transformers {env.get('transformers')}, verispec {env.get('verispec')}; started "
          f"{env.get('time')}.", "", "Files: osd.json (every row, token ids, the update history, the manifest)."]
    return "\n".join(L) + "\n"
