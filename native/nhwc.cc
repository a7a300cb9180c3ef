// NHWC convolutions (see nhwc.h). One parallel region per call; each thread takes whole images
// (so its col2im writes touch only its own maps) and walks their column-matrix rows in chunks of
// ~256 KB: im2col over NHWC rows (kh*kw contiguous runs of C floats), a single-threaded GEMM with
// thread-private packing buffers while the chunk is in cache, and the fused bias/activation.
// Filter and bias gradients are accumulated per thread and summed at the end.
#include "nhwc.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "common.h"
#include "gemm.h"

namespace emorl {
namespace {

// Rows [r0, r1) of the column matrix of g over the image map x, written at cols + (r - r0) * P.
void im2col_rows(const NhwcGeom& g, const float* x, int64_t r0, int64_t r1, float* cols) {
  const int64_t P = g.P(), C = g.C, HoWo = g.Ho * g.Wo;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / HoWo, q = r % HoWo, oy = q / g.Wo, ox = q % g.Wo;
    float* dst = cols + (r - r0) * P;
    const float* xn = x + n * g.H * g.W * C;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.pt + ky;
      if (iy < 0 || iy >= g.H) {
        std::memset(dst + ky * g.kw * C, 0, sizeof(float) * g.kw * C);
        continue;
      }
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ox * g.sw - g.pl + kx;
        float* d = dst + (ky * g.kw + kx) * C;
        if (ix < 0 || ix >= g.W) std::memset(d, 0, sizeof(float) * C);
        else std::memcpy(d, xn + (iy * g.W + ix) * C, sizeof(float) * C);
      }
    }
  }
}

// Rows [r0, r1) of the column matrix written straight into the GEMM's packed-B layout (panels of
// nr columns: cols + (panel * rows + (r - r0)) * nr), for C a multiple of nr, so that each panel
// holds nr channels of one kernel tap: one contiguous run of the image map (or zeros).
void im2col_rows_packed_b(const NhwcGeom& g, const float* x, int64_t r0, int64_t r1, int64_t nr, float* cols) {
  const int64_t C = g.C, HoWo = g.Ho * g.Wo, rows = r1 - r0, blocks = C / nr;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / HoWo, q = r % HoWo, oy = q / g.Wo, ox = q % g.Wo;
    const float* xn = x + n * g.H * g.W * C;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.pt + ky;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ox * g.sw - g.pl + kx;
        const bool inside = iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
        const float* src = inside ? xn + (iy * g.W + ix) * C : nullptr;
        const int64_t panel0 = (ky * g.kw + kx) * blocks;
        for (int64_t b = 0; b < blocks; ++b) {
          float* d = cols + ((panel0 + b) * rows + (r - r0)) * nr;
          if (src) std::memcpy(d, src + b * nr, sizeof(float) * nr);
          else std::memset(d, 0, sizeof(float) * nr);
        }
      }
    }
  }
}

// The adjoint: rows [r0, r1) of columns (at cols + (r - r0) * P) scatter-added into the image map x.
void col2im_rows(const NhwcGeom& g, const float* cols, int64_t r0, int64_t r1, float* x) {
  const int64_t P = g.P(), C = g.C, HoWo = g.Ho * g.Wo;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / HoWo, q = r % HoWo, oy = q / g.Wo, ox = q % g.Wo;
    const float* src = cols + (r - r0) * P;
    float* xn = x + n * g.H * g.W * C;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.pt + ky;
      if (iy < 0 || iy >= g.H) continue;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ox * g.sw - g.pl + kx;
        if (ix < 0 || ix >= g.W) continue;
        float* d = xn + (iy * g.W + ix) * C;
        const float* s = src + (ky * g.kw + kx) * C;
        for (int64_t c = 0; c < C; ++c) d[c] += s[c];
      }
    }
  }
}

inline float act_fwd(float v, Act a) {
  if (a == Act::Relu) return v > 0.f ? v : 0.f;
  if (a == Act::Elu) return v > 0.f ? v : std::expm1(v);
  return v;
}

// y (rows of n) += bias, then the activation, in place.
void bias_act_rows(float* y, int64_t rows, int64_t n, const float* bias, Act act) {
  if (!bias && act == Act::Linear) return;
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * n;
    if (bias)
      for (int64_t j = 0; j < n; ++j) yr[j] += bias[j];
    if (act != Act::Linear)
      for (int64_t j = 0; j < n; ++j) yr[j] = act_fwd(yr[j], act);
  }
}

// g[i] = dy[i] * act'(pre-activation), from the activation's output y, for `count` elements.
void act_grad(const float* dy, const float* y, int64_t count, Act act, float* g) {
  if (act == Act::Linear) {
    std::memcpy(g, dy, sizeof(float) * count);
  } else if (act == Act::Relu) {
    for (int64_t i = 0; i < count; ++i) g[i] = y[i] > 0.f ? dy[i] : 0.f;
  } else {
    for (int64_t i = 0; i < count; ++i) g[i] = y[i] > 0.f ? dy[i] : dy[i] * (y[i] + 1.f);
  }
}

// act_grad over `count` elements on up to `nthreads` threads.
void act_grad_parallel(const float* dy, const float* y, int64_t count, Act act, float* g, int nthreads) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, count / 65536 + 1)));
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(count, tid, ntt, i0, i1);
    act_grad(dy + i0, y ? y + i0 : nullptr, i1 - i0, act, g + i0);
  });
}

// Column sums of G [rows, n] added into s (double).
void add_col_sums(const float* G, int64_t rows, int64_t n, double* s) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = G + r * n;
    for (int64_t j = 0; j < n; ++j) s[j] += gr[j];
  }
}

GemmCall call(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
              int64_t ldb, float* C, int64_t ldc, bool acc) {
  GemmCall c{ta, tb, M, N, K, A, lda, B, ldb, C, ldc, acc};
  return c;
}

// Per-thread scratch: the GEMM's packing buffers and a few work arrays, allocated before the
// parallel region (the region's body must not throw).
struct Scratch {
  AlignedBuf packA, packB, cols, g, acc;
  AlignedBuf pairsA, pairsB;  // bf16 operands (uint32 pairs in float-sized slots)
  std::vector<double> dsum;
  uint32_t* pa() { return reinterpret_cast<uint32_t*>(pairsA.data()); }
  uint32_t* pb() { return reinterpret_cast<uint32_t*>(pairsB.data()); }
};

std::vector<Scratch> scratch(int nt, int64_t cols, int64_t g, int64_t acc, int64_t dsum) {
  std::vector<Scratch> s(static_cast<size_t>(nt));
  const GemmKernel& k = gemm_kernel();
  for (auto& t : s) {
    t.packA.reset(static_cast<size_t>(k.pack_a_floats));
    t.packB.reset(static_cast<size_t>(k.pack_b_floats));
    if (cols) t.cols.reset(static_cast<size_t>(cols));
    if (g) t.g.reset(static_cast<size_t>(g));
    if (acc) t.acc.reset(static_cast<size_t>(acc), true);
    t.dsum.assign(static_cast<size_t>(dsum), 0.0);
  }
  return s;
}

// The conv weights w [Co, C, kh, kw] as the GEMM's [P, Co] matrix (row (ky·kw + kx)·C + ci).
AlignedBuf weight_matrix(const NhwcGeom& g, int64_t Co, const float* w) {
  const int64_t P = g.P(), KK = g.kh * g.kw, C = g.C;
  AlignedBuf wm(static_cast<size_t>(P * Co));
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t ci = 0; ci < C; ++ci)
      for (int64_t k = 0; k < KK; ++k) wm.data()[(k * C + ci) * Co + co] = w[(co * C + ci) * KK + k];
  return wm;
}

// op(B) [K x N] packed once for GemmCall::Bpacked (the weights of every chunk's product).
AlignedBuf prepack_b(bool tb, int64_t K, int64_t N, const float* B, int64_t ldb) {
  const GemmKernel& k = gemm_kernel();
  AlignedBuf out(static_cast<size_t>(((N + k.nr - 1) / k.nr) * k.nr * K));
  k.pack_b_full(tb, K, N, B, ldb, out.data());
  return out;
}

// Threads over whole images (each thread writes only its own images' maps; no barriers).
int image_threads(int nthreads, int64_t N) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, N))); }

// Rows per chunk: ~kChunkFloats of columns (512 KB: stays in L2), at least one row.
constexpr int64_t kChunkFloats = int64_t(1) << 17;
int64_t chunk_rows(int64_t width) { return std::max<int64_t>(1, kChunkFloats / std::max<int64_t>(1, width)); }

}  // namespace

namespace {

// The forward product in bf16 as an implicit GEMM: each image is converted once into a zero-padded
// map of channel pairs [Hp, Wp, C2] (an odd C gets a zero channel), and the register tiles read
// their rows straight from it, tap by tap (bf16.h conv_tile): no column matrix.
void conv2d_forward_bf16(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act,
                         float* y, int nthreads) {
  const int64_t KK = g.kh * g.kw, C = g.C, Cp = C + (C & 1), C2 = Cp / 2, HoWo = g.Ho * g.Wo;
  const int64_t Hp = std::max(g.H + g.pt, (g.Ho - 1) * g.sh + g.kh), Wp = std::max(g.W + g.pl, (g.Wo - 1) * g.sw + g.kw);
  AlignedBuf wm(static_cast<size_t>(KK * Cp * Co), true);
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t ci = 0; ci < C; ++ci)
      for (int64_t k = 0; k < KK; ++k) wm.data()[(k * Cp + ci) * Co + co] = w[(co * C + ci) * KK + k];
  AlignedBuf wpb(static_cast<size_t>(bf16_packed_b_size(KK * Cp, Co)));
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(wpb.data());
  bf16_pack_b(KK * Cp, Co, wm.data(), Co, reinterpret_cast<uint32_t*>(wpb.data()));
  std::vector<int64_t> tap_off(static_cast<size_t>(KK));
  for (int64_t ky = 0; ky < g.kh; ++ky)
    for (int64_t kx = 0; kx < g.kw; ++kx) tap_off[static_cast<size_t>(ky * g.kw + kx)] = (ky * Wp + kx) * C2;
  const int nt = image_threads(nthreads, g.N);
  std::vector<Scratch> sc(static_cast<size_t>(nt));
  for (auto& t : sc) t.pairsA.reset(static_cast<size_t>(Hp * Wp * C2), true);  // borders stay zero
  const Bf16Kernel& k = bf16_kernel();
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    uint32_t* xp = sc[tid].pa();
    const uint32_t* rows[kBf16MR];
    for (int64_t n = i0; n < i1; ++n) {
      for (int64_t iy = 0; iy < g.H; ++iy) {
        const float* src = x + (n * g.H + iy) * g.W * C;
        uint32_t* dst = xp + ((iy + g.pt) * Wp + g.pl) * C2;
        if (C % 2 == 0) k.to_pairs(src, g.W * C, dst);
        else
          for (int64_t ix = 0; ix < g.W; ++ix) k.to_pairs(src + ix * C, C, dst + ix * C2);
      }
      float* yn = y + n * HoWo * Co;
      for (int64_t r = 0; r < HoWo; r += kBf16MR) {
        const int64_t mr = std::min<int64_t>(kBf16MR, HoWo - r);
        for (int64_t i = 0; i < kBf16MR; ++i) {
          const int64_t q = r + std::min(i, mr - 1), oy = q / g.Wo, ox = q % g.Wo;
          rows[i] = xp + (oy * g.sh * Wp + ox * g.sw) * C2;
        }
        for (int64_t jr = 0; jr < Co; jr += kBf16NR)
          k.conv_tile(rows, KK, tap_off.data(), C2, wp + (jr / kBf16NR) * KK * C2 * kBf16NR, yn + r * Co + jr, Co, mr,
                      std::min<int64_t>(kBf16NR, Co - jr));
      }
      bias_act_rows(yn, HoWo, Co, bias, act);
    }
  });
}

// The filter (and bias) gradient in bf16 for C a multiple of kBf16NR, as an implicit GEMM over
// the pixels: dWᵀ [Co, P] = Σ_r G[r, ·]ᵀ · cols[r, ·], k running over pairs of neighbouring
// output pixels of one output row (an odd row's last one pairs with a zero gradient). Per image,
// the padded input map [Hp·Wp (+ sw), C] becomes X2[q, c] = pair(x[q, c], x[q + sw, c]): the
// inputs of such a pixel pair at any tap, so a row of B is C contiguous pairs of X2, found
// through a per-pair offset table. dy·act' is G.
void conv2d_filter_grad_bf16(const NhwcGeom& g, int64_t Co, const float* x, const float* G, float* dw, float* db,
                             int nthreads) {
  const int64_t KK = g.kh * g.kw, C = g.C, P = KK * C, HoWo = g.Ho * g.Wo;
  const int64_t Hp = std::max(g.H + g.pt, (g.Ho - 1) * g.sh + g.kh), Wp = std::max(g.W + g.pl, (g.Wo - 1) * g.sw + g.kw);
  const int64_t Wo2 = (g.Wo + 1) / 2, K2 = g.Ho * Wo2, cells = Hp * Wp;
  std::vector<int64_t> b_row(static_cast<size_t>(K2));
  for (int64_t oy = 0; oy < g.Ho; ++oy)
    for (int64_t j = 0; j < Wo2; ++j) b_row[static_cast<size_t>(oy * Wo2 + j)] = (oy * g.sh * Wp + 2 * j * g.sw) * C;
  const int nt = image_threads(nthreads, g.N);
  std::vector<Scratch> sc(static_cast<size_t>(nt));
  for (auto& t : sc) {
    t.cols.reset(static_cast<size_t>((cells + g.sw) * C), true);  // the padded map: borders stay zero
    t.pairsB.reset(static_cast<size_t>(cells * C));               // X2
    t.pairsA.reset(static_cast<size_t>(K2 * Co + kBf16MR));       // G pairs [K2, Co] (+ a tile's overrun)
    t.acc.reset(static_cast<size_t>(Co * P), true);
    if (db) t.dsum.assign(static_cast<size_t>(Co), 0.0);
  }
  const Bf16Kernel& k = bf16_kernel();
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    Scratch& s = sc[tid];
    float* xp = s.cols.data();
    uint32_t *x2 = s.pb(), *ga = s.pa();
    for (int64_t n = i0; n < i1; ++n) {
      for (int64_t iy = 0; iy < g.H; ++iy)
        std::memcpy(xp + ((iy + g.pt) * Wp + g.pl) * C, x + (n * g.H + iy) * g.W * C, sizeof(float) * g.W * C);
      k.interleave(xp, xp + g.sw * C, cells * C, x2);
      const float* Gn = G + n * HoWo * Co;
      for (int64_t oy = 0; oy < g.Ho; ++oy)
        for (int64_t j = 0; j < Wo2; ++j) {
          const float* even = Gn + (oy * g.Wo + 2 * j) * Co;
          k.interleave(even, 2 * j + 1 < g.Wo ? even + Co : nullptr, Co, ga + (oy * Wo2 + j) * Co);
        }
      if (db) add_col_sums(Gn, HoWo, Co, s.dsum.data());
      for (int64_t ky = 0; ky < g.kh; ++ky)
        for (int64_t kx = 0; kx < g.kw; ++kx)
          for (int64_t cb = 0; cb < C; cb += kBf16NR) {
            const int64_t p0 = (ky * g.kw + kx) * C + cb;
            for (int64_t ir = 0; ir < Co; ir += kBf16MR)
              k.gather_tile(K2, ga + ir, Co, x2, b_row.data(), (ky * Wp + kx) * C + cb, s.acc.data() + ir * P + p0, P,
                            std::min<int64_t>(kBf16MR, Co - ir), kBf16NR);
          }
    }
  });
  if (db)
    for (int64_t j = 0; j < Co; ++j) {
      double t = 0;
      for (auto& s : sc) t += s.dsum[static_cast<size_t>(j)];
      db[j] = static_cast<float>(t);
    }
  float* acc = sc[0].acc.data();
  for (size_t t = 1; t < sc.size(); ++t)
    for (int64_t i = 0; i < P * Co; ++i) acc[i] += sc[t].acc.data()[i];
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t ci = 0; ci < C; ++ci)
      for (int64_t kk = 0; kk < KK; ++kk) dw[(co * C + ci) * KK + kk] = acc[co * P + kk * C + ci];
}

}  // namespace

void nhwc_conv2d_forward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act,
                         float* y, int nthreads, Precision prec) {
  const int64_t P = g.P(), HoWo = g.Ho * g.Wo;
  if (g.M() == 0 || Co == 0) return;
  if (prec == Precision::Bf16 && Co >= 16) return conv2d_forward_bf16(g, Co, x, w, bias, act, y, nthreads);
  const AlignedBuf wm = weight_matrix(g, Co, w);
  const AlignedBuf wp = prepack_b(false, P, Co, wm.data(), Co);
  const int nt = image_threads(nthreads, g.N);
  const int64_t R = chunk_rows(P);
  auto sc = scratch(nt, R * P, 0, 0, 0);
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    Scratch& s = sc[tid];
    for (int64_t r0 = i0 * HoWo; r0 < i1 * HoWo; r0 += R) {
      const int64_t r1 = std::min(i1 * HoWo, r0 + R);
      im2col_rows(g, x, r0, r1, s.cols.data());
      GemmCall c = call(false, false, r1 - r0, Co, P, s.cols.data(), P, nullptr, Co, y + r0 * Co, Co, false);
      c.Bpacked = wp.data();
      sgemm_serial(c, s.packA.data(), s.packB.data());
      bias_act_rows(y + r0 * Co, r1 - r0, Co, bias, act);
    }
  });
}

void nhwc_conv2d_backward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* y,
                          const float* dy, Act act, float* dx, float* dw, float* db, int nthreads, Precision prec) {
  const int64_t P = g.P(), KK = g.kh * g.kw, C = g.C, HoWo = g.Ho * g.Wo, HWC = g.H * g.W * C;
  const bool params = dw || db;
  // Stride 1: the input gradient is itself a stride-1 convolution of dy·act' with the flipped,
  // transposed kernel and padding k−1−p, which runs as the forward pass does (im2col rows straight
  // into a narrow GEMM), instead of a GEMM into columns and a col2im scatter.
  // (Only for outputs of at least 16 channels: a narrower one, e.g. an RGB input's gradient, would
  // fill a fraction of the register tile's columns; the column path suits it better.)
  if (dx && g.sh == 1 && g.sw == 1 && g.pt <= g.kh - 1 && g.pl <= g.kw - 1 && Co > 0 && g.M() > 0 && C >= 16) {
    // dy·act' (a copy only when there is an activation)
    AlignedBuf G(act == Act::Linear ? 0 : static_cast<size_t>(g.M() * Co));
    if (act != Act::Linear) act_grad_parallel(dy, y, g.M() * Co, act, G.data(), nthreads);
    const float* Gd = act == Act::Linear ? dy : G.data();
    AlignedBuf wf(static_cast<size_t>(C * Co * KK));
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t ci = 0; ci < C; ++ci)
        for (int64_t ky = 0; ky < g.kh; ++ky)
          for (int64_t kx = 0; kx < g.kw; ++kx)
            wf.data()[((ci * Co + co) * g.kh + (g.kh - 1 - ky)) * g.kw + (g.kw - 1 - kx)] = w[((co * C + ci) * g.kh + ky) * g.kw + kx];
    NhwcGeom gt{};
    gt.N = g.N; gt.H = g.Ho; gt.W = g.Wo; gt.C = Co; gt.Ho = g.H; gt.Wo = g.W;
    gt.kh = g.kh; gt.kw = g.kw; gt.sh = gt.sw = 1; gt.pt = g.kh - 1 - g.pt; gt.pl = g.kw - 1 - g.pl;
    nhwc_conv2d_forward(gt, C, Gd, wf.data(), nullptr, Act::Linear, dx, nthreads, prec);
    if (params) nhwc_conv2d_backward(g, Co, x, w, nullptr, Gd, Act::Linear, nullptr, dw, db, nthreads, prec);
    return;
  }
  if (dw && prec == Precision::Bf16 && C % kBf16NR == 0 && Co > 0 && g.M() > 0) {
    if (dx) nhwc_conv2d_backward(g, Co, x, w, y, dy, act, dx, nullptr, nullptr, nthreads, prec);  // (strided: fp32)
    AlignedBuf G(act == Act::Linear ? 0 : static_cast<size_t>(g.M() * Co));
    if (act != Act::Linear) act_grad_parallel(dy, y, g.M() * Co, act, G.data(), nthreads);
    conv2d_filter_grad_bf16(g, Co, x, act == Act::Linear ? dy : G.data(), dw, db, nthreads);
    return;
  }
  const AlignedBuf wm = weight_matrix(g, Co, w);
  // wmᵀ packed once for every chunk's input-gradient product
  const AlignedBuf wtp = dx ? prepack_b(true, Co, P, wm.data(), Co) : AlignedBuf();
  const int nt = image_threads(nthreads, g.N);
  const int64_t R = chunk_rows(P);
  auto sc = scratch(nt, R * P, R * Co, dw ? P * Co : 0, db ? Co : 0);
  // The filter gradient as dWᵀ [Co, P] = Gᵀ · cols with cols written straight into packed-B panels
  // (no packing pass over the largest operand) when the channels fill whole panels; in bf16, the
  // same product from packed pairs (pairs along the rows, i.e. along the product's k).
  const int64_t NR = gemm_kernel().nr;
  const bool bf16_dw = dw && prec == Precision::Bf16;
  const bool packed_dw = dw && !bf16_dw && C % NR == 0;
  if (bf16_dw)
    for (auto& t : sc) {
      t.pairsA.reset(static_cast<size_t>(bf16_packed_a_size(Co, R)));
      t.pairsB.reset(static_cast<size_t>(bf16_packed_b_size(R, P)));
    }
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    Scratch& s = sc[tid];
    if (dx) std::memset(dx + i0 * HWC, 0, sizeof(float) * (i1 - i0) * HWC);
    if (Co == 0) return;
    for (int64_t r0 = i0 * HoWo; r0 < i1 * HoWo; r0 += R) {
      const int64_t r1 = std::min(i1 * HoWo, r0 + R), rows = r1 - r0;
      act_grad(dy + r0 * Co, y ? y + r0 * Co : nullptr, rows * Co, act, s.g.data());
      if (db) add_col_sums(s.g.data(), rows, Co, s.dsum.data());
      if (dx) {
        GemmCall c = call(false, true, rows, P, Co, s.g.data(), Co, nullptr, Co, s.cols.data(), P, false);
        c.Bpacked = wtp.data();
        sgemm_serial(c, s.packA.data(), s.packB.data());
        col2im_rows(g, s.cols.data(), r0, r1, dx);
      }
      if (bf16_dw) {
        im2col_rows(g, x, r0, r1, s.cols.data());
        bf16_pack_b(rows, P, s.cols.data(), P, s.pb());
        bf16_pack_a_transposed(Co, rows, s.g.data(), Co, s.pa());
        Bf16Gemm c;
        c.M = Co;
        c.N = P;
        c.K2 = bf16_pairs(rows);
        c.A = s.pa();
        c.a_packed = true;
        c.B = s.pb();
        c.C = s.acc.data();
        c.ldc = P;
        c.accumulate = true;
        bf16_gemm_serial(c);
      } else if (packed_dw) {
        im2col_rows_packed_b(g, x, r0, r1, NR, s.cols.data());
        GemmCall c = call(true, false, Co, P, rows, s.g.data(), Co, nullptr, P, s.acc.data(), P, true);
        c.Bpacked = s.cols.data();
        sgemm_serial(c, s.packA.data(), s.packB.data());
      } else if (dw) {
        im2col_rows(g, x, r0, r1, s.cols.data());
        sgemm_serial(call(true, false, P, Co, rows, s.cols.data(), P, s.g.data(), Co, s.acc.data(), Co, true),
                     s.packA.data(), s.packB.data());
      }
    }
  });
  if (!params) return;
  if (db) {
    for (int64_t j = 0; j < Co; ++j) {
      double t = 0;
      for (auto& s : sc) t += s.dsum[j];
      db[j] = static_cast<float>(t);
    }
  }
  if (dw) {
    float* acc = sc[0].acc.data();
    for (size_t t = 1; t < sc.size(); ++t)
      for (int64_t i = 0; i < P * Co; ++i) acc[i] += sc[t].acc.data()[i];
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t ci = 0; ci < C; ++ci)
        for (int64_t k = 0; k < KK; ++k)
          dw[(co * C + ci) * KK + k] = packed_dw || bf16_dw ? acc[co * P + k * C + ci] : acc[(k * C + ci) * Co + co];
  }
}

void nhwc_conv_transpose2d_forward(const NhwcGeom& g, int64_t Ci, const float* x, const float* w, const float* bias,
                                   Act act, float* y, int nthreads) {
  const int64_t Co = g.C, KK = g.kh * g.kw, Q = g.P(), HoWo = g.Ho * g.Wo, HW = g.H * g.W;
  if (g.N == 0) return;
  AlignedBuf tm(static_cast<size_t>(Ci * Q));
  for (int64_t ci = 0; ci < Ci; ++ci)
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t k = 0; k < KK; ++k) tm.data()[ci * Q + k * Co + co] = w[(ci * Co + co) * KK + k];
  const int nt = image_threads(nthreads, g.N);
  const int64_t R = chunk_rows(Q);
  auto sc = scratch(nt, R * Q, 0, 0, 0);
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    Scratch& s = sc[tid];
    std::memset(y + i0 * HW * Co, 0, sizeof(float) * (i1 - i0) * HW * Co);
    if (Ci > 0 && Q > 0)
      for (int64_t r0 = i0 * HoWo; r0 < i1 * HoWo; r0 += R) {
        const int64_t r1 = std::min(i1 * HoWo, r0 + R);
        sgemm_serial(call(false, false, r1 - r0, Q, Ci, x + r0 * Ci, Ci, tm.data(), Q, s.cols.data(), Q, false),
                     s.packA.data(), s.packB.data());
        col2im_rows(g, s.cols.data(), r0, r1, y);
      }
    bias_act_rows(y + i0 * HW * Co, (i1 - i0) * HW, Co, bias, act);
  });
}

void nhwc_conv_transpose2d_backward(const NhwcGeom& g, int64_t Ci, const float* x, const float* w, const float* y,
                                    const float* dy, Act act, float* dx, float* dw, float* db, int nthreads) {
  const int64_t Co = g.C, KK = g.kh * g.kw, Q = g.P(), HoWo = g.Ho * g.Wo, HW = g.H * g.W;
  AlignedBuf tm(static_cast<size_t>(Ci * Q));
  for (int64_t ci = 0; ci < Ci; ++ci)
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t k = 0; k < KK; ++k) tm.data()[ci * Q + k * Co + co] = w[(ci * Co + co) * KK + k];
  // dy * act' over the whole output map (each thread fills its own images first)
  AlignedBuf G(static_cast<size_t>(g.N * HW * Co));
  const int nt = image_threads(nthreads, g.N);
  const int64_t R = chunk_rows(Q);
  auto sc = scratch(nt, R * Q, 0, dw ? Ci * Q : 0, db ? Co : 0);
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    Scratch& s = sc[tid];
    float* Gi = G.data() + i0 * HW * Co;
    act_grad(dy + i0 * HW * Co, y ? y + i0 * HW * Co : nullptr, (i1 - i0) * HW * Co, act, Gi);
    if (db) add_col_sums(Gi, (i1 - i0) * HW, Co, s.dsum.data());
    if (Q == 0 || Ci == 0) {
      if (dx) std::memset(dx + i0 * HoWo * Ci, 0, sizeof(float) * (i1 - i0) * HoWo * Ci);
      return;
    }
    for (int64_t r0 = i0 * HoWo; r0 < i1 * HoWo; r0 += R) {
      const int64_t r1 = std::min(i1 * HoWo, r0 + R), rows = r1 - r0;
      im2col_rows(g, G.data(), r0, r1, s.cols.data());
      if (dx)
        sgemm_serial(call(false, true, rows, Ci, Q, s.cols.data(), Q, tm.data(), Q, dx + r0 * Ci, Ci, false),
                     s.packA.data(), s.packB.data());
      if (dw)
        sgemm_serial(call(true, false, Ci, Q, rows, x + r0 * Ci, Ci, s.cols.data(), Q, s.acc.data(), Q, true),
                     s.packA.data(), s.packB.data());
    }
  });
  if (db) {
    for (int64_t j = 0; j < Co; ++j) {
      double t = 0;
      for (auto& s : sc) t += s.dsum[j];
      db[j] = static_cast<float>(t);
    }
  }
  if (dw) {
    float* acc = sc[0].acc.data();
    for (size_t t = 1; t < sc.size(); ++t)
      for (int64_t i = 0; i < Ci * Q; ++i) acc[i] += sc[t].acc.data()[i];
    for (int64_t ci = 0; ci < Ci; ++ci)
      for (int64_t co = 0; co < Co; ++co)
        for (int64_t k = 0; k < KK; ++k) dw[(ci * Co + co) * KK + k] = acc[ci * Q + k * Co + co];
  }
}

}  // namespace emorl
