// The CUDA surface the GPU kernels use, for two compilers.
//   nvcc:            the real thing (cuda_runtime.h); kernels run on the device.
//   a C++ compiler:  a SIMT emulator (EMORL_SIMT_EMULATE). Each block's threads run as fibers on
//                    the calling thread, one after another, switching at __syncthreads(), so the
//                    very same kernel source runs without a GPU and is tested against the CPU
//                    kernels on every CI run. __shared__ arrays become per-OS-thread statics (the
//                    blocks of a launch run one at a time); atomics are plain read-modify-writes.
// A missing __syncthreads() between a shared-memory write and another thread's read shows up
// under the emulator as a wrong result (fiber 0 runs ahead of the rest), not as a silent race;
// EMORL_SIMT_SCHEDULE=reverse (simt.cc) runs the threads, and the blocks, the other way round for
// the races that order hides. Buffers handed out for writing hold NaN, as device memory holds
// garbage. Warp intrinsics are not emulated: the kernels do not use them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)

#include <cuda_runtime.h>
#define EMORL_GPU_NS cuda
#define EMORL_DEVICE __device__ __forceinline__
#define EMORL_DEVICE_COLD __device__ __noinline__  // rarely taken: kept out of the hot loop's code

namespace emorl {
namespace cuda {

inline void check(cudaError_t e, const char* where) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("CUDA: ") + where + ": " + cudaGetErrorString(e));
  }
}

// Device memory, owned.
class DeviceBuf {
 public:
  DeviceBuf() = default;
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
  ~DeviceBuf() { release(); }
  void reset(size_t n) {
    release();
    void* p = nullptr;
    check(cudaMalloc(&p, (n ? n : 1) * sizeof(float)), "cudaMalloc");
    p_ = static_cast<float*>(p);
    n_ = n;
  }
  float* data() const { return p_; }
  size_t size() const { return n_; }
  void poison() {}  // the emulator's DeviceBuf poisons; a device memset per write would cost time

 private:
  void release() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  float* p_ = nullptr;
  size_t n_ = 0;
};

inline void to_device(float* dst, const float* src, size_t n) {
  check(cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyHostToDevice), "copy to the device");
}
inline void to_host(float* dst, const float* src, size_t n) {
  check(cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyDeviceToHost), "copy from the device");
}
inline void zero(float* dst, size_t n) { check(cudaMemset(dst, 0, n * sizeof(float)), "cudaMemset"); }
// a·b, a + b, a − b, a / b and √a each rounded to float, never fused into an FMA (what must match the host's bits)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
inline void select_device(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }
inline void finish(const char* where) {
  check(cudaGetLastError(), where);
  check(cudaDeviceSynchronize(), where);
}

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  kernel<<<grid, block>>>(static_cast<P>(args)...);
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace cuda
}  // namespace emorl

#else  // the SIMT emulator

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#define EMORL_GPU_NS simt
#define EMORL_DEVICE inline
#define EMORL_DEVICE_COLD inline
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The emulated thread's coordinates: set by the scheduler before it resumes a fiber.
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emorl {
namespace simt {

// Runs body once per thread of every block (simt.cc). Threads of a block advance in turn from
// one __syncthreads() to the next; a block whose threads do not all reach the same number of
// barriers is an error (undefined behaviour on a GPU).
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);
// __syncthreads(): back to the scheduler until every thread of the block has arrived.
void barrier();
// What a GPU would stop a kernel for (a misaligned vector access): the launch runs to its end,
// then run_grid throws with the first such fault (a kernel cannot throw across the fibers).
void device_fault(const char* what);
// A vector access of `bytes` at p must be aligned to them, as on a GPU.
inline void check_vector_access(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes) device_fault(bytes == 16 ? "a 128-bit access to an address not 16-byte aligned" : "a 64-bit access to an address not 8-byte aligned");
}

// "Device" memory is host memory here; the same calls as the CUDA side.
class DeviceBuf {
 public:
  DeviceBuf() = default;
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
  void reset(size_t n) {
    p_.reset(new float[n ? n : 1]);
    n_ = n;
    poison();
  }
  float* data() const { return p_.get(); }
  size_t size() const { return n_; }
  // NaN throughout: cudaMalloc'd memory holds whatever was there, so a kernel that reads what no
  // one wrote (or counts on zeros) gives NaNs here instead of passing on fresh zeroed pages.
  void poison() { std::fill(p_.get(), p_.get() + (n_ ? n_ : 1), std::numeric_limits<float>::quiet_NaN()); }

 private:
  std::unique_ptr<float[]> p_;
  size_t n_ = 0;
};

inline void to_device(float* dst, const float* src, size_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void to_host(float* dst, const float* src, size_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void zero(float* dst, size_t n) { std::memset(dst, 0, n * sizeof(float)); }
// a·b, a + b, a − b, a / b and √a each rounded to float (a volatile float forces the rounding, so no FMA contraction)
inline float mul_rn(float a, float b) {
  volatile float p = a * b;
  return p;
}
inline float add_rn(float a, float b) {
  volatile float p = a + b;
  return p;
}
inline float sub_rn(float a, float b) {
  volatile float p = a - b;
  return p;
}
inline float div_rn(float a, float b) {
  volatile float p = a / b;
  return p;
}
inline float sqrt_rn(float a) {
  volatile float p = std::sqrt(a);
  return p;
}
inline void select_device(int) {}
inline void finish(const char*) {}

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  const std::function<void()> body = [&] { kernel(static_cast<P>(args)...); };
  run_grid(grid, block, body);
}

}  // namespace simt
}  // namespace emorl

inline void __syncthreads() { emorl::simt::barrier(); }
inline void __threadfence() {}  // the emulator's blocks run one after another

template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

#endif
