// bfloat16 operands of the tile GEMMs (docs/op.md, "Backends"): on CPUs with AVX512_BF16, at the
// AVX512 level, the score GEMMs (q k^T, and the backward's dO v^T) read bfloat16 inputs as they are
// and the forward's P V rounds P to bfloat16, all with float32 accumulation (float_row_ops.h:
// *_bf16). Everywhere else bfloat16 inputs are upcast to float32 and every GEMM runs in float32;
// the first such call says so once.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernel_utils.h"
#include "row_ops.h"
#include "tile_gemm.h"

namespace rollingq {

// Whether bfloat16 inputs get the bfloat16 GEMMs here; logs the upcast once otherwise.
template <typename scalar_t>
bool use_bf16_gemms() {
  if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
    return false;
  } else {
    const bool on = float_row_ops().gemm_nt_bf16 != nullptr;
    if (!on) {
      // once per process through a static's thread-safe initialization, not TORCH_WARN_ONCE: that one reads
      // c10::WarningUtils::get_warnAlways(), a symbol outside the stable ABI (tests/test_wheel_abi.py)
      static const bool warned = [] {
        TORCH_WARN("rollingq: bfloat16 inputs on this CPU (or at this instruction-set level) have no AVX512_BF16 "
                   "kernels: they are computed in float32 (upcast), as docs/op.md says");
        return true;
      }();
      (void)warned;
    }
    return on;
  }
}

// Per-thread buffers and packed tiles of the bfloat16 GEMMs of one kernel call (unused, and
// empty, unless `on`).
template <typename scalar_t>
class Bf16Operands {
 public:
  Bf16Operands(bool on, int64_t q_tile, int64_t kv_tile, int64_t dh, int64_t row_block, int64_t lds)
      : on_(on),
        dh_(dh),
        qbuf_{std::vector<scalar_t>(on ? q_tile * dh : 0), std::vector<scalar_t>(on ? q_tile * dh : 0)},
        rows_(on ? kv_tile * dh : 0),
        pbuf_(on ? row_block * (lds + 1) : 0),
        keys_{rows_packer(kv_tile), rows_packer(kv_tile)},
        values_([this](int64_t n) { return on_ ? padded(n, 2) * dh_ : 0; },
                [this](const uint16_t* rows, int64_t n, uint16_t* dst) { t_.pack_pairs_bf16(rows, n, dh_, dst); },
                kv_tile) {}

  bool on() const { return on_; }

  // Query (or dO) tile rows as load_query_tile gives them, in bfloat16; slot 0 or 1 (two tiles at once).
  const uint16_t* query_tile(const scalar_t* q, const scalar_t* q0rot, int64_t r0, int64_t nr, const uint8_t* valid,
                             bool all_valid, int slot = 0) {
    return bits(load_query_tile<scalar_t, scalar_t>(q, q0rot, r0, nr, dh_, valid, all_valid, qbuf_[slot].data()));
  }
  // Tile `index` of the key tiles of (batch, head) `owner` packed for scores() (slot 0 or 1: keys and, in
  // the backward, values); x: its (N, Dh) rows. Padded rows as they are (their scores are replaced), or
  // zeros (zero_padded).
  const uint16_t* keys(int64_t owner, const std::vector<Tile>& tiles, size_t index, const scalar_t* x,
                       const uint8_t* valid, bool zero_padded, int slot = 0) {
    return keys_[slot].get(owner, tiles, index, [&](const Tile& t) {
      return bits(zero_padded ? load_valid_rows<scalar_t, scalar_t>(x, t.start, t.size, dh_, valid + t.start,
                                                                     t.all_valid, rows_.data())
                              : load_rows<scalar_t, scalar_t>(x, t.start, t.size, dh_, rows_.data()));
    });
  }
  // The value rows of a key tile, padded rows zeroed, packed for pv().
  const uint16_t* values(int64_t owner, const std::vector<Tile>& tiles, size_t index, const scalar_t* x,
                         const uint8_t* valid) {
    return values_.get(owner, tiles, index, [&](const Tile& t) {
      return bits(load_valid_rows<scalar_t, scalar_t>(x, t.start, t.size, dh_, valid + t.start, t.all_valid,
                                                      rows_.data()));
    });
  }
  void scores(int64_t m, int64_t n, float alpha, const uint16_t* a, const uint16_t* bp, float* s, int64_t lds,
              float* row_max) const {
    t_.gemm_nt_bf16(m, n, dh_, alpha, a, dh_, bp, s, lds, row_max);
  }
  void pv(int64_t m, int64_t n, const float* p, int64_t ldp, const uint16_t* vp, float* c, const float* c_scale) {
    t_.gemm_pv_bf16(m, dh_, n, p, ldp, vp, c, dh_, c_scale, pbuf_.data());
  }

 private:
  static int64_t padded(int64_t n, int64_t to) { return (n + to - 1) / to * to; }
  TilePacker<uint16_t> rows_packer(int64_t kv_tile) {
    return TilePacker<uint16_t>(
        [this](int64_t n) { return on_ ? padded(n, t_.panel) * padded(dh_, 2) : 0; },
        [this](const uint16_t* rows, int64_t n, uint16_t* dst) { t_.pack_rows_bf16(rows, n, dh_, dh_, dst); }, kv_tile);
  }
  static const uint16_t* bits(const scalar_t* x) { return reinterpret_cast<const uint16_t*>(x); }

  const FloatRowOps& t_ = float_row_ops();
  bool on_;
  int64_t dh_;
  std::vector<scalar_t> qbuf_[2], rows_;
  std::vector<uint16_t> pbuf_;
  TilePacker<uint16_t> keys_[2], values_;
};

}  // namespace rollingq
