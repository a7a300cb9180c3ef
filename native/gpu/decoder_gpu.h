// The decoding stage (decoder.h) on a GPU: the same plan, results and gradients as the CPU stage,
// with every activation in device memory for the whole call. Two builds of one source
// (decoder_gpu.cu): `cuda` (nvcc, EMORL_CUDA=ON) runs on a device; `simt` (always built) runs the
// same kernels in the SIMT emulator of simt.h, so CI checks the kernels' logic without a GPU.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "../decoder.h"

namespace emorl {

// Device buffers kept between calls by their owner (a JS DecoderWorkspace), on one device.
class GpuWorkspace {
 public:
  virtual ~GpuWorkspace() = default;
  virtual size_t bytes() const = 0;
  virtual int device() const = 0;
  virtual bool emulated() const = 0;
};

namespace simt {
std::unique_ptr<GpuWorkspace> make_workspace(int device);
// `ws` must come from this namespace's make_workspace (checked).
void decoder_stage(const DecoderStage& s, const DecoderStageOut& o, GpuWorkspace& ws);
}  // namespace simt

#if defined(EMORL_CUDA)
namespace cuda {
std::unique_ptr<GpuWorkspace> make_workspace(int device);
void decoder_stage(const DecoderStage& s, const DecoderStageOut& o, GpuWorkspace& ws);
}  // namespace cuda
#endif

}  // namespace emorl
