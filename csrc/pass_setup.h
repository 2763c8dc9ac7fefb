// What the forward and the backward pass (forward.cpp, backward.cpp) set up alike: the tiles, dropout,
// the scale, the typed inputs, the tile GEMMs, and the parallel loop over balanced tasks.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention_kernels.h"
#include "bf16_tiles.h"
#include "kernel_utils.h"
#include "tile_gemm.h"

namespace rollingq {

// Read by a pass through a structured binding of all its members, in order.
template <typename scalar_t>
struct PassSetup {
  using acc_t = acc_type<scalar_t>;
  // max_row_block: the most query rows whose scores one step keeps (TileGemm's kRowBlock or kBackwardRowBlock)
  PassSetup(const Problem& p, const AttentionInputs& in, int64_t max_row_block)
      : qB(q_block_size(p.Nq)),
        kvB(kv_block_size(p.Dh)),
        layout(p, kvB, qB),  // varlen: only the valid query rows and keys are visited
        all_query(p.Nq > 1),
        dropout(p.dropout_p > 0.0),
        threshold(dropout_threshold(p.dropout_p)),
        inv_keep(static_cast<acc_t>(1.0 / (1.0 - p.dropout_p))),
        scale(static_cast<acc_t>(p.scale)),
        q(static_cast<const scalar_t*>(in.q)),
        k(static_cast<const scalar_t*>(in.k)),
        v(static_cast<const scalar_t*>(in.v)),
        q0rot(static_cast<const scalar_t*>(in.q0rot)),
        ldS(gemm.padded_cols(kvB)),
        row_block(std::min(qB, max_row_block)),
        bf16_gemms(all_query && use_bf16_gemms<scalar_t>()) {}
  int64_t qB, kvB;  // query rows and keys per tile
  Layout layout;
  bool all_query, dropout;
  uint32_t threshold;
  acc_t inv_keep, scale;
  const scalar_t *q, *k, *v, *q0rot;
  TileGemm<acc_t> gemm;
  int64_t ldS;  // score rows: whole panels
  int64_t row_block;
  bool bf16_gemms;  // bfloat16 inputs on a CPU with AVX512_BF16
};

// Runs f(first, last) for each worker's share [first, last) of the tasks (balance_tasks over their cost),
// in parallel, with BLAS serial inside: results never depend on the thread count.
template <typename F>
void parallel_tasks(const std::vector<int64_t>& cost, int64_t workers, const F& f) {
  const std::vector<int64_t> bounds = balance_tasks(cost, workers);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t wbegin, int64_t wend) {
    SerialBlasGuard serial_blas;
    f(bounds[wbegin], bounds[wend]);
  });
}

}  // namespace rollingq
