// Streaming kernels of the class-only calls (one query row; float_row_ops.h: dot_rows,
// weighted_rows), compiled once per instruction set like row_ops_impl.h (included by the same
// per-level units, in the same rollingq::CPU_CAPABILITY namespace).
//
// A class-only call reads every valid key and value row once and does a few FMAs per element:
// it is bound by memory bandwidth. So these kernels keep several rows in flight (independent
// accumulators per row) and prefetch rows ahead of use, instead of one function call and one
// dependent reduction per row. Fixed summation orders: results depend on the level only.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "define CPU_CAPABILITY before including class_row_impl.h (see row_ops_impl.h)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace rollingq {
namespace CPU_CAPABILITY {
namespace class_row {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kRows = 4;           // rows in flight
constexpr int64_t kPrefetchRows = 16;  // how far ahead rows are prefetched

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

inline void prefetch_row(const float* row, int64_t dh) {
  for (int64_t c = 0; c < dh; c += 64 / static_cast<int64_t>(sizeof(float))) __builtin_prefetch(row + c);
}

// scores[j] = scale * (q . x_j) for the n rows x_j of x (n x dh); kSum: sum (dh) += sum_j x_j.
template <bool kSum>
void dot_rows_impl(const float* q, const float* x, int64_t n, int64_t dh, float scale, float* scores, float* sum) {
  const int64_t full = dh / kW * kW;
  int64_t j = 0;
  for (; j + kRows <= n; j += kRows) {
    const float* r = x + j * dh;
    if (j + kPrefetchRows + kRows <= n)
      for (int64_t i = 0; i < kRows; ++i) prefetch_row(r + (kPrefetchRows + i) * dh, dh);
    Vec acc[kRows] = {Vec(0.0f), Vec(0.0f), Vec(0.0f), Vec(0.0f)};
    int64_t c = 0;
    for (; c < full; c += kW) {
      const Vec qc = Vec::loadu(q + c);
      Vec rows[kRows];
      for (int64_t i = 0; i < kRows; ++i) {
        rows[i] = Vec::loadu(r + i * dh + c);
        acc[i] = at::vec::fmadd(qc, rows[i], acc[i]);
      }
      if constexpr (kSum) ((rows[0] + rows[1]) + (rows[2] + rows[3]) + Vec::loadu(sum + c)).store(sum + c);
    }
    float tail[kRows] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (; c < dh; ++c) {
      for (int64_t i = 0; i < kRows; ++i) tail[i] += q[c] * r[i * dh + c];
      if constexpr (kSum) sum[c] += (r[c] + r[dh + c]) + (r[2 * dh + c] + r[3 * dh + c]);
    }
    for (int64_t i = 0; i < kRows; ++i) scores[j + i] = scale * (hsum(acc[i]) + tail[i]);
  }
  for (; j < n; ++j) {  // the last rows, one at a time
    const float* r = x + j * dh;
    Vec acc(0.0f);
    int64_t c = 0;
    for (; c < full; c += kW) {
      const Vec rc = Vec::loadu(r + c);
      acc = at::vec::fmadd(Vec::loadu(q + c), rc, acc);
      if constexpr (kSum) (Vec::loadu(sum + c) + rc).store(sum + c);
    }
    float tail = 0.0f;
    for (; c < dh; ++c) {
      tail += q[c] * r[c];
      if constexpr (kSum) sum[c] += r[c];
    }
    scores[j] = scale * (hsum(acc) + tail);
  }
}

void dot_rows(const float* q, const float* x, int64_t n, int64_t dh, float scale, float* scores, float* sum) {
  if (sum != nullptr)
    dot_rows_impl<true>(q, x, n, dh, scale, scores, sum);
  else
    dot_rows_impl<false>(q, x, n, dh, scale, scores, sum);
}

// acc[0:V kW] += sum_{j in [j0, j1)} w[j] x_j[0:V kW], the V vectors in registers.
template <int V>
C10_ALWAYS_INLINE void weighted_chunk(const float* w, const float* x, int64_t j0, int64_t j1, int64_t dh, float* acc) {
  Vec a[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) a[v] = Vec::loadu(acc + v * kW);
  for (int64_t j = j0; j < j1; ++j) {
    const Vec wj(w[j]);
    const float* r = x + j * dh;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) a[v] = at::vec::fmadd(wj, Vec::loadu(r + v * kW), a[v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) a[v].store(acc + v * kW);
}

// acc (dh) += sum_j w[j] x_j over the n rows x_j of x (n x dh). Columns in chunks of up to
// kChunk vectors held in registers; rows in blocks of kBlock, so that a block's rows are still in
// L1 for the later chunks of a wide row.
void weighted_rows(const float* w, const float* x, int64_t n, int64_t dh, float* acc) {
  constexpr int kChunk = 8;
  constexpr int64_t kBlock = 8;
  const int64_t full = dh / kW * kW;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    for (int64_t j = j1; j < std::min(n, j1 + kBlock); ++j) prefetch_row(x + j * dh, dh);
    int64_t c0 = 0;
    for (; c0 + kChunk * kW <= full; c0 += kChunk * kW) weighted_chunk<kChunk>(w, x + c0, j0, j1, dh, acc + c0);
    switch ((full - c0) / kW) {  // the whole vectors left
      case 1: weighted_chunk<1>(w, x + c0, j0, j1, dh, acc + c0); break;
      case 2: weighted_chunk<2>(w, x + c0, j0, j1, dh, acc + c0); break;
      case 3: weighted_chunk<3>(w, x + c0, j0, j1, dh, acc + c0); break;
      case 4: weighted_chunk<4>(w, x + c0, j0, j1, dh, acc + c0); break;
      case 5: weighted_chunk<5>(w, x + c0, j0, j1, dh, acc + c0); break;
      case 6: weighted_chunk<6>(w, x + c0, j0, j1, dh, acc + c0); break;
      case 7: weighted_chunk<7>(w, x + c0, j0, j1, dh, acc + c0); break;
      default: break;
    }
    for (int64_t c = full; c < dh; ++c)
      for (int64_t j = j0; j < j1; ++j) acc[c] += w[j] * x[j * dh + c];
  }
}

// dst_j = w[j] x (dst: n rows of dh): the class-only backward's dK and dV rows, written once.
void outer_rows(const float* w, const float* x, int64_t n, int64_t dh, float* dst) {
  const int64_t full = dh / kW * kW;
  for (int64_t j = 0; j < n; ++j) {
    const Vec wj(w[j]);
    float* d = dst + j * dh;
    int64_t c = 0;
    for (; c < full; c += kW) (wj * Vec::loadu(x + c)).store(d + c);
    for (; c < dh; ++c) d[c] = w[j] * x[c];
  }
}

}  // namespace
}  // namespace class_row
}  // namespace CPU_CAPABILITY
}  // namespace rollingq
