// bf16 products (bf16.h): the scalar rounding, the portable emulation of VDPBF16PS, the packing
// and the driver loop over register tiles; bf16_avx512.cc holds the AVX512_BF16 variant.
#include "bf16.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace emorl {

uint16_t float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);  // zero / denormal: signed 0
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays a quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest, ties to even
}

float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

namespace {

inline uint32_t pair(float even, float odd) {
  return static_cast<uint32_t>(float_to_bf16(even)) | (static_cast<uint32_t>(float_to_bf16(odd)) << 16);
}

// A bf16 as an fp32 operand, with the instruction's flush of denormal inputs.
inline float operand(uint32_t bits16) {
  const float x = bf16_to_float(static_cast<uint16_t>(bits16));
  return (bits16 & 0x7f80u) == 0 ? (bits16 & 0x8000u ? -0.f : 0.f) : x;
}

void generic_to_pairs(const float* src, int64_t n, uint32_t* dst) {
  for (int64_t j = 0; 2 * j < n; ++j) dst[j] = pair(src[2 * j], 2 * j + 1 < n ? src[2 * j + 1] : 0.f);
}

void generic_interleave(const float* even, const float* odd, int64_t n, uint32_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = pair(even[j], odd ? odd[j] : 0.f);
}

// VDPBF16PS lane by lane: acc + a_odd·b_odd, rounded, then + a_even·b_even, rounded (each product
// of two bf16 is exact in fp32, so a contracted multiply-add rounds the same).
void generic_tile(int64_t K2, const uint32_t* a, int64_t lda, const uint32_t* b, float* c, int64_t ldc, int64_t mr,
                  int64_t nr, bool accumulate) {
  constexpr int MR = kBf16MR, NR = kBf16NR;
  float s[MR][NR] = {};
  for (int64_t k = 0; k < K2; ++k) {
    const uint32_t* bk = b + k * NR;
    for (int64_t i = 0; i < mr; ++i) {
      const uint32_t ap = lda > 0 ? a[i * lda + k] : a[k * MR + i];
      const float ae = operand(ap & 0xffffu), ao = operand(ap >> 16);
      for (int j = 0; j < NR; ++j) {
        const float t = s[i][j] + ao * operand(bk[j] >> 16);
        s[i][j] = t + ae * operand(bk[j] & 0xffffu);
      }
    }
  }
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + s[i][j] : s[i][j];
}

void generic_conv_tile(const uint32_t* const* rows, int64_t taps, const int64_t* tap_off, int64_t C2, const uint32_t* b,
                       float* c, int64_t ldc, int64_t mr, int64_t nr) {
  constexpr int NR = kBf16NR;
  float s[kBf16MR][NR] = {};
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t k = 0; k < C2; ++k) {
      const uint32_t* bk = b + (t * C2 + k) * NR;
      for (int64_t i = 0; i < mr; ++i) {
        const uint32_t ap = rows[i][tap_off[t] + k];
        const float ae = operand(ap & 0xffffu), ao = operand(ap >> 16);
        for (int j = 0; j < NR; ++j) {
          const float u = s[i][j] + ao * operand(bk[j] >> 16);
          s[i][j] = u + ae * operand(bk[j] & 0xffffu);
        }
      }
    }
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = s[i][j];
}

void generic_gather_tile(int64_t K2, const uint32_t* a, int64_t astride, const uint32_t* b, const int64_t* b_row,
                         int64_t b_off, float* c, int64_t ldc, int64_t mr, int64_t nr) {
  constexpr int NR = kBf16NR;
  float s[kBf16MR][NR] = {};
  for (int64_t k = 0; k < K2; ++k) {
    const uint32_t* bk = b + b_row[k] + b_off;
    for (int64_t i = 0; i < mr; ++i) {
      const uint32_t ap = a[k * astride + i];
      const float ae = operand(ap & 0xffffu), ao = operand(ap >> 16);
      for (int j = 0; j < NR; ++j) {
        const float u = s[i][j] + ao * operand(bk[j] >> 16);
        s[i][j] = u + ae * operand(bk[j] & 0xffffu);
      }
    }
  }
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] += s[i][j];
}

const Bf16Kernel kGeneric = {"emulated", generic_to_pairs, generic_interleave, generic_tile, generic_conv_tile,
                             generic_gather_tile};

const Bf16Kernel* best_bf16() {
  // EMORL_BF16_ISA=emulated (or EMORL_GEMM_ISA=generic|avx2, which pick a lesser fp32 kernel too):
  // the emulation, for tests
  const char* bf = std::getenv("EMORL_BF16_ISA");
  const char* gemm = std::getenv("EMORL_GEMM_ISA");
  const std::string b = bf ? bf : "", g = gemm ? gemm : "";
  if (b == "emulated" || g == "generic" || g == "avx2") return &kGeneric;
#if defined(EMORL_BF16_AVX512)
  const Bf16Kernel* k = bf16_kernel_avx512();
  if (k && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
    return k;
#endif
  return &kGeneric;
}

}  // namespace

const Bf16Kernel* bf16_kernel_generic() { return &kGeneric; }

const Bf16Kernel& bf16_kernel() {
  static const Bf16Kernel* const k = best_bf16();  // decided once (thread-safe), never changed
  return *k;
}

bool bf16_native() { return &bf16_kernel() != &kGeneric; }

void bf16_gemm_serial(const Bf16Gemm& g) {
  if (g.M <= 0 || g.N <= 0) return;
  const Bf16Kernel& k = bf16_kernel();
  // Row tiles outer: a tile's A rows stay in L1 while it walks the B panels.
  for (int64_t ir = 0; ir < g.M; ir += kBf16MR) {
    const int64_t mr = g.M - ir < kBf16MR ? g.M - ir : kBf16MR;
    const uint32_t* a = g.a_packed ? g.A + (ir / kBf16MR) * g.K2 * kBf16MR : g.A + ir * g.lda;
    for (int64_t jr = 0; jr < g.N; jr += kBf16NR) {
      const int64_t nr = g.N - jr < kBf16NR ? g.N - jr : kBf16NR;
      float* c = g.C + ir * g.ldc + jr;
      if (g.K2 == 0) {
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < nr; ++j)
            if (!g.accumulate) c[i * g.ldc + j] = 0.f;
        continue;
      }
      k.tile(g.K2, a, g.a_packed ? 0 : g.lda, g.B + (jr / kBf16NR) * g.K2 * kBf16NR, c, g.ldc, mr, nr, g.accumulate);
    }
  }
}

namespace {

// Columns of src [K, N] (row-major, ld) in panels of `width`: dst[(j / width)·K2·width + k2·width
// + j % width] = pair(src[2·k2, j], src[2·k2 + 1, j]), zero past K and N.
void pack_pair_panels(int64_t K, int64_t N, const float* src, int64_t ld, int64_t width, uint32_t* dst) {
  const Bf16Kernel& k = bf16_kernel();
  const int64_t K2 = bf16_pairs(K);
  for (int64_t j0 = 0; j0 < N; j0 += width) {
    const int64_t n = N - j0 < width ? N - j0 : width;
    uint32_t* panel = dst + (j0 / width) * K2 * width;
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      uint32_t* d = panel + k2 * width;
      const float* even = src + 2 * k2 * ld + j0;
      k.interleave(even, 2 * k2 + 1 < K ? even + ld : nullptr, n, d);
      for (int64_t j = n; j < width; ++j) d[j] = 0;
    }
  }
}

}  // namespace

void bf16_pack_b(int64_t K, int64_t N, const float* B, int64_t ldb, uint32_t* dst) {
  pack_pair_panels(K, N, B, ldb, kBf16NR, dst);
}

void bf16_pack_a_transposed(int64_t M, int64_t K, const float* At, int64_t ld, uint32_t* dst) {
  pack_pair_panels(K, M, At, ld, kBf16MR, dst);
}

#if !defined(EMORL_BF16_AVX512)
const Bf16Kernel* bf16_kernel_avx512() { return nullptr; }
#endif

}  // namespace emorl
