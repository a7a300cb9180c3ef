// The GPU side's entry points: the decoding stage (decoder.h) with the same plan, results and
// gradients as the CPU stage, its activations in device memory for the whole call
// (decoder_gpu.cu), the NHWC convolutions of nhwc.h (conv_gpu.cu, for the encoder), the GRU
// step of gru.h (gru_gpu.cu) and the optimizer of the weights kept on the device (params_gpu.cu). Two builds of each source: `cuda` (nvcc, EMORL_CUDA=ON) runs on a
// device; `simt` (always built) runs the same kernels in the SIMT emulator of simt.h, so CI checks
// the kernels without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../decoder.h"
#include "../encoder_head.h"
#include "../gru.h"
#include "../nhwc.h"
#include "../optimizer.h"

namespace emorl {

// What crossed the bus through one workspace since it was made: bytes and copies each way.
struct GpuTraffic {
  uint64_t up_bytes = 0, down_bytes = 0, uploads = 0, downloads = 0;
};

// Device buffers kept between calls by their owner (a JS DecoderWorkspace), on one device.
class GpuWorkspace {
 public:
  virtual ~GpuWorkspace() = default;
  virtual size_t bytes() const = 0;
  virtual GpuTraffic traffic() const = 0;
  virtual int device() const = 0;
  virtual bool emulated() const = 0;
};

// Wall time per phase of a stage (milliseconds, summed over the phase's calls), in first-seen
// order. Profiling synchronises the device around every phase.
struct StageProfile {
  std::vector<std::pair<std::string, double>> ms;
  void add(const char* phase, double v) {
    for (auto& e : ms)
      if (e.first == phase) {
        e.second += v;
        return;
      }
    ms.emplace_back(phase, v);
  }
};

// A stack of NHWC convolutions run as one stage (the encoder's): images in, the last map out, the
// intermediate maps kept on the device from the forward call to its backward call.
struct ConvStackLayer {
  const float* w;  // [Co, Ci, kh, kw] (PyTorch layout)
  const float* b;  // [Co]
  int64_t Co, kh, kw, stride, pad;  // symmetric stride and padding
  Act act;
  uint64_t w_tag = 0, b_tag = 0;  // tags of w's and b's contents (DecoderLayer::w_tag)
};
struct ConvStack {
  int64_t N, H, W, C;  // the input x [N,H,W,C]
  const float* x;
  std::vector<ConvStackLayer> layers;
  // the geometry of layer i (its input is layer i − 1's output); throws on a shape that leaves no output
  NhwcGeom geom(size_t i) const;
};

// The encoder after its conv stack: encoder_head.h's head (the same math as the CPU's) on the
// stack's last map h [N, H·W, D], giving k and v [N, H·W, Z].
struct EncoderHead {
  int64_t D = 0, Z = 0, pos_c = 0;  // the stack's channels, k / v width, positional channels
  EncoderHeadParams p{};
  // content tags (DecoderLayer::w_tag) of pos, pos_w, pos_b, ln_w, ln_b, w1, b1, w2, b2, wk, wv
  uint64_t tags[11] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
};

// Queries [B, K, Z] (already scaled) for a slot competition against the keys and values an
// encoder left on the device (attention.cuh has the math).
struct EncoderAttention {
  int64_t B = 0, K = 0;
  float eps = 0.f;
  const float* q = nullptr;
};

inline NhwcGeom ConvStack::geom(size_t i) const {
  NhwcGeom g{};
  g.N = N;
  g.H = H;
  g.W = W;
  g.C = C;
  for (size_t l = 0;; ++l) {
    const ConvStackLayer& L = layers.at(l);
    g.kh = L.kh;
    g.kw = L.kw;
    g.sh = g.sw = L.stride;
    g.pt = g.pl = L.pad;
    g.Ho = (g.H + 2 * L.pad - L.kh) / L.stride + 1;
    g.Wo = (g.W + 2 * L.pad - L.kw) / L.stride + 1;
    if (L.stride < 1 || g.H + 2 * L.pad < L.kh || g.W + 2 * L.pad < L.kw || g.Ho < 1 || g.Wo < 1)
      throw std::invalid_argument("conv stack: layer " + std::to_string(l) + " leaves no output");
    if (l == i) return g;
    g.H = g.Ho;
    g.W = g.Wo;
    g.C = L.Co;
  }
}

// The parameters of a stage (the decoder, the encoder, a GRU) whose calls keep them in their workspace,
// for an optimizer on the device: per parameter, where it is, its size and the content tag under
// which its slot holds it. Decoder: `layers` is the stack's length and Param::index a layer (its
// filter, or its bias). Encoder: `layers` is the conv stack's length; Param::index < layers is a
// conv layer (filter or bias), index − layers + 1 a head tensor in EncoderHead's tag order (1..10,
// pos_w … wv). GRU: `layers` 1 is one nn.GRU cell, index 0..3 its w_ih, w_hh, b_ih, b_hh; `layers`
// 2 is the DualGRU in the original's layout, index 0..3 weight_ih_1, weight_in_1, weight_hh_1,
// weight_hn_1, 4..7 the same of cell 2, 8..11 bias_ih, bias_hh, bias_in, bias_hn. The workspace
// keeps their summed gradients and both Adam moments in three state buffers, each the parameters
// end to end in this order.
struct DeviceParams {
  enum class Stage { Decoder, Encoder, Gru };
  struct Param {
    size_t index = 0;
    bool bias = false;
    size_t n = 0;
    uint64_t tag = 0;
  };
  Stage stage = Stage::Decoder;
  size_t layers = 0;
  std::vector<Param> params;
  size_t total() const {
    size_t t = 0;
    for (const Param& p : params) t += p.n;
    return t;
  }
};
enum class DeviceParamPart { Weights, Grads, FirstMoments, SecondMoments };

// A GRU call whose weights are a GRU stage's parameters (every one, in a DeviceParams of stage Gru)
// kept in the workspace: cell `cell` (0, or the DualGRU's second: 1) assembles its nn.GRU-layout
// w_ih, w_hh, b_ih, b_hh on the device from them. host[j], where not null, is parameter j's data
// (current on the host), uploaded under its tag when the workspace does not hold that; null: the
// workspace must hold it. A backward call with keep_grads puts its parameter gradients into the
// gradient state buffer instead of returning them: set by the pass's first call (`first`), added
// by the later ones in the order they come, as a tape sums a tensor's gradients.
struct GruResident {
  const DeviceParams* params = nullptr;
  std::vector<const float*> host;
  int cell = 0;
  bool keep_grads = false, first = false;
};

// The entry points of one build of the GPU sources, the same in both namespaces:
//   make_workspace: device buffers for the calls below;
//   decoder_stage: `ws` must come from the same namespace's make_workspace (checked); profile may be null;
//   conv2d_forward / conv2d_backward: nhwc_conv2d_forward / nhwc_conv2d_backward (nhwc.h) with host
//     arrays in and out: one upload, the products on the device, one download. Symmetric padding
//     (g.pt = g.pl; Ho, Wo imply the rest);
//   gru_forward / gru_backward: gru.h's GRU step, host arrays in and out likewise (weights kept on
//     the device between calls under their tags). The forward returns an id under which its x, h
//     and gates stay on the device (gates downloaded only when not null); the backward given that
//     id uses them, and otherwise uploads x, h and the gates, or recomputes the gates from the
//     biases when gates is null. With `resident` the weights are a GRU stage's parameters (the
//     weight and bias arrays unused; GruResident);
//   conv_stack_forward: the last map y; returns a stamp under which the activations stay in `ws`;
//   conv_stack_backward: from dy of the last map, dx (may be null) and each layer's dw, db (null
//     pointers: skipped). With the stamp of the latest forward on `ws` it uses the activations
//     left there; with any other (0: none) it runs the forward again first;
//   encoder_forward / encoder_backward: the conv stack then the EncoderHead, k and v out, dk and dv
//     in, the same way (no image gradient; the head's gradients all or none, like the layers').
//     k and v null: they stay on the device only (for the attention below); dk and dv null: the
//     sums encoder_attention_backward made under sum_id (none made: zero). With `keep` (the
//     encoder's parameters, all of them, in order), the parameter gradients go to the workspace's
//     gradient state buffer instead of dw, db and g (null there);
//   encoder_attention_forward: updates [B,K,Z] and, unless null, the softmax p [B,K,H·W] of q
//     against the k and v of the encoder's activation set `stamp`. When ws no longer holds that
//     set, the encoder's forward pass runs again first (nothing downloaded); returns the stamp of
//     the set used (hand it to the next call);
//   encoder_attention_backward: dq [B,K,Z] from dU [B,K,Z], the round's dk and dv added onto the
//     device sums of `sum_id` (started, at zero, by the first call with that id);
//   decoder_param_grad_sums: per buffer b < sizes.size() of the kept sets `ids` (decoder stages run
//     with keep_param_grads), out[b] = Σ_k us[k]·set_k[b] in the order given, rounded as the host
//     sums a tape's gradients (u0·g0, then + u_k·g_k, each product and sum to float); one download
//     per buffer, and the sets are dropped. With `keep`, buffers 1, 2, … (the layers' dw and db) are
//     summed into the workspace's gradient buffer of those parameters instead (out[b] null there);
//   decoder_param_slot / encoder_param_slot / gru_param_slot: the workspace slot of parameter j (its raw form);
//   device_grad_norms: per parameter, the L2 norm of its summed gradient as l2_norm_f32 computes it
//     (optimizer.h; the same bits), into norms (host, one per parameter);
//   device_adam: adam_update (optimizer.h, the same bits) of every parameter, in its raw slot, from
//     its summed gradient and moments (made at zero when s.first); the slot then holds the result
//     under new_tags[i] (its packed forms are made afresh from it by the next stage);
//   device_params_copy: one part of every parameter, end to end, down to the host (`down`; weights:
//     their raw slots, which must hold their tags) or up from it (`up`; moments, and gradients over
//     the summed ones a pass left: data-parallel ranks that reduce them through the host);
//   device_grad_state: the summed gradients a pass left (p.total() floats, device memory, for an
//     in-place collective such as NCCL's allreduce), with the workspace's device selected and idle.
#define EMORL_GPU_ENTRY_POINTS                                                                                         \
  std::unique_ptr<GpuWorkspace> make_workspace(int device);                                                            \
  void decoder_stage(const DecoderStage& s, const DecoderStageOut& o, GpuWorkspace& ws, StageProfile* profile = nullptr); \
  void conv2d_forward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act, float* y, \
                      GpuWorkspace& ws);                                                                               \
  void conv2d_backward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* y, const float* dy,  \
                       Act act, float* dx, float* dw, float* db, GpuWorkspace& ws);                                       \
  uint64_t gru_forward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh,              \
                       const float* b_ih, const float* b_hh, float* y, float* gates, GpuWorkspace& ws, const GruTags& tags = {}, \
                       const GruResident* resident = nullptr);                                                          \
  void gru_backward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* b_ih,   \
                    const float* b_hh, const float* gates, const float* dy, float* dx, float* dh, float* dw_ih, float* dw_hh,    \
                    float* db_ih, float* db_hh, GpuWorkspace& ws, const GruTags& tags = {}, uint64_t kept = 0,                 \
                    const GruResident* resident = nullptr);                                                             \
  uint64_t conv_stack_forward(const ConvStack& s, float* y, GpuWorkspace& ws);                                         \
  void conv_stack_backward(const ConvStack& s, uint64_t stamp, const float* dy, float* dx, const std::vector<float*>& dw,  \
                           const std::vector<float*>& db, GpuWorkspace& ws);                                           \
  uint64_t encoder_forward(const ConvStack& s, const EncoderHead& h, float* k, float* v, GpuWorkspace& ws);             \
  void encoder_backward(const ConvStack& s, const EncoderHead& h, uint64_t stamp, const float* dk, const float* dv,       \
                        const std::vector<float*>& dw, const std::vector<float*>& db, const EncoderHeadParamGrads& g,        \
                        GpuWorkspace& ws, uint64_t sum_id = 0, const DeviceParams* keep = nullptr);                                                       \
  uint64_t encoder_attention_forward(const ConvStack& s, const EncoderHead& h, uint64_t stamp, const EncoderAttention& a,   \
                                     float* updates, float* p, GpuWorkspace& ws);                                         \
  uint64_t encoder_attention_backward(const ConvStack& s, const EncoderHead& h, uint64_t stamp, uint64_t sum_id,            \
                                      const EncoderAttention& a, const float* dU, float* dq, GpuWorkspace& ws);             \
  void decoder_param_grad_sums(const std::vector<uint64_t>& ids, const std::vector<float>& us, const std::vector<size_t>& sizes, \
                               const std::vector<float*>& out, GpuWorkspace& ws, const DeviceParams* keep = nullptr);      \
  size_t decoder_param_slot(const DeviceParams& p, size_t j);                                                       \
  size_t encoder_param_slot(const DeviceParams& p, size_t j);                                                       \
  size_t gru_param_slot(const DeviceParams& p, size_t j);                                                           \
  void device_grad_norms(const DeviceParams& p, float* norms, GpuWorkspace& ws);                                     \
  void device_adam(const DeviceParams& p, const std::vector<uint64_t>& new_tags, const AdamScalars& s, GpuWorkspace& ws); \
  void device_params_copy(const DeviceParams& p, DeviceParamPart part, float* down, const float* up, GpuWorkspace& ws); \
  float* device_grad_state(const DeviceParams& p, GpuWorkspace& ws);

namespace simt {
EMORL_GPU_ENTRY_POINTS
}  // namespace simt

#if defined(EMORL_CUDA)
namespace cuda {
EMORL_GPU_ENTRY_POINTS
// The FP32 FMA throughput of the device (GFLOP/s) over about `seconds`, for benchmarks.
double peak_gflops(int device, double seconds);
}  // namespace cuda
#endif

#undef EMORL_GPU_ENTRY_POINTS

}  // namespace emorl
