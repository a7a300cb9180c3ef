// The encoder head on the CPU (encoder_head.h): the products on sgemm (biases and ReLU in its
// epilogue pass), the positional add and LayerNorm in one pass per row, statistics in double.
#include "encoder_head.h"

#include <cmath>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "nhwc.h"

namespace emorl {

namespace {

// P [hw, D] = pos W_posᵀ + b_pos, in double.
std::vector<float> positional_projection(const EncoderHeadDims& d, const EncoderHeadParams& p) {
  std::vector<float> P(static_cast<size_t>(d.hw * d.D));
  for (int64_t i = 0; i < d.hw; ++i)
    for (int64_t j = 0; j < d.D; ++j) {
      double t = p.pos_b[j];
      for (int64_t c = 0; c < d.pc; ++c) t += static_cast<double>(p.pos[i * d.pc + c]) * p.pos_w[j * d.pc + c];
      P[static_cast<size_t>(i * d.D + j)] = static_cast<float>(t);
    }
  return P;
}

}  // namespace

void encoder_head_forward(const EncoderHeadDims& d, const float* h, const EncoderHeadParams& p, float* k, float* v,
                          const EncoderHeadSaved& s, int nthreads) {
  const int64_t R = d.rows, D = d.D;
  const std::vector<float> P = positional_projection(d, p);
  parallel_region(pass_threads(nthreads, R * D), [&](int tid, int nt) {
    int64_t r0, r1;
    split_range(R, tid, nt, r0, r1);
    for (int64_t r = r0; r < r1; ++r) {
      const float *hr = h + r * D, *pr = P.data() + (r % d.hw) * D;
      double m = 0;
      for (int64_t j = 0; j < D; ++j) m += static_cast<double>(hr[j]) + pr[j];
      m /= static_cast<double>(D);
      double var = 0;
      for (int64_t j = 0; j < D; ++j) {
        const double x = static_cast<double>(hr[j]) + pr[j] - m;
        var += x * x;
      }
      const double rs = 1 / std::sqrt(var / static_cast<double>(D) + p.eps);
      s.mean[r] = m;
      s.rstd[r] = rs;
      float* f1 = s.f1 + r * D;
      for (int64_t j = 0; j < D; ++j) f1[j] = static_cast<float>((static_cast<double>(hr[j]) + pr[j] - m) * rs * p.ln_w[j] + p.ln_b[j]);
    }
  });
  sgemm_dense(false, true, R, D, D, s.f1, p.w1, s.f2, false, nthreads);
  bias_act(s.f2, R, D, p.b1, Act::Relu, nthreads);
  sgemm_dense(false, true, R, D, D, s.f2, p.w2, s.f3, false, nthreads);
  bias_act(s.f3, R, D, p.b2, Act::Linear, nthreads);
  sgemm_dense(false, true, R, d.Z, D, s.f3, p.wk, k, false, nthreads);
  sgemm_dense(false, true, R, d.Z, D, s.f3, p.wv, v, false, nthreads);
}

void encoder_head_backward(const EncoderHeadDims& d, const float* h, const EncoderHeadParams& p, const EncoderHeadKept& s,
                           const float* dk, const float* dv, float* dh, const EncoderHeadParamGrads& g, int nthreads,
                           float* scratch) {
  const int64_t R = d.rows, D = d.D, Z = d.Z;
  const bool params = g.wk != nullptr;
  std::vector<float> own(scratch ? 0 : static_cast<size_t>(2 * R * D));
  // a, b: [R, D] each, every element written before it is read
  float* const a = scratch ? scratch : own.data();
  float* const b = a + R * D;
  // k = f3 W_kᵀ, v = f3 W_vᵀ: df3 in a
  sgemm_dense(false, false, R, D, Z, dk, p.wk, a, false, nthreads);
  sgemm_dense(false, false, R, D, Z, dv, p.wv, a, true, nthreads);
  if (params) {
    sgemm_dense(true, false, Z, D, R, dk, s.f3, g.wk, false, nthreads);
    sgemm_dense(true, false, Z, D, R, dv, s.f3, g.wv, false, nthreads);
    sgemm_dense(true, false, D, D, R, a, s.f2, g.w2, false, nthreads);
    column_sums(a, R, D, g.b2, nthreads);
  }
  // f3 = f2 W2ᵀ + b2, f2 = ReLU(f1 W1ᵀ + b1): df2 in b, then df1 in a
  sgemm_dense(false, false, R, D, D, a, p.w2, b, false, nthreads);
  parallel_region(pass_threads(nthreads, R * D), [&](int tid, int nt) {
    int64_t i0, i1;
    split_range(R * D, tid, nt, i0, i1);
    for (int64_t i = i0; i < i1; ++i)
      if (!(s.f2[i] > 0.f)) b[i] = 0.f;
  });
  if (params) {
    sgemm_dense(true, false, D, D, R, b, s.f1, g.w1, false, nthreads);
    column_sums(b, R, D, g.b1, nthreads);
  }
  sgemm_dense(false, false, R, D, D, b, p.w1, a, false, nthreads);
  // the LayerNorm: dh = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), dx̂ = df1·γ; per thread, dγ, dβ and
  // dP (dh summed over the images, per pixel) in double
  const std::vector<float> P = positional_projection(d, p);
  const int nt = pass_threads(nthreads, R * D);
  std::vector<double> acc(params ? static_cast<size_t>(nt * (2 * D + d.hw * D)) : 0, 0.0);
  parallel_region(nt, [&](int tid, int n) {
    int64_t r0, r1;
    split_range(R, tid, n, r0, r1);
    double* dgam = params ? acc.data() + tid * (2 * D + d.hw * D) : nullptr;
    double* dbet = params ? dgam + D : nullptr;
    double* dP = params ? dgam + 2 * D : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const float *hr = h + r * D, *pr = P.data() + (r % d.hw) * D, *gr = a + r * D;
      const double m = s.mean[r], rs = s.rstd[r];
      double m1 = 0, m2 = 0;
      for (int64_t j = 0; j < D; ++j) {
        const double xh = (static_cast<double>(hr[j]) + pr[j] - m) * rs, dxh = static_cast<double>(gr[j]) * p.ln_w[j];
        m1 += dxh;
        m2 += dxh * xh;
      }
      m1 /= static_cast<double>(D);
      m2 /= static_cast<double>(D);
      float* dr = dh + r * D;
      for (int64_t j = 0; j < D; ++j) {
        const double xh = (static_cast<double>(hr[j]) + pr[j] - m) * rs;
        const double dx = rs * (static_cast<double>(gr[j]) * p.ln_w[j] - m1 - xh * m2);
        dr[j] = static_cast<float>(dx);
        if (params) {
          dgam[j] += gr[j] * xh;
          dbet[j] += gr[j];
          dP[(r % d.hw) * D + j] += dx;
        }
      }
    }
  });
  if (!params) return;
  // sum the threads' parts (in thread order), then W_pos, b_pos from dP
  const int64_t stride = 2 * D + d.hw * D;
  std::vector<double> tot(static_cast<size_t>(stride), 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t i = 0; i < stride; ++i) tot[static_cast<size_t>(i)] += acc[static_cast<size_t>(t * stride + i)];
  for (int64_t j = 0; j < D; ++j) {
    g.ln_w[j] = static_cast<float>(tot[static_cast<size_t>(j)]);
    g.ln_b[j] = static_cast<float>(tot[static_cast<size_t>(D + j)]);
  }
  const double* dP = tot.data() + 2 * D;
  for (int64_t j = 0; j < D; ++j) {
    double bsum = 0;
    for (int64_t i = 0; i < d.hw; ++i) bsum += dP[i * D + j];
    g.pos_b[j] = static_cast<float>(bsum);
    for (int64_t c = 0; c < d.pc; ++c) {
      double t = 0;
      for (int64_t i = 0; i < d.hw; ++i) t += dP[i * D + j] * p.pos[i * d.pc + c];
      g.pos_w[j * d.pc + c] = static_cast<float>(t);
    }
  }
}

}  // namespace emorl
