// Shared helpers for the emorl kernels: owned aligned buffers, the denormal (FTZ/DAZ) scope that
// every worker thread enters, and a tiny parallel-region wrapper over OpenMP (or std::thread).
// No global mutable state: thread counts come from OpenMP's own settings (OMP_NUM_THREADS).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#if defined(EMORL_OPENMP)
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace emorl {

// A 64-byte aligned float buffer, owned (RAII). Contents are uninitialised unless `zero` is set.
class AlignedBuf {
 public:
  AlignedBuf() = default;
  explicit AlignedBuf(size_t n, bool zero = false) { reset(n, zero); }
  void reset(size_t n, bool zero = false) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    if (bytes == 0) bytes = 64;
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    ptr_.reset(static_cast<float*>(p));
    size_ = n;
    if (zero) std::memset(p, 0, bytes);
  }
  float* data() { return ptr_.get(); }
  const float* data() const { return ptr_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> ptr_;
  size_t size_ = 0;
};

// Buffers kept between calls by their owner (a JS object): slot i grows to the largest size asked
// for and is reused after that, so repeated calls of the same shapes touch no fresh pages.
// Contents are not preserved across a growth.
class Workspace {
 public:
  float* buf(size_t slot, size_t n) {
    if (slot >= bufs_.size()) bufs_.resize(slot + 1);
    if (bufs_[slot].size() < n) bufs_[slot].reset(n);
    return bufs_[slot].data();
  }
  size_t bytes() const {
    size_t b = 0;
    for (const auto& x : bufs_) b += x.size() * sizeof(float);
    return b;
  }

 private:
  std::vector<AlignedBuf> bufs_;
};

// MXCSR's flush-to-zero and denormals-are-zero bits set (Flush) or cleared for the lifetime of the
// object, the caller's mode restored afterwards (the JS thread takes part in parallel regions and
// must get its mode back).
template <bool Flush>
class DenormalMode {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  DenormalMode() : saved_(_mm_getcsr()) { _mm_setcsr(Flush ? saved_ | 0x8040u : saved_ & ~0x8040u); }
  ~DenormalMode() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  DenormalMode() {}
#endif
  DenormalMode(const DenormalMode&) = delete;
  DenormalMode& operator=(const DenormalMode&) = delete;
};
// Denormals flushed: the kernels' parallel regions (speed).
using FtzScope = DenormalMode<true>;
// The IEEE default, denormals kept, inside a parallel region: for loops that must give the
// reference's bits whatever the magnitudes (the optimizer's: PyTorch, the TypeScript loop and a
// GPU keep denormals).
using IeeeScope = DenormalMode<false>;

inline int max_threads() {
#if defined(EMORL_OPENMP)
  return omp_get_max_threads();
#else
  unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
#endif
}

// Runs f(tid, nthreads) on `nthreads` threads (the caller is thread 0), each inside an FtzScope.
// f must not throw: allocate before the region.
template <class F>
void parallel_region(int nthreads, F&& f) {
  if (nthreads <= 1) {
    FtzScope ftz;
    f(0, 1);
    return;
  }
#if defined(EMORL_OPENMP)
#pragma omp parallel num_threads(nthreads)
  {
    FtzScope ftz;
    f(omp_get_thread_num(), omp_get_num_threads());
  }
#else
  std::vector<std::thread> workers;
  workers.reserve(nthreads - 1);
  for (int t = 1; t < nthreads; ++t)
    workers.emplace_back([&f, t, nthreads] {
      FtzScope ftz;
      f(t, nthreads);
    });
  {
    FtzScope ftz;
    f(0, nthreads);
  }
  for (auto& w : workers) w.join();
#endif
}

// [begin, end) share of `n` items for thread `tid` of `nt` (contiguous, balanced).
inline void split_range(int64_t n, int tid, int nt, int64_t& begin, int64_t& end) {
  int64_t q = n / nt, r = n % nt;
  begin = tid * q + (tid < r ? tid : r);
  end = begin + q + (tid < r ? 1 : 0);
}

// Threads for a pass over `elements` cheap elements: about 16K each at least (a thread's start costs
// more than that much work), at most nthreads.
inline int pass_threads(int nthreads, int64_t elements) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, elements / 16384 + 1)));
}

// out[j] = Σ_rows v[row, j] (rows of `cols` floats), summed in double: per-thread partial sums over
// contiguous row ranges, added in thread order (the result does not depend on timing).
inline void column_sums(const float* v, int64_t rows, int64_t cols, float* out, int nthreads) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, rows * cols / 65536 + 1)));
  std::vector<double> part(static_cast<size_t>(nt * cols), 0.0);
  parallel_region(nt, [&](int tid, int n) {
    int64_t r0, r1;
    split_range(rows, tid, n, r0, r1);
    double* acc = part.data() + tid * cols;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < cols; ++j) acc[j] += v[r * cols + j];
  });
  for (int64_t j = 0; j < cols; ++j) {
    double t = 0;
    for (int i = 0; i < nt; ++i) t += part[static_cast<size_t>(i * cols + j)];
    out[j] = static_cast<float>(t);
  }
}

}  // namespace emorl
