// The float32 GEMM micro-kernels of the attention tiles (float_row_ops.h: pack_rows, gemm_nt,
// gemm_nn, gemm_tn), written once with ATen's at::vec::Vectorized<float> and compiled once per
// instruction set like row_ops_impl.h (included by the same per-level units, in the same
// rollingq::CPU_CAPABILITY namespace).
//
// Why not BLAS: on the AMD CPUs this project runs on, MKL takes its AVX2 code path whatever the
// CPU offers, and every call pays its dispatch for tiles of a few hundred rows. These kernels keep
// an MR x (NV vectors) block of C in registers, broadcast one element of A per row and load NV
// vectors of B per step of the reduction: 2 FMA per cycle need MR * NV independent accumulators.
// Each element of C is one fixed-order sum over the reduction index (then scaled and added to C
// once), so results depend on the level (lane count) only, never on threads or blocking of the
// caller.
//
// Layouts are row-major. gemm_nt reads B^T from panels (pack_rows): kPanel rows of B side by side
// per reduction index, zero-padded to a whole panel, so the scores of a query row against kPanel
// keys are NV vector FMAs per reduction step.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "define CPU_CAPABILITY before including gemm_impl.h (see row_ops_impl.h)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace rollingq {
namespace CPU_CAPABILITY {
namespace gemm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kW = static_cast<int>(Vec::size());

// Register blocks: MR rows x NV vectors of accumulators, plus NV loads and one broadcast, within
// the level's vector registers (32 zmm with AVX-512, 16 ymm with AVX2).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kNtRows = 6, kNtVecs = 4;  // scores: 6 query rows x 64 keys
constexpr int kNnRows = 6, kNnVecs = 4;  // P V: 6 rows x 64 columns of the head dimension
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kNtRows = 6, kNtVecs = 2;  // 6 x 16
constexpr int kNnRows = 6, kNnVecs = 2;  // 6 x 16
#else
constexpr int kNtRows = 4, kNtVecs = 2;
constexpr int kNnRows = 4, kNnVecs = 2;
#endif
constexpr int kPanel = kNtVecs * kW;

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v);
}

// B (n x k, leading dimension ldb) into panels: panel p holds rows [p kPanel, (p + 1) kPanel) of
// B transposed, bp[p k kPanel + kk kPanel + r] = B[p kPanel + r, kk], zeros past row n.
void pack_rows(const float* b, int64_t n, int64_t k, int64_t ldb, float* bp) {
  for (int64_t p0 = 0; p0 < n; p0 += kPanel) {
    float* panel = bp + p0 * k;
    const int64_t rows = std::min<int64_t>(kPanel, n - p0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = b + (p0 + r) * ldb;
      for (int64_t kk = 0; kk < k; ++kk) panel[kk * kPanel + r] = src[kk];
    }
    if (rows < kPanel)
      for (int64_t kk = 0; kk < k; ++kk) std::fill(panel + kk * kPanel + rows, panel + (kk + 1) * kPanel, 0.0f);
  }
}

// acc = A[0:MR, :] B[:, 0:NV vectors] over the reduction index kk: MR x NV accumulators in registers, one
// broadcast of A per row and NV vector loads of B (row kk at b + kk ldb) per step, each sum in a fixed
// order. kTransA: A is stored transposed (k x m, element (r, kk) at a[kk lda + r]), else row-major.
template <int MR, int NV, bool kTransA>
C10_ALWAYS_INLINE void accumulate_block(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                                        Vec (&acc)[MR][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.0f);
  for (int64_t kk = 0; kk < k; ++kk) {
    Vec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + kk * ldb + v * kW);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec ar(kTransA ? a[kk * lda + r] : a[r * lda + kk]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
    }
  }
}

// C[0:MR, panel] = alpha A[0:MR, :] Bp_panel^T over k; the row maxima of the `cols` valid columns
// go into rmax. The whole panel is stored (past `cols` the packed zeros give 0).
template <int MR>
C10_ALWAYS_INLINE void nt_tile(int64_t k, const float* a, int64_t lda, const float* bp, float alpha, float* c,
                               int64_t ldc, int64_t cols, Vec* rmax) {
  Vec acc[MR][kNtVecs];
  accumulate_block<MR, kNtVecs, false>(k, a, lda, bp, kPanel, acc);  // a panel: kPanel floats per kk
  const Vec va(alpha), neg_inf(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNtVecs; ++v) {
      const Vec x = acc[r][v] * va;
      x.store(c + r * ldc + v * kW);
      const int64_t valid = cols - v * kW;
      if (valid >= kW)
        rmax[r] = at::vec::maximum(rmax[r], x);
      else if (valid > 0)
        rmax[r] = at::vec::maximum(rmax[r], Vec::set(neg_inf, x, valid));
    }
}

// f(std::integral_constant<int, count>{}) for count in [1, R]; nothing for count 0 (or > R).
template <int R, typename F>
C10_ALWAYS_INLINE void with_count(int64_t count, const F& f) {
  if constexpr (R > 0) {
    if (count == R)
      f(std::integral_constant<int, R>{});
    else
      with_count<R - 1>(count, f);
  }
}

// f(rows, i) for the blocks of rows [i, i + rows) of m rows: R rows each, then one block of the m % R
// rows left (rows a std::integral_constant<int, ...>, so that f can instantiate a kernel for it).
template <int R, typename F>
C10_ALWAYS_INLINE void for_row_blocks(int64_t m, const F& f) {
  int64_t i = 0;
  for (; i + R <= m; i += R) f(std::integral_constant<int, R>{}, i);
  with_count<R - 1>(m - i, [&](auto rows) { f(rows, i); });
}

template <int MR>
void nt_rows(int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* bp, float* c, int64_t ldc,
             float* row_max) {
  Vec rmax[MR];
  for (int r = 0; r < MR; ++r) rmax[r] = Vec(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 < n; j0 += kPanel)
    nt_tile<MR>(k, a, lda, bp + j0 * k, alpha, c + j0, ldc, n - j0, rmax);
  if (row_max != nullptr)
    for (int r = 0; r < MR; ++r) row_max[r] = std::max(row_max[r], hmax(rmax[r]));
}

// C (m x n, ldc >= n rounded up to kPanel) = alpha A (m x k, lda) B^T, B packed by pack_rows. Columns
// [n, round_up(n, kPanel)) of C are written too (zeros times alpha). row_max (optional, m):
// row_max[i] = max(row_max[i], max_j C[i, j]) over j < n.
void gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* bp, float* c,
             int64_t ldc, float* row_max) {
  for_row_blocks<kNtRows>(m, [&](auto rows, int64_t i) {
    float* rm = row_max ? row_max + i : nullptr;
    nt_rows<decltype(rows)::value>(n, k, alpha, a + i * lda, lda, bp, c + i * ldc, ldc, rm);
  });
}

// How C is updated: C = C * c_scale[row] + factor * (A B) (c_scale nullptr: 1), or C = factor * (A B).
struct Update {
  float factor = 1.0f;
  const float* c_scale = nullptr;
  bool accumulate = true;
};

// A block of C: MR rows x NV vectors, reduction over k, A as in accumulate_block.
template <int MR, int NV, bool kTransA>
C10_ALWAYS_INLINE void nn_tile(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                               int64_t ldc, const Update& u) {
  Vec acc[MR][NV];
  accumulate_block<MR, NV, kTransA>(k, a, lda, b, ldb, acc);
  const Vec f(u.factor);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const Vec s(u.c_scale ? u.c_scale[r] : 1.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + v * kW;
      const Vec x = u.accumulate ? at::vec::fmadd(f, acc[r][v], Vec::loadu(cp) * s) : f * acc[r][v];
      x.store(cp);
    }
  }
}

// Columns [c0, c0 + cols) of an MR-row block, one scalar fixed-order sum each (the tail of n that
// is not a whole vector).
template <bool kTransA>
void nn_scalar(int64_t rows, int64_t cols, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
               float* c, int64_t ldc, const Update& u) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      float s = 0.0f;
      for (int64_t kk = 0; kk < k; ++kk) s += (kTransA ? a[kk * lda + r] : a[r * lda + kk]) * b[kk * ldb + j];
      float& out = c[r * ldc + j];
      out = u.accumulate ? out * (u.c_scale ? u.c_scale[r] : 1.0f) + u.factor * s : u.factor * s;
    }
}

template <int MR, bool kTransA>
void nn_rows(int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
             const Update& u) {
  int64_t j = 0;
  for (; j + kNnVecs * kW <= n; j += kNnVecs * kW) nn_tile<MR, kNnVecs, kTransA>(k, a, lda, b + j, ldb, c + j, ldc, u);
  with_count<kNnVecs - 1>((n - j) / kW, [&](auto vecs) {  // the whole vectors left
    nn_tile<MR, decltype(vecs)::value, kTransA>(k, a, lda, b + j, ldb, c + j, ldc, u);
    j += decltype(vecs)::value * kW;
  });
  if (j < n) nn_scalar<kTransA>(MR, n - j, k, a, lda, b + j, ldb, c + j, ldc, u);
}

template <bool kTransA>
void gemm_nn_impl(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                  float* c, int64_t ldc, Update u) {
  const int64_t row_step = kTransA ? 1 : lda;  // A's offset between consecutive rows of C
  for_row_blocks<kNnRows>(m, [&](auto rows, int64_t i) {
    Update ui = u;
    if (u.c_scale) ui.c_scale = u.c_scale + i;
    nn_rows<decltype(rows)::value, kTransA>(n, k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc, ui);
  });
}

// C (m x n) = C * c_scale[row] + factor A B (c_scale nullptr: 1; accumulate false: C = factor A B),
// A (m x k, lda), B (k x n, ldb).
void gemm_nn(int64_t m, int64_t n, int64_t k, float factor, const float* a, int64_t lda, const float* b, int64_t ldb,
             float* c, int64_t ldc, const float* c_scale, bool accumulate) {
  gemm_nn_impl<false>(m, n, k, a, lda, b, ldb, c, ldc, Update{factor, c_scale, accumulate});
}

// C (m x n) += factor A^T B, A (k x m, lda), B (k x n, ldb).
void gemm_tn(int64_t m, int64_t n, int64_t k, float factor, const float* a, int64_t lda, const float* b, int64_t ldb,
             float* c, int64_t ldc) {
  gemm_nn_impl<true>(m, n, k, a, lda, b, ldb, c, ldc, Update{factor, nullptr, true});
}

}  // namespace
}  // namespace gemm
}  // namespace CPU_CAPABILITY
}  // namespace rollingq
