// One GRU step on the CPU (gru.h): the products on sgemm, the gates in one pass over the rows.
#include "gru.h"

#include <vector>

#include "common.h"
#include "gemm.h"

namespace emorl {

void gru_forward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* b_ih,
                 const float* b_hh, float* y, float* gates, int nthreads) {
  const int64_t N = d.N, H = d.H, G = d.G(), plane = N * H;
  std::vector<float> a(static_cast<size_t>(N * G)), c(static_cast<size_t>(N * G));
  sgemm_dense(false, true, N, G, d.I, x, w_ih, a.data(), false, nthreads);
  sgemm_dense(false, true, N, G, H, h, w_hh, c.data(), false, nthreads);
  parallel_region(pass_threads(nthreads, N * G), [&](int tid, int nt) {
    int64_t r0, r1;
    split_range(N, tid, nt, r0, r1);
    for (int64_t i = r0; i < r1; ++i) {
      const float *ai = a.data() + i * G, *ci = c.data() + i * G;
      for (int64_t j = 0; j < H; ++j) {
        const int64_t q = i * H + j;
        const float cn = ci[2 * H + j] + b_hh[2 * H + j];
        const GruGates g = gru_gates(ai[j] + b_ih[j], ai[H + j] + b_ih[H + j], ai[2 * H + j] + b_ih[2 * H + j], ci[j] + b_hh[j],
                                     ci[H + j] + b_hh[H + j], cn, h[q]);
        y[q] = g.y;
        gates[kGruReset * plane + q] = g.r;
        gates[kGruUpdate * plane + q] = g.u;
        gates[kGruNew * plane + q] = g.n;
        gates[kGruHiddenNew * plane + q] = cn;
      }
    }
  });
}

void gru_backward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* gates,
                  const float* dy, float* dx, float* dh, float* dw_ih, float* dw_hh, float* db_ih, float* db_hh, int nthreads) {
  const int64_t N = d.N, I = d.I, H = d.H, G = d.G(), plane = N * H;
  // da, dc [N,3H]: the gradients of the input and hidden pre-activation parts
  std::vector<float> da(static_cast<size_t>(N * G)), dc(static_cast<size_t>(N * G));
  parallel_region(pass_threads(nthreads, N * G), [&](int tid, int nt) {
    int64_t r0, r1;
    split_range(N, tid, nt, r0, r1);
    for (int64_t q = r0 * H; q < r1 * H; ++q) gru_gate_grads_at(q, H, plane, gates, dy, h, da.data(), dc.data(), dh);
  });
  sgemm_dense(false, false, N, I, G, da.data(), w_ih, dx, false, nthreads);
  sgemm_dense(false, false, N, H, G, dc.data(), w_hh, dh, true, nthreads);
  if (dw_ih) sgemm_dense(true, false, G, I, N, da.data(), x, dw_ih, false, nthreads);
  if (dw_hh) sgemm_dense(true, false, G, H, N, dc.data(), h, dw_hh, false, nthreads);
  if (db_ih) column_sums(da.data(), N, G, db_ih, nthreads);
  if (db_hh) column_sums(dc.data(), N, G, db_hh, nthreads);
}

}  // namespace emorl
