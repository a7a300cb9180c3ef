// The slot competition (lib/ops/attention.ts is the reference; native/attention.h the CPU passes)
// on a GPU, against keys and values already on the device (the encoder's, conv_gpu.cu):
//
//   p = softmax over slots of q kᵀ,  a = p + ε,  s = Σ_pixels a,  w = a / s,  U = w v
//
// q [B,K,d] (already scaled), k [B,N,d], v [B,N,C], p [B,K,N], s [B,K], U [B,K,C]. Backward, from
// dU, with dW = dU vᵀ and r = Σ_pixels dW·w = dU·U (per slot, so no pass over the pixels):
//
//   da = (dW − r) / s,  dd = p (da − Σ_slots p·da),  dq = dd k,  dk = ddᵀ q,  dv = wᵀ dU
//
// dk and dv are added onto buffers the caller sums over attention rounds. Nothing is kept from
// the forward call for the backward call: it recomputes p, s and U (a few MACs per pixel and slot).
#pragma once

#include "kernels.cuh"

namespace emorl {
namespace EMORL_GPU_NS {
namespace {

// The per-pixel kernels hold one value per slot in registers.
constexpr i64 kMaxSlots = 32;

// p [B,K,N]: per pixel, the softmax over the slots of q·k.
__global__ void slot_softmax_kernel(const float* q, const float* k, i64 B, i64 K, i64 N, i64 d, float* p) {
  EMORL_GRID_LOOP(i, B * N) {
    const i64 b = i / N, n = i % N;
    const float* kn = k + i * d;
    const float* qb = q + b * K * d;
    float e[kMaxSlots];
    for (i64 j = 0; j < K; ++j) {
      float t = 0.f;
      for (i64 c = 0; c < d; ++c) t += qb[j * d + c] * kn[c];
      e[j] = t;
    }
    float mx = e[0];
    for (i64 j = 1; j < K; ++j) mx = e[j] > mx ? e[j] : mx;
    float sum = 0.f;
    for (i64 j = 0; j < K; ++j) {
      e[j] = expf(e[j] - mx);
      sum += e[j];
    }
    const float inv = 1.f / sum;
    for (i64 j = 0; j < K; ++j) p[(b * K + j) * N + n] = e[j] * inv;
  }
}

// out[b,j,c] = Σ_n (wt[b,j,n] + add) · rows[b,n,c], divided by Σ_n (wt[b,j,n] + add) when `s` is
// given (that sum is also written to s[b,j]). One (b, j) per blockIdx.y; blocks of 32 columns × 8
// pixel lanes.
__global__ void slot_pool_kernel(const float* wt, float add, const float* rows, i64 K, i64 N, i64 C, float* out, float* s) {
  __shared__ float lanes[8][33];
  __shared__ float totals[8];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const i64 bj = blockIdx.y, b = bj / K, c = static_cast<i64>(blockIdx.x) * 32 + tx;
  const float* wr = wt + bj * N;
  const float* rb = rows + b * N * C;
  float acc = 0.f, total = 0.f;
  for (i64 n = ty; n < N; n += 8) {
    const float a = wr[n] + add;
    total += a;
    if (c < C) acc += a * rb[n * C + c];
  }
  lanes[ty][tx] = acc;
  if (tx == 0) totals[ty] = total;
  __syncthreads();
  if (ty == 0 && c < C) {
    float t = 0.f, z = 0.f;
    for (int y = 0; y < 8; ++y) {
      t += lanes[y][tx];
      z += totals[y];
    }
    out[bj * C + c] = s ? t / z : t;
    if (s && c == 0) s[bj] = z;
  }
}

// r[i] = Σ_c x[i,c]·y[i,c] over `n` rows of C.
__global__ void row_dots_kernel(const float* x, const float* y, i64 n, i64 C, float* r) {
  EMORL_GRID_LOOP(i, n) {
    float t = 0.f;
    for (i64 c = 0; c < C; ++c) t += x[i * C + c] * y[i * C + c];
    r[i] = t;
  }
}

// Per pixel: dd [B,K,N] = d/d(q·k), and the pixel's rows of dk and dv added onto dk_sum [B,N,d]
// and dv_sum [B,N,C].
__global__ void slot_softmax_backward_kernel(const float* p, const float* s, const float* r, const float* q, const float* v,
                                             const float* dU, float eps, i64 B, i64 K, i64 N, i64 d, i64 C, float* dd,
                                             float* dk_sum, float* dv_sum) {
  EMORL_GRID_LOOP(i, B * N) {
    const i64 b = i / N, n = i % N;
    const float* vn = v + i * C;
    const float* dUb = dU + b * K * C;
    float w[kMaxSlots], g[kMaxSlots];
    float pda = 0.f;
    for (i64 j = 0; j < K; ++j) {
      const i64 bj = b * K + j;
      const float pj = p[bj * N + n];
      float dW = 0.f;
      for (i64 c = 0; c < C; ++c) dW += dUb[j * C + c] * vn[c];
      w[j] = (pj + eps) / s[bj];
      g[j] = (dW - r[bj]) / s[bj];  // d/da
      pda += pj * g[j];
    }
    for (i64 j = 0; j < K; ++j) {
      const i64 at = (b * K + j) * N + n;
      g[j] = p[at] * (g[j] - pda);  // d/d(q·k)
      dd[at] = g[j];
    }
    const float* qb = q + b * K * d;
    for (i64 c = 0; c < d; ++c) {
      float t = 0.f;
      for (i64 j = 0; j < K; ++j) t += g[j] * qb[j * d + c];
      dk_sum[i * d + c] += t;
    }
    for (i64 c = 0; c < C; ++c) {
      float t = 0.f;
      for (i64 j = 0; j < K; ++j) t += w[j] * dUb[j * C + c];
      dv_sum[i * C + c] += t;
    }
  }
}

// The sizes of one slot competition.
struct SlotAttention {
  i64 B, K, N, d, C;
  float eps;
};

void check_attention(const SlotAttention& a) {
  if (a.B < 1 || a.K < 1 || a.N < 1 || a.d < 1 || a.C < 1) throw std::invalid_argument("GPU slot attention: empty shape");
  if (a.K > kMaxSlots) throw std::invalid_argument("GPU slot attention: at most " + std::to_string(kMaxSlots) + " slots");
  if (a.B * a.K > 65535) throw std::invalid_argument("GPU slot attention: batch × slots must be at most 65535");
}

// The workspace slots one competition uses, from `base` on.
struct AttentionSlots {
  size_t base;
  size_t q() const { return base; }
  size_t p() const { return base + 1; }
  size_t s() const { return base + 2; }
  size_t U() const { return base + 3; }
  size_t dU() const { return base + 4; }
  size_t r() const { return base + 5; }
  size_t dd() const { return base + 6; }
  size_t dq() const { return base + 7; }
};

// q uploaded, then p, s and U on the device; returns U's buffer.
const float* attention_pass(DeviceWorkspace& ws, const AttentionSlots& sl, const SlotAttention& a, const float* k, const float* v,
                            const float* q_host) {
  const float* q = ws.upload(sl.q(), q_host, static_cast<size_t>(a.B * a.K * a.d));
  float* p = ws.buf(sl.p(), static_cast<size_t>(a.B * a.K * a.N));
  float* s = ws.buf(sl.s(), static_cast<size_t>(a.B * a.K));
  float* U = ws.buf(sl.U(), static_cast<size_t>(a.B * a.K * a.C));
  launch(slot_softmax_kernel, grid_for(a.B * a.N), dim3(kThreads), q, k, a.B, a.K, a.N, a.d, p);
  launch(slot_pool_kernel, dim3(as_int((a.C + 31) / 32, "columns"), as_int(a.B * a.K, "B·K")), dim3(32, 8), static_cast<const float*>(p),
         a.eps, v, a.K, a.N, a.C, U, s);
  return U;
}

// updates [B,K,C] and, when p_host is not null, the softmax p [B,K,N] to the host.
void attention_forward(DeviceWorkspace& ws, const AttentionSlots& sl, const SlotAttention& a, const float* k, const float* v,
                       const float* q_host, float* updates_host, float* p_host) {
  check_attention(a);
  const float* U = attention_pass(ws, sl, a, k, v, q_host);
  ws.down(updates_host, U, static_cast<size_t>(a.B * a.K * a.C));
  if (p_host) ws.down(p_host, ws.buf(sl.p(), 0), static_cast<size_t>(a.B * a.K * a.N));
}

// dq [B,K,d] to the host from dU [B,K,C]; dk and dv added onto dk_sum, dv_sum (device buffers).
void attention_backward(DeviceWorkspace& ws, const AttentionSlots& sl, const SlotAttention& a, const float* k, const float* v,
                        const float* q_host, const float* dU_host, float* dk_sum, float* dv_sum, float* dq_host) {
  check_attention(a);
  const float* U = attention_pass(ws, sl, a, k, v, q_host);
  const float* dU = ws.upload(sl.dU(), dU_host, static_cast<size_t>(a.B * a.K * a.C));
  float* r = ws.buf(sl.r(), static_cast<size_t>(a.B * a.K));
  launch(row_dots_kernel, grid_for(a.B * a.K), dim3(kThreads), dU, U, a.B * a.K, a.C, r);
  float* dd = ws.buf(sl.dd(), static_cast<size_t>(a.B * a.K * a.N));
  const float* q = ws.buf(sl.q(), 0);
  launch(slot_softmax_backward_kernel, grid_for(a.B * a.N), dim3(kThreads), static_cast<const float*>(ws.buf(sl.p(), 0)),
         static_cast<const float*>(ws.buf(sl.s(), 0)), static_cast<const float*>(r), q, v, dU, a.eps, a.B, a.K, a.N, a.d, a.C, dd, dk_sum,
         dv_sum);
  float* dq = ws.buf(sl.dq(), static_cast<size_t>(a.B * a.K * a.d));
  launch(slot_pool_kernel, dim3(as_int((a.d + 31) / 32, "columns"), as_int(a.B * a.K, "B·K")), dim3(32, 8), static_cast<const float*>(dd),
         0.f, k, a.K, a.N, a.d, dq, static_cast<float*>(nullptr));
  ws.down(dq_host, dq, static_cast<size_t>(a.B * a.K * a.d));
}

}  // namespace
}  // namespace EMORL_GPU_NS
}  // namespace emorl
