// The slot competition's normalisations (lib/ops/native-attention.ts; the TypeScript reference is
// lib/ops/attention.ts): the elementwise passes between its batched products, in doubles.
#pragma once

#include <cstdint>

namespace emorl {

// dots [B, K, N]: per pixel n a softmax over the K slots, p; a = p + eps; per slot the sum over
// pixels s [B, K] = Σ_n a; w = a / s. Outputs p, a, w [B, K, N] and s.
void slot_softmax_forward(const float* dots, int64_t B, int64_t K, int64_t N, double eps, float* p, float* a, float* w,
                          double* s, int nthreads);

// From g = d/dw [B, K, N]: d/da = (g − Σ_n g·w) / s per slot, then d/ddots = p (d/da − Σ_slots p·d/da)
// per pixel, into out [B, K, N].
void slot_softmax_backward(const float* g, const float* w, const float* p, const double* s, int64_t B, int64_t K, int64_t N,
                           float* out, int nthreads);

}  // namespace emorl
