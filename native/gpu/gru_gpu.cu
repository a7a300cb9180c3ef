// One GRU step (gru.h) on a GPU (gpu.h): the two products on the tiled GEMM of kernels.cuh with
// the biases in its epilogue, then one elementwise kernel for the gates; backward, one kernel for
// the gates' gradients, then the products for dx, dh (onto dh's direct part) and the parameters.
// The forward call's x, h and gates stay on the device for the backward call (kept sets, below):
// per step only x, h and y, then dy, dx, dh and the parameters' gradients cross the bus. Compiled by nvcc into emorl::cuda and by
// the host compiler (gru_simt.cc) into emorl::simt.
#include "../gru.h"
#include "kernels.cuh"

namespace emorl {
namespace EMORL_GPU_NS {
namespace {

// the workspace's slots for one call, then the kept sets
enum GruSlot : size_t { kGx, kGh, kGwih, kGwhh, kGbih, kGbhh, kGa, kGc, kGy, kGgates, kGdy, kGdx, kGdh, kGdwih, kGdwhh, kGdb, kGscratch, kGkept };

// A forward call's x, h and gate planes stay on the device for its backward call, in one of
// kKeptSets sets of three slots, tagged with the call's id. A later forward whose id lands on the
// same set takes it over; the backward call then uploads x and h again and recomputes the gates.
constexpr uint64_t kKeptSets = 32;
size_t kept_slot(uint64_t id, size_t which) { return kGkept + static_cast<size_t>(id % kKeptSets) * 3 + which; }

// y and the gate planes from a = x·W_ihᵀ + b_ih and c = h·W_hhᵀ + b_hh ([N, 3H] each).
__global__ void gru_gates_kernel(const float* a, const float* c, const float* h, i64 N, i64 H, float* y, float* gates) {
  const i64 plane = N * H, G = 3 * H;
  EMORL_GRID_LOOP(q, plane) {
    const i64 i = q / H, j = q % H;
    const float* ai = a + i * G;
    const float* ci = c + i * G;
    const GruGates g = gru_gates(ai[j], ai[H + j], ai[2 * H + j], ci[j], ci[H + j], ci[2 * H + j], h[q]);
    y[q] = g.y;
    gates[kGruReset * plane + q] = g.r;
    gates[kGruUpdate * plane + q] = g.u;
    gates[kGruNew * plane + q] = g.n;
    gates[kGruHiddenNew * plane + q] = ci[2 * H + j];
  }
}

// da, dc [N, 3H] and dh's direct part from dy and the forward pass's planes.
__global__ void gru_gate_grads_kernel(const float* dy, const float* gates, const float* h, i64 N, i64 H, float* da, float* dc,
                                      float* dh) {
  const i64 plane = N * H;
  EMORL_GRID_LOOP(q, plane) gru_gate_grads_at(q, H, plane, gates, dy, h, da, dc, dh);
}

float* upload(DeviceWorkspace& ws, size_t slot, const float* src, i64 n) { return ws.upload(slot, src, static_cast<size_t>(n)); }

// whether the kept set of forward call `id` is still all there
bool holds_kept(const DeviceWorkspace& ws, uint64_t id) {
  for (size_t which = 0; which < 3; ++which)
    if (!ws.slot_holds(kept_slot(id, which), id)) return false;
  return true;
}

// The forward pass on the device from xd, hd there: y into slot kGy, the gate planes into gd.
float* gru_pass(DeviceWorkspace& ws, const GruDims& d, const float* xd, const float* hd, const float* w_ih, const float* w_hh,
                const float* b_ih, const float* b_hh, const GruTags& tags, float* gd) {
  const i64 N = d.N, I = d.I, H = d.H, G = d.G();
  const float* wihd = upload_as_is(ws, kGwih, tags.w_ih, w_ih, G * I);
  const float* whhd = upload_as_is(ws, kGwhh, tags.w_hh, w_hh, G * H);
  const float* bihd = upload_as_is(ws, kGbih, tags.b_ih, b_ih, G);
  const float* bhhd = upload_as_is(ws, kGbhh, tags.b_hh, b_hh, G);
  float* ad = ws.buf(kGa, static_cast<size_t>(N * G));
  float* cd = ws.buf(kGc, static_cast<size_t>(N * G));
  const int g = as_int(G, "3H");
  // B(k, n) = W[n, k]: the weights as stored ([3H, I]), read transposed
  gemm(a_operand(xd, I, 1), b_operand(wihd, 1, I), Store{ad, g, bihd, 0}, N, G, I);
  gemm(a_operand(hd, H, 1), b_operand(whhd, 1, H), Store{cd, g, bhhd, 0}, N, G, H);
  float* yd = ws.buf(kGy, static_cast<size_t>(N * H));
  launch(gru_gates_kernel, grid_for(N * H), dim3(kThreads), static_cast<const float*>(ad), static_cast<const float*>(cd), hd, N, H, yd, gd);
  return yd;
}

}  // namespace

uint64_t gru_forward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* b_ih,
                     const float* b_hh, float* y, float* gates, GpuWorkspace& base, const GruTags& tags) {
  DeviceWorkspace& ws = own_workspace(base);
  const i64 N = d.N, I = d.I, H = d.H;
  const uint64_t id = ws.next_id();
  const float* xd = upload(ws, kept_slot(id, 0), x, N * I);
  const float* hd = upload(ws, kept_slot(id, 1), h, N * H);
  float* gd = ws.buf(kept_slot(id, 2), static_cast<size_t>(kGruPlanes * N * H));
  const float* yd = gru_pass(ws, d, xd, hd, w_ih, w_hh, b_ih, b_hh, tags, gd);
  for (size_t which = 0; which < 3; ++which) ws.tag_slot(kept_slot(id, which), id);
  ws.down(y, yd, static_cast<size_t>(N * H));
  if (gates) ws.down(gates, gd, static_cast<size_t>(kGruPlanes * N * H));
  finish("GRU forward");
  return id;
}

void gru_backward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* b_ih,
                  const float* b_hh, const float* gates, const float* dy, float* dx, float* dh, float* dw_ih, float* dw_hh, float* db_ih,
                  float* db_hh, GpuWorkspace& base, const GruTags& tags, uint64_t kept) {
  DeviceWorkspace& ws = own_workspace(base);
  const i64 N = d.N, I = d.I, H = d.H, G = d.G();
  const float *xd, *hd, *gd;
  if (holds_kept(ws, kept)) {
    xd = ws.buf(kept_slot(kept, 0), 0);
    hd = ws.buf(kept_slot(kept, 1), 0);
    gd = ws.buf(kept_slot(kept, 2), 0);
  } else {  // no kept set (or another forward took it over): from the host, the gates given or recomputed
    xd = upload(ws, kGx, x, N * I);
    hd = upload(ws, kGh, h, N * H);
    if (gates) {
      gd = upload(ws, kGgates, gates, kGruPlanes * N * H);
    } else {
      if (!b_ih || !b_hh) throw std::invalid_argument("GPU GRU backward: without the forward's gates the biases are needed to recompute them");
      float* g = ws.buf(kGgates, static_cast<size_t>(kGruPlanes * N * H));
      gru_pass(ws, d, xd, hd, w_ih, w_hh, b_ih, b_hh, tags, g);
      gd = g;
    }
  }
  const float* dyd = upload(ws, kGdy, dy, N * H);
  float* dad = ws.buf(kGa, static_cast<size_t>(N * G));
  float* dcd = ws.buf(kGc, static_cast<size_t>(N * G));
  float* dhd = ws.buf(kGdh, static_cast<size_t>(N * H));
  launch(gru_gate_grads_kernel, grid_for(N * H), dim3(kThreads), dyd, gd, hd, N, H, dad, dcd, dhd);
  const float* wihd = upload_as_is(ws, kGwih, tags.w_ih, w_ih, G * I);
  const float* whhd = upload_as_is(ws, kGwhh, tags.w_hh, w_hh, G * H);
  float* dxd = ws.buf(kGdx, static_cast<size_t>(N * I));
  gemm(a_operand(dad, G, 1), b_operand(wihd, I, 1), Store{dxd, as_int(I, "I"), nullptr, 0}, N, I, G);
  gemm(a_operand(dcd, G, 1), b_operand(whhd, H, 1), AddTo{dhd, as_int(H, "H")}, N, H, G);
  ws.down(dx, dxd, static_cast<size_t>(N * I));
  ws.down(dh, dhd, static_cast<size_t>(N * H));
  if (dw_ih || dw_hh || db_ih || db_hh) {
    if (!(dw_ih && dw_hh && db_ih && db_hh)) throw std::invalid_argument("GPU GRU backward: the parameter gradients come all or none");
    // A(m, k) = da[k, m]: the gradients transposed, against the rows of x and h
    float* dwihd = ws.buf(kGdwih, static_cast<size_t>(G * I));
    float* dwhhd = ws.buf(kGdwhh, static_cast<size_t>(G * H));
    gemm(a_operand(dad, 1, G), b_operand(xd, I, 1), Store{dwihd, as_int(I, "I"), nullptr, 0}, G, I, N);
    gemm(a_operand(dcd, 1, G), b_operand(hd, H, 1), Store{dwhhd, as_int(H, "H"), nullptr, 0}, G, H, N);
    float* dbd = ws.buf(kGdb, static_cast<size_t>(2 * G));
    col_sums(ws, kGscratch, dad, 1, N, G, dbd);
    col_sums(ws, kGscratch, dcd, 1, N, G, dbd + G);
    ws.down(dw_ih, dwihd, static_cast<size_t>(G * I));
    ws.down(dw_hh, dwhhd, static_cast<size_t>(G * H));
    ws.down(db_ih, dbd, static_cast<size_t>(G));
    ws.down(db_hh, dbd + G, static_cast<size_t>(G));
  }
  finish("GRU backward");
}

}  // namespace EMORL_GPU_NS
}  // namespace emorl
