"""Micro-benchmarks behind the drafter backends' docstrings (kernels/int4.py, allocator.py).

Usage: python scripts/drafter_kernels.py   (run alone on an idle machine; about a minute)

1. One-row linears over 24 Qwen2.5-0.5B-sized MLP blocks (896 -> 4864 -> 896) with distinct random weights, so
   the weights are not in cache between calls, as in a real draft step: fp32 packed, dynamic int8, int4 on
   PyTorch's kernel ("int4 aten") and on ours ("int4 q4", kernels/q4kernel.py, where this machine builds it).
2. Cost by row count of one 896 x 4864 layer (weights in cache): the int4 kernels vs dynamic int8 vs fp32 packed.
3. One `sampling.sample` draw over 151,936 ids against `torch.multinomial`, in a fresh process without and
   with `tune_allocator()` (page-fault costs depend on the process's allocation history).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from unittest import mock

import torch
from torch import nn

from verispec.allocator import NO_MALLOPT_ENV
from verispec.kernels import int4 as int4_mod
from verispec.kernels.int4 import Int4Linear
from verispec.kernels.q4kernel import q4_kernel
from verispec.kernels.int8 import quantize_int8
from verispec.kernels.onednn import FastLinear


def ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def int8(lin: nn.Linear) -> nn.Module:
    holder = nn.Sequential(lin)
    quantize_int8(holder, ["0"])
    return holder[0]


def make(kind: str, lin: nn.Linear) -> nn.Module:
    if kind == "fp32 packed":
        return FastLinear.from_linear(lin)
    if kind == "dynamic int8":
        return int8(lin)
    if kind == "int4 aten":
        with mock.patch.object(int4_mod, "q4_kernel", lambda: None):  # as where ours is not built
            return Int4Linear.from_linear(lin, wide=False)
    return Int4Linear.from_linear(lin, wide=False)  # "int4 q4"


KINDS = ("fp32 packed", "dynamic int8", "int4 aten") + (("int4 q4",) if q4_kernel() is not None else ())


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    H, F = 896, 4864
    shapes = [(H, F), (H, F), (F, H)] * 24  # gate, up, down per block

    print("1. one row through 24 MLP blocks, cold weights (ms)")
    for kind in KINDS:
        layers = [make(kind, nn.Linear(i, o, bias=False)) for i, o in shapes]
        xs = [torch.randn(1, i) for i, _ in shapes]
        print(f"   {kind:13s} {ms(lambda: [m(x) for m, x in zip(layers, xs)]):7.2f}")
        del layers

    print("2. one 896 x 4864 layer by rows (ms)")
    lin = nn.Linear(H, F, bias=False)
    mods = {k: make(k, lin) for k in KINDS[::-1]}
    print("   rows " + " ".join(f"{k:>13s}" for k in mods))
    for rows in (1, 2, 4, 8, 16, 150):
        x = torch.randn(rows, H)
        print(f"   {rows:4d} " + " ".join(f"{ms(lambda: m(x), 50):13.3f}" for m in mods.values()))

    print("3. one token drawn from 151,936 ids, each in a fresh process (ms)")
    for tuned in (False, True):
        out = subprocess.run([sys.executable, __file__, "--draw"], capture_output=True, text=True, check=True,
                             env={**os.environ, NO_MALLOPT_ENV: "0" if tuned else "1"}).stdout.strip()
        print(f"   tune_allocator {'on ' if tuned else 'off'}: {out}")


def draw() -> None:
    """Section 3 in a fresh process: one token from 151,936 ids, multinomial vs verispec's sample."""
    from verispec.allocator import tune_allocator
    from verispec.sampling import sample

    tune_allocator()  # a no-op when VERISPEC_NO_MALLOPT=1
    p = torch.softmax(torch.randn(151_936), 0)
    g = torch.Generator().manual_seed(0)
    print(f"multinomial {ms(lambda: torch.multinomial(p, 1, generator=g), 200):.3f}   "
          f"sample {ms(lambda: sample(p, g), 200):.3f}")


if __name__ == "__main__":
    draw() if sys.argv[1:] == ["--draw"] else main()
