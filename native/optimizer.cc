// Adam and the gradient norm (optimizer.h): elementwise float32 loops, split over threads for
// Adam (each element's result does not depend on the split); the norm's sum is sequential in
// double, in the reference's order.
#include "optimizer.h"

#include <cmath>

#include "common.h"

namespace emorl {

namespace {

// One thread's range, the two flags fixed so that the loop vectorises (the arrays are distinct:
// the binding checks it).
template <bool First, bool Scaled>
void adam_range(const float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                float* __restrict p_next, int64_t i0, int64_t i1, const AdamScalars& s) {
  const float b1 = s.b1, c1 = s.c1, b2 = s.b2, c2 = s.c2, eps = s.eps, bc2 = s.bc2_sqrt, step = s.step_size, scale = s.scale;
  for (int64_t i = i0; i < i1; ++i) {
    const float gi = Scaled ? g[i] * scale : g[i];
    const float mi = First ? gi * c1 : m[i] * b1 + gi * c1;
    const float sq = gi * gi;
    const float vi = First ? sq * c2 : v[i] * b2 + sq * c2;
    m[i] = mi;
    v[i] = vi;
    const float denom = std::sqrt(vi) / bc2 + eps;
    p_next[i] = p[i] - (mi / denom) * step;
  }
}

}  // namespace

void adam_update(const float* p, const float* g, float* m, float* v, float* p_next, int64_t n, const AdamScalars& s,
                 int nthreads) {
  auto range = s.first ? (s.scale != 1.0f ? adam_range<true, true> : adam_range<true, false>)
                       : (s.scale != 1.0f ? adam_range<false, true> : adam_range<false, false>);
  // a few ns per element: below ~64k elements, waking the other threads costs more than it saves
  parallel_region(pass_threads(nthreads, n / 4), [&](int tid, int nt) {
    IeeeScope ieee;  // tiny second moments (v ~ 1e-31) take denormal terms: flushing them changes v's last bit
    int64_t i0, i1;
    split_range(n, tid, nt, i0, i1);
    range(p, g, m, v, p_next, i0, i1, s);
  });
}

float l2_norm_f32(const float* x, int64_t n) {
  double t = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double xi = x[i];
    t += static_cast<float>(xi * xi);
  }
  return std::sqrt(static_cast<float>(t));
}

}  // namespace emorl
