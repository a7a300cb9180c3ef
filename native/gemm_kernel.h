// The blocked single-threaded SGEMM, written once and compiled per instruction set (gemm_avx512.cc,
// gemm_avx2.cc, gemm_generic.cc each define EMORL_GEMM_NS, EMORL_VW, EMORL_MR and include this).
//
//   C[M,N] = op(A)[M,K] * op(B)[K,N]  (+ C if accumulate), row-major, leading dimensions lda/ldb/ldc.
//
// Goto/BLIS structure: B is packed into KC x NR micro-panels, A into MR x KC micro-panels (both
// zero-padded to full tiles), and an MR x NR micro-kernel keeps its accumulators in MR*NV vector
// registers (GCC vector extensions: a plain scalar accumulator array spills and runs ~60x slower).
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "gemm.h"

#ifndef EMORL_GEMM_NS
#error "define EMORL_GEMM_NS, EMORL_VW and EMORL_MR before including gemm_kernel.h"
#endif

namespace emorl {
namespace EMORL_GEMM_NS {

constexpr int VW = EMORL_VW;  // floats per vector register
constexpr int NV = 2;         // vectors per micro-tile row
constexpr int MR = EMORL_MR;
constexpr int NR = NV * VW;
constexpr int64_t KC = 256;
constexpr int64_t MC = (EMORL_VW >= 16 ? 192 : 144) / MR * MR;
constexpr int64_t NC = 4096 / NR * NR;

// No std:: templates here: an inline function instantiated in an AVX-512 TU could be the copy the
// linker keeps for the whole addon, and would then fault on a CPU without AVX-512.
static inline int64_t mn(int64_t a, int64_t b) { return a < b ? a : b; }

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef float vfu __attribute__((vector_size(VW * sizeof(float)), aligned(4), may_alias));

// Broadcast (a plain `vf{} + x` keeps a scalar add in the inner loop: 0 + x is not x for -0.0).
static inline vf splat(float x) {
#if EMORL_VW == 16 && defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);
#elif EMORL_VW == 8 && defined(__AVX__)
  return (vf)_mm256_set1_ps(x);
#elif EMORL_VW == 4 && defined(__SSE__)
  return (vf)_mm_set1_ps(x);
#else
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = x;
  return v;
#endif
}

// op(A) block [mc x kc] -> micro-panels of MR rows: Ap[(ir/MR)*MR*kc + p*MR + r].
static void pack_a(bool ta, const float* A, int64_t lda, int64_t mc, int64_t kc, float* Ap) {
  for (int64_t ir = 0; ir < mc; ir += MR) {
    const int64_t mr = mn(MR, mc - ir);
    float* dst = Ap + ir * kc;
    if (!ta) {
      for (int64_t r = 0; r < mr; ++r) {
        const float* src = A + (ir + r) * lda;
        for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = src[p];
      }
      for (int64_t r = mr; r < MR; ++r)
        for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = 0.f;
    } else {
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = A + p * lda + ir;
        int64_t r = 0;
        for (; r < mr; ++r) dst[p * MR + r] = src[r];
        for (; r < MR; ++r) dst[p * MR + r] = 0.f;
      }
    }
  }
}

// op(B) block [kc x nc] -> micro-panels of NR columns: Bp[(jr/NR)*NR*kc + p*NR + c].
static void pack_b(bool tb, const float* B, int64_t ldb, int64_t kc, int64_t nc, float* Bp) {
  for (int64_t jr = 0; jr < nc; jr += NR) {
    const int64_t nr = mn(NR, nc - jr);
    float* dst = Bp + jr * kc;
    if (!tb) {
      if (nr == NR) {
        for (int64_t p = 0; p < kc; ++p) {
          const float* src = B + p * ldb + jr;
          for (int v = 0; v < NV; ++v)
            *reinterpret_cast<vf*>(dst + p * NR + v * VW) = *reinterpret_cast<const vfu*>(src + v * VW);
        }
      } else {
        for (int64_t p = 0; p < kc; ++p) {
          const float* src = B + p * ldb + jr;
          int64_t c = 0;
          for (; c < nr; ++c) dst[p * NR + c] = src[c];
          for (; c < NR; ++c) dst[p * NR + c] = 0.f;
        }
      }
    } else {
      // op(B)[p][j] = B[j*ldb + p]: transpose in chunks of 8 k-steps to keep the rows streaming.
      for (int64_t p0 = 0; p0 < kc; p0 += 8) {
        const int64_t pn = mn(8, kc - p0);
        for (int64_t c = 0; c < nr; ++c) {
          const float* src = B + (jr + c) * ldb + p0;
          for (int64_t p = 0; p < pn; ++p) dst[(p0 + p) * NR + c] = src[p];
        }
        for (int64_t c = nr; c < NR; ++c)
          for (int64_t p = 0; p < pn; ++p) dst[(p0 + p) * NR + c] = 0.f;
      }
    }
  }
}

// The accumulators of a register tile written to C (+ C when accumulating); only mr x nr of them.
static inline void store_tile(vf (&s)[MR][NV], float* __restrict c, int64_t ldc, int64_t mr, int64_t nr, bool acc) {
  if (mr == MR && nr == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        vfu* cp = reinterpret_cast<vfu*>(c + i * ldc + j * VW);
        *cp = acc ? *cp + s[i][j] : s[i][j];
      }
  } else {
    alignas(64) float t[MR * NR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) *reinterpret_cast<vf*>(t + i * NR + j * VW) = s[i][j];
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = acc ? c[i * ldc + j] + t[i * NR + j] : t[i * NR + j];
  }
}

// C[mr x nr] (+)= A-panel * Bp-panel over kc steps. The A panel is either packed (Direct = false:
// element (i, p) at a[p*MR + i]) or read in place from row-major A (Direct = true: row i at
// a + i*lda, rows past mr clamped to the last valid one; their results are discarded).
template <bool Direct>
static inline void micro_kernel(int64_t kc, const float* __restrict a, int64_t lda, const float* __restrict b,
                                float* __restrict c, int64_t ldc, int64_t mr, int64_t nr, bool acc) {
  vf s[MR][NV] = {};
  const float* row[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) row[i] = a + (Direct ? (i < mr ? i : mr - 1) * lda : 0);
  for (int64_t p = 0; p < kc; ++p) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = *reinterpret_cast<const vf*>(b + p * NR + j * VW);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const vf ai = splat(Direct ? row[i][p] : a[p * MR + i]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) s[i][j] += ai * bv[j];
    }
  }
  store_tile(s, c, ldc, mr, nr, acc);
}

static void serial(const GemmCall& g, float* Ap, float* Bp) {
  // A narrow product (N within two micro-panels, e.g. a convolution's im2col rows times a
  // [P, 32] weight matrix) reuses each A panel for at most two B panels: packing A would cost
  // about as much as the arithmetic, so the micro-kernel reads row-major A in place.
  const bool direct_a = !g.transA && !g.Apacked && g.N <= 2 * NR;
  for (int64_t jc = 0; jc < g.N; jc += NC) {
    const int64_t nc = mn(NC, g.N - jc);
    for (int64_t pc = 0; pc < g.K; pc += KC) {
      const int64_t kc = mn(KC, g.K - pc);
      if (!g.Bpacked) pack_b(g.transB, g.transB ? g.B + jc * g.ldb + pc : g.B + pc * g.ldb + jc, g.ldb, kc, nc, Bp);
      const bool acc = g.accumulate || pc > 0;
      for (int64_t ic = 0; ic < g.M; ic += MC) {
        const int64_t mc = mn(MC, g.M - ic);
        if (!g.Apacked && !direct_a) pack_a(g.transA, g.transA ? g.A + pc * g.lda + ic : g.A + ic * g.lda + pc, g.lda, mc, kc, Ap);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int64_t nr = mn(NR, nc - jr);
          const float* bp = g.Bpacked ? g.Bpacked + ((jc + jr) / NR) * g.K * NR + pc * NR : Bp + jr * kc;
          float* cb = g.C + jc + jr;
          if (direct_a) {
            for (int64_t ir = 0; ir < mc; ir += MR)
              micro_kernel<true>(kc, g.A + (ic + ir) * g.lda + pc, g.lda, bp, cb + (ic + ir) * g.ldc, g.ldc, mn(MR, mc - ir), nr, acc);
          } else {
            for (int64_t ir = 0; ir < mc; ir += MR) {
              const float* ap = g.Apacked ? g.Apacked + ((ic + ir) / MR) * g.K * MR + pc * MR : Ap + ir * kc;
              micro_kernel<false>(kc, ap, 0, bp, cb + (ic + ir) * g.ldc, g.ldc, mn(MR, mc - ir), nr, acc);
            }
          }
        }
      }
    }
  }
}

// An implicit-GEMM convolution tile (no column matrix): C[mr x nr] = Σ_t Σ_k rows[i][tap_off[t] + k]
// · b[(t·C + k)·NR + j], b a packed B panel over taps·C rows (rows past mr repeat a valid one).
static void conv_tile(const float* const* rows, int64_t taps, const int64_t* tap_off, int64_t C, const float* b, float* c,
                      int64_t ldc, int64_t mr, int64_t nr) {
  vf s[MR][NV] = {};
  const float* row[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) row[i] = rows[i];
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t off = tap_off[t];
    const float* bt = b + t * C * NR;
    for (int64_t k = 0; k < C; ++k) {
      vf bv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) bv[j] = *reinterpret_cast<const vf*>(bt + k * NR + j * VW);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const vf ai = splat(row[i][off + k]);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) s[i][j] += ai * bv[j];
      }
    }
  }
  store_tile(s, c, ldc, mr, nr, false);
}

// A filter-gradient tile: C[mr x nr] += Σ_k a[k·astride + i] · (b + b_row[k] + b_off)[j] (rows of B
// gathered through an offset table; a is read for i < MR, so it must extend that far).
static void gather_tile(int64_t K, const float* a, int64_t astride, const float* b, const int64_t* b_row, int64_t b_off,
                        float* c, int64_t ldc, int64_t mr, int64_t nr) {
  vf s[MR][NV] = {};
  const float* bb = b + b_off;
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = bb + b_row[k];
    const float* ak = a + k * astride;
    vf bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = *reinterpret_cast<const vfu*>(bk + j * VW);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const vf ai = splat(ak[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) s[i][j] += ai * bv[j];
    }
  }
  store_tile(s, c, ldc, mr, nr, true);
}

// A convolution with at most kNarrowCo output channels (e.g. a decoder's RGB + mask layer), where
// a register tile of output channels would sit mostly idle: vectorised over the input channels
// instead (C a multiple of VW). out[i·ldc + co] = Σ_t Σ_k rows[i][tap_off[t] + k] · w[(co·taps + t)·C + k]
// for kNarrowRows output cells i < mr (rows past mr repeat a valid one).
template <int CO>
static void narrow_tile_co(const float* const* rows, int64_t taps, const int64_t* tap_off, int64_t C, const float* w,
                           float* c, int64_t ldc, int64_t mr) {
  constexpr int R = kNarrowRows;
  vf s[R][CO];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int o = 0; o < CO; ++o) s[i][o] = vf{};
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t off = tap_off[t];
    for (int64_t k = 0; k < C; k += VW) {
      vf xv[R];
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) xv[i] = *reinterpret_cast<const vfu*>(rows[i] + off + k);
#pragma GCC unroll 4
      for (int o = 0; o < CO; ++o) {
        const vf wv = *reinterpret_cast<const vfu*>(w + (o * taps + t) * C + k);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) s[i][o] += xv[i] * wv;
      }
    }
  }
  for (int64_t i = 0; i < mr; ++i)
    for (int o = 0; o < CO; ++o) {
      float t = 0.f;
      for (int l = 0; l < VW; ++l) t += s[i][o][l];
      c[i * ldc + o] = t;
    }
}

static void narrow_tile(const float* const* rows, int64_t taps, const int64_t* tap_off, int64_t C, int64_t Co, const float* w,
                        float* c, int64_t ldc, int64_t mr) {
  switch (Co) {
    case 1: return narrow_tile_co<1>(rows, taps, tap_off, C, w, c, ldc, mr);
    case 2: return narrow_tile_co<2>(rows, taps, tap_off, C, w, c, ldc, mr);
    case 3: return narrow_tile_co<3>(rows, taps, tap_off, C, w, c, ldc, mr);
    default: return narrow_tile_co<4>(rows, taps, tap_off, C, w, c, ldc, mr);
  }
}

// expm1(x) for x <= 0 (ELU's negative branch) to about an ulp, vectorised: std::expm1 is a scalar
// library call that took 17% of an iodine decoder's time. x = k·ln2 + r with |r| <= ln2/2 (k by
// the 1.5·2^23 rounding trick, ln2 in two parts), expm1(r) by its Taylor series to r^8 (the next
// term is below 1e-9 of it), then expm1(x) = 2^k·expm1(r) + (2^k − 1): exact at k = 0, where the
// result is small. Below −87 it is −1 in float; clamping there keeps 2^k a normal number.
static inline vf expm1_nonpositive(vf x) {
  typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));
  const vf lo = splat(-87.f);
  x = x < lo ? lo : x;
  const vf magic = splat(12582912.f);  // 1.5·2^23: adding it rounds to an integer in the low bits
  const vf t = x * splat(1.44269504088896341f) + magic;
  const vf kf = t - magic;
  const vi k = (vi)t - (vi)magic;
  const vf r = (x - kf * splat(0.693145751953125f)) - kf * splat(1.428606765330187e-06f);
  vf q = splat(1.f / 40320.f);
  q = q * r + splat(1.f / 5040.f);
  q = q * r + splat(1.f / 720.f);
  q = q * r + splat(1.f / 120.f);
  q = q * r + splat(1.f / 24.f);
  q = q * r + splat(1.f / 6.f);
  q = q * r + splat(0.5f);
  const vf p = r + r * r * q;
  const vf scale = (vf)((k + 127) << 23);
  return scale * p + (scale - splat(1.f));
}

// The epilogue activations on a vector of pre-activations: act 0 linear, 1 ReLU, 2 ELU (Act).
static inline vf activate(vf v, int act) {
  const vf zero = vf{};
  if (act == 1) return v > zero ? v : zero;
  if (act == 2) return v > zero ? v : expm1_nonpositive(v < zero ? v : zero);
  return v;
}

// y (rows of n) += bias (may be null), then the activation, in place.
static void bias_act_rows(float* y, int64_t rows, int64_t n, const float* bias, int act) {
  if (!bias && act == 0) return;
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * n;
    int64_t j = 0;
    for (; j + VW <= n; j += VW) {
      vfu* p = reinterpret_cast<vfu*>(yr + j);
      *p = activate(bias ? *p + *reinterpret_cast<const vfu*>(bias + j) : *p, act);
    }
    if (j < n) {  // the tail through one vector
      vf v{};
      for (int64_t l = 0; l < n - j; ++l) v[l] = yr[j + l] + (bias ? bias[j + l] : 0.f);
      v = activate(v, act);
      for (int64_t l = 0; l < n - j; ++l) yr[j + l] = v[l];
    }
  }
}

// Winograd F(m×m, r×r) with α = 8 (interpolation points 0, ±1, ±2, ±1/2, ∞; m = 4 for r = 5, m = 6
// for r = 3): Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A. Bᵀ is shared by both (its rows scaled to small
// integers; G, in nhwc.cc, carries the inverse scales). Vectorised over channels (a multiple of VW).

// t = Bᵀ d, with the ± point pairs sharing their even and odd halves.
static inline void wino_bt(const vf (&d)[8], vf (&t)[8]) {
  const vf two = splat(2.f), four = splat(4.f), five = splat(5.f), seventeen = splat(17.f), twentyone = splat(21.f);
  t[0] = four * (d[0] - d[6]) + twentyone * (d[4] - d[2]);
  t[7] = four * (d[7] - d[1]) + twentyone * (d[3] - d[5]);
  const vf e1 = seventeen * d[4] - four * (d[2] + d[6]), o1 = seventeen * d[3] - four * (d[1] + d[5]);
  t[1] = e1 + o1;
  t[2] = e1 - o1;
  const vf e2 = d[2] - five * d[4] + four * d[6], o2 = two * (d[1] - five * d[3] + four * d[5]);
  t[3] = e2 + o2;
  t[4] = e2 - o2;
  const vf e3 = two * (four * d[2] - five * d[4] + d[6]), o3 = four * d[1] - five * d[3] + d[5];
  t[5] = e3 + o3;
  t[6] = e3 - o3;
}

// The input transform V = Bᵀ d B of one 8×8 tile: d[i][j] at map + i·row + j·C (C channels per
// cell), V[ξ = 8i + j] written at V + ξ·xi_stride.
static void wino_input(const float* map, int64_t row, int64_t C, float* V, int64_t xi_stride) {
  for (int64_t c = 0; c < C; c += VW) {
    vf t[8][8];  // Bᵀ d, one column of d at a time
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      vf d[8], o[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) d[i] = *reinterpret_cast<const vfu*>(map + i * row + j * C + c);
      wino_bt(d, o);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) t[i][j] = o[i];
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      vf o[8];
      wino_bt(t[i], o);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) *reinterpret_cast<vfu*>(V + (8 * i + j) * xi_stride + c) = o[j];
    }
  }
}

// y = Aᵀ v: row a is the points' a-th powers (the ∞ point only in the last row).
template <int M>
static inline void wino_at(const vf (&v)[8], vf (&y)[M]) {
  const vf s12 = v[1] + v[2], d12 = v[1] - v[2], s34 = v[3] + v[4], d34 = v[3] - v[4], s56 = v[5] + v[6], d56 = v[5] - v[6];
  y[0] = v[0] + s12 + s34 + s56;
  y[1] = d12 + splat(2.f) * d34 + splat(0.5f) * d56;
  y[2] = s12 + splat(4.f) * s34 + splat(0.25f) * s56;
  if constexpr (M == 4) {
    y[3] = d12 + splat(8.f) * d34 + splat(0.125f) * d56 + v[7];
  } else {
    y[3] = d12 + splat(8.f) * d34 + splat(0.125f) * d56;
    y[4] = s12 + splat(16.f) * s34 + splat(0.0625f) * s56;
    y[5] = d12 + splat(32.f) * d34 + splat(0.03125f) * d56 + v[7];
  }
}

// The output transform Y = Aᵀ X A (+ bias, then the activation act, as in activate()) of one tile, X[ξ] at X + ξ·xi_stride
// (Co channels): Y[a][b] written at y + a·row + b·Co for a < rows, b < cols (the tiles on the
// bottom and right edges are cut).
template <int M>
static void wino_output_m(const float* X, int64_t xi_stride, int64_t Co, const float* bias, int act, float* y, int64_t row,
                          int64_t rows, int64_t cols) {
  const bool full = rows == M && cols == M;
  for (int64_t c = 0; c < Co; c += VW) {
    vf t[M][8];  // Aᵀ X, one column of X at a time
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      vf v[8], o[M];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) v[i] = *reinterpret_cast<const vfu*>(X + (8 * i + j) * xi_stride + c);
      wino_at<M>(v, o);
#pragma GCC unroll 6
      for (int a = 0; a < M; ++a) t[a][j] = o[a];
    }
    const vf b = bias ? *reinterpret_cast<const vfu*>(bias + c) : vf{};
    vf o[M][M];
#pragma GCC unroll 6
    for (int a = 0; a < M; ++a) {
      wino_at<M>(t[a], o[a]);
#pragma GCC unroll 6
      for (int e = 0; e < M; ++e) o[a][e] = activate(o[a][e] + b, act);
    }
    if (full) {
#pragma GCC unroll 6
      for (int a = 0; a < M; ++a)
#pragma GCC unroll 6
        for (int e = 0; e < M; ++e) *reinterpret_cast<vfu*>(y + a * row + e * Co + c) = o[a][e];
    } else {
      for (int64_t a = 0; a < rows; ++a)
        for (int64_t e = 0; e < cols; ++e) *reinterpret_cast<vfu*>(y + a * row + e * Co + c) = o[a][e];
    }
  }
}

static void wino_output(int m, const float* X, int64_t xi_stride, int64_t Co, const float* bias, int act, float* y, int64_t row,
                        int64_t rows, int64_t cols) {
  if (m == 4) wino_output_m<4>(X, xi_stride, Co, bias, act, y, row, rows, cols);
  else wino_output_m<6>(X, xi_stride, Co, bias, act, y, row, rows, cols);
}

// v ↦ A v (Aᵀ's adjoint, an m-vector to 8): the points' polynomials Σ_a p^a v[a], the ∞ row v[m-1].
template <int M>
static inline void wino_a(const vf (&v)[M], vf (&o)[8]) {
  vf e1 = v[0], o1 = v[1], e2 = v[0], o2 = splat(2.f) * v[1], e3 = v[0], o3 = splat(0.5f) * v[1];
#pragma GCC unroll 6
  for (int a = 2; a < M; ++a) {
    const vf up = splat(static_cast<float>(1 << a)) * v[a], down = splat(1.f / static_cast<float>(1 << a)) * v[a];
    if (a % 2 == 0) {
      e1 += v[a];
      e2 += up;
      e3 += down;
    } else {
      o1 += v[a];
      o2 += up;
      o3 += down;
    }
  }
  o[0] = v[0];
  o[1] = e1 + o1;
  o[2] = e1 - o1;
  o[3] = e2 + o2;
  o[4] = e2 - o2;
  o[5] = e3 + o3;
  o[6] = e3 - o3;
  o[7] = v[M - 1];
}

// The output transform's adjoint D = A dY Aᵀ for one tile (the filter gradient's counterpart of
// X): dY[a][b] at dy + a·row + b·Co for a < rows, b < cols (zero beyond: the cut tiles' missing
// cells), D[ξ = 8i + j] written at D + ξ·xi_stride.
template <int M>
static void wino_output_adjoint_m(const float* dy, int64_t row, int64_t Co, int64_t rows, int64_t cols, float* D, int64_t xi_stride) {
  for (int64_t c = 0; c < Co; c += VW) {
    vf t[8][M];  // A dY, one column of dY at a time
#pragma GCC unroll 6
    for (int b = 0; b < M; ++b) {
      vf v[M], o[8];
#pragma GCC unroll 6
      for (int a = 0; a < M; ++a) v[a] = a < rows && b < cols ? *reinterpret_cast<const vfu*>(dy + a * row + b * Co + c) : vf{};
      wino_a<M>(v, o);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) t[i][b] = o[i];
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      vf o[8];
      wino_a<M>(t[i], o);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) *reinterpret_cast<vfu*>(D + (8 * i + j) * xi_stride + c) = o[j];
    }
  }
}

static void wino_output_adjoint(int m, const float* dy, int64_t row, int64_t Co, int64_t rows, int64_t cols, float* D, int64_t xi_stride) {
  if (m == 4) wino_output_adjoint_m<4>(dy, row, Co, rows, cols, D, xi_stride);
  else wino_output_adjoint_m<6>(dy, row, Co, rows, cols, D, xi_stride);
}

// FMA throughput probe (for the benchmarks' "fraction of peak"): 12 independent multiply-add
// chains kept in vector registers, `iters` rounds; returns a value that depends on every lane.
static float fma_probe(int64_t iters) {
  // constants the compiler cannot see through, or it folds the whole loop away
  volatile float mv = 0.9999999f, av = 1e-7f, base = 1.0f;
  vf acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = splat(base + 1e-3f * static_cast<float>(i));
  const vf m = splat(mv), a = splat(av);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = acc[i] * m + a;
  }
  float s = 0.f;
  for (int i = 0; i < 12; ++i)
    for (int l = 0; l < VW; ++l) s += acc[i][l];
  return s;
}

static void pack_a_full(bool ta, int64_t M, int64_t K, const float* A, int64_t lda, float* dst) {
  pack_a(ta, A, lda, M, K, dst);
}

static void pack_b_full(bool tb, int64_t K, int64_t N, const float* B, int64_t ldb, float* dst) {
  pack_b(tb, B, ldb, K, N, dst);
}

}  // namespace EMORL_GEMM_NS

const GemmKernel* EMORL_GEMM_GETTER() {
  static const GemmKernel k{EMORL_GEMM_NAME,
                            EMORL_GEMM_NS::MR,
                            EMORL_GEMM_NS::NR,
                            EMORL_GEMM_NS::MC * EMORL_GEMM_NS::KC,
                            EMORL_GEMM_NS::KC * EMORL_GEMM_NS::NC,
                            &EMORL_GEMM_NS::serial,
                            &EMORL_GEMM_NS::pack_a_full,
                            &EMORL_GEMM_NS::pack_b_full,
                            &EMORL_GEMM_NS::fma_probe,
                            EMORL_GEMM_NS::VW,
                            &EMORL_GEMM_NS::conv_tile,
                            &EMORL_GEMM_NS::gather_tile,
                            &EMORL_GEMM_NS::narrow_tile,
                            &EMORL_GEMM_NS::wino_input,
                            &EMORL_GEMM_NS::wino_output,
                            &EMORL_GEMM_NS::wino_output_adjoint,
                            &EMORL_GEMM_NS::bias_act_rows};
  return &k;
}

}  // namespace emorl
