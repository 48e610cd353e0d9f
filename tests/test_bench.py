"""The small benchmark runner: same prompts and counting for every method, ratios against AR, a report."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from verispec.bench.datasets import humaneval, load_prompts
from verispec.bench.runner import run_bench
from verispec.cli import main
from tests.conftest import tiny_llama, word_tokenizer


@pytest.fixture
def folders(tmp_path):
    tok = word_tokenizer(["<unk>"] + [f"w{i}" for i in range(63)])
    t = tiny_llama(64, seed=1, scale=8.0)
    d = copy.deepcopy(t)
    with torch.no_grad():
        d.lm_head.weight.add_(torch.randn(d.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)))
    for name, m in (("t", t), ("d", d)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "prompt": " ".join(f"w{(i * 7 + j) % 60}" for j in range(6))})
                              for i in range(4)))
    return tmp_path


def test_bench_counts_every_method_the_same_way_and_reports(folders):
    out = folders / "run"
    s = run_bench(str(folders / "t"), str(folders / "d"), ["sd"], str(folders / "p.jsonl"), num_prompts=3,
                  max_new_tokens=12, gamma=3, out_dir=out, progress=False)
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["method"] for r in rows} == {"ar", "sd"}
    for pid in {r["prompt_id"] for r in rows}:
        ar, sd = (next(r for r in rows if r["prompt_id"] == pid and r["method"] == m) for m in ("ar", "sd"))
        assert ar["new_tokens"] == sd["new_tokens"] == len(sd["token_ids"]) == 12
        assert sd["exact_match_ar"] and ar["mat"] == 1.0
    m = s["methods"]
    assert m["ar"]["speedup"] == pytest.approx(1.0)
    assert m["sd"]["speedup"] == pytest.approx(m["ar"]["wall_s"] / m["sd"]["wall_s"])
    assert m["sd"]["exact_match_ar"] == 1.0 and 0 < m["sd"]["acceptance_rate"] < 1
    report = (out / "report.md").read_text()
    assert "| sd |" in report and "speedup" in report and "WARNING" not in report
    assert json.loads((out / "summary.json").read_text())["config"]["max_new_tokens"] == 12


def test_cli_bench_exit_code(folders, capsys):
    assert main(["bench", "--target", str(folders / "t"), "--drafter", str(folders / "d"), "--dataset",
                 str(folders / "p.jsonl"), "--num-prompts", "2", "--max-new-tokens", "4",
                 "--out", str(folders / "cli")]) == 0
    assert "exact match" in capsys.readouterr().out


def test_prompt_selection_is_seeded_and_humaneval_is_complete():
    assert len(humaneval()) == 164
    a = [p.id for p in load_prompts("humaneval", 10, seed=0)]
    assert a == [p.id for p in load_prompts("humaneval", 10, seed=0)]
    assert a != [p.id for p in load_prompts("humaneval", 10, seed=1)]
    with pytest.raises(ValueError, match="unknown dataset"):
        load_prompts("nope")
