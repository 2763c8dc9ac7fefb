// bfloat16 tile GEMMs with float32 accumulation (vdpbf16ps: the dot product of two bfloat16 pairs
// added to a float32 lane), for CPUs with AVX512_BF16 (float_row_ops.h: pack_rows_bf16,
// gemm_nt_bf16, pack_pairs_bf16, gemm_pv_bf16). Only the AVX512 unit includes this file; its
// functions are compiled for avx512bf16 by a target attribute and the table holds them only where
// the CPU runs that instruction (see row_ops_impl.h), so the AVX512 level itself still runs on
// AVX-512 CPUs without it. bfloat16 values travel as their uint16 bits.
//
// Layouts: a reduction index pair (2t, 2t + 1) of bfloat16 fills one 32-bit lane.
//   pack_rows_bf16:  B (n x k) -> panels of kPanel rows: bp[(p k2 + t) kPanel + r] = the pair of B[p kPanel + r,
//                    2t : 2t + 2] (k2 = ceil(k / 2) pairs, zeros past n and k), as pack_rows for float.
//   pack_pairs_bf16: V (k x n) -> vp[t n + c] = the pair (V[2t, c], V[2t + 1, c]) (a zero row past k).
#pragma once

#if !defined(CPU_CAPABILITY_AVX512)
#error "bf16_gemm_impl.h is for the AVX512 unit only"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "gemm_impl.h"

#define ROLLINGQ_BF16_TARGET __attribute__((target("avx512bf16")))

namespace rollingq {
namespace CPU_CAPABILITY {
namespace bf16 {
namespace {

using gemm::kNtRows;
using gemm::kNtVecs;
using gemm::kPanel;
using gemm::for_row_blocks;
using gemm::with_count;
constexpr int64_t kLanes = 16;  // float32 lanes of a zmm

inline uint32_t pair(const uint16_t* x, int64_t i, int64_t k) {  // (x[i], x[i + 1]), 0 past k
  return static_cast<uint32_t>(x[i]) | (i + 1 < k ? static_cast<uint32_t>(x[i + 1]) << 16 : 0u);
}

void pack_rows_bf16(const uint16_t* b, int64_t n, int64_t k, int64_t ldb, uint16_t* bp) {
  const int64_t k2 = (k + 1) / 2;
  auto* out = reinterpret_cast<uint32_t*>(bp);
  for (int64_t p0 = 0; p0 < n; p0 += kPanel) {
    uint32_t* panel = out + p0 * k2;
    const int64_t rows = std::min<int64_t>(kPanel, n - p0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < k2; ++t) panel[t * kPanel + r] = pair(b + (p0 + r) * ldb, 2 * t, k);
    if (rows < kPanel)
      for (int64_t t = 0; t < k2; ++t) std::fill(panel + t * kPanel + rows, panel + (t + 1) * kPanel, 0u);
  }
}

void pack_pairs_bf16(const uint16_t* v, int64_t k, int64_t n, uint16_t* vp) {
  auto* out = reinterpret_cast<uint32_t*>(vp);
  for (int64_t t = 0; t < (k + 1) / 2; ++t)
    for (int64_t c = 0; c < n; ++c) {
      const uint32_t lo = v[2 * t * n + c], hi = 2 * t + 1 < k ? v[(2 * t + 1) * n + c] : 0u;
      out[t * n + c] = lo | hi << 16;
    }
}

// One reduction pair t of an MR x kNtVecs block. kLast: the pair of the last element of an odd k, built
// with a zero partner (never reading the element past the row); else read from memory as one int32.
template <int MR, bool kLast>
ROLLINGQ_BF16_TARGET inline void nt_step(__m512 (&acc)[MR][kNtVecs], const uint32_t* bp, int64_t t,
                                         const uint16_t* a, int64_t lda, int64_t k) {
  __m512bh b[kNtVecs];
  #pragma GCC unroll 16
  for (int v = 0; v < kNtVecs; ++v) b[v] = (__m512bh)_mm512_loadu_si512(bp + t * kPanel + v * kLanes);
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    int32_t x;
    if constexpr (kLast)
      x = static_cast<int32_t>(pair(a + r * lda, 2 * t, k));
    else
      std::memcpy(&x, a + r * lda + 2 * t, sizeof(x));
    const __m512bh ar = (__m512bh)_mm512_set1_epi32(x);
    #pragma GCC unroll 16
    for (int v = 0; v < kNtVecs; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, b[v]);
  }
}

template <int MR>
ROLLINGQ_BF16_TARGET void nt_tile(int64_t k, const uint16_t* a, int64_t lda, const uint32_t* bp, float alpha,
                                  float* c, int64_t ldc, int64_t cols, __m512* rmax) {
  __m512 acc[MR][kNtVecs];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < kNtVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t < k / 2; ++t) nt_step<MR, false>(acc, bp, t, a, lda, k);  // whole pairs, broadcast from memory
  if (k % 2) nt_step<MR, true>(acc, bp, t, a, lda, k);  // the last element with a zero partner
  const __m512 va = _mm512_set1_ps(alpha);
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < kNtVecs; ++v) {
      const __m512 x = _mm512_mul_ps(acc[r][v], va);
      _mm512_storeu_ps(c + r * ldc + v * kLanes, x);
      const int64_t valid = std::min<int64_t>(kLanes, cols - v * kLanes);
      if (valid > 0) rmax[r] = _mm512_mask_max_ps(rmax[r], static_cast<__mmask16>((1u << valid) - 1u), rmax[r], x);
    }
}

template <int MR>
ROLLINGQ_BF16_TARGET void nt_rows(int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                                  const uint16_t* bp, float* c, int64_t ldc, float* row_max) {
  const int64_t k2 = (k + 1) / 2;
  __m512 rmax[MR];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) rmax[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 < n; j0 += kPanel)
    nt_tile<MR>(k, a, lda, reinterpret_cast<const uint32_t*>(bp) + j0 * k2, alpha, c + j0, ldc, n - j0, rmax);
  if (row_max != nullptr)
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) row_max[r] = std::max(row_max[r], _mm512_reduce_max_ps(rmax[r]));
}

// C (m x n, ldc >= round_up(n, kPanel)) = alpha A (m x k bfloat16, lda) B^T, B packed by pack_rows_bf16;
// row_max as gemm::gemm_nt.
ROLLINGQ_BF16_TARGET void gemm_nt_bf16(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                                       const uint16_t* bp, float* c, int64_t ldc, float* row_max) {
  for_row_blocks<kNtRows>(m, [&](auto rows, int64_t i) {
    float* rm = row_max ? row_max + i : nullptr;
    nt_rows<decltype(rows)::value>(n, k, alpha, a + i * lda, lda, bp, c + i * ldc, ldc, rm);
  });
}

// C[0:MR, 0:NV 16 columns] = C * s + sum over the pairs of round(P) V; `last` masks the columns of
// the last vector (the others are whole).
template <int MR, int NV>
ROLLINGQ_BF16_TARGET void pv_tile(int64_t k2, const uint32_t* p, int64_t ldp, const uint32_t* vp, int64_t n,
                                  float* c, int64_t ldc, const float* c_scale, __mmask16 last) {
  __m512 acc[MR][NV];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < k2; ++t) {
    __m512bh b[NV];
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      b[v] = (__m512bh)_mm512_maskz_loadu_epi32(v == NV - 1 ? last : 0xFFFF, vp + t * n + v * kLanes);
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * ldp + t]));
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pr, b[v]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512 s = _mm512_set1_ps(c_scale ? c_scale[r] : 1.0f);
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? last : 0xFFFF;
      float* cp = c + r * ldc + v * kLanes;
      _mm512_mask_storeu_ps(cp, mask, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, cp), s, acc[r][v]));
    }
  }
}

template <int MR>
ROLLINGQ_BF16_TARGET void pv_rows(int64_t k2, const uint32_t* p, int64_t ldp, const uint32_t* vp, int64_t n,
                                  float* c, int64_t ldc, const float* c_scale) {
  for (int64_t c0 = 0; c0 < n; c0 += kNtVecs * kLanes) {
    const int64_t cols = std::min<int64_t>(kNtVecs * kLanes, n - c0);
    const int64_t vecs = (cols + kLanes - 1) / kLanes, tail = cols - (vecs - 1) * kLanes;
    const auto last = static_cast<__mmask16>(tail == kLanes ? 0xFFFF : (1u << tail) - 1u);
    with_count<kNtVecs>(vecs, [&](auto nv) {
      pv_tile<MR, decltype(nv)::value>(k2, p, ldp, vp + c0, n, c + c0, ldc, c_scale, last);
    });
  }
}

// C (m x n) = C * c_scale[i] + round_bf16(P) (m x k, float32, ldp) V (V packed by pack_pairs_bf16);
// pbuf: m * ceil(k / 2) pairs of scratch for P rounded to bfloat16 (to nearest even).
ROLLINGQ_BF16_TARGET void gemm_pv_bf16(int64_t m, int64_t n, int64_t k, const float* p, int64_t ldp,
                                       const uint16_t* vp, float* c, int64_t ldc, const float* c_scale,
                                       uint16_t* pbuf) {
  const int64_t k2 = (k + 1) / 2;
  auto* pp = reinterpret_cast<uint32_t*>(pbuf);
  for (int64_t i = 0; i < m; ++i) {  // round P: 32 floats -> 32 bfloat16 (16 pairs) per step
    const float* row = p + i * ldp;
    for (int64_t j = 0; j < 2 * k2; j += 32) {
      const int64_t left = k - j;
      const auto lo = static_cast<__mmask16>(left >= 16 ? 0xFFFF : left > 0 ? (1u << left) - 1u : 0u);
      const auto hi = static_cast<__mmask16>(left >= 32 ? 0xFFFF : left > 16 ? (1u << (left - 16)) - 1u : 0u);
      const __m512bh x =
          _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, row + j + 16), _mm512_maskz_loadu_ps(lo, row + j));
      const int64_t pairs = std::min<int64_t>(16, k2 - j / 2);
      const auto keep = static_cast<__mmask16>(pairs == 16 ? 0xFFFF : (1u << pairs) - 1u);
      _mm512_mask_storeu_epi32(pp + i * k2 + j / 2, keep, (__m512i)x);
    }
  }
  const auto* v = reinterpret_cast<const uint32_t*>(vp);
  for_row_blocks<kNtRows>(m, [&](auto rows, int64_t i) {
    pv_rows<decltype(rows)::value>(k2, pp + i * k2, k2, v, n, c + i * ldc, ldc, c_scale ? c_scale + i : nullptr);
  });
}

}  // namespace
}  // namespace bf16
}  // namespace CPU_CAPABILITY
}  // namespace rollingq
