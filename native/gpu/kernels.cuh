// The GPU side's shared machinery (included by decoder_gpu.cu and conv_gpu.cu, each compiled by
// nvcc into emorl::cuda and by the host compiler into emorl::simt): the tiled implicit-GEMM kernel
// behind every convolution, its operand loaders and epilogues, elementwise and reduction kernels,
// and the device buffers a JS workspace keeps between calls.
//
// gemm_kernel: an output tile of 64×64 per block of 256 threads, 4×4 per thread, operands staged
// in shared memory 16 deep; the im2col gathers are done by the operand loaders, so no column
// matrix is ever formed. The three convolution products:
//   forward   y[pixel, co]    = Σ_(ky,kx,ci) im2col(x)[pixel, (ky,kx,ci)] · Wf[(ky,kx,ci), co]
//   data grad dx[pixel, ci]   = Σ_(ky,kx,co) gather(dy)[pixel, (ky,kx,co)] · Wd[(ky,kx,co), ci]
//   filter    dW[(ky,kx,ci), co] = Σ_rows im2col(x)[row, (ky,kx,ci)] · dy[row, co]  (split over rows)
// A transposed convolution is the data-gradient product forward and the forward product backward,
// exactly as in nhwc.cc. Weights arrive in PyTorch layout w[col][img][ky][kx] (col: the channels of
// the conv's column side, Conv2d's Co or ConvTranspose2d's Ci) and are packed on the host.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../nhwc.h"
#include "gpu.h"
#include "simt.h"

namespace emorl {
namespace EMORL_GPU_NS {
namespace {

using i64 = int64_t;

constexpr int kTile = 64, kDepth = 16, kGemmThreads = 256;
constexpr int kThreads = 256;  // elementwise kernels
#if defined(__CUDACC__)
constexpr i64 kMaxBlocks = 1024;
constexpr i64 kRowsPerSplit = 2048;  // filter gradients: rows of the product per block in z
constexpr i64 kRowsPerColSumChunk = 1024;  // column sums: rows per block (at least)
#else
// emulated: few blocks, so the grid-stride loops are exercised too; split filter gradients and
// column sums at test sizes
constexpr i64 kMaxBlocks = 4;
constexpr i64 kRowsPerSplit = 128;
constexpr i64 kRowsPerColSumChunk = 16;
#endif

EMORL_DEVICE int imin(int a, int b) { return a < b ? a : b; }

EMORL_DEVICE float activate(float v, int act) {
  if (act == 1) return v > 0.f ? v : 0.f;
  if (act == 2) return v > 0.f ? v : expm1f(v);
  return v;
}

// dy ⊙ act'(pre-activation), from the post-activation y (act: 1 ReLU, 2 ELU, else linear)
EMORL_DEVICE float through_act(float dy, float y, int act) {
  if (act == 1) return y > 0.f ? dy : 0.f;
  if (act == 2) return y > 0.f ? dy : dy * (y + 1.f);
  return dy;
}

// ---- GEMM operands: element (row, k) of A or (k, col) of B, gathered on the fly -------------
// Each operand splits an element's index into a part per row (`Row`, from its first index) and
// one per column (`Col`, from its second), so that a kernel whose threads keep the same rows
// across k tiles decomposes each row once (`get` combines them; operator() does all three).

// Four consecutive floats, 16-byte aligned, in one 128-bit load on a GPU.
EMORL_DEVICE void load4(const float* p, float (&v)[4]) {
#if defined(__CUDACC__)
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
#else
  check_vector_access(p, 16);
  for (int j = 0; j < 4; ++j) v[j] = p[j];
#endif
}
EMORL_DEVICE void zero4(float (&v)[4]) { v[0] = v[1] = v[2] = v[3] = 0.f; }
EMORL_DEVICE bool aligned16(const float* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Each operand also reads runs of four elements, (r, c..c+3) or (r..r+3, c), in one load where
// its layout holds them contiguous and 16-byte aligned: runs_in_rows() / runs_in_cols() say
// whether every such run that starts at a multiple of 4 is (checked once per block), get4() reads
// the run from its first element in the operand's one contiguous direction. kRunsDownCols: runs
// may go along the first index (else only along the second, the k of an A operand that is
// always kfast).

// A strided matrix: element (r, c) at p[r·rs + c·cs].
struct Mat {
  const float* p;
  i64 rs, cs;
  bool kfast;  // consecutive threads should step the k index (it is the contiguous one)
  static constexpr bool kRunsDownCols = true;
  struct Row { i64 off; };
  struct Col { i64 off; };
  EMORL_DEVICE Row row(int r) const { return Row{r * rs}; }
  EMORL_DEVICE Col col(int c) const { return Col{c * cs}; }
  EMORL_DEVICE float get(const Row& r, const Col& c) const { return p[r.off + c.off]; }
  EMORL_DEVICE float operator()(int r, int c) const { return get(row(r), col(c)); }
  EMORL_DEVICE void step(Row& r, int d) const { r.off += d * rs; }
  EMORL_DEVICE void step(Col& c, int d) const { c.off += d * cs; }
  EMORL_DEVICE bool runs_in_rows() const { return cs == 1 && rs % 4 == 0 && aligned16(p); }
  EMORL_DEVICE bool runs_in_cols() const { return rs == 1 && cs % 4 == 0 && aligned16(p); }
  EMORL_DEVICE void get4(const Row& r, const Col& c, float (&v)[4]) const { load4(p + r.off + c.off, v); }
};
inline Mat a_operand(const float* p, i64 rs, i64 cs) { return Mat{p, rs, cs, cs == 1}; }  // A(m, k)
inline Mat b_operand(const float* p, i64 rs, i64 cs) { return Mat{p, rs, cs, rs == 1}; }  // B(k, n)

struct Geom {
  int N, H, W, C, Ho, Wo, kh, kw, sh, sw, pt, pl;
};

// A k index (ky, kx, channel), channels fastest, stepped on by d > 0 without divisions (past the
// last tap it goes on counting: such elements are never read). `off`, an offset linear in the
// three, follows: d for the channels, plus next_tap each time kx goes on to the next tap of its
// row and next_row each time ky goes on to the next row (what the offset moves there beyond the
// 1 that the channels' count adds).
EMORL_DEVICE void step_tap(int& ky, int& kx, int& ch, int& off, int channels, int kw, int next_tap, int next_row, int d) {
  ch += d;
  off += d;
  while (ch >= channels) {
    ch -= channels;
    if (++kx == kw) {
      kx = 0;
      ++ky;
      off += next_row;
    } else {
      off += next_tap;
    }
  }
}

inline Geom geom_of(const NhwcGeom& g) {
  return Geom{static_cast<int>(g.N), static_cast<int>(g.H), static_cast<int>(g.W), static_cast<int>(g.C),
              static_cast<int>(g.Ho), static_cast<int>(g.Wo), static_cast<int>(g.kh), static_cast<int>(g.kw),
              static_cast<int>(g.sh), static_cast<int>(g.sw), static_cast<int>(g.pt), static_cast<int>(g.pl)};
}

// im2col of the image-side map x [N,H,W,C]: row m = (n, oy, ox), column k = (ky, kx, ci).
// Element (m, k) is x[row's at + column's tap] unless the tap lies in the padding.
struct Im2col {
  const float* x;
  Geom g;
  bool kfast = true;
  static constexpr bool kRunsDownCols = false;
  // the patch's top-left (iy0, ix0), and its offset in x (negative in the padding: never read)
  struct Row { i64 at; int iy0, ix0; };
  // the tap, and its offset from the patch's top-left: (ky·W + kx)·C + ci
  struct Col { int ky, kx, ci, tap; };
  EMORL_DEVICE Row row(int m) const {
    const int ox = m % g.Wo, t = m / g.Wo, oy = t % g.Ho, n = t / g.Ho;
    const int iy0 = oy * g.sh - g.pt, ix0 = ox * g.sw - g.pl;
    return Row{(static_cast<i64>(n) * g.H * g.W + static_cast<i64>(iy0) * g.W + ix0) * g.C, iy0, ix0};
  }
  EMORL_DEVICE Col col(int k) const {
    const int ci = k % g.C, t = k / g.C, ky = t / g.kw, kx = t % g.kw;
    return Col{ky, kx, ci, (ky * g.W + kx) * g.C + ci};
  }
  // whether tap c of patch r lies in the padding (unsigned: a negative index is past the end)
  EMORL_DEVICE bool padding(const Row& r, const Col& c) const {
    return static_cast<unsigned>(r.iy0 + c.ky) >= static_cast<unsigned>(g.H) || static_cast<unsigned>(r.ix0 + c.kx) >= static_cast<unsigned>(g.W);
  }
  EMORL_DEVICE const float* input(const Row& r, const Col& c) const { return x + (r.at + c.tap); }
  EMORL_DEVICE float get(const Row& r, const Col& c) const { return padding(r, c) ? 0.f : *input(r, c); }
  EMORL_DEVICE float operator()(int m, int k) const { return get(row(m), col(k)); }
  // row(m) -> row(m + d) and col(k) -> col(k + d) without divisions (d > 0; past the last row or
  // column they go on counting, harmlessly: such elements are never read)
  EMORL_DEVICE void step(Row& r, int d) const {
    r.ix0 += d * g.sw;
    r.at += static_cast<i64>(d) * g.sw * g.C;
    while (r.ix0 >= g.Wo * g.sw - g.pl) {
      r.ix0 -= g.Wo * g.sw;
      r.iy0 += g.sh;
      r.at += static_cast<i64>(g.sh * g.W - g.Wo * g.sw) * g.C;
      if (r.iy0 >= g.Ho * g.sh - g.pt) {
        r.iy0 -= g.Ho * g.sh;
        r.at += static_cast<i64>(g.H - g.Ho * g.sh) * g.W * g.C;
      }
    }
  }
  // from (ky, kw - 1, C - 1) to (ky + 1, 0, 0) the tap offset goes (W - kw)·C further than by 1
  EMORL_DEVICE void step(Col& c, int d) const { step_tap(c.ky, c.kx, c.ci, c.tap, g.C, g.kw, 0, (g.W - g.kw) * g.C, d); }
  // a run along k is four channels of one pixel
  EMORL_DEVICE bool runs_in_rows() const { return g.C % 4 == 0 && aligned16(x); }
  EMORL_DEVICE bool runs_in_cols() const { return false; }
  EMORL_DEVICE void get4(const Row& r, const Col& c, float (&v)[4]) const {
    if (padding(r, c)) return zero4(v);
    load4(input(r, c), v);
  }
};

// The same matrix transposed (row m = column k of im2col): the filter gradient's A operand.
struct Im2colT {
  Im2col cols;
  bool kfast = false;
  static constexpr bool kRunsDownCols = true;
  using Row = Im2col::Col;
  using Col = Im2col::Row;
  EMORL_DEVICE Row row(int m) const { return cols.col(m); }
  EMORL_DEVICE Col col(int k) const { return cols.row(k); }
  EMORL_DEVICE float get(const Row& r, const Col& c) const { return cols.get(c, r); }
  EMORL_DEVICE float operator()(int m, int k) const { return get(row(m), col(k)); }
  EMORL_DEVICE void step(Row& r, int d) const { cols.step(r, d); }
  EMORL_DEVICE void step(Col& c, int d) const { cols.step(c, d); }
  EMORL_DEVICE bool runs_in_rows() const { return false; }
  EMORL_DEVICE bool runs_in_cols() const { return cols.runs_in_rows(); }
  EMORL_DEVICE void get4(const Row& r, const Col& c, float (&v)[4]) const { cols.get4(c, r, v); }
};

// The column-side map y [N,Ho,Wo,Cc] gathered at image pixels: row m = (n, iy, ix), column
// k = (ky, kx, cc), the value of the output cell that tap (ky, kx) of pixel (iy, ix) feeds.
struct ColGather {
  const float* y;
  Geom g;
  int Cc;
  bool kfast = true;
  static constexpr bool kRunsDownCols = false;
  // the map's offset; (ny0, nx0) = (iy + pt, ix + pl); at stride 1, the offset of cell (ny0, nx0)
  // (outside the map: never read)
  struct Row { i64 base, at; int ny0, nx0; };
  // the tap; at stride 1 the cell it reads is `tap` = cc − (ky·Wo + kx)·Cc from the row's `at`
  struct Col { int ky, kx, cc, tap; };
  EMORL_DEVICE Row row(int m) const {
    const int ix = m % g.W, t = m / g.W, iy = t % g.H, n = t / g.H;
    const i64 base = static_cast<i64>(n) * g.Ho * g.Wo * Cc;
    const int ny0 = iy + g.pt, nx0 = ix + g.pl;
    return Row{base, base + (static_cast<i64>(ny0) * g.Wo + nx0) * Cc, ny0, nx0};
  }
  EMORL_DEVICE Col col(int k) const {
    const int cc = k % Cc, t = k / Cc, ky = t / g.kw, kx = t % g.kw;
    return Col{ky, kx, cc, cc - (ky * g.Wo + kx) * Cc};
  }
  // the offset of the output cell that tap c of pixel r feeds, or -1 where there is none (outside
  // the map, or between a strided map's cells)
  EMORL_DEVICE i64 cell(const Row& r, const Col& c) const {
    int oy = r.ny0 - c.ky, ox = r.nx0 - c.kx;
    if (g.sh == 1 && g.sw == 1)  // the common case: no integer divisions, unsigned bounds checks
      return static_cast<unsigned>(oy) < static_cast<unsigned>(g.Ho) && static_cast<unsigned>(ox) < static_cast<unsigned>(g.Wo) ? r.at + c.tap : -1;
    if (oy < 0 || ox < 0 || oy % g.sh || ox % g.sw) return -1;
    oy /= g.sh, ox /= g.sw;
    if (oy >= g.Ho || ox >= g.Wo) return -1;
    return r.base + (static_cast<i64>(oy) * g.Wo + ox) * Cc + c.cc;
  }
  EMORL_DEVICE float get(const Row& r, const Col& c) const {
    const i64 at = cell(r, c);
    return at < 0 ? 0.f : y[at];
  }
  EMORL_DEVICE float operator()(int m, int k) const { return get(row(m), col(k)); }
  // the tap offset moves by −Cc per kx and −Wo·Cc per ky: beyond the channels' 1, −2·Cc to the next
  // tap, (kw − 2 − Wo)·Cc to the next row of taps
  EMORL_DEVICE void step(Col& c, int d) const { step_tap(c.ky, c.kx, c.cc, c.tap, Cc, g.kw, -2 * Cc, (g.kw - 2 - g.Wo) * Cc, d); }
  // a run along k is four channels of one output cell
  EMORL_DEVICE bool runs_in_rows() const { return Cc % 4 == 0 && aligned16(y); }
  EMORL_DEVICE bool runs_in_cols() const { return false; }
  EMORL_DEVICE void get4(const Row& r, const Col& c, float (&v)[4]) const {
    const i64 at = cell(r, c);
    if (at < 0) return zero4(v);
    load4(y + at, v);
  }
};

// ---- GEMM epilogues -----------------------------------------------------------------------

// out[m, n] = act(v + bias[n])
struct Store {
  float* out;
  int ldc;
  const float* bias;
  int act;
  EMORL_DEVICE void operator()(int m, int n, float v, int) const {
    out[static_cast<i64>(m) * ldc + n] = activate(v + (bias ? bias[n] : 0.f), act);
  }
};

// out[m, n] = v ⊙ act'(at y[m, n]): a layer's input gradient written already taken back through
// the activation of the layer below (y: that layer's output), which saves act_grad's pass over it.
struct StoreThroughAct {
  float* out;
  int ldc;
  const float* y;
  int act;
  EMORL_DEVICE void operator()(int m, int n, float v, int) const {
    const i64 at = static_cast<i64>(m) * ldc + n;
    out[at] = through_act(v, y[at], act);
  }
};

// out[m, n] += v: a product added onto what is there (each element written by one thread).
struct AddTo {
  float* out;
  int ldc;
  EMORL_DEVICE void operator()(int m, int n, float v, int) const { out[static_cast<i64>(m) * ldc + n] += v; }
};

// one split's partial sum: part[split, m, n]
struct Partial {
  float* part;
  i64 split_stride;
  int ldc;
  EMORL_DEVICE void operator()(int m, int n, float v, int split) const {
    part[split * split_stride + static_cast<i64>(m) * ldc + n] = v;
  }
};

// C[M,N] = Σ_k A(m,k)·B(k,n) over this block's share of k (blockIdx.z), handed to the epilogue.
template <class A, class B, class E>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(A a, B b, E e, int M, int N, int K, int kchunk) {
  __shared__ float As[kDepth][kTile + 4];
  __shared__ float Bs[kDepth][kTile + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int m0 = blockIdx.x * kTile, n0 = blockIdx.y * kTile;
  const int kbeg = blockIdx.z * kchunk, kend = imin(K, kbeg + kchunk);
  float acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int k0 = kbeg; k0 < kend; k0 += kDepth) {
    for (int i = 0; i < kTile * kDepth / kGemmThreads; ++i) {
      const int idx = tid + i * kGemmThreads;
      const int mm = a.kfast ? idx / kDepth : idx % kTile, kk = a.kfast ? idx % kDepth : idx / kTile;
      const int m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < M && k < kend) ? a(m, k) : 0.f;
    }
    for (int i = 0; i < kTile * kDepth / kGemmThreads; ++i) {
      const int idx = tid + i * kGemmThreads;
      const int nn = b.kfast ? idx / kDepth : idx % kTile, kk = b.kfast ? idx % kDepth : idx / kTile;
      const int n = n0 + nn, k = k0 + kk;
      Bs[kk][nn] = (n < N && k < kend) ? b(k, n) : 0.f;
    }
    __syncthreads();
    for (int kk = 0; kk < kDepth; ++kk) {
      float ar[4], br[4];
      for (int i = 0; i < 4; ++i) ar[i] = As[kk][ty + 16 * i];
      for (int j = 0; j < 4; ++j) br[j] = Bs[kk][tx + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += ar[i] * br[j];
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < M && n < N) e(m, n, acc[i][j], static_cast<int>(blockIdx.z));
    }
}

// The k loop of the tiled kernels: the first tile fetched into registers and staged in shared
// memory, then for each tile the next one fetched while multiply(kk) runs the tile's BK steps,
// and staged once every thread is done with the current one.
template <int BK, class Fetch, class Stage, class Multiply>
EMORL_DEVICE void pipelined_k_tiles(int kbeg, int kend, const Fetch& fetch, const Stage& stage, const Multiply& multiply) {
  if (kbeg < kend) {
    fetch(kbeg);
    stage();
  }
  __syncthreads();
  for (int k0 = kbeg; k0 < kend; k0 += BK) {
    const bool more = k0 + BK < kend;
    if (more) fetch(k0 + BK);  // in flight while this tile is multiplied
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int kk = 0; kk < BK; ++kk) multiply(kk);
    __syncthreads();
    if (more) stage();
    __syncthreads();
  }
}

// The same product with taller tiles, BM x BN per block of 256 threads, TM x TN per thread, and
// the next k tile's operands loaded into registers while the current one is multiplied. Each
// thread stages the same A and B elements (same rows / columns, same offsets within the k tile)
// in every k tile, so it splits their indices into row parts once per block and only the k parts
// per tile (the im2col gathers' divisions).
template <int BM, int BN, int TM, int TN, class A, class B, class E>
__global__ void __launch_bounds__(kGemmThreads) gemm_tiled_kernel(A a, B b, E e, int M, int N, int K, int kchunk) {
  constexpr int BK = kDepth, NT = kGemmThreads, TX = BN / TN, TY = BM / TM;
  constexpr int A_PER = BM * BK / NT, B_PER = BN * BK / NT;
  static_assert(TX * TY == NT && NT % BM == 0 && NT % BN == 0 && NT % BK == 0, "tile shape");
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int kbeg = blockIdx.z * kchunk, kend = imin(K, kbeg + kchunk);
  // this thread's staged elements: A (mm[i], ka[i]), B (kb[j], nn[j]), fixed across k tiles
  int mm[A_PER], ka[A_PER], nn[B_PER], kb[B_PER];
  typename A::Row arow[A_PER];
  typename B::Col bcol[B_PER];
  for (int i = 0; i < A_PER; ++i) {
    const int idx = tid + i * NT;
    mm[i] = a.kfast ? idx / BK : idx % BM;
    ka[i] = a.kfast ? idx % BK : idx / BM;
    arow[i] = a.row(m0 + mm[i] < M ? m0 + mm[i] : 0);
  }
  for (int j = 0; j < B_PER; ++j) {
    const int idx = tid + j * NT;
    nn[j] = b.kfast ? idx / BK : idx % BN;
    kb[j] = b.kfast ? idx % BK : idx / BN;
    bcol[j] = b.col(n0 + nn[j] < N ? n0 + nn[j] : 0);
  }
  float ra[A_PER], rb[B_PER];
  auto fetch = [&](int k0) {
    for (int i = 0; i < A_PER; ++i) {
      const int k = k0 + ka[i];
      ra[i] = (m0 + mm[i] < M && k < kend) ? a.get(arow[i], a.col(k)) : 0.f;
    }
    for (int j = 0; j < B_PER; ++j) {
      const int k = k0 + kb[j];
      rb[j] = (n0 + nn[j] < N && k < kend) ? b.get(b.row(k), bcol[j]) : 0.f;
    }
  };
  auto stage = [&]() {
    for (int i = 0; i < A_PER; ++i) As[ka[i]][mm[i]] = ra[i];
    for (int j = 0; j < B_PER; ++j) Bs[kb[j]][nn[j]] = rb[j];
  };
  float acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  pipelined_k_tiles<BK>(kbeg, kend, fetch, stage, [&](int kk) {
    float fa[TM], fb[TN];
    for (int i = 0; i < TM; ++i) fa[i] = As[kk][ty + i * TY];
    for (int j = 0; j < TN; ++j) fb[j] = Bs[kk][tx + j * TX];
    for (int i = 0; i < TM; ++i)
      for (int j = 0; j < TN; ++j) acc[i][j] += fa[i] * fb[j];
  });
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) {
      const int m = m0 + ty + i * TY, n = n0 + tx + j * TX;
      if (m < M && n < N) e(m, n, acc[i][j], static_cast<int>(blockIdx.z));
    }
}

// n consecutive floats of shared memory into registers, as 128-bit (or 64-bit) loads on a GPU:
// one load instruction where the scalar form takes four.
template <int n>
EMORL_DEVICE void load_run(const float* p, float (&out)[n]) {
#if defined(__CUDACC__)
  if constexpr (n % 4 == 0) {
#pragma unroll
    for (int i = 0; i < n / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(p)[i];
      out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
    }
  } else if constexpr (n == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x, out[1] = v.y;
  } else {
    for (int i = 0; i < n; ++i) out[i] = p[i];
  }
#else
  if constexpr (n % 4 == 0 || n == 2) check_vector_access(p, n == 2 ? 8 : 16);
  for (int i = 0; i < n; ++i) out[i] = p[i];
#endif
}

// 16-byte aligned: four floats into shared memory in one 128-bit store on a GPU.
EMORL_DEVICE void store4(float* p, const float (&v)[4]) {
#if defined(__CUDACC__)
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
#else
  check_vector_access(p, 16);
  for (int j = 0; j < 4; ++j) p[j] = v[j];
#endif
}

// A run into a shared tile S[k][mn] from (k, mn): along mn in one 128-bit store, or along k in four,
// in an order rotated by the run's place in k so that a warp's stores fall in distinct banks (the
// tiles' rows are 4 floats longer than a multiple of 32).
template <int P>
EMORL_DEVICE void stage_run(float (*S)[P], bool along_k, int k, int mn, const float (&v)[4]) {
  if (!along_k) return store4(&S[k][mn], v);
  const int rot = k & 8 ? 2 : 0;
  for (int j = 0; j < 4; ++j) S[k + (j ^ rot)][mn] = rot ? v[j ^ 2] : v[j];
}

// A run of four read element by element, zeros past the first `inside`: for layouts without
// contiguous runs, and at a product's edges.
struct Run4 {
  float v[4];
};
template <class Op>
EMORL_DEVICE_COLD Run4 run_by_elements(const Op op, bool along_cols, typename Op::Row row, typename Op::Col col, int inside) {
  Run4 r;
  for (int j = 0; j < 4; ++j) {
    r.v[j] = j < inside ? op.get(row, col) : 0.f;
    if constexpr (Op::kRunsDownCols) {
      if (!along_cols) {
        op.step(row, 1);
        continue;
      }
    }
    op.step(col, 1);
  }
  return r;
}

// The product of gemm_tiled_kernel, the same sums in the same order, with what bounds that
// kernel's inner loops taken out of them:
// - each thread's TM x TN cells are TM consecutive rows by TN consecutive columns, so a k step
//   reads them from shared memory in TM/4 + TN/4 vector loads (the strided cells of
//   gemm_tiled_kernel take TM + TN scalar loads, more than its multiply-adds can hide);
// - the operands are staged in runs of four elements along their contiguous direction (k when
//   the operand is kfast, else m or n): one 128-bit load and one bounds check per run where the
//   operand's layout allows (get4), element by element otherwise and at the product's edges;
// - each run keeps its operand's index parts for row and k and steps the k part by one tile
//   (step(): additions, a wrap now and then) instead of decomposing k again (integer divisions
//   by the map's sizes) every tile.
// At most 128 registers a thread, so that two blocks share a multiprocessor.
template <int BM, int BN, int TM, int TN, class A, class B, class E>
__global__ void __launch_bounds__(kGemmThreads, 2) gemm_stepped_kernel(A a, B b, E e, int M, int N, int K, int kchunk) {
  constexpr int BK = kDepth, NT = kGemmThreads, TX = BN / TN, TY = BM / TM;
  constexpr int AQ = BM * BK / 4, BQ = BN * BK / 4;  // runs of four per tile
  constexpr int A_PER = (AQ + NT - 1) / NT, B_PER = (BQ + NT - 1) / NT;
  static_assert(TX * TY == NT && BM % 4 == 0 && BN % 4 == 0 && BK % 4 == 0, "tile shape");
  static_assert(TM % 4 == 0 && (TN % 4 == 0 || TN == 2), "vector loads of the cells");
  alignas(16) __shared__ float As[BK][BM + 4];
  alignas(16) __shared__ float Bs[BK][BN + 4];
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int kbeg = blockIdx.z * kchunk, kend = imin(K, kbeg + kchunk);
  const bool avec = a.kfast ? a.runs_in_rows() : a.runs_in_cols();
  const bool bvec = b.kfast ? b.runs_in_cols() : b.runs_in_rows();
  // this thread's runs: A's i-th starts at (m0 + am[i], k0 + ak[i]), B's j-th at (k0 + bk[j], n0 + bn[j])
  int am[A_PER], ak[A_PER], bk[B_PER], bn[B_PER];
  typename A::Row arow[A_PER];
  typename A::Col acol[A_PER];
  typename B::Row brow[B_PER];
  typename B::Col bcol[B_PER];
  for (int i = 0; i < A_PER; ++i) {
    const int q = (tid + i * NT) % AQ;  // (a thread past the runs keeps valid indices; fetch and stage skip it)
    am[i] = a.kfast ? q / (BK / 4) : q % (BM / 4) * 4;
    ak[i] = a.kfast ? q % (BK / 4) * 4 : q / (BM / 4);
    arow[i] = a.row(m0 + am[i] < M ? m0 + am[i] : 0);
    acol[i] = a.col(kbeg + ak[i]);
  }
  for (int j = 0; j < B_PER; ++j) {
    const int q = (tid + j * NT) % BQ;
    bn[j] = b.kfast ? q / (BK / 4) : q % (BN / 4) * 4;
    bk[j] = b.kfast ? q % (BK / 4) * 4 : q / (BN / 4);
    brow[j] = b.row(kbeg + bk[j]);
    bcol[j] = b.col(n0 + bn[j] < N ? n0 + bn[j] : 0);
  }
  // a run into v: four elements from (row, col) along the operand's columns or rows; `inside`:
  // how many of them lie in the product
  auto run = [](const auto& op, bool vec, bool along_cols, auto row, auto col, int inside, float(&v)[4]) {
    if (vec && inside == 4) return op.get4(row, col, v);
    const Run4 r = run_by_elements(op, along_cols, row, col, inside);
    for (int j = 0; j < 4; ++j) v[j] = r.v[j];
  };
  auto inside = [](int lim) { return lim < 0 ? 0 : lim > 4 ? 4 : lim; };
  float ra[A_PER][4] = {}, rb[B_PER][4] = {};
  // a block whose rows and columns all lie in the product (most blocks) has every run of a k
  // tile that ends by kend inside it: such tiles skip the runs' bounds
  const int kwhole = m0 + BM <= M && n0 + BN <= N ? kend : -1;
  // the tile at k0 into registers; the k parts then step on to the next tile
  auto fetch = [&](int k0) {
    const bool whole = k0 + BK <= kwhole;
    for (int i = 0; i < A_PER; ++i) {
      if (AQ % NT && tid + i * NT >= AQ) continue;
      const int m = m0 + am[i], k = k0 + ak[i];
      const int n_in = whole ? 4 : a.kfast ? (m < M ? inside(kend - k) : 0) : (k < kend ? inside(M - m) : 0);
      run(a, avec, a.kfast, arow[i], acol[i], n_in, ra[i]);
      a.step(acol[i], BK);
    }
    for (int j = 0; j < B_PER; ++j) {
      if (BQ % NT && tid + j * NT >= BQ) continue;
      const int k = k0 + bk[j], n = n0 + bn[j];
      const int n_in = whole ? 4 : b.kfast ? (n < N ? inside(kend - k) : 0) : (k < kend ? inside(N - n) : 0);
      run(b, bvec, !b.kfast, brow[j], bcol[j], n_in, rb[j]);
      b.step(brow[j], BK);
    }
  };
  auto stage = [&]() {
    for (int i = 0; i < A_PER; ++i)
      if (!(AQ % NT && tid + i * NT >= AQ)) stage_run(As, a.kfast, ak[i], am[i], ra[i]);
    for (int j = 0; j < B_PER; ++j)
      if (!(BQ % NT && tid + j * NT >= BQ)) stage_run(Bs, b.kfast, bk[j], bn[j], rb[j]);
  };
  float acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  pipelined_k_tiles<BK>(kbeg, kend, fetch, stage, [&](int kk) {
    float fa[TM], fb[TN];
    load_run(&As[kk][ty * TM], fa);
    load_run(&Bs[kk][tx * TN], fb);
    for (int i = 0; i < TM; ++i)
      for (int j = 0; j < TN; ++j) acc[i][j] += fa[i] * fb[j];
  });
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) {
      const int m = m0 + ty * TM + i, n = n0 + tx * TN + j;
      if (m < M && n < N) e(m, n, acc[i][j], static_cast<int>(blockIdx.z));
    }
}

inline int as_int(i64 v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max()) throw std::length_error(std::string("GPU decoder: ") + what + " too large");
  return static_cast<int>(v);
}

// The k range cut into about `splits` chunks of whole k tiles: the chunk length, and how many
// chunks that makes (fewer than asked when K is short).
struct KChunks {
  i64 length, count;
};
inline KChunks k_chunks(i64 K, i64 splits) {
  const i64 per = (K + splits - 1) / splits;
  const i64 length = std::max<i64>(kDepth, (per + kDepth - 1) / kDepth * kDepth);
  return KChunks{length, K ? (K + length - 1) / length : 1};
}

// Which GEMM kernel runs the products (EMORL_GPU_GEMM): stepped (the default: gemm_stepped_kernel,
// 128 x 32 tiles with 4 x 4 cells a thread for narrow products, 128 x 64 with 8 x 4 otherwise),
// tiled (gemm_tiled_kernel, the same tiles with 8 x 2 / 8 x 4 strided cells) or simple (64x64
// tiles, gemm_kernel), kept so that they can be compared on a GPU (emorl_gpu_check times each).
enum class GemmVariant { Stepped, Tiled, Simple };
inline GemmVariant gemm_variant() {
  const char* v = std::getenv("EMORL_GPU_GEMM");
  if (!v || !*v || std::string(v) == "stepped") return GemmVariant::Stepped;
  if (std::string(v) == "tiled") return GemmVariant::Tiled;
  if (std::string(v) == "simple") return GemmVariant::Simple;
  throw std::invalid_argument(std::string("EMORL_GPU_GEMM must be 'stepped', 'tiled' or 'simple', got '") + v + "'");
}

// splits > 1: the k range is cut into that many chunks, one per grid z (a Partial epilogue).
template <class A, class B, class E>
inline void gemm(const A& a, const B& b, const E& e, i64 M, i64 N, i64 K, i64 splits = 1) {
  if (M == 0 || N == 0) return;
  const KChunks ch = k_chunks(K, splits);
  if (ch.count != splits) throw std::logic_error("GPU decoder: split count mismatch");
  const int m = as_int(M, "M"), n = as_int(N, "N"), k = as_int(K, "K"), kc = as_int(ch.length, "k chunk"), zs = as_int(ch.count, "splits");
  const GemmVariant variant = gemm_variant();
  const bool narrow = N <= 32;
  const dim3 tiles(as_int((M + 127) / 128, "M"), as_int(narrow ? (N + 31) / 32 : (N + 63) / 64, "N"), zs);
  if (variant == GemmVariant::Simple) {
    launch(gemm_kernel<A, B, E>, dim3(as_int((M + kTile - 1) / kTile, "M"), as_int((N + kTile - 1) / kTile, "N"), zs), dim3(kGemmThreads),
           a, b, e, m, n, k, kc);
  } else if (variant == GemmVariant::Tiled) {
    if (narrow) launch(gemm_tiled_kernel<128, 32, 8, 2, A, B, E>, tiles, dim3(kGemmThreads), a, b, e, m, n, k, kc);
    else launch(gemm_tiled_kernel<128, 64, 8, 4, A, B, E>, tiles, dim3(kGemmThreads), a, b, e, m, n, k, kc);
  } else {
    if (narrow) launch(gemm_stepped_kernel<128, 32, 4, 4, A, B, E>, tiles, dim3(kGemmThreads), a, b, e, m, n, k, kc);
    else launch(gemm_stepped_kernel<128, 64, 8, 4, A, B, E>, tiles, dim3(kGemmThreads), a, b, e, m, n, k, kc);
  }
}

// dx [M, N] = A · B, a layer's input gradient, written already taken through the activation of
// the layer below (y_below: that layer's output), or as it is where that layer has none.
template <class A, class B>
inline void gemm_through_act(const A& a, const B& b, float* dx, int ldc, const float* y_below, Act act, i64 M, i64 N, i64 K) {
  if (act != Act::Linear) gemm(a, b, StoreThroughAct{dx, ldc, y_below, static_cast<int>(act)}, M, N, K);
  else gemm(a, b, Store{dx, ldc, nullptr, 0}, M, N, K);
}

// The split count gemm() accepts for a Partial epilogue over a long k range.
inline i64 filter_splits(i64 K) { return k_chunks(K, std::min<i64>(64, std::max<i64>(1, K / kRowsPerSplit))).count; }

// ---- elementwise and reduction kernels (grid-stride loops) -----------------------------------

#define EMORL_GRID_LOOP(i, n) \
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += static_cast<i64>(gridDim.x) * blockDim.x)

inline dim3 grid_for(i64 n) { return dim3(static_cast<unsigned>(std::max<i64>(1, std::min<i64>(kMaxBlocks, (n + kThreads - 1) / kThreads)))); }

// dy ⊙ act'(pre-activation), from the post-activation y, in place.
__global__ void act_grad_kernel(float* dy, const float* y, i64 n, int act) {
  EMORL_GRID_LOOP(i, n) dy[i] = through_act(dy[i], y[i], act);
}

// dy ⊙ act'(y) in place, on the device (act: 1 ReLU, 2 ELU).
inline void act_grad(float* dy, const float* y, i64 n, int act) { launch(act_grad_kernel, grid_for(n), dim3(kThreads), dy, y, n, act); }

// Column sums of `batch` matrices v[b, rows, cols] in one launch. Block (x, y, z) sums chunk y of
// the rows for 32 columns of matrix z (32 columns × 8 row lanes). With one chunk that is the
// answer; otherwise each block leaves its partial sums in `part`, and the last of a column
// group's blocks to arrive (counted in `arrivals`, which it leaves at zero again) adds the chunks'
// sums in chunk order, in double: the same bits whichever block comes last.
__global__ void col_sums_kernel(const float* v, i64 rows, i64 cols, i64 rows_per_chunk, float* part, float* arrivals, float* out) {
  __shared__ float lanes[8][33];
  __shared__ bool last;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const i64 j = static_cast<i64>(blockIdx.x) * 32 + tx, b = blockIdx.z, chunk = blockIdx.y, chunks = gridDim.y;
  const i64 r0 = chunk * rows_per_chunk, r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  const bool writer = ty == 0 && j < cols;  // lane 0 of a column in the matrix: its sums
  float acc = 0.f;
  if (j < cols)
    for (i64 r = r0 + ty; r < r1; r += 8) acc += v[(b * rows + r) * cols + j];
  lanes[ty][tx] = acc;
  __syncthreads();
  float t = 0.f;
  if (writer)
    for (int y = 0; y < 8; ++y) t += lanes[y][tx];
  if (chunks == 1) {
    if (writer) out[b * cols + j] = t;
    return;
  }
  if (writer) part[(b * chunks + chunk) * cols + j] = t;
  __threadfence();  // this block's partial sums reach the device before it counts itself in
  __syncthreads();
  // counted in floats: exact (chunks ≤ 256), and the counters are a float buffer like the rest
  if (tx == 0 && ty == 0) last = atomicAdd(&arrivals[b * gridDim.x + blockIdx.x], 1.f) == static_cast<float>(chunks - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();  // (acquire) the other blocks' sums, counted in before this block, are read after
  if (writer) {
    const volatile float* sums = part;  // the other blocks' writes: past this SM's L1
    double s = 0;
    for (i64 c = 0; c < chunks; ++c) s += sums[(b * chunks + c) * cols + j];
    out[b * cols + j] = static_cast<float>(s);
  }
  if (tx == 0 && ty == 0) arrivals[b * gridDim.x + blockIdx.x] = 0.f;
}

// w[col][img][ky][kx] (PyTorch layout) packed as Wf[(ky,kx,img), col] and / or Wd[(ky,kx,col), img]
// (either may be null), as pack_weights does on the host.
__global__ void pack_weights_kernel(const float* w, i64 ncol, i64 nimg, i64 kh, i64 kw, float* wf, float* wd) {
  EMORL_GRID_LOOP(i, ncol * nimg * kh * kw) {
    const i64 kx = i % kw, ky = (i / kw) % kh, img = (i / (kw * kh)) % nimg, col = i / (kw * kh * nimg);
    if (wf) wf[((ky * kw + kx) * nimg + img) * ncol + col] = w[i];
    if (wd) wd[((ky * kw + kx) * ncol + col) * nimg + img] = w[i];
  }
}

// dw[col, img, ky, kx] = Σ_split part[split, (ky, kx, img), col]
__global__ void filter_grad_reduce_kernel(const float* part, int splits, int ncol, int nimg, int kh, int kw, float* dw) {
  const i64 P = static_cast<i64>(kh) * kw * nimg;
  EMORL_GRID_LOOP(i, P * ncol) {
    const int kx = static_cast<int>(i % kw), ky = static_cast<int>((i / kw) % kh);
    const int img = static_cast<int>((i / (static_cast<i64>(kw) * kh)) % nimg), col = static_cast<int>(i / P);
    const i64 p = (static_cast<i64>(ky) * kw + kx) * nimg + img;
    float t = 0.f;
    for (int s = 0; s < splits; ++s) t += part[(s * P + p) * ncol + col];
    dw[i] = t;
  }
}

// ---- host side --------------------------------------------------------------------------------

// The state buffers (DeviceWorkspace::state) of a stage's device-resident parameters (gpu.h DeviceParams)
enum StateKey : uint64_t { kGradState = 1, kFirstMomentState, kSecondMomentState, kNormState };

// What a slot holds of a tagged tensor: its data as it is, packed for the forward (Wf) or the
// data-gradient (Wd) product, or (a decoder's first layer) its tap-class sums. slot_tag gives each
// (tag, form) its own slot tag.
enum TagForm : uint64_t { kAsIs = 1, kPackedForward = 2, kPackedDataGrad = 3, kTapSums = 4 };
inline uint64_t slot_tag(uint64_t tag, TagForm form) { return tag ? tag * 8 + form : 0; }

class DeviceWorkspace final : public GpuWorkspace {
 public:
  explicit DeviceWorkspace(int device) : device_(device) {}
  ~DeviceWorkspace() override {
    try {
      select_device(device_);  // free on the device the buffers live on
    } catch (...) {
    }
  }
  // Slot `slot`'s buffer, grown to at least n floats. n > 0 is a request to write it: the slot
  // forgets the tag of what upload_tagged left there, and under the emulator its old contents
  // become NaN (a kernel that reads what its call did not write fails there); n = 0 returns it
  // as it is (to read).
  float* buf(size_t slot, size_t n) {
    if (slot >= bufs_.size()) {
      bufs_.resize(slot + 1);
      tags_.resize(slot + 1, 0);
      sources_.resize(slot + 1);
    }
    if (!bufs_[slot]) bufs_[slot].reset(new DeviceBuf());
    if (bufs_[slot]->size() < n || !bufs_[slot]->data()) {
      bufs_[slot]->reset(n);
    } else if (n) {
      bufs_[slot]->poison();
    }
    if (n) {
      tags_[slot] = 0;
      sources_[slot].clear();
    }
    return bufs_[slot]->data();
  }
  // What slot `slot` was computed from: content tags (none 0) of the tensors it was made of, so that
  // a later call that would make it from the same takes it as it is (made_from). buf(slot, n > 0)
  // forgets them.
  void set_sources(size_t slot, std::vector<uint64_t> sources) {
    buf(slot, 0);
    sources_[slot] = std::move(sources);
  }
  bool made_from(size_t slot, const std::vector<uint64_t>& sources) const {
    return slot < sources_.size() && !sources.empty() && sources_[slot] == sources;
  }
  // n floats that the caller tags (tag != 0: the same tag means the same contents, e.g. a weight
  // tensor's data): when the slot already holds `tag`, nothing is copied (nor computed: fill()
  // gives the host data only when it is needed). Weights stay on the device from step to step.
  template <class Fill>
  float* upload_tagged(size_t slot, uint64_t tag, size_t n, Fill fill) {
    return compute_tagged(slot, tag, n, [&](float* d) { up(d, fill(), n); });
  }
  // n floats that fill(dst) writes into the slot (computed on the device, or uploaded), kept under
  // `tag` the same way.
  template <class Fill>
  float* compute_tagged(size_t slot, uint64_t tag, size_t n, Fill fill) {
    if (slot_holds(slot, tag) && bufs_[slot]->size() >= n) return bufs_[slot]->data();
    float* d = buf(slot, n);
    fill(d);
    tags_[slot] = tag;
    return d;
  }
  // Host <-> device copies of n floats, counted in traffic(); upload() into slot `slot` (grown to n).
  void up(float* dst, const float* src, size_t n) {
    to_device(dst, src, n);
    traffic_.up_bytes += n * sizeof(float);
    ++traffic_.uploads;
  }
  float* upload(size_t slot, const float* src, size_t n) {
    float* d = buf(slot, n);
    up(d, src, n);
    return d;
  }
  void down(float* dst, const float* src, size_t n) {
    to_host(dst, src, n);
    traffic_.down_bytes += n * sizeof(float);
    ++traffic_.downloads;
  }
  GpuTraffic traffic() const override { return traffic_; }
  size_t bytes() const override {
    size_t b = 0;
    for (const auto& x : bufs_)
      if (x) b += x->size() * sizeof(float);
    for (const auto& e : sums_)
      for (const auto& x : e.bufs)
        if (x) b += x->size() * sizeof(float);
    for (const auto& e : kept_)
      for (const auto& x : e.bufs)
        if (x) b += x->size() * sizeof(float);
    for (const auto& e : state_) b += e.buf->size() * sizeof(float);
    if (arrivals_) b += arrivals_->size() * sizeof(float);
    return b;
  }
  int device() const override { return device_; }
  // Activations a forward call leaves on the device for its backward call: stamp() marks a new
  // set (returned to the caller), holds(g) says whether set g is still the one there.
  uint64_t stamp() { return resident_ = ++stamps_; }
  // A new id for data a call leaves in slots of its own (from the stamps' counter, so never one
  // of them), and the slot tags that say which call's data a slot holds now (buf(slot, n > 0)
  // clears them).
  uint64_t next_id() { return ++stamps_; }
  void tag_slot(size_t slot, uint64_t tag) {
    buf(slot, 0);
    tags_[slot] = tag;
  }
  bool slot_holds(size_t slot, uint64_t tag) const { return tag && slot < tags_.size() && tags_[slot] == tag; }
  bool holds(uint64_t g) const { return g != 0 && g == resident_; }
  void forget() { resident_ = 0; }
  // Gradients summed on the device over several calls for a later call that consumes them (one
  // encoder pass's dk, dv over its attention rounds), under an id (0: none). sum(id, which, n):
  // buffer `which` (0, 1) of the id's sums, at zero when first asked for; drop_sums(id) frees them
  // (consumed), drop_sums() every id's (a new pass begins, so an abandoned backward pass leaves
  // nothing behind).
  float* sum(uint64_t id, size_t which, size_t n) {
    if (!id || which > 1) throw std::invalid_argument("GPU workspace: a sum needs an id and buffer 0 or 1");
    auto it = std::find_if(sums_.begin(), sums_.end(), [&](const Sums& e) { return e.id == id; });
    if (it == sums_.end()) it = sums_.insert(sums_.end(), Sums{id, {}});
    std::unique_ptr<DeviceBuf>& b = it->bufs[which];
    if (!b || b->size() < n) {
      if (b && b->size()) throw std::invalid_argument("GPU workspace: a sum's buffer asked for at two sizes");
      b.reset(new DeviceBuf());
      b->reset(n);
      zero(b->data(), n);
    }
    return b->data();
  }
  void drop_sums(uint64_t id) {
    sums_.erase(std::remove_if(sums_.begin(), sums_.end(), [&](const Sums& e) { return e.id == id; }), sums_.end());
  }
  void drop_sums() { sums_.clear(); }
  // Sets of buffers a call leaves on the device for a later call to consume, under an id (a
  // decoding stage's parameter gradients until the pass's sum of them): kept(id, which, n) gives
  // buffer `which` of the set at n floats (to write; made when new, the oldest set dropped past
  // kMaxKeptSets: one an abandoned pass left behind); kept_buf(id, which, n) the buffer as it is
  // (an error naming id and buffer when it is not there at that size); drop_kept(id) frees the set.
  static constexpr size_t kMaxKeptSets = 32;
  float* kept(uint64_t id, size_t which, size_t n) {
    if (!id) throw std::invalid_argument("GPU workspace: a kept set needs an id");
    auto it = std::find_if(kept_.begin(), kept_.end(), [&](const Kept& e) { return e.id == id; });
    if (it == kept_.end()) {
      if (kept_.size() >= kMaxKeptSets) kept_.erase(kept_.begin());
      it = kept_.insert(kept_.end(), Kept{id, {}});
    }
    if (it->bufs.size() <= which) it->bufs.resize(which + 1);
    std::unique_ptr<DeviceBuf>& b = it->bufs[which];
    if (!b) b.reset(new DeviceBuf());
    if (b->size() != n) b->reset(n);
    return b->data();
  }
  float* kept_buf(uint64_t id, size_t which, size_t n) {
    auto it = std::find_if(kept_.begin(), kept_.end(), [&](const Kept& e) { return e.id == id; });
    if (it == kept_.end() || it->bufs.size() <= which || !it->bufs[which] || it->bufs[which]->size() != n)
      throw std::invalid_argument("GPU workspace: kept set " + std::to_string(id) + " has no buffer " + std::to_string(which) + " of " +
                                  std::to_string(n) + " floats" + (it == kept_.end() ? " (the set is gone)" : ""));
    return it->bufs[which]->data();
  }
  void drop_kept(uint64_t id) {
    kept_.erase(std::remove_if(kept_.begin(), kept_.end(), [&](const Kept& e) { return e.id == id; }), kept_.end());
  }
  // Buffers that outlive every call (an optimizer's moments, a pass's summed gradients), by key:
  // state(key, n) makes the key's buffer at n floats, at zero, when there is none; find_state(key,
  // n) gives it or null. A key asked for at another size than it has is an error (the caller's
  // layout changed under it).
  float* state(uint64_t key, size_t n) {
    if (float* d = find_state(key, n)) return d;
    state_.push_back(State{key, std::unique_ptr<DeviceBuf>(new DeviceBuf())});
    state_.back().buf->reset(n);
    zero(state_.back().buf->data(), n);
    return state_.back().buf->data();
  }
  float* find_state(uint64_t key, size_t n) const {
    for (const State& e : state_) {
      if (e.key != key) continue;
      if (e.buf->size() != n)
        throw std::invalid_argument("GPU workspace: state buffer " + std::to_string(key) + " holds " + std::to_string(e.buf->size()) +
                                    " floats, asked for " + std::to_string(n));
      return e.buf->data();
    }
    return nullptr;
  }
  // n arrival counters at zero, for a reduction whose last block to arrive finishes it (col_sums):
  // made zero once, and every launch that counts in them leaves them at zero again.
  float* arrival_counters(size_t n) {
    if (!arrivals_ || arrivals_->size() < n) {
      arrivals_.reset(new DeviceBuf());
      arrivals_->reset(n);
      zero(arrivals_->data(), n);
    }
    return arrivals_->data();
  }
  bool emulated() const override {
#if defined(__CUDACC__)
    return false;
#else
    return true;
#endif
  }

 private:
  int device_;
  uint64_t stamps_ = 0, resident_ = 0;
  struct Sums {
    uint64_t id;
    std::unique_ptr<DeviceBuf> bufs[2];
  };
  std::vector<Sums> sums_;
  struct Kept {
    uint64_t id;
    std::vector<std::unique_ptr<DeviceBuf>> bufs;
  };
  std::vector<Kept> kept_;
  struct State {
    uint64_t key;
    std::unique_ptr<DeviceBuf> buf;
  };
  std::vector<State> state_;
  std::unique_ptr<DeviceBuf> arrivals_;
  GpuTraffic traffic_;
  std::vector<std::unique_ptr<DeviceBuf>> bufs_;
  std::vector<uint64_t> tags_;  // per slot: the tag of upload_tagged's contents (0: none)
  std::vector<std::vector<uint64_t>> sources_;  // per slot: set_sources' tags (empty: none)
};

// The workspace as this build's, on its device (a workspace of the other GPU build is an error).
inline DeviceWorkspace& own_workspace(GpuWorkspace& ws) {
#if defined(__CUDACC__)
  constexpr bool emulated = false;
#else
  constexpr bool emulated = true;
#endif
  if (ws.emulated() != emulated) throw std::invalid_argument("GPU kernels: the workspace belongs to the other GPU backend");
  auto& own = static_cast<DeviceWorkspace&>(ws);
  select_device(own.device());
  return own;
}

inline i64 numel4(const int64_t* s) { return s[0] * s[1] * s[2] * s[3]; }

// Wf[(ky,kx,img), col] and Wd[(ky,kx,col), img] from w[col][img][ky][kx] (w_shape = [col, img, kh, kw]);
// either may be null (not wanted).
inline void pack_weights(const float* w, const int64_t* w_shape, std::vector<float>* wf, std::vector<float>* wd) {
  const i64 ncol = w_shape[0], nimg = w_shape[1], kh = w_shape[2], kw = w_shape[3];
  const size_t n = static_cast<size_t>(ncol * nimg * kh * kw);
  if (wf) wf->resize(n);
  if (wd) wd->resize(n);
  for (i64 col = 0; col < ncol; ++col)
    for (i64 img = 0; img < nimg; ++img)
      for (i64 ky = 0; ky < kh; ++ky)
        for (i64 kx = 0; kx < kw; ++kx) {
          const float v = w[((col * nimg + img) * kh + ky) * kw + kx];
          if (wf) (*wf)[static_cast<size_t>(((ky * kw + kx) * nimg + img) * ncol + col)] = v;
          if (wd) (*wd)[static_cast<size_t>(((ky * kw + kx) * ncol + col) * nimg + img)] = v;
        }
}

// A tensor's n floats as they are in slot `slot`, uploaded unless the slot holds them under `tag`
// (a contentTag; 0: always uploaded). src null: a device-resident tensor, which the slot must hold.
inline const float* upload_as_is(DeviceWorkspace& ws, size_t slot, uint64_t tag, const float* src, i64 n) {
  return ws.upload_tagged(slot, slot_tag(tag, kAsIs), static_cast<size_t>(n), [&] {
    // src null: the tensor lives on the device only (its host copy is stale), so it must be there
    if (!src) throw std::invalid_argument("GPU workspace: a device-resident tensor (tag " + std::to_string(tag) + ") is not on the device");
    return src;
  });
}

// A weight w [col][img][kh][kw] (w_shape) in `form` (kPackedForward / kPackedDataGrad) in slot
// `slot`, packed on the device from its copy as it is in slot `raw`: whatever forms the calls of a
// step need, the weight crosses the bus once (under its tag; untagged: every call).
inline const float* packed_weight(DeviceWorkspace& ws, size_t raw, size_t slot, uint64_t tag, TagForm form, const float* w,
                                  const int64_t* w_shape) {
  const i64 n = numel4(w_shape);
  return ws.compute_tagged(slot, slot_tag(tag, form), static_cast<size_t>(n), [&](float* dst) {
    const float* src = upload_as_is(ws, raw, tag, w, n);
    launch(pack_weights_kernel, grid_for(n), dim3(kThreads), src, w_shape[0], w_shape[1], w_shape[2], w_shape[3],
           form == kPackedForward ? dst : nullptr, form == kPackedDataGrad ? dst : nullptr);
  });
}

// Σ over rows of v[batch, rows, cols] into out[batch, cols]; scratch in ws slot `scratch`.
inline void col_sums(DeviceWorkspace& ws, size_t scratch, const float* v, i64 batch, i64 rows, i64 cols, float* out) {
  const i64 chunks = std::max<i64>(1, std::min<i64>(256, rows / kRowsPerColSumChunk));
  const i64 per = (rows + chunks - 1) / chunks, groups = (cols + 31) / 32;
  float* part = chunks > 1 ? ws.buf(scratch, static_cast<size_t>(batch * chunks * cols)) : nullptr;
  float* arrivals = chunks > 1 ? ws.arrival_counters(static_cast<size_t>(batch * groups)) : nullptr;
  launch(col_sums_kernel, dim3(as_int(groups, "column groups"), as_int(chunks, "chunks"), as_int(batch, "batch")), dim3(32, 8), v, rows,
         cols, per, part, arrivals, out);
}

// dw [col][img][kh][kw] = im2col(image)ᵀ · colside over all the rows of g (split over rows,
// partial sums in ws slot `scratch`).
inline void filter_grad(DeviceWorkspace& ws, size_t scratch, const Geom& g, const float* image, const float* colside, int ncol, float* dw) {
  const i64 P = static_cast<i64>(g.kh) * g.kw * g.C, rows = static_cast<i64>(g.N) * g.Ho * g.Wo;
  const i64 splits = filter_splits(rows);
  float* part = ws.buf(scratch, static_cast<size_t>(splits * P * ncol));
  gemm(Im2colT{Im2col{image, g}}, b_operand(colside, ncol, 1), Partial{part, P * ncol, ncol}, P, ncol, rows, splits);
  launch(filter_grad_reduce_kernel, grid_for(P * ncol), dim3(kThreads), static_cast<const float*>(part), static_cast<int>(splits), ncol,
         g.C, g.kh, g.kw, dw);
}

}  // namespace
}  // namespace EMORL_GPU_NS
}  // namespace emorl
