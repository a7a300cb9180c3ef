// One GRU step (gru.h) on a GPU (gpu.h): the two products on the tiled GEMM of kernels.cuh with
// the biases in its epilogue, then one elementwise kernel for the gates; backward, one kernel for
// the gates' gradients, then the products for dx, dh (onto dh's direct part) and the parameters.
// The forward call's x, h and gates stay on the device for the backward call (kept sets, below):
// per step only x, h and y, then dy, dx, dh and the parameters' gradients cross the bus. The weights
// may instead be a GRU stage's device-resident parameters (gpu.h GruResident), assembled into the
// cell's layout on the device, their gradients summed there; then only x, h, y, dy, dx and dh do.
// Compiled by nvcc into emorl::cuda and by the host compiler (gru_simt.cc) into emorl::simt.
#include "../gru.h"
#include "kernels.cuh"

namespace emorl {
namespace EMORL_GPU_NS {
namespace {

// the workspace's slots for one call, the raw slots of a GRU stage's parameters (kMaxGruParams of
// them from kGparams), each cell's weights assembled from them (four slots a cell, from
// kGcellWeights), then the kept sets
constexpr size_t kMaxGruParams = 12, kMaxCells = 2;
enum GruSlot : size_t {
  kGx, kGh, kGwih, kGwhh, kGbih, kGbhh, kGa, kGc, kGy, kGgates, kGdy, kGdx, kGdh, kGdwih, kGdwhh, kGdb, kGscratch, kGparams,
  kGcellWeights = kGparams + kMaxGruParams,
  kGkept = kGcellWeights + 4 * kMaxCells
};

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

// Up to kMaxRuns runs of floats to move in one launch: run r moves the floats of src[r] to dst[r]
// that [begin[r], begin[r + 1]) of the launch's index space stands for.
constexpr int kMaxRuns = 8;
struct Runs {
  int count = 0;
  const float* src[kMaxRuns] = {};
  float* dst[kMaxRuns] = {};
  i64 begin[kMaxRuns + 1] = {};
  void add(float* to, const float* from, i64 n) {
    if (count == kMaxRuns) throw std::logic_error("GPU GRU: more runs than one launch takes");
    dst[count] = to;
    src[count] = from;
    begin[count + 1] = begin[count] + n;
    ++count;
  }
};

// Each run's dst = its src (add: dst + src, rounded to float, as a tape sums a tensor's gradients).
__global__ void move_runs_kernel(Runs runs, bool add) {
  EMORL_GRID_LOOP(i, runs.begin[runs.count]) {
    int r = 0;
    while (i >= runs.begin[r + 1]) ++r;
    const i64 k = i - runs.begin[r];
    runs.dst[r][k] = add ? add_rn(runs.dst[r][k], runs.src[r][k]) : runs.src[r][k];
  }
}

void move_runs(const Runs& runs, bool add) {
  const i64 n = runs.begin[runs.count];
  if (n) launch(move_runs_kernel, grid_for(n), dim3(kThreads), runs, add);
}

// The weights a call computes with, on the device.
struct CellWeights {
  const float *w_ih, *w_hh, *b_ih, *b_hh;
};

// One run of a cell array (w_ih, w_hh, b_ih or b_hh in nn.GRU's layout) taken from a GRU stage's
// parameter: parameter j (its place in DeviceParams::params), values [offset, offset + n).
struct GruPart {
  size_t j, offset, n;
};

// The runs cell `cell`'s array `which` (0 w_ih, 1 w_hh, 2 b_ih, 3 b_hh) is made of, in order, after
// checking that the stage's parameters are all there at the sizes d implies.
std::vector<GruPart> gru_parts(const DeviceParams& p, const GruDims& d, int cell, int which) {
  const size_t I = static_cast<size_t>(d.I), H = static_cast<size_t>(d.H), G = 3 * H;
  const bool dual = p.layers == 2;
  if (p.stage != DeviceParams::Stage::Gru || (p.layers != 1 && p.layers != 2)) throw std::invalid_argument("GPU GRU: the resident weights must be a GRU stage's");
  if (cell < 0 || cell > (dual ? 1 : 0)) throw std::invalid_argument("GPU GRU: cell " + std::to_string(cell) + " is not one of the stage's");
  const size_t count = dual ? 12 : 4;
  if (p.params.size() != count) throw std::invalid_argument("GPU GRU: the stage's " + std::to_string(count) + " parameters must all be given");
  // sizes by index: one cell's (w_ih, w_hh, b_ih, b_hh), or the DualGRU's in the original's layout
  const size_t plain[4] = {G * I, G * H, G, G};
  const size_t dual_sizes[12] = {2 * H * I, H * I, 2 * H * H, H * H, 2 * H * I, H * I, 2 * H * H, H * H, 4 * H, 4 * H, 2 * H, 2 * H};
  std::vector<size_t> at(count, count);
  for (size_t j = 0; j < count; ++j) {
    const DeviceParams::Param& q = p.params[j];
    if (q.index >= count || at[q.index] != count) throw std::invalid_argument("GPU GRU: the stage's parameters must each be given once");
    const size_t want = dual ? dual_sizes[q.index] : plain[q.index];
    if (q.n != want)
      throw std::invalid_argument("GPU GRU: parameter " + std::to_string(q.index) + " has " + std::to_string(q.n) + " values, input " + std::to_string(I) +
                                  " and hidden " + std::to_string(H) + " need " + std::to_string(want));
    at[q.index] = j;
  }
  if (!dual) return {{at[static_cast<size_t>(which)], 0, plain[which]}};
  const size_t c = static_cast<size_t>(cell);
  switch (which) {
    case 0: return {{at[4 * c], 0, 2 * H * I}, {at[4 * c + 1], 0, H * I}};
    case 1: return {{at[4 * c + 2], 0, 2 * H * H}, {at[4 * c + 3], 0, H * H}};
    case 2: return {{at[8], c * 2 * H, 2 * H}, {at[10], c * H, H}};
    default: return {{at[9], c * 2 * H, 2 * H}, {at[11], c * H, H}};
  }
}

// The cell's weights on the device: the call's arrays under their tags (the biases only with
// `biases`), or all four assembled from the resident parameters' raw slots (each uploaded first
// where the host gives its data) into the cell's slots, where they stay until a parameter's tag
// changes (the optimizer's step): the other calls of a step take them as they are.
CellWeights cell_weights(DeviceWorkspace& ws, const GruDims& d, const float* w_ih, const float* w_hh, const float* b_ih,
                         const float* b_hh, const GruTags& tags, const GruResident* r, bool biases) {
  const i64 I = d.I, H = d.H, G = d.G();
  if (!r) {
    return {upload_as_is(ws, kGwih, tags.w_ih, w_ih, G * I), upload_as_is(ws, kGwhh, tags.w_hh, w_hh, G * H),
            biases ? upload_as_is(ws, kGbih, tags.b_ih, b_ih, G) : nullptr, biases ? upload_as_is(ws, kGbhh, tags.b_hh, b_hh, G) : nullptr};
  }
  const DeviceParams& p = *r->params;
  if (r->host.size() != p.params.size()) throw std::invalid_argument("GPU GRU: one host array (or null) per resident parameter");
  std::vector<const float*> raw(p.params.size());
  std::vector<uint64_t> sources;  // the parameters' tags, in order (none when one is untagged)
  for (size_t j = 0; j < p.params.size(); ++j) {
    raw[j] = upload_as_is(ws, gru_param_slot(p, j), p.params[j].tag, r->host[j], static_cast<i64>(p.params[j].n));
    sources.push_back(p.params[j].tag);
  }
  if (std::find(sources.begin(), sources.end(), uint64_t{0}) != sources.end()) sources.clear();
  const float* out[4];
  const i64 sizes[4] = {G * I, G * H, G, G};
  const size_t cell = static_cast<size_t>(r->cell);  // (gru_parts checks it)
  Runs runs;  // one launch assembles the four arrays
  for (int which = 0; which < 4; ++which) {
    const std::vector<GruPart> parts = gru_parts(p, d, r->cell, which);
    const size_t slot = kGcellWeights + 4 * cell + static_cast<size_t>(which);
    if (ws.made_from(slot, sources)) {
      out[which] = ws.buf(slot, 0);
      continue;
    }
    float* dst = ws.buf(slot, static_cast<size_t>(sizes[which]));
    size_t at = 0;
    for (const GruPart& part : parts) {
      runs.add(dst + at, raw[part.j] + part.offset, static_cast<i64>(part.n));
      at += part.n;
    }
    ws.set_sources(slot, sources);
    out[which] = dst;
  }
  move_runs(runs, false);
  return {out[0], out[1], out[2], out[3]};
}

// A backward call's parameter gradients (cell layout, on the device) into the gradient state buffer.
void keep_grads(DeviceWorkspace& ws, const GruDims& d, const GruResident& r, const float* dwih, const float* dwhh, const float* dbih,
                const float* dbhh) {
  const DeviceParams& p = *r.params;
  float* g = ws.state(kGradState, p.total());
  std::vector<size_t> offset(p.params.size());
  for (size_t j = 0, at = 0; j < p.params.size(); at += p.params[j].n, ++j) offset[j] = at;
  const float* src[4] = {dwih, dwhh, dbih, dbhh};
  Runs runs;  // one launch for the four arrays
  for (int which = 0; which < 4; ++which) {
    size_t at = 0;
    for (const GruPart& part : gru_parts(p, d, r.cell, which)) {
      runs.add(g + offset[part.j] + part.offset, src[which] + at, static_cast<i64>(part.n));
      at += part.n;
    }
  }
  move_runs(runs, !r.first);
}

// whether the kept set of forward call `id` is still all there
bool holds_kept(const DeviceWorkspace& ws, uint64_t id) {
  for (size_t which = 0; which < 3; ++which)
    if (!ws.slot_holds(kept_slot(id, which), id)) return false;
  return true;
}

// The forward pass on the device from xd, hd there: y into slot kGy, the gate planes into gd.
float* gru_pass(DeviceWorkspace& ws, const GruDims& d, const float* xd, const float* hd, const CellWeights& w, float* gd) {
  const i64 N = d.N, I = d.I, H = d.H, G = d.G();
  const float *wihd = w.w_ih, *whhd = w.w_hh, *bihd = w.b_ih, *bhhd = w.b_hh;
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
                     const float* b_hh, float* y, float* gates, GpuWorkspace& base, const GruTags& tags, const GruResident* resident) {
  DeviceWorkspace& ws = own_workspace(base);
  const i64 N = d.N, I = d.I, H = d.H;
  const CellWeights w = cell_weights(ws, d, w_ih, w_hh, b_ih, b_hh, tags, resident, true);
  const uint64_t id = ws.next_id();
  const float* xd = upload(ws, kept_slot(id, 0), x, N * I);
  const float* hd = upload(ws, kept_slot(id, 1), h, N * H);
  float* gd = ws.buf(kept_slot(id, 2), static_cast<size_t>(kGruPlanes * N * H));
  const float* yd = gru_pass(ws, d, xd, hd, w, gd);
  for (size_t which = 0; which < 3; ++which) ws.tag_slot(kept_slot(id, which), id);
  ws.down(y, yd, static_cast<size_t>(N * H));
  if (gates) ws.down(gates, gd, static_cast<size_t>(kGruPlanes * N * H));
  finish("GRU forward");
  return id;
}

void gru_backward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* b_ih,
                  const float* b_hh, const float* gates, const float* dy, float* dx, float* dh, float* dw_ih, float* dw_hh, float* db_ih,
                  float* db_hh, GpuWorkspace& base, const GruTags& tags, uint64_t kept, const GruResident* resident) {
  DeviceWorkspace& ws = own_workspace(base);
  const i64 N = d.N, I = d.I, H = d.H, G = d.G();
  const bool keep = resident && resident->keep_grads;
  if (keep && (dw_ih || dw_hh || db_ih || db_hh)) throw std::invalid_argument("GPU GRU backward: kept parameter gradients are not also returned");
  // the biases only to recompute the gates (neither kept on the device nor given)
  const bool recompute = !holds_kept(ws, kept) && !gates;
  if (recompute && !resident && (!b_ih || !b_hh))
    throw std::invalid_argument("GPU GRU backward: without the forward's gates the biases are needed to recompute them");
  const CellWeights w = cell_weights(ws, d, w_ih, w_hh, b_ih, b_hh, tags, resident, recompute);
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
      float* g = ws.buf(kGgates, static_cast<size_t>(kGruPlanes * N * H));
      gru_pass(ws, d, xd, hd, w, g);
      gd = g;
    }
  }
  const float* dyd = upload(ws, kGdy, dy, N * H);
  // da and dc side by side, so that one launch sums both over the rows (the bias gradients)
  float* dad = ws.buf(kGa, static_cast<size_t>(2 * N * G));
  float* dcd = dad + N * G;
  float* dhd = ws.buf(kGdh, static_cast<size_t>(N * H));
  launch(gru_gate_grads_kernel, grid_for(N * H), dim3(kThreads), dyd, gd, hd, N, H, dad, dcd, dhd);
  const float *wihd = w.w_ih, *whhd = w.w_hh;
  float* dxd = ws.buf(kGdx, static_cast<size_t>(N * I));
  gemm(a_operand(dad, G, 1), b_operand(wihd, I, 1), Store{dxd, as_int(I, "I"), nullptr, 0}, N, I, G);
  gemm(a_operand(dcd, G, 1), b_operand(whhd, H, 1), AddTo{dhd, as_int(H, "H")}, N, H, G);
  ws.down(dx, dxd, static_cast<size_t>(N * I));
  ws.down(dh, dhd, static_cast<size_t>(N * H));
  if (keep || dw_ih || dw_hh || db_ih || db_hh) {
    if (!keep && !(dw_ih && dw_hh && db_ih && db_hh)) throw std::invalid_argument("GPU GRU backward: the parameter gradients come all or none");
    // A(m, k) = da[k, m]: the gradients transposed, against the rows of x and h
    float* dwihd = ws.buf(kGdwih, static_cast<size_t>(G * I));
    float* dwhhd = ws.buf(kGdwhh, static_cast<size_t>(G * H));
    gemm(a_operand(dad, 1, G), b_operand(xd, I, 1), Store{dwihd, as_int(I, "I"), nullptr, 0}, G, I, N);
    gemm(a_operand(dcd, 1, G), b_operand(hd, H, 1), Store{dwhhd, as_int(H, "H"), nullptr, 0}, G, H, N);
    float* dbd = ws.buf(kGdb, static_cast<size_t>(2 * G));
    col_sums(ws, kGscratch, dad, 2, N, G, dbd);  // [db_ih | db_hh]
    if (keep) {
      keep_grads(ws, d, *resident, dwihd, dwhhd, dbd, dbd + G);
    } else {
      ws.down(dw_ih, dwihd, static_cast<size_t>(G * I));
      ws.down(dw_hh, dwhhd, static_cast<size_t>(G * H));
      ws.down(db_ih, dbd, static_cast<size_t>(G));
      ws.down(db_hh, dbd + G, static_cast<size_t>(G));
    }
  }
  finish("GRU backward");
}

size_t gru_param_slot(const DeviceParams& p, size_t j) {
  const size_t index = p.params.at(j).index;
  if (index >= kMaxGruParams) throw std::invalid_argument("GRU parameters: index " + std::to_string(index) + " is past the stage's tensors");
  return kGparams + index;
}

}  // namespace EMORL_GPU_NS
}  // namespace emorl
