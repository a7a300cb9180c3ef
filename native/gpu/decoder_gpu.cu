// The decoding stage on a GPU (gpu.h): the broadcast layer by tap classes, the conv stack on the
// implicit-GEMM kernel (kernels.cuh), the fused likelihood, and the whole backward pass; the host
// side mirrors decoder.cc. Compiled by nvcc into emorl::cuda and by the host compiler
// (decoder_simt.cc) into emorl::simt, where simt.h emulates the launches.
#include <chrono>
#include <exception>

#include "kernels.cuh"

namespace emorl {
namespace EMORL_GPU_NS {
namespace {

constexpr int kMaxChannels = 4;   // image channels the likelihood kernel holds in registers
constexpr int kMaxTapRanges = 16;  // distinct tap ranges per axis of a broadcast layer

// y[a, q, j] = z[a, j] + pos[q, j]
__global__ void spatial_broadcast_kernel(const float* z, const float* pos, float* y, i64 n, i64 cells, i64 c) {
  EMORL_GRID_LOOP(i, n * cells * c) {
    const i64 j = i % c, q = (i / c) % cells, a = i / (c * cells);
    y[i] = z[a * c + j] + pos[q * c + j];
  }
}

// Per-output-row (column) classes of the broadcast layer: contiguous runs [begin, end).
struct TapRanges {
  int n;
  int begin[kMaxTapRanges], end[kMaxTapRanges];
  EMORL_DEVICE int of(int o) const {
    int r = 0;
    while (r + 1 < n && o >= end[r]) ++r;
    return r;
  }
};

// y[i, oy, ox, co] = act(zw[i, class(oy, ox), co] + conv(pos)[oy, ox, co])
__global__ void broadcast_combine_kernel(const float* zw, const float* conv_pos, float* y, i64 n, int oh, int ow, int cout,
                                         TapRanges rows, TapRanges cols, int act) {
  const i64 QC = static_cast<i64>(oh) * ow * cout, KC = static_cast<i64>(rows.n) * cols.n * cout;
  EMORL_GRID_LOOP(idx, n * QC) {
    const i64 i = idx / QC, r = idx % QC;
    const int co = static_cast<int>(r % cout), ox = static_cast<int>((r / cout) % ow), oy = static_cast<int>(r / (static_cast<i64>(cout) * ow));
    const int cls = rows.of(oy) * cols.n + cols.of(ox);
    y[idx] = activate(zw[i * KC + cls * cout + co] + conv_pos[r], act);
  }
}

// gcls[i, class, co] = Σ over the class's cells of g[i, cell, co]
__global__ void class_sums_kernel(const float* g, float* gcls, i64 n, int oh, int ow, int cout, TapRanges rows, TapRanges cols) {
  const i64 KC = static_cast<i64>(rows.n) * cols.n * cout, QC = static_cast<i64>(oh) * ow * cout;
  EMORL_GRID_LOOP(idx, n * KC) {
    const i64 i = idx / KC;
    const int r = static_cast<int>(idx % KC), co = r % cout, cls = r / cout, rc = cls / cols.n, cc = cls % cols.n;
    float s = 0.f;
    for (int oy = rows.begin[rc]; oy < rows.end[rc]; ++oy)
      for (int ox = cols.begin[cc]; ox < cols.end[cc]; ++ox) s += g[i * QC + (static_cast<i64>(oy) * ow + ox) * cout + co];
    gcls[idx] = s;
  }
}

EMORL_DEVICE float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// The fused image likelihood (likelihood.h), one thread per pixel of an image: the per-pixel nll,
// d nll / d raw for every slot, and optionally the means and log masks.
__global__ void image_nll_kernel(const float* raw, const float* target, int B, int K, i64 P, int C, float log_var, int gmm,
                                 float* pixel_nll, float* draw, float* means, float* log_masks) {
  const int CR = C + 1;
  const float inv_v = expf(-log_var), half_log_var = 0.5f * log_var;
  EMORL_GRID_LOOP(t, static_cast<i64>(B) * P) {
    const i64 b = t / P, p = t % P;
    const float* x = target + t * C;
    float amax = -INFINITY;
    for (int k = 0; k < K; ++k) amax = fmaxf(amax, raw[((b * K + k) * P + p) * CR + C]);
    float se = 0.f;
    for (int k = 0; k < K; ++k) se += expf(raw[((b * K + k) * P + p) * CR + C] - amax);
    const float lse = amax + logf(se);
    float nll = 0.f;
    if (!gmm) {
      // y_c = Σ_k m_k μ_kc; e_c = d nll / d y_c = (y_c − x_c) / v
      float y[kMaxChannels], e[kMaxChannels];
      for (int c = 0; c < C; ++c) y[c] = 0.f;
      for (int k = 0; k < K; ++k) {
        const float* r = raw + ((b * K + k) * P + p) * CR;
        const float m = expf(r[C] - lse);
        for (int c = 0; c < C; ++c) y[c] += m * sigmoid(r[c]);
      }
      for (int c = 0; c < C; ++c) {
        const float d = x[c] - y[c];
        nll += half_log_var + 0.5f * d * d * inv_v;
        e[c] = -d * inv_v;
      }
      if (draw) {
        // d/d r_kc = m_k e_c μ(1−μ); d/d a_k = m_k (s_k − Σ_j m_j s_j), s_k = Σ_c e_c μ_kc
        float ms = 0.f;
        for (int k = 0; k < K; ++k) {
          const float* r = raw + ((b * K + k) * P + p) * CR;
          float sk = 0.f;
          for (int c = 0; c < C; ++c) sk += e[c] * sigmoid(r[c]);
          ms += expf(r[C] - lse) * sk;
        }
        for (int k = 0; k < K; ++k) {
          const float* r = raw + ((b * K + k) * P + p) * CR;
          float* g = draw + ((b * K + k) * P + p) * CR;
          const float m = expf(r[C] - lse);
          float sk = 0.f;
          for (int c = 0; c < C; ++c) {
            const float u = sigmoid(r[c]);
            sk += e[c] * u;
            g[c] = m * e[c] * u * (1.f - u);
          }
          g[C] = m * (sk - ms);
        }
      }
    } else {
      // l_kc = log m_k − ½ logVar − ½ (x_c − μ_kc)² / v; nll −= LSE_k l_kc; γ = softmax_k l
      float L[kMaxChannels];
      for (int c = 0; c < C; ++c) {
        float lmax = -INFINITY;
        for (int k = 0; k < K; ++k) {
          const float* r = raw + ((b * K + k) * P + p) * CR;
          const float d = x[c] - sigmoid(r[c]);
          lmax = fmaxf(lmax, r[C] - lse - half_log_var - 0.5f * d * d * inv_v);
        }
        float sum = 0.f;
        for (int k = 0; k < K; ++k) {
          const float* r = raw + ((b * K + k) * P + p) * CR;
          const float d = x[c] - sigmoid(r[c]);
          sum += expf(r[C] - lse - half_log_var - 0.5f * d * d * inv_v - lmax);
        }
        L[c] = lmax + logf(sum);
        nll -= L[c];
      }
      if (draw)
        // d/d μ_kc = γ_kc (μ_kc − x_c)/v; d/d a_k = −Σ_c γ_kc + C·m_k
        for (int k = 0; k < K; ++k) {
          const float* r = raw + ((b * K + k) * P + p) * CR;
          float* g = draw + ((b * K + k) * P + p) * CR;
          const float logm = r[C] - lse;
          float gsum = 0.f;
          for (int c = 0; c < C; ++c) {
            const float u = sigmoid(r[c]), d = x[c] - u;
            const float gam = expf(logm - half_log_var - 0.5f * d * d * inv_v - L[c]);
            gsum += gam;
            g[c] = gam * (u - x[c]) * inv_v * u * (1.f - u);
          }
          g[C] = -gsum + static_cast<float>(C) * expf(logm);
        }
    }
    for (int k = 0; k < K; ++k) {
      const float* r = raw + ((b * K + k) * P + p) * CR;
      if (means)
        for (int c = 0; c < C; ++c) means[((b * K + k) * P + p) * C + c] = sigmoid(r[c]);
      if (log_masks) log_masks[(b * K + k) * P + p] = r[C] - lse;
    }
    pixel_nll[t] = nll;
  }
}

// dw[co, ci, ky, kx] += dwsum[ci, class·cout + co] for every class whose kernel taps hold (ky, kx),
// the classes in add_class_weight_grads' order (row span, then column span): the host's bits.
// ky_spans / kx_spans: per row (column) span of the classes, its kernel rows [begin, end).
__global__ void class_weight_grads_kernel(const float* dwsum, float* dw, int cout, int c, int kh, int kw, TapRanges ky_spans,
                                          TapRanges kx_spans) {
  const i64 KC = static_cast<i64>(ky_spans.n) * kx_spans.n * cout;
  EMORL_GRID_LOOP(idx, static_cast<i64>(cout) * c * kh * kw) {
    const int kx = static_cast<int>(idx % kw), ky = static_cast<int>((idx / kw) % kh);
    const i64 ci = (idx / (static_cast<i64>(kw) * kh)) % c, co = idx / (static_cast<i64>(kw) * kh * c);
    float v = dw[idx];
    for (int rc = 0; rc < ky_spans.n; ++rc) {
      if (ky < ky_spans.begin[rc] || ky >= ky_spans.end[rc]) continue;
      for (int cc = 0; cc < kx_spans.n; ++cc)
        if (kx >= kx_spans.begin[cc] && kx < kx_spans.end[cc]) v = add_rn(v, dwsum[ci * KC + (rc * kx_spans.n + cc) * cout + co]);
    }
    dw[idx] = v;
  }
}

// wsum[ci, cls·cout + co] = Σ over the class's taps of w[co, ci, ky, kx], in double in the host's
// order (class_weight_sums, decoder.cc). ky_spans / kx_spans as below.
__global__ void class_weight_sums_kernel(const float* w, float* wsum, int cout, int c, int kh, int kw, TapRanges ky_spans,
                                         TapRanges kx_spans) {
  const int ncls = ky_spans.n * kx_spans.n;
  const i64 KC = static_cast<i64>(ncls) * cout;
  EMORL_GRID_LOOP(idx, static_cast<i64>(c) * KC) {
    const int co = static_cast<int>(idx % cout), cls = static_cast<int>((idx / cout) % ncls);
    const i64 ci = idx / KC;
    const int rc = cls / kx_spans.n, cc = cls % kx_spans.n;
    double v = 0;
    for (int ky = ky_spans.begin[rc]; ky < ky_spans.end[rc]; ++ky)
      for (int kx = kx_spans.begin[cc]; kx < kx_spans.end[cc]; ++kx) v += w[((co * c + ci) * kh + ky) * kw + kx];
    wsum[idx] = static_cast<float>(v);
  }
}

// Weighted sums of several sets of buffers, many buffers in one launch (blockIdx.y picks one):
// acc[b] = Σ_k u[k]·g[k][b] in k's order, after acc[b] itself unless `first`, each product and
// sum rounded to float (acc[b] may be g[0][b]).
constexpr int kSumSets = 8, kSumBufs = 16;
struct ScaledSums {
  int sets, first;
  const float* g[kSumSets][kSumBufs];
  float u[kSumSets];
  float* acc[kSumBufs];
  i64 n[kSumBufs];
};
__global__ void scaled_sums_kernel(ScaledSums s) {
  const int b = static_cast<int>(blockIdx.y);
  float* acc = s.acc[b];
  EMORL_GRID_LOOP(i, s.n[b]) {
    float a = s.first ? mul_rn(s.g[0][b][i], s.u[0]) : add_rn(acc[i], mul_rn(s.g[0][b][i], s.u[0]));
    for (int k = 1; k < s.sets; ++k) a = add_rn(a, mul_rn(s.g[k][b][i], s.u[k]));
    acc[i] = a;
  }
}

// The kernel spans [lo, hi) of a broadcast layer's tap classes along one axis.
TapRanges tap_spans(const std::vector<int64_t>& lo, const std::vector<int64_t>& hi) {
  if (lo.size() > static_cast<size_t>(kMaxTapRanges)) throw std::length_error("GPU decoder: more than 16 tap classes per axis in the broadcast layer");
  TapRanges r{};
  r.n = static_cast<int>(lo.size());
  for (int j = 0; j < r.n; ++j) {
    r.begin[j] = static_cast<int>(lo[static_cast<size_t>(j)]);
    r.end[j] = static_cast<int>(hi[static_cast<size_t>(j)]);
  }
  return r;
}

// Per-output-row runs of the tap classes (classes are contiguous runs: the tap range moves
// monotonically with the output index).
TapRanges ranges_of(const std::vector<int64_t>& of, int64_t count) {
  if (count > kMaxTapRanges) throw std::length_error("GPU decoder: more than 16 tap classes per axis in the broadcast layer");
  TapRanges r{};
  r.n = static_cast<int>(count);
  for (int j = 0; j < r.n; ++j) r.begin[j] = r.end[j] = -1;
  for (size_t o = 0; o < of.size(); ++o) {
    const int j = static_cast<int>(of[o]);
    if (r.begin[j] < 0) r.begin[j] = static_cast<int>(o);
    else if (r.end[j] != static_cast<int>(o)) throw std::logic_error("GPU decoder: a tap class is not one run of rows");
    r.end[j] = static_cast<int>(o) + 1;
  }
  return r;
}

// Per stage, the workspace's slots: the layers' outputs first, then these, then kLayerSlots per layer.
enum Slot : size_t {
  kGradA, kGradB, kZ, kPos, kTarget, kPixelNll, kNll, kMeans, kLogMasks, kPartial, kSums,
  kPosConv, kWsum, kZw, kGcls, kGradSum, kDz, kDpos, kDwsum, kFixedSlots
};
enum LayerSlot : size_t { kWf, kWd, kWraw, kBias, kDw, kDb, kLayerSlots };

// Times one phase of a stage when profiling (the device is synchronised at both ends).
class Phase {
 public:
  Phase(StageProfile* p, const char* name) : p_(p), name_(name) {
    if (!p_) return;
    finish(name);
    t0_ = std::chrono::steady_clock::now();
  }
  ~Phase() noexcept(false) {
    if (!p_ || std::uncaught_exceptions()) return;
    finish(name_);
    p_->add(name_, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count());
  }
  Phase(const Phase&) = delete;
  Phase& operator=(const Phase&) = delete;

 private:
  StageProfile* p_;
  const char* name_;
  std::chrono::steady_clock::time_point t0_;
};

class Stage {
 public:
  Stage(const DecoderStage& s, const DecoderStageOut& o, DeviceWorkspace& ws, StageProfile* profile)
      : s_(s), o_(o), ws_(ws), nl_(s.layers.size()), profile_(profile) {}

  void run() {
    const bool want_dz = o_.dz != nullptr;
    bool want_params = o_.dpos != nullptr || keeping();
    for (size_t i = 0, j = 0; i < nl_; ++i) weighted_.push_back(s_.layers[i].kind == DecoderLayerKind::SpatialBroadcast ? 0 : j++);
    for (size_t i = 0; i < nl_; ++i) want_params = want_params || (i < o_.dw.size() && o_.dw[i]) || (i < o_.db.size() && o_.db[i]);
    const bool backward = want_dz || want_params;
    {
      Phase ph(profile_, "upload z, pos, weights");
      z_ = upload(kZ, s_.z, s_.n * s_.c);
      pos_ = upload_tagged(kPos, s_.pos_tag, s_.pos, s_.gh * s_.gw * s_.c);
      for (size_t i = 0; i < nl_; ++i) upload_layer(i);
    }

    act_.resize(nl_);
    for (size_t i = 0; i < nl_; ++i) forward(i);

    const ImageNllShape& k = s_.lik;
    const i64 P = k.H * k.W;
    float* draw = backward ? fixed(kGradA, numel4(s_.layers[nl_ - 1].out)) : nullptr;
    float* means = o_.means ? fixed(kMeans, s_.n * P * k.C) : nullptr;
    float* log_masks = o_.log_masks ? fixed(kLogMasks, s_.n * P) : nullptr;
    float* pixel_nll = fixed(kPixelNll, k.B * P);
    if (k.C > kMaxChannels) throw std::length_error("GPU decoder: images with more than 4 channels");
    {
      Phase ph(profile_, "likelihood (incl. target upload, nll and outputs download)");
      launch(image_nll_kernel, grid_for(k.B * P), dim3(kThreads), act_[nl_ - 1], upload_tagged(kTarget, s_.target_tag, s_.target, k.B * P * k.C),
             static_cast<int>(k.B), static_cast<int>(k.K), P, static_cast<int>(k.C), s_.log_var, s_.gmm ? 1 : 0, pixel_nll, draw,
             means, log_masks);
      float* nll = fixed(kNll, k.B);
      col_sums(pixel_nll, k.B, P, 1, nll);
      download(o_.nll, nll, k.B);
      if (means) download(o_.means, means, s_.n * P * k.C);
      if (log_masks) download(o_.log_masks, log_masks, s_.n * P);
    }
    if (backward) {
      dcur_ = draw;
      dcur_through_act_ = false;
      dslot_ = kGradA;
      for (size_t i = nl_; i-- > 0;) backward_layer(i);
    }
    finish("decoder stage");
  }

 private:
  float* fixed(Slot slot, i64 n) { return ws_.buf(nl_ + slot, static_cast<size_t>(n)); }
  float* layer_buf(size_t i, LayerSlot slot, i64 n) {
    return ws_.buf(nl_ + kFixedSlots + i * kLayerSlots + slot, static_cast<size_t>(n));
  }
  float* upload(Slot slot, const float* src, i64 n) { return ws_.upload(nl_ + slot, src, static_cast<size_t>(n)); }
  // data the stages of a step share (tag: DecoderStage::target_tag), uploaded by the first
  const float* upload_tagged(Slot slot, uint64_t tag, const float* src, i64 n) { return upload_as_is(ws_, nl_ + slot, tag, src, n); }
  void download(float* dst, const float* src, i64 n) { ws_.down(dst, src, static_cast<size_t>(n)); }
  // keep_param_grads: the parameter gradients go to a kept set (DecoderStageOut), not to the host
  bool keeping() const { return o_.keep_param_grads != 0; }
  float* kept(size_t which, i64 n) { return ws_.kept(o_.keep_param_grads, which, static_cast<size_t>(n)); }
  // a parameter gradient's buffer: its place in the kept set (buffer 0: dpos; layer i's dw, db:
  // 1 + 2j, 2 + 2j for the j-th weighted layer), or the scratch slot
  float* dw_buf(size_t i, i64 n) { return keeping() ? kept(1 + 2 * weighted_[i], n) : layer_buf(i, kDw, n); }
  float* db_buf(size_t i, i64 n) { return keeping() ? kept(2 + 2 * weighted_[i], n) : layer_buf(i, kDb, n); }
  float* dpos_buf(i64 n) { return keeping() ? kept(0, n) : fixed(kDpos, n); }

  void upload_layer(size_t i) {
    const DecoderLayer& L = s_.layers[i];
    if (L.kind == DecoderLayerKind::SpatialBroadcast) return;
    // packed on the device (when a copy is not there already) from one upload of the weight
    const size_t base = nl_ + kFixedSlots + i * kLayerSlots;
    packed_weight(ws_, base + kWraw, base + kWf, L.w_tag, kPackedForward, L.w, L.w_shape);
    packed_weight(ws_, base + kWraw, base + kWd, L.w_tag, kPackedDataGrad, L.w, L.w_shape);
    upload_as_is(ws_, base + kBias, L.b_tag, L.b, L.out[3]);
  }

  void col_sums(const float* v, i64 batch, i64 rows, i64 cols, float* out) {
    emorl::EMORL_GPU_NS::col_sums(ws_, nl_ + kSums, v, batch, rows, cols, out);
  }
  void filter_grad(const Geom& g, const float* image, const float* colside, int ncol, float* dw) {
    emorl::EMORL_GPU_NS::filter_grad(ws_, nl_ + kPartial, g, image, colside, ncol, dw);
  }

  void forward(size_t i) {
    const DecoderLayer& L = s_.layers[i];
    float* y = act_[i] = ws_.buf(i, static_cast<size_t>(numel4(L.out)));
    const float* x = i ? act_[i - 1] : nullptr;
    const int act = static_cast<int>(L.act);
    switch (L.kind) {
      case DecoderLayerKind::SpatialBroadcast: {
        Phase ph(profile_, "forward: spatial broadcast");
        launch(spatial_broadcast_kernel, grid_for(numel4(L.out)), dim3(kThreads), z_, pos_, y, s_.n, s_.gh * s_.gw, s_.c);
        break;
      }
      case DecoderLayerKind::BroadcastConv: {
        Phase ph(profile_, "forward: broadcast layer");
        const Geom pg = geom_of(pos_geom(L));
        const i64 cout = L.out[3], Q = L.out[1] * L.out[2];
        float* cp = fixed(kPosConv, Q * cout);
        gemm(Im2col{pos_, pg}, b_operand(layer_buf(i, kWf, 0), cout, 1), Store{cp, static_cast<int>(cout), layer_buf(i, kBias, 0), 0},
             Q, cout, static_cast<i64>(pg.kh) * pg.kw * pg.C);
        taps_ = tap_classes(L);
        const i64 KC = taps_.count() * cout;
        // the sums depend on the grid too: its shape joins the weight's tag
        const uint64_t grid = (static_cast<uint64_t>(L.out[1]) << 40) ^ (static_cast<uint64_t>(L.out[2]) << 20) ^
                              static_cast<uint64_t>(L.pad) ^ (static_cast<uint64_t>(s_.gh) << 50) ^ (static_cast<uint64_t>(s_.gw) << 30);
        const uint64_t tag = L.w_tag ? (L.w_tag ^ (grid * 0x9e3779b97f4a7c15ull)) >> 3 : 0;
        // on the device, from the raw weight (which may live there only: no host copy to sum)
        const float* wsum_dev = ws_.compute_tagged(nl_ + kWsum, slot_tag(tag, kTapSums), static_cast<size_t>(s_.c * KC), [&](float* d) {
          const float* raw = upload_as_is(ws_, nl_ + kFixedSlots + i * kLayerSlots + kWraw, L.w_tag, L.w, numel4(L.w_shape));
          launch(class_weight_sums_kernel, grid_for(s_.c * KC), dim3(kThreads), raw, d,
                 static_cast<int>(cout), static_cast<int>(s_.c), static_cast<int>(L.w_shape[2]), static_cast<int>(L.w_shape[3]),
                 tap_spans(taps_.row_lo, taps_.row_hi), tap_spans(taps_.col_lo, taps_.col_hi));
        });
        float* zw = fixed(kZw, s_.n * KC);
        gemm(a_operand(z_, s_.c, 1), b_operand(wsum_dev, KC, 1), Store{zw, static_cast<int>(KC), nullptr, 0}, s_.n, KC, s_.c);
        rows_ = ranges_of(taps_.row_of, taps_.nrow);
        cols_ = ranges_of(taps_.col_of, taps_.ncol);
        launch(broadcast_combine_kernel, grid_for(numel4(L.out)), dim3(kThreads), zw, static_cast<const float*>(cp), y, s_.n,
               static_cast<int>(L.out[1]), static_cast<int>(L.out[2]), static_cast<int>(cout), rows_, cols_, act);
        break;
      }
      case DecoderLayerKind::Conv: {
        Phase ph(profile_, "forward: convolutions");
        const Geom g = geom_of(layer_geom(L));
        const i64 co = L.out[3];
        gemm(Im2col{x, g}, b_operand(layer_buf(i, kWf, 0), co, 1), Store{y, static_cast<int>(co), layer_buf(i, kBias, 0), act},
             static_cast<i64>(g.N) * g.Ho * g.Wo, co, static_cast<i64>(g.kh) * g.kw * g.C);
        break;
      }
      case DecoderLayerKind::ConvTranspose: {
        Phase ph(profile_, "forward: transposed convolutions");
        const Geom g = geom_of(layer_geom(L));
        const int ci = static_cast<int>(L.in[3]);
        gemm(ColGather{x, g, ci}, b_operand(layer_buf(i, kWd, 0), g.C, 1), Store{y, g.C, layer_buf(i, kBias, 0), act},
             static_cast<i64>(g.N) * g.H * g.W, g.C, static_cast<i64>(g.kh) * g.kw * ci);
        break;
      }
    }
  }

  void backward_layer(size_t i) {
    const DecoderLayer& L = s_.layers[i];
    float* dw = i < o_.dw.size() ? o_.dw[i] : nullptr;
    float* db = i < o_.db.size() ? o_.db[i] : nullptr;
    const float* y = act_[i];
    if (takes_act_grad(L) && !dcur_through_act_) {
      Phase ph(profile_, "backward: activation derivatives");
      act_grad(dcur_, y, numel4(L.out), static_cast<int>(L.act));
    }
    switch (L.kind) {
      case DecoderLayerKind::SpatialBroadcast: {
        Phase ph(profile_, "backward: spatial broadcast");
        const i64 cells = s_.gh * s_.gw, c = s_.c;
        if (o_.dz) {
          float* dz = fixed(kDz, s_.n * c);
          col_sums(dcur_, s_.n, cells, c, dz);
          download(o_.dz, dz, s_.n * c);
        }
        if (o_.dpos || keeping()) {
          float* dpos = dpos_buf(cells * c);
          col_sums(dcur_, 1, s_.n, cells * c, dpos);
          if (o_.dpos) download(o_.dpos, dpos, cells * c);
        }
        break;
      }
      case DecoderLayerKind::BroadcastConv: {
        Phase ph(profile_, "backward: broadcast layer");
        broadcast_backward(i, L, dw, db);
        break;
      }
      case DecoderLayerKind::Conv: {
        const Geom g = geom_of(layer_geom(L));
        const int co = static_cast<int>(L.out[3]);
        float* dx = next_grad(numel4(L.in));
        {
          Phase ph(profile_, "backward: input gradients");
          input_grad(i, ColGather{dcur_, g, co}, b_operand(layer_buf(i, kWd, 0), g.C, 1), dx, g.C, static_cast<i64>(g.N) * g.H * g.W,
                     static_cast<i64>(g.kh) * g.kw * co);
        }
        param_grads(i, L, g, act_[i - 1], dcur_, co, static_cast<i64>(g.N) * g.Ho * g.Wo, dw, db);
        dcur_ = dx;
        break;
      }
      case DecoderLayerKind::ConvTranspose: {
        const Geom g = geom_of(layer_geom(L));
        const int ci = static_cast<int>(L.in[3]);
        float* dx = next_grad(numel4(L.in));
        {
          Phase ph(profile_, "backward: input gradients");
          input_grad(i, Im2col{dcur_, g}, b_operand(layer_buf(i, kWf, 0), ci, 1), dx, ci, static_cast<i64>(g.N) * g.Ho * g.Wo,
                     static_cast<i64>(g.kh) * g.kw * g.C);
        }
        // the image side is this layer's output gradient, the column side its input
        param_grads(i, L, g, dcur_, act_[i - 1], ci, static_cast<i64>(g.N) * g.H * g.W, dw, db);
        dcur_ = dx;
        break;
      }
    }
  }

  // layer L's output gradient is taken through its activation (the broadcast's outputs have none)
  static bool takes_act_grad(const DecoderLayer& L) { return L.kind != DecoderLayerKind::SpatialBroadcast && L.act != Act::Linear; }

  // dx [rows, ncol] = A · B, layer i's input gradient, which is layer i - 1's output gradient:
  // taken through that layer's activation in the product's epilogue (no act_grad pass over it).
  template <class A, class B>
  void input_grad(size_t i, const A& a, const B& b, float* dx, int ncol, i64 rows, i64 depth) {
    const DecoderLayer& below = s_.layers[i - 1];
    dcur_through_act_ = takes_act_grad(below);
    gemm_through_act(a, b, dx, ncol, act_[i - 1], dcur_through_act_ ? below.act : Act::Linear, rows, ncol, depth);
  }

  float* next_grad(i64 n) {
    dslot_ = dslot_ == kGradA ? kGradB : kGradA;
    return fixed(dslot_, n);
  }

  // Weight gradient from the product's image and column sides; bias gradient from the output
  // gradient (dcur_, `out_rows` rows of the layer's output channels).
  void param_grads(size_t i, const DecoderLayer& L, const Geom& g, const float* image, const float* colside, int ncol, i64 out_rows,
                   float* dw, float* db) {
    const i64 nw = numel4(L.w_shape), cout = L.out[3];
    if (dw || keeping()) {
      Phase ph(profile_, "backward: filter gradients");
      float* d = dw_buf(i, nw);
      filter_grad(g, image, colside, ncol, d);
      if (dw) download(dw, d, nw);
    }
    if (db || keeping()) {
      Phase ph(profile_, "backward: bias gradients");
      float* d = db_buf(i, cout);
      col_sums(dcur_, 1, out_rows, cout, d);
      if (db) download(db, d, cout);
    }
  }

  void broadcast_backward(size_t i, const DecoderLayer& L, float* dw, float* db) {
    const i64 n = s_.n, c = s_.c, cout = L.out[3], oh = L.out[1], ow = L.out[2], QC = oh * ow * cout, KC = taps_.count() * cout;
    float* gcls = fixed(kGcls, n * KC);
    launch(class_sums_kernel, grid_for(n * KC), dim3(kThreads), static_cast<const float*>(dcur_), gcls, n, static_cast<int>(oh),
           static_cast<int>(ow), static_cast<int>(cout), rows_, cols_);
    const float* wsum = ws_.buf(nl_ + kWsum, 0);  // the forward pass's (read only: it keeps its tag)
    if (o_.dz) {
      float* dz = fixed(kDz, n * c);
      gemm(a_operand(gcls, KC, 1), b_operand(wsum, 1, KC), Store{dz, static_cast<int>(c), nullptr, 0}, n, c, KC);
      download(o_.dz, dz, n * c);
    }
    if (!dw && !db && !o_.dpos && !keeping()) return;
    // the shared part (conv of pos, bias) sees the gradient summed over slots
    float* gs = fixed(kGradSum, QC);
    col_sums(dcur_, 1, n, QC, gs);
    const Geom pg = geom_of(pos_geom(L));
    if (o_.dpos || keeping()) {
      float* dpos = dpos_buf(s_.gh * s_.gw * c);
      gemm(ColGather{gs, pg, static_cast<int>(cout)}, b_operand(layer_buf(i, kWd, 0), c, 1), Store{dpos, static_cast<int>(c), nullptr, 0},
           s_.gh * s_.gw, c, static_cast<i64>(pg.kh) * pg.kw * cout);
      if (o_.dpos) download(o_.dpos, dpos, s_.gh * s_.gw * c);
    }
    if (db || keeping()) {
      float* d = db_buf(i, cout);
      col_sums(gs, 1, oh * ow, cout, d);
      if (db) download(db, d, cout);
    }
    if (dw || keeping()) {
      const i64 nw = numel4(L.w_shape);
      float* d = dw_buf(i, nw);
      filter_grad(pg, pos_, gs, static_cast<int>(cout), d);
      // dWsum = zᵀ · gcls, then back to every tap of each class (on the host, or in a kept set on the device)
      float* dws = fixed(kDwsum, c * KC);
      gemm(a_operand(z_, 1, c), b_operand(gcls, KC, 1), Store{dws, static_cast<int>(KC), nullptr, 0}, c, KC, n);
      if (keeping()) {
        launch(class_weight_grads_kernel, grid_for(nw), dim3(kThreads), static_cast<const float*>(dws), d, static_cast<int>(cout),
               static_cast<int>(c), static_cast<int>(L.w_shape[2]), static_cast<int>(L.w_shape[3]), tap_spans(taps_.row_lo, taps_.row_hi),
               tap_spans(taps_.col_lo, taps_.col_hi));
      }
      if (dw) {
        download(dw, d, nw);
        std::vector<float> host(static_cast<size_t>(c * KC));
        download(host.data(), dws, c * KC);
        add_class_weight_grads(L, taps_, host.data(), dw);
      }
    }
  }

  const DecoderStage& s_;
  const DecoderStageOut& o_;
  DeviceWorkspace& ws_;
  size_t nl_;
  std::vector<size_t> weighted_;  // per layer: its index among the weighted layers (kept sets)
  std::vector<float*> act_;
  const float* z_ = nullptr;
  const float* pos_ = nullptr;
  float* dcur_ = nullptr;
  bool dcur_through_act_ = false;  // dcur_ is already d/d(the layer's pre-activation)
  Slot dslot_ = kGradA;
  TapClasses taps_;
  TapRanges rows_{}, cols_{};
  StageProfile* profile_;
};
}  // namespace

std::unique_ptr<GpuWorkspace> make_workspace(int device) { return std::unique_ptr<GpuWorkspace>(new DeviceWorkspace(device)); }

void decoder_stage(const DecoderStage& s, const DecoderStageOut& o, GpuWorkspace& ws, StageProfile* profile) {
  Stage(s, o, own_workspace(ws), profile).run();
}


size_t decoder_param_slot(const DeviceParams& p, size_t j) {
  const DeviceParams::Param& q = p.params.at(j);
  if (q.index >= p.layers) throw std::invalid_argument("decoder parameters: layer " + std::to_string(q.index) + " of a stack of " + std::to_string(p.layers));
  return p.layers + kFixedSlots + q.index * kLayerSlots + (q.bias ? kBias : kWraw);
}

void decoder_param_grad_sums(const std::vector<uint64_t>& ids, const std::vector<float>& us, const std::vector<size_t>& sizes,
                             const std::vector<float*>& out, GpuWorkspace& gws, const DeviceParams* keep) {
  DeviceWorkspace& ws = own_workspace(gws);
  if (ids.empty() || ids.size() != us.size() || sizes.size() != out.size())
    throw std::invalid_argument("decoder parameter gradient sums: one u per kept set, one output per buffer, at least one set");
  if (keep) {
    if (keep->params.size() + 1 != sizes.size())
      throw std::invalid_argument("decoder parameter gradient sums: the parameters kept on the device are buffers 1 onwards");
    for (size_t j = 0; j < keep->params.size(); ++j)
      if (keep->params[j].n != sizes[j + 1])
        throw std::invalid_argument("decoder parameter gradient sums: buffer " + std::to_string(j + 1) + " has " + std::to_string(sizes[j + 1]) +
                                    " floats, its parameter " + std::to_string(keep->params[j].n));
  }
  for (uint64_t id : ids)
    for (size_t b = 0; b < sizes.size(); ++b) ws.kept_buf(id, b, sizes[b]);  // every buffer there before anything runs
  float* grads = keep ? ws.state(kGradState, keep->total()) : nullptr;
  std::vector<float*> accs;  // buffer b's sum: in the gradient state (kept) or over set 0's buffer
  for (size_t b = 0, offset = 0; b < sizes.size(); ++b) {
    const bool kept = keep && b > 0;
    accs.push_back(kept ? grads + offset : ws.kept_buf(ids[0], b, sizes[b]));
    if (kept) offset += sizes[b];
  }
  for (size_t b0 = 0; b0 < sizes.size(); b0 += kSumBufs) {
    const int bufs = static_cast<int>(std::min<size_t>(kSumBufs, sizes.size() - b0));
    for (size_t k0 = 0; k0 < ids.size(); k0 += kSumSets) {
      ScaledSums s{};
      s.sets = static_cast<int>(std::min<size_t>(kSumSets, ids.size() - k0));
      s.first = k0 == 0;
      i64 largest = 0;
      for (int b = 0; b < bufs; ++b) {
        const size_t buf = b0 + static_cast<size_t>(b);
        s.acc[b] = accs[buf];
        s.n[b] = static_cast<i64>(sizes[buf]);
        largest = std::max(largest, s.n[b]);
        for (int k = 0; k < s.sets; ++k) s.g[k][b] = ws.kept_buf(ids[k0 + static_cast<size_t>(k)], buf, sizes[buf]);
      }
      for (int k = 0; k < s.sets; ++k) s.u[k] = us[k0 + static_cast<size_t>(k)];
      dim3 grid = grid_for(largest);
      grid.y = static_cast<unsigned>(bufs);
      launch(scaled_sums_kernel, grid, dim3(kThreads), s);
    }
  }
  for (size_t b = 0; b < sizes.size(); ++b)
    if (!(keep && b > 0)) ws.down(out[b], accs[b], sizes[b]);
  finish("decoder parameter gradient sums");
  for (uint64_t id : ids) ws.drop_kept(id);
}

}  // namespace EMORL_GPU_NS
}  // namespace emorl
