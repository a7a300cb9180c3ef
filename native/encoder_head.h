// The encoder after its convolutions (lib/ops/encoder-stage.ts), on the CPU here and on a GPU in
// gpu/conv_gpu.cu (gpu.h EncoderHead holds these parameters): per pixel of the conv stack's last map h [N, HW, D],
//   f0 = h + (pos W_posᵀ + b_pos),  f1 = LayerNorm(f0)·γ + β,  f2 = ReLU(f1 W1ᵀ + b1),
//   f3 = f2 W2ᵀ + b2,  k = f3 W_kᵀ,  v = f3 W_vᵀ.
// One call each way: the forward keeps f1, f2, f3 and the row statistics for the backward.
#pragma once

#include <cstdint>

namespace emorl {

struct EncoderHeadDims {
  int64_t rows, hw, D, Z, pc;  // rows = N·HW pixels, hw pixels per image, pc positional channels
};

struct EncoderHeadParams {
  const float *pos, *pos_w, *pos_b, *ln_w, *ln_b, *w1, *b1, *w2, *b2, *wk, *wv;  // shapes as gpu.h EncoderHead
  double eps;
};

// What the forward pass keeps (written by it): f1, f2, f3 [rows, D], mean and rstd [rows].
struct EncoderHeadSaved {
  float *f1, *f2, *f3;
  double *mean, *rstd;
};
// The same, read by the backward pass.
struct EncoderHeadKept {
  const float *f1, *f2, *f3;
  const double *mean, *rstd;
};

void encoder_head_forward(const EncoderHeadDims& d, const float* h, const EncoderHeadParams& p, float* k, float* v,
                          const EncoderHeadSaved& s, int nthreads);

// The head's parameter gradients (all null: skipped).
struct EncoderHeadParamGrads {
  float *pos_w = nullptr, *pos_b = nullptr, *ln_w = nullptr, *ln_b = nullptr, *w1 = nullptr, *b1 = nullptr, *w2 = nullptr,
        *b2 = nullptr, *wk = nullptr, *wv = nullptr;
};

// dh [rows, D] (overwritten) from dk, dv; h is the forward's input (the LayerNorm's x̂ is recomputed
// from it). scratch: 2·rows·D floats the call may overwrite (null: it allocates them; a caller's
// kept buffer saves a batch's fresh pages, 10 MB at Tetrominoes' batch 32).
void encoder_head_backward(const EncoderHeadDims& d, const float* h, const EncoderHeadParams& p, const EncoderHeadKept& s,
                           const float* dk, const float* dv, float* dh, const EncoderHeadParamGrads& g, int nthreads,
                           float* scratch = nullptr);

}  // namespace emorl
