// The fused slot competition (attention.h), one image per thread at a time: its products on the
// GEMM (single-threaded inside the per-image split), the softmax and the renormalisation in
// per-pixel passes between them, sums over pixels in double.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "gemm.h"

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

// w [K,N] = (p + eps) / s of one image (s: its K sums).
void renormalised(const float* p, const double* s, int64_t K, int64_t N, double eps, float* w) {
  for (int64_t j = 0; j < K; ++j)
    for (int64_t n = 0; n < N; ++n) w[j * N + n] = static_cast<float>((static_cast<double>(p[j * N + n]) + eps) / s[j]);
}

}  // namespace

void slot_attention_forward(const SlotAttentionDims& a, const float* q, const float* k, const float* v, double eps, float* p,
                            double* s, float* updates, int nthreads) {
  const int64_t K = a.K, N = a.N, d = a.d, C = a.C;
  for_each_image(a.B, nthreads, [&](int64_t b) {
    float* pb = p + b * K * N;
    double* sb = s + b * K;
    std::vector<float> w(static_cast<size_t>(K * N));
    // the scores q kᵀ [K,N] into p's rows, then per pixel the softmax over the K slots in place
    sgemm_dense(false, true, K, N, d, q + b * K * d, k + b * N * d, pb, false, 1);
    for (int64_t n = 0; n < N; ++n) {
      float mx = pb[n];
      for (int64_t j = 1; j < K; ++j) mx = std::max(mx, pb[j * N + n]);
      float z = 0.f;
      for (int64_t j = 0; j < K; ++j) z += (pb[j * N + n] = std::exp(pb[j * N + n] - mx));
      const float inv = 1.f / z;
      for (int64_t j = 0; j < K; ++j) pb[j * N + n] *= inv;
    }
    for (int64_t j = 0; j < K; ++j) {
      double t = 0;
      for (int64_t n = 0; n < N; ++n) t += static_cast<double>(pb[j * N + n]) + eps;
      sb[j] = t;
    }
    renormalised(pb, sb, K, N, eps, w.data());
    sgemm_dense(false, false, K, C, N, w.data(), v + b * N * C, updates + b * K * C, false, 1);
  });
}

void slot_attention_backward(const SlotAttentionDims& a, const float* q, const float* k, const float* v, const float* p,
                             const double* s, const float* updates, const float* dU, double eps, float* dq, float* dk, float* dv,
                             bool accumulate, int nthreads) {
  const int64_t K = a.K, N = a.N, d = a.d, C = a.C;
  for_each_image(a.B, nthreads, [&](int64_t b) {
    const float* pb = p + b * K * N;
    const double* sb = s + b * K;
    const float* dUb = dU + b * K * C;
    std::vector<float> g(static_cast<size_t>(K * N)), w(static_cast<size_t>(K * N));
    std::vector<double> r(static_cast<size_t>(K), 0.0);
    // r = Σ_pixels dW·w = dU·U per slot
    for (int64_t j = 0; j < K; ++j)
      for (int64_t c = 0; c < C; ++c) r[j] += static_cast<double>(dUb[j * C + c]) * updates[(b * K + j) * C + c];
    sgemm_dense(false, true, K, N, C, dUb, v + b * N * C, g.data(), false, 1);  // dW [K,N]
    // d/da = (dW − r) / s in place, slot by slot; then per pixel d/d(q·k) = p (d/da − Σ_slots p d/da)
    std::vector<float> pda(static_cast<size_t>(N), 0.f);
    for (int64_t j = 0; j < K; ++j) {
      const float rj = static_cast<float>(r[j]), inv = static_cast<float>(1 / sb[j]);
      float* gj = g.data() + j * N;
      const float* pj = pb + j * N;
      for (int64_t n = 0; n < N; ++n) {
        gj[n] = (gj[n] - rj) * inv;
        pda[n] += pj[n] * gj[n];
      }
    }
    for (int64_t j = 0; j < K; ++j) {
      float* gj = g.data() + j * N;
      const float* pj = pb + j * N;
      for (int64_t n = 0; n < N; ++n) gj[n] = pj[n] * (gj[n] - pda[n]);
    }
    renormalised(pb, sb, K, N, eps, w.data());
    sgemm_dense(false, false, K, d, N, g.data(), k + b * N * d, dq + b * K * d, false, 1);
    sgemm_dense(true, false, N, d, K, g.data(), q + b * K * d, dk + b * N * d, accumulate, 1);
    sgemm_dense(true, false, N, C, K, w.data(), dUb, dv + b * N * C, accumulate, 1);
  });
}

}  // namespace emorl
