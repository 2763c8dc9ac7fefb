// The float row kernels of float_row_ops.h, written once with ATen's
// at::vec::Vectorized<float> and compiled once per instruction set, the way
// ATen builds its own CPU kernels: row_ops_default.cpp, row_ops_avx2.cpp and
// row_ops_avx512.cpp define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and
// CPU_CAPABILITY_<LEVEL>, include this file, and get the level's compiler
// flags from setup.py / CMakeLists.txt. Everything here sits in
// rollingq::CPU_CAPABILITY, an inline namespace (isa_namespace.h) that also
// holds this unit's copy of scalar_math.h, and ATen's vectors in
// at::vec::CPU_CAPABILITY, so the copies never collide. Include nothing else
// with ISA flags: an inline function of a shared header outside those
// namespaces could be the copy the linker keeps for the baseline code
// (tests/test_cpp_kernels.py checks the objects and the binary for this).
//
// Tails (n not a multiple of the vector width) use partial loads and stores of
// the same vector code, so every element goes through the same arithmetic.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and CPU_CAPABILITY_<LEVEL> before including row_ops_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>

#include "../float_row_ops.h"
#include "../scalar_math.h"
#include "class_row_impl.h"
#include "gemm_impl.h"
#if defined(CPU_CAPABILITY_AVX512)
#include "bf16_gemm_impl.h"
#endif

namespace rollingq {
namespace CPU_CAPABILITY {  // the inline namespace of isa_namespace.h: scalar_math.h's code is here too

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Lanes [0, count) of a uint32 mask array as a float lane mask (all ones / zero bits);
// lanes from count on are 0 (masked out).
inline Vec load_mask(const uint32_t* mask, int64_t count) { return Vec::loadu(mask, count); }

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}
inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::clamp_min(a, b); }, v);
}

// 2**f for f in [-0.5, 0.5]: a degree-6 polynomial fitted for relative error (< 1e-7 in float,
// below the rounding of the argument).
C10_ALWAYS_INLINE Vec exp2_reduced(const Vec& f) {
  Vec p(1.53455970576033e-4f);
  p = at::vec::fmadd(p, f, Vec(1.3399929739534855e-3f));
  p = at::vec::fmadd(p, f, Vec(9.618490003049374e-3f));
  p = at::vec::fmadd(p, f, Vec(5.550328642129898e-2f));
  p = at::vec::fmadd(p, f, Vec(2.4022646248340607e-1f));
  p = at::vec::fmadd(p, f, Vec(6.931471824645996e-1f));
  return at::vec::fmadd(p, f, Vec(1.0f));
}

// exp(x - shift) = 2**t, t = (x - shift) log2(e): t = n + f with n = round(t), 2**f by the
// polynomial, 2**n from the exponent bits (AVX-512: vscalefps). 0 for x - shift below about -88
// (-inf included), inf above about 88, NaN for NaN. The softmax rows and the backward's P call it
// with shift = the row max or the log-sum-exp, so t <= 0 there.
C10_ALWAYS_INLINE Vec exp_shifted(const Vec& x, const Vec& shift) {
  const Vec t = (x - shift) * Vec(1.44269504088896341f);
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 tc = _mm512_max_ps(_mm512_set1_ps(-160.0f), t);  // NaN stays NaN (second operand)
  const __m512 n = _mm512_roundscale_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return Vec(_mm512_scalef_ps(exp2_reduced(Vec(tc) - Vec(n)), n));
#else
  const Vec tc = at::vec::clamp(t, Vec(-127.0f), Vec(128.0f));  // NaN stays NaN
  // r = 1.5 * 2**23 + round(tc): a float of ulp 1, whose low bits hold the integer n
  const Vec magic(12582912.0f);
  const Vec r = tc + magic;
  const Vec y = exp2_reduced(tc - (r - magic));
  // 2**n from the bits of r: bits(r) = 0x4B400000 + n, so bits(2**n) = (bits(r) - 0x4B400000 + 127) << 23
  // (n = -127 gives 0.0, n = 128 gives inf)
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec e = (at::vec::cast<int32_t>(r) - IVec(0x4B400000 - 127)) << IVec(23);
  return y * at::vec::cast<float>(e);
#endif
}

// Dropout factors of lanes [0, count): inv_keep where the hash keeps the score, else 0
// (docs/op.md). Plain uint32 arithmetic the compiler vectorizes (wrapping is defined).
inline Vec keep_factor(uint32_t row_key, const uint32_t* col_hash, int64_t count, uint32_t threshold,
                       const Vec& inv_keep) {
  alignas(64) uint32_t hash[kW] = {};
  alignas(64) uint32_t bits[kW];
  for (int64_t i = 0; i < count; ++i) hash[i] = col_hash[i];
  for (int64_t i = 0; i < kW; ++i) bits[i] = dropout_keep(row_key, hash[i], threshold) ? 0xFFFFFFFFu : 0u;
  return Vec::blendv(Vec(0.0f), inv_keep, Vec::loadu(bits));
}

inline Vec keep_factor(uint32_t row_key, const uint32_t* col_hash, uint32_t threshold, const Vec& inv_keep) {
  alignas(64) uint32_t bits[kW];
  for (int64_t i = 0; i < kW; ++i) bits[i] = dropout_keep(row_key, col_hash[i], threshold) ? 0xFFFFFFFFu : 0u;
  return Vec::blendv(Vec(0.0f), inv_keep, Vec::loadu(bits));
}

// With NaN in a kept score the max is unspecified (clamp_min keeps one operand, which one
// depends on the level and the lane), as float_row_ops.h says; the NaN score still reaches
// the output through exp_sum, where NaN stays NaN.
float masked_max(float* s, const uint32_t* mask, int64_t n) {
  const Vec neg_inf(-std::numeric_limits<float>::infinity());
  Vec m0 = neg_inf, m1 = neg_inf;
  int64_t j = 0;
  if (mask == nullptr) {
    for (; j + 2 * kW <= n; j += 2 * kW) {
      m0 = at::vec::clamp_min(Vec::loadu(s + j), m0);
      m1 = at::vec::clamp_min(Vec::loadu(s + j + kW), m1);
    }
    for (; j < n; j += kW) {
      const int64_t c = std::min(kW, n - j);
      m0 = at::vec::clamp_min(Vec::set(neg_inf, Vec::loadu(s + j, c), c), m0);
    }
  } else {
    for (; j < n; j += kW) {
      const int64_t c = std::min(kW, n - j);
      const Vec x = Vec::blendv(neg_inf, Vec::loadu(s + j, c), load_mask(mask + j, c));
      x.store(s + j, c);
      m0 = at::vec::clamp_min(x, m0);
    }
  }
  return hmax(at::vec::clamp_min(m0, m1));
}

float exp_sum(float* s, int64_t n, float shift) {
  const Vec sh(shift);
  Vec acc0(0.0f), acc1(0.0f);
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    const Vec e0 = exp_shifted(Vec::loadu(s + j), sh);
    const Vec e1 = exp_shifted(Vec::loadu(s + j + kW), sh);
    e0.store(s + j);
    e1.store(s + j + kW);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  for (; j < n; j += kW) {
    const int64_t c = std::min(kW, n - j);
    const Vec e = exp_shifted(Vec::loadu(s + j, c), sh);
    e.store(s + j, c);
    acc0 = acc0 + Vec::set(Vec(0.0f), e, c);
  }
  return hsum(acc0 + acc1);
}

void dropout(float* s, int64_t n, uint32_t row_key, const uint32_t* col_hash, uint32_t threshold, float inv_keep) {
  const Vec inv(inv_keep);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) (Vec::loadu(s + j) * keep_factor(row_key, col_hash + j, threshold, inv)).store(s + j);
  if (j < n) {
    const int64_t c = n - j;
    (Vec::loadu(s + j, c) * keep_factor(row_key, col_hash + j, c, threshold, inv)).store(s + j, c);
  }
}

template <bool kMasked, bool kDropout>
void backward_row_impl(float* s, float* dp, const uint32_t* mask, int64_t n, float lse, float delta,
                       const uint32_t* col_hash, uint32_t row_key, uint32_t threshold, float inv_keep) {
  const Vec vlse(lse), vdelta(delta), inv(inv_keep), zero(0.0f);
  for (int64_t j = 0; j < n; j += kW) {
    const int64_t c = std::min(kW, n - j);
    const Vec p = exp_shifted(Vec::loadu(s + j, c), vlse);
    const Vec d = Vec::loadu(dp + j, c);
    Vec pd, ds;
    if constexpr (kDropout) {
      const Vec z = c == kW ? keep_factor(row_key, col_hash + j, threshold, inv)
                            : keep_factor(row_key, col_hash + j, c, threshold, inv);
      pd = p * z;
      ds = p * (d * z - vdelta);
    } else {
      pd = p;
      ds = p * (d - vdelta);
    }
    if constexpr (kMasked) {  // a select, so NaN or inf in a padded column never survives
      const Vec m = load_mask(mask + j, c);
      pd = Vec::blendv(zero, pd, m);
      ds = Vec::blendv(zero, ds, m);
    }
    pd.store(s + j, c);
    ds.store(dp + j, c);
  }
}

void backward_row(float* s, float* dp, const uint32_t* mask, int64_t n, float lse, float delta,
                  const uint32_t* col_hash, uint32_t row_key, uint32_t threshold, float inv_keep) {
  if (mask != nullptr) {
    if (col_hash != nullptr)
      backward_row_impl<true, true>(s, dp, mask, n, lse, delta, col_hash, row_key, threshold, inv_keep);
    else
      backward_row_impl<true, false>(s, dp, mask, n, lse, delta, col_hash, row_key, threshold, inv_keep);
  } else {
    if (col_hash != nullptr)
      backward_row_impl<false, true>(s, dp, mask, n, lse, delta, col_hash, row_key, threshold, inv_keep);
    else
      backward_row_impl<false, false>(s, dp, mask, n, lse, delta, col_hash, row_key, threshold, inv_keep);
  }
}

float dot(const float* a, const float* b, int64_t n) {
  Vec acc0(0.0f), acc1(0.0f), acc2(0.0f), acc3(0.0f);  // four chains hide the FMA latency
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + kW), Vec::loadu(b + i + kW), acc1);
    acc2 = at::vec::fmadd(Vec::loadu(a + i + 2 * kW), Vec::loadu(b + i + 2 * kW), acc2);
    acc3 = at::vec::fmadd(Vec::loadu(a + i + 3 * kW), Vec::loadu(b + i + 3 * kW), acc3);
  }
  for (; i < n; i += kW) {
    const int64_t c = std::min(kW, n - i);
    acc0 = at::vec::fmadd(Vec::loadu(a + i, c), Vec::loadu(b + i, c), acc0);
  }
  return hsum((acc0 + acc1) + (acc2 + acc3));
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  const Vec va(alpha);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t c = std::min(kW, n - i);
    at::vec::fmadd(va, Vec::loadu(x + i, c), Vec::loadu(y + i, c)).store(y + i, c);
  }
}

void scale(float* x, float alpha, int64_t n) {
  const Vec va(alpha);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t c = std::min(kW, n - i);
    (Vec::loadu(x + i, c) * va).store(x + i, c);
  }
}

}  // namespace

const FloatRowOps& float_row_ops() {
  static const FloatRowOps ops = [] {
    FloatRowOps t{C10_STRINGIZE(CPU_CAPABILITY), masked_max, exp_sum, dropout, backward_row, dot, axpy,
                  scale, gemm::kPanel, gemm::pack_rows, gemm::gemm_nt, gemm::gemm_nn, gemm::gemm_tn,
                  class_row::dot_rows, class_row::weighted_rows, class_row::outer_rows,
                  nullptr, nullptr, nullptr, nullptr};
#if defined(CPU_CAPABILITY_AVX512)
    if (__builtin_cpu_supports("avx512bf16")) {  // the bfloat16 dot products run here
      t.pack_rows_bf16 = bf16::pack_rows_bf16;
      t.gemm_nt_bf16 = bf16::gemm_nt_bf16;
      t.pack_pairs_bf16 = bf16::pack_pairs_bf16;
      t.gemm_pv_bf16 = bf16::gemm_pv_bf16;
    }
#endif
    return t;
  }();
  return ops;
}

}  // namespace CPU_CAPABILITY
}  // namespace rollingq
