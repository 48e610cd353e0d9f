"""Universal assisted generation (UAG): a draft model with *another tokenizer* drafts through text.

Timor et al. 2025, "Accelerating LLM Inference with Lossless Speculative Decoding Algorithms for Heterogeneous
Vocabularies" (ICML 2025; its string-level alignment, "SLEM"); the transformers blog "Universal Assisted Generation:
Faster Decoding with Any Assistant Model" (Hugging Face, 2024) and transformers'
`AssistedCandidateGeneratorDifferentTokenizers`. The token-level alignment ("TLI") line of work replaces the text
round trip by a vocabulary intersection; here the round trip is kept, so any two tokenizers pair.

Each round:
  1. S = the target tokenizer's decode of the committed target ids T (aligned, see (a) below);
  2. D = the drafter tokenizer's encode of S; the drafter (a CachedLM whose rollback keeps the longest common prefix
     of ids, so re-encoding the whole text each round refeeds only the tail that changed) drafts greedily up to
     `draft_tokens` drafter tokens E after D (less its last `heal` pieces, see "last word" below);
  3. N = the text E adds after D; X = the target ids that continue T with the text N, cut to γ;
  4. X is proposed as a deterministic draft, Draft(X, q=None).

Why it is lossless, greedy *and* sampling: X is a deterministic function of the committed tokens (the drafter drafts
greedily and the tokenizers are deterministic), so given the prefix it is independent of the randomness the verifier
uses this round. A deterministic draft is verified as a one-hot q by the rejection verifier: draft x_i is kept with
probability min(1, p(x_i) / 1) = p(x_i), and at a rejection the recovered token is drawn from
norm(max(0, p − onehot(x_i))) = p restricted to y ≠ x_i, renormalised. So the token emitted at that position is y
with probability p(x_i)·[y = x_i] + (1 − p(x_i))·p(y)/(1 − p(x_i))·[y ≠ x_i] = p(y), the target's law; by induction
over positions (each later draft again depends only on the tokens committed before it) the whole output has the
target's law. Greedy is the limit p = one-hot(argmax): a draft is kept iff it is the target's argmax, and the
recovered token is the argmax, so the output is token for token AR's. Nothing below — alignment, re-tokenisation,
where the draft is cut — can change what is emitted, only how many drafts are kept.

Boundaries (each can only cost acceptance, never correctness):
  (a) committed text ending inside a UTF-8 character (byte-level BPE emits a character's bytes as separate tokens;
      decode gives U+FFFD): the drafter is given the text of the longest prefix T[:n] that decodes cleanly; the draft
      is then taken only where the target's encoding of S + N starts with *all* of T (its first ids complete the
      character), otherwise the round proposes nothing;
  (b) draft text: anything from the first U+FFFD on (the drafter stopped inside a character) is dropped;
  (c) the draft stops at the drafter's stop tokens; the stop itself is proposed only where its text is, for the
      target's tokenizer, exactly one of the target's stop tokens (ChatML's <|im_end|> in SmolLM2 and Qwen);
  (d) special tokens: text is decoded with special tokens kept and encoded with the tokenizer's own special-token
      matching, so a special token the two tokenizers share maps across and any other one is plain text there;
  (e) `draft_tokens` drafter tokens at most per round (default 2γ + 2, as tokenisations differ in length); drafting
      ends early once the draft text already spells γ + 1 target tokens (γ settled ones), and the draft is cut to γ.

The drafter's tokenisation of the committed text's *last word* can differ from the one it gets once more text
follows (S = "…def fo" encodes "fo" alone; with "o(x)" after it the drafter would have "foo"; a tokenizer whose
pieces carry the space after a word ends every text on a piece it would not use mid-text). Conditioned on that
non-canonical tail, a drafter predicts worse; next round the re-encoding changes at the tail, and its cache refeeds
from there only. Option `heal=h` (0 by default, "token healing") backs off the drafter's last h pieces: it drafts
from D minus those pieces, and its draft counts only where its text re-spells the backed-off text first (then N is
the text after it). That helps where the tail's pieces change with what follows (tokenizers whose pieces carry the
space after a word) but costs a drafter forward a round, and a greedy drafter that disagrees with the committed
last piece (after every rejection it would re-draft the rejected token) loses the round, so it is off by default.
The same holds on the target side: the committed ids T are fixed, so the draft must start a fresh target token where
T ends. If the target's encoding of S + N begins with T the draft is its remaining ids (merges across the boundary
that would need T changed cannot happen); otherwise (T ends mid-word, or T is not the target tokenizer's own
encoding of S) N is encoded on its own. All of this only moves acceptance.

The draft-length policy picks γ (next_gamma, update); its in-round stop rule is not asked, as it reads drafter
distributions over the target's vocabulary, which this drafter does not have.
"""

from __future__ import annotations

import torch

from verispec.cache import CachedLM
from verispec.drafters.base import ModelDrafter
from verispec.types import Draft
from verispec.validate import check_int

REPLACEMENT = "\ufffd"  # what decode writes for the bytes of an incomplete UTF-8 character
MAX_BACK = 8  # tokens dropped at most to find a clean text boundary (a character has <= 4 bytes)
WINDOW = 8  # drafter tokens decoded before the new ones, so a tokenizer's start-of-text rules do not touch N


def encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    # a fast tokenizer's Rust backend directly: the same ids as tokenizer(text), without ~0.2 ms of Python a call
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer, ids: list[int]) -> str:
    # special tokens kept (their text maps across, boundary (d)); no clean-up, so decode(ids[:n]) is a prefix of
    # decode(ids) for byte-level and word-level tokenizers alike
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode(list(ids), skip_special_tokens=False)
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def aligned_text(tokenizer, T: list[int]) -> tuple[str, int]:
    """(S, n): S the text of T[:n], n the largest count (>= len(T) - MAX_BACK) whose text does not end inside a
    UTF-8 character. A final U+FFFD whose text re-encodes to T's last ids is a real one (the bytes of an incomplete
    character re-encode as U+FFFD's own three bytes instead); so is one that is still there after MAX_BACK ids."""
    S = decode(tokenizer, T)
    k = min(len(T), 4)
    if not S.endswith(REPLACEMENT) or encode(tokenizer, S)[-k:] == T[-k:]:
        return S, len(T)
    for n in range(len(T) - 1, max(len(T) - MAX_BACK, 0) - 1, -1):
        S_n = decode(tokenizer, T[:n])
        if not S_n.endswith(REPLACEMENT):
            return S_n, n
    return S, len(T)


def clean_draft_text(N: str) -> str:
    """Boundary (b): the draft text up to its first U+FFFD (the drafter stopped inside a character)."""
    i = N.find(REPLACEMENT)
    return N if i < 0 else N[:i]


def new_text(tokenizer, D: list[int], E: list[int]) -> str:
    """The text drafter ids E add after D. Decoded with a window of D before them, so a tokenizer's start-of-text
    rules (SentencePiece drops a leading space) and bytes merging across the boundary come out right. Where D ends
    inside a character (a healed tail can), the text starts with that whole character, as E completes it."""
    if not E:
        return ""
    w = D[-WINDOW:]
    base, full = decode(tokenizer, w).rstrip(REPLACEMENT), decode(tokenizer, w + E)
    return full[len(base):] if full.startswith(base) else decode(tokenizer, E)


def continuation(tokenizer, T: list[int], S: str, n: int, N: str) -> list[int]:
    """Target ids that follow the committed ids T with the text N, where S is the text of T[:n] (n < len(T): T
    ends inside a character). The target's encoding of S + N when it begins with all of T (then its remaining ids
    spell N exactly); else N encoded on its own where T ends on a character boundary (T's last token is fixed, so
    the target starts a fresh token there), and nothing where it does not."""
    if not N:
        return []
    Y = encode(tokenizer, S + N)
    if Y[: len(T)] == T:
        return Y[len(T):]
    return encode(tokenizer, N) if n == len(T) else []


def check_tokenizers(target, drafter) -> None:
    """A cross-tokenizer drafter re-tokenises text both ways: both models need their tokenizer."""
    for role, m in (("target", target), ("drafter", drafter)):
        tok = getattr(m, "tokenizer", None)
        if tok is None or not (callable(tok) and hasattr(tok, "decode")):
            raise ValueError(f"method 'uag' drafts through text and needs both tokenizers, but the {role} "
                             f"{getattr(m, 'name', 'model')!r} has none: load it by name or folder, or pass a "
                             f"LoadedModel(model, tokenizer)")


class CrossTokenizerDrafter(ModelDrafter):
    name = "uag"

    def __init__(self, model: torch.nn.Module, target_tokenizer, drafter_tokenizer, vocab_size: int,
                 stop_ids: frozenset[int] = frozenset(), drafter_stop_ids: frozenset[int] = frozenset(),
                 draft_tokens: int = 0, heal: int = 0):
        self.lm = CachedLM(model, lean=True)  # the drafter's own vocabulary: its ids never reach the verifier
        self.tok_t, self.tok_d = target_tokenizer, drafter_tokenizer
        self.V = vocab_size  # the target's: draft ids at or above it are cut off
        self.V_d = min(self.lm.vocab_size, len(drafter_tokenizer))  # padded output rows are never drafted
        self.draft_tokens = check_int("draft_tokens", draft_tokens, 0)
        self.heal = check_int("heal", heal, 0)
        self.drafter_stop_ids = frozenset(drafter_stop_ids)
        # Boundary (c): a drafter stop token is proposed where its text is, for the target, one target stop token.
        self.stop_map: dict[int, int] = {}
        for s in self.drafter_stop_ids:
            ids = encode(target_tokenizer, decode(drafter_tokenizer, [s]))
            if len(ids) == 1 and ids[0] in stop_ids and ids[0] < vocab_size:
                self.stop_map[s] = ids[0]
        # A drafter trained with a BOS token sees it before the text, as its tokenizer would add it.
        bos = getattr(drafter_tokenizer, "bos_token_id", None)
        with_special = drafter_tokenizer("x", add_special_tokens=True)["input_ids"]
        self.bos = [bos] if bos is not None and with_special[:1] == [bos] else []

    @classmethod
    def from_ctx(cls, ctx) -> "CrossTokenizerDrafter":
        check_tokenizers(ctx.target, ctx.drafter)
        return cls(ctx.drafter.model, ctx.target.tokenizer, ctx.drafter.tokenizer, ctx.target.vocab_size,
                   ctx.stop_ids, ctx.drafter.stop_ids, **ctx.options)

    def drafter_ids(self, tokens: list[int]) -> tuple[list[int], str, str, int]:
        """(D0, tail, S, n): S the aligned text of the committed target ids tokens[:n], encoded by the drafter as
        D0 + its last `heal` pieces; `tail` is the text of those pieces, which the drafter drafts again (healing)."""
        S, n = aligned_text(self.tok_t, tokens)
        D = self.bos + encode(self.tok_d, S) if S else []
        h = min(self.heal, len(D) - 1)  # keep one id at least to condition on
        if h <= 0:
            return D, "", S, n
        return D[:-h], new_text(self.tok_d, D[:-h], D[-h:]), S, n

    def prefill(self, tokens):
        # the same text path as propose, so the first round feeds only the last conditioning id
        self.lm.reset()
        D0 = self.drafter_ids(tokens)[0]
        self.lm.prefill(D0[:-1])
        self.prefill_forwards = self.lm.forwards

    def propose(self, tokens, gamma, policy, sampling, generator) -> Draft:
        if gamma <= 0:
            return Draft([], None, self.name)
        D0, tail, S, n = self.drafter_ids(tokens)
        if not D0:  # nothing the drafter could condition on (no whole character of text so far)
            return Draft([], None, self.name)
        E: list[int] = []
        stop = None
        for _ in range(self.draft_tokens or 2 * gamma + 2):
            logits = self.lm.forward(D0 + E, n_logits=1)  # (1, V_d): feeds only what the cache lacks
            e = int(logits[0, : self.V_d].argmax())  # greedy: the draft is a function of the prefix alone
            if e in self.drafter_stop_ids:
                stop = e
                break
            E.append(e)
            raw = new_text(self.tok_d, D0, E)
            text = clean_draft_text(raw)
            if raw[len(text):].strip(REPLACEMENT):
                break  # a broken character with text after it: nothing from it on is used
            if not text.startswith(tail):
                if not tail.startswith(text):
                    break  # it contradicts the committed text: nothing it drafts from here is used
            elif len(encode(self.tok_t, text[len(tail):])) > gamma:
                break  # γ + 1 target tokens spelled: the first γ are settled
        full = new_text(self.tok_d, D0, E)
        clean = clean_draft_text(full)
        if not clean.startswith(tail):
            return Draft([], None, self.name)
        X = continuation(self.tok_t, tokens, S, n, clean[len(tail):])
        if stop in self.stop_map and clean == full and len(X) < gamma:
            X.append(self.stop_map[stop])
        cut = next((i for i, x in enumerate(X) if not 0 <= x < self.V), len(X))  # ids the target cannot score
        return Draft(X[: min(cut, gamma)], None, self.name)

    def commit(self, tokens, draft, result):
        """Nothing to roll back here: the drafter's cache is in drafter ids, and the next forward crops it to the
        longest prefix it shares with the re-encoded text (ModelDrafter's rollback to target ids would empty it)."""
