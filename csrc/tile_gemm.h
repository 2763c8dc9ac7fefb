// The GEMMs of the attention tiles in the compute dtype, one interface for the two
// compute dtypes the kernels use (forward.cpp, backward.cpp):
//   float:  the per-level micro-kernels of csrc/cpu/gemm_impl.h (through float_row_ops()),
//   double: BLAS (dgemm), whose summation order no instruction-set level changes.
// All matrices are row-major. B of `scores` is first packed with `pack` (float: panels of
// ops.panel keys; double: used in place).
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "kernel_utils.h"
#include "row_ops.h"

namespace rollingq {

template <typename acc_t>
struct TileGemm;

template <>
struct TileGemm<float> {
  const FloatRowOps& t = float_row_ops();

  // Floats a packed B (n x k) takes; columns a score row needs (n rounded up to the panel).
  int64_t packed_size(int64_t n, int64_t k) const { return padded_cols(n) * k; }
  int64_t padded_cols(int64_t n) const { return (n + t.panel - 1) / t.panel * t.panel; }
  // Query rows per fused block of the forward: the scores of one block stay in L1.
  static constexpr int64_t kRowBlock = 12;
  // Query rows per block of the backward: their P and dS feed three GEMMs.
  static constexpr int64_t kBackwardRowBlock = 24;

  const float* pack(const float* b, int64_t n, int64_t k, float* buf) const {
    t.pack_rows(b, n, k, k, buf);
    return buf;
  }
  // S (m x n, lds) = alpha A (m x k) B^T; row_max (optional) as FloatRowOps::gemm_nt.
  void scores(int64_t m, int64_t n, int64_t k, float alpha, const float* a, const float* bp, float* s, int64_t lds,
              float* row_max) const {
    t.gemm_nt(m, n, k, alpha, a, k, bp, s, lds, row_max);
  }
  // C (m x d) = C * c_scale[i] + P (m x n, ldp) B (n x d); c_scale nullptr: 1.
  void pv(int64_t m, int64_t d, int64_t n, float factor, const float* p, int64_t ldp, const float* b, float* c,
          const float* c_scale) const {
    t.gemm_nn(m, d, n, factor, p, ldp, b, d, c, d, c_scale, true);
  }
  // C (n x d) += factor P^T (P m x n, ldp) X (m x d).
  void ptx(int64_t m, int64_t n, int64_t d, float factor, const float* p, int64_t ldp, const float* x,
           float* c) const {
    t.gemm_tn(n, d, m, factor, p, ldp, x, d, c, d);
  }
};

template <>
struct TileGemm<double> {
  int64_t packed_size(int64_t, int64_t) const { return 0; }
  int64_t padded_cols(int64_t n) const { return n; }
  static constexpr int64_t kRowBlock = 1 << 30;  // whole tiles: BLAS is fastest on large calls
  static constexpr int64_t kBackwardRowBlock = 1 << 30;

  const double* pack(const double* b, int64_t, int64_t, double*) const { return b; }
  void scores(int64_t m, int64_t n, int64_t k, double alpha, const double* a, const double* b, double* s,
              int64_t lds, double* row_max) const {
    gemm_abt<double>(m, n, k, alpha, a, b, s, lds);
    if (row_max != nullptr)
      for (int64_t i = 0; i < m; ++i)
        row_max[i] = std::max(row_max[i], RowOps<double>::masked_max(s + i * lds, nullptr, n));
  }
  void pv(int64_t m, int64_t d, int64_t n, double factor, const double* p, int64_t ldp, const double* b, double* c,
          const double* c_scale) const {
    if (c_scale != nullptr)
      for (int64_t i = 0; i < m; ++i)
        if (c_scale[i] != 1.0) RowOps<double>::scale(c + i * d, c_scale[i], d);
    gemm_pv<double>(m, n, d, factor, p, ldp, b, 1.0, c);
  }
  void ptx(int64_t m, int64_t n, int64_t d, double factor, const double* p, int64_t ldp, const double* x,
           double* c) const {
    gemm_ptx<double>(m, n, d, factor, p, ldp, x, c);
  }
};

// Packed key (or value) tiles of one (batch, head) for the tile GEMMs. When every tile of the
// (batch, head) fits in kMaxElements, each is packed at its first use and kept while the thread
// stays on that (batch, head) (its query tiles are consecutive tasks); otherwise each use packs
// its tile again into one tile-sized buffer. Either way the packed values are the same.
template <typename T>
class TilePacker {
 public:
  static constexpr int64_t kMaxElements = int64_t{1} << 20;  // 4 MiB of float32
  using SizeFn = std::function<int64_t(int64_t rows)>;             // elements a packed tile of `rows` takes
  using PackFn = std::function<void(const T* rows, int64_t n, T* dst)>;

  TilePacker(SizeFn size, PackFn pack, int64_t max_tile)
      : size_(std::move(size)), pack_(std::move(pack)), in_place_(size_(1) == 0) {
    buffer_.resize(size_(max_tile));
  }
  // The packing of TileGemm::scores (double: none, tiles are used in place).
  template <typename acc_t>
  TilePacker(const TileGemm<acc_t>& gemm, int64_t max_tile, int64_t dh)
      : TilePacker([&gemm, dh](int64_t n) { return gemm.packed_size(n, dh); },
                   [&gemm, dh](const T* rows, int64_t n, T* dst) { gemm.pack(rows, n, dh, dst); }, max_tile) {}

  // Tile `index` of `tiles` (the key tiles of `owner`), packed; load(tile) gives its rows.
  template <typename LoadRows>
  const T* get(int64_t owner, const std::vector<Tile>& tiles, size_t index, const LoadRows& load) {
    if (in_place_) return load(tiles[index]);
    if (owner != owner_) {
      owner_ = owner;
      offsets_.assign(tiles.size() + 1, 0);
      for (size_t t = 0; t < tiles.size(); ++t) offsets_[t + 1] = offsets_[t] + size_(tiles[t].size);
      keep_ = offsets_.back() <= kMaxElements;
      if (keep_ && static_cast<int64_t>(buffer_.size()) < offsets_.back()) buffer_.resize(offsets_.back());
      packed_.assign(tiles.size(), 0);
    }
    T* dst = buffer_.data() + (keep_ ? offsets_[index] : 0);
    if (!keep_ || !packed_[index]) {
      pack_(load(tiles[index]), tiles[index].size, dst);
      if (keep_) packed_[index] = 1;
    }
    return dst;
  }

 private:
  SizeFn size_;
  PackFn pack_;
  bool in_place_;  // nothing to pack (a packed tile takes no elements): tiles are used as loaded
  int64_t owner_ = -1;
  bool keep_ = false;
  std::vector<T> buffer_;
  std::vector<int64_t> offsets_;
  std::vector<uint8_t> packed_;
};

}  // namespace rollingq
