// LayerNorm over the last axis (lib/ops/native.ts; the TypeScript reference is tfjsOps.layerNorm):
// biased variance, optional affine map, statistics in double, one pass each way.
#pragma once

#include <cstdint>

namespace emorl {

// y = (x − mean) · rstd (· w + b) per row of D; w and b may be null. mean and rstd [rows] out.
void layer_norm_forward(const float* x, int64_t rows, int64_t D, const float* w, const float* b, double eps, float* y,
                        double* mean, double* rstd, int nthreads);

// From g = d/dy: dx (overwritten); dw and db (both null: skipped) are the sums over rows, in double.
void layer_norm_backward(const float* g, const float* x, int64_t rows, int64_t D, const float* w, const double* mean,
                         const double* rstd, float* dx, double* dw, double* db, int nthreads);

}  // namespace emorl
