// Convolutions by im2col + GEMM. Per image n (P = Ho*Wo, K = C*kh*kw):
//   forward          y_n[Co,P]  = w[Co,K] . col(x_n)[K,P] + bias
//   backward-input   dcol[K,P]  = w^T[K,Co] . dy_n[Co,P];  dx_n = col2im(dcol)
//   backward-filter  dw[Co,K]  += dy_n[Co,P] . col(x_n)^T[P,K]
// With at least as many images as threads, each thread takes whole images (its own column and
// packing buffers, a serial GEMM; filter gradients summed per thread, then reduced); otherwise the
// images go one by one through the multi-threaded GEMM.
#include "conv.h"

#include <algorithm>
#include <atomic>

#include "common.h"
#include "gemm.h"

namespace emorl {

namespace {

inline int64_t ceil_div_nonneg(int64_t a, int64_t b) {  // ceil(a/b) for b > 0, clamped at 0
  return a <= 0 ? 0 : (a + b - 1) / b;
}

// Output columns ow with 0 <= ow*s - pad + k < W lie in [lo, hi).
inline void valid_range(int64_t W, int64_t Wo, int64_t s, int64_t pad, int64_t k, int64_t& lo, int64_t& hi) {
  lo = std::min<int64_t>(Wo, ceil_div_nonneg(pad - k, s));
  hi = std::min<int64_t>(Wo, ceil_div_nonneg(W + pad - k, s));
  if (hi < lo) hi = lo;
}

// Pixels [p0, p1) of row k = (c, ki, kj) of the classic column matrix, into row[0 .. p1-p0).
inline void im2col_row(const ConvGeom& g, const float* x, int64_t c, int64_t ki, int64_t kj, int64_t p0, int64_t p1,
                       float* row) {
  int64_t lo, hi;
  valid_range(g.W, g.Wo, g.sw, g.pl, kj, lo, hi);
  int64_t oh = p0 / g.Wo, ow0 = p0 % g.Wo;
  for (int64_t p = p0; p < p1; ++oh, ow0 = 0) {
    const int64_t ow1 = std::min<int64_t>(g.Wo, ow0 + (p1 - p));  // this image row: [ow0, ow1)
    float* r = row + (p - p0) - ow0;                                 // r[ow] for ow in [ow0, ow1)
    p += ow1 - ow0;
    const int64_t ih = oh * g.sh - g.pt + ki;
    if (ih < 0 || ih >= g.H) {
      for (int64_t o = ow0; o < ow1; ++o) r[o] = 0.f;
      continue;
    }
    const float* src = x + (c * g.H + ih) * g.W - g.pl + kj;
    const int64_t a = std::min(std::max(lo, ow0), ow1), b = std::max(std::min(hi, ow1), a);
    for (int64_t o = ow0; o < a; ++o) r[o] = 0.f;
    if (g.sw == 1) {
      for (int64_t o = a; o < b; ++o) r[o] = src[o];
    } else {
      for (int64_t o = a; o < b; ++o) r[o] = src[o * g.sw];
    }
    for (int64_t o = b; o < ow1; ++o) r[o] = 0.f;
  }
}

template <int NR>
void scatter_row_to_panels(const float* row, int64_t n, int64_t K, int64_t k, float* dst) {
  int64_t p0 = 0;
  for (; p0 + NR <= n; p0 += NR) {
    float* d = dst + (p0 / NR) * K * NR + k * NR;
    for (int q = 0; q < NR; ++q) d[q] = row[p0 + q];
  }
  if (p0 < n) {
    float* d = dst + (p0 / NR) * K * NR + k * NR;
    int q = 0;
    for (; p0 + q < n; ++q) d[q] = row[p0 + q];
    for (; q < NR; ++q) d[q] = 0.f;
  }
}

// Columns of pixels [p0, p1), written straight into the GEMM's packed-B layout: ceil((p1-p0)/nr)
// panels of [K][nr] floats, zero-padded. Each row is built whole in `row` (contiguous runs),
// then dealt out in nr-wide chunks.
void im2col_panels(const ConvGeom& g, const float* x, int64_t p0, int64_t p1, int64_t nr, float* dst, float* row) {
  const int64_t K = g.K(), n = p1 - p0;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t ki = 0; ki < g.kh; ++ki)
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t k = (c * g.kh + ki) * g.kw + kj;
        im2col_row(g, x, c, ki, kj, p0, p1, row);
        switch (nr) {
          case 32: scatter_row_to_panels<32>(row, n, K, k, dst); break;
          case 16: scatter_row_to_panels<16>(row, n, K, k, dst); break;
          case 8: scatter_row_to_panels<8>(row, n, K, k, dst); break;
          default:
            for (int64_t p = 0; p < ((n + nr - 1) / nr) * nr; ++p)
              dst[(p / nr) * K * nr + k * nr + p % nr] = p < n ? row[p] : 0.f;
        }
      }
}

// The transposed columns of pixels [p0, p1), in the GEMM's packed-B layout for op(B) = col^T
// (the filter gradient's right operand): ceil(K/nr) panels of [p1-p0][nr] floats. Rows are
// built 8 at a time in `rows` (8*(p1-p0) floats) and written out as 8-float runs (nr is a
// multiple of 8). Entries for k >= K are never written: the caller zeroes the buffer once.
void im2col_panels_t(const ConvGeom& g, const float* x, int64_t p0, int64_t p1, int64_t nr, float* dst,
                     float* rows) {
  const int64_t n = p1 - p0, K = g.K(), khw = g.kh * g.kw;
  for (int64_t k0 = 0; k0 < K; k0 += 8) {
    const int64_t kb = std::min<int64_t>(8, K - k0);
    for (int64_t kk = 0; kk < kb; ++kk) {
      const int64_t k = k0 + kk;
      im2col_row(g, x, k / khw, (k / g.kw) % g.kh, k % g.kw, p0, p1, rows + kk * n);
    }
    float* __restrict d = dst + (k0 / nr) * n * nr + k0 % nr;
    const float* __restrict r = rows;
    if (kb == 8) {
      int64_t q = 0;
#if defined(__GNUC__) && !defined(__clang__)
      // 8 rows x 4 pixels at a time: two 4x4 transposes in vector registers.
      typedef float v4 __attribute__((vector_size(16)));
      typedef float v4u __attribute__((vector_size(16), aligned(4), may_alias));
      typedef int i4 __attribute__((vector_size(16)));
      const i4 lo2 = {0, 4, 1, 5}, hi2 = {2, 6, 3, 7}, lo4 = {0, 1, 4, 5}, hi4 = {2, 3, 6, 7};
      for (; q + 4 <= n; q += 4) {
        for (int h = 0; h < 2; ++h) {
          const float* rr = r + 4 * h * n + q;
          const v4 r0 = *reinterpret_cast<const v4u*>(rr), r1 = *reinterpret_cast<const v4u*>(rr + n);
          const v4 r2 = *reinterpret_cast<const v4u*>(rr + 2 * n), r3 = *reinterpret_cast<const v4u*>(rr + 3 * n);
          const v4 t0 = __builtin_shuffle(r0, r1, lo2), t1 = __builtin_shuffle(r0, r1, hi2);
          const v4 t2 = __builtin_shuffle(r2, r3, lo2), t3 = __builtin_shuffle(r2, r3, hi2);
          float* dd = d + q * nr + 4 * h;
          *reinterpret_cast<v4u*>(dd) = __builtin_shuffle(t0, t2, lo4);
          *reinterpret_cast<v4u*>(dd + nr) = __builtin_shuffle(t0, t2, hi4);
          *reinterpret_cast<v4u*>(dd + 2 * nr) = __builtin_shuffle(t1, t3, lo4);
          *reinterpret_cast<v4u*>(dd + 3 * nr) = __builtin_shuffle(t1, t3, hi4);
        }
      }
#endif
      for (; q < n; ++q)
        for (int kk = 0; kk < 8; ++kk) d[q * nr + kk] = r[kk * n + q];
    } else {
      for (int64_t q = 0; q < n; ++q)
        for (int64_t kk = 0; kk < kb; ++kk) d[q * nr + kk] = r[kk * n + q];
    }
  }
}

// Pixels per im2col chunk in the forward pass: the chunk's columns (K x chunk floats) stay in
// the L2 cache between im2col writing them and the GEMM reading them.
int64_t forward_chunk(int64_t K, int64_t P, int64_t nr) {
  int64_t chunk = (1024 * 1024 / 4) / (K > 0 ? K : 1);  // ~1 MB of columns
  chunk = std::max<int64_t>(nr, chunk / nr * nr);
  return std::min<int64_t>(chunk, (P + nr - 1) / nr * nr);
}

// x_img += col2im(col); x_img must be zeroed by the caller.
// x_img += col2im of pixels [p0, p1) of the column matrix, given as `col` with rows of
// ld floats (col[k*ld + p - p0]). x_img must be zeroed by the caller before the first chunk.
void col2im_add(const ConvGeom& g, const float* col, int64_t ld, int64_t p0, int64_t p1, float* x) {
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t ki = 0; ki < g.kh; ++ki)
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const float* row = col + ((c * g.kh + ki) * g.kw + kj) * ld;
        int64_t lo, hi;
        valid_range(g.W, g.Wo, g.sw, g.pl, kj, lo, hi);
        int64_t oh = p0 / g.Wo, ow0 = p0 % g.Wo;
        for (int64_t p = p0; p < p1; ++oh, ow0 = 0) {
          const int64_t ow1 = std::min<int64_t>(g.Wo, ow0 + (p1 - p));
          const float* r = row + (p - p0) - ow0;  // r[ow] for ow in [ow0, ow1)
          p += ow1 - ow0;
          const int64_t ih = oh * g.sh - g.pt + ki;
          if (ih < 0 || ih >= g.H) continue;
          float* dst = x + (c * g.H + ih) * g.W - g.pl + kj;
          const int64_t a = std::min(std::max(lo, ow0), ow1), b = std::max(std::min(hi, ow1), a);
          if (g.sw == 1) {
            for (int64_t o = a; o < b; ++o) dst[o] += r[o];
          } else {
            for (int64_t o = a; o < b; ++o) dst[o * g.sw] += r[o];
          }
        }
      }
}

struct Scratch {
  AlignedBuf col, row, packA, packB;
};

std::vector<Scratch> make_scratch(int nt, int64_t col_floats, int64_t row_floats = 0) {
  const GemmKernel& k = gemm_kernel();
  std::vector<Scratch> s(nt);
  for (auto& t : s) {
    if (col_floats) t.col.reset(col_floats);
    if (row_floats) t.row.reset(row_floats);
    t.packA.reset(k.pack_a_floats);
    t.packB.reset(k.pack_b_floats);
  }
  return s;
}

int threads_for(int64_t N, int nthreads) { return N >= nthreads ? nthreads : 1; }

void add_bias(const ConvGeom& g, const float* bias, float* y_img) {
  if (!bias) return;
  const int64_t P = g.P();
  for (int64_t co = 0; co < g.Co; ++co) {
    float* r = y_img + co * P;
    const float b = bias[co];
    for (int64_t p = 0; p < P; ++p) r[p] += b;
  }
}

// dbias[c] = sum over n, p of t[n, c, p] for t of shape [N, Cn, P].
void channel_sums(const float* t, int64_t N, int64_t Cn, int64_t P, float* out, int nthreads) {
  parallel_region(std::min<int64_t>(nthreads, std::max<int64_t>(1, Cn)), [&](int tid, int nt) {
    int64_t b, e;
    split_range(Cn, tid, nt, b, e);
    for (int64_t c = b; c < e; ++c) {
      double s = 0;
      for (int64_t n = 0; n < N; ++n) {
        const float* r = t + (n * Cn + c) * P;
        float part = 0.f;
        for (int64_t p = 0; p < P; ++p) part += r[p];
        s += part;
      }
      out[c] = static_cast<float>(s);
    }
  });
}

}  // namespace

void conv2d_forward(const ConvGeom& g, const float* x, const float* w, const float* bias, float* y, int nthreads) {
  const int64_t K = g.K(), P = g.P();
  const int64_t xs = g.C * g.H * g.W, ys = g.Co * P;
  const bool id = g.identity();
  const int64_t nr = gemm_kernel().nr;
  const int64_t chunk = forward_chunk(K, P, nr);
  const int nt_outer = threads_for(g.N, nthreads);
  auto scratch = make_scratch(nt_outer, id ? 0 : K * chunk, chunk);
  // The weights, packed once for all images and chunks (read-only, shared by the threads).
  const int64_t mr = gemm_kernel().mr;
  AlignedBuf wpack(((g.Co + mr - 1) / mr) * mr * K);
  gemm_kernel().pack_a_full(false, g.Co, K, w, K, wpack.data());
  auto one = [&](int64_t n, Scratch& s, int gemm_threads) {
    auto gemm = [&](const GemmCall& c) {
      if (gemm_threads > 1) sgemm(c, gemm_threads);
      else sgemm_serial(c, s.packA.data(), s.packB.data());
    };
    if (id) {
      gemm(GemmCall{false, false, g.Co, P, K, w, K, x + n * xs, P, y + n * ys, P, false});
    } else {
      for (int64_t p0 = 0; p0 < P; p0 += chunk) {
        const int64_t p1 = std::min(P, p0 + chunk);
        im2col_panels(g, x + n * xs, p0, p1, nr, s.col.data(), s.row.data());
        GemmCall c{false, false, g.Co, p1 - p0, K, nullptr, 0, nullptr, 0, y + n * ys + p0, P, false};
        c.Bpacked = s.col.data();
        c.Apacked = wpack.data();
        gemm(c);
      }
    }
    add_bias(g, bias, y + n * ys);
  };
  if (nt_outer > 1) {
    // Images are handed out one at a time (each output image is independent, so the result
    // does not depend on the order): a thread that loses its core to another process does not
    // hold the others up.
    std::atomic<int64_t> next{0};
    parallel_region(nt_outer, [&](int tid, int) {
      for (int64_t n; (n = next.fetch_add(1, std::memory_order_relaxed)) < g.N;) one(n, scratch[tid], 1);
    });
  } else {
    FtzScope ftz;
    for (int64_t n = 0; n < g.N; ++n) one(n, scratch[0], nthreads);
  }
}

void conv2d_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx, int nthreads) {
  const int64_t K = g.K(), P = g.P();
  const int64_t xs = g.C * g.H * g.W, ys = g.Co * P;
  const bool id = g.identity();
  const int64_t nr = gemm_kernel().nr, mr = gemm_kernel().mr;
  // Pixel chunks whose column gradients (K x chunk, ~1 MB) stay in cache for col2im.
  const int64_t chunk = id ? P : forward_chunk(K, P, nr);
  const int nt_outer = threads_for(g.N, nthreads);
  auto scratch = make_scratch(nt_outer, id ? 0 : K * chunk);
  // w^T [K x Co], packed once for all images and chunks.
  AlignedBuf wpack(((K + mr - 1) / mr) * mr * g.Co);
  gemm_kernel().pack_a_full(true, K, g.Co, w, K, wpack.data());
  auto one = [&](int64_t n, Scratch& s, int gemm_threads) {
    auto gemm = [&](GemmCall c) {
      c.Apacked = wpack.data();
      if (gemm_threads > 1) sgemm(c, gemm_threads);
      else sgemm_serial(c, s.packA.data(), s.packB.data());
    };
    if (id) {
      gemm(GemmCall{true, false, K, P, g.Co, nullptr, 0, dy + n * ys, P, dx + n * xs, P, false});
      return;
    }
    std::fill(dx + n * xs, dx + (n + 1) * xs, 0.f);
    for (int64_t p0 = 0; p0 < P; p0 += chunk) {
      const int64_t p1 = std::min(P, p0 + chunk);
      gemm(GemmCall{true, false, K, p1 - p0, g.Co, nullptr, 0, dy + n * ys + p0, P, s.col.data(), p1 - p0, false});
      col2im_add(g, s.col.data(), p1 - p0, p0, p1, dx + n * xs);
    }
  };
  if (nt_outer > 1) {
    // Images are handed out one at a time (each output image is independent, so the result
    // does not depend on the order): a thread that loses its core to another process does not
    // hold the others up.
    std::atomic<int64_t> next{0};
    parallel_region(nt_outer, [&](int tid, int) {
      for (int64_t n; (n = next.fetch_add(1, std::memory_order_relaxed)) < g.N;) one(n, scratch[tid], 1);
    });
  } else {
    FtzScope ftz;
    for (int64_t n = 0; n < g.N; ++n) one(n, scratch[0], nthreads);
  }
}

void conv2d_backward_filter(const ConvGeom& g, const float* x, const float* dy, float* dw, float* dbias,
                            int nthreads) {
  const int64_t K = g.K(), P = g.P();
  const int64_t xs = g.C * g.H * g.W, ys = g.Co * P;
  const bool id = g.identity();
  const int64_t nr = gemm_kernel().nr;
  const int64_t kpad = (K + nr - 1) / nr * nr;
  // Pixel chunks whose transposed columns (~512 KB) stay in cache for the GEMM that reads them.
  const int64_t chunk = std::min<int64_t>(P, std::max<int64_t>(8, (512 * 1024 / 4) / kpad / 8 * 8));
  const int nt_outer = threads_for(g.N, nthreads);
  auto scratch = make_scratch(nt_outer, 0, 8 * chunk);
  if (!id)
    for (auto& t : scratch) t.col.reset(kpad * chunk, true);
  auto one = [&](int64_t n, Scratch& s, float* acc, bool first, int gemm_threads) {
    auto gemm = [&](const GemmCall& c) {
      if (gemm_threads > 1) sgemm(c, gemm_threads);
      else sgemm_serial(c, s.packA.data(), s.packB.data());
    };
    if (id) {
      gemm(GemmCall{false, true, g.Co, K, P, dy + n * ys, P, x + n * xs, P, acc, K, !first});
      return;
    }
    for (int64_t p0 = 0; p0 < P; p0 += chunk) {
      const int64_t p1 = std::min(P, p0 + chunk);
      im2col_panels_t(g, x + n * xs, p0, p1, nr, s.col.data(), s.row.data());
      GemmCall c{false, false, g.Co, K, p1 - p0, dy + n * ys + p0, P, nullptr, 0, acc, K, !(first && p0 == 0)};
      c.Bpacked = s.col.data();
      gemm(c);
    }
  };
  if (g.N == 0) {
    std::fill(dw, dw + g.Co * K, 0.f);
  } else if (nt_outer > 1) {
    std::vector<AlignedBuf> part(nt_outer);
    for (int t = 1; t < nt_outer; ++t) part[t].reset(g.Co * K, true);
    std::fill(dw, dw + g.Co * K, 0.f);
    // A fixed split of the images keeps the summation order, hence the result, reproducible.
    parallel_region(nt_outer, [&](int tid, int nt) {
      float* acc = tid == 0 ? dw : part[tid].data();
      int64_t b, e;
      split_range(g.N, tid, nt, b, e);
      for (int64_t n = b; n < e; ++n) one(n, scratch[tid], acc, false, 1);
    });
    for (int t = 1; t < nt_outer; ++t) {
      const float* p = part[t].data();
      for (int64_t i = 0; i < g.Co * K; ++i) dw[i] += p[i];
    }
  } else {
    FtzScope ftz;
    for (int64_t n = 0; n < g.N; ++n) one(n, scratch[0], dw, n == 0, nthreads);
  }
  if (dbias) channel_sums(dy, g.N, g.Co, P, dbias, nthreads);
}

// Transposed convolution: the forward conv with geometry g maps y-space (image side) to x-space
// (column side); the transposed conv runs its passes the other way round.
void conv2d_transpose_forward(const ConvGeom& g, const float* x, const float* w, const float* bias, float* y,
                              int nthreads) {
  conv2d_backward_input(g, x, w, y, nthreads);
  if (bias) {
    const int64_t HW = g.H * g.W;
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < g.C; ++c) {
        float* r = y + (n * g.C + c) * HW;
        for (int64_t p = 0; p < HW; ++p) r[p] += bias[c];
      }
  }
}

void conv2d_transpose_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx, int nthreads) {
  conv2d_forward(g, dy, w, nullptr, dx, nthreads);
}

void conv2d_transpose_backward_filter(const ConvGeom& g, const float* x, const float* dy, float* dw, float* dbias,
                                      int nthreads) {
  conv2d_backward_filter(g, dy, x, dw, nullptr, nthreads);
  if (dbias) channel_sums(dy, g.N, g.C, g.H * g.W, dbias, nthreads);
}

}  // namespace emorl
