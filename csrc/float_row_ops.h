// The table of float kernels that csrc/cpu/ builds once per instruction set: the
// row operations of row_ops_impl.h (see row_ops.h for how the kernels use them)
// and the tile GEMMs of gemm_impl.h (see tile_gemm.h). Plain C++ only: the
// per-level translation units include this file with their ISA flags.
#pragma once

#include <cstdint>

#include "isa_namespace.h"  // first: in an ISA unit rollingq::<its level> is an inline namespace

namespace rollingq {

struct FloatRowOps {
  // The level this table was compiled for, from its unit's CPU_CAPABILITY: "DEFAULT", "AVX2" or
  // "AVX512" (tests check it against cpu_capability(), so a level switch provably switches code).
  const char* level;
  // s[j] = -inf where mask[j] == 0; returns max_j s[j]. With NaN in a kept s[j] the returned max
  // is unspecified (NaN or the max of the others; it may differ between levels), but the NaN
  // still reaches the output through exp_sum, where exp(NaN - shift) is NaN.
  float (*masked_max)(float* s, const uint32_t* mask, int64_t n);
  // s[j] = exp(s[j] - shift); returns sum_j s[j].
  float (*exp_sum)(float* s, int64_t n, float shift);
  // s[j] *= keep(row_key, col j) ? inv_keep : 0 (docs/op.md hash).
  void (*dropout)(float* s, int64_t n, uint32_t row_key, const uint32_t* col_hash, uint32_t threshold,
                  float inv_keep);
  // Backward of one row: in, s = scaled scores and dp = dO v^T; out, s = P_d (dropped-out
  // probabilities) and dp = dS = P * (Z * dp - delta), with P = exp(s - lse) on valid keys,
  // Z = keep / (1 - p) (col_hash != nullptr) or 1; both exactly 0 on padded keys.
  void (*backward_row)(float* s, float* dp, const uint32_t* mask, int64_t n, float lse, float delta,
                       const uint32_t* col_hash, uint32_t row_key, uint32_t threshold, float inv_keep);
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*axpy)(float alpha, const float* x, float* y, int64_t n);  // y += alpha * x
  void (*scale)(float* x, float alpha, int64_t n);                 // x *= alpha

  // Tile GEMMs (gemm_impl.h), row-major float32, fixed summation order per level.
  // gemm_nt reads B from panels of `panel` rows written by pack_rows: B (n x k, ldb) takes
  // round_up(n, panel) * k floats there.
  int64_t panel;
  void (*pack_rows)(const float* b, int64_t n, int64_t k, int64_t ldb, float* bp);
  // C (m x n, ldc >= round_up(n, panel)) = alpha A (m x k, lda) B^T, also writing the columns up to
  // round_up(n, panel); row_max (optional): row_max[i] = max(row_max[i], max_{j < n} C[i, j]).
  void (*gemm_nt)(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* bp,
                  float* c, int64_t ldc, float* row_max);
  // C (m x n) = C * c_scale[i] + factor A (m x k) B (k x n) (c_scale nullptr: 1); accumulate false:
  // C = factor A B (C is not read).
  void (*gemm_nn)(int64_t m, int64_t n, int64_t k, float factor, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float* c, int64_t ldc, const float* c_scale, bool accumulate);
  // C (m x n) += factor A^T B, A (k x m, lda), B (k x n, ldb).
  void (*gemm_tn)(int64_t m, int64_t n, int64_t k, float factor, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float* c, int64_t ldc);

  // Streaming kernels of the class-only calls (class_row_impl.h), over n rows x_j of x (n x dh):
  // scores[j] = scale * (q . x_j), and sum (optional, dh) += sum_j x_j;
  void (*dot_rows)(const float* q, const float* x, int64_t n, int64_t dh, float scale, float* scores, float* sum);
  // acc (dh) += sum_j w[j] x_j.
  void (*weighted_rows)(const float* w, const float* x, int64_t n, int64_t dh, float* acc);
  // dst (n x dh) row j = w[j] x (x: dh).
  void (*outer_rows)(const float* w, const float* x, int64_t n, int64_t dh, float* dst);

  // bfloat16 operands (as uint16 bits), float32 accumulation (cpu/bf16_gemm_impl.h): set only at the
  // AVX512 level on CPUs with AVX512_BF16, nullptr elsewhere (the kernels then upcast bfloat16 to float32).
  // pack_rows_bf16: B (n x k, ldb) into panels of `panel` rows and reduction pairs, round_up(n, panel) *
  // round_up(k, 2) values; gemm_nt_bf16: as gemm_nt with A (m x k, lda) and B in bfloat16.
  void (*pack_rows_bf16)(const uint16_t* b, int64_t n, int64_t k, int64_t ldb, uint16_t* bp);
  void (*gemm_nt_bf16)(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                       const uint16_t* bp, float* c, int64_t ldc, float* row_max);
  // pack_pairs_bf16: V (k x n, contiguous) as pairs of rows, round_up(k, 2) * n values; gemm_pv_bf16:
  // C (m x n) = C * c_scale[i] + round_bf16(P) V with P (m x k) float32, pbuf m * round_up(k, 2) values.
  void (*pack_pairs_bf16)(const uint16_t* v, int64_t k, int64_t n, uint16_t* vp);
  void (*gemm_pv_bf16)(int64_t m, int64_t n, int64_t k, const float* p, int64_t ldp, const uint16_t* vp, float* c,
                       int64_t ldc, const float* c_scale, uint16_t* pbuf);
};

// The table of each level (csrc/cpu/row_ops_<level>.cpp); AVX2 and AVX512 exist on x86-64 only.
namespace DEFAULT {
const FloatRowOps& float_row_ops();
}
namespace AVX2 {
const FloatRowOps& float_row_ops();
}
namespace AVX512 {
const FloatRowOps& float_row_ops();
}

// The table of the level in use (cpu_capability.h), in cpu_capability.cpp.
const FloatRowOps& float_row_ops();

}  // namespace rollingq
