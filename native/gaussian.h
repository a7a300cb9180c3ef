// Diagonal Gaussians as the model parameterises them (lib/model/priors.ts holds the TypeScript
// references): σ = sqrt(softplus(min(s, 80)) + 1e-5) and KL(q ‖ p) per row, forward and backward.
// Every step is rounded to float32 in the reference's order (exp and log in double, then rounded,
// as tfjs' cpu kernels do), so both give the same bits; the translation unit is built with
// -ffp-contract=off (a fused multiply-add would round once where the reference rounds twice).
#pragma once

#include <cstdint>

namespace emorl {

// std[i] = sqrt(log(1 + exp(min(s[i], 80))) + 1e-5)
void softplus_std_forward(const float* s, int64_t n, float* std_out);

// ds from g = d/dσ, given s and the forward's σ
void softplus_std_backward(const float* g, const float* s, const float* std_in, int64_t n, float* ds);

// kl[row] = Σ_j ½(r² + x² − 1 − log r²), r = σq/σp, x = (μq − μp)/σp, summed in double and rounded
// once; p_loc and p_std both null: p is the standard normal (r = σq, x = μq).
void kl_diag_forward(const float* q_loc, const float* q_std, const float* p_loc, const float* p_std, int64_t rows,
                     int64_t D, float* kl);

// From g = d/dkl [rows]: the gradients of μq, σq and (p given) μp, σp; dp_loc and dp_std are
// ignored without p.
void kl_diag_backward(const float* g, const float* q_loc, const float* q_std, const float* p_loc, const float* p_std,
                      int64_t rows, int64_t D, float* dq_loc, float* dq_std, float* dp_loc, float* dp_std);

}  // namespace emorl
