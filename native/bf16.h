// Mixed-precision (bf16) matrix products for the convolutions: both operands rounded to bfloat16
// (round to nearest even, denormals flushed to zero, as the AVX512_BF16 conversions do), every
// product exact in fp32, accumulated in fp32 two k at a time in the order VDPBF16PS uses
// (acc + a[k+1]·b[k+1], then + a[k]·b[k]). On CPUs with AVX512_BF16 this runs about twice the
// fp32 FMA rate; elsewhere a portable emulation gives bit-identical results (slowly), so the
// same numbers come out on every machine.
//
// Operands are stored as bf16 pairs along k, one pair per uint32 (low half: the even k), in
// panels: ceil(N/width) panels of [K2][width] pairs (K2 = ceil(K/2)); padding (k past K, columns
// past N) is zero. B operands use panels of kBf16NR columns; an A operand read by gather_tile is
// one panel as wide as its rows.
#pragma once

#include <cstdint>

namespace emorl {

constexpr int kBf16MR = 8;   // rows of a register tile
constexpr int kBf16NR = 32;  // columns of a register tile (two 16-lane vectors)

inline int64_t bf16_pairs(int64_t k) { return (k + 1) / 2; }
// uint32 pairs in the panels of a [K x N] operand
inline int64_t bf16_packed_size(int64_t K, int64_t N, int64_t width) { return (N + width - 1) / width * width * bf16_pairs(K); }

// Scalar rounding (the reference the vector conversions match bit for bit).
uint16_t float_to_bf16(float x);
float bf16_to_float(uint16_t h);

// One instruction-set variant.
struct Bf16Kernel {
  const char* name;
  // dst[j] = pair(src[2j], src[2j+1]) for j < ceil(n/2) (an odd n pads the last pair with 0).
  void (*to_pairs)(const float* src, int64_t n, uint32_t* dst);
  // dst[j] = pair(even[j], odd[j]) for j < n; odd null: zeros.
  void (*interleave)(const float* even, const float* odd, int64_t n, uint32_t* dst);
  // A convolution's register tile without a column matrix (implicit GEMM): row i of A is, for
  // each of `taps` kernel taps t, the C2 pairs at rows[i] + tap_off[t] (MR row pointers; rows past
  // mr repeat a valid one). b: a packed panel over taps·C2 pairs. C = product (no accumulate).
  void (*conv_tile)(const uint32_t* const* rows, int64_t taps, const int64_t* tap_off, int64_t C2, const uint32_t* b,
                    float* c, int64_t ldc, int64_t mr, int64_t nr);
  // A filter gradient's register tile (implicit GEMM over the pixels): C[mr x nr] += Σ_k2 A[i, k2]
  // · B[k2, ·], with A[i, k2] at a[k2*astride + i] and row k2 of B the NR pairs at
  // b + b_row[k2] + b_off.
  void (*gather_tile)(int64_t K2, const uint32_t* a, int64_t astride, const uint32_t* b, const int64_t* b_row,
                      int64_t b_off, float* c, int64_t ldc, int64_t mr, int64_t nr);
};

const Bf16Kernel* bf16_kernel_avx512();  // null when the addon was built without it

// AVX512_BF16 when the CPU has it (EMORL_BF16_ISA=emulated, or EMORL_GEMM_ISA=generic|avx2,
// forces the emulation, for tests).
const Bf16Kernel& bf16_kernel();

// Packs src [K x N] (row-major, ld) into panels of `width` columns (bf16_packed_size pairs).
void bf16_pack(int64_t K, int64_t N, const float* src, int64_t ld, int64_t width, uint32_t* dst);

}  // namespace emorl
