// The CUDA side of the addon (built only with EMORL_CUDA=ON). For now: device discovery, so the
// option's plumbing is exercised; with no driver or GPU it reports 0 devices and the CPU path runs.
#include <cuda_runtime.h>

#include <string>

namespace emorl {

__global__ void noop_kernel(float* p) {
  if (p) p[threadIdx.x] = 0.f;
}

int cuda_device_count(std::string* error) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (error) *error = cudaGetErrorString(e);
    cudaGetLastError();  // clear the sticky error state
    return 0;
  }
  return n;
}

}  // namespace emorl
