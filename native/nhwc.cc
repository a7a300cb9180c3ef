// NHWC convolutions (see nhwc.h). One parallel region per call; each thread takes whole images.
// The forward pass, the stride-1 input gradient (a forward convolution) and, when the channels
// fill whole register tiles, the filter gradient run as implicit GEMMs on a zero-padded copy of
// each image's map (no column matrix; see PaddedGeom). The other products walk column-matrix rows
// in chunks of ~512 KB: im2col over NHWC rows (kh*kw contiguous runs of C floats), a
// single-threaded GEMM with thread-private packing buffers while the chunk is in cache, col2im.
// Filter and bias gradients are accumulated per thread and summed at the end.
#include "nhwc.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
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

// y (rows of n) += bias, then the activation, in place (vectorised per ISA).
void bias_act_rows(float* y, int64_t rows, int64_t n, const float* bias, Act act) {
  gemm_kernel().bias_act_rows(y, rows, n, bias, static_cast<int>(act));
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

// dy·act' for `count` elements: dy itself for a linear layer, else a copy kept in `buf`.
const float* dy_act(const float* dy, const float* y, int64_t count, Act act, AlignedBuf& buf, int nthreads) {
  if (act == Act::Linear) return dy;
  buf.reset(static_cast<size_t>(count));
  act_grad_parallel(dy, y, count, act, buf.data(), nthreads);
  return buf.data();
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

// The per-thread bias-gradient sums (doubles) into db.
void reduce_bias_grads(const std::vector<Scratch>& sc, int64_t Co, float* db) {
  for (int64_t j = 0; j < Co; ++j) {
    double t = 0;
    for (const auto& s : sc) t += s.dsum[static_cast<size_t>(j)];
    db[j] = static_cast<float>(t);
  }
}

// The per-thread accumulators (n floats each) summed into the first one, which is returned.
float* reduce_accumulators(std::vector<Scratch>& sc, int64_t n) {
  float* acc = sc[0].acc.data();
  for (size_t t = 1; t < sc.size(); ++t)
    for (int64_t i = 0; i < n; ++i) acc[i] += sc[t].acc.data()[i];
  return acc;
}

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

// The conv weights w [Co, C, kh, kw] as the GEMM's [kh·kw·Cp, Co] matrix (row (ky·kw + kx)·Cp + ci),
// Cp >= C channels per tap (the rows of channels past C are zero).
AlignedBuf weight_matrix(const NhwcGeom& g, int64_t Co, const float* w, int64_t Cp) {
  const int64_t KK = g.kh * g.kw, C = g.C;
  AlignedBuf wm(static_cast<size_t>(KK * Cp * Co), Cp != C);
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t ci = 0; ci < C; ++ci)
      for (int64_t k = 0; k < KK; ++k) wm.data()[(k * Cp + ci) * Co + co] = w[(co * C + ci) * KK + k];
  return wm;
}

// op(B) [K x N] packed once for GemmCall::Bpacked (the weights of every chunk's product).
// Floats of op(B) [K x N] in the GEMM's packed B panels (N rounded up to whole panels).
int64_t packed_b_floats(int64_t K, int64_t N) {
  const int64_t nr = gemm_kernel().nr;
  return (N + nr - 1) / nr * nr * K;
}

AlignedBuf prepack_b(bool tb, int64_t K, int64_t N, const float* B, int64_t ldb) {
  const GemmKernel& k = gemm_kernel();
  AlignedBuf out(static_cast<size_t>(packed_b_floats(K, N)));
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

// Implicit GEMM: the convolutions' products read straight from a zero-padded copy of one image's
// map [Hp, Wp, ·], so no column matrix is formed. With the padding in the copy, every kernel tap
// of every output cell is inside it: a tap is a fixed offset from the cell's corner.
struct PaddedGeom {
  int64_t Hp, Wp;
  explicit PaddedGeom(const NhwcGeom& g)
      : Hp(std::max(g.H + g.pt, (g.Ho - 1) * g.sh + g.kh)), Wp(std::max(g.W + g.pl, (g.Wo - 1) * g.sw + g.kw)) {}
  // offset (in elements, `per` per cell) of tap (ky, kx) from a cell's corner
  std::vector<int64_t> tap_offsets(const NhwcGeom& g, int64_t per) const {
    std::vector<int64_t> o(static_cast<size_t>(g.kh * g.kw));
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t kx = 0; kx < g.kw; ++kx) o[static_cast<size_t>(ky * g.kw + kx)] = (ky * Wp + kx) * per;
    return o;
  }
  // offset of output cell q's corner
  int64_t corner(const NhwcGeom& g, int64_t q, int64_t per) const { return ((q / g.Wo) * g.sh * Wp + (q % g.Wo) * g.sw) * per; }
};

constexpr int kMaxMR = 16;

// The forward pass by register tiles of mr output cells x nr channels: per image, fill(n, map)
// writes the padded map (elements of type T, `per` per cell; borders stay as first zeroed), then
// tile(rows, taps offsets, c, mr, jr, nr) computes the tile at output row block rows / channels jr.
template <typename T, typename Fill, typename Tile>
void implicit_forward(const NhwcGeom& g, int64_t Co, int64_t per, const float* bias, Act act, float* y, int nthreads,
                      int MR, int NR, Fill fill, Tile tile) {
  const PaddedGeom pg(g);
  const std::vector<int64_t> taps = pg.tap_offsets(g, per);
  const int64_t HoWo = g.Ho * g.Wo;
  const int nt = image_threads(nthreads, g.N);
  const size_t floats = static_cast<size_t>((pg.Hp * pg.Wp * per * static_cast<int64_t>(sizeof(T)) + 3) / 4);
  std::vector<AlignedBuf> maps(static_cast<size_t>(nt));
  for (auto& m : maps) m.reset(floats, true);
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    T* map = reinterpret_cast<T*>(maps[tid].data());
    const T* rows[kMaxMR];
    for (int64_t n = i0; n < i1; ++n) {
      fill(n, map, pg);
      float* yn = y + n * HoWo * Co;
      for (int64_t r = 0; r < HoWo; r += MR) {
        const int64_t mr = std::min<int64_t>(MR, HoWo - r);
        for (int64_t i = 0; i < MR; ++i) rows[i] = map + pg.corner(g, r + std::min(i, mr - 1), per);
        for (int64_t jr = 0; jr < Co; jr += NR) tile(rows, taps.data(), yn + r * Co + jr, mr, jr, std::min<int64_t>(NR, Co - jr));
      }
      bias_act_rows(yn, HoWo, Co, bias, act);
    }
  });
}

// Copies image n of x [N, H, W, C] into the interior of its padded map (fp32).
void fill_padded(const NhwcGeom& g, const float* x, int64_t n, float* map, const PaddedGeom& pg) {
  for (int64_t iy = 0; iy < g.H; ++iy)
    std::memcpy(map + ((iy + g.pt) * pg.Wp + g.pl) * g.C, x + (n * g.H + iy) * g.W * g.C, sizeof(float) * g.W * g.C);
}

// fp32: the packed weights [P, Co] as the GEMM's B panels, the map as is; a narrow output (at
// most kNarrowCo channels) by tiles vectorised over the input channels, weights [Co][taps][C].
void conv2d_forward_fp32(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act, float* y,
                         int nthreads) {
  const GemmKernel& k = gemm_kernel();
  const int64_t KK = g.kh * g.kw, C = g.C;
  if (Co <= kNarrowCo && C % k.vector_width == 0) {
    AlignedBuf wt(static_cast<size_t>(Co * KK * C));
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t ci = 0; ci < C; ++ci)
        for (int64_t t = 0; t < KK; ++t) wt.data()[(co * KK + t) * C + ci] = w[(co * C + ci) * KK + t];
    implicit_forward<float>(
        g, Co, C, bias, act, y, nthreads, kNarrowRows, static_cast<int>(Co),
        [&](int64_t n, float* map, const PaddedGeom& pg) { fill_padded(g, x, n, map, pg); },
        [&](const float* const* rows, const int64_t* taps, float* c, int64_t mr, int64_t, int64_t) {
          k.narrow_tile(rows, KK, taps, C, Co, wt.data(), c, Co, mr);
        });
    return;
  }
  const AlignedBuf wm = weight_matrix(g, Co, w, C);
  const AlignedBuf wp = prepack_b(false, KK * C, Co, wm.data(), Co);
  implicit_forward<float>(
      g, Co, C, bias, act, y, nthreads, k.mr, k.nr,
      [&](int64_t n, float* map, const PaddedGeom& pg) { fill_padded(g, x, n, map, pg); },
      [&](const float* const* rows, const int64_t* taps, float* c, int64_t mr, int64_t jr, int64_t nr) {
        k.conv_tile(rows, KK, taps, C, wp.data() + (jr / k.nr) * KK * C * k.nr, c, Co, mr, nr);
      });
}

// Winograd F(m×m, r×r) with α = 8 for stride-1 r×r kernels (r = 5: m = 4, r = 3: m = 6): per tile
// of m×m outputs, Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A, so the products become 64 GEMMs over the channels
// (tiles x C times C x Co, one per point pair ξ) with 64/m² multiplies per output instead of r²:
// 6.25x fewer for 5×5, 5x for 3×3. The points are 0, ±1, ±2, ±1/2 and ∞; G's row for a finite
// point p is s·(1, p, p², …) with s = 1/4, 1/18, 1/18, 1/360, 1/360, 16/45, 16/45, and ∞'s is the
// last tap / 4, so that Bᵀ (GemmKernel::wino_input) is in small integers. Bᵀ was derived by solving
// Aᵀ[(G g) ⊙ (Bᵀ d)] = g ⋆ d in exact rationals. The sums are fp32; against the direct sum the
// transforms cost a few times fp32's rounding (about 1e-5 relative; test/winograd.test.ts).
constexpr int kWinoPoints = kWinogradAlpha * kWinogradAlpha;

// Whether the forward convolution g -> Co runs by Winograd.
bool winograd_fits(const NhwcGeom& g, int64_t Co) {
  const int64_t vw = gemm_kernel().vector_width;
  return winograd_enabled() && g.sh == 1 && g.sw == 1 && g.kh == g.kw && (g.kh == 3 || g.kh == 5) && g.C % vw == 0 &&
         Co % vw == 0 && Co > kNarrowCo;
}

// G [8, r] (row-major) for an r×r kernel: row i is s_i·(1, p_i, p_i², …) for the finite points,
// the ∞ row the last tap / 4.
std::vector<double> winograd_g(int64_t r) {
  constexpr int A = kWinogradAlpha;
  static constexpr double kPoint[A - 1] = {0, 1, -1, 2, -2, 0.5, -0.5};
  static constexpr double kScale[A - 1] = {1. / 4, 1. / 18, 1. / 18, 1. / 360, 1. / 360, 16. / 45, 16. / 45};
  std::vector<double> G(static_cast<size_t>(A * r), 0.0);
  for (int i = 0; i < A - 1; ++i)
    for (int64_t k = 0; k < r; ++k) G[static_cast<size_t>(i * r + k)] = kScale[i] * std::pow(kPoint[i], static_cast<double>(k));
  G[static_cast<size_t>((A - 1) * r + r - 1)] = 0.25;
  return G;
}

// The transformed weights U[ξ] = G g Gᵀ [64][C][Co] (ξ = 8i + j) of w [Co, C, r, r], each ξ's
// C x Co matrix packed as the GEMM's B panels.
AlignedBuf winograd_weights(const NhwcGeom& g, int64_t Co, const float* w) {
  const int64_t r = g.kh, C = g.C;
  const std::vector<double> Gv = winograd_g(r);
  auto G = [&](int i, int64_t k) { return Gv[static_cast<size_t>(i * r + k)]; };
  AlignedBuf u(static_cast<size_t>(kWinoPoints * C * Co));
  std::vector<double> gw(static_cast<size_t>(kWinogradAlpha * r));
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t ci = 0; ci < C; ++ci) {
      const float* wk = w + (co * C + ci) * r * r;
      for (int i = 0; i < kWinogradAlpha; ++i)  // G g
        for (int64_t kx = 0; kx < r; ++kx) {
          double t = 0;
          for (int64_t ky = 0; ky < r; ++ky) t += G(i, ky) * wk[ky * r + kx];
          gw[static_cast<size_t>(i * r + kx)] = t;
        }
      for (int i = 0; i < kWinogradAlpha; ++i)  // (G g) Gᵀ
        for (int j = 0; j < kWinogradAlpha; ++j) {
          double t = 0;
          for (int64_t kx = 0; kx < r; ++kx) t += gw[static_cast<size_t>(i * r + kx)] * G(j, kx);
          u.data()[((i * kWinogradAlpha + j) * C + ci) * Co + co] = static_cast<float>(t);
        }
    }
  const GemmKernel& k = gemm_kernel();
  const int64_t panel = packed_b_floats(C, Co);
  AlignedBuf up(static_cast<size_t>(kWinoPoints * panel));
  for (int xi = 0; xi < kWinoPoints; ++xi) k.pack_b_full(false, C, Co, u.data() + xi * C * Co, Co, up.data() + xi * panel);
  return up;
}

// The tiling of one Winograd convolution g -> Co: m×m output tiles (row-major over the image), the
// padded input map sized for whole tiles, and blocks of T tiles whose transformed cells are stored
// tile-major: tile t's 64 cells contiguous (ξ at t·vt + ξ·C for the input side, t·xt + ξ·Co for
// the output side), so each transform streams through one block of memory while the GEMM for one
// ξ reads its rows (tiles) at stride vt. One cache line past a multiple of 1 KB keeps those rows
// off a single L1 set. V and X of a block stay within ~256 KB (L2), in whole register tiles.
struct WinogradTiling {
  int64_t r, m, ty_n, tx_n, tiles, T, vt, xt;
  PaddedGeom pg;
  WinogradTiling(const NhwcGeom& g, int64_t Co, int64_t block_floats)
      : r(g.kh), m(kWinogradAlpha - g.kh + 1), ty_n((g.Ho + m - 1) / m), tx_n((g.Wo + m - 1) / m), tiles(ty_n * tx_n),
        T(std::max<int64_t>(gemm_kernel().mr, block_floats / (kWinoPoints * (g.C + Co)) / gemm_kernel().mr * gemm_kernel().mr)),
        vt(kWinoPoints * g.C + 16), xt(kWinoPoints * Co + 16), pg(g) {
    pg.Hp = std::max(pg.Hp, ty_n * m + r - 1);
    pg.Wp = std::max(pg.Wp, tx_n * m + r - 1);
  }
  int64_t ty(int64_t t) const { return t / tx_n; }
  int64_t tx(int64_t t) const { return t % tx_n; }
  // the input transforms of tiles [t0, t0 + tn) of the padded map into V
  void input(const GemmKernel& k, const float* map, int64_t C, int64_t t0, int64_t tn, float* V) const {
    for (int64_t t = 0; t < tn; ++t)
      k.wino_input(map + (ty(t0 + t) * m * pg.Wp + tx(t0 + t) * m) * C, pg.Wp * C, C, V + t * vt, C);
  }
  // the output cell (row, column) where tile t starts, and how many of its rows / columns exist
  int64_t corner(const NhwcGeom& g, int64_t t) const { return ty(t) * m * g.Wo + tx(t) * m; }
  int64_t rows(const NhwcGeom& g, int64_t t) const { return std::min(m, g.Ho - ty(t) * m); }
  int64_t cols(const NhwcGeom& g, int64_t t) const { return std::min(m, g.Wo - tx(t) * m); }
};

// Per image: the padded map, then per block of tiles the input transform into V [T][64][C], the
// 64 products into X [T][64][Co] (register tiles of the GEMM kernel, read in place), the output
// transform into y with the bias and activation.
void conv2d_forward_winograd(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act,
                             float* y, int nthreads) {
  const GemmKernel& k = gemm_kernel();
  const int64_t C = g.C;
  const WinogradTiling wt(g, Co, int64_t(1) << 16);
  const int64_t T = wt.T, vt = wt.vt, xt = wt.xt;
  const AlignedBuf up = winograd_weights(g, Co, w);
  const int64_t panel = packed_b_floats(C, Co);  // one ξ's weights in up
  const int nt = image_threads(nthreads, g.N);
  std::vector<Scratch> sc(static_cast<size_t>(nt));
  for (auto& s : sc) {
    s.cols.reset(static_cast<size_t>(wt.pg.Hp * wt.pg.Wp * C), true);  // the padded map: borders stay zero
    s.g.reset(static_cast<size_t>(T * vt));
    s.acc.reset(static_cast<size_t>(T * xt));
  }
  const int64_t zero_tap = 0;
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    Scratch& s = sc[tid];
    float *map = s.cols.data(), *V = s.g.data(), *X = s.acc.data();
    const float* rows[kMaxMR];
    for (int64_t n = i0; n < i1; ++n) {
      fill_padded(g, x, n, map, wt.pg);
      float* yn = y + n * g.Ho * g.Wo * Co;
      for (int64_t t0 = 0; t0 < wt.tiles; t0 += T) {
        const int64_t tn = std::min(T, wt.tiles - t0);
        wt.input(k, map, C, t0, tn, V);
        for (int xi = 0; xi < kWinoPoints; ++xi)
          for (int64_t ir = 0; ir < tn; ir += k.mr) {
            const int64_t mr = std::min<int64_t>(k.mr, tn - ir);
            for (int64_t i = 0; i < k.mr; ++i) rows[i] = V + (ir + std::min(i, mr - 1)) * vt + xi * C;
            for (int64_t jr = 0; jr < Co; jr += k.nr)
              k.conv_tile(rows, 1, &zero_tap, C, up.data() + xi * panel + (jr / k.nr) * C * k.nr, X + ir * xt + xi * Co + jr, xt, mr,
                          std::min<int64_t>(k.nr, Co - jr));
          }
        for (int64_t t = t0; t < t0 + tn; ++t)
          k.wino_output(static_cast<int>(wt.m), X + (t - t0) * xt, Co, Co, bias, static_cast<int>(act), yn + wt.corner(g, t) * Co,
                        g.Wo * Co, wt.rows(g, t), wt.cols(g, t));
      }
    }
  });
}

// The filter gradient by Winograd: with D = A dY Aᵀ per tile (the output transform's adjoint),
// dU[ξ] = Σ_tiles V[ξ]ᵀ D[ξ] ([C, Co]: 64 GEMMs with the tiles as the sum, accumulated per thread),
// then dW = Gᵀ dU G (the weight transform's adjoint, in doubles). Gd = dy·act'.
void conv2d_filter_grad_winograd(const NhwcGeom& g, int64_t Co, const float* x, const float* Gd, float* dw, float* db,
                                 int nthreads) {
  const GemmKernel& k = gemm_kernel();
  const int64_t C = g.C, HoWo = g.Ho * g.Wo, UC = kWinoPoints * C * Co;
  const WinogradTiling wt(g, Co, int64_t(1) << 17);  // longer sums per GEMM tile: twice the forward's blocks
  const int64_t T = wt.T, vt = wt.vt, xt = wt.xt;
  const int nt = image_threads(nthreads, g.N);
  std::vector<Scratch> sc(static_cast<size_t>(nt));
  std::vector<int64_t> b_row(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) b_row[static_cast<size_t>(t)] = t * xt;
  for (auto& s : sc) {
    s.cols.reset(static_cast<size_t>(wt.pg.Hp * wt.pg.Wp * C), true);
    s.g.reset(static_cast<size_t>(T * vt + k.mr));  // (+ a tile's overrun of the last row)
    s.packA.reset(static_cast<size_t>(T * xt + k.nr));
    s.acc.reset(static_cast<size_t>(UC), true);
    if (db) s.dsum.assign(static_cast<size_t>(Co), 0.0);
  }
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    Scratch& s = sc[tid];
    float *map = s.cols.data(), *V = s.g.data(), *D = s.packA.data(), *dU = s.acc.data();
    for (int64_t n = i0; n < i1; ++n) {
      fill_padded(g, x, n, map, wt.pg);
      const float* Gn = Gd + n * HoWo * Co;
      if (db) add_col_sums(Gn, HoWo, Co, s.dsum.data());
      for (int64_t t0 = 0; t0 < wt.tiles; t0 += T) {
        const int64_t tn = std::min(T, wt.tiles - t0);
        wt.input(k, map, C, t0, tn, V);
        for (int64_t t = t0; t < t0 + tn; ++t)
          k.wino_output_adjoint(static_cast<int>(wt.m), Gn + wt.corner(g, t) * Co, g.Wo * Co, Co, wt.rows(g, t), wt.cols(g, t),
                                D + (t - t0) * xt, Co);
        for (int xi = 0; xi < kWinoPoints; ++xi)
          for (int64_t ir = 0; ir < C; ir += k.mr)
            for (int64_t jr = 0; jr < Co; jr += k.nr)
              k.gather_tile(tn, V + xi * C + ir, vt, D, b_row.data(), xi * Co + jr, dU + (xi * C + ir) * Co + jr, Co,
                            std::min<int64_t>(k.mr, C - ir), std::min<int64_t>(k.nr, Co - jr));
      }
    }
  });
  if (db) reduce_bias_grads(sc, Co, db);
  const float* dUs = reduce_accumulators(sc, UC);
  // dW = Gᵀ dU G, separably (dU G, then Gᵀ ·), vectorised over the output channels
  const std::vector<double> Gm = winograd_g(wt.r);
  const int64_t r = wt.r;
  std::vector<double> t1(static_cast<size_t>(kWinogradAlpha * r * Co));  // [i][kx][co] = Σ_j dU[i][j] G[j][kx]
  for (int64_t ci = 0; ci < C; ++ci) {
    std::fill(t1.begin(), t1.end(), 0.0);
    for (int i = 0; i < kWinogradAlpha; ++i)
      for (int j = 0; j < kWinogradAlpha; ++j) {
        const float* u = dUs + ((i * kWinogradAlpha + j) * C + ci) * Co;
        for (int64_t kx = 0; kx < r; ++kx) {
          const double gj = Gm[static_cast<size_t>(j * r + kx)];
          if (gj == 0.0) continue;
          double* t = t1.data() + (i * r + kx) * Co;
          for (int64_t co = 0; co < Co; ++co) t[co] += gj * static_cast<double>(u[co]);
        }
      }
    for (int64_t ky = 0; ky < r; ++ky)
      for (int64_t kx = 0; kx < r; ++kx)
        for (int64_t co = 0; co < Co; ++co) {
          double v = 0;
          for (int i = 0; i < kWinogradAlpha; ++i) v += Gm[static_cast<size_t>(i * r + ky)] * t1[static_cast<size_t>((i * r + kx) * Co + co)];
          dw[((co * C + ci) * r + ky) * r + kx] = static_cast<float>(v);
        }
  }
}

// bf16: the map as channel pairs (an odd C gets a zero channel), the weights as packed pairs.
void conv2d_forward_bf16(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act,
                         float* y, int nthreads) {
  const Bf16Kernel& k = bf16_kernel();
  const int64_t KK = g.kh * g.kw, C = g.C, Cp = C + (C & 1), C2 = Cp / 2;
  const AlignedBuf wm = weight_matrix(g, Co, w, Cp);
  AlignedBuf wpb(static_cast<size_t>(bf16_packed_size(KK * Cp, Co, kBf16NR)));
  bf16_pack(KK * Cp, Co, wm.data(), Co, kBf16NR, reinterpret_cast<uint32_t*>(wpb.data()));
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(wpb.data());
  implicit_forward<uint32_t>(
      g, Co, C2, bias, act, y, nthreads, kBf16MR, kBf16NR,
      [&](int64_t n, uint32_t* map, const PaddedGeom& pg) {
        for (int64_t iy = 0; iy < g.H; ++iy) {
          const float* src = x + (n * g.H + iy) * g.W * C;
          uint32_t* dst = map + ((iy + g.pt) * pg.Wp + g.pl) * C2;
          if (C % 2 == 0) k.to_pairs(src, g.W * C, dst);
          else
            for (int64_t ix = 0; ix < g.W; ++ix) k.to_pairs(src + ix * C, C, dst + ix * C2);
        }
      },
      [&](const uint32_t* const* rows, const int64_t* taps, float* c, int64_t mr, int64_t jr, int64_t nr) {
        k.conv_tile(rows, KK, taps, C2, wp + (jr / kBf16NR) * KK * C2 * kBf16NR, c, Co, mr, nr);
      });
}

// The filter (and bias) gradient dWᵀ [Co, P] = Σ_r G[r, ·]ᵀ · cols[r, ·] by register tiles of MR
// output channels x NR columns of one tap (C a multiple of NR), k running over steps through the
// pixels of an image: per image, prepare(n, scratch) returns the A operand (a, astride) and the
// map (C elements per cell) B's rows are gathered from, b_row[k] the offset of step k's cell
// corner. alloc(scratch) sizes each thread's buffers before the parallel region. G = dy·act'.
template <typename Alloc, typename Prepare, typename Tile>
void implicit_filter_grad(const NhwcGeom& g, int64_t Co, const float* G, float* dw, float* db, int nthreads, int MR, int NR,
                          const std::vector<int64_t>& b_row, Alloc alloc, Prepare prepare, Tile tile) {
  const int64_t KK = g.kh * g.kw, C = g.C, P = KK * C, HoWo = g.Ho * g.Wo;
  const PaddedGeom pg(g);
  const int nt = image_threads(nthreads, g.N);
  std::vector<Scratch> sc(static_cast<size_t>(nt));
  for (auto& t : sc) {
    t.acc.reset(static_cast<size_t>(Co * P), true);
    if (db) t.dsum.assign(static_cast<size_t>(Co), 0.0);
    alloc(t);
  }
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t i0, i1;
    split_range(g.N, tid, ntt, i0, i1);
    Scratch& s = sc[tid];
    for (int64_t n = i0; n < i1; ++n) {
      const auto op = prepare(n, s);  // {a, astride, map}
      if (db) add_col_sums(G + n * HoWo * Co, HoWo, Co, s.dsum.data());
      for (int64_t ky = 0; ky < g.kh; ++ky)
        for (int64_t kx = 0; kx < g.kw; ++kx)
          for (int64_t cb = 0; cb < C; cb += NR) {
            const int64_t p0 = (ky * g.kw + kx) * C + cb, off = (ky * pg.Wp + kx) * C + cb;
            for (int64_t ir = 0; ir < Co; ir += MR)
              tile(op, ir, b_row.data(), off, s.acc.data() + ir * P + p0, P, std::min<int64_t>(MR, Co - ir));
          }
    }
  });
  if (db) reduce_bias_grads(sc, Co, db);
  const float* acc = reduce_accumulators(sc, P * Co);
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t ci = 0; ci < C; ++ci)
      for (int64_t t = 0; t < KK; ++t) dw[(co * C + ci) * KK + t] = acc[co * P + t * C + ci];
}

template <typename T>
struct FilterGradOperands {
  const T* a;
  int64_t astride;
  const T* map;
};

// fp32: k runs over the output cells; A is G itself (copied with padded rows when Co is not a
// multiple of MR, since a tile reads MR entries of each row), B's rows are the padded map's.
void conv2d_filter_grad_fp32(const NhwcGeom& g, int64_t Co, const float* x, const float* G, float* dw, float* db,
                             int nthreads) {
  const GemmKernel& k = gemm_kernel();
  const int64_t HoWo = g.Ho * g.Wo, C = g.C, Cs = (Co + k.mr - 1) / k.mr * k.mr;
  const PaddedGeom pg(g);
  std::vector<int64_t> b_row(static_cast<size_t>(HoWo));
  for (int64_t q = 0; q < HoWo; ++q) b_row[static_cast<size_t>(q)] = pg.corner(g, q, C);
  implicit_filter_grad(
      g, Co, G, dw, db, nthreads, k.mr, k.nr, b_row,
      [&](Scratch& s) {
        s.cols.reset(static_cast<size_t>(pg.Hp * pg.Wp * C), true);  // the padded map: borders stay zero
        if (Cs != Co) s.g.reset(static_cast<size_t>(HoWo * Cs), true);
      },
      [&](int64_t n, Scratch& s) {
        fill_padded(g, x, n, s.cols.data(), pg);
        const float* Gn = G + n * HoWo * Co;
        if (Cs == Co) return FilterGradOperands<float>{Gn, Co, s.cols.data()};
        for (int64_t q = 0; q < HoWo; ++q) std::memcpy(s.g.data() + q * Cs, Gn + q * Co, sizeof(float) * Co);
        return FilterGradOperands<float>{s.g.data(), Cs, s.cols.data()};
      },
      [&](const FilterGradOperands<float>& op, int64_t ir, const int64_t* rows, int64_t off, float* c, int64_t ldc, int64_t mr) {
        k.gather_tile(HoWo, op.a + ir, op.astride, op.map, rows, off, c, ldc, mr, k.nr);
      });
}

// bf16: k runs over pairs of neighbouring output cells of one output row (an odd row's last cell
// pairs with a zero gradient). The padded map becomes X2[q, c] = pair(x[q, c], x[q + sw, c]): the
// inputs of such a pair at any tap, so a row of B is C contiguous pairs of X2; A is G as pairs.
void conv2d_filter_grad_bf16(const NhwcGeom& g, int64_t Co, const float* x, const float* G, float* dw, float* db,
                             int nthreads) {
  const Bf16Kernel& k = bf16_kernel();
  const int64_t C = g.C, HoWo = g.Ho * g.Wo, Wo2 = (g.Wo + 1) / 2, K2 = g.Ho * Wo2;
  const PaddedGeom pg(g);
  std::vector<int64_t> b_row(static_cast<size_t>(K2));
  for (int64_t oy = 0; oy < g.Ho; ++oy)
    for (int64_t j = 0; j < Wo2; ++j) b_row[static_cast<size_t>(oy * Wo2 + j)] = pg.corner(g, oy * g.Wo + 2 * j, C);
  const int64_t cells = pg.Hp * pg.Wp;
  implicit_filter_grad(
      g, Co, G, dw, db, nthreads, kBf16MR, kBf16NR, b_row,
      [&](Scratch& s) {
        s.cols.reset(static_cast<size_t>((cells + g.sw) * C), true);  // the padded map (+ the last pair's partner)
        s.pairsB.reset(static_cast<size_t>(cells * C));               // X2
        s.pairsA.reset(static_cast<size_t>(K2 * Co + kBf16MR));       // G pairs [K2, Co] (+ a tile's overrun)
      },
      [&](int64_t n, Scratch& s) {
        fill_padded(g, x, n, s.cols.data(), pg);
        k.interleave(s.cols.data(), s.cols.data() + g.sw * C, cells * C, s.pb());
        const float* Gn = G + n * HoWo * Co;
        for (int64_t oy = 0; oy < g.Ho; ++oy)
          for (int64_t j = 0; j < Wo2; ++j) {
            const float* even = Gn + (oy * g.Wo + 2 * j) * Co;
            k.interleave(even, 2 * j + 1 < g.Wo ? even + Co : nullptr, Co, s.pa() + (oy * Wo2 + j) * Co);
          }
        return FilterGradOperands<uint32_t>{s.pa(), Co, s.pb()};
      },
      [&](const FilterGradOperands<uint32_t>& op, int64_t ir, const int64_t* rows, int64_t off, float* c, int64_t ldc, int64_t mr) {
        k.gather_tile(K2, op.a + ir, op.astride, op.map, rows, off, c, ldc, mr, kBf16NR);
      });
}

}  // namespace

bool winograd_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("EMORL_CONV_ALGO");
    return !(v && std::string(v) == "direct");
  }();
  return on;
}

void bias_act(float* y, int64_t rows, int64_t n, const float* bias, Act act, int nthreads) {
  if (!bias && act == Act::Linear) return;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, rows * n / 65536 + 1)));
  parallel_region(nt, [&](int tid, int ntt) {
    int64_t r0, r1;
    split_range(rows, tid, ntt, r0, r1);
    bias_act_rows(y + r0 * n, r1 - r0, n, bias, act);
  });
}

void nhwc_conv2d_forward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act,
                         float* y, int nthreads, Precision prec) {
  if (g.M() == 0 || Co == 0) return;
  // Winograd first in either precision: in fp32 it needs about a third of bf16's time per output
  // (fewer multiplies at half the rate) and keeps fp32's accuracy.
  if (winograd_fits(g, Co)) return conv2d_forward_winograd(g, Co, x, w, bias, act, y, nthreads);
  if (prec == Precision::Bf16 && Co >= 16) return conv2d_forward_bf16(g, Co, x, w, bias, act, y, nthreads);
  conv2d_forward_fp32(g, Co, x, w, bias, act, y, nthreads);
}

void nhwc_conv2d_backward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* y,
                          const float* dy, Act act, float* dx, float* dw, float* db, int nthreads, Precision prec) {
  const int64_t P = g.P(), KK = g.kh * g.kw, C = g.C, HoWo = g.Ho * g.Wo, HWC = g.H * g.W * C;
  const bool params = dw || db;
  // Stride 1: the input gradient is itself a stride-1 convolution of dy·act' with the flipped,
  // transposed kernel and padding k−1−p, which runs as the forward pass does (implicit GEMM),
  // instead of a GEMM into columns and a col2im scatter.
  // (Only for outputs of at least 16 channels: a narrower one, e.g. an RGB input's gradient, would
  // fill a fraction of the register tile's columns; the column path suits it better.)
  if (dx && g.sh == 1 && g.sw == 1 && g.pt <= g.kh - 1 && g.pl <= g.kw - 1 && Co > 0 && g.M() > 0 && C >= 16) {
    AlignedBuf G;
    const float* Gd = dy_act(dy, y, g.M() * Co, act, G, nthreads);
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
  // The filter gradient by Winograd where the forward pass runs by it (fp32 in either precision),
  // else by implicit GEMM when the channels fill whole register tiles.
  const bool bf16 = prec == Precision::Bf16;
  const bool winograd_dw = dw && winograd_fits(g, Co);
  if (dw && (winograd_dw || C % (bf16 ? kBf16NR : gemm_kernel().nr) == 0) && Co > 0 && g.M() > 0) {
    AlignedBuf G;
    const float* Gd = dy_act(dy, y, g.M() * Co, act, G, nthreads);
    if (dx) nhwc_conv2d_backward(g, Co, x, w, nullptr, Gd, Act::Linear, dx, nullptr, nullptr, nthreads, prec);  // (by columns)
    (winograd_dw ? conv2d_filter_grad_winograd : bf16 ? conv2d_filter_grad_bf16 : conv2d_filter_grad_fp32)(g, Co, x, Gd, dw, db, nthreads);
    return;
  }
  const AlignedBuf wm = weight_matrix(g, Co, w, C);
  // wmᵀ packed once for every chunk's input-gradient product
  const AlignedBuf wtp = dx ? prepack_b(true, Co, P, wm.data(), Co) : AlignedBuf();
  const int nt = image_threads(nthreads, g.N);
  const int64_t R = chunk_rows(P);
  auto sc = scratch(nt, R * P, R * Co, dw ? P * Co : 0, db ? Co : 0);
  // The filter gradient (channels that do not fill register tiles) from column chunks: in fp32
  // dW [P, Co] = colsᵀ · G; in bf16 dWᵀ [Co, P] = Gᵀ · cols by gather_tile, with pairs along the
  // rows (the product's k): A = G as [K2, Co] pairs, B = cols in panels, row k2 at k2·NR.
  const bool bf16_dw = dw && bf16;
  std::vector<int64_t> panel_rows(bf16_dw ? static_cast<size_t>(bf16_pairs(R)) : 0);
  for (size_t k2 = 0; k2 < panel_rows.size(); ++k2) panel_rows[k2] = static_cast<int64_t>(k2) * kBf16NR;
  if (bf16_dw)
    for (auto& t : sc) {
      t.pairsA.reset(static_cast<size_t>(bf16_packed_size(R, Co, Co) + kBf16MR));  // (+ a tile's overrun)
      t.pairsB.reset(static_cast<size_t>(bf16_packed_size(R, P, kBf16NR)));
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
        bf16_pack(rows, P, s.cols.data(), P, kBf16NR, s.pb());
        bf16_pack(rows, Co, s.g.data(), Co, Co, s.pa());
        const Bf16Kernel& k = bf16_kernel();
        const int64_t K2 = bf16_pairs(rows);
        for (int64_t ir = 0; ir < Co; ir += kBf16MR)
          for (int64_t jr = 0; jr < P; jr += kBf16NR)
            k.gather_tile(K2, s.pa() + ir, Co, s.pb() + (jr / kBf16NR) * K2 * kBf16NR, panel_rows.data(), 0,
                          s.acc.data() + ir * P + jr, P, std::min<int64_t>(kBf16MR, Co - ir), std::min<int64_t>(kBf16NR, P - jr));
      } else if (dw) {
        im2col_rows(g, x, r0, r1, s.cols.data());
        sgemm_serial(call(true, false, P, Co, rows, s.cols.data(), P, s.g.data(), Co, s.acc.data(), Co, true),
                     s.packA.data(), s.packB.data());
      }
    }
  });
  if (!params) return;
  if (db) reduce_bias_grads(sc, Co, db);
  if (dw) {
    const float* acc = reduce_accumulators(sc, P * Co);
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t ci = 0; ci < C; ++ci)
        for (int64_t k = 0; k < KK; ++k)
          dw[(co * C + ci) * KK + k] = bf16_dw ? acc[co * P + k * C + ci] : acc[(k * C + ci) * Co + co];
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
  if (db) reduce_bias_grads(sc, Co, db);
  if (dw) {
    const float* acc = reduce_accumulators(sc, Ci * Q);
    for (int64_t ci = 0; ci < Ci; ++ci)
      for (int64_t co = 0; co < Co; ++co)
        for (int64_t k = 0; k < KK; ++k) dw[(ci * Co + co) * KK + k] = acc[ci * Q + k * Co + co];
  }
}

}  // namespace emorl
