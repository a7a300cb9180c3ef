// One decoding stage of the spatial-broadcast image decoder, as a single call: the broadcast of
// the slot latents z over the grid (with the projected positional embedding), every convolution
// or transposed convolution with its activation, the fused image likelihood (likelihood.h), and,
// when gradients are asked for, the whole backward pass for a unit upstream gradient of every
// image's nll. Activations live only inside the call: a stage's decoder backward runs once, at
// once, and its memory is released before the next stage starts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "likelihood.h"
#include "nhwc.h"

namespace emorl {

class Workspace;  // common.h (kept out of this header: the CUDA build includes it without OpenMP)

enum class DecoderLayerKind : int {
  // conv2d(spatial_broadcast(z, pos)) without forming the broadcast map: per class of output
  // cells with the same kernel taps inside the grid, z · (Σ of those taps) + conv(pos). Stride 1.
  BroadcastConv = 0,
  // z + pos tiled over the grid (no weights)
  SpatialBroadcast = 1,
  // Conv2d, w [Co, Ci, kh, kw]
  Conv = 2,
  // ConvTranspose2d, w [Ci, Co, kh, kw]
  ConvTranspose = 3,
};

struct DecoderLayer {
  DecoderLayerKind kind;
  const float* w = nullptr;
  const float* b = nullptr;
  int64_t w_shape[4] = {0, 0, 0, 0};
  int64_t stride = 1, pad = 0, out_pad = 0;
  Act act = Act::Linear;
  // GPU stages: tags of w's and b's contents (0: unknown); a device workspace that holds the same
  // tag keeps its copy instead of uploading (and packing) again
  uint64_t w_tag = 0, b_tag = 0;
  // filled in by decoder_plan: the layer's input and output maps [N, H, W, C]
  int64_t in[4] = {0, 0, 0, 0};
  int64_t out[4] = {0, 0, 0, 0};
};

struct DecoderStage {
  int64_t n = 0, c = 0;  // slots (B·K) and latent size; z [n, c]
  const float* z = nullptr;
  int64_t gh = 0, gw = 0;  // grid; pos [gh, gw, c]
  const float* pos = nullptr;
  std::vector<DecoderLayer> layers;
  ImageNllShape lik{};  // B·K = n; raw output [n, H, W, C+1]
  const float* target = nullptr;
  // GPU stages: tags of target's and pos's contents (as DecoderLayer::w_tag): the stages of one
  // step share them, so they cross the bus once
  uint64_t target_tag = 0, pos_tag = 0;
  float log_var = 0.f;
  bool gmm = false;
  Precision precision = Precision::Fp32;  // of the Conv layers' products (nhwc.h); CPU stage only
};

// Output buffers (each may be null: not computed). Sizes: nll [B]; dz [n, c]; dpos [gh, gw, c];
// dw[i], db[i] per layer (weight / bias shapes; null for SpatialBroadcast); means [n, H, W, C];
// log_masks [n, H, W]. Gradients are of Σ_b nll_b.
// GPU stages: keep_param_grads != 0 computes every parameter gradient (dpos, then dw and db of
// each weighted layer, in that order: buffers 0, 1, 2, ... of a kept set) into a set left on the
// device under that id (DeviceWorkspace::kept) instead of downloading it; dpos, dw and db stay null.
struct DecoderStageOut {
  float* nll = nullptr;
  float* dz = nullptr;
  float* dpos = nullptr;
  std::vector<float*> dw, db;
  float* means = nullptr;
  float* log_masks = nullptr;
  uint64_t keep_param_grads = 0;
};

// Shared by the CPU stage and the GPU one (gpu/gpu.h).

// The geometry of a Conv layer, or of the forward conv behind a ConvTranspose layer (its image
// side is the layer's output), once decoder_plan has filled in the shapes.
NhwcGeom layer_geom(const DecoderLayer& L);
// The broadcast layer's positional part: a conv over the one positional map [1, gh, gw, c].
NhwcGeom pos_geom(const DecoderLayer& L);

// The broadcast layer by tap classes. Its input is z (constant per slot) plus pos, so by linearity
// its output at a cell is z · (Σ of the kernel taps inside the grid there) + conv(pos). The taps
// inside depend only on whether the cell is in the top/bottom (left/right) border band: per output
// row a range [lo, hi) of kernel rows, per column one of kernel columns. Cells sharing both ranges
// form a class (9 for a 5x5 kernel with padding 1; 1 with no padding), so the per-slot part is
// z · Wsum[class] (one small product per class), added to conv(pos) per cell.
struct TapClasses {
  int64_t nrow = 0, ncol = 0;                // distinct row / column ranges
  std::vector<int64_t> row_of, col_of;       // class of each output row / column
  std::vector<int64_t> row_lo, row_hi, col_lo, col_hi;  // per range
  int64_t count() const { return nrow * ncol; }
};

TapClasses tap_classes(const DecoderLayer& L);
// Wsum [c, classes·cout]: per class, Σ over its taps of W[co, ci, ky, kx] (laid out for z · Wsum).
void class_weight_sums(const DecoderLayer& L, const TapClasses& t, float* wsum);
// dw[co, ci, ky, kx] += dWsum[ci, class·cout + co] for every tap of the class (dwsum as Wsum).
void add_class_weight_grads(const DecoderLayer& L, const TapClasses& t, const float* dwsum, float* dw);

// Checks the layer chain and fills each layer's in/out shapes; returns an empty string when the
// stage is consistent, else a message naming the layer and the shapes at fault.
std::string decoder_plan(DecoderStage& s);

// Runs a stage planned by decoder_plan; its activations live in `ws` (kept for the next call).
void decoder_stage(const DecoderStage& s, const DecoderStageOut& o, Workspace& ws, int nthreads);

}  // namespace emorl
