// The device's FP32 FMA throughput, measured (CUDA builds only): the benchmarks' "% of peak".
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "gpu.h"

namespace emorl {
namespace cuda {
namespace {

void check(cudaError_t e, const char* where) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("CUDA: ") + where + ": " + cudaGetErrorString(e));
  }
}

// Eight independent FMA chains per thread: enough to hide the FMA latency at full occupancy.
__global__ void fma_probe_kernel(float* out, int iters) {
  float a[8];
  for (int j = 0; j < 8; ++j) a[j] = 1e-3f * static_cast<float>(threadIdx.x + j);
  const float m = 0.999f, c = 1e-3f;
  for (int i = 0; i < iters; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] = fmaf(a[j], m, c);
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += a[j];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;  // keeps the chains alive
}

}  // namespace

double peak_gflops(int device, double seconds) {
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  const int threads = 256, blocks = prop.multiProcessorCount * (prop.maxThreadsPerMultiProcessor / threads);
  float* out = nullptr;
  check(cudaMalloc(&out, sizeof(float) * threads * blocks), "cudaMalloc");
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  double best = 0;
  int iters = 1 << 12;
  try {
    for (double spent = 0; spent < seconds * 1e3;) {
      cudaEventRecord(t0);
      fma_probe_kernel<<<blocks, threads>>>(out, iters);
      cudaEventRecord(t1);
      check(cudaEventSynchronize(t1), "FMA probe");
      float ms = 0;
      cudaEventElapsedTime(&ms, t0, t1);
      spent += ms;
      const double flops = 2.0 * 8 * static_cast<double>(iters) * threads * blocks;
      if (ms > 0) best = std::max(best, flops / (ms * 1e-3) / 1e9);
      if (ms < 20 && iters < (1 << 24)) iters *= 2;  // grow until launch overhead is negligible
    }
  } catch (...) {
    cudaFree(out);
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
    throw;
  }
  cudaFree(out);
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  return best;
}

}  // namespace cuda
}  // namespace emorl
