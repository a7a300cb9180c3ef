// The AVX512_BF16 variant of the bf16 products (bf16.h); CMakeLists.txt sets this file's ISA flags.
#include <immintrin.h>

#include "bf16.h"

namespace emorl {
namespace {

constexpr int MR = kBf16MR, NR = kBf16NR;

// 32 floats -> 16 pairs in order (VCVTNE2PS2BF16 puts its second operand in the low half).
inline __m512i pairs32(const float* p) {
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
}

void to_pairs(const float* src, int64_t n, uint32_t* dst) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) _mm512_storeu_si512(dst + i / 2, pairs32(src + i));
  if (i < n) {
    const int64_t left = n - i;  // 1..31 floats
    const __mmask16 lo = static_cast<__mmask16>(left >= 16 ? 0xffff : (1u << left) - 1);
    const __mmask16 hi = static_cast<__mmask16>(left > 16 ? (1u << (left - 16)) - 1 : 0);
    const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + i + 16), _mm512_maskz_loadu_ps(lo, src + i));
    const int64_t np = (left + 1) / 2;
    _mm512_mask_storeu_epi32(dst + i / 2, static_cast<__mmask16>((1u << np) - 1), v);
  }
}

void interleave(const float* even, const float* odd, int64_t n, uint32_t* dst) {
  // cvtne2ps(odd, even) = [even 0..15 | odd 0..15] as bf16; this permutation pairs them up.
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                                       20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t m = n - j < 16 ? n - j : 16;
    const __mmask16 k = static_cast<__mmask16>(m == 16 ? 0xffff : (1u << m) - 1);
    const __m512 e = _mm512_maskz_loadu_ps(k, even + j);
    const __m512 o = odd ? _mm512_maskz_loadu_ps(k, odd + j) : _mm512_setzero_ps();
    const __m512i v = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(o, e));
    _mm512_mask_storeu_epi32(dst + j, k, v);
  }
}

// The tile's accumulators written to C (+ C when accumulating); only mr x nr of them.
inline void store_tile(__m512 (&s)[MR][2], float* c, int64_t ldc, int64_t mr, int64_t nr, bool accumulate) {
  if (mr == MR && nr == NR) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      if (accumulate) {
        s[i][0] = _mm512_add_ps(s[i][0], _mm512_loadu_ps(ci));
        s[i][1] = _mm512_add_ps(s[i][1], _mm512_loadu_ps(ci + 16));
      }
      _mm512_storeu_ps(ci, s[i][0]);
      _mm512_storeu_ps(ci + 16, s[i][1]);
    }
    return;
  }
  const __mmask16 m0 = static_cast<__mmask16>(nr >= 16 ? 0xffff : (1u << nr) - 1);
  const __mmask16 m1 = static_cast<__mmask16>(nr > 16 ? (nr >= 32 ? 0xffff : (1u << (nr - 16)) - 1) : 0);
  for (int i = 0; i < mr; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      s[i][0] = _mm512_add_ps(s[i][0], _mm512_maskz_loadu_ps(m0, ci));
      s[i][1] = _mm512_add_ps(s[i][1], _mm512_maskz_loadu_ps(m1, ci + 16));
    }
    _mm512_mask_storeu_ps(ci, m0, s[i][0]);
    _mm512_mask_storeu_ps(ci + 16, m1, s[i][1]);
  }
}

void conv_tile(const uint32_t* const* rows, int64_t taps, const int64_t* tap_off, int64_t C2, const uint32_t* b, float* c,
               int64_t ldc, int64_t mr, int64_t nr) {
  __m512 s[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) s[i][0] = s[i][1] = _mm512_setzero_ps();
  const uint32_t* row[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) row[i] = rows[i];
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t off = tap_off[t];
    const uint32_t* bt = b + t * C2 * NR;
    for (int64_t k = 0; k < C2; ++k) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bt + k * NR);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bt + k * NR + 16);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(row[i][off + k]));
        s[i][0] = _mm512_dpbf16_ps(s[i][0], ai, b0);
        s[i][1] = _mm512_dpbf16_ps(s[i][1], ai, b1);
      }
    }
  }
  store_tile(s, c, ldc, mr, nr, false);
}

void gather_tile(int64_t K2, const uint32_t* a, int64_t astride, const uint32_t* b, const int64_t* b_row, int64_t b_off,
                 float* c, int64_t ldc, int64_t mr, int64_t nr) {
  __m512 s[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) s[i][0] = s[i][1] = _mm512_setzero_ps();
  const uint32_t* bb = b + b_off;
  for (int64_t k = 0; k < K2; ++k) {
    const uint32_t* bk = bb + b_row[k];
    const uint32_t* ak = a + k * astride;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bk);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bk + 16);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(ak[i]));
      s[i][0] = _mm512_dpbf16_ps(s[i][0], ai, b0);
      s[i][1] = _mm512_dpbf16_ps(s[i][1], ai, b1);
    }
  }
  store_tile(s, c, ldc, mr, nr, true);
}

const Bf16Kernel kAvx512 = {"avx512bf16", to_pairs, interleave, conv_tile, gather_tile};

}  // namespace

const Bf16Kernel* bf16_kernel_avx512() { return &kAvx512; }

}  // namespace emorl
