"""verispec.kernels.ggml_blocks: GGUF blocks read exactly as ggml reads them, and packed without changing a bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from verispec.kernels.ggml_blocks import TYPES, decode, dequantize, pack, quantize
from verispec.kernels.native import unpack_codes


def _raw(name: str, N: int = 20, K: int | None = None, seed: int = 0) -> tuple[np.ndarray, int]:
    K = K or 2 * TYPES[name].SB
    return quantize(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)), name), K


@pytest.mark.parametrize("name", list(TYPES))
def test_decode_gives_ggml_s_own_weights(name):
    raw, K = _raw(name)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])  # gguf's reference implementation
    np.testing.assert_array_equal(dequantize(decode(name, raw, K)).numpy(), ref)


@pytest.mark.parametrize("name", list(TYPES))
def test_random_blocks_decode_like_ggml_too(name):
    """Arbitrary bytes (not only what our quantizer writes): every bit of every field is read as ggml reads it."""
    t = TYPES[name]
    g = np.random.default_rng(1)
    raw = g.integers(0, 256, (8, 2 * t.block_bytes), dtype=np.uint8)
    for off in ([0, 2] if name in ("Q4_K",) else [t.block_bytes - 2] if name == "Q6_K" else [0, 2] if name == "Q4_1"
                else [0]):  # keep the fp16 scales finite and modest
        for b in range(2):
            raw[:, b * t.block_bytes + off: b * t.block_bytes + off + 2] = \
                np.float16(g.uniform(-0.1, 0.1)).reshape(1).view(np.uint8)
    K = 2 * t.SB
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    np.testing.assert_array_equal(dequantize(decode(name, raw, K)).numpy(), ref)


@pytest.mark.parametrize("name", list(TYPES))
def test_quantizers_stay_close_to_the_weights(name):
    W = torch.randn(16, 2 * TYPES[name].SB, generator=torch.Generator().manual_seed(2))
    err = (dequantize(decode(name, quantize(W, name), W.shape[1])) - W).abs().max()
    assert err < {"Q8_0": 0.03, "Q6_K": 0.1}.get(name, 0.5)


@pytest.mark.parametrize("name", list(TYPES))
def test_pack_moves_codes_without_changing_them(name):
    raw, K = _raw(name, N=37)  # not a multiple of 16: padded rows
    w = decode(name, raw, K)
    p = pack(w)
    t = w.type
    assert torch.equal(unpack_codes(p, K, t.GS, t.bits)[:37], torch.from_numpy(w.q))
    assert p["sc"].shape == (3, K // t.GS, 16) and p["D"].shape == (3, K // t.SB, 16)
    assert torch.equal(p["sc"].permute(0, 2, 1).reshape(48, -1)[:37], torch.from_numpy(w.sc))


def test_unknown_or_misfit_blocks_are_refused():
    with pytest.raises(ValueError, match="no native kernel"):
        decode("IQ2_XS", np.zeros((1, 66), np.uint8), 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        decode("Q4_K", np.zeros((1, 144), np.uint8), 128)
    with pytest.raises(ValueError, match="no quantizer"):
        quantize(torch.zeros(2, 32), "F16")
