// The NHWC convolutions of nhwc.h on a GPU (gpu.h), for the layers outside the decoding stage (the
// encoder's): each call uploads its inputs, runs the implicit-GEMM products of kernels.cuh and
// downloads its outputs. Compiled by nvcc into emorl::cuda and by the host compiler (conv_simt.cc)
// into emorl::simt.
#include "kernels.cuh"

namespace emorl {
namespace EMORL_GPU_NS {
namespace {

// the workspace's slots for one call
enum ConvSlot : size_t { kX, kWf, kWd, kBias, kY, kDy, kDx, kDw, kDb, kScratch };

void check_geom(const NhwcGeom& g) {
  if (g.pt != g.pl || g.sh != g.sw) throw std::invalid_argument("GPU conv2d: padding and stride must be the same on both axes");
}

}  // namespace

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
  to_device(xd, x, static_cast<size_t>(nx));
  to_device(wfd, wf.data(), wf.size());
  if (bd) to_device(bd, bias, static_cast<size_t>(Co));
  gemm(Im2col{xd, geom_of(g)}, b_operand(wfd, Co, 1), Store{yd, static_cast<int>(Co), bd, static_cast<int>(act)}, g.M(), Co, g.P());
  to_host(y, yd, static_cast<size_t>(ny));
  finish("conv2d forward");
}

void conv2d_backward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* y, const float* dy, Act act,
                     float* dx, float* dw, float* db, GpuWorkspace& base) {
  check_geom(g);
  DeviceWorkspace& ws = own_workspace(base);
  const Geom gg = geom_of(g);
  const i64 nx = g.N * g.H * g.W * g.C, ny = g.M() * Co;
  float* dyd = ws.buf(kDy, static_cast<size_t>(ny));
  to_device(dyd, dy, static_cast<size_t>(ny));
  if (act != Act::Linear) {
    if (!y) throw std::invalid_argument("GPU conv2d backward: the forward output is needed for the activation's derivative");
    float* yd = ws.buf(kY, static_cast<size_t>(ny));
    to_device(yd, y, static_cast<size_t>(ny));
    act_grad(dyd, yd, ny, static_cast<int>(act));
  }
  if (dx) {
    const int64_t w_shape[4] = {Co, g.C, g.kh, g.kw};
    std::vector<float> wd;
    pack_weights(w, w_shape, nullptr, &wd);
    float* wdd = ws.buf(kWd, wd.size());
    to_device(wdd, wd.data(), wd.size());
    float* dxd = ws.buf(kDx, static_cast<size_t>(nx));
    gemm(ColGather{dyd, gg, static_cast<int>(Co)}, b_operand(wdd, g.C, 1), Store{dxd, static_cast<int>(g.C), nullptr, 0},
         g.N * g.H * g.W, g.C, g.kh * g.kw * Co);
    to_host(dx, dxd, static_cast<size_t>(nx));
  }
  if (dw) {
    float* xd = ws.buf(kX, static_cast<size_t>(nx));
    to_device(xd, x, static_cast<size_t>(nx));
    const i64 nw = Co * g.P();
    float* dwd = ws.buf(kDw, static_cast<size_t>(nw));
    filter_grad(ws, kScratch, gg, xd, dyd, static_cast<int>(Co), dwd);
    to_host(dw, dwd, static_cast<size_t>(nw));
  }
  if (db) {
    float* dbd = ws.buf(kDb, static_cast<size_t>(Co));
    col_sums(ws, kScratch, dyd, 1, g.M(), Co, dbd);
    to_host(db, dbd, static_cast<size_t>(Co));
  }
  finish("conv2d backward");
}

}  // namespace EMORL_GPU_NS
}  // namespace emorl
