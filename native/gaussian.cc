// Diagonal Gaussians (gaussian.h): plain loops, one thread (the model's posteriors are a few
// thousand elements; the work is the transcendental functions, and a call costs microseconds).
#include "gaussian.h"

#include <algorithm>
#include <cmath>

namespace emorl {

namespace {

constexpr float kStdEps = 1e-5f;

// exp and log as tfjs' cpu kernels take them: in double, rounded once to float32.
inline float exp_f32(float x) { return static_cast<float>(std::exp(static_cast<double>(x))); }
inline float log_f32(float x) { return static_cast<float>(std::log(static_cast<double>(x))); }

}  // namespace

void softplus_std_forward(const float* s, int64_t n, float* std_out) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = 1.0f + exp_f32(std::min(s[i], 80.0f));
    std_out[i] = std::sqrt(log_f32(a) + kStdEps);
  }
}

void softplus_std_backward(const float* g, const float* s, const float* std_in, int64_t n, float* ds) {
  for (int64_t i = 0; i < n; ++i) {
    // sqrt: g / 2σ; + 1e-5 and 1 + ·: unchanged; log: / a; exp: · e; min(·, 80): 0 above 80
    const float e = exp_f32(std::min(s[i], 80.0f));
    const float a = 1.0f + e;
    // a multiplication by 0 rather than a plain 0, as the reference: a non-finite g stays NaN
    ds[i] = (((g[i] / (2.0f * std_in[i])) / a) * e) * (s[i] <= 80.0f ? 1.0f : 0.0f);
  }
}

void kl_diag_forward(const float* q_loc, const float* q_std, const float* p_loc, const float* p_std, int64_t rows,
                     int64_t D, float* kl) {
  for (int64_t row = 0, i = 0; row < rows; ++row) {
    double sum = 0;
    for (int64_t j = 0; j < D; ++j, ++i) {
      const float r = p_std ? q_std[i] / p_std[i] : q_std[i];
      const float x = p_std ? (q_loc[i] - p_loc[i]) / p_std[i] : q_loc[i];
      const float vr = r * r;
      const float t1 = x * x;
      const float w = ((vr + t1) - 1.0f) - log_f32(vr);
      sum += static_cast<double>(0.5f * w);
    }
    kl[row] = static_cast<float>(sum);
  }
}

void kl_diag_backward(const float* g, const float* q_loc, const float* q_std, const float* p_loc, const float* p_std,
                      int64_t rows, int64_t D, float* dq_loc, float* dq_std, float* dp_loc, float* dp_std) {
  for (int64_t row = 0, i = 0; row < rows; ++row) {
    // ½·w: dw = g·½; w = (vr + t1 − 1) − log vr: d vr = −dw/vr + dw; d t1 = dw
    const float dw = g[row] * 0.5f;
    for (int64_t j = 0; j < D; ++j, ++i) {
      const float r = p_std ? q_std[i] / p_std[i] : q_std[i];
      const float x = p_std ? (q_loc[i] - p_loc[i]) / p_std[i] : q_loc[i];
      const float vr = r * r;
      const float dvr = (-dw / vr) + dw;
      const float dr = dvr * (r * 2.0f);  // r²
      const float dx = dw * (x * 2.0f);   // x²
      if (!p_std) {
        dq_std[i] = dr;
        dq_loc[i] = dx;
        continue;
      }
      const float d = q_loc[i] - p_loc[i];
      const float s2 = p_std[i] * p_std[i];
      dq_std[i] = dr / p_std[i];  // r = σq / σp
      const float dd = dx / p_std[i];  // x = d / σp
      dq_loc[i] = dd;
      dp_loc[i] = -dd;
      dp_std[i] = -((dr * q_std[i]) / s2) + -((dx * d) / s2);
    }
  }
}

}  // namespace emorl
