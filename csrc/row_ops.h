// Element-wise work on rows of a score tile, the part of attention that is not
// a GEMM: masking, max, exp and sum, the dropout hash, the backward's dS, and
// the small vector kernels of the class-only path.
//
// float (the compute dtype of float32, bfloat16 and float16 inputs) runs
// through a table of functions compiled once per instruction set from
// csrc/cpu/row_ops_impl.h with ATen's at::vec::Vectorized<float>
// (DEFAULT: plain C++, also NEON on aarch64; AVX2; AVX512) and chosen at run
// time (cpu_capability.h). double runs the scalar loops below. Every level
// computes the same dropout mask (integer hash); float results may differ
// between levels in the last bits (lane count, FMA), never between runs or
// thread counts at one level.
//
// Masks are uint32 per key: all ones for a valid key, 0 for a padded one
// (nullptr: every key valid). A masked-out element is replaced, never used in
// arithmetic, so NaN or inf in padded keys and values cannot leak into valid
// results.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "float_row_ops.h"
#include "kernel_utils.h"

namespace rollingq {

// Row operations in the compute dtype acc_t: the dispatched table for float,
// scalar loops for double. Same signatures as FloatRowOps.
template <typename acc_t>
struct RowOps;

template <>
struct RowOps<float> {
  const FloatRowOps& t = float_row_ops();  // read once per kernel call

  float masked_max(float* s, const uint32_t* mask, int64_t n) const { return t.masked_max(s, mask, n); }
  float exp_sum(float* s, int64_t n, float shift) const { return t.exp_sum(s, n, shift); }
  void dropout(float* s, int64_t n, uint32_t row_key, const uint32_t* col_hash, uint32_t threshold,
               float inv_keep) const {
    t.dropout(s, n, row_key, col_hash, threshold, inv_keep);
  }
  void backward_row(float* s, float* dp, const uint32_t* mask, int64_t n, float lse, float delta,
                    const uint32_t* col_hash, uint32_t row_key, uint32_t threshold, float inv_keep) const {
    t.backward_row(s, dp, mask, n, lse, delta, col_hash, row_key, threshold, inv_keep);
  }
  float dot(const float* a, const float* b, int64_t n) const { return t.dot(a, b, n); }
  void axpy(float alpha, const float* x, float* y, int64_t n) const { t.axpy(alpha, x, y, n); }
  void scale(float* x, float alpha, int64_t n) const { t.scale(x, alpha, n); }
  void dot_rows(const float* q, const float* x, int64_t n, int64_t dh, float scale, float* scores, float* sum) const {
    t.dot_rows(q, x, n, dh, scale, scores, sum);
  }
  void weighted_rows(const float* w, const float* x, int64_t n, int64_t dh, float* acc) const {
    t.weighted_rows(w, x, n, dh, acc);
  }
};

template <>
struct RowOps<double> {
  static double masked_max(double* s, const uint32_t* mask, int64_t n) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      if (mask != nullptr && mask[j] == 0) s[j] = -std::numeric_limits<double>::infinity();
      m = std::max(m, s[j]);
    }
    return m;
  }
  static double exp_sum(double* s, int64_t n, double shift) {
    double sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - shift);
      sum += s[j];
    }
    return sum;
  }
  static void dropout(double* s, int64_t n, uint32_t row_key, const uint32_t* col_hash, uint32_t threshold,
                      double inv_keep) {
    for (int64_t j = 0; j < n; ++j) s[j] = (mix32(row_key ^ col_hash[j]) >> 8) >= threshold ? s[j] * inv_keep : 0;
  }
  static void backward_row(double* s, double* dp, const uint32_t* mask, int64_t n, double lse, double delta,
                           const uint32_t* col_hash, uint32_t row_key, uint32_t threshold, double inv_keep) {
    for (int64_t j = 0; j < n; ++j) {
      if (mask != nullptr && mask[j] == 0) {
        s[j] = dp[j] = 0;
        continue;
      }
      const double pj = std::exp(s[j] - lse);
      const double z =
          col_hash == nullptr ? 1.0 : ((mix32(row_key ^ col_hash[j]) >> 8) >= threshold ? inv_keep : 0.0);
      s[j] = pj * z;
      dp[j] = pj * (dp[j] * z - delta);
    }
  }
  static double dot(const double* a, const double* b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
  static double dot_and_add(const double* a, const double* b, double* sum, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) {
      s += a[i] * b[i];
      sum[i] += b[i];
    }
    return s;
  }
  static void axpy(double alpha, const double* x, double* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
  }
  static void scale(double* x, double alpha, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
  }
  static void dot_rows(const double* q, const double* x, int64_t n, int64_t dh, double scale, double* scores,
                       double* sum) {
    for (int64_t j = 0; j < n; ++j)
      scores[j] = scale * (sum ? dot_and_add(q, x + j * dh, sum, dh) : dot(q, x + j * dh, dh));
  }
  static void weighted_rows(const double* w, const double* x, int64_t n, int64_t dh, double* acc) {
    for (int64_t j = 0; j < n; ++j) axpy(w[j], x + j * dh, acc, dh);
  }
};

}  // namespace rollingq
