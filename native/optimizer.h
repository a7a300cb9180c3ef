// The optimizer's per-parameter loops (lib/optim/adam.ts holds the TypeScript reference): Adam as
// torch.optim.Adam (single-tensor path) and the L2 norm that gradient clipping takes, with every
// operation rounded to float32 in the reference's order, so both give the same bits. The
// translation unit is built with -ffp-contract=off: a fused multiply-add would round once where
// the reference rounds twice.
#pragma once

#include <cstdint>

namespace emorl {

// Adam's scalars for one step t, each a float32 value: b1 = β1, c1 = 1 − β1, b2 = β2,
// c2 = 1 − β2, eps = ε, bc2_sqrt = sqrt(1 − β2^t), step_size = lr / (1 − β1^t); scale multiplies
// the gradient first (the clipping coefficient; exactly 1: left out).
struct AdamScalars {
  float b1, c1, b2, c2, eps, bc2_sqrt, step_size, scale;
  bool first;  // m and v are at zero: the first step (m = (1−β1)·g rather than β1·0 + (1−β1)·g)
};

// m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²  (in place);
// p_next = p − (m / (sqrt(v) / sqrt(1−β2^t) + ε)) · lr / (1−β1^t)
void adam_update(const float* p, const float* g, float* m, float* v, float* p_next, int64_t n, const AdamScalars& s,
                 int nthreads);

// tf.norm of a float32 tensor: each square rounded to float32, summed in order in double, the sum
// rounded to float32, its square root rounded to float32.
float l2_norm_f32(const float* x, int64_t n);

}  // namespace emorl
