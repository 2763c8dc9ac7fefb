// The table of float row kernels that csrc/cpu/row_ops_impl.h builds once per
// instruction set (see row_ops.h for how the kernels use it). Plain C++ only:
// the per-level translation units include this file with their ISA flags.
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
  // Returns a . b and adds b into sum (sum += b): the class row's score and its
  // modality's key sum from one read of the key row.
  float (*dot_and_add)(const float* a, const float* b, float* sum, int64_t n);
  void (*axpy)(float alpha, const float* x, float* y, int64_t n);  // y += alpha * x
  void (*scale)(float* x, float alpha, int64_t n);                 // x *= alpha
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
