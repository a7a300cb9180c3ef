// 2-D convolution (NCHW, PyTorch weight layouts) by im2col + the blocked GEMM, and the transposed
// convolution expressed through the same three passes.
#pragma once

#include <cstdint>

namespace emorl {

// The geometry of one convolution pass between an "image" side (the conv input: C x H x W) and a
// "column" side (the conv output: Co x Ho x Wo). Padding may be asymmetric: only top/left matter
// here, the bottom/right amounts are implied by Ho/Wo.
struct ConvGeom {
  int64_t N;             // batch
  int64_t C, H, W;       // image side
  int64_t Co, Ho, Wo;    // column side
  int64_t kh, kw, sh, sw, pt, pl;
  int64_t K() const { return C * kh * kw; }
  int64_t P() const { return Ho * Wo; }
  bool identity() const { return kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt == 0 && pl == 0 && Ho == H && Wo == W; }
};

// y[N,Co,Ho,Wo] = conv(x[N,C,H,W], w[Co,C,kh,kw]) + bias[Co] (bias may be null). y is overwritten.
void conv2d_forward(const ConvGeom& g, const float* x, const float* w, const float* bias, float* y, int nthreads);
// dx[N,C,H,W] = d(sum y*dy)/dx. dx is overwritten.
void conv2d_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx, int nthreads);
// dw[Co,C,kh,kw] (and dbias[Co] if non-null) = gradients for dy. Overwritten.
void conv2d_backward_filter(const ConvGeom& g, const float* x, const float* dy, float* dw, float* dbias, int nthreads);

// Transposed convolution (PyTorch ConvTranspose2d): x[N,Ci,H,W], w[Ci,Co,kh,kw], y[N,Co,Ho,Wo]
// with Ho = (H-1)*sh - 2*ph + kh + oph. `g` is the geometry of the matching *forward* conv, whose
// image side is y (C = Co of the transposed conv, H = Ho, ...) and column side is x (Co = Ci, ...).
void conv2d_transpose_forward(const ConvGeom& g, const float* x, const float* w, const float* bias, float* y,
                              int nthreads);
void conv2d_transpose_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx, int nthreads);
void conv2d_transpose_backward_filter(const ConvGeom& g, const float* x, const float* dy, float* dw, float* dbias,
                                      int nthreads);

// Plain loops (llm.c style) with the same contracts, for checking the fast paths.
namespace ref {
void conv2d_forward(const ConvGeom& g, const float* x, const float* w, const float* bias, float* y);
void conv2d_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx);
void conv2d_backward_filter(const ConvGeom& g, const float* x, const float* dy, float* dw, float* dbias);
void conv2d_transpose_forward(const ConvGeom& g, const float* x, const float* w, const float* bias, float* y);
void conv2d_transpose_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx);
void conv2d_transpose_backward_filter(const ConvGeom& g, const float* x, const float* dy, float* dw, float* dbias);
void matmul(bool transA, bool transB, int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C);
}  // namespace ref

}  // namespace emorl
