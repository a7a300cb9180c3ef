// One decoder stage (see decoder.h): forward layer by layer keeping each layer's output, the fused
// likelihood, then the backward pass from d nll / d raw down to z, each convolution's backward
// computing its input, weight and bias gradients in one call (nhwc.cc).
#include "decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace emorl {

NhwcGeom layer_geom(const DecoderLayer& L) {
  NhwcGeom g{};
  g.kh = L.w_shape[2];
  g.kw = L.w_shape[3];
  g.sh = g.sw = L.stride;
  g.pt = g.pl = L.pad;
  if (L.kind == DecoderLayerKind::ConvTranspose) {
    g.N = L.in[0]; g.Ho = L.in[1]; g.Wo = L.in[2];
    g.H = L.out[1]; g.W = L.out[2]; g.C = L.out[3];
  } else {
    g.N = L.in[0]; g.H = L.in[1]; g.W = L.in[2]; g.C = L.in[3];
    g.Ho = L.out[1]; g.Wo = L.out[2];
  }
  return g;
}

NhwcGeom pos_geom(const DecoderLayer& L) {
  NhwcGeom g{};
  g.N = 1; g.H = L.in[1]; g.W = L.in[2]; g.C = L.in[3];
  g.Ho = L.out[1]; g.Wo = L.out[2];
  g.kh = L.w_shape[2]; g.kw = L.w_shape[3];
  g.sh = g.sw = 1;
  g.pt = g.pl = L.pad;
  return g;
}

TapClasses tap_classes(const DecoderLayer& L) {
  TapClasses t;
  auto build = [&](int64_t out, int64_t grid, int64_t k, std::vector<int64_t>& of, std::vector<int64_t>& los,
                   std::vector<int64_t>& his) {
    of.resize(static_cast<size_t>(out));
    for (int64_t o = 0; o < out; ++o) {
      const int64_t lo = std::max<int64_t>(0, L.pad - o), hi = std::min<int64_t>(k, grid + L.pad - o);
      size_t j = 0;
      while (j < los.size() && !(los[j] == lo && his[j] == hi)) ++j;
      if (j == los.size()) {
        los.push_back(lo);
        his.push_back(hi);
      }
      of[static_cast<size_t>(o)] = static_cast<int64_t>(j);
    }
    return static_cast<int64_t>(los.size());
  };
  t.nrow = build(L.out[1], L.in[1], L.w_shape[2], t.row_of, t.row_lo, t.row_hi);
  t.ncol = build(L.out[2], L.in[2], L.w_shape[3], t.col_of, t.col_lo, t.col_hi);
  return t;
}

void class_weight_sums(const DecoderLayer& L, const TapClasses& t, float* wsum) {
  const int64_t c = L.in[3], cout = L.out[3], kh = L.w_shape[2], kw = L.w_shape[3], ncls = t.count();
  for (int64_t rc = 0; rc < t.nrow; ++rc)
    for (int64_t cc = 0; cc < t.ncol; ++cc) {
      const int64_t k = rc * t.ncol + cc;
      for (int64_t ci = 0; ci < c; ++ci)
        for (int64_t co = 0; co < cout; ++co) {
          double v = 0;
          for (int64_t ky = t.row_lo[rc]; ky < t.row_hi[rc]; ++ky)
            for (int64_t kx = t.col_lo[cc]; kx < t.col_hi[cc]; ++kx) v += L.w[((co * c + ci) * kh + ky) * kw + kx];
          wsum[ci * ncls * cout + k * cout + co] = static_cast<float>(v);
        }
    }
}

void add_class_weight_grads(const DecoderLayer& L, const TapClasses& t, const float* dwsum, float* dw) {
  const int64_t c = L.in[3], cout = L.out[3], kh = L.w_shape[2], kw = L.w_shape[3], KC = t.count() * cout;
  for (int64_t rc = 0; rc < t.nrow; ++rc)
    for (int64_t cc = 0; cc < t.ncol; ++cc) {
      const int64_t k = rc * t.ncol + cc;
      for (int64_t ci = 0; ci < c; ++ci)
        for (int64_t co = 0; co < cout; ++co) {
          const float v = dwsum[ci * KC + k * cout + co];
          for (int64_t ky = t.row_lo[rc]; ky < t.row_hi[rc]; ++ky)
            for (int64_t kx = t.col_lo[cc]; kx < t.col_hi[cc]; ++kx) dw[((co * c + ci) * kh + ky) * kw + kx] += v;
        }
    }
}

namespace {

int64_t numel4(const int64_t* s) { return s[0] * s[1] * s[2] * s[3]; }

void broadcast_conv_forward(const DecoderStage& s, const DecoderLayer& L, float* y, float* conv_pos, Workspace& ws,
                            size_t slot, int nt) {
  const int64_t n = s.n, c = s.c, cout = L.out[3], oh = L.out[1], ow = L.out[2], QC = oh * ow * cout;
  nhwc_conv2d_forward(pos_geom(L), cout, s.pos, L.w, L.b, Act::Linear, conv_pos, nt);
  const TapClasses t = tap_classes(L);
  const int64_t ncls = t.count(), KC = ncls * cout;
  float* wsum = ws.buf(slot, static_cast<size_t>(c * KC));
  float* zw = ws.buf(slot + 1, static_cast<size_t>(n * KC));
  class_weight_sums(L, t, wsum);
  GemmCall g{false, false, n, KC, c, s.z, c, wsum, KC, zw, KC, false};
  sgemm(g, nt);
  const float* cp = conv_pos;
  parallel_region(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, n))), [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(n, tid, ntt, i0, i1);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox) {
          const int64_t q = oy * ow + ox;
          const float* zc = zw + i * KC + (t.row_of[oy] * t.ncol + t.col_of[ox]) * cout;
          float* yq = y + i * QC + q * cout;
          const float* pq = cp + q * cout;
          for (int64_t co = 0; co < cout; ++co) yq[co] = zc[co] + pq[co];
        }
    gemm_kernel().bias_act_rows(y + i0 * QC, (i1 - i0) * oh * ow, cout, nullptr, static_cast<int>(L.act));
  });
}

// dy (in place) becomes dy ⊙ act'(pre-activation), from the post-activation y.
void act_grad_inplace(float* dy, const float* y, int64_t count, Act act, int nt) {
  if (act == Act::Linear) return;
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(count, tid, ntt, i0, i1);
    if (act == Act::Relu) {
      for (int64_t i = i0; i < i1; ++i) dy[i] = y[i] > 0.f ? dy[i] : 0.f;
    } else {
      for (int64_t i = i0; i < i1; ++i) dy[i] = y[i] > 0.f ? dy[i] : dy[i] * (y[i] + 1.f);
    }
  });
}

void broadcast_conv_backward(const DecoderStage& s, const DecoderLayer& L, const float* y, float* G, float* dz,
                             float* dpos, float* dw, float* db, float* gs, Workspace& ws, size_t slot, int nt) {
  const int64_t n = s.n, c = s.c, cout = L.out[3], oh = L.out[1], ow = L.out[2], QC = oh * ow * cout;
  act_grad_inplace(G, y, n * QC, L.act, nt);
  const TapClasses t = tap_classes(L);
  const int64_t ncls = t.count(), KC = ncls * cout;
  // per slot and class, the gradient summed over the class's cells
  float* gcls = ws.buf(slot + 2, static_cast<size_t>(n * KC));
  parallel_region(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, n))), [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(n, tid, ntt, i0, i1);
    for (int64_t i = i0; i < i1; ++i) {
      float* gi = gcls + i * KC;
      std::memset(gi, 0, sizeof(float) * KC);
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox) {
          float* dst = gi + (t.row_of[oy] * t.ncol + t.col_of[ox]) * cout;
          const float* src = G + i * QC + (oy * ow + ox) * cout;
          for (int64_t co = 0; co < cout; ++co) dst[co] += src[co];
        }
    }
  });
  const float* wsum = ws.buf(slot, static_cast<size_t>(c * KC));  // from the forward pass of this call
  if (dz) {
    GemmCall g{false, true, n, c, KC, gcls, KC, wsum, KC, dz, c, false};
    sgemm(g, nt);
  }
  if (!dw && !db && !dpos) return;
  // the shared part (conv of pos, bias) sees the gradient summed over slots
  std::memset(gs, 0, sizeof(float) * QC);
  parallel_region(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, QC / 4096 + 1))), [&](int tid, int ntt) {
    int64_t j0, j1;
    split_range(QC, tid, ntt, j0, j1);
    for (int64_t i = 0; i < n; ++i) {
      const float* gi = G + i * QC;
      for (int64_t j = j0; j < j1; ++j) gs[j] += gi[j];
    }
  });
  nhwc_conv2d_backward(pos_geom(L), cout, s.pos, L.w, nullptr, gs, Act::Linear, dpos, dw, db, nt);
  if (dw) {
    // dWsum = zᵀ · gcls [c, classes·cout], then back to every tap of each class
    float* dws = ws.buf(slot + 3, static_cast<size_t>(c * KC));
    GemmCall g{true, false, c, KC, n, s.z, c, gcls, KC, dws, KC, false};
    sgemm(g, nt);
    add_class_weight_grads(L, t, dws, dw);
  }
}

}  // namespace

std::string decoder_plan(DecoderStage& s) {
  std::ostringstream e;
  if (s.layers.empty()) return "the decoder has no layers";
  int64_t cur[4] = {s.n, s.gh, s.gw, s.c};
  for (size_t i = 0; i < s.layers.size(); ++i) {
    DecoderLayer& L = s.layers[i];
    std::copy(cur, cur + 4, L.in);
    const int64_t* w = L.w_shape;
    const bool first = i == 0;
    auto shape = [](const int64_t* v) {
      std::ostringstream o;
      o << '[' << v[0] << ',' << v[1] << ',' << v[2] << ',' << v[3] << ']';
      return o.str();
    };
    switch (L.kind) {
      case DecoderLayerKind::SpatialBroadcast:
        if (!first) return "layers[" + std::to_string(i) + "]: a spatial broadcast can only be the first layer";
        std::copy(cur, cur + 4, L.out);
        break;
      case DecoderLayerKind::BroadcastConv:
      case DecoderLayerKind::Conv: {
        if ((L.kind == DecoderLayerKind::BroadcastConv) != first)
          return "layers[" + std::to_string(i) + "]: the broadcast convolution must be the first layer, and only it";
        if (w[1] != cur[3]) {
          e << "layers[" << i << "]: weight " << shape(w) << " expects " << w[1] << " input channels, the input "
            << shape(cur) << " has " << cur[3];
          return e.str();
        }
        if (L.kind == DecoderLayerKind::BroadcastConv && L.stride != 1)
          return "layers[0]: the broadcast convolution takes stride 1";
        const int64_t hp = cur[1] + 2 * L.pad - w[2], wp = cur[2] + 2 * L.pad - w[3];
        if (hp < 0 || wp < 0) {
          e << "layers[" << i << "]: the " << w[2] << "x" << w[3] << " kernel (padding " << L.pad
            << ") does not fit the input " << shape(cur);
          return e.str();
        }
        const int64_t out[4] = {cur[0], hp / L.stride + 1, wp / L.stride + 1, w[0]};
        std::copy(out, out + 4, L.out);
        break;
      }
      case DecoderLayerKind::ConvTranspose: {
        if (first) return "layers[0]: a transposed convolution needs a spatial broadcast before it";
        if (w[0] != cur[3]) {
          e << "layers[" << i << "]: weight " << shape(w) << " expects " << w[0] << " input channels, the input "
            << shape(cur) << " has " << cur[3];
          return e.str();
        }
        if (L.out_pad >= L.stride) return "layers[" + std::to_string(i) + "]: output padding must be below the stride";
        const int64_t H = (cur[1] - 1) * L.stride - 2 * L.pad + w[2] + L.out_pad;
        const int64_t W = (cur[2] - 1) * L.stride - 2 * L.pad + w[3] + L.out_pad;
        if (H < 1 || W < 1 || H + 2 * L.pad < w[2] || W + 2 * L.pad < w[3])
          return "layers[" + std::to_string(i) + "]: the padding leaves no output for the input " + shape(cur);
        const int64_t out[4] = {cur[0], H, W, w[1]};
        std::copy(out, out + 4, L.out);
        break;
      }
    }
    std::copy(L.out, L.out + 4, cur);
  }
  const ImageNllShape& k = s.lik;
  if (cur[0] != k.B * k.K || cur[1] != k.H || cur[2] != k.W || cur[3] != k.C + 1) {
    e << "the decoder's output [" << cur[0] << ',' << cur[1] << ',' << cur[2] << ',' << cur[3] << "] does not match "
      << k.B << " images x " << k.K << " slots of " << k.H << "x" << k.W << " with " << k.C << "+1 channels";
    return e.str();
  }
  return "";
}

void decoder_stage(const DecoderStage& s, const DecoderStageOut& o, Workspace& ws, int nt) {
  const size_t nl = s.layers.size();
  const bool want_dz = o.dz != nullptr;
  bool want_params = o.dpos != nullptr;
  for (size_t i = 0; i < nl; ++i) want_params = want_params || (i < o.dw.size() && o.dw[i]) || (i < o.db.size() && o.db[i]);
  const bool backward = want_dz || want_params;
  // workspace slots: 0..nl-1 the layers' outputs, then two gradient maps (ping-pong) and the
  // broadcast layer's small buffers
  const size_t kGradA = nl, kGradB = nl + 1, kPosConv = nl + 2, kGradSum = nl + 3, kBroadcast = nl + 4;  // +0..3

  // forward; every layer's output is kept for the backward pass
  std::vector<float*> act(nl);
  for (size_t i = 0; i < nl; ++i) {
    const DecoderLayer& L = s.layers[i];
    float* y = act[i] = ws.buf(i, static_cast<size_t>(numel4(L.out)));
    const float* x = i ? act[i - 1] : nullptr;
    switch (L.kind) {
      case DecoderLayerKind::SpatialBroadcast: {
        const int64_t cells = s.gh * s.gw, c = s.c;
        parallel_region(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, s.n))), [&](int tid, int ntt) {
          int64_t i0, i1;
          split_range(s.n, tid, ntt, i0, i1);
          for (int64_t a = i0; a < i1; ++a)
            for (int64_t q = 0; q < cells; ++q)
              for (int64_t j = 0; j < c; ++j) y[(a * cells + q) * c + j] = s.z[a * c + j] + s.pos[q * c + j];
        });
        break;
      }
      case DecoderLayerKind::BroadcastConv:
        broadcast_conv_forward(s, L, y, ws.buf(kPosConv, static_cast<size_t>(L.out[1] * L.out[2] * L.out[3])), ws, kBroadcast, nt);
        break;
      case DecoderLayerKind::Conv:
        nhwc_conv2d_forward(layer_geom(L), L.out[3], x, L.w, L.b, L.act, y, nt, s.precision);
        break;
      case DecoderLayerKind::ConvTranspose:
        nhwc_conv_transpose2d_forward(layer_geom(L), L.in[3], x, L.w, L.b, L.act, y, nt);
        break;
    }
  }

  float* dcur = backward ? ws.buf(kGradA, static_cast<size_t>(numel4(s.layers[nl - 1].out))) : nullptr;
  size_t dslot = kGradA;
  image_nll(s.lik, act[nl - 1], s.target, s.log_var, s.gmm, o.nll, dcur, o.means, o.log_masks, nt);
  if (!backward) return;

  for (size_t i = nl; i-- > 0;) {
    const DecoderLayer& L = s.layers[i];
    float* dw = i < o.dw.size() ? o.dw[i] : nullptr;
    float* db = i < o.db.size() ? o.db[i] : nullptr;
    const float* y = act[i];
    switch (L.kind) {
      case DecoderLayerKind::SpatialBroadcast: {
        const int64_t cells = s.gh * s.gw, c = s.c;
        const float* g = dcur;
        if (o.dz)
          for (int64_t a = 0; a < s.n; ++a)
            for (int64_t j = 0; j < c; ++j) {
              double t = 0;
              for (int64_t q = 0; q < cells; ++q) t += g[(a * cells + q) * c + j];
              o.dz[a * c + j] = static_cast<float>(t);
            }
        if (o.dpos)
          for (int64_t q = 0; q < cells; ++q)
            for (int64_t j = 0; j < c; ++j) {
              double t = 0;
              for (int64_t a = 0; a < s.n; ++a) t += g[(a * cells + q) * c + j];
              o.dpos[q * c + j] = static_cast<float>(t);
            }
        break;
      }
      case DecoderLayerKind::BroadcastConv: {
        const size_t QC = static_cast<size_t>(L.out[1] * L.out[2] * L.out[3]);
        float* gs = ws.buf(kGradSum, QC);
        broadcast_conv_backward(s, L, y, dcur, o.dz, o.dpos, dw, db, gs, ws, kBroadcast, nt);
        break;
      }
      case DecoderLayerKind::Conv:
      case DecoderLayerKind::ConvTranspose: {
        // dcur is ours: take the activation's derivative in place, then a linear backward
        act_grad_inplace(dcur, y, numel4(L.out), L.act, nt);
        dslot = dslot == kGradA ? kGradB : kGradA;
        float* dx = ws.buf(dslot, static_cast<size_t>(numel4(L.in)));
        const float* x = act[i - 1];
        if (L.kind == DecoderLayerKind::Conv)
          nhwc_conv2d_backward(layer_geom(L), L.out[3], x, L.w, nullptr, dcur, Act::Linear, dx, dw, db, nt, s.precision);
        else
          nhwc_conv_transpose2d_backward(layer_geom(L), L.in[3], x, L.w, nullptr, dcur, Act::Linear, dx, dw, db, nt);
        dcur = dx;
        break;
      }
    }
  }
}

}  // namespace emorl
