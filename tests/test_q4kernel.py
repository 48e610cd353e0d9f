"""Our AVX-512 VNNI 4-bit x 8-bit kernel (verispec.kernels.q4kernel): equals its plain-torch formula, its build
can be skipped or fail without harm."""

from __future__ import annotations

import warnings

import pytest
import torch

from verispec.kernels import q4kernel
from verispec.kernels.int4 import quantize_groups
from verispec.kernels.q4kernel import pack, q4_kernel, q4_mm, reference

needs_q4 = pytest.mark.skipif(q4_kernel() is None, reason="no AVX-512 VNNI or no compiler: the kernel is not built")


def layer(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, scale, lo = quantize_groups(torch.randn(n, k, generator=g), 32)
    return pack(q, scale, lo), (q, scale, lo)


@needs_q4
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (896, 128), (64, 4864)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_kernel_equals_its_formula(n, k, rows):
    (w, d, m), _ = layer(n, k, seed=n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0  # a group of zeros: scale 0, nothing divided by it
    got, want = q4_mm(x, w, d, m), reference(x, w, d, m)  # (rows, n)
    assert got.shape == (rows, n)
    scale = float((x.abs() @ dequant(w, d, m).abs().T).max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)


def dequant(w, d, m):
    """The weights the packed layer stands for, (N, K), by multiplying the identity through the formula's
    weight-only part: reference() of one-hot rows is exact (a single nonzero per group quantizes exactly)."""
    K = w.shape[1] * 32
    return reference(torch.eye(K), w, d, m).T  # (N, K)


def test_packing_round_trips_the_quantized_weights():
    (w, d, m), (q, scale, lo) = layer(48, 96, seed=1)
    want = (q.reshape(48, 3, 32).float() * scale[..., None] + lo[..., None]).reshape(48, 96)
    torch.testing.assert_close(dequant(w, d, m), want, rtol=1e-3, atol=1e-6)  # fp16 scales: bf16 values fit


@needs_q4
def test_results_do_not_depend_on_the_thread_count():
    (w, d, m), _ = layer(256, 128)
    x = torch.randn(3, 128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = q4_mm(x, w, d, m)
        torch.set_num_threads(2)
        two = q4_mm(x, w, d, m)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each block of 16 rows is summed by one thread in one order


@needs_q4
def test_bad_inputs_are_refused():
    (w, d, m), _ = layer(16, 64)
    with pytest.raises(RuntimeError, match="contiguous"):
        q4_mm(torch.randn(64, 2).T, w, d, m)
    with pytest.raises(RuntimeError, match="input width"):
        q4_mm(torch.randn(1, 32), w, d, m)
    assert q4_mm(torch.zeros(0, 64), w, d, m).shape == (0, 16)


def test_the_build_can_be_skipped(monkeypatch):
    monkeypatch.setenv(q4kernel.NO_BUILD_ENV, "1")
    assert q4kernel.q4_kernel.__wrapped__() is None


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext

    def broken(*a, **k):
        raise OSError("no compiler here")

    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    monkeypatch.setattr(q4kernel, "cpu_flags", lambda: frozenset(q4kernel.NEEDED_FLAGS))
    monkeypatch.setattr(ext, "load_inline", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert q4kernel.q4_kernel.__wrapped__() is None
    assert any("could not build the q4 kernel" in str(w.message) for w in caught)


def test_cpus_without_vnni_do_not_build(monkeypatch):
    monkeypatch.setattr(q4kernel, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", lambda *a, **k: pytest.fail("built anyway"))
    assert q4kernel.q4_kernel.__wrapped__() is None
