// SGEMM: C[M,N] = op(A)[M,K] * op(B)[K,N] (+ C), row-major, multi-threaded, ISA chosen at run time.
#pragma once

#include <cstdint>

namespace emorl {

struct GemmCall {
  bool transA, transB;
  int64_t M, N, K;
  const float* A;
  int64_t lda;
  const float* B;
  int64_t ldb;
  float* C;
  int64_t ldc;
  bool accumulate;  // C += product (else C = product)
  // Optional: op(B) already in the kernel's packed layout, ceil(N/nr) panels of [K][nr] floats
  // (zero-padded past N); B and ldb are then ignored. Lets im2col write its columns straight
  // into the layout the micro-kernel reads, skipping a pass over the largest operand.
  const float* Bpacked = nullptr;
  // Optional: op(A) already packed by GemmKernel::pack_a_full (ceil(M/mr) panels of [K][mr]);
  // A and lda are then ignored. Lets a caller pack a weight matrix once for many products.
  const float* Apacked = nullptr;
};

// One instruction-set variant of the blocked single-threaded GEMM.
struct GemmKernel {
  const char* name;
  int mr, nr;
  int64_t pack_a_floats, pack_b_floats;           // scratch each thread needs
  void (*serial)(const GemmCall&, float* packA, float* packB);
  // Packs op(A) [M x K] whole into dst (ceil(M/mr)*mr*K floats) for GemmCall::Apacked.
  void (*pack_a_full)(bool transA, int64_t M, int64_t K, const float* A, int64_t lda, float* dst);
  // Packs op(B) [K x N] whole into dst (ceil(N/nr)*nr*K floats) for GemmCall::Bpacked.
  void (*pack_b_full)(bool transB, int64_t K, int64_t N, const float* B, int64_t ldb, float* dst);
  // 12 chains x `iters` rounds of vector multiply-adds (2 FLOP per lane each); see peak_gflops.
  float (*fma_probe)(int64_t iters);
  int vector_width;  // floats per vector register
  // Implicit-GEMM convolution tiles (the convolutions' products without a column matrix): row i of
  // A is, for each of `taps` kernel taps t, the C floats at rows[i] + tap_off[t] (mr rows; MR row
  // pointers, those past mr repeating a valid one); b a packed B panel over taps·C rows.
  // C[mr x nr] = the product.
  void (*conv_tile)(const float* const* rows, int64_t taps, const int64_t* tap_off, int64_t C, const float* b, float* c,
                    int64_t ldc, int64_t mr, int64_t nr);
  // C[mr x nr] += Σ_k a[k·astride + i] · B[k, j], row k of B at b + b_row[k] + b_off (nr floats).
  void (*gather_tile)(int64_t K, const float* a, int64_t astride, const float* b, const int64_t* b_row, int64_t b_off,
                      float* c, int64_t ldc, int64_t mr, int64_t nr);
  // A convolution tile for at most kNarrowCo output channels, vectorised over the input channels
  // (C a multiple of vector_width): C[mr x Co] for mr <= kNarrowRows cells (kNarrowRows row
  // pointers), weights laid out [Co][taps][C].
  void (*narrow_tile)(const float* const* rows, int64_t taps, const int64_t* tap_off, int64_t C, int64_t Co, const float* w,
                      float* c, int64_t ldc, int64_t mr);
  // Winograd F(m×m, r×r), α = 8, m = 4 or 6 (see nhwc.cc), vectorised over channels (multiples of
  // vector_width). The input transform of one 8×8 tile, cell (i, j) at map + i·row + j·C, into
  // V[ξ] at V + ξ·xi_stride (ξ < 64); the output transform of one tile from X[ξ] at X + ξ·xi_stride
  // into the rows x cols cells (of m x m) at y + a·row + b·Co, plus bias (may be null), then the
  // activation act (as in bias_act_rows).
  void (*wino_input)(const float* map, int64_t row, int64_t C, float* V, int64_t xi_stride);
  void (*wino_output)(int m, const float* X, int64_t xi_stride, int64_t Co, const float* bias, int act, float* y, int64_t row,
                      int64_t rows, int64_t cols);
  // The output transform's adjoint for the filter gradient: the rows x cols cells of one tile's
  // output gradient dY (cell (a, b) at dy + a·row + b·Co; zero past rows and cols) to D = A dY Aᵀ,
  // D[ξ] at D + ξ·xi_stride.
  void (*wino_output_adjoint)(int m, const float* dy, int64_t row, int64_t Co, int64_t rows, int64_t cols, float* D,
                              int64_t xi_stride);
  // y (rows of n) += bias (may be null), then act: 0 linear, 1 ReLU, 2 ELU (expm1 vectorised, to
  // about an ulp), in place (the epilogue of the convolutions and of matmul; nhwc.h's Act values).
  void (*bias_act_rows)(float* y, int64_t rows, int64_t n, const float* bias, int act);
};

constexpr int kWinogradAlpha = 8;  // the Winograd tiles' input side (GemmKernel::wino_*)
constexpr int kNarrowCo = 4;    // the most output channels narrow_tile takes
constexpr int kNarrowRows = 4;  // output cells per narrow tile

const GemmKernel* gemm_kernel_generic();
const GemmKernel* gemm_kernel_avx2();
const GemmKernel* gemm_kernel_avx512();

// The best variant this CPU supports.
const GemmKernel& gemm_kernel();

// Multi-threaded (up to `nthreads`; 1 = run on the calling thread only). Allocates its scratch.
void sgemm(const GemmCall& g, int nthreads);

// C [M,N] = op(A)·op(B) (+ C when accumulate) for tightly packed row-major matrices (op(A) = Aᵀ
// when A is stored [K,M], op(B) = Bᵀ when B is stored [N,K]); K = 0 gives zeros (or leaves C).
void sgemm_dense(bool transA, bool transB, int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
                 bool accumulate, int nthreads);

// Single-threaded, with caller-owned scratch of gemm_kernel().pack_*_floats floats (for callers
// that parallelise at a coarser level, e.g. over the images of a batch).
void sgemm_serial(const GemmCall& g, float* packA, float* packB);

// The multiply-add throughput of `nthreads` threads running the ISA's FMA probe for about
// `seconds`, in GFLOP/s: the machine's practical peak for this kernel family.
double peak_gflops(int nthreads, double seconds);

// `batch` independent products with element strides between consecutive A, B and C matrices.
void sgemm_batched(const GemmCall& g, int64_t batch, int64_t strideA, int64_t strideB, int64_t strideC,
                   int nthreads);

}  // namespace emorl
