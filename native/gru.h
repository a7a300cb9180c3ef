// One GRU step (PyTorch's nn.GRUCell) for all rows at once, forward and backward: the two
// products on the GEMM and the gates in one pass (lib/ops/native-gru.ts; the TypeScript
// reference is lib/ops/nn.ts gruCell). With a = x·W_ihᵀ + b_ih and c = h·W_hhᵀ + b_hh, each split
// into (reset, update, new) thirds of H columns:
//   r = σ(a_r + c_r),  u = σ(a_u + c_u),  n = tanh(a_n + r ⊙ c_n),  h' = (1 − u) ⊙ n + u ⊙ h.
// The gate math below is shared by the CPU kernels (gru.cc) and the GPU ones (gpu/gru_gpu.cu).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EMORL_HOST_DEVICE __host__ __device__ inline
#else
#define EMORL_HOST_DEVICE inline
#endif

namespace emorl {

struct GruDims {
  int64_t N, I, H;  // rows, input features, hidden features
  int64_t G() const { return 3 * H; }
};

// GPU calls: tags of the weights' and biases' contents (DecoderLayer::w_tag; 0: unknown).
struct GruTags {
  uint64_t w_ih = 0, w_hh = 0, b_ih = 0, b_hh = 0;
};

// The forward pass keeps four planes of N·H values for the backward pass, in this order.
enum GruPlane : int { kGruReset = 0, kGruUpdate = 1, kGruNew = 2, kGruHiddenNew = 3, kGruPlanes = 4 };

struct GruGates {
  float r, u, n, y;
};

// One element's gates from its pre-activation parts (a_* and c_* with their biases) and h.
EMORL_HOST_DEVICE GruGates gru_gates(float ar, float au, float an, float cr, float cu, float cn, float h) {
  GruGates g;
  g.r = 1.f / (1.f + expf(-(ar + cr)));
  g.u = 1.f / (1.f + expf(-(au + cu)));
  g.n = tanhf(an + g.r * cn);
  g.y = (1.f - g.u) * g.n + g.u * h;
  return g;
}

// d/d of the pre-activations from dy = dL/dh': dr and du (the same for the a and c parts), dn_pre
// (the a part; the c part is dn_pre · r), and dh_direct = dy · u (the rest of dh is dc · W_hh).
struct GruGateGrads {
  float dr, du, dn_pre, dh_direct;
};

EMORL_HOST_DEVICE GruGateGrads gru_gate_grads(float dy, float r, float u, float n, float cn, float h) {
  GruGateGrads g;
  g.dn_pre = dy * (1.f - u) * (1.f - n * n);
  g.du = dy * (h - n) * u * (1.f - u);
  g.dr = g.dn_pre * cn * r * (1.f - r);
  g.dh_direct = dy * u;
  return g;
}

// Element q = (row i, unit j) of the backward pass's gate part: from dy and the forward's gate planes
// (plane = N·H floats each), its entries of da, dc [N, 3H] and the direct part of dh.
EMORL_HOST_DEVICE void gru_gate_grads_at(int64_t q, int64_t H, int64_t plane, const float* gates, const float* dy, const float* h,
                                         float* da, float* dc, float* dh) {
  const int64_t o = q / H * 3 * H + q % H;
  const float r = gates[kGruReset * plane + q];
  const GruGateGrads g =
      gru_gate_grads(dy[q], r, gates[kGruUpdate * plane + q], gates[kGruNew * plane + q], gates[kGruHiddenNew * plane + q], h[q]);
  da[o] = dc[o] = g.dr;
  da[o + H] = dc[o + H] = g.du;
  da[o + 2 * H] = g.dn_pre;
  dc[o + 2 * H] = g.dn_pre * r;
  dh[q] = g.dh_direct;
}

// y [N,H] = h'; gates [kGruPlanes, N, H] = r, u, n, c_n for gru_backward.
void gru_forward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* b_ih,
                 const float* b_hh, float* y, float* gates, int nthreads);

// From dy = dL/dh': dx [N,I] and dh [N,H] (overwritten); the parameter gradients dw_ih [3H,I],
// dw_hh [3H,H], db_ih, db_hh [3H] (overwritten; all null: skipped).
void gru_backward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* gates,
                  const float* dy, float* dx, float* dh, float* dw_ih, float* dw_hh, float* db_ih, float* db_hh, int nthreads);

}  // namespace emorl
