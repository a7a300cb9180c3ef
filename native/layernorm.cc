// LayerNorm (layernorm.h): rows split over threads; parameter gradients summed per thread.
#include "layernorm.h"

#include <cmath>
#include <vector>

#include "common.h"

namespace emorl {

void layer_norm_forward(const float* x, int64_t rows, int64_t D, const float* w, const float* b, double eps, float* y,
                        double* mean, double* rstd, int nthreads) {
  parallel_region(pass_threads(nthreads, rows * D), [&](int tid, int nt) {
    int64_t r0, r1;
    split_range(rows, tid, nt, r0, r1);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * D;
      double m = 0;
      for (int64_t j = 0; j < D; ++j) m += xr[j];
      m /= static_cast<double>(D);
      double v = 0;
      for (int64_t j = 0; j < D; ++j) {
        const double d = xr[j] - m;
        v += d * d;
      }
      const double rs = 1 / std::sqrt(v / static_cast<double>(D) + eps);
      mean[r] = m;
      rstd[r] = rs;
      float* yr = y + r * D;
      for (int64_t j = 0; j < D; ++j) {
        double t = (xr[j] - m) * rs;
        if (w) t *= w[j];
        if (b) t += b[j];
        yr[j] = static_cast<float>(t);
      }
    }
  });
}

void layer_norm_backward(const float* g, const float* x, int64_t rows, int64_t D, const float* w, const double* mean,
                         const double* rstd, float* dx, double* dw, double* db, int nthreads) {
  const int nt = pass_threads(nthreads, rows * D);
  const bool params = dw && db;
  std::vector<std::vector<double>> pw(params ? static_cast<size_t>(nt) : 0, std::vector<double>(static_cast<size_t>(D), 0.0));
  std::vector<std::vector<double>> pb(params ? static_cast<size_t>(nt) : 0, std::vector<double>(static_cast<size_t>(D), 0.0));
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t r0, r1;
    split_range(rows, tid, ntt, r0, r1);
    double* tw = params ? pw[static_cast<size_t>(tid)].data() : nullptr;
    double* tb = params ? pb[static_cast<size_t>(tid)].data() : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const float *gr = g + r * D, *xr = x + r * D;
      const double m = mean[r], rs = rstd[r];
      double s1 = 0, s2 = 0;
      for (int64_t j = 0; j < D; ++j) {
        const double xh = (xr[j] - m) * rs;
        const double gh = w ? static_cast<double>(gr[j]) * w[j] : gr[j];
        s1 += gh;
        s2 += gh * xh;
        if (tw) {
          tw[j] += gr[j] * xh;
          tb[j] += gr[j];
        }
      }
      s1 /= static_cast<double>(D);
      s2 /= static_cast<double>(D);
      float* dr = dx + r * D;
      for (int64_t j = 0; j < D; ++j) {
        const double xh = (xr[j] - m) * rs;
        const double gh = w ? static_cast<double>(gr[j]) * w[j] : gr[j];
        dr[j] = static_cast<float>(rs * (gh - s1 - xh * s2));
      }
    }
  });
  if (!params) return;
  for (int64_t j = 0; j < D; ++j) {
    double sw = 0, sb = 0;
    for (size_t t = 0; t < pw.size(); ++t) {
      sw += pw[t][static_cast<size_t>(j)];
      sb += pb[t][static_cast<size_t>(j)];
    }
    dw[j] = sw;
    db[j] = sb;
  }
}

}  // namespace emorl
