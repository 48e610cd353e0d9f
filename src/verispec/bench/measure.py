"""Measure what a backend buys: the cost T(k) of one forward of k new tokens on a warm KV cache.

Speculative decoding wins only if verifying k = γ + 1 tokens costs about one decode step, so the number that
matters is the curve T(k)/T(1) (on a 2-core Zen 3 machine, 2026-11-22, torch defaults gave 1.99 at k = 2 and 3.35 at k = 16
for the 1.5B target). `forward_cost_curve` times exactly the forward verispec runs to verify: k new tokens after
`context` cached ones, logits for all k positions; the cache is cropped back after each timed forward
(`DynamicCache.crop(-k)`), so every repeat sees the same context. ks are interleaved in a rotating order across
repeats so a burst of load from another process spreads over all k instead of biasing one; medians are reported.

    python -m verispec.bench.measure --model qwen2.5-coder-1.5b --backend torch,fast

prints RSS after loading and after each conversion, the T(k) table with T(k)/T(1) per backend, and whether
greedy decoding of `--tokens` tokens from one HumanEval prompt is token-identical across the backends. One model
is held at a time: "torch" is measured on the loaded model, "fast" converts it in place (so list torch first; a
"torch" after "fast" reloads).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from verispec.backends import BACKENDS, apply_backend, backend_of, resolve_backend


def rss_mib() -> dict[str, float]:
    """Resident memory of this process from /proc/self/status, MiB: rss (= anon + file + shmem), anon, file, peak."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[keys[k]] = int(v.split()[0]) / 1024  # kB -> MiB
    except OSError:
        pass
    return out


def _module(model) -> nn.Module:
    return model if isinstance(model, nn.Module) else model.model


class CostTimer:
    """A model with a warm KV cache of `context` random (seeded) tokens; `round()` times one forward per k.

    The token ids do not matter for the cost. After each timed forward the cache is cropped back, so every forward
    sees exactly `context` cached tokens. Several timers (one per backend) can alternate rounds (`--interleave`).
    """

    @torch.inference_mode()
    def __init__(self, model, ks: Sequence[int] = (1, 2, 4, 8, 16), context: int = 150, seed: int = 0,
                 lean: bool = False):
        from transformers import DynamicCache

        from verispec.cache import CachedLM

        self.m = _module(model)
        # The forward the engine runs (CachedLM's): a gguf model's NativeDecoder (its C++ layer loop for chains), and
        # with lean=True a drafter's lean forward (verispec.rewrites.lean, C++ on fast-int4) where the family is
        # known; otherwise transformers' forward.
        self.lean = CachedLM(self.m, lean=lean).lean
        self.ks = [int(k) for k in ks]
        if not self.ks or min(self.ks) < 1 or context < 1:
            raise ValueError("need ks >= 1 and context >= 1")
        self.context = context
        device = next(self.m.parameters()).device
        vocab = int(self.m.config.vocab_size)
        g = torch.Generator().manual_seed(seed)
        ctx_ids = torch.randint(0, vocab, (1, context), generator=g).to(device)  # (1, context)
        self.new_ids = torch.randint(0, vocab, (1, max(self.ks)), generator=g).to(device)  # (1, max k)
        self.cache = DynamicCache(config=self.m.config)
        if self.lean is not None:  # prefill
            self.lean(ctx_ids, self.cache, 1)
        else:
            self.m(input_ids=ctx_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.times: dict[int, list[float]] = {k: [] for k in self.ks}
        self.rounds = 0

    @torch.inference_mode()
    def step(self, k: int) -> float:
        """ms for one forward of k new tokens (logits for all k, as verification needs)."""
        ids = self.new_ids[:, :k]  # (1, k)
        t0 = time.perf_counter()
        if self.lean is not None:
            self.m.get_output_embeddings()(self.lean(ids, self.cache, k))  # logits (k, V)
        else:
            self.m(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=k)  # logits (1, k, V)
        dt = time.perf_counter() - t0
        self.cache.crop(-k)  # back to `context` tokens (negative = number of tokens to drop)
        if self.cache.get_seq_length() != self.context:
            raise RuntimeError(f"KV cache holds {self.cache.get_seq_length()} tokens, expected {self.context}")
        return dt * 1e3

    def round(self, record: bool = True) -> None:
        """One forward per k, in an order rotated each round (no k always first or right after the largest)."""
        r = self.rounds % len(self.ks)
        for k in self.ks[r:] + self.ks[:r]:
            t = self.step(k)
            if record:
                self.times[k].append(t)
        self.rounds += record

    def medians(self) -> dict[int, float]:
        return {k: statistics.median(v) for k, v in self.times.items() if v}


def forward_cost_curve(model, ks: Sequence[int] = (1, 2, 4, 8, 16), context: int = 150, repeats: int = 7,
                       warmup: int = 2, seed: int = 0, lean: bool = False) -> dict[int, float]:
    """Median wall time in ms of a forward of k new tokens on a warm `context`-token KV cache, for each k in ks.

    model: an HF causal LM (nn.Module) or a verispec LoadedModel, on whatever backend it is on now. Runs `warmup`
    untimed rounds, then `repeats` timed rounds over all ks. Returns {k: median ms}. It times the forward the engine
    runs: a gguf model's NativeDecoder, and with lean=True a drafter's lean forward where the model family is known.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("need repeats >= 1 and warmup >= 0")
    timer = CostTimer(model, ks, context, seed, lean=lean)
    for _ in range(warmup):
        timer.round(record=False)
    for _ in range(repeats):
        timer.round()
    return timer.medians()


def greedy_ids(model, prompt_ids: Sequence[int], n: int = 32) -> list[int] | None:
    """Greedy continuation (token ids) of `prompt_ids` by plain autoregressive decoding with verispec; None on a
    drafter-only backend (it cannot serve a target)."""
    import verispec

    if not BACKENDS[backend_of(model)].target:
        return None
    return verispec.generate(model, list(prompt_ids), method="ar", max_new_tokens=n).token_ids


def _prompt_ids(loaded, text: str | None) -> list[int]:
    if text is None:
        try:
            from verispec.bench.datasets import humaneval

            text = humaneval()[0].text
        except Exception:  # noqa: BLE001 - the dataset package is optional here
            text = "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def format_table(curves: dict[str, dict[int, float]]) -> str:
    ks = sorted({k for c in curves.values() for k in c})
    head = "| backend | " + " | ".join(f"T({k}) ms" for k in ks) + " | " + " | ".join(
        f"T({k})/T(1)" for k in ks if k != 1) + " |"
    lines = [head, "|" + "---|" * (1 + len(ks) + sum(k != 1 for k in ks))]
    for name, c in curves.items():
        t1 = c.get(1)
        cells = [f"{c[k]:.1f}" if k in c else "" for k in ks]
        ratios = [f"{c[k] / t1:.2f}" if (t1 and k in c) else "" for k in ks if k != 1]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def _fmt_rss(r: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / 1024:.2f} GiB" for k, v in r.items())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verispec.bench.measure", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="registry name or local HF folder")
    ap.add_argument("--backend", default="torch,fast", help="comma-separated backends, in order (torch first)")
    ap.add_argument("--ks", default="1,2,4,8,16", help="comma-separated numbers of new tokens per forward")
    ap.add_argument("--context", type=int, default=150, help="cached tokens before the timed forward")
    ap.add_argument("--repeats", type=int, default=7, help="timed forwards per k (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds over all ks first")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens compared across backends (0: skip)")
    ap.add_argument("--prompt", default=None, help="prompt text for the greedy check (default: HumanEval/0)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--interleave", action="store_true",
                    help="hold one model per backend and alternate timing rounds between them (more robust to "
                         "background load; needs the memory of all of them at once)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    from verispec import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    ks = [int(k) for k in args.ks.split(",")]
    env = {"threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(), "torch": torch.__version__,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"[measure] {args.model}: threads {env['threads']}, load average {env['loadavg_start']}", flush=True)

    curves, tokens, rss, convert_s, actual = {}, {}, {}, {}, {}
    prompt: list[int] | None = None

    def load_as(b: str, loaded=None):
        """Load (unless given) and convert to backend b, recording RSS and conversion time."""
        nonlocal prompt
        if loaded is None:
            gc.collect()
            rss[f"before load ({b})"] = rss_mib()
            loaded = load_model(args.model, backend="torch")  # converted below, one backend at a time
            rss[f"after load ({b})"] = rss_mib()
            prompt = prompt or _prompt_ids(loaded, args.prompt)
        want = resolve_backend(b)
        if want != "torch":
            t0 = time.perf_counter()
            apply_backend(loaded, want)
            gc.collect()
            convert_s[b] = time.perf_counter() - t0
            rss[f"after apply_backend({b!r})"] = rss_mib()
            print(f"[measure] converted to {want} in {convert_s[b]:.1f} s", flush=True)
        actual[b] = backend_of(loaded)  # what the layers really are now (e.g. "fast" if int8 fell back)
        return loaded

    if args.interleave:
        # one model per backend held at once (memory: the sum of all), timing rounds alternate between them
        models = {b: load_as(b) for b in backends}
        timers = {b: CostTimer(models[b], ks, args.context) for b in backends}
        for _ in range(args.warmup):
            for t in timers.values():
                t.round(record=False)
        print(f"[measure] interleaved timing of {', '.join(backends)}: k={ks}, context {args.context}, "
              f"{args.repeats} rounds", flush=True)
        for r in range(args.repeats):
            for b in backends[r % len(backends):] + backends[: r % len(backends)]:
                timers[b].round()
        curves = {b: t.medians() for b, t in timers.items()}
        del timers
        rss["after timing (all)"] = rss_mib()
        if args.tokens:
            tokens = {b: t for b, m in models.items() if (t := greedy_ids(m, prompt, args.tokens)) is not None}
        del models
    else:
        loaded = None
        for b in backends:
            if loaded is None or backend_of(loaded) != "torch":
                loaded = None  # free the previous model before loading the next: one model held at a time
                loaded = load_as(b)
            else:
                loaded = load_as(b, loaded)  # in-place conversion of the plain model already held
            print(f"[measure] {b}: timing k={ks}, context {args.context}, {args.repeats} repeats", flush=True)
            curves[b] = forward_cost_curve(loaded, ks, context=args.context, repeats=args.repeats,
                                           warmup=args.warmup)
            rss[f"after timing ({b})"] = rss_mib()  # every weight touched: the backend's resident size
            print(format_table({b: curves[b]}).splitlines()[-1], flush=True)
            if args.tokens and (t := greedy_ids(loaded, prompt, args.tokens)) is not None:
                tokens[b] = t
    env["loadavg_end"] = os.getloadavg()

    print(f"\n{args.model}, context {args.context}, median of {args.repeats}, threads {env['threads']}, "
          f"load average start {env['loadavg_start']} end {env['loadavg_end']}\n")
    print(format_table(curves))
    print("\nRSS:")
    for k, v in rss.items():
        print(f"  {k}: {_fmt_rss(v)}")
    identical = None
    if tokens:
        ref_name, ref = next(iter(tokens.items()))
        identical = all(t == ref for t in tokens.values())
        for name, t in tokens.items():
            diff = next((i for i, (a, c) in enumerate(zip(ref, t)) if a != c), None)
            if diff is None and len(t) != len(ref):
                diff = min(len(t), len(ref))
            print(f"greedy {name}: {len(t)} tokens, " + ("identical to " + ref_name if diff is None
                                                          else f"differs from {ref_name} at token {diff}"))
        print(f"greedy identical across backends: {identical}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "context": args.context, "repeats": args.repeats, "env": env,
                       "interleave": args.interleave, "backend_of": actual, "curves_ms": curves, "rss_mib": rss, "convert_s": convert_s, "greedy_tokens": tokens,
                       "greedy_identical": identical}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
