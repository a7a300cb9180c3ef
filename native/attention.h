// The slot competition on the CPU (lib/ops/native-attention.ts; the TypeScript reference is
// lib/ops/attention.ts, the GPU version native/gpu/attention.cuh), fused: one addon call each
// way, per image its products on the GEMM and the normalisations between them.
//
//   p = softmax over slots of q kᵀ,  a = p + ε,  s = Σ_pixels a,  w = a / s,  U = w v
//
// Backward from dU, with dW = dU vᵀ and r = Σ_pixels dW·w = dU·U per slot:
//
//   da = (dW − r) / s,  dd = p (da − Σ_slots p·da),  dq = dd k,  dk = ddᵀ q,  dv = wᵀ dU
#pragma once

#include <cstdint>

namespace emorl {

// q [B,K,d] (already scaled), k [B,N,d], v [B,N,C].
struct SlotAttentionDims {
  int64_t B, K, N, d, C;
};

// p [B,K,N], s [B,K] and the updates U [B,K,C].
void slot_attention_forward(const SlotAttentionDims& a, const float* q, const float* k, const float* v, double eps, float* p,
                            double* s, float* updates, int nthreads);

// dq [B,K,d] (written) and dk [B,N,d], dv [B,N,C] (written, or with accumulate added onto them:
// the rounds of one encoder pass) from dU [B,K,C] and the forward pass's p, s, U.
void slot_attention_backward(const SlotAttentionDims& a, const float* q, const float* k, const float* v, const float* p,
                             const double* s, const float* updates, const float* dU, double eps, float* dq, float* dk, float* dv,
                             bool accumulate, int nthreads);

}  // namespace emorl
