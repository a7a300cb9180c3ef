// The encoder (a conv stack, then encoder_head.h's head) as one CPU stage each way, as the GPU
// builds run it (gpu.h encoder_forward / encoder_backward): the stack's maps and the head's
// activations live in a Workspace the caller keeps from call to call, so a training step
// allocates none of them. As separate calls they were ~110 MiB of new arrays per Tetrominoes step:
// fresh pages to fault in, and V8 collections for the external memory.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "encoder_head.h"
#include "gpu/gpu.h"
#include "nhwc.h"

namespace emorl {

// Which forward pass's activations a workspace holds: stamp() marks a new set (returned to the
// caller), holds(s) says whether set s is still the one there.
class StageStamps {
 public:
  uint64_t stamp() { return resident_ = ++stamps_; }
  bool holds(uint64_t s) const { return s != 0 && s == resident_; }

 private:
  uint64_t stamps_ = 0, resident_ = 0;
};

// k and v [rows, Z] out (rows = the last map's pixels); returns the stamp of the activations kept in ws.
uint64_t encoder_forward_cpu(const ConvStack& s, const EncoderHead& h, float* k, float* v, Precision prec, Workspace& ws,
                             StageStamps& stamps, int nthreads);

// From dk, dv [rows, Z]: each layer's dw, db and the head's gradients (all null: none wanted; the
// images get no gradient). With another stamp than the workspace's latest, the forward pass runs
// again first (its k and v unused).
void encoder_backward_cpu(const ConvStack& s, const EncoderHead& h, uint64_t stamp, const float* dk, const float* dv,
                          const std::vector<float*>& dw, const std::vector<float*>& db, const EncoderHeadParamGrads& g,
                          Precision prec, Workspace& ws, StageStamps& stamps, int nthreads);

}  // namespace emorl
