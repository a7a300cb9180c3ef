// The fused image likelihood (see likelihood.h). Threads take whole images; per pixel the K slots
// are gathered (stride H·W·(C+1)), so every quantity stays in registers or a K-sized scratch.
#include "likelihood.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace emorl {
namespace {

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

// One image: returns its nll (accumulated in double); writes its rows of draw / means / log_masks.
double image_nll_one(const ImageNllShape& s, int64_t b, const float* raw, const float* target, float log_var, bool gmm,
                     float* draw, float* means, float* log_masks, float* work) {
  const int64_t K = s.K, C = s.C, CR = C + 1, P = s.H * s.W;
  const float inv_v = std::exp(-log_var);
  const float half_log_var = 0.5f * log_var;
  float* mu = work;           // [K, C]
  float* logm = mu + K * C;   // [K]
  float* tmp = logm + K;      // [K, C]: Gaussian: s_k; GMM: log-joint, then responsibilities
  double nll = 0;
  for (int64_t p = 0; p < P; ++p) {
    const float* x = target + (b * P + p) * C;
    float amax = -INFINITY;
    for (int64_t k = 0; k < K; ++k) {
      const float* r = raw + ((b * K + k) * P + p) * CR;
      for (int64_t c = 0; c < C; ++c) mu[k * C + c] = sigmoid(r[c]);
      logm[k] = r[C];
      amax = std::max(amax, r[C]);
    }
    float se = 0.f;
    for (int64_t k = 0; k < K; ++k) se += std::exp(logm[k] - amax);
    const float lse = amax + std::log(se);
    for (int64_t k = 0; k < K; ++k) logm[k] -= lse;
    if (!gmm) {
      // y_c = Σ_k m_k μ_kc; e_c = d nll / d y_c = (y_c − x_c) / v
      float* ep = tmp + K * C;  // [C]
      for (int64_t c = 0; c < C; ++c) {
        float y = 0.f;
        for (int64_t k = 0; k < K; ++k) y += std::exp(logm[k]) * mu[k * C + c];
        const float d = x[c] - y;
        nll += double(half_log_var) + 0.5 * double(d) * double(d) * double(inv_v);
        ep[c] = -d * inv_v;
      }
      if (draw) {
        // d/d r_kc = m_k e_c μ(1−μ); d/d a_k = m_k (s_k − Σ_j m_j s_j), s_k = Σ_c e_c μ_kc
        float ms = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          float sk = 0.f;
          for (int64_t c = 0; c < C; ++c) sk += ep[c] * mu[k * C + c];
          tmp[k] = sk;
          ms += std::exp(logm[k]) * sk;
        }
        for (int64_t k = 0; k < K; ++k) {
          float* g = draw + ((b * K + k) * P + p) * CR;
          const float m = std::exp(logm[k]);
          for (int64_t c = 0; c < C; ++c) {
            const float u = mu[k * C + c];
            g[c] = m * ep[c] * u * (1.f - u);
          }
          g[C] = m * (tmp[k] - ms);
        }
      }
    } else {
      // l_kc = log m_k − ½ logVar − ½ (x_c − μ_kc)² / v; nll −= LSE_k l_kc; γ = softmax_k l
      for (int64_t c = 0; c < C; ++c) {
        float lmax = -INFINITY;
        for (int64_t k = 0; k < K; ++k) {
          const float d = x[c] - mu[k * C + c];
          const float l = logm[k] - half_log_var - 0.5f * d * d * inv_v;
          tmp[k * C + c] = l;
          lmax = std::max(lmax, l);
        }
        float sum = 0.f;
        for (int64_t k = 0; k < K; ++k) sum += std::exp(tmp[k * C + c] - lmax);
        const float L = lmax + std::log(sum);
        nll -= double(L);
        if (draw)
          for (int64_t k = 0; k < K; ++k) tmp[k * C + c] = std::exp(tmp[k * C + c] - L);
      }
      if (draw) {
        // d/d μ_kc = γ_kc (μ_kc − x_c)/v; d/d a_k = −Σ_c γ_kc + C·m_k
        for (int64_t k = 0; k < K; ++k) {
          float* g = draw + ((b * K + k) * P + p) * CR;
          float gsum = 0.f;
          for (int64_t c = 0; c < C; ++c) {
            const float u = mu[k * C + c];
            const float gam = tmp[k * C + c];
            gsum += gam;
            g[c] = gam * (u - x[c]) * inv_v * u * (1.f - u);
          }
          g[C] = -gsum + float(C) * std::exp(logm[k]);
        }
      }
    }
    if (means)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < C; ++c) means[((b * K + k) * P + p) * C + c] = mu[k * C + c];
    if (log_masks)
      for (int64_t k = 0; k < K; ++k) log_masks[(b * K + k) * P + p] = logm[k];
  }
  return nll;
}

}  // namespace

void image_nll(const ImageNllShape& s, const float* raw, const float* target, float log_var, bool gmm, float* nll,
               float* draw, float* means, float* log_masks, int nthreads) {
  if (s.B == 0) return;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, s.B)));
  std::vector<AlignedBuf> work(static_cast<size_t>(nt));
  for (auto& w : work) w.reset(static_cast<size_t>(2 * s.K * s.C + s.K + s.C));
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t b0, b1;
    split_range(s.B, tid, ntt, b0, b1);
    for (int64_t b = b0; b < b1; ++b)
      nll[b] = static_cast<float>(image_nll_one(s, b, raw, target, log_var, gmm, draw, means, log_masks, work[tid].data()));
  });
}

}  // namespace emorl
