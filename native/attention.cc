// Slot competition normalisations (attention.h), one image per thread at a time.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace emorl {
namespace {

// f(b) for every image b, the images split over up to nthreads threads.
template <typename F>
void for_each_image(int64_t B, int nthreads, F f) {
  parallel_region(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, B))), [&](int tid, int nt) {
    int64_t b0, b1;
    split_range(B, tid, nt, b0, b1);
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

}  // namespace

void slot_softmax_forward(const float* dots, int64_t B, int64_t K, int64_t N, double eps, float* p, float* a, float* w,
                          double* s, int nthreads) {
  for_each_image(B, nthreads, [&](int64_t b) {
    const int64_t o = b * K * N;
    for (int64_t n = 0; n < N; ++n) {
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < K; ++j) mx = std::max(mx, static_cast<double>(dots[o + j * N + n]));
      double sum = 0;
      for (int64_t j = 0; j < K; ++j) sum += std::exp(static_cast<double>(dots[o + j * N + n]) - mx);
      const double lse = mx + std::log(sum);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t i = o + j * N + n;
        p[i] = static_cast<float>(std::exp(static_cast<double>(dots[i]) - lse));
        a[i] = static_cast<float>(static_cast<double>(p[i]) + eps);
      }
    }
    for (int64_t j = 0; j < K; ++j) {
      const int64_t r = o + j * N;
      double t = 0;
      for (int64_t n = 0; n < N; ++n) t += a[r + n];
      s[b * K + j] = t;
      for (int64_t n = 0; n < N; ++n) w[r + n] = static_cast<float>(a[r + n] / t);
    }
  });
}

void slot_softmax_backward(const float* g, const float* w, const float* p, const double* s, int64_t B, int64_t K, int64_t N,
                           float* out, int nthreads) {
  for_each_image(B, nthreads, [&](int64_t b) {
    const int64_t o = b * K * N;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t r = o + j * N;
      double t = 0;
      for (int64_t n = 0; n < N; ++n) t += static_cast<double>(g[r + n]) * w[r + n];
      const double inv = 1 / s[b * K + j];
      for (int64_t n = 0; n < N; ++n) out[r + n] = static_cast<float>((g[r + n] - t) * inv);
    }
    for (int64_t n = 0; n < N; ++n) {
      double t = 0;
      for (int64_t j = 0; j < K; ++j) t += static_cast<double>(p[o + j * N + n]) * out[o + j * N + n];
      for (int64_t j = 0; j < K; ++j) {
        const int64_t i = o + j * N + n;
        out[i] = static_cast<float>(p[i] * (out[i] - t));
      }
    }
  });
}

}  // namespace emorl
