// Arithmetic of the scalar code, shared with the per-level vector code
// (csrc/cpu/row_ops_impl.h): the Cephes exp polynomial (the scalar exp; the
// vector rows use their own exp2 polynomial, cpu/row_ops_impl.h) and the dropout
// hash of docs/op.md. Plain C++ with no includes beyond <cstdint>, so the
// per-instruction-set translation units can include it; everything here is in
// the per-unit inline namespace of isa_namespace.h, so a unit compiled with
// AVX flags never shares a copy with the baseline.
#pragma once

#include <cstdint>

#include "isa_namespace.h"

namespace rollingq {
inline namespace ROLLINGQ_ISA_NS {

// a * b + c (a point of specialization; the scalar exp below uses the plain form).
template <typename T>
struct MulAdd {
  static T apply(const T& a, const T& b, const T& c) { return a * b + c; }
};

// The Cephes expf kernel: exp(xc) / 2**n for xc clamped to [-87, 88] and
// n = round(xc / ln 2), i.e. exp of the reduced argument r = xc - n ln 2 by a
// degree-5 polynomial. T is float (exp_float below).
template <typename T>
inline T cephes_exp_reduced(const T& xc, const T& n) {
  const auto madd = MulAdd<T>::apply;
  T r = madd(n, T(-0.693359375f), xc);
  r = madd(n, T(2.12194440e-4f), r);
  T p = T(1.9875691500e-4f);
  p = madd(p, r, T(1.3981999507e-3f));
  p = madd(p, r, T(8.3334519073e-3f));
  p = madd(p, r, T(4.1665795894e-2f));
  p = madd(p, r, T(1.6666665459e-1f));
  p = madd(p, r, T(5.0000001201e-1f));
  return madd(p * r, r, r) + T(1.0f);
}

// exp(x) for float with the polynomial above (the softmax's running-max rescale
// factors, forward.cpp via exp_vec): relative error ~2e-7, exactly 0 below -87
// (-inf included), NaN for NaN; the rounding by the 1.5 * 2**23 trick, 2**n
// from the bits of that float.
inline float exp_float(float x) {
  float xc = x < -87.0f ? -87.0f : x;  // NaN stays NaN
  xc = xc > 88.0f ? 88.0f : xc;
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2**23 + round(xc / ln 2)
  const float n = t - 12582912.0f;
  const float y = cephes_exp_reduced(xc, n);
  const uint32_t pow2 = (__builtin_bit_cast(uint32_t, t) - (0x4B400000u - 127u)) << 23;
  return x < -87.0f ? 0.0f : y * __builtin_bit_cast(float, pow2);
}

// The 32-bit finalizer `mix` of docs/op.md (wrapping unsigned arithmetic).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Dropout keeps score (row, col) iff keep_bits(...) is true: x = mix(r ^ c(col)),
// keep = (x >> 8) >= threshold, with r the row key and c(col) the column hash.
inline bool dropout_keep(uint32_t row_key, uint32_t col_hash, uint32_t threshold) {
  return (mix32(row_key ^ col_hash) >> 8) >= threshold;
}

}  // namespace ROLLINGQ_ISA_NS
}  // namespace rollingq
