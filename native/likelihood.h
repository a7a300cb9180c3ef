// The image likelihood on the decoder's raw output, fused: per slot k and pixel, the raw output
// holds C colour logits and one mask logit. In one pass per image it takes
//   μ_k = sigmoid(colour logits),  log m_k = log_softmax over slots of the mask logits,
// and the per-image negative log-likelihood (lib/model/likelihoods.ts: no -½·log 2π constant,
// one global variance v = exp(logVar)):
//   Gaussian  nll = Σ_pixels,c  ½·logVar + ½·(x_c − Σ_k m_k μ_kc)² / v
//   GMM       nll = −Σ_pixels,c log Σ_k exp(log m_k − ½·logVar − ½·(x_c − μ_kc)² / v)
// together with d nll_b / d raw (the gradient for a unit upstream gradient of every image's nll),
// so the decoder's backward can start without another pass. No [B,K,C,H,W] temporaries.
#pragma once

#include <cstdint>

namespace emorl {

struct ImageNllShape {
  int64_t B, K, H, W, C;  // raw is [B·K, H, W, C+1], target [B, H, W, C]
};

// nll[B] (always); draw (may be null) = d nll_b / d raw [B·K,H,W,C+1]; means (may be null)
// [B·K,H,W,C] = μ; log_masks (may be null) [B·K,H,W] = log m.
void image_nll(const ImageNllShape& s, const float* raw, const float* target, float log_var, bool gmm, float* nll,
               float* draw, float* means, float* log_masks, int nthreads);

}  // namespace emorl
