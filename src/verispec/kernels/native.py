"""Native-precision kernels: multiply with a GGUF file's own blocks, and compute every other per-row operation of a
decoder (RMSNorm, SiLU·up, attention) so that a row's result never depends on the other rows of the forward.

Linear (`qmm`): the integer scheme of `verispec.kernels.ggml_blocks` — activations quantized per row and superblock
to int8, integer dot products (`vpdpbusd` on AVX-512 VNNI; `vpmaddubsw` + `vpmaddwd` on AVX2; plain loops
elsewhere), and per superblock one fixed sequence of fp32 operations, y += (D·dx)·A − ((Dm·mn_scale)·dx)·B, with
no fused multiply-add (built with -ffp-contract=off). The integer sums are exact, and the fp32 sequence is the same
for every row, every row count and every instruction set: the AVX-512, AVX2, generic C++ and torch paths give
**bit-identical** outputs (tested), and a row's output is the same alone or among others (batch invariance by
construction). `qmm_torch` is that computation in torch (float64 matmuls of integers, exact), for machines without
a compiler.

Per-row operations, each computed in a fixed order per row (attention: per row and kv head, for all the query heads
that share it, so each key and value is read once):
- `rmsnorm`: sum of squares in 16 interleaved partial sums, then a fixed pairwise tree; y = w·(x·(1/√(ms+ε))).
- `silu_mul`: g / (1 + exp(−g)) · u with one exp polynomial (Cephes' expf) for every element.
- `attention`: per (head, query row): the scores of the keys that row may see, in key order (masked keys are
  skipped, not added as zeros; on AVX-512 with head width 64 or 128 each score is one fused multiply-add chain with
  the query held in registers), softmax with the same exp, and the weighted sum of values in key order. A node of a
  token tree sees its ancestors in the same order as the same token's row in a chain, so its result is identical.
Their torch fallbacks loop over rows (each row its own call on the keys it sees): invariant, slower, and not
bit-identical to the C++ ones (different exp and summation order).

Build: `torch.utils.cpp_extension.load_inline`, once per machine into `<verispec cache>/kernels/native_<variant>_<hash>`.
Variants, tried in this order where the CPU's flags allow: "avx512_amx" (the avx512_vnni code, plus Intel AMX tiles
for Q4_K from `amx_rows` = 9 activation rows on; a VM may list AMX and refuse it, so this variant is used only after
its self-test passed in a child process), "avx512_vnni" (-mavx512f/bw/vl/vnni, never -march=native: a VM may list
instructions it refuses), "avx2", "generic" (no ISA flags). On AMX, Q4_K's 6-bit group scales are split as
sc = sc_lo + 8·sc_hi (both ≤ 7) so that the products q·sc_lo and q·sc_hi fit a byte: two tile products per 64 inputs
give A = C_lo + 8·C_hi for 16 rows at once, the same exact integers, followed by the same fp32 steps: the same bits.
`VERISPEC_AMX_MIN_ROWS` moves the row count (tests force both codes). Each built variant must
reproduce `qmm_torch` bit for bit on a self-test of every block type before it is used; otherwise the next one is
tried, and "torch" always works. `VERISPEC_NATIVE_PATH=avx512_vnni|avx2|generic|torch` forces a path;
`VERISPEC_NO_KERNEL_BUILD=1` skips building (torch path).
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
from verispec.kernels.q4kernel import SOURCE as Q4_SOURCE

PATH_ENV = "VERISPEC_NATIVE_PATH"
NO_BUILD_ENV = "VERISPEC_NO_KERNEL_BUILD"

VARIANTS: dict[str, tuple[tuple[str, ...], list[str]]] = {  # name -> (CPU flags needed, compiler flags)
    "avx512_amx": (("amx_tile", "amx_int8", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma", "avx2"),
                   ["-mamx-tile", "-mamx-int8", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c",
                    "-mfma", "-mavx2"]),
    "avx512_vnni": (("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma", "avx2"),
                    ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-mavx2"]),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    "generic": ((), []),
}
BASE_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VS_PATH "avx512_vnni"
#define VS_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VS_PATH "avx2"
#define VS_AVX2 1
#else
#define VS_PATH "generic"
#endif
#if defined(VS_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define VS_AMX 1  // Intel AMX: 16-row integer tiles for passes of 16 activation rows (same integers, same fp32 steps)
#undef VS_PATH
#define VS_PATH "avx512_amx"
#include <sys/syscall.h>
#include <unistd.h>
#endif

std::string path() { return VS_PATH; }

#if defined(VS_AMX)
static int64_t g_amx_min_rows = 9;  // fewer rows run the vpdpbusd code (one 8-row pass is cheaper than a tile pass; same bits)
// Linux hands a process the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18)
static bool amx_permit() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}
struct TileCfg { uint8_t palette_id, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
static void amx_config() {  // all 8 tiles 16 rows x 64 bytes
  TileCfg c;
  std::memset(&c, 0, sizeof c);
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }
  _tile_loadconfig(&c);
}
#endif

// The row count from which qmm uses AMX tiles (n >= 0 sets it); -1 where this build has no AMX or the OS refuses it.
int64_t amx_rows(int64_t n) {
#if defined(VS_AMX)
  if (!amx_permit()) return -1;
  if (n >= 0) g_amx_min_rows = n;
  return g_amx_min_rows;
#else
  (void)n;
  return -1;
#endif
}

static inline float h2f(uint16_t h) {  // IEEE half -> float, exact
  const uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  uint32_t bits;
  if (e == 0) {
    if (m == 0) bits = s;
    else { float f = std::ldexp((float)m, -24); std::memcpy(&bits, &f, 4); bits |= s; }
  } else if (e == 31) bits = s | 0x7F800000u | (m << 13);
  else bits = s | ((e + 112) << 23) | (m << 13);
  float f; std::memcpy(&f, &bits, 4); return f;
}

// Per row r and superblock s of SB inputs: xq = round(x / dx) in int8, dx = max|x| / 127; xs = sum of xq per group.
// Rows in parallel; on AVX-512 16 inputs per instruction: the max is exact in any order, v * (127 / amax) the same
// fp32 product, rounded to nearest even as nearbyint does, the integer sums exact: the scalar code's bytes.
static void quantize_acts(const float* x, int64_t M, int64_t K, int64_t SB, int64_t GS,
                          int8_t* xq, float* dx, int32_t* xs) {
  const int64_t NS = K / SB, G = K / GS;
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t s = 0; s < NS; ++s) {
        const float* v = x + r * K + s * SB;
        int8_t* o = xq + r * K + s * SB;
#if defined(VS_AVX512)
        if (SB % 16 == 0) {
          __m512 m = _mm512_setzero_ps();
          for (int64_t j = 0; j < SB; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(v + j)));
          const float amax = _mm512_reduce_max_ps(m);
          const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
          const __m512 idv = _mm512_set1_ps(id), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
          for (int64_t j = 0; j < SB; j += 16) {
            __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(v + j), idv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            t = _mm512_max_ps(lo, _mm512_min_ps(hi, t));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
          }
          dx[r * NS + s] = d;
          continue;
        }
#endif
        float amax = 0.f;
        for (int64_t j = 0; j < SB; ++j) amax = std::max(amax, std::fabs(v[j]));
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        for (int64_t j = 0; j < SB; ++j) {
          float t = std::nearbyint(v[j] * id);
          o[j] = (int8_t)std::min(127.f, std::max(-127.f, t));
        }
        dx[r * NS + s] = d;
      }
      for (int64_t g = 0; g < G; ++g) {
        const int8_t* q = xq + r * K + g * GS;
        int64_t j = 0;
        int32_t t = 0;
#if defined(VS_AVX512)
        __m512i acc = _mm512_setzero_si512();
        for (; j + 16 <= GS; j += 16)
          acc = _mm512_add_epi32(acc, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j))));
        t = _mm512_reduce_add_epi32(acc);
#endif
        for (; j < GS; ++j) t += q[j];
        xs[r * G + g] = t;
      }
    }
  });
}

#if defined(VS_AVX512)
// A full pass of RB activation rows over one group: RB independent vpdpbusd chains, everything unrolled at compile
// time so the codes and accumulators stay in registers.
template <int RB, int STEPS>
static inline void full_pass(__m512i* A, const __m512i* qv, __m512i scv, const int8_t* x0, int64_t K) {
  __m512i I[RB];
  for (int r = 0; r < RB; ++r) I[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int s = 0; s < STEPS; ++s) {
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      int32_t a; std::memcpy(&a, x0 + r * K + 4 * s, 4);
      I[r] = _mm512_dpbusd_epi32(I[r], qv[s], _mm512_set1_epi32(a));
    }
  }
  for (int r = 0; r < RB; ++r) A[r] = _mm512_add_epi32(A[r], _mm512_mullo_epi32(I[r], scv));
}

// One superblock S of row block b for R activation rows, after its integer sums A (per row, 16 lanes): the mins term
// B = sum_g mn_g xs_g and acc[r] += (D dx) A - ((Dm mn_scale) dx) B. The vpdpbusd and the AMX code both end here, so
// their fp32 steps are one code.
static inline void superblock_fp32(__m512* acc, const __m512i* A, int64_t R, int64_t b, int64_t S, int64_t r0,
                                   int64_t NS, int64_t G, int64_t GPS, const int8_t* MN, const uint16_t* DD,
                                   const uint16_t* DM, float mn_scale, const int16_t* xs, const float* dx,
                                   int addB = -1) {
  // lane i of group g next to lane i of group g + 1, as int16 pairs (for vpmaddwd with (X_g, X_g+1))
  const __m512i ilv = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const int64_t bs = (b * NS + S) * 16, g0 = S * GPS;
  const __m512 Dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(DD + bs)));
  const __m512 Dms = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(DM + bs))),
                                   _mm512_set1_ps(mn_scale));
  __m512i mp[8];
  if (GPS % 2 == 0)
    for (int64_t k = 0; k < GPS / 2; ++k)
      mp[k] = _mm512_permutexvar_epi16(ilv, _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(MN + (b * G + g0 + 2 * k) * 16))));
  for (int64_t r = 0; r < R; ++r) {
    const int16_t* X = xs + (r0 + r) * G + g0;
    __m512i Bv = _mm512_setzero_si512();
    if (GPS % 2 == 0) {
      for (int64_t k = 0; k < GPS / 2; ++k) {
        int32_t pair;  // (X_2k, X_2k+1) as one int16 pair: one load
        std::memcpy(&pair, X + 2 * k, 4);
        Bv = _mm512_add_epi32(Bv, _mm512_madd_epi16(mp[k], _mm512_set1_epi32(pair)));
      }
    } else {
      for (int64_t k = 0; k < GPS; ++k)
        Bv = _mm512_add_epi32(Bv, _mm512_mullo_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(MN + (b * G + g0 + k) * 16))), _mm512_set1_epi32(X[k])));
    }
    const __m512 dxv = _mm512_set1_ps(dx[(r0 + r) * NS + S]);
    // addB >= 0 (AMX Q6_K, whose tiles sum the centred codes q - 32 = A - 32 B): the same integer A, exactly
    const __m512i Ar = addB >= 0 ? _mm512_add_epi32(A[r], _mm512_slli_epi32(Bv, addB)) : A[r];
    const __m512 t2 = _mm512_mul_ps(_mm512_mul_ps(Dv, dxv), _mm512_cvtepi32_ps(Ar));
    const __m512 t4 = _mm512_mul_ps(_mm512_mul_ps(Dms, dxv), _mm512_cvtepi32_ps(Bv));
    acc[r] = _mm512_add_ps(acc[r], _mm512_sub_ps(t2, t4));
  }
}
#endif

#if defined(VS_AVX512)
struct VnniArgs {
  const uint8_t* Q; const int8_t* SC; const int8_t* MN; const uint16_t* DD; const uint16_t* DM;
  const int8_t* xq; const int16_t* xs16; const float* dx;
  int64_t K, G, NS, qbytes; float mn_scale;
};

// One pass of R <= 8 activation rows over row block b (16 outputs) on vpdpbusd: out[r][i] for rows r0..r0 + R - 1.
// BITS, STEPS, GPS_T > 0 fix the code's shape at compile time (one instance per block type); 0 reads them from
// bits_rt, steps_rt, gps_rt. Every instance runs the same integer and fp32 steps in the same order: the same bits.
template <int BITS, int STEPS, int GPS_T>
static __attribute__((noinline)) void vnni_pass(const VnniArgs& va, int64_t b, int64_t r0, int64_t R,
                                                float (*out)[16], int64_t bits_rt = 0, int64_t steps_rt = 0,
                                                int64_t gps_rt = 0) {
  constexpr int RB = 8;
  const int64_t bits = BITS ? BITS : bits_rt, steps = STEPS ? STEPS : steps_rt, GPS = GPS_T ? GPS_T : gps_rt;
  const uint8_t* Q = va.Q; const int8_t* SC = va.SC; const int8_t* MN = va.MN;
  const int64_t K = va.K, G = va.G, NS = va.NS, GS = 4 * steps;
  const int64_t qbytes = BITS ? (BITS == 4 ? STEPS * 32 : BITS == 6 ? STEPS * 48 : STEPS * 64) : va.qbytes;
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t S = 0; S < NS; ++S) {
    __m512i A[RB];
    for (int r = 0; r < RB; ++r) A[r] = _mm512_setzero_si512();
    for (int64_t g = S * GPS; g < (S + 1) * GPS; ++g) {
      const int64_t bg = b * G + g;
      const uint8_t* wp = Q + bg * qbytes;
      __m512i qv[8];
      // the weights are read once, in order: ask for them 16 groups early (the hardware prefetcher alone leaves the
      // loads of a multi-row pass waiting on memory; measured 20 % off a forward of 8 rows)
      for (int64_t l = 0; l < qbytes; l += 64) _mm_prefetch((const char*)(wp + 16 * qbytes + l), _MM_HINT_T0);
      if (bits != 8) {
        for (int64_t t = 0; t < steps / 2; ++t) {
          const __m512i v = _mm512_loadu_si512(wp + 64 * t);
          qv[2 * t] = _mm512_and_si512(v, low4);
          qv[2 * t + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        if (bits == 6) {  // bits 4, 5 of each code: 2 bits per step, 4 steps per byte
          const __m512i m2 = _mm512_set1_epi8(0x30);
          for (int64_t u = 0; u < steps / 4; ++u) {
            const __m512i h = _mm512_loadu_si512(wp + steps * 32 + 64 * u);
            qv[4 * u] = _mm512_or_si512(qv[4 * u], _mm512_and_si512(_mm512_slli_epi16(h, 4), m2));
            qv[4 * u + 1] = _mm512_or_si512(qv[4 * u + 1], _mm512_and_si512(_mm512_slli_epi16(h, 2), m2));
            qv[4 * u + 2] = _mm512_or_si512(qv[4 * u + 2], _mm512_and_si512(h, m2));
            qv[4 * u + 3] = _mm512_or_si512(qv[4 * u + 3], _mm512_and_si512(_mm512_srli_epi16(h, 2), m2));
          }
        }
      } else {
        for (int64_t s = 0; s < steps; ++s) qv[s] = _mm512_loadu_si512(wp + 64 * s);
      }
      const __m512i scv = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(SC + bg * 16)));
      // Independent accumulation chains hide vpdpbusd's latency (one chain per row of a full pass; two per row
      // otherwise). Integer sums are exact in any order, so the result is the same bits.
      const int8_t* x0 = va.xq + r0 * K + g * GS;
      if (R == RB && steps == 8) {
        full_pass<RB, 8>(A, qv, scv, x0, K);
      } else if (R == RB && steps == 4) {
        full_pass<RB, 4>(A, qv, scv, x0, K);
      } else {
        for (int64_t r = 0; r < R; ++r) {
          const int8_t* xr = x0 + r * K;
          __m512i I0 = _mm512_setzero_si512(), I1 = _mm512_setzero_si512();
          for (int64_t s = 0; s + 1 < steps; s += 2) {
            int32_t a, b2; std::memcpy(&a, xr + 4 * s, 4); std::memcpy(&b2, xr + 4 * s + 4, 4);
            I0 = _mm512_dpbusd_epi32(I0, qv[s], _mm512_set1_epi32(a));
            I1 = _mm512_dpbusd_epi32(I1, qv[s + 1], _mm512_set1_epi32(b2));
          }
          if (steps % 2) {
            int32_t a; std::memcpy(&a, xr + 4 * (steps - 1), 4);
            I0 = _mm512_dpbusd_epi32(I0, qv[steps - 1], _mm512_set1_epi32(a));
          }
          A[r] = _mm512_add_epi32(A[r], _mm512_mullo_epi32(_mm512_add_epi32(I0, I1), scv));
        }
      }
    }
    superblock_fp32(acc, A, R, b, S, r0, NS, G, GPS, MN, va.DD, va.DM, va.mn_scale, va.xs16, va.dx);
  }
  for (int64_t r = 0; r < R; ++r) _mm512_store_ps(out[r], acc[r]);
}
#endif

static constexpr int64_t QMM_CHUNK = 128;  // rows per chunk of a long input (qmm)

#if defined(VS_AMX)
// The software pipeline of both AMX codes, per 16-row pass over a row block: the codes of superblock S + 1 are made
// (make: this pass makes them; a later pass of a prefill reads those the first made) while the tile products of S
// run, and the fp32 steps of S - 1 read tile results stored one step earlier (a tile load or a vector load of data
// stored just before it waits for that store).
template <class Prep, class Tiles, class Post>
static inline void amx_pipeline(int64_t NS, bool make, Prep& prep, Tiles& tiles, Post& post) {
  if (make) prep(0);
  for (int64_t S = 0; S < NS; ++S) {
    if (S + 1 < NS && make) prep(S + 1);
    tiles(S);
    if (S > 0) post(S - 1);
  }
  post(NS - 1);
}
#endif

// y (M, N) = x (M, K) times packed integer weights (see verispec.kernels.ggml_blocks.pack).
torch::Tensor qmm(torch::Tensor x, torch::Tensor q, torch::Tensor sc, torch::Tensor mn, torch::Tensor D,
                  torch::Tensor Dm, int64_t N, int64_t SB, int64_t GS, int64_t bits, double mn_scale_d,
                  c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous (M, K) fp32");
  const int64_t M = x.size(0), K = x.size(1), NB = q.size(0), G = K / GS, NS = K / SB, GPS = SB / GS;
  // bits 4: two steps per 64-byte vector (nibbles); 6: those nibbles, then 4 steps' high 2 bits per 64 bytes; 8: bytes
  const int64_t steps = GS / 4, qbytes = bits == 4 ? steps * 32 : bits == 6 ? steps * 48 : steps * 64;
  TORCH_CHECK(bits == 4 || bits == 8 || (bits == 6 && steps % 4 == 0), "bits");
  TORCH_CHECK(K % SB == 0 && q.size(1) == G && q.size(2) == qbytes, "weight layout does not match the input");
  TORCH_CHECK(N <= NB * 16, "N");
  const float mn_scale = (float)mn_scale_d;
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  if (M > 2 * QMM_CHUNK) {  // a long prefill or a wide batch: chunks of rows whose activations stay in cache while
    // every row block's weights pass over them (all M rows at once stream M x K bytes again for each row block).
    // A row's arithmetic does not depend on the rows beside it, so the chunks give the same bits.
    for (int64_t r = 0; r < M; r += QMM_CHUNK) {
      const int64_t m = std::min<int64_t>(QMM_CHUNK, M - r);
      y.narrow(0, r, m).copy_(qmm(x.narrow(0, r, m), q, sc, mn, D, Dm, N, SB, GS, bits, mn_scale_d, bias));
    }
    return y;
  }
  // rows padded to a multiple of 16 with zeros: an AMX pass loads 16 activation rows whatever M is
  std::vector<int8_t> xq(((M + 15) / 16) * 16 * K);
  std::vector<float> dx(M * NS);
  std::vector<int32_t> xs(M * G);
  quantize_acts(x.data_ptr<float>(), M, K, SB, GS, xq.data(), dx.data(), xs.data());
  // |xs| <= GS * 127 fits int16: the AVX-512 mins term reads pairs of group sums with one load (vpmaddwd operands)
  std::vector<int16_t> xs16(xs.begin(), xs.end());
  const uint8_t* Q = q.data_ptr<uint8_t>();
  const int8_t* SC = sc.data_ptr<int8_t>();
  const int8_t* MN = mn.data_ptr<int8_t>();
  const uint16_t* DD = reinterpret_cast<const uint16_t*>(D.data_ptr<at::Half>());
  const uint16_t* DM = reinterpret_cast<const uint16_t*>(Dm.data_ptr<at::Half>());
  const float* BIAS = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
#if defined(VS_AMX)
  // AMX for Q4_K only: other types' scales do not split into byte-sized products (their groups stay on vpdpbusd)
  const bool use_amx = bits == 4 && GS == 32 && GPS % 2 == 0 && GPS <= 16 && M >= g_amx_min_rows && amx_permit();
  // Q6_K (its offsets are its scales: mn is sc, so the mins term B = sum_g sc_g xs_g) on signed tiles, see below
  // (from 9 rows at least: below, its digit pass per superblock costs more than the one 8-row vpdpbusd pass it saves)
  const bool use_amx6 = bits == 6 && GS == 16 && GPS == 16 && MN == SC && M >= std::max<int64_t>(g_amx_min_rows, 9) &&
                        amx_permit();
#endif
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
#if defined(VS_AVX512)
    constexpr int RB = 8;  // activation rows per pass over a row block's weights (weights unpacked once per pass)
#else
    constexpr int RB = 4;  // AVX2 has 16 vector registers
#endif
    alignas(64) float out[16][16];
    auto emit = [&](int64_t b, int64_t r0, int64_t R) {
      const int64_t n0 = b * 16, nn = std::min<int64_t>(16, N - n0);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < nn; ++i)
          Y[(r0 + r) * N + n0 + i] = BIAS ? out[r][i] + BIAS[n0 + i] : out[r][i];
    };
#if defined(VS_AMX)
    if (use_amx) {
      // Q4_K on AMX tiles. Its group scales are 6 bits: sc = sc_lo + 8 sc_hi with both in 0..7, so the products
      // q sc_lo and q sc_hi (q <= 15) fit a byte, and two tile products over them sum a superblock's
      // A = sum_g sc_g sum_j q x8 = C_lo + 8 C_hi exactly, 16 activation rows at once. Those are the integers the
      // vpdpbusd code computes; the mins term and the fp32 steps after them are its code. So: the same bits.
      // Software-pipelined per superblock S: the codes of S + 1 are scaled while the tile products of S run, and
      // the fp32 steps of S - 1 read tile results stored one step earlier (a tile load or a vector load of data
      // stored just before it waits for that store).
      amx_config();
      const int64_t PRS = GPS / 2;  // tile products (64 inputs) per superblock
      // scaled codes, [superblock][pair][lo, hi][16 x 64]: a ring of 2 superblocks for one 16-row pass; for more
      // rows (a prefill) all of a row block's, laid out by the first pass and read again by the others
      const bool keep = M > 16;
      std::vector<uint8_t> Bw_v(((keep ? NS : 2) * 8 * 2048) + 64);
      uint8_t* Bw0 = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(Bw_v.data()) + 63) & ~uintptr_t(63));
      auto Bw = [&](int64_t S) { return Bw0 + (keep ? S : S & 1) * 8 * 2048; };
      alignas(64) int32_t Ib[2][2][16][16];  // [S parity][lo, hi][row][lane]
      const __m512i low4 = _mm512_set1_epi8(0x0F);
      for (int64_t b = b0; b < b1; ++b) {
        auto prep = [&](int64_t S) {  // scaled codes of S: pair p, half h at Bw(S) + p * 2048 + 512 h
          for (int64_t gi = 0; gi < GPS; ++gi) {
            const int64_t bg = b * G + S * GPS + gi;
            const uint8_t* wp = Q + bg * qbytes;
            for (int64_t l = 0; l < qbytes; l += 64) _mm_prefetch((const char*)(wp + 16 * qbytes + l), _MM_HINT_T0);
            const __m512i sc32 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(SC + bg * 16)));
            __m512i sl = _mm512_and_si512(sc32, _mm512_set1_epi32(7)), sh = _mm512_srli_epi32(sc32, 3);
            sl = _mm512_or_si512(sl, _mm512_slli_epi32(sl, 16));  // a lane's scale in both of its 16-bit halves
            sh = _mm512_or_si512(sh, _mm512_slli_epi32(sh, 16));
            uint8_t* lo_t = Bw(S) + (gi / 2) * 2048 + 512 * (gi % 2);
            for (int64_t t = 0; t < 4; ++t) {  // q <= 15, s <= 7: 16-bit products never carry into the next byte
              const __m512i v = _mm512_loadu_si512(wp + 64 * t);
              const __m512i c0 = _mm512_and_si512(v, low4), c1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
              _mm512_store_si512(lo_t + 128 * t, _mm512_mullo_epi16(c0, sl));
              _mm512_store_si512(lo_t + 128 * t + 64, _mm512_mullo_epi16(c1, sl));
              _mm512_store_si512(lo_t + 1024 + 128 * t, _mm512_mullo_epi16(c0, sh));
              _mm512_store_si512(lo_t + 1024 + 128 * t + 64, _mm512_mullo_epi16(c1, sh));
            }
          }
        };
        for (int64_t r0 = 0; r0 < M; r0 += 16) {
          const int64_t R = std::min<int64_t>(16, M - r0);
          auto tiles = [&](int64_t S) {  // C: 0 (codes x sc_lo), 1 (x sc_hi); activations 3 / 4; B 5, 6
            const int8_t* xa = xq.data() + r0 * K + S * SB;
            const uint8_t* w = Bw(S);
            _tile_zero(0); _tile_zero(1);
            for (int64_t pr = 0; pr < PRS; ++pr) {
              const uint8_t* wq = w + pr * 2048;
              _tile_loadd(5, wq, 64); _tile_loadd(6, wq + 1024, 64);
              if (pr & 1) {
                _tile_loadd(4, xa + 64 * pr, K);
                _tile_dpbsud(0, 4, 5); _tile_dpbsud(1, 4, 6);
              } else {
                _tile_loadd(3, xa + 64 * pr, K);
                _tile_dpbsud(0, 3, 5); _tile_dpbsud(1, 3, 6);
              }
            }
            _tile_stored(0, Ib[S & 1][0], 64); _tile_stored(1, Ib[S & 1][1], 64);
          };
          __m512 acc[16];
          auto post = [&](int64_t S) {
            __m512i A[16];
            for (int64_t r = 0; r < R; ++r)
              A[r] = _mm512_add_epi32(_mm512_load_si512(Ib[S & 1][0][r]),
                                      _mm512_slli_epi32(_mm512_load_si512(Ib[S & 1][1][r]), 3));
            superblock_fp32(acc, A, R, b, S, r0, NS, G, GPS, MN, DD, DM, mn_scale, xs16.data(), dx.data());
          };
          for (int64_t r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
          amx_pipeline(NS, r0 == 0 || !keep, prep, tiles, post);
          for (int64_t r = 0; r < R; ++r) _mm512_store_ps(out[r], acc[r]);
          emit(b, r0, R);
        }
      }
      _tile_release();
      return;
    }
    if (use_amx6) {
      // Q6_K on signed AMX tiles. Its group scales are int8 (-128..127) and its codes q are 0..63 for the values
      // sc (q - 32). Each scale is written in three base-8 digits sc = d0 + 8 d1 + 64 d2 with every digit in -3..4, so
      // the products c d_k of a centred code c = q - 32 (-32..31) fit a signed byte (-128..124), and three tile
      // products sum C_k = sum_g d_k,g sum_j c_j x_j exactly. C_0 + 8 C_1 + 64 C_2 = sum_g sc_g sum_j (q_j - 32) x_j
      // = A - 32 B, with A the vpdpbusd code's sum and B = sum_g sc_g xs_g its mins term (Q6_K's mn is its sc), so
      // A = that + (B << 5): the same integers, then the same fp32 steps (superblock_fp32): the same bits.
      // Pipelined per superblock as the Q4_K code: digits of S + 1 made while the tiles of S run, fp32 steps of S - 1.
      amx_config();
      // digit products, [superblock][k-step of 64 inputs (4 groups)][digit][16 rows x 64 bytes]: a ring of two
      // superblocks for one 16-row pass; for more rows all of a row block's, made by the first pass
      const bool keep = M > 16;
      constexpr int64_t BS6 = 4 * 3 * 1024;
      std::vector<uint8_t> Bw_v((keep ? NS : 2) * BS6 + 64);
      uint8_t* Bw0 = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(Bw_v.data()) + 63) & ~uintptr_t(63));
      auto Bw = [&](int64_t S) { return Bw0 + (keep ? S : S & 1) * BS6; };
      alignas(64) int32_t Ib[2][3][16][16];  // [S parity][digit][row][lane]
      const __m512i low4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x30), c32 = _mm512_set1_epi8(32);
      const __m512i lo8 = _mm512_set1_epi16(0x00FF), three = _mm512_set1_epi32(3), seven = _mm512_set1_epi32(7);
      for (int64_t b = b0; b < b1; ++b) {
        auto prep = [&](int64_t S) {
          for (int64_t gi = 0; gi < GPS; ++gi) {
            const int64_t bg = b * G + S * GPS + gi;
            const uint8_t* wp = Q + bg * qbytes;
            for (int64_t l = 0; l < qbytes; l += 64) _mm_prefetch((const char*)(wp + 16 * qbytes + l), _MM_HINT_T0);
            __m512i qv[4];
            for (int64_t t = 0; t < 2; ++t) {
              const __m512i v = _mm512_loadu_si512(wp + 64 * t);
              qv[2 * t] = _mm512_and_si512(v, low4);
              qv[2 * t + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            }
            const __m512i h = _mm512_loadu_si512(wp + 128);
            qv[0] = _mm512_or_si512(qv[0], _mm512_and_si512(_mm512_slli_epi16(h, 4), m2));
            qv[1] = _mm512_or_si512(qv[1], _mm512_and_si512(_mm512_slli_epi16(h, 2), m2));
            qv[2] = _mm512_or_si512(qv[2], _mm512_and_si512(h, m2));
            qv[3] = _mm512_or_si512(qv[3], _mm512_and_si512(_mm512_srli_epi16(h, 2), m2));
            // a lane's digits, in both 16-bit halves of its 32 bits (so one 16-bit multiply serves its 4 bytes)
            __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(SC + bg * 16)));
            __m512i dg[3];
            for (int k = 0; k < 3; ++k) {
              const __m512i d = k < 2 ? _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(sc, three), seven), three) : sc;
              sc = _mm512_srai_epi32(_mm512_sub_epi32(sc, d), 3);
              dg[k] = _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(d, 16));
            }
            uint8_t* base = Bw(S) + (gi / 4) * 3 * 1024 + (gi % 4) * 4 * 64;
            for (int64_t st = 0; st < 4; ++st) {
              const __m512i c = _mm512_sub_epi8(qv[st], c32);  // centred codes, -32..31
              const __m512i ce = _mm512_srai_epi16(_mm512_slli_epi16(c, 8), 8), co = _mm512_srai_epi16(c, 8);
              for (int k = 0; k < 3; ++k) {
                const __m512i pe = _mm512_mullo_epi16(ce, dg[k]), po = _mm512_mullo_epi16(co, dg[k]);
                _mm512_store_si512(base + k * 1024 + st * 64,
                                   _mm512_or_si512(_mm512_and_si512(pe, lo8), _mm512_slli_epi16(po, 8)));
              }
            }
          }
        };
        for (int64_t r0 = 0; r0 < M; r0 += 16) {
          const int64_t R = std::min<int64_t>(16, M - r0);
          auto tiles = [&](int64_t S) {  // C: 0, 1, 2 (the digits); activations 3 / 4; B 5, 6, 7
            const int8_t* xa = xq.data() + r0 * K + S * SB;
            const uint8_t* w = Bw(S);
            _tile_zero(0); _tile_zero(1); _tile_zero(2);
            for (int64_t t = 0; t < 4; ++t) {
              const uint8_t* wq = w + t * 3 * 1024;
              _tile_loadd(5, wq, 64); _tile_loadd(6, wq + 1024, 64); _tile_loadd(7, wq + 2048, 64);
              if (t & 1) {
                _tile_loadd(4, xa + 64 * t, K);
                _tile_dpbssd(0, 4, 5); _tile_dpbssd(1, 4, 6); _tile_dpbssd(2, 4, 7);
              } else {
                _tile_loadd(3, xa + 64 * t, K);
                _tile_dpbssd(0, 3, 5); _tile_dpbssd(1, 3, 6); _tile_dpbssd(2, 3, 7);
              }
            }
            _tile_stored(0, Ib[S & 1][0], 64); _tile_stored(1, Ib[S & 1][1], 64); _tile_stored(2, Ib[S & 1][2], 64);
          };
          __m512 acc[16];
          auto post = [&](int64_t S) {
            __m512i A[16];
            for (int64_t r = 0; r < R; ++r)
              A[r] = _mm512_add_epi32(_mm512_add_epi32(_mm512_load_si512(Ib[S & 1][0][r]),
                                                       _mm512_slli_epi32(_mm512_load_si512(Ib[S & 1][1][r]), 3)),
                                      _mm512_slli_epi32(_mm512_load_si512(Ib[S & 1][2][r]), 6));
            superblock_fp32(acc, A, R, b, S, r0, NS, G, GPS, MN, DD, DM, mn_scale, xs16.data(), dx.data(), 5);
          };
          for (int64_t r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
          amx_pipeline(NS, r0 == 0 || !keep, prep, tiles, post);
          for (int64_t r = 0; r < R; ++r) _mm512_store_ps(out[r], acc[r]);
          emit(b, r0, R);
        }
      }
      _tile_release();
      return;
    }
#endif
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r0 = 0; r0 < M; r0 += RB) {
        const int64_t R = std::min<int64_t>(RB, M - r0);
#if defined(VS_AVX512)
        // the code's shape (bits, steps per group, groups per superblock) fixed at compile time for the block types
        // the registry models hold: their loops unroll and the codes stay in registers (measured: the one
        // runtime-shaped loop left a Q4_K pass at 2.0 G vpdpbusd/s per core on Zen 4, ~60 % of one per cycle)
        const VnniArgs va{Q, SC, MN, DD, DM, xq.data(), xs16.data(), dx.data(), K, G, NS, qbytes, mn_scale};
        if (bits == 4 && steps == 8 && GPS == 8) vnni_pass<4, 8, 8>(va, b, r0, R, out);
        else if (bits == 6 && steps == 4 && GPS == 16) vnni_pass<6, 4, 16>(va, b, r0, R, out);
        else if (bits == 8 && steps == 8 && GPS == 1) vnni_pass<8, 8, 1>(va, b, r0, R, out);
        else if (bits == 4 && steps == 8 && GPS == 1) vnni_pass<4, 8, 1>(va, b, r0, R, out);
        else vnni_pass<0, 0, 0>(va, b, r0, R, out, bits, steps, GPS);
#elif defined(VS_AVX2)
        for (int h = 0; h < 2; ++h) {
          __m256 acc[RB];
          for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
          const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
          for (int64_t S = 0; S < NS; ++S) {
            __m256i A[RB], B[RB];
            for (int r = 0; r < RB; ++r) { A[r] = _mm256_setzero_si256(); B[r] = _mm256_setzero_si256(); }
            for (int64_t g = S * GPS; g < (S + 1) * GPS; ++g) {
              const int64_t bg = b * G + g;
              const uint8_t* wp = Q + bg * qbytes + 32 * h;
              if (h == 0)
                for (int64_t l = 0; l < qbytes; l += 64) _mm_prefetch((const char*)(wp + 16 * qbytes + l), _MM_HINT_T0);
              __m256i lo[8], hi[8];  // codes (bits 4: lo only; bits 8: low and high nibbles, exact with vpmaddubsw)
              if (bits != 8) {  // codes <= 63: one vpmaddubsw pair sum stays within int16
                for (int64_t t = 0; t < steps / 2; ++t) {
                  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 64 * t));
                  lo[2 * t] = _mm256_and_si256(v, low4);
                  lo[2 * t + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                }
                if (bits == 6) {
                  const __m256i m2 = _mm256_set1_epi8(0x30);
                  for (int64_t u = 0; u < steps / 4; ++u) {
                    const __m256i hv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + steps * 32 + 64 * u));
                    lo[4 * u] = _mm256_or_si256(lo[4 * u], _mm256_and_si256(_mm256_slli_epi16(hv, 4), m2));
                    lo[4 * u + 1] = _mm256_or_si256(lo[4 * u + 1], _mm256_and_si256(_mm256_slli_epi16(hv, 2), m2));
                    lo[4 * u + 2] = _mm256_or_si256(lo[4 * u + 2], _mm256_and_si256(hv, m2));
                    lo[4 * u + 3] = _mm256_or_si256(lo[4 * u + 3], _mm256_and_si256(_mm256_srli_epi16(hv, 2), m2));
                  }
                }
              } else {
                for (int64_t s = 0; s < steps; ++s) {
                  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 64 * s));
                  lo[s] = _mm256_and_si256(v, low4);
                  hi[s] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                }
              }
              const __m256i scv = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(SC + bg * 16 + 8 * h)));
              const __m256i mnv = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(MN + bg * 16 + 8 * h)));
              for (int64_t r = 0; r < R; ++r) {
                const int8_t* xr = xq.data() + (r0 + r) * K + g * GS;
                __m256i I = _mm256_setzero_si256();
                for (int64_t s = 0; s < steps; ++s) {
                  int32_t a; std::memcpy(&a, xr + 4 * s, 4);
                  const __m256i xa = _mm256_set1_epi32(a);
                  I = _mm256_add_epi32(I, _mm256_madd_epi16(_mm256_maddubs_epi16(lo[s], xa), ones));
                  if (bits == 8)
                    I = _mm256_add_epi32(I, _mm256_slli_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(hi[s], xa), ones), 4));
                }
                A[r] = _mm256_add_epi32(A[r], _mm256_mullo_epi32(I, scv));
                B[r] = _mm256_add_epi32(B[r], _mm256_mullo_epi32(mnv, _mm256_set1_epi32(xs[(r0 + r) * G + g])));
              }
            }
            const int64_t bs = (b * NS + S) * 16 + 8 * h;
            const __m256 Dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(DD + bs)));
            const __m256 Dms = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(DM + bs))),
                                             _mm256_set1_ps(mn_scale));
            for (int64_t r = 0; r < R; ++r) {
              const __m256 dxv = _mm256_set1_ps(dx[(r0 + r) * NS + S]);
              const __m256 t2 = _mm256_mul_ps(_mm256_mul_ps(Dv, dxv), _mm256_cvtepi32_ps(A[r]));
              const __m256 t4 = _mm256_mul_ps(_mm256_mul_ps(Dms, dxv), _mm256_cvtepi32_ps(B[r]));
              acc[r] = _mm256_add_ps(acc[r], _mm256_sub_ps(t2, t4));
            }
          }
          for (int64_t r = 0; r < R; ++r) _mm256_storeu_ps(out[r] + 8 * h, acc[r]);
        }
#else
        for (int64_t r = 0; r < R; ++r) for (int i = 0; i < 16; ++i) out[r][i] = 0.f;
        for (int64_t S = 0; S < NS; ++S) {
          int32_t A[RB][16] = {}, B[RB][16] = {};
          for (int64_t g = S * GPS; g < (S + 1) * GPS; ++g) {
            const int64_t bg = b * G + g;
            const uint8_t* wp = Q + bg * qbytes;
            for (int64_t r = 0; r < R; ++r) {
              const int8_t* xr = xq.data() + (r0 + r) * K + g * GS;
              const int32_t X = xs[(r0 + r) * G + g];
              for (int i = 0; i < 16; ++i) {
                int32_t I = 0;
                for (int64_t s = 0; s < steps; ++s)
                  for (int e = 0; e < 4; ++e) {
                    const int32_t c = bits == 8 ? wp[64 * s + 4 * i + e]
                        : (((wp[64 * (s / 2) + 4 * i + e] >> (4 * (s % 2))) & 15)
                           | (bits == 6 ? ((wp[steps * 32 + 64 * (s / 4) + 4 * i + e] >> (2 * (s % 4))) & 3) << 4 : 0));
                    I += c * xr[4 * s + e];
                  }
                A[r][i] += I * SC[bg * 16 + i];
                B[r][i] += MN[bg * 16 + i] * X;
              }
            }
          }
          const int64_t bs = (b * NS + S) * 16;
          for (int64_t r = 0; r < R; ++r) {
            const float d = dx[(r0 + r) * NS + S];
            for (int i = 0; i < 16; ++i) {
              const float t2 = (h2f(DD[bs + i]) * d) * (float)A[r][i];
              const float t4 = ((h2f(DM[bs + i]) * mn_scale) * d) * (float)B[r][i];
              out[r][i] = out[r][i] + (t2 - t4);
            }
          }
        }
#endif
        emit(b, r0, R);
      }
    }
  });
  return y;
}

// Cephes' expf polynomial: the same function for every element, wherever it sits in a row or a vector.
static inline float vs_exp(float x) {
  x = std::min(88.3762626647949f, std::max(-87.3365447504f, x));
  const float t = x * 1.44269504088896341f + 0.5f;
  int32_t n = (int32_t)t;  // floor(t), written so that loops over elements vectorize
  float fx = (float)n;
  if (fx > t) { fx = fx - 1.f; n = n - 1; }
  float r = x - fx * 0.693359375f;
  r = r - fx * (-2.12194440e-4f);
  const float r2 = r * r;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = (p * r2 + r) + 1.0f;
  return p * __builtin_bit_cast(float, (uint32_t)(n + 127) << 23);
}

#if defined(VS_AVX512)
// vs_exp on 16 lanes: the same IEEE operations in the same order, so the same bits as vs_exp
static inline __m512 vs_exp16(__m512 x0) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), _mm512_max_ps(_mm512_set1_ps(-87.3365447504f), x0));
  const __m512 t = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(0.5f));
  __m512i nn = _mm512_cvttps_epi32(t);
  __m512 fx = _mm512_cvtepi32_ps(nn);
  const __mmask16 over = _mm512_cmp_ps_mask(fx, t, _CMP_GT_OQ);
  fx = _mm512_mask_sub_ps(fx, over, fx, one);
  nn = _mm512_mask_sub_epi32(nn, over, nn, _mm512_set1_epi32(1));
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(fx, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(fx, _mm512_set1_ps(-2.12194440e-4f)));
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, r2), r), one);
  const __m512 pw = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(nn, _mm512_set1_epi32(127)), 23));
  return _mm512_mul_ps(p, pw);
}
#endif

// 16 interleaved partial sums, then a fixed pairwise tree: the same order for every row and every path.
static inline float dot16(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
#if defined(VS_AVX512)
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (; j < n; j += 16) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j)));
    const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));  // p[l] + p[l+8]
    const __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));        // + p[l+4]
    const __m128 s2 = _mm_add_ps(a4, _mm_shuffle_ps(a4, a4, _MM_SHUFFLE(2, 3, 0, 1)));             // (0+1), (2+3)
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehl_ps(s2, s2)));
  }
#endif
  float p[16] = {};
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) p[l] = p[l] + a[j + l] * b[j + l];
  for (; j < n; ++j) p[j % 16] = p[j % 16] + a[j] * b[j];
  for (int l = 0; l < 8; ++l) p[l] = p[l] + p[l + 8];
  for (int l = 0; l < 4; ++l) p[l] = p[l] + p[l + 4];
  return (p[0] + p[1]) + (p[2] + p[3]);
}

torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "x: contiguous (M, H) fp32");
  const int64_t M = x.size(0), H = x.size(1);
  auto y = torch::empty_like(x);
  const float* X = x.data_ptr<float>(); const float* W = w.data_ptr<float>(); float* Y = y.data_ptr<float>();
  const float e = (float)eps;
  at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = X + r * H;
      const float ms = dot16(v, v, H) / (float)H;
      const float inv = 1.f / std::sqrt(ms + e);
      for (int64_t j = 0; j < H; ++j) Y[r * H + j] = W[j] * (v[j] * inv);
    }
  });
  return y;
}

torch::Tensor silu_mul(torch::Tensor g, torch::Tensor u) {
  TORCH_CHECK(g.is_contiguous() && u.is_contiguous() && g.sizes() == u.sizes(), "g, u: same contiguous shape");
  auto y = torch::empty_like(g);
  const float* G = g.data_ptr<float>(); const float* U = u.data_ptr<float>(); float* Y = y.data_ptr<float>();
  const int64_t n = g.numel();
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#if defined(VS_AVX512)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= i1; i += 16) {
      const __m512 g = _mm512_loadu_ps(G + i);
      const __m512 e = vs_exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
      _mm512_storeu_ps(Y + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(U + i)));
    }
#endif
    for (; i < i1; ++i) Y[i] = (G[i] / (1.f + vs_exp(-G[i]))) * U[i];
  });
  return y;
}

#if defined(VS_AVX512)
// dot16's fixed tree on a vector of its 16 partial sums
static inline float tree16(__m512 acc) {
  const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
  const __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
  const __m128 s2 = _mm_add_ps(a4, _mm_shuffle_ps(a4, a4, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehl_ps(s2, s2)));
}
#endif

#if defined(VS_AVX512)
// Scores of one query row for the `rep` heads sharing a kv head, NV = Dh / 16 vectors per row: the q rows of up to
// 16 / NV heads stay in registers while the visible keys stream past, each score one fused multiply-add chain over
// the NV chunks in order, then tree16. A score's arithmetic depends on its q row and key only.
template <int NV>
static inline void scores_avx512(float* s, const std::function<const float*(int64_t)>& qrow, const float* kb,
                                 const int64_t* idx, int64_t n, int64_t rep, int64_t N, float scale) {
  constexpr int HG = 16 / NV;  // with the NV key / value vectors: 25 of the 32 zmm registers
  for (int64_t h0 = 0; h0 < rep; h0 += HG) {
    const int hn = (int)std::min<int64_t>(HG, rep - h0);
    __m512 qv[HG][NV];
    for (int hh = 0; hh < hn; ++hh)
      for (int c = 0; c < NV; ++c) qv[hh][c] = _mm512_loadu_ps(qrow(h0 + hh) + 16 * c);
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = kb + idx[j] * (16 * NV);
      __m512 kv[NV];
      for (int c = 0; c < NV; ++c) kv[c] = _mm512_loadu_ps(kj + 16 * c);
      for (int hh = 0; hh < hn; ++hh) {
        __m512 acc = _mm512_mul_ps(qv[hh][0], kv[0]);
        for (int c = 1; c < NV; ++c) acc = _mm512_fmadd_ps(qv[hh][c], kv[c], acc);
        s[(h0 + hh) * N + j] = tree16(acc) * scale;
      }
    }
  }
}

// o[h] = sum over the visible keys, in key order, of e[h, j] v_j: up to 16 / NV heads' sums held in registers, one
// fused multiply-add per element and key.
template <int NV>
static inline void values_avx512(float* o, const float* s, const float* vb, const int64_t* idx, int64_t n,
                                 int64_t rep, int64_t N) {
  constexpr int HG = 16 / NV;  // with the NV key / value vectors: 25 of the 32 zmm registers
  for (int64_t h0 = 0; h0 < rep; h0 += HG) {
    const int hn = (int)std::min<int64_t>(HG, rep - h0);
    __m512 acc[HG][NV];
    for (int hh = 0; hh < hn; ++hh)
      for (int c = 0; c < NV; ++c) acc[hh][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = vb + idx[j] * (16 * NV);
      __m512 vv[NV];
      for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(vj + 16 * c);
      for (int hh = 0; hh < hn; ++hh) {
        const __m512 e = _mm512_set1_ps(s[(h0 + hh) * N + j]);
        for (int c = 0; c < NV; ++c) acc[hh][c] = _mm512_fmadd_ps(e, vv[c], acc[hh][c]);
      }
    }
    for (int hh = 0; hh < hn; ++hh)
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + (h0 + hh) * 16 * NV + 16 * c, acc[hh][c]);
  }
}
#endif

// q (B, Hq, M, Dh) contiguous; the keys / values of (batch b, kv head kh) start at Kp / Vp + (b * Hkv + kh) * ks, one
// row of Dh per key; row i of batch b sees key j where Al[(b * M + i) * N + j], or (Al null: a causal chain after
// `causal` cached keys) where j <= causal + i. O (B, M, Hq, Dh) is zero on entry (rows that see nothing stay zero).
// One task per (batch, kv head, query row): the query heads that share a kv head read each key and value once.
// Per (query head, row) the arithmetic is fixed: the scores of the visible keys in key order (AVX-512 with Dh 64 or 128:
// scores_avx512; else dot16), vs_exp, their sum in key order, the values' weighted sum in key order (values_avx512, or
// a multiply and an add per element). It does not depend on M, N beyond the visible keys, or the mask.
static void attention_rows(const float* Qp, const float* Kp, const float* Vp, const bool* Al, int64_t causal,
                           int64_t B, int64_t Hq, int64_t M, int64_t Dh, int64_t Hkv, int64_t N, int64_t ks,
                           float scale, float* O) {
  const int64_t rep = Hq / Hkv;
  at::parallel_for(0, B * Hkv * M, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(rep * N), o(rep * Dh);
    std::vector<int64_t> idx(N);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (Hkv * M), kh = (t / M) % Hkv, i = t % M;
      const float* kb = Kp + (b * Hkv + kh) * ks;
      const float* vb = Vp + (b * Hkv + kh) * ks;
      int64_t n = 0;
      if (Al) {
        const bool* al = Al + (b * M + i) * N;
        for (int64_t j = 0; j < N; ++j)
          if (al[j]) idx[n++] = j;
      } else {
        for (int64_t j = 0; j <= causal + i && j < N; ++j) idx[n++] = j;
      }
      if (n == 0) continue;
      auto qrow = [&](int64_t hh) { return Qp + ((b * Hq + kh * rep + hh) * M + i) * Dh; };
#if defined(VS_AVX512)
      if (Dh == 64 || Dh == 128) {  // q of a few heads held in registers; one fused multiply-add chain per score
        if (Dh == 64) scores_avx512<4>(s.data(), qrow, kb, idx.data(), n, rep, N, scale);
        else scores_avx512<8>(s.data(), qrow, kb, idx.data(), n, rep, N, scale);
      } else
#endif
      for (int64_t c = 0; c < n; ++c)
        for (int64_t hh = 0; hh < rep; ++hh)
          s[hh * N + c] = dot16(qrow(hh), kb + idx[c] * Dh, Dh) * scale;
      for (int64_t hh = 0; hh < rep; ++hh) {
        float* sh = s.data() + hh * N;
        float mx = -INFINITY;
        for (int64_t c = 0; c < n; ++c) mx = std::max(mx, sh[c]);
        int64_t c = 0;
#if defined(VS_AVX512)
        for (const __m512 mv = _mm512_set1_ps(mx); c + 16 <= n; c += 16)
          _mm512_storeu_ps(sh + c, vs_exp16(_mm512_sub_ps(_mm512_loadu_ps(sh + c), mv)));
#endif
        for (; c < n; ++c) sh[c] = vs_exp(sh[c] - mx);
      }
      std::fill(o.begin(), o.end(), 0.f);
#if defined(VS_AVX512)
      if (Dh == 64 || Dh == 128) {
        if (Dh == 64) values_avx512<4>(o.data(), s.data(), vb, idx.data(), n, rep, N);
        else values_avx512<8>(o.data(), s.data(), vb, idx.data(), n, rep, N);
      } else
#endif
      for (int64_t c = 0; c < n; ++c) {  // values in key order; each value row read once for all heads
        const float* vj = vb + idx[c] * Dh;
        for (int64_t hh = 0; hh < rep; ++hh) {
          const float e = s[hh * N + c];
          float* oh = o.data() + hh * Dh;
          for (int64_t d = 0; d < Dh; ++d) oh[d] = oh[d] + e * vj[d];
        }
      }
      for (int64_t hh = 0; hh < rep; ++hh) {
        const float* sh = s.data() + hh * N;
        float l = 0.f;
        for (int64_t c = 0; c < n; ++c) l = l + sh[c];  // in key order
        float* od = O + ((b * M + i) * Hq + kh * rep + hh) * Dh;
        const float* oh = o.data() + hh * Dh;
        for (int64_t d = 0; d < Dh; ++d) od[d] = oh[d] / l;
      }
    }
  });
}

// q (B, Hq, M, Dh), k and v (B, Hkv, N, Dh), allowed (B, M, N) bool -> (B, M, Hq, Dh)
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor allowed, double scale_d) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && allowed.is_contiguous(), "contiguous");
  const int64_t B = q.size(0), Hq = q.size(1), M = q.size(2), Dh = q.size(3), Hkv = k.size(1), N = k.size(2);
  TORCH_CHECK(Hq % Hkv == 0 && allowed.size(1) == M && allowed.size(2) == N, "shapes");
  auto out = torch::zeros({B, M, Hq, Dh}, q.options());
  attention_rows(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), allowed.data_ptr<bool>(), 0, B, Hq,
                 M, Dh, Hkv, N, N * Dh, (float)scale_d, out.data_ptr<float>());
  return out;
}

// Heads of a projection output (T rows, row stride any, columns contiguous) as (H, T, hd), rotated by rotary cos / sin
// (T, hd) where rotate is true: transformers' q·cos + rotate_half(q)·sin with the same three roundings per element
// (rotate_half(q) = (−q[d + hd/2], q[d − hd/2])), so the same bits; one call instead of its ~10 torch operations.
torch::Tensor heads(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t H, bool rotate) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == torch::kFloat, "x: (T, H·hd) fp32 rows");
  const int64_t T = x.size(0), hd = x.size(1) / H, half = hd / 2, ld = x.stride(0);
  TORCH_CHECK(x.size(1) == H * hd && hd % 2 == 0, "x: H heads of an even width");
  if (rotate) TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == T && cos.size(1) == hd, "cos, sin: (T, hd)");
  auto out = torch::empty({H, T, hd}, x.options());
  const float* X = x.data_ptr<float>(); float* Y = out.data_ptr<float>();
  const float* C = rotate ? cos.data_ptr<float>() : nullptr; const float* S = rotate ? sin.data_ptr<float>() : nullptr;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < T; ++t) {
      const float* xr = X + t * ld + h * hd;
      float* yr = Y + (h * T + t) * hd;
      if (!rotate) { std::memcpy(yr, xr, hd * sizeof(float)); continue; }
      const float* c = C + t * hd; const float* sn = S + t * hd;
      for (int64_t d = 0; d < half; ++d) yr[d] = xr[d] * c[d] + (-xr[d + half]) * sn[d];
      for (int64_t d = half; d < hd; ++d) yr[d] = xr[d] * c[d] + xr[d - half] * sn[d];
    }
  return out;
}
"""

# verispec.kernels.q4kernel's 4-bit drafter kernel, in this extension too (namespace vq4, AVX-512 builds only), so that
# `step` can run a fast-int4 drafter's layers as well as a GGUF target's
_Q4_BODY = "\n".join(line for line in Q4_SOURCE.splitlines() if not line.startswith("#include"))
SOURCE += "\n#if defined(VS_AVX512)\nnamespace vq4 {\n" + _Q4_BODY + "\n}  // namespace vq4\n#endif\n"

SOURCE += r"""
// ---- A decoder forward in one call (verispec.backends.step): a causal chain, a token tree, or a ragged batch ----
// The layers' weights are registered once as a plan (plan_new); step runs every layer for T new rows after P cached
// ones (per segment of a ragged batch): rmsnorm, the q/k/v projections, heads with rotary, the new keys / values written into each layer's KV buffer
// (grown with spare capacity, so a token does not copy the whole cache), attention over the P + T visible keys, o,
// the residual, rmsnorm, gate / up, silu_mul, down, the residual. The same kernel calls on the same values as
// NativeDecoder's Python loop, so the same bits; only the per-operation Python and torch dispatch is gone.
namespace vstep {
struct Lin {
  int64_t kind = 0, N = 0, SB = 0, GS = 0, bits = 0;  // kind 0: GGUF blocks (qmm); 1: the q4 drafter layout
  double mn_scale = 0.0;
  torch::Tensor a, b, c, d, e;
  c10::optional<torch::Tensor> bias;
  std::vector<int64_t> widths;  // a fused projection's parts, in order (one entry: not fused)
};
struct Layer { torch::Tensor ln1, ln2; std::vector<Lin> qkv, gu; Lin o, down; };
struct Plan { std::vector<Layer> layers; double eps = 1e-6, scaling = 1.0; int64_t nh = 0, nkv = 0, hd = 0; };
static std::vector<std::unique_ptr<Plan>> plans;  // by id; calls come from Python holding the GIL

static torch::Tensor run(const Lin& l, const torch::Tensor& x) {
  if (l.kind == 0) return qmm(x, l.a, l.b, l.c, l.d, l.e, l.N, l.SB, l.GS, l.bits, l.mn_scale, l.bias);
#if defined(VS_AVX512)
  torch::Tensor y = vq4::q4_mm(x, l.a, l.b, l.c);  // (M, N rounded up to 16)
  if (y.size(1) != l.N) y = y.narrow(1, 0, l.N);
  return l.bias.has_value() ? at::add(y, *l.bias) : y.contiguous();
#else
  TORCH_CHECK(false, "q4 layers need an AVX-512 build");
#endif
}

static void parts(const Lin& l, const torch::Tensor& x, std::vector<torch::Tensor>& out) {
  torch::Tensor y = run(l, x);  // (T, sum widths)
  if (l.widths.size() <= 1) { out.push_back(y); return; }
  int64_t at = 0;
  for (int64_t w : l.widths) { out.push_back(y.narrow(1, at, w)); at += w; }
}
}  // namespace vstep

// Tensors, ints and floats in the order verispec.backends.step.plan_args writes them; returns the plan's id.
int64_t plan_new(std::vector<torch::Tensor> T, std::vector<int64_t> I, std::vector<double> F) {
  size_t ti = 0, ii = 0, fi = 0;
  auto nt = [&]() { TORCH_CHECK(ti < T.size(), "plan: too few tensors"); return T[ti++]; };
  auto ni = [&]() { TORCH_CHECK(ii < I.size(), "plan: too few ints"); return I[ii++]; };
  auto nf = [&]() { TORCH_CHECK(fi < F.size(), "plan: too few floats"); return F[fi++]; };
  auto lin = [&]() {
    vstep::Lin l;
    l.kind = ni(); l.N = ni(); l.SB = ni(); l.GS = ni(); l.bits = ni();
    const int64_t nw = ni();
    for (int64_t k = 0; k < nw; ++k) l.widths.push_back(ni());
    l.a = nt(); l.b = nt(); l.c = nt(); l.d = nt(); l.e = nt();
    torch::Tensor bias = nt();
    if (bias.numel() > 0) l.bias = bias;
    l.mn_scale = nf();
    TORCH_CHECK(l.kind == 0 || l.kind == 1, "plan: linear kind");
#if !defined(VS_AVX512)
    TORCH_CHECK(l.kind == 0, "q4 layers need an AVX-512 build");
#endif
    return l;
  };
  auto p = std::make_unique<vstep::Plan>();
  const int64_t L = ni();
  p->nh = ni(); p->nkv = ni(); p->hd = ni();
  p->eps = nf(); p->scaling = nf();
  for (int64_t i = 0; i < L; ++i) {
    vstep::Layer ly;
    ly.ln1 = nt(); ly.ln2 = nt();
    const int64_t nq = ni();
    for (int64_t k = 0; k < nq; ++k) ly.qkv.push_back(lin());
    const int64_t ng = ni();
    for (int64_t k = 0; k < ng; ++k) ly.gu.push_back(lin());
    ly.o = lin(); ly.down = lin();
    p->layers.push_back(std::move(ly));
  }
  TORCH_CHECK(ti == T.size() && ii == I.size() && fi == F.size(), "plan: trailing entries");
  vstep::plans.push_back(std::move(p));
  return (int64_t)vstep::plans.size() - 1;
}

void plan_free(int64_t id) {
  if (id >= 0 && id < (int64_t)vstep::plans.size()) vstep::plans[id].reset();
}

// Several sequences' new rows in one call (a ragged batch; one segment is a solo forward). x (N, H) the new rows'
// embeddings stacked by segment, cos / sin (N, hd) their rotary tables; segment s has Ts[s] rows after Ps[s] cached
// ones and sees its own cache only: masks[s] (Ts[s], Ps[s] + Ts[s]) bool for a token tree, or empty for a causal chain;
// per segment s and layer i, kv[4(s·L + i) ..] = its cached keys and values (1, nkv, P, hd) (empty when P = 0) and the
// buffers they may be views of (empty when none). The linear layers, norms and MLP run once over all N rows (per-row
// kernels: a row's bits do not depend on the other rows), heads and attention per segment. Returns [x after the last
// layer (N, H), then per segment and layer: key buffer, value buffer, keys, values (views of the buffers,
// (1, nkv, P + T, hd))]. Keys are written into a buffer only where the cached keys are its leading rows and it has
// room; otherwise a larger buffer is made and the cached rows copied once.
static constexpr int64_t MLP_CHUNK = 128;  // rows per chunk of step's MLP

std::vector<torch::Tensor> step(int64_t id, torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                                std::vector<int64_t> Ps, std::vector<int64_t> Ts, std::vector<torch::Tensor> masks,
                                std::vector<torch::Tensor> kv) {
  TORCH_CHECK(id >= 0 && id < (int64_t)vstep::plans.size() && vstep::plans[id], "step: no such plan");
  const vstep::Plan& p = *vstep::plans[id];
  const int64_t L = p.layers.size(), N = x.size(0), nkv = p.nkv, hd = p.hd, S = Ps.size();
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "step: x (N, H) fp32");
  TORCH_CHECK(S > 0 && (int64_t)Ts.size() == S && (int64_t)masks.size() == S, "step: one P, T and mask per segment");
  TORCH_CHECK((int64_t)kv.size() == 4 * L * S, "step: 4 cache tensors per layer and segment");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == N && cos.size(1) == hd, "step: cos, sin");
  std::vector<int64_t> A(S + 1, 0);  // segment s owns rows A[s] .. A[s + 1]
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(Ts[s] > 0 && Ps[s] >= 0, "step: segment sizes");
    A[s + 1] = A[s] + Ts[s];
    if (masks[s].numel() > 0)
      TORCH_CHECK(masks[s].scalar_type() == torch::kBool && masks[s].is_contiguous() && masks[s].dim() == 2 &&
                  masks[s].size(0) == Ts[s] && masks[s].size(1) == Ps[s] + Ts[s], "step: a mask (T, P + T) bool");
  }
  TORCH_CHECK(A[S] == N, "step: the segments' rows add up to x's");
  std::vector<torch::Tensor> out(1 + 4 * L * S);
  auto room = [&](const torch::Tensor& view, const torch::Tensor& buf, int64_t P, int64_t T) {  // where rows P.. go
    if (P > 0)
      TORCH_CHECK(view.dim() == 4 && view.size(0) == 1 && view.size(1) == nkv && view.size(2) == P &&
                  view.size(3) == hd && view.scalar_type() == torch::kFloat, "step: cached keys / values shape");
    const bool fits = buf.defined() && buf.dim() == 4 && buf.size(1) == nkv && buf.size(3) == hd &&
                      buf.size(2) >= P + T && buf.is_contiguous() &&
                      (P == 0 || (view.data_ptr() == buf.data_ptr() && view.strides().equals(buf.strides())));
    if (fits) return buf;
    const int64_t cap = P + T + std::max<int64_t>(256, (P + T) / 2);
    torch::Tensor nb = torch::empty({1, nkv, cap, hd}, x.options());
    if (P > 0) nb.narrow(2, 0, P).copy_(view);
    return nb;
  };
  for (int64_t i = 0; i < L; ++i) {
    const vstep::Layer& ly = p.layers[i];
    torch::Tensor h = rmsnorm(x, ly.ln1, p.eps);
    std::vector<torch::Tensor> qkv;
    for (const auto& l : ly.qkv) vstep::parts(l, h, qkv);
    TORCH_CHECK(qkv.size() == 3, "step: q, k, v");
    const int64_t nh = qkv[0].size(1) / hd;
    torch::Tensor o = torch::zeros({N, nh, hd}, x.options());
    for (int64_t s = 0; s < S; ++s) {
      const int64_t a = A[s], T = Ts[s], P = Ps[s], j = 4 * (s * L + i);
      torch::Tensor cs = cos.narrow(0, a, T), sn = sin.narrow(0, a, T);
      torch::Tensor q = heads(qkv[0].narrow(0, a, T), cs, sn, nh, true);  // (nh, T, hd)
      torch::Tensor k = heads(qkv[1].narrow(0, a, T), cs, sn, nkv, true);  // (nkv, T, hd)
      torch::Tensor v = heads(qkv[2].narrow(0, a, T), cs, sn, nkv, false);
      torch::Tensor kb = room(kv[j], kv[j + 2], P, T), vb = room(kv[j + 1], kv[j + 3], P, T);
      kb.select(0, 0).narrow(1, P, T).copy_(k);
      vb.select(0, 0).narrow(1, P, T).copy_(v);
      attention_rows(q.data_ptr<float>(), kb.data_ptr<float>(), vb.data_ptr<float>(),
                     masks[s].numel() > 0 ? masks[s].data_ptr<bool>() : nullptr, P, 1, nh, T, hd, nkv, P + T,
                     kb.size(2) * hd, (float)p.scaling, o.data_ptr<float>() + a * nh * hd);
      out[1 + j] = kb; out[2 + j] = vb;
      out[3 + j] = kb.narrow(2, 0, P + T); out[4 + j] = vb.narrow(2, 0, P + T);
    }
    x = at::add(x, vstep::run(ly.o, o.view({N, nh * hd})));
    // the MLP in chunks of rows: a long prefill or a wide batch would otherwise write N x 2I gate / up floats (117 MB
    // for 1,640 rows of the 1.5B) and read them back; per-row kernels, so the chunks give the same bits
    const bool split = N > 2 * MLP_CHUNK;
    const int64_t cs = split ? (N + (N + MLP_CHUNK - 1) / MLP_CHUNK - 1) / ((N + MLP_CHUNK - 1) / MLP_CHUNK) : N;
    torch::Tensor y = split ? torch::empty_like(x) : x;
    for (int64_t r = 0; r < N; r += cs) {  // (up to 2 x MLP_CHUNK rows: one chunk; more: chunks of <= MLP_CHUNK)
      const int64_t m = std::min<int64_t>(cs, N - r);
      torch::Tensor xc = split ? x.narrow(0, r, m) : x;
      torch::Tensor hc = rmsnorm(xc, ly.ln2, p.eps);
      std::vector<torch::Tensor> gu;
      for (const auto& l : ly.gu) vstep::parts(l, hc, gu);
      TORCH_CHECK(gu.size() == 2, "step: gate, up");
      torch::Tensor yc = at::add(xc, vstep::run(ly.down, silu_mul(gu[0].contiguous(), gu[1].contiguous())));
      if (split) y.narrow(0, r, m).copy_(yc); else y = yc;
    }
    x = y;
  }
  out[0] = x;
  return out;
}
"""

FUNCTIONS = ["path", "amx_rows", "qmm", "rmsnorm", "silu_mul", "attention", "heads", "plan_new", "plan_free", "step"]
AMX_ROWS_ENV = "VERISPEC_AMX_MIN_ROWS"


def _variant_key(variant: str) -> str:
    return hashlib.sha256("\n".join([SOURCE, variant, " ".join(BASE_CFLAGS + VARIANTS[variant][1]),
                                     torch.__version__]).encode()).hexdigest()[:16]


def build(variant: str):
    """The compiled extension of `variant`, or None (with a warning) where it cannot be built or fails its self-test."""
    needs, flags = VARIANTS[variant]
    if not set(needs) <= cpu_flags():
        return None
    key = _variant_key(variant)
    out = cache_root() / "kernels" / f"native_{variant}_{key}"
    try:
        if not any(out.glob("*.so")):
            print(f"[verispec] building the native {variant} kernels into {out} (once, ~40 s)", file=sys.stderr,
                  flush=True)
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load_inline

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = load_inline(f"verispec_native_{variant}_{key}", cpp_sources=[SOURCE], functions=FUNCTIONS,
                              extra_cflags=BASE_CFLAGS + flags, extra_ldflags=["-fopenmp"],
                              build_directory=str(out), verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler or headers: the next variant, and torch always works
        warnings.warn(f"verispec: could not build the native {variant} kernels ({type(e).__name__}: "
                      f"{str(e)[:200]})", RuntimeWarning, stacklevel=2)
        return None
    if "amx" in variant and not _probe_in_subprocess(out, mod.__name__):
        warnings.warn(f"verispec: the {variant} kernels do not run here (the OS or VM refuses AMX tiles, or their "
                      "self-test failed); not used", RuntimeWarning, stacklevel=2)
        return None
    if "amx" in variant:
        rows = os.environ.get(AMX_ROWS_ENV, "").strip()
        mod.amx_rows(int(rows) if rows else -1)
    if not self_test(mod):
        warnings.warn(f"verispec: the native {variant} kernels do not reproduce the torch path bit for bit; "
                      "not used", RuntimeWarning, stacklevel=2)
        return None
    return mod


_PROBE = """
import importlib.util, sys
import torch
from verispec.kernels.native import self_test
spec = importlib.util.spec_from_file_location(sys.argv[2], sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.exit(0 if mod.amx_rows(-1) >= 0 and self_test(mod) else 3)
"""


def _probe_in_subprocess(out, name: str) -> bool:
    """Whether the built AMX extension runs its self-test in a child process. A VM may list amx_* flags yet kill a
    tile instruction with SIGILL; that must not take this process down. The answer is kept next to the build."""
    import subprocess

    mark = out / "probe_ok"
    if mark.exists():
        return True
    so = next(iter(sorted(out.glob(f"{name}*.so"))), None)
    if so is None:
        return False
    try:
        ok = subprocess.run([sys.executable, "-c", _PROBE, str(so), name], capture_output=True,
                            timeout=300).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if ok:
        mark.write_text("ok\n")
    return ok


@functools.lru_cache(maxsize=1)
def kernels():
    """(path name, extension or None): the fastest path that builds and passes its self-test here."""
    forced = os.environ.get(PATH_ENV, "").strip().lower()
    if forced:
        if forced == "torch":
            return "torch", None
        if forced not in VARIANTS:
            raise ValueError(f"{PATH_ENV}={forced!r}: known paths are {', '.join([*VARIANTS, 'torch'])}")
        mod = build(forced)
        if mod is None:
            raise RuntimeError(f"{PATH_ENV}={forced!r}, but that path cannot be built or run on this machine")
        return forced, mod
    if os.environ.get(NO_BUILD_ENV) == "1":
        return "torch", None
    for variant in VARIANTS:
        mod = build(variant)
        if mod is not None:
            return variant, mod
    return "torch", None


def native_path() -> str:
    """The kernel path that runs here: "avx512_amx", "avx512_vnni", "avx2", "generic" (C++) or "torch"."""
    return kernels()[0]


# ---- the torch path (bit-identical to the C++ linear; per-row fallbacks for the rest) ----

def quantize_acts_torch(x: torch.Tensor, SB: int, GS: int):
    """x (M, K) -> xq (M, K) int8 values as float64, dx (M, K/SB) fp32, xs (M, K/GS) float64 (exact integers)."""
    M, K = x.shape
    xb = x.reshape(M, K // SB, SB)
    amax = xb.abs().amax(-1, keepdim=True)  # (M, NS, 1)
    dx = torch.div(amax, torch.full_like(amax, 127.0))
    inv = torch.where(amax > 0, torch.div(torch.full_like(amax, 127.0), amax), torch.zeros_like(amax))
    xq = torch.round(xb * inv).clamp_(-127, 127).reshape(M, K).double()
    return xq, dx.reshape(M, -1), xq.reshape(M, K // GS, GS).sum(-1)


def unpack_codes(p: dict, K: int, GS: int, bits: int) -> torch.Tensor:
    """The packed codes back as (NB·16, K) uint8."""
    qp = p["q"]
    NB, G = qp.shape[0], qp.shape[1]
    steps = GS // 4
    if bits in (4, 6):
        v = qp[:, :, :steps * 32].reshape(NB, G, steps // 2, 64)
        lo = torch.stack([v & 15, v >> 4], dim=3).reshape(NB, G, steps, 64)  # (NB, G, s, i·4 + e)
        if bits == 6:
            h = qp[:, :, steps * 32:].reshape(NB, G, steps // 4, 1, 64)
            hi = (h >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)) & 3  # (NB, G, u, 4, 64)
            lo = lo | (hi.reshape(NB, G, steps, 64) << 4)
        qp = lo
    q = qp.reshape(NB, G, steps, 16, 4).permute(0, 3, 1, 2, 4)  # (NB, i, G, s, e)
    return q.reshape(NB * 16, K)


def qmm_torch(x: torch.Tensor, p: dict, N: int, SB: int, GS: int, bits: int, mn_scale: float,
              bias: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """What `qmm` computes, in torch: (M, K) fp32 -> (M, N), bit-identical to the C++ paths."""
    x = x.float().contiguous()
    M, K = x.shape
    GPS, NS = SB // GS, K // SB
    xq, dx, xs = quantize_acts_torch(x, SB, GS)
    codes = p.get("_codes")
    if codes is None:
        codes = p["_codes"] = unpack_codes(p, K, GS, bits)[:N]  # cached: the torch path trades memory for time
    sc = p["sc"].permute(0, 2, 1).reshape(-1, K // GS)[:N].double()  # (N, G)
    mn = p["mn"].permute(0, 2, 1).reshape(-1, K // GS)[:N].double()
    D = p["D"].permute(0, 2, 1).reshape(-1, NS)[:N].float()  # (N, NS)
    Dms = p["Dm"].permute(0, 2, 1).reshape(-1, NS)[:N].float() * mn_scale
    y = torch.empty(M, N)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        acc = torch.zeros(M, n1 - n0)
        for S in range(NS):
            qS = codes[n0:n1, S * SB:(S + 1) * SB].double().reshape(n1 - n0, GPS, GS)  # (n, GPS, GS)
            xS = xq[:, S * SB:(S + 1) * SB].reshape(M, GPS, GS)  # (M, GPS, GS)
            I = torch.einsum("mgj,ngj->mng", xS, qS)  # (M, n, GPS) exact integer sums in float64
            A = (I * sc[n0:n1, S * GPS:(S + 1) * GPS]).sum(-1).float()  # (M, n) int -> fp32, rounded once
            B = (xs[:, None, S * GPS:(S + 1) * GPS] * mn[n0:n1, S * GPS:(S + 1) * GPS]).sum(-1).float()
            d = dx[:, S:S + 1]  # (M, 1)
            t2 = (D[n0:n1, S] * d) * A
            t4 = (Dms[n0:n1, S] * d) * B
            acc = acc + (t2 - t4)
        y[:, n0:n1] = acc if bias is None else acc + bias[n0:n1]
    return y


def qmm(x: torch.Tensor, p: dict, N: int, SB: int, GS: int, bits: int, mn_scale: float,
        bias: torch.Tensor | None = None) -> torch.Tensor:
    mod = kernels()[1]
    if mod is None:
        return qmm_torch(x, p, N, SB, GS, bits, mn_scale, bias)
    return mod.qmm(x.float().contiguous(), p["q"], p["sc"], p["mn"], p["D"], p["Dm"], N, SB, GS, bits,
                   float(mn_scale), bias)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x (M, H) -> (M, H), one row at a time."""
    mod = kernels()[1]
    if mod is not None:
        return mod.rmsnorm(x.float().contiguous(), w, float(eps))
    rows = [r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * w for r in x.float().split(1)]
    return torch.cat(rows) if rows else x.float().clone()


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    mod = kernels()[1]
    if mod is not None:
        return mod.silu_mul(g.contiguous(), u.contiguous())
    return torch.cat([torch.nn.functional.silu(a) * b for a, b in zip(g.reshape(-1, g.shape[-1]).split(1),
                                                                      u.reshape(-1, u.shape[-1]).split(1))]).view_as(g)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Hq, M, D), k / v (B, Hkv, N, D), allowed (B, M, N) bool -> (B, M, Hq, D)."""
    mod = kernels()[1]
    if mod is not None:
        return mod.attention(q.float().contiguous(), k.float().contiguous(), v.float().contiguous(),
                             allowed.contiguous(), float(scale))
    B, Hq, M, Dh = q.shape
    rep = Hq // k.shape[1]
    out = torch.zeros(B, M, Hq, Dh)
    for b in range(B):
        for i in range(M):
            j = allowed[b, i].nonzero().flatten()
            if len(j) == 0:
                continue
            kk = k[b, :, j].repeat_interleave(rep, 0)  # (Hq, n, D)
            vv = v[b, :, j].repeat_interleave(rep, 0)
            s = torch.einsum("hd,hnd->hn", q[b, :, i], kk) * scale  # (Hq, n)
            out[b, i] = torch.einsum("hn,hnd->hd", torch.softmax(s, -1), vv)
    return out


def heads(y: torch.Tensor, H: int, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """A projection's output y (1, T, H·hd) or (T, H·hd) as heads (1, H, T, hd), rotated by cos / sin (1, T, hd) where
    given: the bits of transformers' view / transpose / apply_rotary_pos_emb."""
    mod = kernels()[1]
    y2 = y.reshape(-1, y.shape[-1])
    T = y2.shape[0]
    if mod is not None and y2.stride(-1) == 1 and y2.dtype == torch.float32:
        if cos is None:
            return mod.heads(y2, y2, y2, H, False).unsqueeze(0)
        return mod.heads(y2, cos.reshape(T, -1).float().contiguous(), sin.reshape(T, -1).float().contiguous(), H,
                         True).unsqueeze(0)
    from transformers.models.llama.modeling_llama import rotate_half

    x = y2.view(1, T, H, -1).transpose(1, 2)  # (1, H, T, hd)
    if cos is None:
        return x
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * c) + (rotate_half(x) * s)


def self_test(mod) -> bool:
    """Every block type, 1..5 rows and a bias: the extension's `qmm` must equal `qmm_torch` bit for bit."""
    from verispec.kernels.ggml_blocks import TYPES, decode, pack, quantize

    g = torch.Generator().manual_seed(0)
    try:
        for name, t in TYPES.items():
            K = 2 * t.SB if t.SB == 256 else 96
            W = torch.randn(37, K, generator=g)
            w = decode(name, quantize(W, name), K)
            p = pack(w)
            bias = torch.randn(37, generator=g)
            for M in (1, 5, 9, 17):  # 9: a full 8-row pass and a remainder; 17: a 16-row AMX pass and one more
                x = torch.randn(M, K, generator=g) * 3
                got = mod.qmm(x, p["q"], p["sc"], p["mn"], p["D"], p["Dm"], 37, t.SB, t.GS, t.bits,
                              t.mn_scale, bias)
                if not torch.equal(got, qmm_torch(x, p, 37, t.SB, t.GS, t.bits, t.mn_scale, bias)):
                    return False
    except RuntimeError:
        return False
    return True
