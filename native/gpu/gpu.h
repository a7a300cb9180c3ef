// The GPU side's entry points: the decoding stage (decoder.h) with the same plan, results and
// gradients as the CPU stage, its activations in device memory for the whole call
// (decoder_gpu.cu), the NHWC convolutions of nhwc.h (conv_gpu.cu, for the encoder) and the GRU
// step of gru.h (gru_gpu.cu). Two builds of each source: `cuda` (nvcc, EMORL_CUDA=ON) runs on a
// device; `simt` (always built) runs the same kernels in the SIMT emulator of simt.h, so CI checks
// the kernels without a GPU.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../decoder.h"
#include "../gru.h"

namespace emorl {

// Device buffers kept between calls by their owner (a JS DecoderWorkspace), on one device.
class GpuWorkspace {
 public:
  virtual ~GpuWorkspace() = default;
  virtual size_t bytes() const = 0;
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

// The entry points of one build of the GPU sources, the same in both namespaces:
//   make_workspace: device buffers for the calls below;
//   decoder_stage: `ws` must come from the same namespace's make_workspace (checked); profile may be null;
//   conv2d_forward / conv2d_backward: nhwc_conv2d_forward / nhwc_conv2d_backward (nhwc.h) with host
//     arrays in and out: one upload, the products on the device, one download. Symmetric padding
//     (g.pt = g.pl; Ho, Wo imply the rest);
//   gru_forward / gru_backward: gru.h's GRU step, host arrays in and out likewise.
#define EMORL_GPU_ENTRY_POINTS                                                                                         \
  std::unique_ptr<GpuWorkspace> make_workspace(int device);                                                            \
  void decoder_stage(const DecoderStage& s, const DecoderStageOut& o, GpuWorkspace& ws, StageProfile* profile = nullptr); \
  void conv2d_forward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* bias, Act act, float* y, \
                      GpuWorkspace& ws);                                                                               \
  void conv2d_backward(const NhwcGeom& g, int64_t Co, const float* x, const float* w, const float* y, const float* dy,  \
                       Act act, float* dx, float* dw, float* db, GpuWorkspace& ws);                                       \
  void gru_forward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* b_ih,   \
                   const float* b_hh, float* y, float* gates, GpuWorkspace& ws);                                               \
  void gru_backward(const GruDims& d, const float* x, const float* h, const float* w_ih, const float* w_hh, const float* gates, \
                    const float* dy, float* dx, float* dh, float* dw_ih, float* dw_hh, float* db_ih, float* db_hh, GpuWorkspace& ws);

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
