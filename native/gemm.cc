// SGEMM dispatch (per-ISA kernel chosen once per call from the CPU's features) and threading.
#include "gemm.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>

#include "common.h"

namespace emorl {

static const GemmKernel* best_kernel() {
#if defined(EMORL_X86)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  const bool avx512 = false, avx2 = false;
#endif
  // EMORL_GEMM_ISA=avx2|generic picks a lesser variant (for tests); an unsupported one is ignored.
  const char* want = std::getenv("EMORL_GEMM_ISA");
  const std::string w = want ? want : "";
  if (w == "generic") return gemm_kernel_generic();
  if (w == "avx2" && avx2) return gemm_kernel_avx2();
  if (avx512) return gemm_kernel_avx512();
  if (avx2) return gemm_kernel_avx2();
  return gemm_kernel_generic();
}

const GemmKernel& gemm_kernel() {
  static const GemmKernel* const k = best_kernel();  // decided once (thread-safe), never changed
  return *k;
}

static void zero_or_keep(const GemmCall& g) {
  if (g.accumulate) return;
  for (int64_t i = 0; i < g.M; ++i)
    for (int64_t j = 0; j < g.N; ++j) g.C[i * g.ldc + j] = 0.f;
}

void sgemm_serial(const GemmCall& g, float* packA, float* packB) {
  if (g.M <= 0 || g.N <= 0) return;
  if (g.K <= 0) return zero_or_keep(g);
  gemm_kernel().serial(g, packA, packB);
}

// Sub-problem of rows [i0,i1) x columns [j0,j1).
static GemmCall sub(const GemmCall& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  GemmCall s = g;
  s.M = i1 - i0;
  s.N = j1 - j0;
  if (g.Apacked) s.Apacked = g.Apacked + (i0 / gemm_kernel().mr) * g.K * gemm_kernel().mr;
  else s.A = g.transA ? g.A + i0 : g.A + i0 * g.lda;
  if (g.Bpacked) s.Bpacked = g.Bpacked + (j0 / gemm_kernel().nr) * g.K * gemm_kernel().nr;
  else s.B = g.transB ? g.B + j0 * g.ldb : g.B + j0;
  s.C = g.C + i0 * g.ldc + j0;
  return s;
}

void sgemm_dense(bool transA, bool transB, int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C,
                 bool accumulate, int nthreads) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate) std::fill(C, C + M * N, 0.f);
    return;
  }
  sgemm(GemmCall{transA, transB, M, N, K, A, transA ? M : K, B, transB ? K : N, C, N, accumulate}, nthreads);
}

void sgemm(const GemmCall& g, int nthreads) {
  if (g.M <= 0 || g.N <= 0) return;
  const GemmKernel& k = gemm_kernel();
  const double flops = 2.0 * g.M * g.N * (g.K > 0 ? g.K : 1);
  int nt = nthreads < 1 ? 1 : nthreads;
  if (flops < 2e6) nt = 1;
  // Split the dimension with more micro-tiles; each thread owns whole tiles.
  const int64_t ntile_n = (g.N + k.nr - 1) / k.nr, ntile_m = (g.M + k.mr - 1) / k.mr;
  const bool split_n = ntile_n >= ntile_m || ntile_n >= 4 * nt;
  const int64_t ntiles = split_n ? ntile_n : ntile_m;
  if (ntiles < nt) nt = static_cast<int>(ntiles);
  std::vector<AlignedBuf> packA(nt), packB(nt);
  for (int t = 0; t < nt; ++t) {
    packA[t].reset(k.pack_a_floats);
    packB[t].reset(k.pack_b_floats);
  }
  parallel_region(nt, [&](int tid, int n) {
    int64_t b, e;
    split_range(ntiles, tid, n, b, e);
    if (b >= e) return;
    GemmCall s = split_n ? sub(g, 0, g.M, b * k.nr, std::min<int64_t>(e * k.nr, g.N))
                         : sub(g, b * k.mr, std::min<int64_t>(e * k.mr, g.M), 0, g.N);
    sgemm_serial(s, packA[tid].data(), packB[tid].data());
  });
}

void sgemm_batched(const GemmCall& g, int64_t batch, int64_t strideA, int64_t strideB, int64_t strideC,
                   int nthreads) {
  if (batch <= 0) return;
  const int nt = nthreads < 1 ? 1 : nthreads;
  if (batch < nt) {
    for (int64_t i = 0; i < batch; ++i) {
      GemmCall s = g;
      s.A += i * strideA;
      s.B += i * strideB;
      s.C += i * strideC;
      sgemm(s, nt);  // (batched calls take unpacked B)
    }
    return;
  }
  const GemmKernel& k = gemm_kernel();
  std::vector<AlignedBuf> packA(nt), packB(nt);
  for (int t = 0; t < nt; ++t) {
    packA[t].reset(k.pack_a_floats);
    packB[t].reset(k.pack_b_floats);
  }
  parallel_region(nt, [&](int tid, int n) {
    int64_t b, e;
    split_range(batch, tid, n, b, e);
    for (int64_t i = b; i < e; ++i) {
      GemmCall s = g;
      s.A += i * strideA;
      s.B += i * strideB;
      s.C += i * strideC;
      sgemm_serial(s, packA[tid].data(), packB[tid].data());
    }
  });
}

double peak_gflops(int nthreads, double seconds) {
  const GemmKernel& k = gemm_kernel();
  const int nt = nthreads < 1 ? 1 : nthreads;
  // calibrate the rounds on one thread, then run all threads at once
  int64_t iters = 1 << 16;
  double t = 0;
  volatile float sink = 0;
  for (;;) {
    auto t0 = std::chrono::steady_clock::now();
    sink = sink + k.fma_probe(iters);
    t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (t > 0.02 || iters > (int64_t(1) << 40)) break;
    iters *= 4;
  }
  iters = static_cast<int64_t>(static_cast<double>(iters) * seconds / (t > 0 ? t : 1e-3)) + 1;
  std::vector<double> took(static_cast<size_t>(nt), 0.0);
  std::vector<float> sinks(static_cast<size_t>(nt), 0.f);
  parallel_region(nt, [&](int tid, int) {
    auto t0 = std::chrono::steady_clock::now();
    sinks[tid] = k.fma_probe(iters);
    took[tid] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
  double slowest = 0;
  for (double x : took) slowest = std::max(slowest, x);
  const double flops = double(nt) * double(iters) * 12.0 * k.vector_width * 2.0;
  return flops / slowest / 1e9;
}

}  // namespace emorl
