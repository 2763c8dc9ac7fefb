// Forward kernel of rollingq::attention_fwd on CPU (docs/op.md): flash-style
// tiling with an online softmax, parallel over (batch, head, query block).
// Varlen: with lengths, only the valid query rows and keys are visited (tiles
// of the original positions, see plan_tiles), padded rows are written as 0.
// Padded positions inside a tile are never used in arithmetic: their scores
// are replaced by -inf, their value rows by zeros, their output rows by 0, so
// NaN or inf stored there cannot reach a valid result.
// The task holding query row 0 (the class row) also accumulates the RollingQ
// statistics while it reads K: per-modality sums of the valid keys and
// per-segment exp-sums rescaled by the running max like the softmax denominator.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

#include "attention_kernels.h"
#include "bf16_tiles.h"
#include "kernel_utils.h"
#include "pass_setup.h"
#include "row_ops.h"
#include "tile_gemm.h"

namespace rollingq {
namespace {

template <typename acc_t>
struct RowState {
  std::vector<acc_t> max, sum;
  explicit RowState(int64_t n) : max(n), sum(n) {}
  void reset(int64_t n) {
    std::fill(max.begin(), max.begin() + n, -std::numeric_limits<acc_t>::infinity());
    std::fill(sum.begin(), sum.begin() + n, acc_t(0));
  }
};

// Statistics of the class row accumulated over the kv tiles of one (b, h).
template <typename acc_t>
struct ClassRowStats {
  std::vector<acc_t> mass;     // (M + 1,) exp-sums relative to the running max
  std::vector<acc_t> key_sum;  // (M, Dh) sums of valid keys

  ClassRowStats(int64_t m, int64_t dh) : mass(m + 1), key_sum(m * dh) {}
  void reset() {
    std::fill(mass.begin(), mass.end(), acc_t(0));
    std::fill(key_sum.begin(), key_sum.end(), acc_t(0));
  }
  // Adds one kv tile of the class row: p0 (nk,) = exp(s - running max), alpha the rescale.
  void add_mass(const acc_t* p0, acc_t alpha, const int32_t* segment_of, int64_t nk) {
    for (auto& x : mass) x *= alpha;
    for (int64_t j = 0; j < nk;) {  // a run of one segment at a time (padded keys add their p = 0)
      int64_t end = j + 1;
      while (end < nk && segment_of[end] == segment_of[j]) ++end;
      mass[segment_of[j]] += run_sum(p0 + j, end - j);
      j = end;
    }
  }
  // sum of x (n,) with 8 independent partial sums (no serial chain of adds; the compiler vectorizes it)
  static acc_t run_sum(const acc_t* x, int64_t n) {
    acc_t part[8] = {};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int u = 0; u < 8; ++u) part[u] += x[j + u];
    for (; j < n; ++j) part[0] += x[j];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }
  // The sum a key (dh,) adds to: its modality's, or nullptr (invalid key, class key).
  acc_t* key_sum_of(bool valid, int32_t segment, int64_t dh) {
    return segment > 0 && valid ? key_sum.data() + (segment - 1) * dh : nullptr;
  }
  void write(const Problem& p, int64_t b, acc_t denom, float* mass_out, float* key_mean_out) const {
    for (int64_t s = 0; s <= p.M; ++s) mass_out[s] = static_cast<float>(mass[s] / denom);
    for (int64_t m = 0; m < p.M; ++m) {
      const int64_t count = p.lengths ? p.lengths[b * p.M + m] : p.offsets[m + 1] - p.offsets[m];
      const acc_t inv = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
      for (int64_t d = 0; d < p.Dh; ++d) key_mean_out[m * p.Dh + d] = static_cast<float>(key_sum[m * p.Dh + d] * inv);
    }
  }
};

// Online-softmax update of one score row s (nk,) whose maximum over the valid keys is m_tile (masked_max,
// which also turns padded keys into -inf, or the GEMM's fused maximum): s becomes exp(s - new max);
// returns the factor that rescales the row's previous accumulator and sum.
template <typename acc_t>
inline acc_t softmax_row_update(const RowOps<acc_t>& ops, acc_t* s, acc_t m_tile, int64_t nk, acc_t& row_max,
                                acc_t& row_sum) {
  const acc_t m_new = std::max(row_max, m_tile);  // finite: tile 0 holds the class key
  const acc_t alpha = exp_vec(row_max - m_new);
  row_sum = row_sum * alpha + ops.exp_sum(s, nk, m_new);
  row_max = m_new;
  return alpha;
}

// Zeroes out and lse on the query rows of [0, nq) that no tile covers (padding).
template <typename scalar_t>
void zero_uncovered_rows(const std::vector<Tile>& tiles, int64_t nq, int64_t dh, scalar_t* out, float* lse) {
  int64_t next = 0;
  auto zero = [&](int64_t r0, int64_t r1) {
    std::fill(out + r0 * dh, out + r1 * dh, scalar_t(0));
    std::fill(lse + r0, lse + r1, 0.0f);
  };
  for (const Tile& t : tiles) {
    zero(next, t.start);
    next = t.start + t.size;
  }
  zero(next, nq);
}

template <typename scalar_t>
void forward_impl(const Problem& p, const ForwardBuffers& buf) {
  using acc_t = acc_type<scalar_t>;
  const RowOps<acc_t> ops;
  const int64_t Dh = p.Dh, N = p.N, Nq = p.Nq;
  const auto& [qB, kvB, layout, all_query, dropout, threshold, inv_keep, scale, q, k, v, q0rot, gemm, ldS, row_block,
               bf16_gemms] = PassSetup<scalar_t>(p, buf, TileGemm<acc_t>::kRowBlock);
  const bool want_stats = buf.key_mean != nullptr;
  auto* out = static_cast<scalar_t*>(buf.out);

  std::vector<std::pair<int64_t, int64_t>> tasks;  // (b * H + h, query tile index)
  std::vector<int64_t> cost;                       // query rows x keys visited
  for (int64_t bh = 0; bh < p.B * p.H; ++bh) {
    const std::vector<Tile>& query_tiles = layout.queries_of(bh / p.H);
    int64_t keys = 0;
    for (const Tile& t : layout.keys_of(bh / p.H)) keys += t.size;
    for (size_t t = 0; t < query_tiles.size(); ++t) {
      tasks.emplace_back(bh, static_cast<int64_t>(t));
      cost.push_back(query_tiles[t].size * keys);
    }
  }
  // all-query: the two GEMMs, 4 Dh flops per visit; class-only calls are memory-bound: split by
  // the bytes of K and V they read
  const int64_t workers = pass_workers(cost, all_query, 4.0 * Dh, 2.0 * Dh * sizeof(scalar_t), at::get_num_threads());
  parallel_tasks(cost, workers, [&](int64_t first, int64_t last) {
    std::vector<acc_t> qbuf(qB * Dh), kbuf(kvB * Dh), vbuf(kvB * Dh);
    TilePacker<acc_t> key_panels(gemm, kvB, Dh);
    Bf16Operands<scalar_t> bf16(bf16_gemms, qB, kvB, Dh, row_block, ldS);
    std::vector<acc_t> scores(row_block * ldS), acc(qB * Dh), tile_max(row_block), alpha(row_block);
    RowState<acc_t> rows(qB);
    std::vector<uint32_t> row_keys(qB);
    ClassRowStats<acc_t> stats(p.M, Dh);
    for (int64_t task = first; task < last; ++task) {
      const int64_t bh = tasks[task].first, b = bh / p.H, h = bh % p.H;
      const std::vector<Tile>& query_tiles = layout.queries_of(b);
      const Tile& qtile = query_tiles[tasks[task].second];
      const int64_t r0 = qtile.start, nr = qtile.size;
      const uint8_t* key_valid = layout.valid_row(b);
      const uint32_t* key_mask = layout.mask_row(b);
      if (tasks[task].second == 0) zero_uncovered_rows(query_tiles, Nq, Dh, out + bh * Nq * Dh, buf.lse + bh * Nq);
      scalar_t* out_rows = out + (bh * Nq + r0) * Dh;
      float* lse_rows = buf.lse + bh * Nq + r0;
      // padded query rows inside the tile are zeros: their scores stay finite whatever q holds there
      const acc_t* qt = load_query_tile<scalar_t, acc_t>(q + bh * Nq * Dh, q0rot ? q0rot + bh * Dh : nullptr, r0,
                                                         nr, Dh, key_valid + r0, qtile.all_valid || !all_query,
                                                         qbuf.data());
      const uint16_t* q16 = bf16.on() ? bf16.query_tile(q + bh * Nq * Dh, q0rot ? q0rot + bh * Dh : nullptr, r0, nr,
                                                         key_valid + r0, qtile.all_valid) : nullptr;
      const bool class_tile = want_stats && r0 == 0;
      const bool single_row = nr == 1;
      rows.reset(nr);
      std::fill(acc.begin(), acc.begin() + nr * Dh, acc_t(0));
      if (class_tile) stats.reset();
      if (dropout)
        for (int64_t i = 0; i < nr; ++i) row_keys[i] = dropout_row_key(p.seed, b, h, r0 + i);

      const std::vector<Tile>& key_tiles = layout.keys_of(b);
      for (size_t kti = 0; kti < key_tiles.size(); ++kti) {  // tile 0 holds the class key: running max finite
        const Tile& ktile = key_tiles[kti];
        const int64_t j0 = ktile.start, nk = ktile.size;
        const uint8_t* tile_valid = key_valid + j0;
        if (!ktile.all_valid && !any_valid(tile_valid, nk)) continue;
        const uint32_t* mask = ktile.all_valid ? nullptr : key_mask + j0;
        if (single_row) {  // one streaming pass over the valid keys: scores and key sums together
          const acc_t* kt = load_rows<scalar_t, acc_t>(k + bh * N * Dh, j0, nk, Dh, kbuf.data());
          acc_t* s = scores.data();
          std::fill(s, s + nk, -std::numeric_limits<acc_t>::infinity());  // padded keys
          for_valid_runs(p, b, j0, nk, [&](int64_t lo, int64_t hi, int64_t segment) {
            acc_t* key_sum = class_tile && segment > 0 ? stats.key_sum.data() + (segment - 1) * Dh : nullptr;
            ops.dot_rows(qt, kt + (lo - j0) * Dh, hi - lo, Dh, scale, s + lo - j0, key_sum);
          });
          const acc_t a0 = softmax_row_update(ops, s, ops.masked_max(s, nullptr, nk), nk, rows.max[0], rows.sum[0]);
          if (class_tile) stats.add_mass(s, a0, layout.segment_of.data() + j0, nk);
          if (dropout) ops.dropout(s, nk, row_keys[0], layout.col_hash.data() + j0, threshold, inv_keep);
          if (a0 != acc_t(1)) ops.scale(acc.data(), a0, Dh);
          // padded keys have probability 0: their value rows are never read
          const acc_t* vt = load_rows<scalar_t, acc_t>(v + bh * N * Dh, j0, nk, Dh, vbuf.data());
          for_valid_runs(p, b, j0, nk, [&](int64_t lo, int64_t hi, int64_t) {
            ops.weighted_rows(s + lo - j0, vt + (lo - j0) * Dh, hi - lo, Dh, acc.data());
          });
          continue;
        }
        const acc_t* kp = nullptr;
        const acc_t* vt = nullptr;
        const uint16_t *kp16 = nullptr, *vp16 = nullptr;
        if (bf16.on()) {
          kp16 = bf16.keys(bh, key_tiles, kti, k + bh * N * Dh, key_valid, false);
          vp16 = bf16.values(bh, key_tiles, kti, v + bh * N * Dh, key_valid);
        } else {
          kp = key_panels.get(bh, key_tiles, kti, [&](const Tile& t) {
            return load_rows<scalar_t, acc_t>(k + bh * N * Dh, t.start, t.size, Dh, kbuf.data());
          });
          vt = load_valid_rows<scalar_t, acc_t>(v + bh * N * Dh, j0, nk, Dh, tile_valid, ktile.all_valid, vbuf.data());
        }
        if (class_tile) {
          const acc_t* kt = load_rows<scalar_t, acc_t>(k + bh * N * Dh, j0, nk, Dh, kbuf.data());
          for (int64_t j = 0; j < nk; ++j)
            if (acc_t* key_sum = stats.key_sum_of(tile_valid[j], layout.segment_of[j0 + j], Dh))
              ops.axpy(acc_t(1), kt + j * Dh, key_sum, Dh);
        }
        // Row blocks: scores, softmax and P V of a few query rows while their scores are in L1.
        for (int64_t i0 = 0; i0 < nr; i0 += row_block) {
          const int64_t nb = std::min(row_block, nr - i0);
          std::fill(tile_max.begin(), tile_max.begin() + nb, -std::numeric_limits<acc_t>::infinity());
          // padded keys: masked_max below replaces their scores (the fused maximum would see them)
          acc_t* fused_max = mask ? nullptr : tile_max.data();
          if constexpr (std::is_same_v<acc_t, float>)
            if (bf16.on()) bf16.scores(nb, nk, scale, q16 + i0 * Dh, kp16, scores.data(), ldS, fused_max);
          if (!bf16.on()) gemm.scores(nb, nk, Dh, scale, qt + i0 * Dh, kp, scores.data(), ldS, fused_max);
          for (int64_t ib = 0; ib < nb; ++ib) {
            const int64_t i = i0 + ib;
            acc_t* s = scores.data() + ib * ldS;
            const acc_t m_tile = mask ? ops.masked_max(s, mask, nk) : tile_max[ib];
            alpha[ib] = softmax_row_update(ops, s, m_tile, nk, rows.max[i], rows.sum[i]);
            if (class_tile && i == 0) stats.add_mass(s, alpha[ib], layout.segment_of.data() + j0, nk);
            if (dropout) ops.dropout(s, nk, row_keys[i], layout.col_hash.data() + j0, threshold, inv_keep);
          }
          if constexpr (std::is_same_v<acc_t, float>)
            if (bf16.on()) bf16.pv(nb, nk, scores.data(), ldS, vp16, acc.data() + i0 * Dh, alpha.data());
          if (!bf16.on()) gemm.pv(nb, Dh, nk, acc_t(1), scores.data(), ldS, vt, acc.data() + i0 * Dh, alpha.data());
        }
      }

      for (int64_t i = 0; i < nr; ++i) {
        scalar_t* o = out_rows + i * Dh;
        if (all_query && !key_valid[r0 + i]) {  // a padded query row: exactly 0
          std::fill(o, o + Dh, scalar_t(0));
          lse_rows[i] = 0.0f;
          continue;
        }
        const acc_t inv = acc_t(1) / rows.sum[i];
        for (int64_t d = 0; d < Dh; ++d) o[d] = static_cast<scalar_t>(acc[i * Dh + d] * inv);
        lse_rows[i] = static_cast<float>(rows.max[i] + std::log(rows.sum[i]));
      }
      if (class_tile) {
        stats.write(p, b, rows.sum[0], buf.mass + bh * (p.M + 1), buf.key_mean + bh * p.M * Dh);
        buf.score_max[bh] = static_cast<float>(rows.max[0]);  // the online softmax's final max
      }
    }
  });
}

}  // namespace

void attention_forward(const Problem& p, const ForwardBuffers& buf) {
  dispatch_dtype(p.dtype, [&](auto tag) { forward_impl<decltype(tag)>(p, buf); });
}

}  // namespace rollingq
