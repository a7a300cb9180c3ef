// A stage's device-resident parameters (gpu.h DeviceParams: the decoder's, the encoder's or a GRU's
// weights in their stage's workspace) and their optimizer: the gradients' norms, Adam in place in the
// weights' raw slots, and the copies of weights and moments for checkpoints. Each stage says where
// its parameters lie (decoder_param_slot, encoder_param_slot, gru_param_slot) and leaves their gradients in the
// workspace's gradient state buffer. Compiled by nvcc into emorl::cuda and by the host compiler
// (params_simt.cc) into emorl::simt.
#include "kernels.cuh"

namespace emorl {
namespace EMORL_GPU_NS {
namespace {

// Where parameters lie end to end in a state buffer: parameter j is [begin[j], end[j]).
constexpr int kMaxSpans = 32;
struct ParamSpans {
  int n;
  i64 begin[kMaxSpans], end[kMaxSpans];
};

// norms[j] = the L2 norm of g[begin[j], end[j]) as l2_norm_f32 (optimizer.h) computes it: each
// square rounded to float, summed in order in double, the sum and its square root rounded to
// float. The order is the host's, so the bits are: the sum is one chain of double additions, run
// by one thread. One block per parameter: its threads square the next tile of kThreads elements
// (coalesced) into one shared buffer while thread 0 adds up the previous tile from the other, so
// the chain waits on its additions only, not on memory.
__global__ void l2_norms_kernel(const float* g, ParamSpans spans, float* norms) {
  __shared__ float squares[2][kThreads];
  const int j = static_cast<int>(blockIdx.x), tid = static_cast<int>(threadIdx.x);
  const i64 begin = spans.begin[j], end = spans.end[j];
  const i64 tiles = (end - begin + kThreads - 1) / kThreads;
  double t = 0;
  for (i64 k = 0; k <= tiles; ++k) {
    if (k < tiles) {  // tile k into buffer k % 2
      const i64 i = begin + k * kThreads + tid;
      squares[k % 2][tid] = i < end ? mul_rn(g[i], g[i]) : 0.f;
    }
    if (tid == 0 && k > 0) {  // tile k - 1, in order
      const float* sq = squares[(k - 1) % 2];
      const i64 left = end - begin - (k - 1) * kThreads, n = left < kThreads ? left : kThreads;
      for (i64 i = 0; i < n; ++i) t += static_cast<double>(sq[i]);
    }
    __syncthreads();  // tile k written, tile k - 1 summed: buffer (k - 1) % 2 is free for tile k + 1
  }
  if (tid == 0) norms[j] = sqrt_rn(static_cast<float>(t));
}

// The weights of a launch's parameters (ParamSpans' order), each in its own slot.
struct ParamWeights {
  float* p[kMaxSpans];
};

// adam_update (optimizer.h) in place on each parameter's weights, every operation rounded to float
// in its order; blockIdx.y picks the parameter (one launch for many: most are small, and a launch
// costs more than their update)
__global__ void adam_kernel(ParamSpans spans, ParamWeights w, const float* g_all, float* m_all, float* v_all, AdamScalars s) {
  const int j = static_cast<int>(blockIdx.y);
  float* p = w.p[j];
  const float* g = g_all + spans.begin[j];
  float* m = m_all + spans.begin[j];
  float* v = v_all + spans.begin[j];
  EMORL_GRID_LOOP(i, spans.end[j] - spans.begin[j]) {
    const float gi = s.scale != 1.f ? mul_rn(g[i], s.scale) : g[i];
    m[i] = s.first ? mul_rn(gi, s.c1) : add_rn(mul_rn(m[i], s.b1), mul_rn(gi, s.c1));
    const float sq = mul_rn(gi, gi);
    v[i] = s.first ? mul_rn(sq, s.c2) : add_rn(mul_rn(v[i], s.b2), mul_rn(sq, s.c2));
    const float denom = add_rn(div_rn(sqrt_rn(v[i]), s.bc2_sqrt), s.eps);
    p[i] = sub_rn(p[i], mul_rn(div_rn(m[i], denom), s.step_size));
  }
}

size_t param_slot(const DeviceParams& p, size_t j) {
  switch (p.stage) {
    case DeviceParams::Stage::Decoder: return decoder_param_slot(p, j);
    case DeviceParams::Stage::Encoder: return encoder_param_slot(p, j);
    case DeviceParams::Stage::Gru: break;
  }
  return gru_param_slot(p, j);
}

// "the weight of layer 2", "the bias of layer 0", "head tensor 4 of the encoder", "tensor 3 of the GRU"
std::string param_name(const DeviceParams& p, size_t j) {
  const DeviceParams::Param& q = p.params[j];
  if (p.stage == DeviceParams::Stage::Gru) return "tensor " + std::to_string(q.index) + " of the GRU";
  if (p.stage == DeviceParams::Stage::Encoder && q.index >= p.layers) return "head tensor " + std::to_string(q.index - p.layers + 1) + " of the encoder";
  return std::string("the ") + (q.bias ? "bias" : "weight") + " of " + (p.stage == DeviceParams::Stage::Encoder ? "conv layer " : "layer ") +
         std::to_string(q.index);
}

// parameter j's raw slot, which must hold it under its tag (it does after a stage that used it)
float* resident_param(DeviceWorkspace& ws, const DeviceParams& p, size_t j) {
  const size_t slot = param_slot(p, j);
  const DeviceParams::Param& q = p.params[j];
  if (!q.tag || !ws.slot_holds(slot, slot_tag(q.tag, kAsIs)))
    throw std::invalid_argument("device parameters: the device does not hold " + param_name(p, j) + " under tag " + std::to_string(q.tag) +
                                " (no stage has used it since it changed)");
  return ws.buf(slot, 0);
}

// the state buffer of `key`, which must be there (what: the message's name for it)
float* existing_state(DeviceWorkspace& ws, uint64_t key, size_t n, const char* what) {
  float* d = ws.find_state(key, n);
  if (!d) throw std::invalid_argument(std::string("device parameters: no ") + what + " on the device");
  return d;
}

uint64_t state_key(DeviceParamPart part) {
  switch (part) {
    case DeviceParamPart::Grads: return kGradState;
    case DeviceParamPart::FirstMoments: return kFirstMomentState;
    case DeviceParamPart::SecondMoments: return kSecondMomentState;
    case DeviceParamPart::Weights: break;
  }
  throw std::logic_error("device parameters: weights are not a state buffer");
}
const char* state_name(DeviceParamPart part) {
  return part == DeviceParamPart::Grads ? "summed gradients" : part == DeviceParamPart::FirstMoments ? "first moments" : "second moments";
}
// Calls f(first, start, spans, largest) for the parameters in launches of up to kMaxSpans: spans from
// parameter `first` on, offsets relative to its place in the state buffers (spans.begin[0] = 0),
// largest the most floats of one of them.
template <class F>
void for_span_launches(const DeviceParams& p, F f) {
  for (size_t first = 0, offset = 0; first < p.params.size(); first += kMaxSpans) {
    ParamSpans spans{};
    spans.n = static_cast<int>(std::min<size_t>(kMaxSpans, p.params.size() - first));
    const size_t start = offset;
    i64 largest = 0;
    for (int j = 0; j < spans.n; ++j) {
      const size_t n = p.params[first + static_cast<size_t>(j)].n;
      spans.begin[j] = static_cast<i64>(offset - start);
      offset += n;
      spans.end[j] = static_cast<i64>(offset - start);
      largest = std::max<i64>(largest, static_cast<i64>(n));
    }
    f(first, start, spans, largest);
  }
}
}  // namespace

void device_grad_norms(const DeviceParams& p, float* norms, GpuWorkspace& gws) {
  DeviceWorkspace& ws = own_workspace(gws);
  const float* g = existing_state(ws, kGradState, p.total(), "summed gradients");
  float* d = ws.state(kNormState, std::max<size_t>(1, p.params.size()));
  for_span_launches(p, [&](size_t first, size_t start, const ParamSpans& spans, i64) {
    launch(l2_norms_kernel, dim3(static_cast<unsigned>(spans.n)), dim3(kThreads), g + start, spans, d + first);
  });
  if (!p.params.empty()) ws.down(norms, d, p.params.size());
  finish("device gradient norms");
}

void device_adam(const DeviceParams& p, const std::vector<uint64_t>& new_tags, const AdamScalars& s, GpuWorkspace& gws) {
  DeviceWorkspace& ws = own_workspace(gws);
  if (new_tags.size() != p.params.size()) throw std::invalid_argument("device Adam: one new tag per parameter");
  const size_t total = p.total();
  const float* g = existing_state(ws, kGradState, total, "summed gradients");
  float* m = s.first ? ws.state(kFirstMomentState, total) : existing_state(ws, kFirstMomentState, total, "first moments (not the first step)");
  float* v = s.first ? ws.state(kSecondMomentState, total) : existing_state(ws, kSecondMomentState, total, "second moments (not the first step)");
  std::vector<float*> ps;
  for (size_t j = 0; j < p.params.size(); ++j) {
    if (!new_tags[j] || new_tags[j] == p.params[j].tag) throw std::invalid_argument("device Adam: every parameter needs a new tag (nonzero)");
    ps.push_back(resident_param(ws, p, j));  // all checked before anything changes
  }
  for_span_launches(p, [&](size_t first, size_t start, const ParamSpans& spans, i64 largest) {
    ParamWeights w{};
    for (int k = 0; k < spans.n; ++k) w.p[k] = ps[first + static_cast<size_t>(k)];
    dim3 grid = grid_for(largest);
    grid.y = static_cast<unsigned>(spans.n);
    launch(adam_kernel, grid, dim3(kThreads), spans, w, g + start, m + start, v + start, s);
  });
  for (size_t j = 0; j < p.params.size(); ++j) ws.tag_slot(param_slot(p, j), slot_tag(new_tags[j], kAsIs));
  finish("device Adam");
}

void device_params_copy(const DeviceParams& p, DeviceParamPart part, float* down, const float* up, GpuWorkspace& gws) {
  DeviceWorkspace& ws = own_workspace(gws);
  if (!down == !up) throw std::invalid_argument("device parameters: copy one way, down or up");
  const size_t total = p.total();
  if (part == DeviceParamPart::Weights) {
    if (up) throw std::invalid_argument("device parameters: weights go up through the stages (under their tags), not here");
    for (size_t j = 0, offset = 0; j < p.params.size(); offset += p.params[j].n, ++j) ws.down(down + offset, resident_param(ws, p, j), p.params[j].n);
  } else if (down) {
    ws.down(down, existing_state(ws, state_key(part), total, state_name(part)), total);
  } else if (part == DeviceParamPart::Grads) {
    // the ranks' sum replaces a pass's own: there must be one (gradients are made on the device)
    ws.up(existing_state(ws, kGradState, total, "summed gradients to replace"), up, total);
  } else {
    ws.up(ws.state(state_key(part), total), up, total);
  }
  finish("device parameter copy");
}

float* device_grad_state(const DeviceParams& p, GpuWorkspace& gws) {
  DeviceWorkspace& ws = own_workspace(gws);
  float* g = existing_state(ws, kGradState, p.total(), "summed gradients");
  finish("device gradient state");
  return g;
}

}  // namespace EMORL_GPU_NS
}  // namespace emorl
