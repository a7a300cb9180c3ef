// 2-D convolution and transposed convolution on NHWC activations with PyTorch weight layouts
// (Conv2d [Co,C,kh,kw], ConvTranspose2d [Ci,Co,kh,kw]), by im2col over NHWC (the channel axis
// is contiguous, so a column row is kh*kw runs of C floats) + the blocked GEMM, with the
// activation (none / ReLU / ELU) fused into the forward pass and its derivative into the
// backward pass. These are the kernels behind lib/ops/native.ts (the model's activations are
// NHWC); the NCHW kernels in conv.h stay as they are.
#pragma once

#include <cstdint>

namespace emorl {

// The geometry of one forward convolution from an "image" map [N,H,W,C] to a "column" map
// [N,Ho,Wo,·]. Only top/left padding matters; bottom/right are implied by Ho/Wo.
struct NhwcGeom {
  int64_t N, H, W, C;
  int64_t Ho, Wo;
  int64_t kh, kw, sh, sw, pt, pl;
  int64_t P() const { return kh * kw * C; }          // columns of the column matrix
  int64_t M() const { return N * Ho * Wo; }          // rows of the column matrix
  bool identity() const { return kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt == 0 && pl == 0 && Ho == H && Wo == W; }
};

enum class Act : int { Linear = 0, Relu = 1, Elu = 2 };

// The arithmetic of a convolution's products: fp32, or bf16 operands with fp32 accumulation
// (bf16.h: about twice the fp32 rate on CPUs with AVX512_BF16). Bf16 covers the forward product
// (outputs of at least 16 channels; a narrower one would leave most of a register tile idle),
// the stride-1 input gradient (itself a forward convolution) and the filter gradient; the other
// products (strided input gradients, transposed convolutions, biases) stay fp32. In either
// precision a forward product (or stride-1 input gradient) that Winograd takes runs by Winograd
// in fp32 (stride 1, 3×3 or 5×5, channels in whole vectors: nhwc.cc), which is faster than bf16.
enum class Precision : int { Fp32 = 0, Bf16 = 1 };

// Whether Winograd is on: EMORL_CONV_ALGO=direct turns it off for the whole process (read once;
// for comparisons and tests).
bool winograd_enabled();

// y (rows of n) += bias (may be null), then the activation, in place, on up to nthreads threads
// (the epilogue of the convolutions, and of matmul for the linear layers).
void bias_act(float* y, int64_t rows, int64_t n, const float* bias, Act act, int nthreads);

// y[N,Ho,Wo,Co] = act(conv(x[N,H,W,C], w[Co,C,kh,kw]) + bias). bias may be null.
void nhwc_conv2d_forward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act,
                         float* y, int nthreads, Precision prec = Precision::Fp32);
// Gradients for dy[N,Ho,Wo,Co] given the forward output y (needed for ReLU/ELU; may be null for
// Linear). dx (may be null: skipped) is overwritten; dw[Co,C,kh,kw] and db[Co] (both null: skipped).
void nhwc_conv2d_backward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* y,
                          const float* dy, Act act, float* dx, float* dw, float* db, int nthreads,
                          Precision prec = Precision::Fp32);

// Transposed convolution: x[N,h,w,Ci] (the column side of g, Ho = h, Wo = w), w[Ci,Co,kh,kw],
// y[N,H,W,Co] (the image side of g, C = Co).
void nhwc_conv_transpose2d_forward(const NhwcGeom& g, int64_t Ci, const float* x, const float* w, const float* bias,
                                   Act act, float* y, int nthreads);
void nhwc_conv_transpose2d_backward(const NhwcGeom& g, int64_t Ci, const float* x, const float* w, const float* y,
                                    const float* dy, Act act, float* dx, float* dw, float* db, int nthreads);

}  // namespace emorl
