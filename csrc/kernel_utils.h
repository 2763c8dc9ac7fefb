// Building blocks of the kernels: BLAS on row-major tiles, a vectorizable exp,
// the counter-based dropout hash of docs/op.md, key validity and tile loading.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_kernels.h"
#include "scalar_math.h"

// The BLAS that libtorch_cpu exports (MKL in the x86 wheels); LP64 Fortran ABI.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL only; weak so that a non-MKL BLAS still links (the guard is then a no-op).
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace rollingq {

// Compute dtype of the contract: double for double inputs, float otherwise.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Makes BLAS calls on this thread single-threaded for the guard's lifetime, so
// results never depend on the thread count (the kernels parallelize themselves).
class SerialBlasGuard {
 public:
  SerialBlasGuard() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;

 private:
  int previous_;
};

// Column-major C(m x n) = alpha * op(A) op(B) + beta * C (plain BLAS convention), T float or double.
template <typename T>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T beta, T* c, int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "BLAS gemm: float or double");
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ila = static_cast<int>(lda), ilb = static_cast<int>(ldb), ilc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
  else
    dgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
}

// Row-major S(nr x nk, ld lds) = alpha * A(nr x d) B(nk x d)^T, A and B with leading dimension d.
template <typename T>
inline void gemm_abt(int64_t nr, int64_t nk, int64_t d, T alpha, const T* a, const T* b, T* s, int64_t lds) {
  gemm(true, false, nk, nr, d, alpha, b, d, a, d, T(0), s, lds);
}

// Row-major C(nr x d) = alpha * P(nr x nk, ld ldp) V(nk x d) + beta * C.
template <typename T>
inline void gemm_pv(int64_t nr, int64_t nk, int64_t d, T alpha, const T* p, int64_t ldp, const T* v, T beta, T* c) {
  gemm(false, false, d, nr, nk, alpha, v, d, p, ldp, beta, c, d);
}

// Row-major C(nk x d) += alpha * P(nr x nk, ld ldp)^T X(nr x d).
template <typename T>
inline void gemm_ptx(int64_t nr, int64_t nk, int64_t d, T alpha, const T* p, int64_t ldp, const T* x, T* c) {
  gemm(false, true, d, nk, nr, alpha, x, d, p, ldp, T(1), c, d);
}

// exp in the compute dtype: the Cephes polynomial for float (scalar_math.h), std::exp for double.
inline float exp_vec(float x) { return exp_float(x); }
inline double exp_vec(double x) { return std::exp(x); }

inline uint32_t counter_hash(uint64_t i) { return mix32(static_cast<uint32_t>(i) + 0x9e3779b9u); }

// Per-row dropout key r = mix(mix(mix(seed ^ c(b)) ^ c(h)) ^ c(row)).
inline uint32_t dropout_row_key(uint32_t seed, int64_t b, int64_t h, int64_t row) {
  return mix32(mix32(mix32(seed ^ counter_hash(b)) ^ counter_hash(h)) ^ counter_hash(row));
}

// Integer threshold: keep iff (x >> 8) >= threshold.
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(std::nearbyint(p * 16777216.0)); }

// A contiguous window [start, start + size) of keys or query rows, in the
// original token positions (so dropout hashes and segment ids are unchanged).
struct Tile {
  int64_t start = 0, size = 0;
  bool all_valid = true;  // no padded position inside the window
};

// Runs shorter than this many padded positions between two valid runs are
// computed (and masked) rather than splitting the tile there.
constexpr int64_t kMinSkippedGap = 32;

// Tiles of at most max_tile positions covering every valid position of
// valid (n,), in increasing order; the first tile starts at the first valid
// position. Padding is skipped (varlen): a gap is kept inside a tile only when
// it is short (<= max(kMinSkippedGap, the shorter neighbouring valid run)), so
// heavily fragmented layouts still get large tiles. Every span of valid runs
// is cut into the fewest tiles of at most max_tile positions, of about equal
// sizes (with every token valid: one fixed plan, shared by every sample).
inline std::vector<Tile> plan_tiles(const uint8_t* valid, int64_t n, int64_t max_tile) {
  std::vector<std::pair<int64_t, int64_t>> runs;  // [begin, end) of maximal valid runs
  for (int64_t i = 0; i < n;) {
    if (!valid[i]) {
      ++i;
      continue;
    }
    const int64_t begin = i;
    while (i < n && valid[i]) ++i;
    runs.emplace_back(begin, i);
  }
  std::vector<std::pair<int64_t, int64_t>> spans;  // runs merged across short gaps
  for (size_t r = 0; r < runs.size(); ++r) {
    if (!spans.empty()) {
      const int64_t gap = runs[r].first - spans.back().second;
      const int64_t shorter = std::min(runs[r].second - runs[r].first, runs[r - 1].second - runs[r - 1].first);
      if (gap <= std::max(kMinSkippedGap, shorter)) {
        spans.back().second = runs[r].second;
        continue;
      }
    }
    spans.push_back(runs[r]);
  }
  std::vector<Tile> tiles;
  for (const auto& [begin, end] : spans) {
    // as few tiles as max_tile allows, of about equal sizes (multiples of 16 but the last),
    // rather than full tiles and a small remainder: tasks of even cost
    const int64_t count = (end - begin + max_tile - 1) / max_tile;
    const int64_t size = std::min(max_tile, ((end - begin + count - 1) / count + 15) / 16 * 16);
    for (int64_t t0 = begin; t0 < end; t0 += size) {
      Tile t{t0, std::min(size, end - t0), true};
      for (int64_t i = t.start; i < t.start + t.size; ++i) t.all_valid = t.all_valid && valid[i];
      tiles.push_back(t);
    }
  }
  return tiles;
}

// How many threads to split `flops` of work over: at most `threads`, and at most one per
// kMinFlopsPerThread, so a small call runs on the calling thread alone (waking a thread pool
// costs microseconds on idle cores and milliseconds when the other cores are busy).
constexpr double kMinFlopsPerThread = 2e7;  // about half a millisecond of one core
inline int64_t worker_count(double flops, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(flops / kMinFlopsPerThread)));
}

// Memory-bound calls (class-only: a few flops per element read) are split by bytes read instead:
// at most one thread per kMinBytesPerThread.
constexpr double kMinBytesPerThread = 2.0 * (1 << 20);  // about 80 microseconds of one core's reads
inline int64_t worker_count_for_bytes(double bytes, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(bytes / kMinBytesPerThread)));
}

// The workers of a pass over tasks of these costs ((query row, key) pairs visited each): an all-query
// pass is GEMM-bound (flops_per_visit flops a pair), a class-only one memory-bound (bytes_per_visit).
inline int64_t pass_workers(const std::vector<int64_t>& cost, bool all_query, double flops_per_visit,
                            double bytes_per_visit, int64_t threads) {
  const double visits = std::accumulate(cost.begin(), cost.end(), 0.0);
  return all_query ? worker_count(flops_per_visit * visits, threads)
                   : worker_count_for_bytes(bytes_per_visit * visits, threads);
}

// Calls f(lo, hi, segment) for each run [lo, hi) of valid keys of sample b inside [j0, j0 + n) that
// lies in one segment (0: the class token, m + 1: modality m), in increasing order.
template <typename F>
inline void for_valid_runs(const Problem& p, int64_t b, int64_t j0, int64_t n, const F& f) {
  for (int64_t s = 0; s <= p.M; ++s) {
    const int64_t start = s == 0 ? 0 : p.offsets[s - 1];
    const int64_t len = s == 0 ? 1 : p.lengths ? p.lengths[b * p.M + s - 1] : p.offsets[s] - p.offsets[s - 1];
    const int64_t lo = std::max(start, j0), hi = std::min(start + len, j0 + n);
    if (lo < hi) f(lo, hi, s);
  }
}

// Deterministic load balancing of independent tasks with unequal costs: the
// task list cut into `workers` contiguous runs of about equal total cost
// (contiguous, so a thread's consecutive tasks share the same K and V). The
// cut depends only on the costs, and each task computes exactly the same values
// whichever thread runs it. Returns workers + 1 boundaries.
inline std::vector<int64_t> balance_tasks(const std::vector<int64_t>& cost, int64_t workers) {
  const int64_t n = static_cast<int64_t>(cost.size());
  workers = std::max<int64_t>(1, std::min<int64_t>(workers, n));
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  std::vector<int64_t> bounds(1, 0);
  int64_t acc = 0, i = 0;
  for (int64_t w = 1; w < workers; ++w) {
    const double target = static_cast<double>(total) * static_cast<double>(w) / static_cast<double>(workers);
    while (i < n && static_cast<double>(acc) + 0.5 * static_cast<double>(cost[i]) < target) acc += cost[i++];
    bounds.push_back(std::max(i, bounds.back()));
  }
  bounds.push_back(n);
  return bounds;
}

// Per-call tables derived from segments and lengths.
struct Layout {
  std::vector<int32_t> segment_of;  // (N,): 0 for the class token, m + 1 for modality m
  std::vector<uint8_t> valid;       // (B, N): key j of sample b is valid
  std::vector<uint32_t> mask;       // (B, N): valid as row-op masks (all ones / 0), see row_ops.h
  std::vector<uint32_t> col_hash;   // (N,): c(col), only with dropout
  // Key tiles (at most kv_tile keys) and query tiles (at most q_tile rows) per
  // sample; one shared plan when every token is valid (lengths == nullptr).
  std::vector<std::vector<Tile>> key_tiles, query_tiles;

  Layout(const Problem& p, int64_t kv_tile, int64_t q_tile) : segment_of(p.N, 0), valid(p.B * p.N, 1) {
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t j = p.offsets[m]; j < p.offsets[m + 1]; ++j) segment_of[j] = static_cast<int32_t>(m + 1);
    if (p.lengths != nullptr) {
      for (int64_t b = 0; b < p.B; ++b)
        for (int64_t m = 0; m < p.M; ++m) {
          const int64_t len = p.lengths[b * p.M + m];
          for (int64_t j = p.offsets[m]; j < p.offsets[m + 1]; ++j)
            valid[b * p.N + j] = static_cast<uint8_t>(j - p.offsets[m] < len);
        }
    }
    mask.resize(valid.size());
    for (size_t i = 0; i < valid.size(); ++i) mask[i] = valid[i] ? 0xFFFFFFFFu : 0u;
    if (p.dropout_p > 0.0) {
      col_hash.resize(p.N);
      for (int64_t j = 0; j < p.N; ++j) col_hash[j] = counter_hash(static_cast<uint64_t>(j));
    }
    const int64_t plans = p.lengths != nullptr ? p.B : 1;
    const uint8_t class_row = 1;
    for (int64_t b = 0; b < plans; ++b) {
      key_tiles.push_back(plan_tiles(valid_row(b), p.N, kv_tile));
      // A query token is valid iff its key is; class-only mode has the class row alone.
      query_tiles.push_back(p.Nq == p.N ? plan_tiles(valid_row(b), p.N, q_tile) : plan_tiles(&class_row, 1, 1));
    }
  }

  const uint8_t* valid_row(int64_t b) const { return valid.data() + b * static_cast<int64_t>(segment_of.size()); }
  const uint32_t* mask_row(int64_t b) const { return mask.data() + b * static_cast<int64_t>(segment_of.size()); }
  const std::vector<Tile>& keys_of(int64_t b) const { return key_tiles[key_tiles.size() == 1 ? 0 : b]; }
  const std::vector<Tile>& queries_of(int64_t b) const { return query_tiles[query_tiles.size() == 1 ? 0 : b]; }
};

inline bool any_valid(const uint8_t* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (v[i]) return true;
  return false;
}

// Rows [r0, r0 + nr) of a (rows x d) scalar_t matrix as acc_t: a pointer into
// src when no conversion is needed, else converted into scratch.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_rows(const scalar_t* src, int64_t r0, int64_t nr, int64_t d, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src + r0 * d;
  } else {
    const scalar_t* s = src + r0 * d;
    for (int64_t i = 0; i < nr * d; ++i) scratch[i] = static_cast<acc_t>(s[i]);
    return scratch;
  }
}

// The same rows with every row i whose valid[i] is 0 replaced by zeros (in
// scratch), so that whatever a padded position holds (NaN, inf) never enters a
// GEMM; all_valid: a pointer into src as load_rows. valid points at row r0's flag.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_valid_rows(const scalar_t* src, int64_t r0, int64_t nr, int64_t d, const uint8_t* valid,
                                    bool all_valid, acc_t* scratch) {
  if (all_valid) return load_rows<scalar_t, acc_t>(src, r0, nr, d, scratch);
  const scalar_t* s = src + r0 * d;
  for (int64_t i = 0; i < nr; ++i) {
    acc_t* row = scratch + i * d;
    if (valid[i])
      for (int64_t c = 0; c < d; ++c) row[c] = static_cast<acc_t>(s[i * d + c]);
    else
      std::fill(row, row + d, acc_t(0));
  }
  return scratch;
}

// Query tile in the compute dtype, with row 0 replaced by the rotated class
// query and (valid != nullptr, all_valid false) padded rows replaced by zeros.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_query_tile(const scalar_t* q, const scalar_t* q0rot, int64_t r0, int64_t nr, int64_t d,
                                    const uint8_t* valid, bool all_valid, acc_t* scratch) {
  if (q0rot == nullptr || r0 != 0) return load_valid_rows<scalar_t, acc_t>(q, r0, nr, d, valid, all_valid, scratch);
  const acc_t* rows = load_valid_rows<scalar_t, acc_t>(q, 0, nr, d, valid, all_valid, scratch);
  if (rows != scratch) std::copy(rows + d, rows + nr * d, scratch + d);
  for (int64_t c = 0; c < d; ++c) scratch[c] = static_cast<acc_t>(q0rot[c]);  // the class row is always valid
  return scratch;
}

// Tile sizes: up to 512 keys (at most 128 KiB of fp32 keys) by up to 128 query rows.
inline int64_t kv_block_size(int64_t dh) { return std::max<int64_t>(32, std::min<int64_t>(512, 32768 / dh)); }
inline int64_t q_block_size(int64_t nq) { return std::min<int64_t>(256, nq); }

// Calls f(scalar_t{}) for the dtypes of the op.
template <typename F>
inline void dispatch_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Double: f(double{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "rollingq: unsupported dtype ", dtype);
  }
}

}  // namespace rollingq
