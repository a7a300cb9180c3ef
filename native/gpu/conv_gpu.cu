// The NHWC convolutions of nhwc.h on a GPU (gpu.h), for the layers outside the decoding stage (the
// encoder's): each call uploads its inputs, runs the implicit-GEMM products of kernels.cuh and
// downloads its outputs. A conv stack (gpu.h ConvStack) runs all its layers in one call each way,
// its intermediate maps kept on the device between them: per step only the images, the last map
// and its gradient, the weights and their gradients cross the bus. Compiled by nvcc into
// emorl::cuda and by the host compiler (conv_simt.cc) into emorl::simt.
#include "attention.cuh"
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
  size_t raw(size_t i) const { return 1 + 4 * L + i; }  // the weight as it is, packed into wf and wd on the device
  size_t grad(int which) const { return 1 + 5 * L + static_cast<size_t>(which); }  // two gradient maps, in turn
  size_t dw() const { return 3 + 5 * L; }
  size_t db() const { return 4 + 5 * L; }
  size_t scratch() const { return 5 + 5 * L; }
  size_t end() const { return 6 + 5 * L; }  // the first slot past the stack's (the encoder head's)
};

i64 map_size(const NhwcGeom& g) { return g.N * g.H * g.W * g.C; }

// Every layer's forward product, leaving the input and the outputs in their slots.
void stack_forward(const ConvStack& s, DeviceWorkspace& ws) {
  const StackSlots sl{s.layers.size()};
  const i64 nx = s.N * s.H * s.W * s.C;
  float* in = ws.buf(sl.x(), static_cast<size_t>(nx));
  ws.up(in, s.x, static_cast<size_t>(nx));
  for (size_t i = 0; i < s.layers.size(); ++i) {
    const ConvStackLayer& L = s.layers[i];
    const NhwcGeom g = s.geom(i);
    const int64_t w_shape[4] = {L.Co, g.C, L.kh, L.kw};
    const float* wfd = packed_weight(ws, sl.raw(i), sl.wf(i), L.w_tag, kPackedForward, L.w, w_shape);
    const float* bd = upload_as_is(ws, sl.bias(i), L.b_tag, L.b, L.Co);
    float* out = ws.buf(sl.out(i), static_cast<size_t>(g.M() * L.Co));
    gemm(Im2col{in, geom_of(g)}, b_operand(wfd, L.Co, 1), Store{out, as_int(L.Co, "Co"), bd, static_cast<int>(L.act)}, g.M(), L.Co, g.P());
    in = out;
  }
}

void check_stack(const ConvStack& s) {
  if (s.layers.empty()) throw std::invalid_argument("GPU conv stack: no layers");
  for (const auto& L : s.layers)
    if ((!L.w && !L.w_tag) || (!L.b && !L.b_tag)) throw std::invalid_argument("GPU conv stack: every layer needs its weight and bias");
}


// Where a backward call leaves parameter gradients: in host arrays (downloaded), or, with `keep`
// (gpu.h DeviceParams: the encoder's parameters, all of them, in order), in the workspace's
// gradient state buffer at each parameter's place.
class GradDest {
 public:
  GradDest(DeviceWorkspace& ws, const DeviceParams* keep, const std::vector<size_t>& sizes) : ws_(ws) {
    if (!keep) return;
    if (keep->stage != DeviceParams::Stage::Encoder || keep->params.size() != sizes.size())
      throw std::invalid_argument("GPU encoder backward: the parameters kept on the device must be the encoder's, all " + std::to_string(sizes.size()));
    size_t offset = 0;
    for (size_t j = 0; j < sizes.size(); ++j) {
      if (keep->params[j].n != sizes[j])
        throw std::invalid_argument("GPU encoder backward: kept parameter " + std::to_string(j) + " has " + std::to_string(keep->params[j].n) +
                                    " floats, the encoder's " + std::to_string(sizes[j]));
      offsets_.push_back(offset);
      offset += sizes[j];
    }
    state_ = ws.state(kGradState, offset);
  }
  bool keeping() const { return state_ != nullptr; }
  // the device buffer gradient j is made in: its place in the state buffer, or `scratch`
  float* at(size_t j, float* scratch) const { return state_ ? state_ + offsets_[j] : scratch; }
  // gradient j made in d: down to `host` unless it stays on the device
  void done(float* host, const float* d, size_t n) const {
    if (!state_ && host) ws_.down(host, d, n);
  }

 private:
  DeviceWorkspace& ws_;
  float* state_ = nullptr;
  std::vector<size_t> offsets_;
};

// From d/d(the last map) in gradient slot 0: every layer's dw, db (null: skipped, unless `out`
// keeps them: gradients 2i, 2i + 1) and dx (null: skipped), through the maps stack_forward left.
void stack_backward(const ConvStack& s, DeviceWorkspace& ws, float* dx, const std::vector<float*>& dw, const std::vector<float*>& db,
                    const GradDest& out) {
  const size_t n = s.layers.size();
  const StackSlots sl{n};
  int cur = 0;  // which gradient slot holds d/d(the current layer's output)
  for (size_t i = n; i-- > 0;) {
    const ConvStackLayer& L = s.layers[i];
    const NhwcGeom g = s.geom(i);
    const Geom gg = geom_of(g);
    const i64 ny = g.M() * L.Co;
    float* d = ws.buf(sl.grad(cur), 0);
    const float* in = ws.buf(i ? sl.out(i - 1) : sl.x(), 0);
    // below the top, the layer above's input-gradient product already took d through this activation
    if (i == n - 1 && L.act != Act::Linear) act_grad(d, ws.buf(sl.out(i), 0), ny, static_cast<int>(L.act));
    if (dw[i] || out.keeping()) {
      const i64 nw = L.Co * g.P();
      float* dwd = out.at(2 * i, ws.buf(sl.dw(), static_cast<size_t>(nw)));
      filter_grad(ws, sl.scratch(), gg, in, d, as_int(L.Co, "Co"), dwd);
      out.done(dw[i], dwd, static_cast<size_t>(nw));
    }
    if (db[i] || out.keeping()) {
      float* dbd = out.at(2 * i + 1, ws.buf(sl.db(), static_cast<size_t>(L.Co)));
      col_sums(ws, sl.scratch(), d, 1, g.M(), L.Co, dbd);
      out.done(db[i], dbd, static_cast<size_t>(L.Co));
    }
    if (i == 0 && !dx) break;
    const int64_t w_shape[4] = {L.Co, g.C, L.kh, L.kw};
    const float* wdd = packed_weight(ws, sl.raw(i), sl.wd(i), L.w_tag, kPackedDataGrad, L.w, w_shape);
    float* dnext = ws.buf(sl.grad(1 - cur), static_cast<size_t>(map_size(g)));
    gemm_through_act(ColGather{d, gg, as_int(L.Co, "Co")}, b_operand(wdd, g.C, 1), dnext, as_int(g.C, "C"), in,
                     i > 0 ? s.layers[i - 1].act : Act::Linear, g.N * g.H * g.W, g.C, L.kh * L.kw * L.Co);
    cur = 1 - cur;
    if (i == 0) ws.down(dx, dnext, static_cast<size_t>(map_size(g)));
  }
}

// ---- the encoder head (gpu.h EncoderHead) ----

// f0 = h + P[pixel], then LayerNorm with γ, β per row: one thread per row (D is small: 64 in the
// shipped configs), statistics kept for the backward pass.
__global__ void pos_layer_norm_kernel(const float* h, const float* P, i64 rows, i64 hw, int D, const float* gamma, const float* beta,
                                      float eps, float* f1, float* mean, float* rstd) {
  EMORL_GRID_LOOP(r, rows) {
    const float* hr = h + r * D;
    const float* pr = P + (r % hw) * D;
    float m = 0.f;
    for (int j = 0; j < D; ++j) m += hr[j] + pr[j];
    m /= static_cast<float>(D);
    float var = 0.f;
    for (int j = 0; j < D; ++j) {
      const float d = hr[j] + pr[j] - m;
      var += d * d;
    }
    const float rs = 1.f / sqrtf(var / static_cast<float>(D) + eps);
    for (int j = 0; j < D; ++j) f1[r * D + j] = (hr[j] + pr[j] - m) * rs * gamma[j] + beta[j];
    mean[r] = m;
    rstd[r] = rs;
  }
}

// Its backward per row: df0 = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) with dx̂ = df1·γ, and gx = df1·x̂
// (summed over rows into dγ).
__global__ void pos_layer_norm_backward_kernel(const float* df1, const float* h, const float* P, i64 rows, i64 hw, int D, const float* gamma,
                                               const float* mean, const float* rstd, float* df0, float* gx) {
  EMORL_GRID_LOOP(r, rows) {
    const float* hr = h + r * D;
    const float* pr = P + (r % hw) * D;
    const float* gr = df1 + r * D;
    const float m = mean[r], rs = rstd[r];
    float m1 = 0.f, m2 = 0.f;
    for (int j = 0; j < D; ++j) {
      const float xh = (hr[j] + pr[j] - m) * rs, dxh = gr[j] * gamma[j];
      m1 += dxh;
      m2 += dxh * xh;
    }
    m1 /= static_cast<float>(D);
    m2 /= static_cast<float>(D);
    for (int j = 0; j < D; ++j) {
      const float xh = (hr[j] + pr[j] - m) * rs;
      df0[r * D + j] = rs * (gr[j] * gamma[j] - m1 - xh * m2);
      gx[r * D + j] = gr[j] * xh;
    }
  }
}

// out[i] = Σ_split part[split, i]
__global__ void sum_splits_kernel(const float* part, int splits, i64 n, float* out) {
  EMORL_GRID_LOOP(i, n) {
    float t = 0.f;
    for (int s = 0; s < splits; ++s) t += part[s * n + i];
    out[i] = t;
  }
}

// dW [out, in] = Σ_r A[r, o]·B[r, i] over `rows` rows (a linear layer's weight gradient), split
// over rows with partial sums in slot `scratch`.
void dense_weight_grad(DeviceWorkspace& ws, size_t scratch, const float* A, i64 out, const float* B, i64 in, i64 rows, float* dw) {
  const i64 splits = filter_splits(rows);
  float* part = ws.buf(scratch, static_cast<size_t>(splits * out * in));
  gemm(a_operand(A, 1, out), b_operand(B, in, 1), Partial{part, out * in, as_int(in, "in")}, out, in, rows, splits);
  launch(sum_splits_kernel, grid_for(out * in), dim3(kThreads), static_cast<const float*>(part), static_cast<int>(splits), out * in, dw);
}

// The head's slots, after the stack's.
struct HeadSlots {
  size_t b;
  size_t param(int i) const { return b + static_cast<size_t>(i); }  // EncoderHead's tensors in tag order (11)
  size_t P() const { return b + 11; }
  size_t f1() const { return b + 12; }
  size_t mean() const { return b + 13; }
  size_t rstd() const { return b + 14; }
  size_t f2() const { return b + 15; }
  size_t f3() const { return b + 16; }
  size_t k() const { return b + 17; }
  size_t v() const { return b + 18; }
  size_t dk() const { return b + 19; }
  size_t dv() const { return b + 20; }
  size_t df3() const { return b + 21; }
  size_t df2() const { return b + 22; }
  size_t df1() const { return b + 23; }
  size_t gx() const { return b + 24; }
  size_t dP() const { return b + 25; }
  size_t grad() const { return b + 26; }
  size_t scratch() const { return b + 27; }
  size_t end() const { return b + 28; }  // the first slot past the head's (the attention's)
};
enum HeadParam : int { kPos, kPosW, kPosB, kLnW, kLnB, kW1, kB1, kW2, kB2, kWk, kWv };

// The head's shapes from the stack's last map; checks that they fit.
struct HeadDims {
  i64 R, HW, D, Z, pc;
};
HeadDims head_dims(const ConvStack& s, const EncoderHead& h) {
  const NhwcGeom g = s.geom(s.layers.size() - 1);
  if (h.D != s.layers.back().Co) throw std::invalid_argument("GPU encoder: the head's D differs from the stack's last channels");
  if (h.D < 1 || h.Z < 1 || h.pos_c < 1) throw std::invalid_argument("GPU encoder: empty head");
  const float* need[] = {h.p.pos, h.p.pos_w, h.p.pos_b, h.p.ln_w, h.p.ln_b, h.p.w1, h.p.b1, h.p.w2, h.p.b2, h.p.wk, h.p.wv};
  for (int i = 0; i < 11; ++i)
    if (!need[i] && !h.tags[i]) throw std::invalid_argument("GPU encoder: every head tensor is needed");
  return HeadDims{g.M(), g.Ho * g.Wo, h.D, h.Z, h.pos_c};
}

// The head's tensor i (n floats) on the device, uploaded unless its tag is there.
const float* head_param(DeviceWorkspace& ws, const HeadSlots& hs, const EncoderHead& h, int i, const float* src, i64 n) {
  return upload_as_is(ws, hs.param(i), h.tags[i], src, n);
}

// The head's forward pass from the stack's last map, leaving every activation in its slot.
void head_forward(const ConvStack& s, const EncoderHead& h, DeviceWorkspace& ws) {
  const HeadDims d = head_dims(s, h);
  const StackSlots sl{s.layers.size()};
  const HeadSlots hs{sl.end()};
  const int D = as_int(d.D, "D"), Z = as_int(d.Z, "Z");
  const float* pos = head_param(ws, hs, h, kPos, h.p.pos, d.HW * d.pc);
  const float* pos_w = head_param(ws, hs, h, kPosW, h.p.pos_w, d.D * d.pc);
  const float* pos_b = head_param(ws, hs, h, kPosB, h.p.pos_b, d.D);
  float* P = ws.buf(hs.P(), static_cast<size_t>(d.HW * d.D));
  gemm(a_operand(pos, d.pc, 1), b_operand(pos_w, 1, d.pc), Store{P, D, pos_b, 0}, d.HW, d.D, d.pc);
  const float* ln_w = head_param(ws, hs, h, kLnW, h.p.ln_w, d.D);
  const float* ln_b = head_param(ws, hs, h, kLnB, h.p.ln_b, d.D);
  float* f1 = ws.buf(hs.f1(), static_cast<size_t>(d.R * d.D));
  float* mean = ws.buf(hs.mean(), static_cast<size_t>(d.R));
  float* rstd = ws.buf(hs.rstd(), static_cast<size_t>(d.R));
  launch(pos_layer_norm_kernel, grid_for(d.R), dim3(kThreads), static_cast<const float*>(ws.buf(sl.out(s.layers.size() - 1), 0)),
         static_cast<const float*>(P), d.R, d.HW, D, ln_w, ln_b, static_cast<float>(h.p.eps), f1, mean, rstd);
  const float* w1 = head_param(ws, hs, h, kW1, h.p.w1, d.D * d.D);
  const float* b1 = head_param(ws, hs, h, kB1, h.p.b1, d.D);
  const float* w2 = head_param(ws, hs, h, kW2, h.p.w2, d.D * d.D);
  const float* b2 = head_param(ws, hs, h, kB2, h.p.b2, d.D);
  const float* wk = head_param(ws, hs, h, kWk, h.p.wk, d.Z * d.D);
  const float* wv = head_param(ws, hs, h, kWv, h.p.wv, d.Z * d.D);
  float* f2 = ws.buf(hs.f2(), static_cast<size_t>(d.R * d.D));
  float* f3 = ws.buf(hs.f3(), static_cast<size_t>(d.R * d.D));
  gemm(a_operand(f1, d.D, 1), b_operand(w1, 1, d.D), Store{f2, D, b1, static_cast<int>(Act::Relu)}, d.R, d.D, d.D);
  gemm(a_operand(f2, d.D, 1), b_operand(w2, 1, d.D), Store{f3, D, b2, 0}, d.R, d.D, d.D);
  gemm(a_operand(f3, d.D, 1), b_operand(wk, 1, d.D), Store{ws.buf(hs.k(), static_cast<size_t>(d.R * d.Z)), Z, nullptr, 0}, d.R, d.Z, d.D);
  gemm(a_operand(f3, d.D, 1), b_operand(wv, 1, d.D), Store{ws.buf(hs.v(), static_cast<size_t>(d.R * d.Z)), Z, nullptr, 0}, d.R, d.Z, d.D);
}

// Makes sure ws holds the encoder's activation set `stamp` (k and v among them): when another
// forward ran since (or none did), the forward pass runs again and stamp becomes the new set's.
void keep_encoder(const ConvStack& s, const EncoderHead& h, uint64_t& stamp, DeviceWorkspace& ws) {
  if (ws.holds(stamp)) return;
  ws.forget();
  stack_forward(s, ws);
  head_forward(s, h, ws);
  stamp = ws.stamp();
}

// An attention call on the encoder's keys and values: the competition's sizes (checked), and the
// workspace holding k and v (the encoder's forward run again when they are no longer there).
struct KeptAttention {
  DeviceWorkspace& ws;
  HeadDims d;
  SlotAttention sa;
  const float* k;
  const float* v;
  AttentionSlots slots;
};
KeptAttention kept_attention(const ConvStack& s, const EncoderHead& h, uint64_t& stamp, const EncoderAttention& a, GpuWorkspace& base) {
  check_stack(s);
  DeviceWorkspace& ws = own_workspace(base);
  const HeadDims d = head_dims(s, h);
  if (!a.q) throw std::invalid_argument("GPU encoder attention: no queries");
  if (a.B != s.N) throw std::invalid_argument("GPU encoder attention: the queries' batch differs from the encoder's images");
  const SlotAttention sa{a.B, a.K, d.HW, d.Z, d.Z, a.eps};
  check_attention(sa);
  keep_encoder(s, h, stamp, ws);
  const HeadSlots hs{StackSlots{s.layers.size()}.end()};
  return KeptAttention{ws, d, sa, ws.buf(hs.k(), 0), ws.buf(hs.v(), 0), AttentionSlots{hs.end()}};
}

}  // namespace

uint64_t encoder_attention_forward(const ConvStack& s, const EncoderHead& h, uint64_t stamp, const EncoderAttention& a, float* updates,
                                   float* p, GpuWorkspace& base) {
  const KeptAttention c = kept_attention(s, h, stamp, a, base);
  attention_forward(c.ws, c.slots, c.sa, c.k, c.v, a.q, updates, p);
  finish("encoder attention forward");
  return stamp;
}

uint64_t encoder_attention_backward(const ConvStack& s, const EncoderHead& h, uint64_t stamp, uint64_t sum_id, const EncoderAttention& a,
                                    const float* dU, float* dq, GpuWorkspace& base) {
  if (sum_id == 0) throw std::invalid_argument("GPU encoder attention backward: no sum id");
  if (!dU) throw std::invalid_argument("GPU encoder attention backward: no dU");
  const KeptAttention c = kept_attention(s, h, stamp, a, base);
  const size_t n = static_cast<size_t>(c.d.R * c.d.Z);
  attention_backward(c.ws, c.slots, c.sa, c.k, c.v, a.q, dU, c.ws.sum(sum_id, 0, n), c.ws.sum(sum_id, 1, n), dq);
  finish("encoder attention backward");
  return stamp;
}

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
  const NhwcGeom g = s.geom(n - 1);
  const i64 ny = g.M() * s.layers[n - 1].Co;
  ws.up(ws.buf(StackSlots{n}.grad(0), static_cast<size_t>(ny)), dy, static_cast<size_t>(ny));
  stack_backward(s, ws, dx, dw, db, GradDest(ws, nullptr, {}));
  finish("conv stack backward");
}

uint64_t encoder_forward(const ConvStack& s, const EncoderHead& h, float* k, float* v, GpuWorkspace& base) {
  check_stack(s);
  DeviceWorkspace& ws = own_workspace(base);
  const HeadDims d = head_dims(s, h);
  ws.forget();
  ws.drop_sums();  // a new pass: sums an abandoned backward pass left are no one's
  stack_forward(s, ws);
  head_forward(s, h, ws);
  const HeadSlots hs{StackSlots{s.layers.size()}.end()};
  if ((k == nullptr) != (v == nullptr)) throw std::invalid_argument("GPU encoder: k and v are downloaded both or neither");
  if (k) {
    ws.down(k, ws.buf(hs.k(), 0), static_cast<size_t>(d.R * d.Z));
    ws.down(v, ws.buf(hs.v(), 0), static_cast<size_t>(d.R * d.Z));
  }
  finish("encoder forward");
  return ws.stamp();
}

void encoder_backward(const ConvStack& s, const EncoderHead& h, uint64_t stamp, const float* dk, const float* dv,
                      const std::vector<float*>& dw, const std::vector<float*>& db, const EncoderHeadParamGrads& g, GpuWorkspace& base,
                      uint64_t sum_id, const DeviceParams* keep) {
  check_stack(s);
  DeviceWorkspace& ws = own_workspace(base);
  const HeadDims d = head_dims(s, h);
  const size_t n = s.layers.size();
  if (dw.size() != n || db.size() != n) throw std::invalid_argument("GPU encoder backward: one dw and db pointer per layer");
  const float* wanted[] = {g.pos_w, g.pos_b, g.ln_w, g.ln_b, g.w1, g.b1, g.w2, g.b2, g.wk, g.wv};
  const bool to_host = g.wk != nullptr;
  for (const float* p : wanted)
    if ((p != nullptr) != to_host) throw std::invalid_argument("GPU encoder backward: the head's gradients come all or none");
  if (keep && to_host) throw std::invalid_argument("GPU encoder backward: parameter gradients kept on the device or downloaded, not both");
  const bool params = to_host || keep;
  // the parameters in DeviceParams' order: each conv layer's w, b, then the head's tensors 1..10
  std::vector<size_t> sizes;
  for (size_t i = 0; i < n; ++i) {
    sizes.push_back(static_cast<size_t>(s.layers[i].Co * s.geom(i).P()));
    sizes.push_back(static_cast<size_t>(s.layers[i].Co));
  }
  for (i64 e : {d.D * d.pc, d.D, d.D, d.D, d.D * d.D, d.D, d.D * d.D, d.D, d.Z * d.D, d.Z * d.D}) sizes.push_back(static_cast<size_t>(e));
  const GradDest out(ws, keep, sizes);
  const auto head_index = [&](HeadParam t) { return 2 * n + static_cast<size_t>(t) - 1; };
  if ((dk == nullptr) != (dv == nullptr)) throw std::invalid_argument("GPU encoder backward: dk and dv are given both or neither");
  keep_encoder(s, h, stamp, ws);
  const StackSlots sl{n};
  const HeadSlots hs{sl.end()};
  const int D = as_int(d.D, "D");
  // every head tensor is in its slot from the forward pass
  auto param = [&](int i) { return static_cast<const float*>(ws.buf(hs.param(i), 0)); };
  const float* dkd;
  const float* dvd;
  if (dk) {
    dkd = ws.upload(hs.dk(), dk, static_cast<size_t>(d.R * d.Z));
    dvd = ws.upload(hs.dv(), dv, static_cast<size_t>(d.R * d.Z));
  } else {  // the attention rounds' sums (none ran backward: zero, as the sums start)
    dkd = ws.sum(sum_id, 0, static_cast<size_t>(d.R * d.Z));
    dvd = ws.sum(sum_id, 1, static_cast<size_t>(d.R * d.Z));
  }
  const float* f1 = ws.buf(hs.f1(), 0);
  const float* f2 = ws.buf(hs.f2(), 0);
  const float* f3 = ws.buf(hs.f3(), 0);
  float* grad = ws.buf(hs.grad(), static_cast<size_t>(std::max(d.D * d.D, std::max(d.Z * d.D, d.D * d.pc))));
  auto weight_grad = [&](const float* A, i64 rows_out, const float* B, i64 in, float* host, HeadParam t) {
    float* dst = out.at(head_index(t), grad);
    dense_weight_grad(ws, hs.scratch(), A, rows_out, B, in, d.R, dst);
    out.done(host, dst, static_cast<size_t>(rows_out * in));
  };
  auto bias_grad = [&](const float* v, i64 rows, float* host, HeadParam t) {
    float* dst = out.at(head_index(t), grad);
    col_sums(ws, hs.scratch(), v, 1, rows, d.D, dst);
    out.done(host, dst, static_cast<size_t>(d.D));
  };
  // k = f3 W_kᵀ, v = f3 W_vᵀ
  float* df3 = ws.buf(hs.df3(), static_cast<size_t>(d.R * d.D));
  gemm(a_operand(dkd, d.Z, 1), b_operand(param(kWk), d.D, 1), Store{df3, D, nullptr, 0}, d.R, d.D, d.Z);
  gemm(a_operand(dvd, d.Z, 1), b_operand(param(kWv), d.D, 1), AddTo{df3, D}, d.R, d.D, d.Z);
  if (params) {
    weight_grad(dkd, d.Z, f3, d.D, g.wk, kWk);
    weight_grad(dvd, d.Z, f3, d.D, g.wv, kWv);
  }
  // f3 = f2 W2ᵀ + b2, f2 = ReLU(f1 W1ᵀ + b1)
  float* df2 = ws.buf(hs.df2(), static_cast<size_t>(d.R * d.D));
  gemm(a_operand(df3, d.D, 1), b_operand(param(kW2), d.D, 1), StoreThroughAct{df2, D, f2, static_cast<int>(Act::Relu)}, d.R, d.D, d.D);
  if (params) {
    weight_grad(df3, d.D, f2, d.D, g.w2, kW2);
    bias_grad(df3, d.R, g.b2, kB2);
  }
  float* df1 = ws.buf(hs.df1(), static_cast<size_t>(d.R * d.D));
  gemm(a_operand(df2, d.D, 1), b_operand(param(kW1), d.D, 1), Store{df1, D, nullptr, 0}, d.R, d.D, d.D);
  if (params) {
    weight_grad(df2, d.D, f1, d.D, g.w1, kW1);
    bias_grad(df2, d.R, g.b1, kB1);
  }
  // the LayerNorm, into d/d(the stack's last map), which is also d/d(the positional projection)
  float* df0 = ws.buf(sl.grad(0), static_cast<size_t>(d.R * d.D));
  float* gx = ws.buf(hs.gx(), static_cast<size_t>(d.R * d.D));
  launch(pos_layer_norm_backward_kernel, grid_for(d.R), dim3(kThreads), static_cast<const float*>(df1),
         static_cast<const float*>(ws.buf(sl.out(n - 1), 0)), static_cast<const float*>(ws.buf(hs.P(), 0)), d.R, d.HW, D, param(kLnW),
         static_cast<const float*>(ws.buf(hs.mean(), 0)), static_cast<const float*>(ws.buf(hs.rstd(), 0)), df0, gx);
  if (params) {
    bias_grad(gx, d.R, g.ln_w, kLnW);
    bias_grad(df1, d.R, g.ln_b, kLnB);
    // P = pos W_posᵀ + b_pos is added to every image's map: dP sums df0 over the images
    float* dP = ws.buf(hs.dP(), static_cast<size_t>(d.HW * d.D));
    col_sums(ws, hs.scratch(), df0, 1, d.R / d.HW, d.HW * d.D, dP);
    float* dpw = out.at(head_index(kPosW), grad);
    dense_weight_grad(ws, hs.scratch(), dP, d.D, param(kPos), d.pc, d.HW, dpw);
    out.done(g.pos_w, dpw, static_cast<size_t>(d.D * d.pc));
    bias_grad(dP, d.HW, g.pos_b, kPosB);
  }
  stack_backward(s, ws, nullptr, dw, db, out);
  if (!dk) ws.drop_sums(sum_id);
  finish("encoder backward");
}

size_t encoder_param_slot(const DeviceParams& p, size_t j) {
  const DeviceParams::Param& q = p.params.at(j);
  const StackSlots sl{p.layers};
  if (q.index < p.layers) return q.bias ? sl.bias(q.index) : sl.raw(q.index);
  const size_t t = q.index - p.layers + 1;
  if (t > static_cast<size_t>(kWv)) throw std::invalid_argument("encoder parameters: index " + std::to_string(q.index) + " is past the head's tensors");
  return HeadSlots{sl.end()}.param(static_cast<int>(t));
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
