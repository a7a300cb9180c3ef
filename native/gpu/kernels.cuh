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
#else
// emulated: few blocks, so the grid-stride loops are exercised too; split filter gradients at
// test sizes
constexpr i64 kMaxBlocks = 4;
constexpr i64 kRowsPerSplit = 128;
#endif

EMORL_DEVICE int imin(int a, int b) { return a < b ? a : b; }

EMORL_DEVICE float activate(float v, int act) {
  if (act == 1) return v > 0.f ? v : 0.f;
  if (act == 2) return v > 0.f ? v : expm1f(v);
  return v;
}

// ---- GEMM operands: element (row, k) of A or (k, col) of B, gathered on the fly -------------

// A strided matrix: element (r, c) at p[r·rs + c·cs].
struct Mat {
  const float* p;
  i64 rs, cs;
  bool kfast;  // consecutive threads should step the k index (it is the contiguous one)
  EMORL_DEVICE float operator()(int r, int c) const { return p[r * rs + c * cs]; }
};
inline Mat a_operand(const float* p, i64 rs, i64 cs) { return Mat{p, rs, cs, cs == 1}; }  // A(m, k)
inline Mat b_operand(const float* p, i64 rs, i64 cs) { return Mat{p, rs, cs, rs == 1}; }  // B(k, n)

struct Geom {
  int N, H, W, C, Ho, Wo, kh, kw, sh, sw, pt, pl;
};

inline Geom geom_of(const NhwcGeom& g) {
  return Geom{static_cast<int>(g.N), static_cast<int>(g.H), static_cast<int>(g.W), static_cast<int>(g.C),
              static_cast<int>(g.Ho), static_cast<int>(g.Wo), static_cast<int>(g.kh), static_cast<int>(g.kw),
              static_cast<int>(g.sh), static_cast<int>(g.sw), static_cast<int>(g.pt), static_cast<int>(g.pl)};
}

// im2col of the image-side map x [N,H,W,C]: row m = (n, oy, ox), column k = (ky, kx, ci).
struct Im2col {
  const float* x;
  Geom g;
  bool kfast = true;
  EMORL_DEVICE float operator()(int m, int k) const {
    const int ci = k % g.C, t = k / g.C, kx = t % g.kw, ky = t / g.kw;
    const int ox = m % g.Wo, t2 = m / g.Wo, oy = t2 % g.Ho, n = t2 / g.Ho;
    const int iy = oy * g.sh - g.pt + ky, ix = ox * g.sw - g.pl + kx;
    if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) return 0.f;
    return x[((static_cast<i64>(n) * g.H + iy) * g.W + ix) * g.C + ci];
  }
};

// The same matrix transposed (row m = column k of im2col): the filter gradient's A operand.
struct Im2colT {
  Im2col cols;
  bool kfast = false;
  EMORL_DEVICE float operator()(int m, int k) const { return cols(k, m); }
};

// The column-side map y [N,Ho,Wo,Cc] gathered at image pixels: row m = (n, iy, ix), column
// k = (ky, kx, cc), the value of the output cell that tap (ky, kx) of pixel (iy, ix) feeds.
struct ColGather {
  const float* y;
  Geom g;
  int Cc;
  bool kfast = true;
  EMORL_DEVICE float operator()(int m, int k) const {
    const int cc = k % Cc, t = k / Cc, kx = t % g.kw, ky = t / g.kw;
    const int ix = m % g.W, t2 = m / g.W, iy = t2 % g.H, n = t2 / g.H;
    const int ny = iy + g.pt - ky, nx = ix + g.pl - kx;
    if (ny < 0 || nx < 0 || ny % g.sh || nx % g.sw) return 0.f;
    const int oy = ny / g.sh, ox = nx / g.sw;
    if (oy >= g.Ho || ox >= g.Wo) return 0.f;
    return y[((static_cast<i64>(n) * g.Ho + oy) * g.Wo + ox) * Cc + cc];
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

inline int as_int(i64 v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max()) throw std::length_error(std::string("GPU decoder: ") + what + " too large");
  return static_cast<int>(v);
}

// splits > 1: the k range is cut into that many chunks, one per grid z (a Partial epilogue).
template <class A, class B, class E>
inline void gemm(const A& a, const B& b, const E& e, i64 M, i64 N, i64 K, i64 splits = 1) {
  if (M == 0 || N == 0) return;
  const i64 per = (K + splits - 1) / splits;
  const i64 kchunk = std::max<i64>(kDepth, (per + kDepth - 1) / kDepth * kDepth);
  const i64 z = K ? (K + kchunk - 1) / kchunk : 1;
  if (z != splits) throw std::logic_error("GPU decoder: split count mismatch");
  launch(gemm_kernel<A, B, E>, dim3(as_int((M + kTile - 1) / kTile, "M"), as_int((N + kTile - 1) / kTile, "N"),
                                    as_int(z, "splits")),
         dim3(kGemmThreads), a, b, e, as_int(M, "M"), as_int(N, "N"), as_int(K, "K"), as_int(kchunk, "k chunk"));
}

// The split count gemm() accepts for a Partial epilogue over a long k range.
inline i64 filter_splits(i64 K) {
  const i64 want = std::min<i64>(64, std::max<i64>(1, K / kRowsPerSplit));
  const i64 per = (K + want - 1) / want;
  const i64 kchunk = std::max<i64>(kDepth, (per + kDepth - 1) / kDepth * kDepth);
  return K ? (K + kchunk - 1) / kchunk : 1;
}

// ---- elementwise and reduction kernels (grid-stride loops) -----------------------------------

#define EMORL_GRID_LOOP(i, n) \
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += static_cast<i64>(gridDim.x) * blockDim.x)

inline dim3 grid_for(i64 n) { return dim3(static_cast<unsigned>(std::max<i64>(1, std::min<i64>(kMaxBlocks, (n + kThreads - 1) / kThreads)))); }

// dy ⊙ act'(pre-activation), from the post-activation y, in place.
__global__ void act_grad_kernel(float* dy, const float* y, i64 n, int act) {
  EMORL_GRID_LOOP(i, n) {
    if (act == 1)
      dy[i] = y[i] > 0.f ? dy[i] : 0.f;
    else
      dy[i] = y[i] > 0.f ? dy[i] : dy[i] * (y[i] + 1.f);
  }
}

// Column sums of `batch` matrices v[b, rows, cols], in two passes: partial sums over chunks of
// rows (block 32 columns × 8 row lanes), then over the chunks.
__global__ void col_sums_partial_kernel(const float* v, i64 rows, i64 cols, i64 rows_per_chunk, float* part) {
  __shared__ float lanes[8][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const i64 j = static_cast<i64>(blockIdx.x) * 32 + tx, b = blockIdx.z, chunk = blockIdx.y;
  const i64 r0 = chunk * rows_per_chunk, r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float acc = 0.f;
  if (j < cols)
    for (i64 r = r0 + ty; r < r1; r += 8) acc += v[(b * rows + r) * cols + j];
  lanes[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < cols) {
    float t = 0.f;
    for (int y = 0; y < 8; ++y) t += lanes[y][tx];
    part[(b * gridDim.y + chunk) * cols + j] = t;
  }
}

__global__ void col_sums_final_kernel(const float* part, i64 batch, i64 chunks, i64 cols, float* out) {
  EMORL_GRID_LOOP(i, batch * cols) {
    const i64 b = i / cols, j = i % cols;
    double t = 0;
    for (i64 c = 0; c < chunks; ++c) t += part[(b * chunks + c) * cols + j];
    out[i] = static_cast<float>(t);
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

class DeviceWorkspace final : public GpuWorkspace {
 public:
  explicit DeviceWorkspace(int device) : device_(device) {}
  ~DeviceWorkspace() override {
    try {
      select_device(device_);  // free on the device the buffers live on
    } catch (...) {
    }
  }
  float* buf(size_t slot, size_t n) {
    if (slot >= bufs_.size()) bufs_.resize(slot + 1);
    if (!bufs_[slot]) bufs_[slot].reset(new DeviceBuf());
    if (bufs_[slot]->size() < n || !bufs_[slot]->data()) bufs_[slot]->reset(n);
    return bufs_[slot]->data();
  }
  size_t bytes() const override {
    size_t b = 0;
    for (const auto& x : bufs_)
      if (x) b += x->size() * sizeof(float);
    return b;
  }
  int device() const override { return device_; }
  bool emulated() const override {
#if defined(__CUDACC__)
    return false;
#else
    return true;
#endif
  }

 private:
  int device_;
  std::vector<std::unique_ptr<DeviceBuf>> bufs_;
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

// Wf[(ky,kx,img), col] and Wd[(ky,kx,col), img] from w[col][img][ky][kx] (w_shape = [col, img, kh, kw]).
inline void pack_weights(const float* w, const int64_t* w_shape, std::vector<float>& wf, std::vector<float>& wd) {
  const i64 ncol = w_shape[0], nimg = w_shape[1], kh = w_shape[2], kw = w_shape[3];
  wf.resize(static_cast<size_t>(ncol * nimg * kh * kw));
  wd.resize(wf.size());
  for (i64 col = 0; col < ncol; ++col)
    for (i64 img = 0; img < nimg; ++img)
      for (i64 ky = 0; ky < kh; ++ky)
        for (i64 kx = 0; kx < kw; ++kx) {
          const float v = w[((col * nimg + img) * kh + ky) * kw + kx];
          wf[static_cast<size_t>(((ky * kw + kx) * nimg + img) * ncol + col)] = v;
          wd[static_cast<size_t>(((ky * kw + kx) * ncol + col) * nimg + img)] = v;
        }
}

// Σ over rows of v[batch, rows, cols] into out[batch, cols]; scratch in ws slot `scratch`.
inline void col_sums(DeviceWorkspace& ws, size_t scratch, const float* v, i64 batch, i64 rows, i64 cols, float* out) {
  const i64 chunks = std::max<i64>(1, std::min<i64>(256, rows / 1024));
  const i64 per = (rows + chunks - 1) / chunks;
  float* part = ws.buf(scratch, static_cast<size_t>(batch * chunks * cols));
  launch(col_sums_partial_kernel, dim3(as_int((cols + 31) / 32, "columns"), as_int(chunks, "chunks"), as_int(batch, "batch")),
         dim3(32, 8), v, rows, cols, per, part);
  launch(col_sums_final_kernel, grid_for(batch * cols), dim3(kThreads), static_cast<const float*>(part), batch, chunks, cols, out);
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
