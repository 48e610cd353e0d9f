"""Our own 4-bit x 8-bit CPU kernel for few-row drafter linears (AVX-512 VNNI), built on first use with the machine's
C++ compiler; `verispec.kernels.int4` falls back to PyTorch's int4 kernel wherever it cannot be built or run.

Why: a drafted token is a 1-row forward, and PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) spends its
time turning every 4-bit weight into a float before multiplying: it reaches far less than the machine's memory
bandwidth (see `scripts/drafter_kernels.py`). The scheme here is the one llama.cpp uses for Q4 x Q8 dot products:
the activations are quantized too, per group of 32 to int8 (scale dx = max|x| / 127), so a group's dot product is
integer work — one `vpdpbusd` multiplies 64 unsigned 4-bit weights by 64 int8 activations and adds them in fours.
Per output row n and group g, with weights w = q·d + m (q in 0..15, `verispec.kernels.int4.quantize_groups`):

    y[n] = Σ_g  d[n,g] · dx[g] · Σ_j q[n,g,j] · xq[g,j]  +  m[n,g] · Σ_j x[g,j]

The min term uses the exact fp32 sum of the activations; only the scale term sees their int8 rounding. Lossy like
every drafter backend: it changes how many drafts are accepted, never the output (the bench reports α̂).

Layout (`pack`): rows in blocks of 16, one SIMD lane per row, so a block's 16 results come out of the accumulators
with no horizontal sums. For row block b and group g, 256 bytes hold the 16 rows' 32 weights as 8 steps of 4:
byte t·64 + i·4 + e has step 2t in its low nibble and step 2t + 1 in its high nibble, for row i and element
s·4 + e of the group. Scales d and minima m are fp16, 16 per (block, group). Memory: 0.5 B + 4 B per 32 weights
= 0.625 B per weight, the same as PyTorch's int4 layout. Needs the output width to be a multiple of 16 and the input
width a multiple of 32 (the int4 layer pads the first and refuses the second).

Threads: row blocks are split over torch's intra-op threads (`at::parallel_for`; the extension links the same
OpenMP runtime torch loaded). Build: `torch.utils.cpp_extension.load_inline` with `-O3` and the AVX-512 VNNI / F16C /
FMA flags by name (not -march=native), into `<verispec cache>/kernels/<hash of source, compiler flags, torch version
and CPU flags>`, ~25 s once per machine.
`VERISPEC_NO_KERNEL_BUILD=1` skips the build (PyTorch's kernel is used).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings

import torch

from verispec.home import cache_root
from verispec.kernels.cpu import cpu_flags

NO_BUILD_ENV = "VERISPEC_NO_KERNEL_BUILD"
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c")

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>

// Per row r and group g of 32 inputs: xq = round(x / dx) in int8 with dx = max|x| / 127, and sx = sum of x.
static void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx) {
  const int64_t G = K / 32;
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* v = x + r * K + g * 32;
      float amax = 0.f, s = 0.f;
      for (int j = 0; j < 32; ++j) { amax = std::max(amax, std::fabs(v[j])); s += v[j]; }
      const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      int8_t* o = xq + r * K + g * 32;
      for (int j = 0; j < 32; ++j) o[j] = (int8_t)std::nearbyint(v[j] * id);
      dx[r * G + g] = d;
      sx[r * G + g] = s;
    }
  }
}

// y (M, N) = x (M, K) times the packed 4-bit weight; w (N/16, G, 256) uint8, d and m (N/16, G, 16) fp16.
torch::Tensor q4_mm(torch::Tensor x, torch::Tensor w, torch::Tensor d, torch::Tensor m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous (M, K) fp32");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 256 && w.scalar_type() == torch::kByte && w.is_contiguous(), "w layout");
  const int64_t M = x.size(0), K = x.size(1), NB = w.size(0), G = w.size(1), N = NB * 16;
  TORCH_CHECK(K == G * 32, "input width ", K, " != 32 x ", G, " groups");
  TORCH_CHECK(d.numel() == NB * G * 16 && m.numel() == NB * G * 16, "scale / min shapes");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  std::vector<int8_t> xq(M * K);
  std::vector<float> dx(M * G), sx(M * G);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data(), dx.data(), sx.data());
  const uint8_t* W = w.data_ptr<uint8_t>();
  const uint16_t* D = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* Mn = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  float* Y = y.data_ptr<float>();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  at::parallel_for(0, NB, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r0 = 0; r0 < M; r0 += 4) {
        const int64_t R = std::min<int64_t>(4, M - r0);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t g = 0; g < G; ++g) {
          const int64_t bg = b * G + g;
          const uint8_t* wp = W + bg * 256;
          // read in order: ask for the weights 16 groups early (measured ~20 % off a drafter token on Zen 5)
          for (int l = 0; l < 256; l += 64) _mm_prefetch((const char*)(wp + 16 * 256 + l), _MM_HINT_T0);
          __m512i q[8];
          for (int t = 0; t < 4; ++t) {
            const __m512i v = _mm512_loadu_si512(wp + 64 * t);
            q[2 * t] = _mm512_and_si512(v, low4);
            q[2 * t + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          }
          const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(D + bg * 16)));
          const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(Mn + bg * 16)));
          for (int64_t r = 0; r < R; ++r) {
            const int8_t* xr = xq.data() + (r0 + r) * K + g * 32;
            __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
            for (int s = 0; s < 8; s += 2) {
              int32_t a, c;
              std::memcpy(&a, xr + 4 * s, 4);
              std::memcpy(&c, xr + 4 * s + 4, 4);
              i0 = _mm512_dpbusd_epi32(i0, q[s], _mm512_set1_epi32(a));
              i1 = _mm512_dpbusd_epi32(i1, q[s + 1], _mm512_set1_epi32(c));
            }
            const int64_t rg = (r0 + r) * G + g;
            const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
            acc[r] = _mm512_fmadd_ps(f, _mm512_mul_ps(dv, _mm512_set1_ps(dx[rg])), acc[r]);
            acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[rg]), acc[r]);
          }
        }
        for (int64_t r = 0; r < R; ++r) _mm512_storeu_ps(Y + (r0 + r) * N + b * 16, acc[r]);
      }
    }
  });
  return y;
}
"""

# the instruction sets NEEDED_FLAGS checks, by name: never -march=native (a VM may list instructions it refuses)
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-mavx2"]


@functools.lru_cache(maxsize=1)
def q4_kernel():
    """The compiled extension (its `q4_mm`), or None where this machine cannot build or run it (reason warned)."""
    if os.environ.get(NO_BUILD_ENV) == "1":
        return None
    flags = cpu_flags()
    missing = [f for f in NEEDED_FLAGS if f not in flags]
    if missing:
        return None  # not an AVX-512 VNNI CPU: PyTorch's int4 kernel serves
    key = hashlib.sha256("\n".join([SOURCE, " ".join(CFLAGS), torch.__version__,
                                    " ".join(sorted(flags))]).encode()).hexdigest()[:16]
    build = cache_root() / "kernels" / f"q4_{key}"
    try:
        if not any(build.glob("*.so")):
            print(f"[verispec] building the q4 kernel into {build} (once, ~25 s)", file=sys.stderr, flush=True)
        build.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load_inline

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = load_inline(f"verispec_q4_{key}", cpp_sources=[SOURCE], functions=["q4_mm"],
                              extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], build_directory=str(build),
                              verbose=False)
        if not _self_test(mod):
            warnings.warn("verispec: the built q4 kernel failed its self-test; using PyTorch's int4 kernel",
                          RuntimeWarning, stacklevel=2)
            return None
        return mod
    except Exception as e:  # noqa: BLE001 - no compiler, no headers, a failed build: the fallback always works
        warnings.warn(f"verispec: could not build the q4 kernel ({type(e).__name__}: {str(e)[:200]}); "
                      "using PyTorch's int4 kernel", RuntimeWarning, stacklevel=2)
        return None


def pack(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor):
    """q (N, K) in 0..15, scale and lo (N, K/32) -> w (N/16, G, 256) uint8, d and m (N/16, G, 16) fp16."""
    N, K = q.shape
    G = K // 32
    steps = q.to(torch.uint8).reshape(N // 16, 16, G, 8, 4).permute(0, 2, 3, 1, 4)  # (NB, G, s, i, e)
    steps = steps.reshape(N // 16, G, 4, 2, 64)  # (NB, G, t, step 2t / 2t + 1, i·4 + e)
    w = (steps[:, :, :, 0] | (steps[:, :, :, 1] << 4)).reshape(N // 16, G, 256).contiguous()
    d = scale.reshape(N // 16, 16, G).transpose(1, 2).to(torch.float16).contiguous()  # (NB, G, 16)
    m = lo.reshape(N // 16, 16, G).transpose(1, 2).to(torch.float16).contiguous()  # (NB, G, 16)
    return w, d, m


def q4_mm(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(M, K) fp32 -> (M, N) fp32 through the compiled kernel (which must be available)."""
    return q4_kernel().q4_mm(x, w, d, m)


def reference(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in plain torch: (M, K) fp32 -> (M, N); for tests and the layers' probes."""
    NB, G, _ = w.shape
    w = w.reshape(NB, G, 4, 64)  # (NB, G, t, i·4 + e)
    steps = torch.stack([w & 15, w >> 4], dim=3).reshape(NB, G, 8, 16, 4)  # (NB, G, s = 2t + nibble, i, e)
    q = steps.permute(0, 3, 1, 2, 4).reshape(NB * 16, G, 32).float()  # (N, G, 32)
    d = d.transpose(1, 2).reshape(NB * 16, G).float()  # (N, G)
    m = m.transpose(1, 2).reshape(NB * 16, G).float()  # (N, G)
    xg = x.float().reshape(x.shape[0], G, 32)  # (M, G, 32)
    amax = xg.abs().amax(-1, keepdim=True)  # (M, G, 1)
    dx = amax / 127
    inv = torch.full_like(amax, 127.0).div(amax.clamp(min=1e-30))  # 127 / amax as the kernel divides (not 1/amax·127)
    xq = torch.where(amax > 0, torch.round(xg * inv), torch.zeros_like(xg))  # (M, G, 32) the int8 activations
    dots = torch.einsum("ngj,rgj->rng", q, xq)  # (M, N, G) the integer dot products
    return (dots * d * dx.transpose(1, 2)).sum(-1) + xg.sum(-1) @ m.T  # (M, N)


def _self_test(mod) -> bool:
    """One 32 x 64 layer against `reference`."""
    g = torch.Generator().manual_seed(0)
    w, d, m = pack(torch.randint(0, 16, (32, 64), generator=g), torch.rand(32, 2, generator=g) * 0.1,
                   -torch.rand(32, 2, generator=g))
    x = torch.randn(3, 64, generator=g)
    try:
        got = mod.q4_mm(x, w, d, m)
    except RuntimeError:
        return False
    return torch.allclose(got, reference(x, w, d, m), rtol=1e-4, atol=1e-3)
