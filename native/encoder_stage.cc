// The CPU encoder stage (encoder_stage.h): the conv stack by nhwc.h's kernels, the head by
// encoder_head.h's, every activation in the caller's Workspace.
#include "encoder_stage.h"

#include <algorithm>
#include <stdexcept>

namespace emorl {

namespace {

// Workspace slots: the n maps, then the head's f1, f2, f3, mean, rstd, then the backward's
// gradient of the current map (two, in turn) and the head's backward scratch.
struct Slots {
  size_t n;
  size_t map(size_t i) const { return i; }
  size_t f1() const { return n; }
  size_t f2() const { return n + 1; }
  size_t f3() const { return n + 2; }
  size_t mean() const { return n + 3; }
  size_t rstd() const { return n + 4; }
  size_t grad(size_t which) const { return n + 5 + which; }
  size_t head_scratch() const { return n + 7; }
};

size_t map_size(const NhwcGeom& g, int64_t Co) { return static_cast<size_t>(g.M() * Co); }

EncoderHeadDims head_dims(const ConvStack& s, const EncoderHead& h) {
  const NhwcGeom g = s.geom(s.layers.size() - 1);
  return EncoderHeadDims{g.M(), g.Ho * g.Wo, h.D, h.Z, h.pos_c};
}

// doubles in a float workspace slot (the buffers are 64-byte aligned)
double* doubles(Workspace& ws, size_t slot, int64_t n) { return reinterpret_cast<double*>(ws.buf(slot, static_cast<size_t>(2 * n))); }

EncoderHeadSaved saved_of(Workspace& ws, const Slots& sl, const EncoderHeadDims& d) {
  const size_t rd = static_cast<size_t>(d.rows * d.D);
  return EncoderHeadSaved{ws.buf(sl.f1(), rd), ws.buf(sl.f2(), rd), ws.buf(sl.f3(), rd), doubles(ws, sl.mean(), d.rows),
                          doubles(ws, sl.rstd(), d.rows)};
}

void check(const ConvStack& s, const EncoderHead& h) {
  if (s.layers.empty()) throw std::invalid_argument("CPU encoder: no layers");
  if (s.layers.back().Co != h.D) throw std::invalid_argument("CPU encoder: the head's D differs from the last layer's channels");
}

void forward_into(const ConvStack& s, const EncoderHead& h, float* k, float* v, Precision prec, Workspace& ws, int nthreads) {
  const Slots sl{s.layers.size()};
  const float* x = s.x;
  for (size_t i = 0; i < s.layers.size(); ++i) {
    const ConvStackLayer& L = s.layers[i];
    const NhwcGeom g = s.geom(i);
    float* y = ws.buf(sl.map(i), map_size(g, L.Co));
    nhwc_conv2d_forward(g, L.Co, x, L.w, L.b, L.act, y, nthreads, prec);
    x = y;
  }
  const EncoderHeadDims d = head_dims(s, h);
  encoder_head_forward(d, x, h.p, k, v, saved_of(ws, sl, d), nthreads);
}

}  // namespace

uint64_t encoder_forward_cpu(const ConvStack& s, const EncoderHead& h, float* k, float* v, Precision prec, Workspace& ws,
                             StageStamps& stamps, int nthreads) {
  check(s, h);
  if (!k || !v) throw std::invalid_argument("CPU encoder: k and v are outputs");
  forward_into(s, h, k, v, prec, ws, nthreads);
  return stamps.stamp();
}

void encoder_backward_cpu(const ConvStack& s, const EncoderHead& h, uint64_t stamp, const float* dk, const float* dv,
                          const std::vector<float*>& dw, const std::vector<float*>& db, const EncoderHeadParamGrads& g,
                          Precision prec, Workspace& ws, StageStamps& stamps, int nthreads) {
  check(s, h);
  const size_t n = s.layers.size();
  if (dw.size() != n || db.size() != n) throw std::invalid_argument("CPU encoder backward: one dw and db pointer per layer");
  if (!dk || !dv) throw std::invalid_argument("CPU encoder backward: dk and dv are inputs");
  const EncoderHeadDims d = head_dims(s, h);
  const Slots sl{n};
  if (!stamps.holds(stamp)) {
    // another forward ran on this workspace since: again, into it (k and v to scratch)
    std::vector<float> kv(static_cast<size_t>(2 * d.rows * d.Z));
    forward_into(s, h, kv.data(), kv.data() + d.rows * d.Z, prec, ws, nthreads);
    stamps.stamp();
  }
  // the head: dh, the gradient of the last map
  size_t cur = 0;
  float* dy = ws.buf(sl.grad(cur), map_size(s.geom(n - 1), h.D));
  const EncoderHeadKept kept{ws.buf(sl.f1(), 0), ws.buf(sl.f2(), 0), ws.buf(sl.f3(), 0),
                             reinterpret_cast<const double*>(ws.buf(sl.mean(), 0)), reinterpret_cast<const double*>(ws.buf(sl.rstd(), 0))};
  encoder_head_backward(d, ws.buf(sl.map(n - 1), 0), h.p, kept, dk, dv, dy, g, nthreads,
                        ws.buf(sl.head_scratch(), static_cast<size_t>(2 * d.rows * d.D)));
  // the stack, last layer first; the first layer's input (the images) needs no gradient
  for (size_t i = n; i-- > 0;) {
    const ConvStackLayer& L = s.layers[i];
    const NhwcGeom geo = s.geom(i);
    const float* x = i ? ws.buf(sl.map(i - 1), 0) : s.x;
    float* dx = i ? ws.buf(sl.grad(1 - cur), static_cast<size_t>(geo.N * geo.H * geo.W * geo.C)) : nullptr;
    nhwc_conv2d_backward(geo, L.Co, x, L.w, ws.buf(sl.map(i), 0), dy, L.act, dx, dw[i], db[i], nthreads, prec);
    dy = dx;
    cur = 1 - cur;
  }
}

}  // namespace emorl
