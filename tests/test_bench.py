"""Benchmark harness: metric arithmetic, token-counting parity, report rendering from saved rows."""

from __future__ import annotations

import json

import pytest

from verispec.bench.costmodel import (conditional_acceptance, expected_tokens, expected_tokens_by_position,
                                      optimal_gamma, predict, speedup, verify_ratio)
from verispec.bench.datasets import DATASETS, humaneval, load_prompts
from verispec.bench.methods import parse_methods
from verispec.bench.metrics import aggregate
from verispec.bench.report import render
from verispec.bench.runner import run_bench
from verispec.cli import main


def row(pid, method, t, steps=None, tokens=None, repeat=0, ids=None):
    d, a = (list(x) for x in zip(*steps)) if steps else ([], [])
    n = tokens if tokens is not None else sum(a) + len(d)
    return {"prompt_id": pid, "category": "c", "method": method, "repeat": repeat, "new_tokens": n, "t_total": t,
            "token_ids": ids or list(range(n)), "target_tokens_processed": 10 + n, "drafter_tokens_processed": 0,
            "target_forwards": len(d), "drafter_forwards": sum(d), "t_draft": 0.0, "t_verify": 0.0,
            "t_other": 0.0, "t_prefill": 0.0,
            "steps": {"d": d, "a": a, "k": "".join("b" if x == y else "r" for x, y in zip(d, a))} if steps else None}


def test_metric_arithmetic_on_hand_computed_step_logs():
    # Two prompts. Step logs (drafted, accepted): p1: (4,4) (4,1) (4,0); p2: (2,2) (4,3).
    sd = [row("p1", "sd", 2.0, [(4, 4), (4, 1), (4, 0)]), row("p2", "sd", 1.0, [(2, 2), (4, 3)])]
    ar = [row("p1", "ar", 4.0, tokens=8), row("p2", "ar", 4.0, tokens=7)]
    m = aggregate(sd, ar)
    assert m["drafted"] == 18 and m["accepted"] == 10
    assert m["acceptance_rate"] == pytest.approx(10 / 18)
    assert m["mat"] == pytest.approx((10 + 5) / 5)  # every step adds one recovered or bonus token
    assert m["new_tokens"] == 15
    assert m["mean_gamma"] == pytest.approx(18 / 5)
    # position 1: drafted in 5 steps, accepted in 4 (all but (4,0)); position 3: drafted 4, accepted 2 ((4,4),(4,3))
    assert m["acceptance_by_position"] == pytest.approx([4 / 5, 3 / 5, 2 / 4, 1 / 4])
    assert m["gamma_histogram"] == {"2": 1, "4": 4}
    assert m["speedup"] == pytest.approx(8.0 / 3.0)
    assert m["speedup_spread"]["of"] == "prompts"
    assert (m["speedup_spread"]["min"], m["speedup_spread"]["max"]) == (2.0, 4.0)
    assert aggregate(ar, ar)["mat"] is None and aggregate(ar, ar)["speedup"] == 1.0


def test_spread_over_repeats():
    ar = [row("p", "ar", 2.0, tokens=4, repeat=r) for r in range(3)]
    sd = [row("p", "sd", t, [(3, 3)], repeat=r) for r, t in enumerate([1.0, 2.0, 4.0])]
    s = aggregate(sd, ar)["speedup_spread"]
    assert s["of"] == "repeats" and (s["min"], s["median"], s["max"]) == (0.5, 1.0, 2.0)


def test_cost_model_theory():
    assert expected_tokens(0.0, 4) == 1 and expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert speedup(0.5, 2, 0.0) == pytest.approx(1.75)
    assert speedup(0.5, 2, 0.1, {1: 100.0, 3: 200.0}) == pytest.approx(1.75 / (0.2 + 2.0))
    assert verify_ratio({1: 100.0, 2: 150.0, 4: 250.0}, 3) == pytest.approx(2.0)
    g, s = optimal_gamma(0.8, 0.05)
    assert g == 8 and s == pytest.approx(expected_tokens(0.8, 8) / 1.4)
    p = predict({"acceptance_rate": 0.5, "mean_gamma": 2, "drafted": 10, "t_draft": 0.5}, 100.0,
                {1: 100.0, 3: 200.0}, 0.25)
    assert p["c_measured"] == pytest.approx(0.5)
    assert p["predicted"] == pytest.approx(1.75 / (1.0 + 2.0)) and p["projected"] == pytest.approx(1.75 / 1.5)


def test_per_position_prediction_sees_bursty_acceptance():
    """Rounds of 4 that keep all or nothing: α̂ = 1/2 and the i.i.d. formula predicts 1.94 tokens per round, but
    rounds give 3.0 on average; the per-position and accepted-length predictions get it right."""
    d, a = [4] * 10, [4, 0] * 5
    beta = conditional_acceptance(d, a)
    assert beta == [0.5, 1.0, 1.0, 1.0]
    assert expected_tokens_by_position(beta, 4) == pytest.approx(3.0) and expected_tokens(0.5, 4) < 2
    curve = {1: 100.0, 5: 200.0}
    p = predict({"acceptance_rate": 0.5, "mean_gamma": 4, "drafted": 40, "t_draft": 0.4}, 100.0, curve, 0.1,
                rounds=(d, a, d))
    cost = 10 * (4 * 0.1 + 2.0)  # c = 0.4 s / 40 drafts / 0.1 s = 0.1; T(5)/T(1) = 2
    assert p["predicted_by_position"] == pytest.approx(30 / cost) == p["predicted_from_lengths"]
    assert p["predicted"] == pytest.approx(expected_tokens(0.5, 4) / 2.4)
    # a tree: 2 levels, 6 nodes scored per round; the cost uses the nodes, the tokens the depth
    t = predict({"acceptance_rate": 0.5, "mean_gamma": 2, "drafted": 4, "t_draft": 0.04}, 100.0, {1: 100.0, 7: 300.0},
                None, rounds=([2, 2], [2, 0], [6, 6]))
    assert t["predicted_from_lengths"] == pytest.approx(4 / (2 * (2 * 0.1 + 3.0)))


def test_bench_counts_every_method_the_same_way_and_renders_from_rows(folders):
    out = folders / "run"
    s = run_bench(str(folders / "t"), str(folders / "d"), "sd,sd:gamma=2,hf-ar,hf-assisted",
                  str(folders / "p.jsonl"), num_prompts=None, max_new_tokens=12, gamma=3, out_dir=out,
                  cost_model=False, progress=False)
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 5
    for pid in {r["prompt_id"] for r in rows}:
        mine = [r for r in rows if r["prompt_id"] == pid]
        ref = next(r for r in mine if r["method"] == "ar")["token_ids"]
        for r in mine:  # greedy: every method, ours and HF's, produces the same ids, counted the same way
            assert r["new_tokens"] == len(r["token_ids"]) == 12 and r["token_ids"] == ref, r["method"]
    overall = s["groups"]["overall"]
    assert set(s["groups"]) == {"overall", "a", "b"}
    assert overall["ar"]["speedup"] == pytest.approx(1.0) and overall["ar"]["mat"] == 1.0
    assert overall["sd"]["speedup"] == pytest.approx(overall["ar"]["wall_s"] / overall["sd"]["wall_s"])
    assert overall["sd:gamma=2"]["mean_gamma"] <= 2 < overall["sd"]["mean_gamma"]
    assert overall["hf-assisted"]["peer"] and overall["hf-assisted"]["mat"] is None
    assert all(r["exact_match_ar"] == 1.0 for r in overall.values()) and s["lossless_violations"] == {}
    assert overall["sd"]["bleu"] is not None
    report = (out / "report.md").read_text()
    assert "## Category: a" in report and "hf-assisted (peer on `torch`)" in report and "WARNING" not in report
    assert (out / "plots" / "speedup.png").stat().st_size > 1000

    # Re-render from the saved rows alone; a tampered row is flagged loudly as a lossless violation.
    lines = (out / "prompts.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["token_ids"] = bad["token_ids"][:-1] + [(bad["token_ids"][-1] + 1) % 64]
    lines[1] = json.dumps(bad)
    (out / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    s2 = render(out)
    assert bad["method"] in s2["lossless_violations"] and "WARNING" in (out / "report.md").read_text()


def test_drafter_backends_compared_in_one_run(folders):
    from verispec.backends import resolve_backend

    # a second drafter backend other than what "auto-draft" resolves to on this CPU (fast-int8 where the int4
    # kernel does not run, e.g. an AVX2-only machine)
    other = "fast" if resolve_backend("auto-draft") == "fast-int8" else "fast-int8"
    out = folders / "backends"
    s = run_bench(str(folders / "t"), str(folders / "d"), f"sd,sd:drafter_backend={other}", str(folders / "p.jsonl"),
                  num_prompts=2, max_new_tokens=6, out_dir=out, progress=False, warmup=False)
    cfg = json.loads((out / "config.json").read_text())
    # each loaded once; by default the drafter gets the cheapest lossy backend ("auto-draft")
    assert cfg["drafter_backend"] == "auto-draft" and set(cfg["backends"]["drafters"]) == {"auto-draft", other}
    assert cfg["backends"]["drafters"][other] == other
    assert resolve_backend("auto-draft") in ("fast-int4", "fast-int8", "fast")
    overall = s["groups"]["overall"]
    assert overall[f"sd:drafter_backend={other}"]["exact_match_ar"] == 1.0  # the drafter changes only speed
    cost = json.loads((out / "cost.json").read_text())
    assert cost["drafter_backend"] == cfg["backends"]["drafter"] and cost["other_drafters"][other]["1"] > 0
    report = (out / "report.md").read_text()
    assert f"(also `{other}` where a method says `drafter_backend=`)" in report and f"on `{other}` (c = " in report
    inv = cost["invariance"]  # what greedy equality rests on, measured on the target's backend
    assert inv["max_abs"] < 1e-4 and inv["argmax_agree"] and set(inv["chain_max_abs_by_k"]) == {"1", "2", "4", "8", "16"}
    assert "## Batch invariance of the target" in report
    with pytest.raises(ValueError, match="unknown backend"):
        run_bench(str(folders / "t"), str(folders / "d"), "sd:drafter_backend=int3", str(folders / "p.jsonl"),
                  num_prompts=1, max_new_tokens=2, out_dir=folders / "bad", progress=False, warmup=False)
    assert not (folders / "bad").exists()  # rejected before anything is written


def test_resume_skips_finished_rows(folders):
    out = folders / "resume"
    args = dict(target=str(folders / "t"), drafter=str(folders / "d"), methods="sd", dataset=str(folders / "p.jsonl"),
                num_prompts=2, max_new_tokens=5, out_dir=out, cost_model=False, progress=False, warmup=False)
    run_bench(**args)
    lines = (out / "prompts.jsonl").read_text().splitlines()
    (out / "prompts.jsonl").write_text("\n".join(lines[:2]) + "\n")  # as if interrupted after two rows
    run_bench(**args, resume=True)
    after = (out / "prompts.jsonl").read_text().splitlines()
    assert after[:2] == lines[:2] and len(after) == 4
    with pytest.raises(ValueError, match="different configuration"):
        run_bench(**{**args, "max_new_tokens": 6}, resume=True)


def test_cli_bench_report_theory(folders, capsys):
    assert main(["bench", "--target", str(folders / "t"), "--drafter", str(folders / "d"), "--dataset",
                 str(folders / "p.jsonl"), "--num-prompts", "1", "--max-new-tokens", "4", "--no-cost-model",
                 "--out", str(folders / "cli")]) == 0
    assert "exact match" in capsys.readouterr().out
    assert main(["report", str(folders / "cli")]) == 0
    assert main(["theory", "--alpha", "0.8", "--c", "0.05"]) == 0
    assert "optimal γ = 8" in capsys.readouterr().out
    assert main(["bench", "--methods", "nope"]) == 2
    assert main(["report", str(folders)]) == 2


def test_datasets_are_seeded_offline_and_categorised():
    assert len(humaneval()) == 164 and humaneval()[0].reference
    a = [p.id for p in load_prompts("humaneval", 10, seed=0)]
    assert a == [p.id for p in load_prompts("humaneval", 10, seed=0)]
    assert a != [p.id for p in load_prompts("humaneval", 10, seed=1)]
    cats = {p.category for p in load_prompts("all", 3)}
    assert cats == {"code", "nl-continuation", "summarization", "code-edit"}
    for name in DATASETS:
        assert len(DATASETS[name]()) >= 20, name
    with pytest.raises(ValueError, match="unknown dataset"):
        load_prompts("nope")


def test_method_specs():
    specs = parse_methods("ar,sd:gamma=6:draft_vocab=8,hf-pld,sd:policy=egag:gamma_max=5")
    assert [s.label for s in specs] == ["ar", "sd:gamma=6:draft_vocab=8", "hf-pld", "sd:policy=egag:gamma_max=5"]
    assert specs[1].params == {"gamma": 6, "draft_vocab": 8} and specs[1].needs_drafter and specs[2].peer
    # names and options are checked against the registry before any model is loaded
    for bad, match in (("nope", "unknown method"), ("sd:gamma", "key=value"), ("ar,ar", "twice"),
                       ("sd:x=0.5", "unknown option.*x.*draft_vocab"), ("sd:policy=egag:eps=0.3", "unknown option.*policy 'egag' takes"),
                       ("sd:policy=nope", "unknown policy"), ("beam:policy=egag", "no policy"),
                       ("hf-ar:gamma=3", "unknown option"), ("hf-assisted:kernels=mine", "kernels")):
        with pytest.raises(ValueError, match=match):
            parse_methods(bad)


def test_drafter_cost_comes_from_the_registry_not_the_label():
    """Old code decided by looking for "sd" in the label, which `nasd` contains: NASD, which runs no draft model,
    got the drafter's cost in its accelerator projection."""
    from verispec.bench.report import summarize

    steps = [(4, 3), (4, 1)]
    rows = [row("p", "ar", 4.0, tokens=6), row("p", "nasd", 2.0, steps), row("p", "sd:gamma=4", 2.0, steps)]
    s = summarize({"methods": ["ar", "nasd", "sd:gamma=4"], "sampling": {"temperature": 0}}, rows,
                  {"size_ratio": 0.5})
    g = s["groups"]["overall"]
    alpha, gamma = 4 / 8, 4
    assert g["nasd"]["projected"] == pytest.approx(speedup(alpha, gamma, 0.0))  # drafting is free
    assert g["sd:gamma=4"]["projected"] == pytest.approx(speedup(alpha, gamma, 0.5))
