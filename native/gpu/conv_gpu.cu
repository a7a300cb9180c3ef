// The NHWC convolutions of nhwc.h on a GPU (gpu.h), for the layers outside the decoding stage (the
// encoder's): each call uploads its inputs, runs the implicit-GEMM products of kernels.cuh and
// downloads its outputs. A conv stack (gpu.h ConvStack) runs all its layers in one call each way,
// its intermediate maps kept on the device between them: per step only the images, the last map
// and its gradient, the weights and their gradients cross the bus. Compiled by nvcc into
// emorl::cuda and by the host compiler (conv_simt.cc) into emorl::simt.
#include "kernels.cuh"

namespace emorl {
namespace EMORL_GPU_NS {
namespace {

// the workspace's slots for one call
enum ConvSlot : size_t { kX, kWf, kWd, kBias, kY, kDy, kDx, kDw, kDb, kScratch };

void check_geom(const NhwcGeom& g) {
  if (g.pt != g.pl || g.sh != g.sw) throw std::invalid_argument("GPU conv2d: padding and stride must be the same on both axes");
}

// The workspace's slots for a conv stack of L layers.
struct StackSlots {
  size_t L;
  size_t x() const { return 0; }
  size_t out(size_t i) const { return 1 + i; }  // layer i's output map
  size_t wf(size_t i) const { return 1 + L + i; }
  size_t bias(size_t i) const { return 1 + 2 * L + i; }
  size_t wd(size_t i) const { return 1 + 3 * L + i; }
  size_t grad(int which) const { return 1 + 4 * L + static_cast<size_t>(which); }  // two gradient maps, in turn
  size_t dw() const { return 3 + 4 * L; }
  size_t db() const { return 4 + 4 * L; }
  size_t scratch() const { return 5 + 4 * L; }
};

i64 map_size(const NhwcGeom& g) { return g.N * g.H * g.W * g.C; }

// Every layer's forward product, leaving the input and the outputs in their slots.
void stack_forward(const ConvStack& s, DeviceWorkspace& ws) {
  const StackSlots sl{s.layers.size()};
  const i64 nx = s.N * s.H * s.W * s.C;
  float* in = ws.buf(sl.x(), static_cast<size_t>(nx));
  ws.up(in, s.x, static_cast<size_t>(nx));
  std::vector<float> wf;
  for (size_t i = 0; i < s.layers.size(); ++i) {
    const ConvStackLayer& L = s.layers[i];
    const NhwcGeom g = s.geom(i);
    const int64_t w_shape[4] = {L.Co, g.C, L.kh, L.kw};
    const float* wfd = ws.upload_tagged(sl.wf(i), slot_tag(L.w_tag, kPackedForward), static_cast<size_t>(L.Co * g.P()), [&] {
      pack_weights(L.w, w_shape, &wf, nullptr);
      return wf.data();
    });
    const float* bd = ws.upload_tagged(sl.bias(i), slot_tag(L.b_tag, kAsIs), static_cast<size_t>(L.Co), [&] { return L.b; });
    float* out = ws.buf(sl.out(i), static_cast<size_t>(g.M() * L.Co));
    gemm(Im2col{in, geom_of(g)}, b_operand(wfd, L.Co, 1), Store{out, as_int(L.Co, "Co"), bd, static_cast<int>(L.act)}, g.M(), L.Co, g.P());
    in = out;
  }
}

void check_stack(const ConvStack& s) {
  if (s.layers.empty()) throw std::invalid_argument("GPU conv stack: no layers");
  for (const auto& L : s.layers)
    if (!L.w || !L.b) throw std::invalid_argument("GPU conv stack: every layer needs its weight and bias");
}

}  // namespace

uint64_t conv_stack_forward(const ConvStack& s, float* y, GpuWorkspace& base) {
  check_stack(s);
  DeviceWorkspace& ws = own_workspace(base);
  ws.forget();  // a failure below leaves no set claimed
  stack_forward(s, ws);
  const size_t last = s.layers.size() - 1;
  const NhwcGeom g = s.geom(last);
  ws.down(y, ws.buf(StackSlots{s.layers.size()}.out(last), 0), static_cast<size_t>(g.M() * s.layers[last].Co));
  finish("conv stack forward");
  return ws.stamp();
}

void conv_stack_backward(const ConvStack& s, uint64_t stamp, const float* dy, float* dx, const std::vector<float*>& dw,
                         const std::vector<float*>& db, GpuWorkspace& base) {
  check_stack(s);
  DeviceWorkspace& ws = own_workspace(base);
  const size_t n = s.layers.size();
  if (dw.size() != n || db.size() != n) throw std::invalid_argument("GPU conv stack backward: one dw and db pointer per layer");
  if (!ws.holds(stamp)) {  // another forward ran since (or none did): recompute this one's maps
    ws.forget();
    stack_forward(s, ws);
  }
  const StackSlots sl{n};
  int cur = 0;  // which gradient slot holds d/d(the current layer's output)
  {
    const NhwcGeom g = s.geom(n - 1);
    const i64 ny = g.M() * s.layers[n - 1].Co;
    ws.up(ws.buf(sl.grad(cur), static_cast<size_t>(ny)), dy, static_cast<size_t>(ny));
  }
  std::vector<float> wd;
  for (size_t i = n; i-- > 0;) {
    const ConvStackLayer& L = s.layers[i];
    const NhwcGeom g = s.geom(i);
    const Geom gg = geom_of(g);
    const i64 ny = g.M() * L.Co;
    float* d = ws.buf(sl.grad(cur), static_cast<size_t>(ny));
    const float* in = ws.buf(i ? sl.out(i - 1) : sl.x(), 0);
    if (L.act != Act::Linear) act_grad(d, ws.buf(sl.out(i), 0), ny, static_cast<int>(L.act));
    if (dw[i]) {
      const i64 nw = L.Co * g.P();
      float* dwd = ws.buf(sl.dw(), static_cast<size_t>(nw));
      filter_grad(ws, sl.scratch(), gg, in, d, as_int(L.Co, "Co"), dwd);
      ws.down(dw[i], dwd, static_cast<size_t>(nw));
    }
    if (db[i]) {
      float* dbd = ws.buf(sl.db(), static_cast<size_t>(L.Co));
      col_sums(ws, sl.scratch(), d, 1, g.M(), L.Co, dbd);
      ws.down(db[i], dbd, static_cast<size_t>(L.Co));
    }
    if (i == 0 && !dx) break;
    const int64_t w_shape[4] = {L.Co, g.C, L.kh, L.kw};
    const float* wdd = ws.upload_tagged(sl.wd(i), slot_tag(L.w_tag, kPackedDataGrad), static_cast<size_t>(L.Co * g.P()), [&] {
      pack_weights(L.w, w_shape, nullptr, &wd);
      return wd.data();
    });
    float* dnext = ws.buf(sl.grad(1 - cur), static_cast<size_t>(map_size(g)));
    gemm(ColGather{d, gg, as_int(L.Co, "Co")}, b_operand(wdd, g.C, 1), Store{dnext, as_int(g.C, "C"), nullptr, 0}, g.N * g.H * g.W, g.C,
         L.kh * L.kw * L.Co);
    cur = 1 - cur;
    if (i == 0) ws.down(dx, dnext, static_cast<size_t>(map_size(g)));
  }
  finish("conv stack backward");
}

void conv2d_forward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act, float* y,
                    GpuWorkspace& base) {
  check_geom(g);
  DeviceWorkspace& ws = own_workspace(base);
  const int64_t w_shape[4] = {Co, g.C, g.kh, g.kw};
  std::vector<float> wf;
  pack_weights(w, w_shape, &wf, nullptr);
  const i64 nx = g.N * g.H * g.W * g.C, ny = g.M() * Co;
  float* xd = ws.buf(kX, static_cast<size_t>(nx));
  float* wfd = ws.buf(kWf, wf.size());
  float* bd = bias ? ws.buf(kBias, static_cast<size_t>(Co)) : nullptr;
  float* yd = ws.buf(kY, static_cast<size_t>(ny));
  ws.up(xd, x, static_cast<size_t>(nx));
  ws.up(wfd, wf.data(), wf.size());
  if (bd) ws.up(bd, bias, static_cast<size_t>(Co));
  gemm(Im2col{xd, geom_of(g)}, b_operand(wfd, Co, 1), Store{yd, static_cast<int>(Co), bd, static_cast<int>(act)}, g.M(), Co, g.P());
  ws.down(y, yd, static_cast<size_t>(ny));
  finish("conv2d forward");
}

void conv2d_backward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* y, const float* dy, Act act,
                     float* dx, float* dw, float* db, GpuWorkspace& base) {
  check_geom(g);
  DeviceWorkspace& ws = own_workspace(base);
  const Geom gg = geom_of(g);
  const i64 nx = g.N * g.H * g.W * g.C, ny = g.M() * Co;
  float* dyd = ws.buf(kDy, static_cast<size_t>(ny));
  ws.up(dyd, dy, static_cast<size_t>(ny));
  if (act != Act::Linear) {
    if (!y) throw std::invalid_argument("GPU conv2d backward: the forward output is needed for the activation's derivative");
    float* yd = ws.buf(kY, static_cast<size_t>(ny));
    ws.up(yd, y, static_cast<size_t>(ny));
    act_grad(dyd, yd, ny, static_cast<int>(act));
  }
  if (dx) {
    const int64_t w_shape[4] = {Co, g.C, g.kh, g.kw};
    std::vector<float> wd;
    pack_weights(w, w_shape, nullptr, &wd);
    float* wdd = ws.buf(kWd, wd.size());
    ws.up(wdd, wd.data(), wd.size());
    float* dxd = ws.buf(kDx, static_cast<size_t>(nx));
    gemm(ColGather{dyd, gg, static_cast<int>(Co)}, b_operand(wdd, g.C, 1), Store{dxd, static_cast<int>(g.C), nullptr, 0},
         g.N * g.H * g.W, g.C, g.kh * g.kw * Co);
    ws.down(dx, dxd, static_cast<size_t>(nx));
  }
  if (dw) {
    float* xd = ws.buf(kX, static_cast<size_t>(nx));
    ws.up(xd, x, static_cast<size_t>(nx));
    const i64 nw = Co * g.P();
    float* dwd = ws.buf(kDw, static_cast<size_t>(nw));
    filter_grad(ws, kScratch, gg, xd, dyd, static_cast<int>(Co), dwd);
    ws.down(dw, dwd, static_cast<size_t>(nw));
  }
  if (db) {
    float* dbd = ws.buf(kDb, static_cast<size_t>(Co));
    col_sums(ws, kScratch, dyd, 1, g.M(), Co, dbd);
    ws.down(db, dbd, static_cast<size_t>(Co));
  }
  finish("conv2d backward");
}

}  // namespace EMORL_GPU_NS
}  // namespace emorl
