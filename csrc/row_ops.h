// Element-wise work on one row of a score tile, the part of attention that is
// not a GEMM: masking, max, exp and sum, the dropout hash, and the backward's
// dS. Generic templates (scalar loops, used for float64) plus float overloads
// written with GCC/Clang vector extensions so they vectorize whatever the
// optimizer decides (16 lanes; AVX-512 with -march=native, split otherwise).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "kernel_utils.h"

namespace rollingq {

namespace simd {

constexpr int64_t kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vu load(const uint32_t* p) {
  vu v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// Lane mask (all ones where valid[j] != 0).
inline vi load_mask(const uint8_t* valid) {
  vb v;
  std::memcpy(&v, valid, sizeof(v));
  return __builtin_convertvector(v, vi) != 0;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// exp_vec(float) on 16 lanes (cephes_exp_reduced); 0 below -87.
inline vf exp(vf x) {
  const vf lo = splat(-87.0f), hi = splat(88.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf magic = splat(12582912.0f);  // 1.5 * 2**23: round to nearest
  const vf n = (xc * 1.44269504088896341f + magic) - magic;
  const vf y = cephes_exp_reduced(xc, n);
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  const vf result = y * pow2;
  return x < lo ? splat(0.0f) : result;
}

inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

}  // namespace simd

// s[j] = -inf where the key is invalid.
template <typename acc_t>
inline void mask_invalid(acc_t* s, const uint8_t* valid, int64_t n) {
  for (int64_t j = 0; j < n; ++j) s[j] = valid[j] ? s[j] : -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
inline acc_t row_max(const acc_t* s, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

inline float row_max(const float* s, int64_t n) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
  if (n >= simd::kLanes) {
    simd::vf vm = simd::load(s);
    for (j = simd::kLanes; j + simd::kLanes <= n; j += simd::kLanes) {
      const simd::vf x = simd::load(s + j);
      vm = x > vm ? x : vm;
    }
    m = simd::hmax(vm);
  }
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[j] = exp(s[j] - shift); returns the sum of the new values.
template <typename acc_t>
inline acc_t exp_shift_sum(acc_t* s, int64_t n, acc_t shift) {
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_vec(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

inline float exp_shift_sum(float* s, int64_t n, float shift) {
  simd::vf acc = simd::splat(0.0f);
  const simd::vf sh = simd::splat(shift);
  int64_t j = 0;
  for (; j + simd::kLanes <= n; j += simd::kLanes) {
    const simd::vf e = simd::exp(simd::load(s + j) - sh);
    simd::store(s + j, e);
    acc += e;
  }
  float sum = simd::hsum(acc);
  for (; j < n; ++j) {
    s[j] = exp_vec(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

// Dropout of one row: s[j] *= keep(row_key, col j) ? inv_keep : 0 (docs/op.md hash).
template <typename acc_t>
inline void dropout_row(acc_t* s, uint32_t row_key, const uint32_t* col_hash, int64_t n, uint32_t threshold,
                        acc_t inv_keep) {
  for (int64_t j = 0; j < n; ++j) s[j] = (mix32(row_key ^ col_hash[j]) >> 8) >= threshold ? s[j] * inv_keep : 0;
}

inline void dropout_row(float* s, uint32_t row_key, const uint32_t* col_hash, int64_t n, uint32_t threshold,
                        float inv_keep) {
  int64_t j = 0;
  for (; j + simd::kLanes <= n; j += simd::kLanes) {
    const simd::vu x = mix32(simd::load(col_hash + j) ^ row_key);
    const simd::vf v = simd::load(s + j) * inv_keep;
    simd::store(s + j, (x >> 8) >= threshold ? v : simd::splat(0.0f));
  }
  for (; j < n; ++j) s[j] = (mix32(row_key ^ col_hash[j]) >> 8) >= threshold ? s[j] * inv_keep : 0.0f;
}

// Backward of one row: in, s = scaled scores and dp = dO v^T; out, s = P_d
// (dropped-out probabilities) and dp = dS = P * (Z * dp - delta), with
// P = exp(s - lse) on valid keys and 0 elsewhere, Z = keep / (1 - p) or 1.
template <typename acc_t>
inline void backward_row(acc_t* s, acc_t* dp, const uint8_t* valid, int64_t n, acc_t lse, acc_t delta,
                         const uint32_t* col_hash, uint32_t row_key, uint32_t threshold, acc_t inv_keep) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t pj = valid[j] ? exp_vec(s[j] - lse) : acc_t(0);
    const acc_t z =
        col_hash == nullptr ? acc_t(1) : ((mix32(row_key ^ col_hash[j]) >> 8) >= threshold ? inv_keep : acc_t(0));
    s[j] = pj * z;
    dp[j] = pj * (dp[j] * z - delta);
  }
}

inline void backward_row(float* s, float* dp, const uint8_t* valid, int64_t n, float lse, float delta,
                         const uint32_t* col_hash, uint32_t row_key, uint32_t threshold, float inv_keep) {
  const simd::vf vlse = simd::splat(lse), vdelta = simd::splat(delta), zero = simd::splat(0.0f);
  int64_t j = 0;
  for (; j + simd::kLanes <= n; j += simd::kLanes) {
    const simd::vf e = simd::exp(simd::load(s + j) - vlse);
    const simd::vf pj = simd::load_mask(valid + j) ? e : zero;
    simd::vf z = simd::splat(1.0f);
    if (col_hash != nullptr) {
      const simd::vu x = mix32(simd::load(col_hash + j) ^ row_key);
      z = (x >> 8) >= threshold ? simd::splat(inv_keep) : zero;
    }
    simd::store(s + j, pj * z);
    simd::store(dp + j, pj * (simd::load(dp + j) * z - vdelta));
  }
  for (; j < n; ++j) {
    const float pj = valid[j] ? exp_vec(s[j] - lse) : 0.0f;
    const float z =
        col_hash == nullptr ? 1.0f : ((mix32(row_key ^ col_hash[j]) >> 8) >= threshold ? inv_keep : 0.0f);
    s[j] = pj * z;
    dp[j] = pj * (dp[j] * z - delta);
  }
}

// Vector kernels of the class-only (single query row) path.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline float dot(const float* a, const float* b, int64_t n) {
  simd::vf acc0 = simd::splat(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;  // four chains hide FMA latency
  constexpr int64_t L = simd::kLanes;
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    acc0 += simd::load(a + i) * simd::load(b + i);
    acc1 += simd::load(a + i + L) * simd::load(b + i + L);
    acc2 += simd::load(a + i + 2 * L) * simd::load(b + i + 2 * L);
    acc3 += simd::load(a + i + 3 * L) * simd::load(b + i + 3 * L);
  }
  for (; i + L <= n; i += L) acc0 += simd::load(a + i) * simd::load(b + i);
  float s = simd::hsum((acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Returns a . b and adds b into sum (sum += b): the class row's score and its
// modality's key sum from one read of the key row.
template <typename acc_t>
inline acc_t dot_and_add(const acc_t* a, const acc_t* b, acc_t* sum, int64_t n) {
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) {
    s += a[i] * b[i];
    sum[i] += b[i];
  }
  return s;
}

inline float dot_and_add(const float* a, const float* b, float* sum, int64_t n) {
  simd::vf acc0 = simd::splat(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  constexpr int64_t L = simd::kLanes;
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    const simd::vf b0 = simd::load(b + i), b1 = simd::load(b + i + L);
    const simd::vf b2 = simd::load(b + i + 2 * L), b3 = simd::load(b + i + 3 * L);
    acc0 += simd::load(a + i) * b0;
    acc1 += simd::load(a + i + L) * b1;
    acc2 += simd::load(a + i + 2 * L) * b2;
    acc3 += simd::load(a + i + 3 * L) * b3;
    simd::store(sum + i, simd::load(sum + i) + b0);
    simd::store(sum + i + L, simd::load(sum + i + L) + b1);
    simd::store(sum + i + 2 * L, simd::load(sum + i + 2 * L) + b2);
    simd::store(sum + i + 3 * L, simd::load(sum + i + 3 * L) + b3);
  }
  for (; i + L <= n; i += L) {
    const simd::vf bv = simd::load(b + i);
    acc0 += simd::load(a + i) * bv;
    simd::store(sum + i, simd::load(sum + i) + bv);
  }
  float s = simd::hsum((acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) {
    s += a[i] * b[i];
    sum[i] += b[i];
  }
  return s;
}

// y += alpha * x
template <typename acc_t>
inline void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + simd::kLanes <= n; i += simd::kLanes) simd::store(y + i, simd::load(y + i) + simd::load(x + i) * alpha);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace rollingq
