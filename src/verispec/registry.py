"""The registry of decoding methods and draft-length policies: what each is, what it needs, which options it takes.

One record per method: verispec's speculative methods (each one file under `drafters/`), the baselines (`ar`,
`beam`) and the benchmark peers (other engines' own generation, run by `verispec bench`). The API builds methods
from it, routes each option to the method or to the policy by these lists (never by reading constructor
signatures), the CLI lists its choices from it, the benchmark asks it whether a method uses a draft model, and the
contract tests (`tests/test_contract.py`) run every registered lossless method. Factories are named as
"module:attribute" and imported only when used, so reading the registry stays cheap (`verispec --help`).

Adding a method: one file under `drafters/` (or `policies/`) and one record here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


def _resolve(ref: str):
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Method:
    """One decoding method.

    kind: "speculative" (drafts, then verifies with the target: the engine loop), "baseline" (a different decoding
    rule on the target alone, e.g. beam search) or "peer" (another engine's own generation, benchmark only).
    build: for speculative methods a factory `(ctx) -> Drafter`; for baselines a function of the target (its module;
    with loaded_model=True the LoadedModel, tokenizer included, and a `sampling=` keyword);
    for peers the benchmark's runner. lossless: keeps the target's distribution exactly (greedy: AR's tokens).
    """

    name: str
    kind: str
    build: str
    summary: str
    paper: str = ""
    options: tuple[str, ...] = ()
    needs_draft_model: bool = False
    needs_training: bool = False
    tree: bool = False  # may propose token trees
    lossless: bool = True
    loaded_model: bool = False  # a baseline called with the LoadedModel (tokenizer included) and the sampling
    # A drafter with any tokenizer (it drafts through text): the API skips the same-vocabulary check for it and asks
    # for both tokenizers instead.
    any_tokenizer: bool = False

    def load(self):
        return _resolve(self.build)


@dataclass(frozen=True)
class Policy:
    """One draft-length policy; `gamma_option` is the option that `gamma=` (the CLI's --gamma) seeds."""

    name: str
    build: str
    summary: str
    options: tuple[str, ...]
    gamma_option: str
    paper: str = ""

    def load(self):
        return _resolve(self.build)


NGRAM_OPTIONS = ("max_n", "max_contexts", "max_continuations", "min_context", "min_count")
PEER_OPTIONS = ("kernels",)  # kernels=verispec: HF's algorithm on verispec's converted models (a labelled variant)

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("ar", "speculative", "verispec.drafters.base:NoDrafter.from_ctx",
           "plain autoregressive decoding with a KV cache (the baseline every ratio is against)"),
    Method("sd", "speculative", "verispec.drafters.draft_model:DraftModelDrafter.from_ctx",
           "a small draft model sharing the target's vocabulary", "Leviathan et al. 2023; Chen et al. 2023",
           options=("draft_vocab", "vocab_corpus"), needs_draft_model=True),
    Method("nasd", "speculative", "verispec.drafters.ngram:NGramDrafter.from_ctx",
           "an n-gram store over prompt + output, back-off to the 1-token context", "N-gram assisted SD",
           options=NGRAM_OPTIONS),
    Method("pld", "speculative", "verispec.drafters.prompt_lookup:PromptLookupDrafter.from_ctx",
           "copies the continuation of the last n-gram found in the prompt / output", "Saxena 2023",
           options=("max_ngram_size", "min_ngram_size", "num_pred_tokens", "search_generated")),
    Method("nasd+sd", "speculative", "verispec.drafters.hybrid:HybridDrafter.from_ctx",
           "n-gram continuation when confident, the draft model otherwise", "mixed draft source",
           options=NGRAM_OPTIONS, needs_draft_model=True),
    Method("sd-tree", "speculative", "verispec.drafters.draft_tree:DraftTreeDrafter.from_ctx",
           "the draft model grows a token tree per round: sampled children (without replacement or i.i.d.) "
           "or EAGLE-2's top-k expansion", "Miao et al. 2024 (SpecInfer); Jeon et al. 2024; Li et al. 2024 (EAGLE-2)",
           options=("tree", "children", "top_k", "nodes"), needs_draft_model=True, tree=True),
    Method("cascade", "speculative", "verispec.drafters.cascade:CascadeDrafter.from_ctx",
           "cascade drafting: the draft model is itself speculated by a free statistical drafter (vertical, "
           "inner=pld|nasd|none), and the positions after the first `horizontal` come from that drafter",
           "Chen et al. 2024 (CS Drafting); Spector & Ré 2023",
           options=("inner", "inner_gamma", "horizontal", "lower", "draft_vocab", "vocab_corpus"),
           needs_draft_model=True),
    Method("staged", "speculative", "verispec.drafters.staged:StagedDrafter.from_ctx",
           "staged speculation: the draft model's chain (itself speculated by prompt lookup / n-grams) plus "
           "sibling leaves at the first depths, verified as one token tree", "Spector & Ré 2023",
           options=("inner", "inner_gamma", "width", "branch_depth", "draft_vocab", "vocab_corpus"),
           needs_draft_model=True, tree=True),
    Method("layer-skip", "speculative", "verispec.drafters.layer_skip:LayerSkipDrafter.from_ctx",
           "self-speculation: the target with some decoder layers skipped drafts for itself (the same weights; "
           "skip=auto: the set `verispec train layer-skip` searched, else block influence on the first prompt)",
           "Zhang et al. 2024 (Draft & Verify); Xia et al. 2025 (SWIFT)", options=("skip", "ratio")),
    Method("uag", "speculative", "verispec.drafters.cross_tokenizer:CrossTokenizerDrafter.from_ctx",
           "universal assisted generation: a draft model with ANOTHER tokenizer drafts greedily through text (the "
           "committed text re-encoded for it, its draft text re-encoded for the target); lossless greedy and "
           "sampling", "Timor et al. 2025; transformers UAG (2024)", options=("draft_tokens", "heal"),
           needs_draft_model=True, any_tokenizer=True),
    Method("osd", "speculative", "verispec.drafters.online:OnlineDrafter.from_ctx",
           "online speculative decoding: the draft model distilled in the background (LoRA; forward KL or JSD) on the "
           "target's distributions where its drafts were rejected, every `update_every` requests; versioned "
           "checkpoints, `version=` reloads one", "Liu et al. 2024 (OSD)",
           options=("update_every", "loss", "positions", "lr", "steps", "lora_rank", "train_layers", "teacher_top_k",
                    "buffer_size", "checkpoint_dir", "background", "train_source", "learn", "version"),
           needs_draft_model=True),
    Method("medusa", "speculative", "verispec.drafters.medusa:MedusaDrafter.from_ctx",
           "Medusa-1 heads on the target's last hidden state draft a token tree (medusa_choices; trained by "
           "`verispec train medusa`, heads=PATH|NAME); verifier=typical-lossy for Medusa's lossy typical acceptance",
           "Cai et al. 2024 (Medusa)", options=("heads", "tree", "weights"), needs_training=True, tree=True),
    Method("blockwise", "speculative", "verispec.drafters.blockwise:BlockwiseDrafter.from_ctx",
           "blockwise parallel decoding: k proposal heads on the target's last hidden state draft a chain (trained by "
           "`verispec train blockwise`, heads=PATH|NAME); the longest agreeing prefix is kept",
           "Stern et al. 2018", options=("heads", "weights"), needs_training=True),
    Method("eagle", "speculative", "verispec.drafters.eagle:EagleDrafter.from_ctx",
           "EAGLE: one trained decoder layer drafts at the feature level on the target's hidden states (EAGLE-1: "
           "its final feature; EAGLE-3: three fused layer inputs), grown as an EAGLE-2 dynamic tree (top_k, nodes; "
           "tree=chain for a chain); trained by `verispec train eagle`, heads=PATH|NAME",
           "Li et al. 2024 (EAGLE, EAGLE-2); Li et al. 2025 (EAGLE-3)", options=("heads", "tree", "top_k", "nodes", "weights"),
           needs_training=True, tree=True),
    Method("parallelspec", "speculative", "verispec.drafters.parallelspec:ParallelSpecDrafter.from_ctx",
           "ParallelSpec: the draft model reads k − 1 trained mask tokens after the pending token and drafts k tokens "
           "in ONE forward (its weights unchanged; masks and per-mask residual blocks trained by `verispec train "
           "parallelspec`, heads=PATH|NAME)", "Xiao et al. 2024 (ParallelSpec); An et al. 2025 (PARD)",
           options=("heads", "draft_vocab", "vocab_corpus"), needs_draft_model=True, needs_training=True),
    Method("rest", "speculative", "verispec.drafters.rest:RestDrafter.from_ctx",
           "exact-match retrieval from a suffix-array datastore; a chain, or a token tree with tree_nodes=N",
           "He et al. 2024", options=("datastore", "max_suffix", "min_suffix", "max_occurrences", "tree_nodes"),
           tree=True),
    Method("lookahead", "speculative", "verispec.drafters.lookahead:LookaheadDrafter.from_ctx",
           "no drafter: a Jacobi window in the target's own forward fills an n-gram pool, verified as a tree",
           "Fu et al. 2024", options=("window", "ngram", "guesses", "pool_from_text", "seed"), tree=True),
    Method("beam", "baseline", "verispec.beam:beam_search",
           "beam search on the target (a different decoding rule, not speculative)",
           options=("num_beams", "length_penalty"), lossless=False),
    # Lossy by construction (it writes another answer than the target's): named "-lossy", never compared with AR for
    # losslessness; `verispec bench --sot` reports its latency and its similarity to AR's answer.
    Method("sot-lossy", "baseline", "verispec.sot:run_sot",
           "Skeleton-of-Thought, LOSSY: an outline of short points, then every point written out in one batch on "
           "the batched engine", "Ning et al. 2024", options=("skeleton_tokens", "point_tokens", "max_points"),
           lossless=False, loaded_model=True),
    Method("hf-ar", "peer", "verispec.bench.peers:run_hf", "transformers' own generate(), plain decoding",
           options=PEER_OPTIONS),
    Method("hf-assisted", "peer", "verispec.bench.peers:run_hf",
           "transformers' assisted generation with the draft model (its own schedule unless gamma=)",
           options=("gamma", *PEER_OPTIONS), needs_draft_model=True),
    Method("hf-pld", "peer", "verispec.bench.peers:run_hf", "transformers' prompt lookup decoding",
           options=("num_tokens", "ngram", *PEER_OPTIONS)),
    # llama.cpp runs its own kernels on the GGUF file (and verifies a draft in one batch, not bit-identical to one
    # token at a time), so its greedy tokens can differ from verispec's AR: lossless=False, the same rule on other
    # arithmetic. `verispec build-llamacpp` first; unbuilt, they are skipped.
    Method("llamacpp-ar", "peer", "verispec.bench.llamacpp:run_llamacpp",
           "llama.cpp's llama-server on the target's GGUF file, plain decoding", lossless=False),
    Method("llamacpp-sd", "peer", "verispec.bench.llamacpp:run_llamacpp",
           "llama.cpp's own draft-model speculation (llama-server -md, its defaults unless draft_max= / draft_min= / "
           "p_min=)", options=("draft_max", "draft_min", "p_min"), needs_draft_model=True, lossless=False),
]}

POLICIES: dict[str, Policy] = {p.name: p for p in [
    Policy("fixed", "verispec.policies.fixed:FixedGamma", "a fixed γ", ("gamma",), "gamma",
           "Leviathan et al. 2023"),
    Policy("egag", "verispec.policies.egag:EGAG", "entropy-guided γ = ⌊(1 − H/log V)·γ_max⌋",
           ("gamma_max", "gamma_min", "mode", "ema", "consistent", "threshold"), "gamma_max"),
    Policy("heuristic", "verispec.policies.heuristic:Heuristic", "HF's +2 / −1 schedule", ("gamma", "gamma_max"),
           "gamma"),
    Policy("confidence", "verispec.policies.confidence:Confidence", "stop below a top-probability threshold",
           ("threshold", "gamma_max", "consistent"), "gamma_max"),
    Policy("adaedl", "verispec.policies.adaedl:AdaEDL", "stop when an entropy bound on acceptance drops",
           ("gamma_max", "lam", "eps", "margin", "ema", "eps_min", "eps_max"), "gamma_max",
           "Agrawal et al. 2024"),
    Policy("cost", "verispec.policies.cost:CostAware",
           "cost-aware: the length maximising expected tokens / s from measured T(k), draft cost and per-position "
           "acceptance (estimate=entropy: a calibrated EGAG, acceptance from the drafter's entropy by an online fit)",
           ("gamma_max", "estimate", "alpha", "prior_weight", "decay", "c", "slope", "verify_cost", "draft_cost"),
           "gamma_max", "Leviathan et al. 2023 (Sec. 3.4), measured"),
]}


@dataclass(frozen=True)
class VerifierRecord:
    """One verification rule (rejection and block send token trees to the multi-step tree rule; traversal verifies
    trees itself)."""

    name: str
    build: str
    summary: str
    paper: str = ""
    lossless: bool = True  # False: the rule changes the output distribution (its name says "lossy")

    def load(self):
        return _resolve(self.build)


VERIFIERS: dict[str, VerifierRecord] = {v.name: v for v in [
    VerifierRecord("rejection", "verispec.verifiers.rejection:RejectionVerifier",
                   "token-level speculative sampling: keep x_i with min(1, p/q), stop at the first rejection",
                   "Leviathan et al. 2023; Chen et al. 2023"),
    VerifierRecord("block", "verispec.verifiers.block:BlockVerifier",
                   "block verification: how much of the chain to keep is decided jointly (never fewer tokens)",
                   "Sun et al. 2025"),
    VerifierRecord("traversal", "verispec.verifiers.traversal:TraversalVerifier",
                   "traversal verification: token trees decided leaf to root as whole sequences (block verification "
                   "on a chain)", "Weng et al. 2025"),
    # LOSSY: accepts tokens the target finds typical enough; exact under greedy decoding only.
    VerifierRecord("typical-lossy", "verispec.verifiers.typical:TypicalVerifier",
                   "Medusa's typical acceptance, LOSSY: keep x if p(x) > min(0.09, 0.3·exp(−H(p))); exact only under "
                   "greedy decoding", "Cai et al. 2024 (Medusa)", lossless=False),
]}


def verifier(name: str) -> VerifierRecord:
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {', '.join(VERIFIERS)}")
    return VERIFIERS[name]


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]


def route_options(m: Method, p: Policy | None, options: dict) -> tuple[dict, dict]:
    """Split options into (method options, policy options) by the records' own lists; anything else is an error
    that names what each takes (a typo would otherwise be ignored silently)."""
    mine = {k: v for k, v in options.items() if k in m.options}
    theirs = {k: v for k, v in options.items() if p is not None and k in p.options and k not in mine}
    unknown = sorted(set(options) - set(mine) - set(theirs))
    if unknown:
        takes = f"method {m.name!r} takes: {', '.join(m.options) or 'none'}"
        if p is not None:
            takes += f"; policy {p.name!r} takes: {', '.join(p.options)}"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {m.name!r}; {takes}")
    return mine, theirs


def describe() -> str:
    """A table of every method and policy (for `verispec methods`)."""
    lines = ["| method | kind | lossless | needs | options | reference |", "|---|---|---|---|---|---|"]
    for m in METHODS.values():
        draft = "draft model (any tokenizer)" if m.any_tokenizer else "draft model"
        needs = ", ".join(n for n, f in ((draft, m.needs_draft_model), ("training", m.needs_training),
                                          ("token trees", m.tree)) if f) or "—"
        lines.append(f"| `{m.name}` | {m.kind} | {'yes' if m.lossless else 'no'} | {needs} | "
                     f"{', '.join(m.options) or '—'} | {m.paper or '—'} |")
    lines += ["", "| policy | what it does | options (`--gamma` seeds) |", "|---|---|---|"]
    for p in POLICIES.values():
        lines.append(f"| `{p.name}` | {p.summary} | {', '.join(p.options)} ({p.gamma_option}) |")
    lines += ["", "| verifier (`verifier=`) | rule | reference |", "|---|---|---|"]
    for v in VERIFIERS.values():
        lines.append(f"| `{v.name}` | {v.summary} | {v.paper} |")
    return "\n".join(lines)
