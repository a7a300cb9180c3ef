// Plain reference loops for every kernel (readable, slow, single-threaded; llm.c style). The
// tests compare the fast paths against these and against tfjs. Sums accumulate in double.
#include <cstddef>
#include <vector>

#include "conv.h"

namespace emorl {
namespace ref {

void conv2d_forward(const ConvGeom& g, const float* x, const float* w, const float* bias, float* y) {
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t co = 0; co < g.Co; ++co)
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          double s = bias ? bias[co] : 0.0;
          for (int64_t c = 0; c < g.C; ++c)
            for (int64_t ki = 0; ki < g.kh; ++ki)
              for (int64_t kj = 0; kj < g.kw; ++kj) {
                const int64_t ih = oh * g.sh - g.pt + ki, iw = ow * g.sw - g.pl + kj;
                if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
                s += double(x[((n * g.C + c) * g.H + ih) * g.W + iw]) * w[((co * g.C + c) * g.kh + ki) * g.kw + kj];
              }
          y[((n * g.Co + co) * g.Ho + oh) * g.Wo + ow] = float(s);
        }
}

void conv2d_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx) {
  std::vector<double> acc(g.N * g.C * g.H * g.W, 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t co = 0; co < g.Co; ++co)
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const double d = dy[((n * g.Co + co) * g.Ho + oh) * g.Wo + ow];
          for (int64_t c = 0; c < g.C; ++c)
            for (int64_t ki = 0; ki < g.kh; ++ki)
              for (int64_t kj = 0; kj < g.kw; ++kj) {
                const int64_t ih = oh * g.sh - g.pt + ki, iw = ow * g.sw - g.pl + kj;
                if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
                acc[((n * g.C + c) * g.H + ih) * g.W + iw] += d * w[((co * g.C + c) * g.kh + ki) * g.kw + kj];
              }
        }
  for (std::size_t i = 0; i < acc.size(); ++i) dx[i] = float(acc[i]);
}

void conv2d_backward_filter(const ConvGeom& g, const float* x, const float* dy, float* dw, float* dbias) {
  std::vector<double> acc(g.Co * g.C * g.kh * g.kw, 0.0), bacc(g.Co, 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t co = 0; co < g.Co; ++co)
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const double d = dy[((n * g.Co + co) * g.Ho + oh) * g.Wo + ow];
          bacc[co] += d;
          for (int64_t c = 0; c < g.C; ++c)
            for (int64_t ki = 0; ki < g.kh; ++ki)
              for (int64_t kj = 0; kj < g.kw; ++kj) {
                const int64_t ih = oh * g.sh - g.pt + ki, iw = ow * g.sw - g.pl + kj;
                if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
                acc[((co * g.C + c) * g.kh + ki) * g.kw + kj] += d * x[((n * g.C + c) * g.H + ih) * g.W + iw];
              }
        }
  for (std::size_t i = 0; i < acc.size(); ++i) dw[i] = float(acc[i]);
  if (dbias)
    for (int64_t co = 0; co < g.Co; ++co) dbias[co] = float(bacc[co]);
}

// Transposed convolution written directly from PyTorch's definition: every input pixel scatters
// its kernel-weighted copy into the output, at stride s, shifted up/left by the padding.
// In g: x is the column side (Ci = g.Co, H = g.Ho, W = g.Wo), y the image side (Co = g.C, g.H, g.W).
void conv2d_transpose_forward(const ConvGeom& g, const float* x, const float* w, const float* bias, float* y) {
  const int64_t Ci = g.Co, Hi = g.Ho, Wi = g.Wo, Co = g.C, Hy = g.H, Wy = g.W;
  std::vector<double> acc(g.N * Co * Hy * Wy, 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t ci = 0; ci < Ci; ++ci)
      for (int64_t i = 0; i < Hi; ++i)
        for (int64_t j = 0; j < Wi; ++j) {
          const double v = x[((n * Ci + ci) * Hi + i) * Wi + j];
          for (int64_t co = 0; co < Co; ++co)
            for (int64_t ki = 0; ki < g.kh; ++ki)
              for (int64_t kj = 0; kj < g.kw; ++kj) {
                const int64_t oy = i * g.sh - g.pt + ki, ox = j * g.sw - g.pl + kj;
                if (oy < 0 || oy >= Hy || ox < 0 || ox >= Wy) continue;
                acc[((n * Co + co) * Hy + oy) * Wy + ox] += v * w[((ci * Co + co) * g.kh + ki) * g.kw + kj];
              }
        }
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t p = 0; p < Hy * Wy; ++p) {
        const int64_t idx = (n * Co + co) * Hy * Wy + p;
        y[idx] = float(acc[idx] + (bias ? bias[co] : 0.0));
      }
}

void conv2d_transpose_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx) {
  const int64_t Ci = g.Co, Hi = g.Ho, Wi = g.Wo, Co = g.C, Hy = g.H, Wy = g.W;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t ci = 0; ci < Ci; ++ci)
      for (int64_t i = 0; i < Hi; ++i)
        for (int64_t j = 0; j < Wi; ++j) {
          double s = 0;
          for (int64_t co = 0; co < Co; ++co)
            for (int64_t ki = 0; ki < g.kh; ++ki)
              for (int64_t kj = 0; kj < g.kw; ++kj) {
                const int64_t oy = i * g.sh - g.pt + ki, ox = j * g.sw - g.pl + kj;
                if (oy < 0 || oy >= Hy || ox < 0 || ox >= Wy) continue;
                s += double(dy[((n * Co + co) * Hy + oy) * Wy + ox]) * w[((ci * Co + co) * g.kh + ki) * g.kw + kj];
              }
          dx[((n * Ci + ci) * Hi + i) * Wi + j] = float(s);
        }
}

void conv2d_transpose_backward_filter(const ConvGeom& g, const float* x, const float* dy, float* dw, float* dbias) {
  const int64_t Ci = g.Co, Hi = g.Ho, Wi = g.Wo, Co = g.C, Hy = g.H, Wy = g.W;
  std::vector<double> acc(Ci * Co * g.kh * g.kw, 0.0), bacc(Co, 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t ci = 0; ci < Ci; ++ci)
      for (int64_t i = 0; i < Hi; ++i)
        for (int64_t j = 0; j < Wi; ++j) {
          const double v = x[((n * Ci + ci) * Hi + i) * Wi + j];
          for (int64_t co = 0; co < Co; ++co)
            for (int64_t ki = 0; ki < g.kh; ++ki)
              for (int64_t kj = 0; kj < g.kw; ++kj) {
                const int64_t oy = i * g.sh - g.pt + ki, ox = j * g.sw - g.pl + kj;
                if (oy < 0 || oy >= Hy || ox < 0 || ox >= Wy) continue;
                acc[((ci * Co + co) * g.kh + ki) * g.kw + kj] += v * dy[((n * Co + co) * Hy + oy) * Wy + ox];
              }
        }
  for (std::size_t i = 0; i < acc.size(); ++i) dw[i] = float(acc[i]);
  if (dbias) {
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t co = 0; co < Co; ++co)
        for (int64_t p = 0; p < Hy * Wy; ++p) bacc[co] += dy[(n * Co + co) * Hy * Wy + p];
    for (int64_t co = 0; co < Co; ++co) dbias[co] = float(bacc[co]);
  }
}

// C[M,N] = op(A) op(B); A is [M,K] (or [K,M] if transA), B is [K,N] (or [N,K] if transB).
void matmul(bool transA, bool transB, int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += double(transA ? A[k * M + i] : A[i * K + k]) * (transB ? B[j * K + k] : B[k * N + j]);
      C[i * N + j] = float(s);
    }
}

}  // namespace ref
}  // namespace emorl
