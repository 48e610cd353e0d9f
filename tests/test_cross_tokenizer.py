"""`uag`: a drafter with another tokenizer (`verispec.drafters.cross_tokenizer`).

Two tokenizers built in-process that disagree at every boundary: the target's is word-level (whole words with
multi-byte characters: "é", "b🙂", split on whitespace), the drafter's byte-level BPE with merges that cross words
(" b", "a ", "ba") and split every multi-byte character into bytes. The drafter is either a random tiny Llama over
its own vocabulary or `LookupLM`, a deterministic "prompt lookup" causal LM over drafter ids: it drafts well only if
the text round trip (target ids -> text -> drafter ids -> draft text -> target ids) is right, so its acceptance
tests the alignment end to end. Tests: greedy equality with AR, the target's law under sampling at K = 2 (χ² with a
negative control), the alignment helpers on unicode and special tokens, and the errors.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

import verispec
from verispec.api import _Ctx
from verispec.cache import CachedLM
from verispec.drafters.cross_tokenizer import (CrossTokenizerDrafter, aligned_text, clean_draft_text, continuation,
                                               new_text)
from verispec.models import LoadedModel, TokenizerMismatchError
from verispec.policies import FixedGamma
from verispec.sampling import Sampling
from verispec.types import Draft
from verispec.verifiers import RejectionVerifier
from tests.conftest import tiny_llama, word_tokenizer
from tests.law import chi2_pvalue, draw, exact_law, min_detectable_tv, pooled_cells

END = "<|end|>"  # a special token both tokenizers have (as ChatML's <|im_end|> in Qwen and SmolLM2)


def word_level(words: list[str], specials: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Whole words split on whitespace (decode joins them with spaces); words[0] is the unknown word."""
    vocab = {w: i for i, w in enumerate([*words, *specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0], eos_token=specials[0] if specials else None)


def byte_bpe(merges: list[tuple[str, str]], specials: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the whole text as one piece (no regex split), so merges may cross spaces."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for s in specials:
        vocab.setdefault(s, len(vocab))
    tok = Tokenizer(models.BPE(vocab, list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0] if specials else None)


def bridging_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make a drafter piece of every space together with the byte before and the byte after it
    ("©Ġb" in "é b"; "Ġ" is the byte-level space), and nothing else: between words of 2+ bytes no drafter piece
    starts or ends where a word does, and every multi-byte character is split into its bytes."""
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pieces = [to_bytes.pre_tokenize_str(w)[0][0] for w in words]
    last, first = sorted({w[-1] for w in pieces}), sorted({w[0] for w in pieces})
    return [(a, "Ġ") for a in last] + [(a + "Ġ", b) for a in last for b in first]


WORDS = ["ab", "é", "b🙂", "ba", "aé", "ß", "中", "🙂🙂", "éa", "bé", "éé", "x中"]  # each 2+ bytes
DRAFT_MERGES = bridging_merges(WORDS)


class LookupLM(torch.nn.Module):
    """A drafter that copies: it predicts the id that followed the latest earlier occurrence of the longest suffix
    (up to 4 ids) of its context — prompt lookup as a causal LM over its tokenizer's ids. Its KV cache holds the ids
    themselves (as floats), so CachedLM's crops keep it exactly in step with what was fed."""

    def __init__(self, vocab: int, default: int = 0, memory: list[int] = ()):
        super().__init__()
        self.memory = list(memory)  # ids searched before the context (a datastore), for short prompts
        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1)
        self.head = torch.nn.Linear(1, vocab, bias=False)  # only its width is read (CachedLM's vocab_size)
        self.vocab, self.default = vocab, default

    def get_output_embeddings(self):
        return self.head

    def predict(self, ctx: list[int]) -> int:
        for n in (4, 3, 2, 1):
            tail = ctx[-n:]
            for j in range(len(ctx) - 2, n - 2, -1):  # the latest earlier occurrence
                if ctx[j - n + 1: j + 1] == tail:
                    return ctx[j + 1]
        return self.default

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1, **_):
        new = input_ids.to(torch.float32)[:, None, :, None]  # (1, 1, T, 1): the ids as "keys"
        keys, _ = past_key_values.update(new, new, 0)  # (1, 1, P + T, 1)
        ctx = keys[0, 0, :, 0].long().tolist()
        logits = torch.full((1, logits_to_keep, self.vocab), -10.0)  # (1, n, V)
        for j, t in enumerate(range(len(ctx) - logits_to_keep, len(ctx))):
            logits[0, j, self.predict(self.memory + ctx[: t + 1])] = 10.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def toks():
    return word_level(WORDS, (END,)), byte_bpe(DRAFT_MERGES, (END,))


def ctx_for(target, t_tok, drafter, d_tok, stop_ids=frozenset(), **options):
    return _Ctx(LoadedModel(target, t_tok, "tiny-target", stop_ids), LoadedModel(drafter, d_tok, "tiny-drafter"),
                stop_ids, options)


# -- alignment ---------------------------------------------------------------------------------------------------

def test_committed_text_ending_inside_a_character_is_aligned_on_the_last_whole_one():
    """Boundary (a): byte-level ids that stop inside "🙂" (4 bytes) give the text of the ids before it; the draft is
    then only what completes the character and follows it, as ids continuing *all* committed ids."""
    t_tok = byte_bpe([])
    full = t_tok("a🙂b", add_special_tokens=False)["input_ids"]  # a, 4 bytes, b
    assert len(full) == 6
    for cut in (2, 3, 4):  # 1, 2, 3 bytes of the emoji committed
        T = full[:cut]
        S, n = aligned_text(t_tok, T)
        assert (S, n) == ("a", 1)
        assert continuation(t_tok, T, S, n, "🙂b") == full[cut:]
        assert continuation(t_tok, T, S, n, "éb") == []  # the draft does not complete the committed bytes
    assert aligned_text(t_tok, full) == ("a🙂b", 6)
    assert aligned_text(t_tok, full[1:2]) == ("", 0)  # only a fragment: no text yet
    real = t_tok("x\ufffd", add_special_tokens=False)["input_ids"]  # a real U+FFFD is kept
    assert aligned_text(t_tok, real) == ("x\ufffd", len(real))


def test_draft_text_is_cut_before_an_incomplete_character(toks):
    """Boundary (b): a draft that stops inside a character keeps the text before it."""
    _, d_tok = toks
    D = d_tok("é b", add_special_tokens=False)["input_ids"]
    emoji = d_tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(emoji) == 4
    for k in (1, 2, 3):
        N = new_text(d_tok, D, emoji[:k] if k else [])
        assert N.endswith("\ufffd") and clean_draft_text(N) == ""
    N = new_text(d_tok, D, d_tok("a ", add_special_tokens=False)["input_ids"] + emoji[:2])
    assert clean_draft_text(N) == "a "
    assert new_text(d_tok, D, emoji) == "🙂"


def test_tokenisations_differ_at_every_boundary_and_the_round_trip_holds(toks):
    """No drafter piece starts or ends where a target word does (the drafter's pieces straddle every space and split
    every multi-byte character), yet at every cut of the target's ids the rest of the text, drafted in the drafter's
    pieces, comes back as exactly the rest of the target's ids."""
    t_tok, d_tok = toks
    text = "é b🙂 ba aé ß 中 🙂🙂 x中 éé bé éa"
    T = t_tok(text, add_special_tokens=False)["input_ids"]
    D = d_tok(text, add_special_tokens=False)["input_ids"]
    spans = np.cumsum([0] + [len(w.encode()) + 1 for w in text.split(" ")])  # byte offsets where words start
    t_bounds = set(spans[1:-1] - 1) | set(spans[1:-1])  # every word end and word start inside the text
    d_bounds = set(np.cumsum([len(p) for p in d_tok.convert_ids_to_tokens(D)])[:-1])  # 1 char = 1 byte here
    assert len(T) == len(text.split(" ")) and not t_bounds & d_bounds
    assert any(len(p) == 3 for p in d_tok.convert_ids_to_tokens(D))  # pieces like "©Ġb" exist
    for k in range(1, len(T)):
        S, n = aligned_text(t_tok, T[:k])
        assert n == k and text.startswith(S)
        D_k = d_tok(S, add_special_tokens=False)["input_ids"]
        assert D_k != D[: len(D_k)] or k == 0  # the drafter's pieces of the prefix differ from those in the text
        E = d_tok(text[len(S):], add_special_tokens=False)["input_ids"]  # the rest, in the drafter's pieces
        N = new_text(d_tok, D_k, E)
        assert N == text[len(S):]
        assert continuation(t_tok, T[:k], S, n, N) == T[k:]


def test_special_tokens_cross_as_text_and_map_back(toks):
    """Boundary (d): a special token both tokenizers have maps across; one only the target has is plain text to
    the drafter (no crash) and comes back to the target as its special id."""
    t_tok = word_level(WORDS, (END, "<|sys|>"))
    _, d_tok = toks
    T = t_tok(f"<|sys|> é {END} ba", add_special_tokens=False)["input_ids"]
    S, n = aligned_text(t_tok, T)
    assert S == f"<|sys|> é {END} ba" and n == len(T)
    D = d_tok(S, add_special_tokens=False)["input_ids"]
    assert d_tok.convert_tokens_to_ids(END) in D and len(D) > 8  # "<|sys|>" is bytes to the drafter
    E = d_tok(f" <|sys|> b🙂{END}", add_special_tokens=False)["input_ids"]
    N = new_text(d_tok, D, E)
    assert continuation(t_tok, T, S, n, N) == t_tok(f"<|sys|> b🙂 {END}", add_special_tokens=False)["input_ids"]


def test_mid_word_commit_drafts_a_fresh_target_token():
    """The committed ids end inside what the target's tokenizer would merge ("hel" + "lo" vs "hello"): the draft
    cannot change committed ids, so it encodes the new text on its own (a fresh token where T ends)."""
    t_tok = byte_bpe([("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("l", "o")])
    T = t_tok("he", add_special_tokens=False)["input_ids"] + t_tok("l", add_special_tokens=False)["input_ids"]
    S, n = aligned_text(t_tok, T)
    assert S == "hel"
    assert t_tok("hello", add_special_tokens=False)["input_ids"][:len(T)] != T
    assert continuation(t_tok, T, S, n, "lo") == t_tok("lo", add_special_tokens=False)["input_ids"]


def test_a_round_drafts_the_copied_text_as_target_ids_and_stops_at_the_stop(toks):
    """One propose on a repetitive text: the lookup drafter continues it in its own ids, and the draft comes back as
    the target's ids, cut to γ; at the drafter's stop token the draft ends with the target's own stop id."""
    t_tok, d_tok = toks
    text = f"é b🙂 中 ab é b🙂 中 ab é"
    T = t_tok(text, add_special_tokens=False)["input_ids"]
    lookup = LookupLM(len(d_tok))
    d = CrossTokenizerDrafter.from_ctx(_Ctx(LoadedModel(tiny_llama(len(t_tok)), t_tok, "t"),
                                            LoadedModel(lookup, d_tok, "d", frozenset({d_tok.eos_token_id})),
                                            frozenset({t_tok.eos_token_id}), {"draft_tokens": 40, "heal": 1}))
    d.prefill(T)
    draft = d.propose(T, 3, FixedGamma(3), Sampling(), None)
    assert draft.q is None and draft.tokens == t_tok("b🙂 中 ab", add_special_tokens=False)["input_ids"]
    assert len(d.propose(T, 10, FixedGamma(10), Sampling(), None).tokens) == 10
    text2 = f"ab é{END} ab é"  # the drafter copies "<|end|>" next: its stop, the target's stop id
    T2 = t_tok(text2, add_special_tokens=False)["input_ids"]
    assert d.propose(T2, 5, FixedGamma(5), Sampling(), None).tokens == [t_tok.eos_token_id]
    assert d.propose(T2, 0, FixedGamma(1), Sampling(), None).tokens == []  # the budget left no room


# -- greedy equality ---------------------------------------------------------------------------------------------

GREEDY_PROMPT = "é b🙂 中 ab ß é b🙂 中 ab ß é b🙂"


@pytest.fixture(scope="module")
def greedy_world(toks):
    t_tok, d_tok = toks
    target = LoadedModel(tiny_llama(len(t_tok), seed=1, scale=20.0), t_tok, "tiny-target")
    ar = verispec.generate(target, GREEDY_PROMPT, method="ar", max_new_tokens=40)
    return target, d_tok, ar


def test_greedy_output_is_ar_output_with_the_lookup_drafter(greedy_world):
    target, d_tok, ar = greedy_world
    drafter = LoadedModel(LookupLM(len(d_tok)), d_tok, "lookup")
    out = verispec.generate(target, GREEDY_PROMPT, method="uag", drafter=drafter, gamma=4, max_new_tokens=40,
                            draft_tokens=24, heal=1)  # heal: the drafter's last piece ("©" of "é") is re-drafted
    assert out.token_ids == ar.token_ids
    s = out.stats
    assert 0 < s.accepted < s.drafted, "drafts must be both kept and rejected for the test to mean something"
    assert s.accepted >= 10  # a right alignment lets a copying drafter be right often


def test_greedy_output_is_ar_output_with_a_random_model_drafter(greedy_world):
    target, d_tok, ar = greedy_world
    drafter = LoadedModel(tiny_llama(len(d_tok), seed=2, layers=1, hidden=16, scale=20.0), d_tok, "tiny-drafter")
    out = verispec.generate(target, GREEDY_PROMPT, method="uag", drafter=drafter, gamma=3, max_new_tokens=40)
    assert out.token_ids == ar.token_ids
    assert out.stats.drafter_forwards > 0


def test_greedy_on_a_byte_level_target_whose_text_breaks_characters(toks):
    """A byte-level target writing random bytes: its committed text ends inside characters (and holds invalid
    UTF-8) at most rounds. Nothing breaks and the output is AR's."""
    _, d_tok = toks
    t_tok = byte_bpe([("Ã", "©")])
    target = LoadedModel(tiny_llama(len(t_tok), seed=3, scale=20.0), t_tok, "bytes-target")
    prompt = "é a🙂 é a🙂 é"
    ar = verispec.generate(target, prompt, method="ar", max_new_tokens=30)
    out = verispec.generate(target, prompt, method="uag", drafter=LoadedModel(LookupLM(len(d_tok)), d_tok, "lookup"),
                            gamma=3, max_new_tokens=30, draft_tokens=12)
    assert out.token_ids == ar.token_ids


# -- sampling: the target's law at K = 2 -----------------------------------------------------------------------------

V = 3  # 27 cells of 3-token sequences: more power per draw than V = 4
LAW_WORDS = ["ab", "é", "b🙂"]
LAW_PROMPT = [1]  # one token: no prefill forward (the lookup drafter copies from its memory instead)
K = 2
N_TOKENS = K + 1  # the first round drafts K tokens (the engine caps a round at the budget left minus one)
CHI2_N = 2000  # smallest TV bias detected with power 0.9 at p < 1e-3: < 0.08 (test_the_law_test_has_power)
NEGATIVE_N = 600
SAMPLING = Sampling(temperature=1.0, seed=3)


class UniformQ(CrossTokenizerDrafter):
    """Broken on purpose: declares its deterministic drafts as drawn from the uniform law (a q it did not sample
    from, as in HF #47932), so the verifier keeps them with min(1, p / q) instead of p."""

    def propose(self, *args) -> Draft:
        d = super().propose(*args)
        return Draft(d.tokens, torch.full((len(d.tokens), V), 1.0 / V) if d.tokens else None, d.source)


@pytest.fixture(scope="module")
def law_world():
    """A word-level target over 3 words; the drafter copies from a memory of random word sequences in its own
    tokenizer, plain bytes (each multi-byte character split), so its drafts depend on the prefix and are often
    wrong."""
    t_tok, d_tok = word_level(LAW_WORDS), byte_bpe([], (END,))
    target = tiny_llama(V, seed=11, scale=4.0)
    words = np.random.default_rng(0).integers(0, V, 80)
    memory = d_tok(" ".join(LAW_WORDS[i] for i in words) + " ", add_special_tokens=False)["input_ids"]
    law = exact_law(target, LAW_PROMPT, N_TOKENS, SAMPLING)
    return target, t_tok, d_tok, memory, law


def law_job(world, cls=CrossTokenizerDrafter):
    target, t_tok, d_tok, memory, _ = world
    ctx = ctx_for(target, t_tok, LookupLM(len(d_tok), memory=memory), d_tok, draft_tokens=16)
    return lambda: (CachedLM(target), cls.from_ctx(ctx), RejectionVerifier(), FixedGamma(K))


def test_the_law_test_has_power(law_world):
    cells = pooled_cells(law_world[-1], CHI2_N)
    assert cells >= 20 and min_detectable_tv(CHI2_N, cells) < 0.08


def test_samples_follow_the_target_at_every_draft_position(law_world):
    counts, rounds = draw(law_job(law_world), CHI2_N, seed=5, n_tokens=N_TOKENS, sampling=SAMPLING,
                          prompt=LAW_PROMPT)
    assert rounds.drafted(K) > CHI2_N // 2, "draft position K was rarely reached: the test would not cover it"
    assert rounds.accepted_at(K) > 0 and rounds.rejected_at(K) > 0 and rounds.rejected_at(1) > 0
    assert chi2_pvalue(counts, law_world[-1]) > 1e-3


def test_the_same_statistic_rejects_a_wrong_draft_distribution(law_world):
    """The negative control: the same draws with drafts verified against a q they were not drawn from."""
    counts, _ = draw(law_job(law_world, UniformQ), NEGATIVE_N, seed=6, n_tokens=N_TOKENS, sampling=SAMPLING,
                     prompt=LAW_PROMPT)
    assert chi2_pvalue(counts, law_world[-1]) < 1e-6


# -- errors ------------------------------------------------------------------------------------------------------

def test_models_without_tokenizers_are_refused(greedy_world):
    target, d_tok, _ = greedy_world
    bare = tiny_llama(len(d_tok), seed=2, layers=1, hidden=16)
    with pytest.raises(ValueError, match="needs both tokenizers.*drafter"):
        verispec.generate(target, [1, 2], method="uag", drafter=bare)
    with pytest.raises(ValueError, match="needs both tokenizers.*target"):
        verispec.generate(target.model, [1, 2], method="uag", drafter=LoadedModel(bare, d_tok, "d"))
    with pytest.raises(ValueError, match="needs a drafter"):
        verispec.generate(target, [1, 2], method="uag")
    with pytest.raises(ValueError, match="draft_tokens must be an integer >= 0"):
        verispec.generate(target, [1, 2], method="uag", drafter=LoadedModel(bare, d_tok, "d"), draft_tokens=-1)


def test_other_methods_still_refuse_another_tokenizer_and_name_uag(greedy_world):
    target, d_tok, _ = greedy_world
    drafter = LoadedModel(tiny_llama(len(d_tok), seed=2, layers=1, hidden=16), d_tok, "other-tok")
    for name in ("sd", "sd-tree", "nasd+sd"):
        with pytest.raises(TokenizerMismatchError, match=re.escape('method="uag"')):
            verispec.generate(target, [1, 2], method=name, drafter=drafter, max_new_tokens=2)
    # the same pair under uag runs
    assert len(verispec.generate(target, [1, 2], method="uag", drafter=drafter, max_new_tokens=2).token_ids) == 2


def test_the_batched_engine_pairs_by_method(greedy_world):
    """The batched engine skips the same-vocabulary check for uag only."""
    from verispec.batch import BatchEngine, Request

    target, d_tok, ar = greedy_world
    eng = BatchEngine(target, LoadedModel(LookupLM(len(d_tok)), d_tok, "lookup"), method="uag", backend="torch")
    with pytest.raises(TokenizerMismatchError):
        eng.submit(Request(ar.prompt_ids, 4, method="sd"))
    (s,) = eng.run([Request(ar.prompt_ids, 12)])
    assert s.output_ids == ar.token_ids[:12]
