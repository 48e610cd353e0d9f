"""Quality evidence that does not rest on timing: HumanEval pass@1 (running completions against the problem's
tests) and greedy token agreement between methods."""

from __future__ import annotations

import json

import pytest

from verispec.bench import quality
from verispec.bench.datasets import humaneval
from verispec.bench.quality import (agreement, check_completion, completion_text, describe_agreement,
                                    first_divergence, markdown_lines, pass_at_1, truncate)
from verispec.bench.report import summarize
from verispec.bench.runner import run_bench


@pytest.fixture(scope="module")
def problem():
    return next(q for q in humaneval() if q.id == "HumanEval/0")


def test_humaneval_prompts_carry_their_tests(problem):
    ps = humaneval()
    assert all(p.tests and "def check(candidate)" in p.tests and p.entry_point for p in ps)
    assert problem.entry_point == "has_close_elements"


def test_passing_failing_and_timing_out_completions_on_a_real_problem(problem):
    run = lambda c, **k: check_completion(problem.text, c, problem.tests, problem.entry_point, **k)  # noqa: E731
    ok = run(problem.reference)
    assert ok["passed"] and ok["exec_result"] == "passed" and ok["exec_network"] in ("namespace", "socket-blocked")
    bad = run("    return False\n")
    assert not bad["passed"] and bad["exec_result"] == "failed: AssertionError"
    name = run("    return undefined_name\n")
    assert not name["passed"] and "NameError" in name["exec_result"]
    slow = run("    while True:\n        pass\n", timeout=1.0)
    assert not slow["passed"] and slow["exec_result"] == "timed out after 1 s"
    # leaving before check() runs is not a pass, however the process exits
    for c in ("    exit(0)\n", "    import os\n    os._exit(0)\n"):
        r = run(c)
        assert not r["passed"] and "before the tests finished" in r["exec_result"], c
    # what follows the function is cut off: a broken helper after it does not fail the solution
    assert run(problem.reference + "\n\ndef broken(:\n    pass\n")["passed"]


def test_socket_fallback_where_no_network_namespace(problem, monkeypatch):
    monkeypatch.setattr(quality, "_netns", lambda: ([], "socket-blocked"))
    r = check_completion(problem.text, "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n",
                         problem.tests, problem.entry_point)
    assert r["exec_network"] == "socket-blocked" and "network disabled" in r["exec_result"]


def test_truncation_rules():
    body = "    return 1\n"
    for tail in ("def helper():\n    pass\n", "async def f():\n    pass\n", "class A:\n    pass\n",
                 "if __name__ == '__main__':\n    main()\n", "if True:\n    x = 1\n", "print(f(1))\n",
                 "assert f(1) == 1\n", "@decorator\ndef g(): pass\n", "# tests\n", "```\nsome prose\n"):
        assert truncate(body + "\n" + tail) == body, tail
        assert truncate(body + tail) == body[:-1], tail
    # indented (nested) blocks and comments are part of the body; the first line counts as a line start
    nested = "    def inner():\n        # note\n        return 1\n    if x:\n        print(1)\n    return inner()\n"
    assert truncate(nested) == nested
    assert truncate("def other():\n    pass\n") == ""
    assert truncate("    return 1") == "    return 1"
    assert truncate("    return 1\n#x\n\ndef g(): pass") == "    return 1"


class _Tok:
    """A SentencePiece-like decode: the first piece's leading space is dropped at the start of the text."""

    pieces = {0: "<s>", 1: " a", 2: " b", 3: "</s>"}

    def decode(self, ids, skip_special_tokens=True):
        s = "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i in (0, 3)))
        return s[1:] if s.startswith(" ") else s


def test_completion_text_keeps_the_leading_space():
    tok = _Tok()
    assert tok.decode([2, 3]) == "b"  # decoding the new ids alone loses the space
    assert completion_text(tok, [0, 1], [2, 3]) == " b"


def _row(pid, method, ids, repeat=0, **kw):
    return {"prompt_id": pid, "method": method, "repeat": repeat, "token_ids": ids, **kw}


def test_agreement_with_ar_and_llamacpp_ar():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2 and first_divergence([9], [1]) == 0
    rows = [_row("p1", "ar", [1, 2, 3, 4]), _row("p2", "ar", [5, 6, 7]), _row("p3", "ar", [1, 1]),
            _row("p1", "sd", [1, 2, 3, 4]), _row("p2", "sd", [5, 6, 7]), _row("p3", "sd", [1, 1]),
            _row("p1", "llamacpp-ar", [1, 2, 9, 9]), _row("p2", "llamacpp-ar", [5, 6, 7]),
            _row("p3", "llamacpp-ar", [2, 1])]
    a = agreement(rows, ["ar", "sd", "llamacpp-ar"])
    assert set(a) == {"ar", "llamacpp-ar"}
    assert a["ar"]["sd"] == {"identical": 3, "of": 3, "median_divergence": None,
                             "per_prompt": [["p1", None], ["p2", None], ["p3", None]]}
    assert a["ar"]["llamacpp-ar"]["identical"] == 1 and a["ar"]["llamacpp-ar"]["median_divergence"] == 1
    assert a["llamacpp-ar"]["ar"]["per_prompt"] == [["p1", 2], ["p2", None], ["p3", 0]]
    assert describe_agreement(a["ar"]["sd"]) == "identical on 3/3 prompts"
    assert describe_agreement(a["ar"]["llamacpp-ar"]) == "identical on 1/3 prompts, first divergence at median " \
                                                         "position 1"
    assert agreement([r for r in rows if r["method"] != "llamacpp-ar"], ["ar", "sd"]).keys() == {"ar"}
    # with repeats, pairs are (prompt, repeat)
    rep = agreement([_row("p", "ar", [1], 0), _row("p", "ar", [1], 1), _row("p", "sd", [1], 0),
                     _row("p", "sd", [2], 1)], ["ar", "sd"])
    assert rep["ar"]["sd"]["per_prompt"] == [["p#0", None], ["p#1", 0]]


def test_report_lines():
    rows = [_row("HumanEval/0", "ar", [1], passed=True, exec_result="passed", exec_network="namespace"),
            _row("HumanEval/2", "ar", [1], passed=False, exec_result="failed: AssertionError",
                 exec_network="namespace"),
            _row("HumanEval/0", "sd", [1], passed=True, exec_result="passed", exec_network="namespace"),
            _row("HumanEval/2", "sd", [2], passed=False, exec_result="timed out after 10 s",
                 exec_network="namespace")]
    p = pass_at_1(rows, ["ar", "sd"])
    assert p["ar"]["pass_at_1"] == 0.5 and p["ar"]["failures"] == {"AssertionError": 1}
    assert p["sd"]["failures"] == {"timed out": 1}
    text = "\n".join(markdown_lines(p, agreement(rows, ["ar", "sd"])))
    assert "## HumanEval pass@1" in text and "| ar | 50.0% | 1 / 2 | 2 | AssertionError ×1 |" in text
    assert "| sd | 50.0% | 1 / 2 | 2 | timed out ×1 |" in text and "network: namespace" in text
    assert "## Greedy token agreement with `ar`" in text
    assert "| sd | identical on 1/2 prompts, first divergence at median position 0 | = 0 |" in text
    assert markdown_lines({}, None) == [] and markdown_lines({}, {"ar": {}}) == []
    # the summary carries both, and agreement only for greedy runs
    cfg = {"methods": ["ar", "sd"], "sampling": {"temperature": 0}}
    rows = [{**r, "category": "code", "new_tokens": 1, "t_total": 1.0, "target_tokens_processed": 2} for r in rows]
    s = summarize(cfg, rows, None)
    assert s["pass_at_1"]["sd"]["passed"] == 1 and s["agreement"]["ar"]["sd"]["identical"] == 1
    assert summarize({**cfg, "sampling": {"temperature": 1.0}}, rows, None)["agreement"] is None


def test_bench_runs_code_checks_untimed_and_skips_them_on_request(folders):
    """The tiny model's words are no Python: every completion fails, with a reason, and the report shows it."""
    data = folders / "code.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"c{i}", "prompt": f"w{i} w{i + 1}", "category": "code",
                                          "test": "def check(f):\n    assert f() == 1\n", "entry_point": "f"})
                              for i in range(2)))
    args = dict(target=str(folders / "t"), drafter=str(folders / "d"), methods="sd", dataset=str(data),
                num_prompts=None, max_new_tokens=4, cost_model=False, progress=False, warmup=False)
    s = run_bench(**args, out_dir=folders / "exec")
    rows = [json.loads(x) for x in (folders / "exec" / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["passed"] is False and r["exec_result"].startswith("failed: ") for r in rows)
    assert s["pass_at_1"]["ar"] == {**s["pass_at_1"]["ar"], "passed": 0, "of": 2, "prompts": 2}
    report = (folders / "exec" / "report.md").read_text()
    assert "## HumanEval pass@1" in report and "| sd | 0.0% | 0 / 2 | 2 |" in report
    assert "## Greedy token agreement with `ar`" in report and "identical on 2/2 prompts" in report
    s = run_bench(**args, out_dir=folders / "noexec", execute=False)
    rows = [json.loads(x) for x in (folders / "noexec" / "prompts.jsonl").read_text().splitlines()]
    assert not any("passed" in r for r in rows) and s["pass_at_1"] == {}
    assert "## HumanEval pass@1" not in (folders / "noexec" / "report.md").read_text()
