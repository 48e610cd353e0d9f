"""Skeleton-of-Thought (`sot-lossy`, lossy): skeleton parsing, the one-batch expansion stage on the batched engine, the
registry record and its labels, and `verispec bench --sot` — on a tiny Qwen2 (gguf backend) and a word tokenizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import verispec
from conftest import word_tokenizer
from test_native import K_QUANTS, _tiny
from verispec.backends.native import NativeLinear, to_native
from verispec.batch import BatchEngine
from verispec.kernels.ggml_blocks import decode, quantize
from verispec.models import LoadedModel
from verispec.registry import METHODS
from verispec.sampling import Sampling
from verispec.sot import EXPAND_PROMPT, SKELETON_PROMPT, parse_skeleton, render, sot

WORDS = ["<unk>", "1", "2", "3", "4", ".", ")", ":", "?"] + [f"w{i}" for i in range(55)]  # 64 = the model's vocab


@pytest.fixture(scope="module")
def tiny():
    tok = word_tokenizer(WORDS)
    target = to_native(_tiny("qwen2"), types=K_QUANTS)
    drafter = copy.deepcopy(target)  # a drafter on the same backend with a perturbed output layer
    W = target.lm_head.weight + torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.1
    drafter.lm_head = NativeLinear(decode("Q8_0", quantize(W, "Q8_0"), 256))
    return LoadedModel(target, tok, "tiny-qwen"), LoadedModel(drafter, tok, "tiny-drafter")


def _count_rounds(engine) -> list[int]:
    """The number of streams in every engine round from now on."""
    sizes: list[int] = []
    orig = engine._round

    def spy(streams):
        sizes.append(len(streams))
        return orig(streams)

    engine._round = spy
    return sizes


# -- parsing ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,points", [
    ("1. Define the term\n2. Give an example\n3. Compare", ["Define the term", "Give an example", "Compare"]),
    ("1) first\n2) second", ["first", "second"]),
    ("(1) a (2) b (3) c", ["a", "b", "c"]),  # several on one line
    ("1. a 2. b 3. c", ["a", "b", "c"]),
    ("1: x\n2: y", ["x", "y"]),
    ("**1.** Bold point\n**2.** Another one", ["Bold point", "Another one"]),
    ("Here is the outline:\n1. a\n2. b", ["a", "b"]),  # a preamble is skipped
    ("1. a\n2. b\n1. a\n2. b", ["a", "b"]),  # a restarted list ends it
    ("1. a\n2. b\nThat is all.\n3. c", ["a", "b"]),  # prose after the list ends it
    ("1. a\n3. c", ["a"]),  # numbering out of sequence ends it
    ("1. - dash point\n2. — em", ["dash point", "em"]),
])
def test_skeleton_formats_parse(text, points):
    assert parse_skeleton(text) == points


@pytest.mark.parametrize("text", ["", "no list here at all", "costs 3.5 million", "1.a 2.b", "2. starts at two"])
def test_no_numbered_point_gives_none(text):
    assert parse_skeleton(text) == []


def test_at_most_max_points():
    text = "\n".join(f"{i}. p{i}" for i in range(1, 12))
    assert parse_skeleton(text) == [f"p{i}" for i in range(1, 9)]
    assert parse_skeleton(text, max_points=3) == ["p1", "p2", "p3"]


def test_prompts_use_the_chat_template_when_there_is_one():
    tok = word_tokenizer(WORDS)
    assert render(tok, "Q", "1.") == "Q\n\n1."  # no template: plain text, then the pre-filled answer
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    assert render(tok, "Q", "1.") == "<u>Q</u><a>1."
    assert "{question}" in SKELETON_PROMPT and "{i}" in EXPAND_PROMPT and "{skeleton}" in EXPAND_PROMPT


# -- the two stages --------------------------------------------------------------------------------------------------

def test_expansion_runs_every_point_in_one_batch(tiny):
    target, _ = tiny
    engine = BatchEngine(target, None, method="ar", max_batch=8)
    sizes = _count_rounds(engine)
    r = sot(engine, "w1 w2 w3 ?", skeleton="1. w4 w5\n2. w6\n3. w7 w8", point_tokens=6)
    assert r.points == ["w4 w5", "w6", "w7 w8"] and not r.fallback and r.skeleton_tokens == 0
    assert len(r.expansions) == 3 and r.expand_tokens == [6, 6, 6]  # no newline from a word tokenizer: full budget
    assert max(sizes) == 3 and r.peak_batch == 3  # all three points in the same rounds
    assert r.rounds_expand == 6 < sum(r.expand_tokens)  # shared rounds: 6, not 18
    lines = r.text.split("\n")
    assert [ln.split(" ", 1)[0] for ln in lines] == ["1.", "2.", "3."]
    assert lines[0].startswith("1. w4 w5 ") and r.expansions[0] in lines[0]


def test_expansion_on_sd_matches_ar(tiny):
    """Any engine method may run the stages; greedy sd is lossless, so the text is the same as with ar."""
    target, drafter = tiny
    engine = BatchEngine(target, drafter, method="ar", max_batch=8)
    skeleton = "1. w4 w5\n2. w6"
    ar = sot(engine, "w1 w2 ?", skeleton=skeleton, point_tokens=8)
    sd = sot(engine, "w1 w2 ?", skeleton=skeleton, point_tokens=8, method="sd")
    assert sd.text == ar.text and sd.method == "sd" and sd.peak_batch == 2


def test_generated_skeleton_and_the_fallback(tiny):
    """A random model writes no numbered list: the answer falls back to one plain answer (one stream)."""
    target, _ = tiny
    engine = BatchEngine(target, None, max_batch=8)
    r = sot(engine, "w1 w2 w3 ?", skeleton_tokens=6, point_tokens=4, fallback_tokens=10)
    assert r.skeleton_text.startswith("1.") and r.skeleton_tokens == 6 and r.rounds_skeleton == 6
    assert r.fallback and r.points == [] and r.expand_tokens == [10] and r.peak_batch == 1
    assert r.text == r.expansions[0] and r.text
    assert r.lossy and "lossy" in r.label and r.summary()["lossy"] is True
    sampled = sot(engine, "w1 w2 w3 ?", skeleton_tokens=6, fallback_tokens=10, sampling=Sampling(1.0, seed=4))
    again = sot(engine, "w1 w2 w3 ?", skeleton_tokens=6, fallback_tokens=10, sampling=Sampling(1.0, seed=4))
    assert sampled.text == again.text  # seeded


def test_bad_arguments(tiny):
    engine = BatchEngine(tiny[0], None, max_batch=2)
    with pytest.raises(ValueError, match="point_tokens"):
        sot(engine, "w1", point_tokens=0)
    no_tok = BatchEngine(LoadedModel(tiny[0].model, None, "no-tokenizer"), None, max_batch=2)
    with pytest.raises(ValueError, match="tokenizer"):
        sot(no_tok, "w1")


# -- the registry and the labels ---------------------------------------------------------------------------------------

def test_registry_record_is_lossy():
    m = METHODS["sot-lossy"]
    assert m.kind == "baseline" and m.lossless is False and m.loaded_model and m.name.endswith("-lossy")
    assert "LOSSY" in m.summary and m.paper.startswith("Ning")
    from verispec.registry import describe

    assert "| `sot-lossy` | baseline | no |" in describe()


def test_generate_runs_it_and_labels_it_lossy(tiny):
    out = verispec.generate(tiny[0], "w1 w2 w3 ?", method="sot-lossy", max_new_tokens=12, skeleton_tokens=4,
                            point_tokens=3)
    s = out.stats
    assert s.method == "sot-lossy" and s.extra["lossy"] is True and "lossy" in s.extra["label"]
    assert 0 < len(out.token_ids) <= 12 and s.new_tokens == len(out.token_ids)
    assert s.summary()["method"] == "sot-lossy" and s.summary()["lossy"] is True
    with pytest.raises(ValueError, match="unknown option"):
        verispec.generate(tiny[0], "w1", method="sot-lossy", gamma_max=3)


def test_the_bench_refuses_it_on_the_lossless_path_and_runs_it_with_sot(folders, capsys):
    from verispec.cli import main

    assert main(["bench", "--target", str(folders / "t"), "--methods", "ar,sot-lossy", "--dataset",
                 str(folders / "p.jsonl"), "--out", str(folders / "x")]) == 2
    assert "verispec bench --sot" in capsys.readouterr().err
    out = folders / "sot"
    assert main(["bench", "--sot", "--target", str(folders / "t"), "--dataset", str(folders / "p.jsonl"),
                 "--prompts", "2", "--max-new-tokens", "6", "--sot-skeleton-tokens", "4", "--sot-point-tokens", "3",
                 "--out", str(out)]) == 0
    md = (out / "sot.md").read_text()
    assert "**sot-lossy (lossy)**" in md and "Lossy" in md and "chrF" in md
    s = json.loads((out / "sot.json").read_text())
    assert s["lossy"] is True and len(s["rows"]) == 2 and s["config"]["baselines"] == ["ar"]
    for r in s["rows"]:
        assert r["sot"]["lossy"] is True and r["plain"]["ar"]["tokens"] == 6 and r["sot"]["text"]
        assert r["chrf_vs_ar"] is None or 0 <= r["chrf_vs_ar"] <= 100
