"""Batch invariance: does a position's logit row depend on what else shares its forward?

Speculative decoding scores the pending token plus K drafts in one forward of 1 + K rows (a chain, or a token tree
with a 4D mask); autoregressive (AR) decoding scores one row per forward. Greedy speculative output equals greedy AR
output only if row i of the k-row forward equals the 1-row forward at the same position — "batch invariance". The
verifier itself is exact; what it is handed need not be. In fp32 the kernels sum in a row-count dependent order
(oneDNN's fp32 GEMM moved a row by ~3e-6 between 1-row and 2+-row inputs); torch's dynamic int8 ("fast-int8")
takes one activation scale over all rows of a call, so every row moves with the drafts beside it (~1e-2); "fast-int4"
sends inputs of 4 or more rows to a separate int8 copy of each layer.

A deviation of at most δ in every logit changes the difference of two logits by at most 2δ, so greedy SD and greedy
AR pick the same token at every position whose top-2 gap exceeds 2δ. Below that — a near tie — the k-row forward
may pick the other token, and from there the two outputs go their own ways. Losslessness then holds only relative
to "the target as computed in k-row forwards", not to the target's AR output.

`batch_invariance(model)` measures it on a seeded random context: the AR reference exactly as the engine's AR path
computes it (CachedLM: prefill all but the last context token, then one 1-row forward per position), then for each
k a chain scored exactly as the engine scores a (k-1)-token draft (`CachedLM.score(tokens, Draft(x[:k-1]))`, same
cache state), and for each tree shape a token tree holding the continuation as one root-to-leaf path among other
branches (`CachedLM.score(tokens, Draft(nodes, parents=...))`). Each scored row at an AR position is compared with
the AR row: max |Δ|, max |Δ| / max |AR logit|, bit-identical or not, argmax agreeing or not. It also reports the
smallest top-2 gap along the AR path. No tokenizer is needed (token ids are random).

    python -m verispec.bench.invariance --model qwen2.5-coder-1.5b --backends torch,fast,fast-bf16,fast-int8,fast-int4
    python -m verispec.bench.invariance --model path/to/hf_folder --ks 1,2,4,8,16 --trees 2x2x2 --json inv.json

loads the model once per backend (one at a time), prints one table row per backend (and the backend that really
ran: a backend may fall back, e.g. fast-int4 -> fast-int8), and writes everything with `--json OUT`.

Not measured here: rows off the continuation path of a tree (their AR reference is another context), and the KV
entries a k-row forward leaves in the cache for later positions (the engine keeps those of accepted drafts; they
differ from AR's by the same kind of deviation, one step later).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence

import torch
from torch import nn

from verispec.backends import backend_of
from verispec.cache import CachedLM
from verispec.types import Draft

DEFAULT_KS = (1, 2, 3, 4, 8, 16)
# Tree shapes: children per node at each depth (every node at depth d has shape[d] children). (1, 1, 1, 1) is a
# chain scored through the tree mask and position ids; the others branch at every node.
DEFAULT_TREES = ((1, 1, 1, 1), (2, 2, 2), (4, 2, 2, 1))


def _module(model) -> nn.Module:
    return model if isinstance(model, nn.Module) else model.model  # a verispec LoadedModel holds it in .model


def tree_name(shape: Sequence[int]) -> str:
    return "x".join(str(int(w)) for w in shape)


def parse_tree(text: str) -> tuple[int, ...]:
    """'2x2x2' -> (2, 2, 2)."""
    shape = tuple(int(w) for w in text.lower().split("x") if w.strip())
    if not shape or min(shape) < 1:
        raise ValueError(f"bad tree shape {text!r}: need widths >= 1, e.g. 2x2x2")
    return shape


def build_tree(shape: Sequence[int], path: Sequence[int], vocab: int, g: torch.Generator
               ) -> tuple[list[int], list[int], list[int]]:
    """A full tree of `shape` whose root-to-leaf path at slot positions carries `path` (len(path) = len(shape)).

    Returns (tokens, parents, on_path): nodes in breadth-first order (parents before children, -1 = the pending
    token), siblings with distinct tokens; on_path[d] is the node index of path[d]. Each path node sits at a seeded
    random place among its siblings, so the path is not always the first row of each level.
    """
    if len(path) != len(shape):
        raise ValueError("the path must have one token per tree level")
    if max(shape) > vocab:
        raise ValueError(f"a node cannot have more than vocab = {vocab} distinct children")
    tokens: list[int] = []
    parents: list[int] = []
    on_path: list[int] = []
    level = [(-1, True)]  # (node index, on the path) of the nodes whose children come next
    for d, width in enumerate(shape):
        nxt = []
        for parent, parent_on in level:
            kids = torch.randperm(vocab, generator=g)[:width].tolist()  # distinct siblings
            slot = -1
            if parent_on:
                slot = int(torch.randint(0, width, (1,), generator=g))
                if path[d] in kids:  # keep siblings distinct: swap the path token into the chosen slot
                    kids[kids.index(path[d])] = kids[slot]
                kids[slot] = path[d]
            for j, t in enumerate(kids):
                if j == slot:
                    on_path.append(len(tokens))
                nxt.append((len(tokens), j == slot))
                tokens.append(int(t))
                parents.append(parent)
        level = nxt
    return tokens, parents, on_path


def random_ids(vocab: int, context: int, n: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    """`context` then `n` random token ids from generator g (a model's logits do not need meaningful text)."""
    ctx = torch.randint(0, vocab, (context,), generator=g).tolist()
    cont = torch.randint(0, vocab, (n,), generator=g).tolist()
    return ctx, cont


def ar_rows(lm: CachedLM, context: Sequence[int], cont: Sequence[int], n: int) -> torch.Tensor:
    """AR reference: the logits after context + cont[:j] for j = 0 .. n-1, exactly as the engine's AR path gets them.

    The engine keeps every committed token but the last in the target cache and feeds the pending one with the
    (here empty) draft, so: prefill context[:-1], then one 1-row forward per position.
    """
    lm.reset()
    lm.prefill(list(context[:-1]))
    rows = []
    for j in range(n):
        tokens = list(context) + list(cont[:j])
        rows.append(lm.score(tokens, Draft([]))[0])  # (V,) one 1-row forward
        lm.rollback(tokens)  # as the engine does after committing
    return torch.stack(rows)  # (n, V)


def chain_rows(lm: CachedLM, context: Sequence[int], cont: Sequence[int], k: int) -> torch.Tensor:
    """The k rows of one chain forward: the pending token context[-1] plus the draft cont[:k-1]."""
    lm.rollback(list(context[:-1]))  # the engine's cache state at a round start: all committed tokens but the last
    return lm.score(list(context), Draft(list(cont[:k - 1])))  # (k, V)


def tree_rows(lm: CachedLM, context: Sequence[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
    """The 1 + len(tokens) rows of one tree forward (row 0: the pending token, row 1 + i: node i)."""
    lm.rollback(list(context[:-1]))
    return lm.score(list(context), Draft(list(tokens), parents=list(parents)))  # (1 + N, V)


def compare_rows(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per-row deviation of `got` (n, V) from `ref` (n, V), as plain numbers."""
    got, ref = got.float(), ref.float()
    diff = torch.where(got == ref, 0.0, (got - ref).abs())  # (n, V) equal entries (also -inf pads) count as 0
    row_abs = diff.amax(-1)  # (n,)
    scale = ref.masked_fill(~torch.isfinite(ref), 0).abs().amax(-1).clamp_min(1e-30)  # (n,) max |AR logit|
    row_rel = row_abs / scale  # (n,)
    identical = [bool(torch.equal(a, b)) for a, b in zip(got, ref)]
    agree = (got.argmax(-1) == ref.argmax(-1)).tolist()  # (n,)
    return {"max_abs": float(row_abs.max()), "max_rel": float(row_rel.max()),
            "bit_identical": all(identical), "argmax_agree": all(agree),
            "row_max_abs": [float(x) for x in row_abs], "row_identical": identical, "row_argmax_agree": agree}


def top2_gaps(rows: torch.Tensor) -> list[float]:
    """top-1 minus top-2 logit of each row (n, V)."""
    top = rows.float().topk(2, dim=-1).values  # (n, 2)
    return [float(x) for x in top[:, 0] - top[:, 1]]


@torch.inference_mode()
def batch_invariance(model, *, context: int = 64, ks: Sequence[int] = DEFAULT_KS,
                     trees: Sequence[Sequence[int]] = DEFAULT_TREES, seed: int = 0) -> dict:
    """Largest difference between a position's logits computed alone (AR) and inside a chain / tree forward.

    model: an HF causal LM (nn.Module) or a verispec LoadedModel, on whatever backend it is on. Token ids are seeded
    random: `context` ids, then a continuation x of m = max(max ks, deepest tree) ids; AR rows at positions
    j = 0 .. m-1 (row j predicts the token after context + x[:j]).

    Returns (JSON-able):
      {"backend": backend_of(model), "context": int, "seed": int, "vocab": int,
       "chains": {str(k): {"k": k, "max_abs", "max_rel", "bit_identical", "argmax_agree",
                           "row_max_abs": [k floats], "row_identical": [k bools], "row_argmax_agree": [k bools]}},
       "trees": {"2x2x2": {"shape": [2, 2, 2], "nodes": N, "rows": 1 + N, "compared": 1 + depth,
                           ... the same fields, rows = AR positions 0 .. depth (pending token, then the path)}},
       "ar_top2_gap": [m floats], "min_top2_gap": float,
       "overall": {"max_abs", "max_rel", "chain_max_abs", "tree_max_abs", "bit_identical", "argmax_agree",
                   "min_top2_gap", "at_risk": #AR positions with top-2 gap <= 2 * max_abs > 0 (greedy could flip),
                   "ks_not_identical": [k whose chain is not bit-identical to AR]}}
    """
    ks = sorted({int(k) for k in ks})
    trees = [tuple(int(w) for w in t) for t in trees]
    if not ks or ks[0] < 1 or context < 1:
        raise ValueError("need ks >= 1 and context >= 1")
    module = _module(model)
    lm = CachedLM(module)
    vocab = lm.vocab_size
    m = max([ks[-1]] + [len(t) + 1 for t in trees])  # AR positions needed: chains use k, trees depth + 1
    g = torch.Generator().manual_seed(seed)
    ctx, cont = random_ids(vocab, context, m - 1, g)  # cont = x_0 .. x_{m-2}: the drafts and the tree path

    ar = ar_rows(lm, ctx, cont, m)  # (m, V)
    gaps = top2_gaps(ar)

    chains = {}
    for k in ks:
        got = chain_rows(lm, ctx, cont, k)  # (k, V) row i at AR position i
        chains[str(k)] = {"k": k, **compare_rows(got, ar[:k])}

    out_trees = {}
    for shape in trees:
        depth = len(shape)
        nodes, parents, on_path = build_tree(shape, cont[:depth], vocab, g)
        got = tree_rows(lm, ctx, nodes, parents)  # (1 + N, V)
        rows = got[[0] + [1 + i for i in on_path]]  # (1 + depth, V) pending token, then the continuation path
        out_trees[tree_name(shape)] = {"shape": list(shape), "nodes": len(nodes), "rows": 1 + len(nodes),
                                       "compared": 1 + depth, **compare_rows(rows, ar[:1 + depth])}
    lm.reset()  # drop the cache

    every = list(chains.values()) + list(out_trees.values())
    chain_max = max((c["max_abs"] for c in chains.values()), default=0.0)
    tree_max = max((t["max_abs"] for t in out_trees.values()), default=0.0)
    max_abs = max(chain_max, tree_max)
    min_gap = min(gaps)  # every AR position is compared with some scored row
    return {
        "backend": backend_of(module), "context": context, "seed": seed, "vocab": vocab,
        "chains": chains, "trees": out_trees, "ar_top2_gap": gaps, "min_top2_gap": min_gap,
        "overall": {
            "max_abs": max_abs, "max_rel": max(e["max_rel"] for e in every),
            "chain_max_abs": chain_max, "tree_max_abs": tree_max,
            "bit_identical": all(e["bit_identical"] for e in every),
            "argmax_agree": all(e["argmax_agree"] for e in every),
            "min_top2_gap": min_gap,
            # a tie (gap 0) is harmless when every row is bit-identical: both sides break it the same way
            "at_risk": sum(max_abs > 0 and gap <= 2 * max_abs for gap in gaps),
            "ks_not_identical": [c["k"] for c in chains.values() if not c["bit_identical"]],
        },
    }


def report(models: dict, **kwargs) -> dict[str, dict]:
    """batch_invariance for each named model (e.g. {"torch": m, "fast": apply_backend(copy.deepcopy(m), "fast")})."""
    return {name: batch_invariance(model, **kwargs) for name, model in models.items()}


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def format_table(results: dict[str, dict]) -> str:
    """Markdown, one row per backend (the results of `report`, or of `batch_invariance` keyed by name)."""
    lines = ["| backend | ran as | max abs Δ chains | max abs Δ trees | max rel Δ | bit-identical | k ≠ AR "
             "| argmax agrees | min top-2 gap | positions at risk |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        o = r["overall"]
        not_id = ",".join(str(k) for k in o["ks_not_identical"]) or "none"
        lines.append(f"| {name} | {r['backend']} | {_fmt(o['chain_max_abs'])} | {_fmt(o['tree_max_abs'])} "
                     f"| {_fmt(o['max_rel'])} | {'yes' if o['bit_identical'] else 'no'} | {not_id} "
                     f"| {'yes' if o['argmax_agree'] else 'no'} | {o['min_top2_gap']:.3g} | {o['at_risk']} |")
    return "\n".join(lines)


def format_detail(result: dict) -> str:
    """One line per chain k and tree shape: max |Δ| and whether the rows are bit-identical."""
    parts = [f"k={c['k']}: {_fmt(c['max_abs'])}{'' if c['bit_identical'] else '*'}" for c in result["chains"].values()]
    parts += [f"tree {n}: {_fmt(t['max_abs'])}{'' if t['bit_identical'] else '*'}" for n, t in result["trees"].items()]
    return "  " + ", ".join(parts) + "   (* = not bit-identical to AR)"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verispec.bench.invariance", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="registry name or local HF folder")
    ap.add_argument("--backends", default="torch,fast,fast-bf16,fast-int8,fast-int4",
                    help="comma-separated backends, each measured on its own freshly loaded model")
    ap.add_argument("--context", type=int, default=64, help="random context tokens before the scored positions")
    ap.add_argument("--ks", default=",".join(str(k) for k in DEFAULT_KS), help="comma-separated chain widths k")
    ap.add_argument("--trees", default=",".join(tree_name(t) for t in DEFAULT_TREES),
                    help="comma-separated tree shapes, children per node at each depth (e.g. 2x2x2); '' for none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the full results to this JSON file")
    args = ap.parse_args(argv)

    from verispec.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    trees = [parse_tree(t) for t in args.trees.split(",") if t.strip()]
    results: dict[str, dict] = {}
    for b in backends:
        gc.collect()  # the previous backend's model is gone: one model held at a time
        loaded = load_model(args.model, backend=b)
        ran = backend_of(loaded)
        print(f"[invariance] {b}: runs as {ran}" + ("" if ran == b else f" (requested {b})"), flush=True)
        results[b] = batch_invariance(loaded, context=args.context, ks=ks, trees=trees, seed=args.seed)
        print(format_detail(results[b]), flush=True)
        del loaded
    print(f"\n{args.model}: context {args.context}, chains k = {ks}, trees {[tree_name(t) for t in trees]}, "
          f"seed {args.seed}\n")
    print(format_table(results))
    print("\nGreedy SD equals greedy AR at a position whose top-2 gap exceeds 2 x max abs Δ; "
          "'positions at risk' counts AR positions below that.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "context": args.context, "ks": ks, "trees": [list(t) for t in trees],
                       "seed": args.seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
