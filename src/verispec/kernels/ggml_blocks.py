"""GGUF block formats read into one integer form that the native kernels multiply with (no re-quantization).

Every block type the registry models hold is the same shape of thing: unsigned integer codes q, an integer scale
sc and an integer offset mn per group of GS weights, and two fp16 scales D, Dm per superblock of SB weights.
A weight is

    w = D·sc·q − (Dm·mn_scale)·mn        (per row n, group g, superblock S)

with mn_scale a power of two per type (so Dm·mn_scale is exact). The types, as ggml defines them
(ggml-common.h / ggml-quants.c) and as they map here:

| type | SB | GS | q | sc | mn | D | Dm | mn_scale | bits stored |
|---|---|---|---|---|---|---|---|---|---|
| Q4_K | 256 | 32 | 0..15 | 6-bit scale | 6-bit min | d | dmin | 1 | 4 |
| Q6_K | 256 | 16 | 0..63 | int8 scale | = sc (shared) | d | d | 32 | 6 (4 + 2) |
| Q8_0 | 32 | 32 | int8 + 128 | 1 | 1 | d | d | 128 | 8 |
| Q5_0 | 32 | 32 | 0..31 | 1 | 1 | d | d | 16 | 8 |
| Q4_1 | 32 | 32 | 0..15 | 1 | 1 | d | −m | 1 | 4 |
| Q4_0 | 32 | 32 | 0..15 | 1 | 1 | d | d | 8 | 4 |

The kernels (`verispec.kernels.native`) quantize each activation row per superblock to int8 (dx = max|x| / 127, as
llama.cpp's Q8_K / Q8_0 do) and compute, per output n and superblock S, the exact integers
A = Σ_g sc·Σ_j q·x8 and B = Σ_g mn·Σ_j x8, then y += (D·dx)·A − ((Dm·mn_scale)·dx)·B in fp32, superblock after
superblock. `dequantize` gives the file's weights (ggml's own formulas, for embedding rows and checks).

`pack` lays the codes out for the kernels: rows in blocks of 16 (one SIMD lane per row), and per (row block, group)
GS/4 steps of 64 bytes — byte s·64 + i·4 + e is the code of row i at input 4s + e (4-bit: two steps per byte, step 2t
in the low nibble and 2t + 1 in the high one; 6-bit: those nibbles, then per 4 steps 64 bytes of their top 2 bits, step
4u + j at bit 2j). sc and mn are int8 per (row block, group, lane), D and Dm fp16 per
(row block, superblock, lane). Packing moves bits, it does not change them.

`quantize` makes blocks from fp32 weights for models that have no file (tests, in-process models): Q8_0 / Q5_0 /
Q4_1 / Q4_0 through gguf's own quantizer, Q4_K / Q6_K by a simple min/max rule of ours (valid blocks, not llama.cpp's
search); such a model then *is* the quantized one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BlockType:
    name: str
    SB: int  # weights per superblock (one activation scale)
    GS: int  # weights per integer scale group
    bits: int  # bits per stored code in the packed layout (4 or 8)
    mn_scale: float
    block_bytes: int  # bytes of one SB block in the file
    zero: int | None  # symmetric types: w = (D·sc)·(q − zero); None = w = (D·sc)·q − Dm·mn (with mins)


TYPES: dict[str, BlockType] = {t.name: t for t in [
    BlockType("Q4_K", 256, 32, 4, 1.0, 144, None),
    BlockType("Q6_K", 256, 16, 6, 32.0, 210, 32),
    BlockType("Q8_0", 32, 32, 8, 128.0, 34, 128),
    BlockType("Q5_0", 32, 32, 8, 16.0, 22, 16),
    BlockType("Q4_1", 32, 32, 4, 1.0, 20, None),
    BlockType("Q4_0", 32, 32, 4, 8.0, 18, 8),
]}


@dataclass
class IntWeights:
    """One weight matrix (N, K) in the integer form above (numpy arrays, unpacked)."""

    type: BlockType
    q: np.ndarray  # (N, K) uint8 codes
    sc: np.ndarray  # (N, K // GS) int8
    mn: np.ndarray  # (N, K // GS) int8
    D: np.ndarray  # (N, K // SB) float16
    Dm: np.ndarray  # (N, K // SB) float16

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def rows(self, idx: np.ndarray) -> IntWeights:
        return IntWeights(self.type, self.q[idx], self.sc[idx], self.mn[idx], self.D[idx], self.Dm[idx])


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for the 12 packed bytes of a Q4_K block: (sc, m), each (..., 8) in 0..63."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    m[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, m


def decode(type_name: str, raw: np.ndarray, K: int) -> IntWeights:
    """Raw GGUF rows (N, bytes per row) uint8 -> IntWeights (N, K)."""
    t = TYPES.get(type_name)
    if t is None:
        raise ValueError(f"block type {type_name} has no native kernel (have: {', '.join(TYPES)})")
    if K % t.SB:
        raise ValueError(f"{type_name}: input width {K} is not a multiple of {t.SB}")
    N = raw.shape[0]
    nb = K // t.SB
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(N, nb, t.block_bytes)
    ones = np.ones((N, K // t.GS), np.int8)
    if type_name == "Q4_K":
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, m = _k4_scales(b[..., 4:16])  # (N, nb, 8)
        qs = b[..., 16:144].reshape(N, nb, 4, 32)  # 4 chunks of 64 weights: low nibbles, then high nibbles
        q = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(N, K)
        return IntWeights(t, q, sc.reshape(N, -1).astype(np.int8), m.reshape(N, -1).astype(np.int8), d, dmin)
    if type_name == "Q6_K":
        ql, qh = b[..., 0:128].reshape(N, nb, 2, 64), b[..., 128:192].reshape(N, nb, 2, 32)
        scales = b[..., 192:208].view(np.int8).reshape(N, nb * 16)
        d = _f16(b[..., 208:210])
        lo, hi = ql[..., :32], ql[..., 32:]
        q1 = (lo & 0xF) | (((qh >> 0) & 3) << 4)
        q2 = (hi & 0xF) | (((qh >> 2) & 3) << 4)
        q3 = (lo >> 4) | (((qh >> 4) & 3) << 4)
        q4 = (hi >> 4) | (((qh >> 6) & 3) << 4)
        q = np.stack([q1, q2, q3, q4], axis=3).reshape(N, K)  # per half of 128: y[l], y[l+32], y[l+64], y[l+96]
        return IntWeights(t, q.astype(np.uint8), scales.copy(), scales.copy(), d, d.copy())
    d = _f16(b[..., 0:2])
    if type_name == "Q8_0":
        q = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(N, K)
        return IntWeights(t, q, ones, ones.copy(), d, d.copy())
    if type_name == "Q5_0":
        qh = b[..., 2:6].copy().view(np.uint32)  # (N, nb, 1): bit j = 5th bit of weight j
        qs = b[..., 6:22]
        bits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (N, nb, 32)
        q = (np.concatenate([qs & 0xF, qs >> 4], axis=-1) | (bits << 4)).reshape(N, K)
        return IntWeights(t, q, ones, ones.copy(), d, d.copy())
    if type_name == "Q4_1":
        m = _f16(b[..., 2:4])
        qs = b[..., 4:20]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(N, K)
        return IntWeights(t, q, ones, ones.copy(), d, (-m.astype(np.float32)).astype(np.float16))
    qs = b[..., 2:18]  # Q4_0
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(N, K)
    return IntWeights(t, q, ones, ones.copy(), d, d.copy())


def dequantize(w: IntWeights) -> torch.Tensor:
    """The file's fp32 weights (N, K), by ggml's formulas: (d·sc)·(q − zero), or (d·sc)·q − dmin·m with mins."""
    t = w.type
    N, K = w.shape
    q = torch.from_numpy(w.q.astype(np.float32)).view(N, K // t.GS, t.GS)
    sc = torch.from_numpy(w.sc.astype(np.float32))  # (N, G)
    D = torch.from_numpy(w.D.astype(np.float32)).repeat_interleave(t.SB // t.GS, dim=1)  # (N, G)
    scale = (D * sc).unsqueeze(-1)  # (N, G, 1)
    if t.zero is not None:
        out = scale * (q - float(t.zero))
    else:
        Dm = torch.from_numpy(w.Dm.astype(np.float32)).repeat_interleave(t.SB // t.GS, dim=1)
        out = scale * q - (Dm * torch.from_numpy(w.mn.astype(np.float32))).unsqueeze(-1)
    return out.reshape(N, K)


def pack(w: IntWeights) -> dict[str, torch.Tensor]:
    """The kernels' layout (module docstring); N is padded to a multiple of 16 with zero rows."""
    t = w.type
    N, K = w.shape
    NB = -(-N // 16)
    pad = NB * 16 - N

    def padded(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a

    G, steps = K // t.GS, t.GS // 4
    q = padded(w.q).reshape(NB, 16, G, steps, 4).transpose(0, 2, 3, 1, 4)  # (NB, G, steps, 16, 4)
    if t.bits in (4, 6):
        lo = (q & 15).reshape(NB, G, steps // 2, 2, 64)
        lo = (lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)).reshape(NB, G, -1)
        if t.bits == 6:  # bits 4, 5 of 4 steps in one byte: step 4u + j at bit 2j
            hi = (q >> 4).reshape(NB, G, steps // 4, 4, 64)
            hi = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
            lo = np.concatenate([lo, hi.reshape(NB, G, -1)], axis=-1)
        q = lo
    lanes = lambda a: torch.from_numpy(np.ascontiguousarray(padded(a).reshape(NB, 16, -1).transpose(0, 2, 1)))
    sc = lanes(w.sc)
    mn = sc if t.name == "Q6_K" and np.array_equal(w.mn, w.sc) else lanes(w.mn)  # Q6_K's offsets are its scales
    D = lanes(w.D)
    return {"q": torch.from_numpy(np.ascontiguousarray(q).reshape(NB, G, -1)), "sc": sc, "mn": mn,
            "D": D, "Dm": D if np.array_equal(w.Dm, w.D) else lanes(w.Dm)}


# ---- quantizers for weights without a file (tests, in-process models) ----

def _ggml_quant(W: np.ndarray, type_name: str) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(W, gguf.GGMLQuantizationType[type_name])


def _encode_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Inverse of _k4_scales: (..., 8) values in 0..63 -> (..., 12) packed bytes."""
    out = np.zeros(sc.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    return out


def _quant_q4_k(W: np.ndarray) -> np.ndarray:
    N, K = W.shape
    nb = K // 256
    x = W.reshape(N, nb, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0.0)  # (N, nb, 8): w ≈ s·q − mn with q in 0..15
    s = np.maximum((x.max(-1) - lo) / 15.0, 1e-12)
    d = np.maximum(s.max(-1) / 63.0, 1e-12).astype(np.float16).astype(np.float32)  # (N, nb)
    dmin = np.maximum(-lo.min(-1) / 63.0, 1e-12).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(s / d[..., None]), 1, 63).astype(np.uint8)
    mq = np.clip(np.rint(-lo / dmin[..., None]), 0, 63).astype(np.uint8)
    step = (d[..., None] * sc)[..., None]
    q = np.clip(np.rint((x + (dmin[..., None] * mq)[..., None]) / step), 0, 15).astype(np.uint8)  # (N, nb, 8, 32)
    qs = q.reshape(N, nb, 4, 2, 32)
    qs = qs[:, :, :, 0] | (qs[:, :, :, 1] << 4)  # (N, nb, 4, 32)
    out = np.concatenate([d.astype(np.float16)[..., None].view(np.uint8), dmin.astype(np.float16)[..., None].view(np.uint8),
                          _encode_k4_scales(sc, mq), qs.reshape(N, nb, 128)], axis=-1)
    return out.reshape(N, nb * 144)


def _quant_q6_k(W: np.ndarray) -> np.ndarray:
    N, K = W.shape
    nb = K // 256
    x = W.reshape(N, nb, 16, 16).astype(np.float32)
    s = np.maximum(np.abs(x).max(-1) / 31.0, 1e-12)  # (N, nb, 16): w ≈ s·(q − 32)
    d = np.maximum(s.max(-1) / 127.0, 1e-12).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(s / d[..., None]), 1, 127).astype(np.int8)
    q = np.clip(np.rint(x / (d[..., None] * sc)[..., None]) + 32, 0, 63).astype(np.uint8).reshape(N, nb, 2, 4, 32)
    q1, q2, q3, q4 = q[:, :, :, 0], q[:, :, :, 1], q[:, :, :, 2], q[:, :, :, 3]  # (N, nb, 2, 32)
    ql = np.concatenate([(q1 & 0xF) | ((q3 & 0xF) << 4), (q2 & 0xF) | ((q4 & 0xF) << 4)], axis=-1)  # (N, nb, 2, 64)
    qh = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    out = np.concatenate([ql.reshape(N, nb, 128), qh.reshape(N, nb, 64), sc.view(np.uint8).reshape(N, nb, 16),
                          d.astype(np.float16)[..., None].view(np.uint8)], axis=-1)
    return out.reshape(N, nb * 210)


def quantize(W: torch.Tensor, type_name: str) -> np.ndarray:
    """fp32 weights (N, K) -> raw GGUF rows (N, bytes per row) of `type_name`."""
    W = W.detach().float().cpu().numpy()
    if type_name == "Q4_K":
        return _quant_q4_k(W)
    if type_name == "Q6_K":
        return _quant_q6_k(W)
    if type_name not in TYPES:
        raise ValueError(f"no quantizer for {type_name} (have: {', '.join(TYPES)})")
    return _ggml_quant(W, type_name)
