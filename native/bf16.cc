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

// VDPBF16PS lane by lane on one row of a tile: s[j] + a_odd·b_odd[j], rounded, then
// + a_even·b_even[j], rounded (each product of two bf16 is exact in fp32, so a contracted
// multiply-add rounds the same).
inline void dot_pairs(float (&s)[kBf16NR], uint32_t ap, const uint32_t* bk) {
  const float ae = operand(ap & 0xffffu), ao = operand(ap >> 16);
  for (int j = 0; j < kBf16NR; ++j) {
    const float u = s[j] + ao * operand(bk[j] >> 16);
    s[j] = u + ae * operand(bk[j] & 0xffffu);
  }
}

void generic_conv_tile(const uint32_t* const* rows, int64_t taps, const int64_t* tap_off, int64_t C2, const uint32_t* b,
                       float* c, int64_t ldc, int64_t mr, int64_t nr) {
  float s[kBf16MR][kBf16NR] = {};
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t k = 0; k < C2; ++k)
      for (int64_t i = 0; i < mr; ++i) dot_pairs(s[i], rows[i][tap_off[t] + k], b + (t * C2 + k) * kBf16NR);
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = s[i][j];
}

void generic_gather_tile(int64_t K2, const uint32_t* a, int64_t astride, const uint32_t* b, const int64_t* b_row,
                         int64_t b_off, float* c, int64_t ldc, int64_t mr, int64_t nr) {
  float s[kBf16MR][kBf16NR] = {};
  for (int64_t k = 0; k < K2; ++k)
    for (int64_t i = 0; i < mr; ++i) dot_pairs(s[i], a[k * astride + i], b + b_row[k] + b_off);
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] += s[i][j];
}

const Bf16Kernel kGeneric = {"emulated", generic_to_pairs, generic_interleave, generic_conv_tile, generic_gather_tile};

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

const Bf16Kernel& bf16_kernel() {
  static const Bf16Kernel* const k = best_bf16();  // decided once (thread-safe), never changed
  return *k;
}

void bf16_pack(int64_t K, int64_t N, const float* src, int64_t ld, int64_t width, uint32_t* dst) {
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

#if !defined(EMORL_BF16_AVX512)
const Bf16Kernel* bf16_kernel_avx512() { return nullptr; }
#endif

}  // namespace emorl
