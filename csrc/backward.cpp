// Backward kernel of rollingq::attention_bwd on CPU (docs/op.md).
//
// Deterministic by construction: one task per (batch, head), each owning its
// slices of dq, dk, dv; inside a task the query and key tiles are visited in a
// fixed order and every GEMM runs single-threaded, so the gradients are bitwise
// identical whatever the thread count. Probabilities are recomputed from the
// saved log-sum-exp (never stored): with D_i = rowsum(dO_i * O_i),
//   P = exp(scale q k^T - lse), P_d = P * Z (dropout), dV += P_d^T dO,
//   dS = P * (Z * dO V^T - D), dQ += scale dS K, dK += scale dS^T Q.
// Padded positions inside a tile are never used in arithmetic: the q, dO, k
// and v rows of padded tokens enter the GEMMs as zeros and their P and dS
// entries are set to 0, so NaN or inf stored there cannot reach a gradient.
#include <ATen/Parallel.h>

#include "attention_kernels.h"
#include "bf16_tiles.h"
#include "kernel_utils.h"
#include "pass_setup.h"
#include "row_ops.h"
#include "tile_gemm.h"

namespace rollingq {
namespace {

template <typename scalar_t, typename acc_t>
inline void store_rows(const acc_t* src, int64_t n, scalar_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// lse[i] = log sum_j exp(scale q_i k_j) over the valid keys, in double.
inline void exact_lse(const double* qt, const double* k, const uint8_t* key_valid, const uint32_t* key_mask,
                      const std::vector<Tile>& key_tiles, int64_t nr, int64_t Dh, int64_t kvB, double scale,
                      double* scores, double* lse) {
  std::vector<double> mx(nr, -std::numeric_limits<double>::infinity()), sum(nr, 0.0);
  for (const Tile& ktile : key_tiles) {
    const int64_t j0 = ktile.start, nk = ktile.size;
    if (!ktile.all_valid && !any_valid(key_valid + j0, nk)) continue;
    gemm_abt<double>(nr, nk, Dh, scale, qt, k + j0 * Dh, scores, kvB);
    for (int64_t i = 0; i < nr; ++i) {
      double* s = scores + i * kvB;
      const uint32_t* mask = ktile.all_valid ? nullptr : key_mask + j0;
      const double m_new = std::max(mx[i], RowOps<double>::masked_max(s, mask, nk));
      sum[i] = sum[i] * std::exp(mx[i] - m_new) + RowOps<double>::exp_sum(s, nk, m_new);
      mx[i] = m_new;
    }
  }
  for (int64_t i = 0; i < nr; ++i) lse[i] = mx[i] + std::log(sum[i]);
}

// dst[i] = round(alpha * x[i]) for i < n.
template <typename scalar_t, typename acc_t>
inline void write_scaled_row(scalar_t* dst, acc_t alpha, const acc_t* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(alpha * x[i]);
}

// dst (n x d) row j = round(w[j] * x): float through the per-level kernel, else row by row.
template <typename scalar_t, typename acc_t>
inline void write_outer_rows(const RowOps<acc_t>& ops, const acc_t* w, const acc_t* x, int64_t n, int64_t d,
                             scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, float>)
    ops.t.outer_rows(w, x, n, d, dst);
  else
    for (int64_t j = 0; j < n; ++j) write_scaled_row(dst + j * d, w[j], x, d);
}

template <typename scalar_t>
inline void zero_rows(scalar_t* m, int64_t r0, int64_t r1, int64_t d) {
  if (r1 > r0) std::fill(m + r0 * d, m + r1 * d, scalar_t(0));
}

template <typename scalar_t>
void backward_impl(const Problem& p, const BackwardBuffers& buf) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const RowOps<acc_t> ops;
  const int64_t Dh = p.Dh, N = p.N, Nq = p.Nq;
  // padded rows and keys are never visited: they keep a zero gradient
  const auto& [qB, kvB, layout, all_query, dropout, threshold, inv_keep, scale, q, k, v, q0rot, gemm, ldS, row_block,
               bf16_gemms] = PassSetup<scalar_t>(p, buf, TileGemm<acc_t>::kBackwardRowBlock);
  const auto* go = static_cast<const scalar_t*>(buf.grad_out);
  const auto* o = static_cast<const scalar_t*>(buf.out);
  auto* dq_out = static_cast<scalar_t*>(buf.dq);
  auto* dk_out = static_cast<scalar_t*>(buf.dk);
  auto* dv_out = static_cast<scalar_t*>(buf.dv);
  auto* dq0rot = static_cast<acc_t*>(buf.dq0rot);

  std::vector<int64_t> cost(p.B * p.H);  // query rows x keys visited per (batch, head)
  for (int64_t bh = 0; bh < p.B * p.H; ++bh) {
    int64_t rows = 0, keys = 0;
    for (const Tile& t : layout.queries_of(bh / p.H)) rows += t.size;
    for (const Tile& t : layout.keys_of(bh / p.H)) keys += t.size;
    cost[bh] = rows * keys;
  }
  // all-query: the five GEMMs, 10 Dh flops per visit; class-only calls are memory-bound: split by the
  // bytes of K and V read and of dK and dV written
  const int64_t workers = pass_workers(cost, all_query, 10.0 * Dh, 4.0 * Dh * sizeof(scalar_t), at::get_num_threads());
  parallel_tasks(cost, workers, [&](int64_t first, int64_t last) {
    std::vector<acc_t> qbuf(qB * Dh), dobuf(qB * Dh), obuf(convert ? qB * Dh : 0);
    std::vector<acc_t> kbuf(kvB * Dh), vbuf(kvB * Dh);
    TilePacker<acc_t> key_panels(gemm, kvB, Dh), value_panels(gemm, kvB, Dh);
    // bfloat16 inputs with AVX512_BF16: S and dP from the bfloat16 rows (dV, dQ, dK stay float32)
    Bf16Operands<scalar_t> bf16(bf16_gemms, qB, kvB, Dh, row_block, ldS);
    std::vector<acc_t> scores(row_block * ldS), dp(row_block * ldS), delta(qB), lse(qB);
    std::vector<uint32_t> row_keys(qB);
    const bool full_buffers = convert && all_query;
    std::vector<acc_t> dq_acc(full_buffers ? Nq * Dh : 0), dk_acc(full_buffers ? N * Dh : 0);
    std::vector<acc_t> dv_acc(full_buffers ? N * Dh : 0), dq_row(all_query ? 0 : Dh);

    // Class-only (one query row): a streaming pass per key tile. The dots with
    // q and dO are taken row by row (valid keys only), and every dK and dV row is
    // written exactly once (padded rows as zeros): no zero fill of the outputs,
    // no accumulation into them, no BLAS call with a single row.
    auto class_row_backward = [&](int64_t b, int64_t h, int64_t bh) {
      const uint8_t* key_valid = layout.valid_row(b);
      const uint32_t* key_mask = layout.mask_row(b);
      const acc_t* qt = load_query_tile<scalar_t, acc_t>(q + bh * Dh, q0rot ? q0rot + bh * Dh : nullptr, 0, 1, Dh,
                                                         key_valid, true, qbuf.data());
      const acc_t* dot = load_rows<scalar_t, acc_t>(go + bh * Dh, 0, 1, Dh, dobuf.data());
      const acc_t* ot = load_rows<scalar_t, acc_t>(o + bh * Dh, 0, 1, Dh, obuf.data());
      const acc_t delta0 = ops.dot(dot, ot, Dh);
      const std::vector<Tile>& key_tiles = layout.keys_of(b);
      acc_t lse0 = static_cast<acc_t>(buf.lse[bh]);
      if constexpr (std::is_same_v<acc_t, double>)  // see the all-query path
        exact_lse(qt, k + bh * N * Dh, key_valid, key_mask, key_tiles, 1, Dh, kvB, scale, scores.data(), &lse0);
      const uint32_t row_key = dropout ? dropout_row_key(p.seed, b, h, 0) : 0;
      scalar_t* dK = dk_out + bh * N * Dh;
      scalar_t* dV = dv_out + bh * N * Dh;
      std::fill(dq_row.begin(), dq_row.end(), acc_t(0));
      int64_t written = 0;  // dK, dV rows [0, written) are final
      for (const Tile& ktile : key_tiles) {
        const int64_t j0 = ktile.start, nk = ktile.size;
        const uint8_t* tile_valid = key_valid + j0;
        if (!ktile.all_valid && !any_valid(tile_valid, nk)) continue;  // zeroed with the gap below
        zero_rows(dK, written, j0, Dh);
        zero_rows(dV, written, j0, Dh);
        written = j0 + nk;
        const acc_t* kt = load_rows<scalar_t, acc_t>(k + bh * N * Dh, j0, nk, Dh, kbuf.data());
        const acc_t* vt = load_rows<scalar_t, acc_t>(v + bh * N * Dh, j0, nk, Dh, vbuf.data());
        // padded keys: P = 0 below, their keys and values never read
        std::fill(scores.begin(), scores.begin() + nk, acc_t(0));
        std::fill(dp.begin(), dp.begin() + nk, acc_t(0));
        for_valid_runs(p, b, j0, nk, [&](int64_t lo, int64_t hi, int64_t) {
          ops.dot_rows(qt, kt + (lo - j0) * Dh, hi - lo, Dh, scale, scores.data() + lo - j0, nullptr);
          ops.dot_rows(dot, vt + (lo - j0) * Dh, hi - lo, Dh, acc_t(1), dp.data() + lo - j0, nullptr);
        });
        ops.backward_row(scores.data(), dp.data(), ktile.all_valid ? nullptr : key_mask + j0, nk, lse0, delta0,
                         dropout ? layout.col_hash.data() + j0 : nullptr, row_key, threshold, inv_keep);
        for (int64_t j = 0; j < nk; ++j) dp[j] *= scale;  // scores = P_d, dp = scale dS
        write_outer_rows(ops, scores.data(), dot, nk, Dh, dV + j0 * Dh);
        write_outer_rows(ops, dp.data(), qt, nk, Dh, dK + j0 * Dh);
        for_valid_runs(p, b, j0, nk, [&](int64_t lo, int64_t hi, int64_t) {
          ops.weighted_rows(dp.data() + lo - j0, kt + (lo - j0) * Dh, hi - lo, Dh, dq_row.data());
        });
      }
      zero_rows(dK, written, N, Dh);
      zero_rows(dV, written, N, Dh);
      if (dq0rot != nullptr) std::copy_n(dq_row.data(), Dh, dq0rot + bh * Dh);
      store_rows(dq_row.data(), Dh, dq_out + bh * Dh);
    };
    for (int64_t bh = first; bh < last; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const uint8_t* key_valid = layout.valid_row(b);
      const uint32_t* key_mask = layout.mask_row(b);
      if (!all_query) {  // class-only: one query row, see class_row_backward
        class_row_backward(b, h, bh);
        continue;
      }
      acc_t* dQ = convert ? dq_acc.data() : reinterpret_cast<acc_t*>(dq_out + bh * Nq * Dh);
      acc_t* dK = convert ? dk_acc.data() : reinterpret_cast<acc_t*>(dk_out + bh * N * Dh);
      acc_t* dV = convert ? dv_acc.data() : reinterpret_cast<acc_t*>(dv_out + bh * N * Dh);
      std::fill(dQ, dQ + Nq * Dh, acc_t(0));
      std::fill(dK, dK + N * Dh, acc_t(0));
      std::fill(dV, dV + N * Dh, acc_t(0));

      const std::vector<Tile>& key_tiles = layout.keys_of(b);
      for (const Tile& qtile : layout.queries_of(b)) {
        const int64_t r0 = qtile.start, nr = qtile.size;
        // padded query rows enter the GEMMs as zeros (q and dO), whatever the tensors hold there
        const acc_t* qt = load_query_tile<scalar_t, acc_t>(q + bh * Nq * Dh, q0rot ? q0rot + bh * Dh : nullptr, r0,
                                                           nr, Dh, key_valid + r0, qtile.all_valid, qbuf.data());
        const acc_t* dot = load_valid_rows<scalar_t, acc_t>(go + bh * Nq * Dh, r0, nr, Dh, key_valid + r0,
                                                            qtile.all_valid, dobuf.data());
        const acc_t* ot = load_rows<scalar_t, acc_t>(o + bh * Nq * Dh, r0, nr, Dh, obuf.data());
        const uint16_t *q16 = nullptr, *do16 = nullptr;
        if (bf16.on()) {
          q16 = bf16.query_tile(q + bh * Nq * Dh, q0rot ? q0rot + bh * Dh : nullptr, r0, nr, key_valid + r0,
                                qtile.all_valid, 0);
          do16 = bf16.query_tile(go + bh * Nq * Dh, nullptr, r0, nr, key_valid + r0, qtile.all_valid, 1);
        }
        for (int64_t i = 0; i < nr; ++i) {
          delta[i] = key_valid[r0 + i] ? ops.dot(dot + i * Dh, ot + i * Dh, Dh) : acc_t(0);
          lse[i] = static_cast<acc_t>(buf.lse[bh * Nq + r0 + i]);
          if (dropout) row_keys[i] = dropout_row_key(p.seed, b, h, r0 + i);
        }
        // float64: the saved float32 lse would cap the gradients' precision near 1e-7,
        // so recompute the log-sum-exp in double (one extra q k^T pass, float64 only).
        if constexpr (std::is_same_v<acc_t, double>)
          exact_lse(qt, k + bh * N * Dh, key_valid, key_mask, key_tiles, nr, Dh, kvB, scale, scores.data(),
                    lse.data());
        for (size_t kti = 0; kti < key_tiles.size(); ++kti) {
          const Tile& ktile = key_tiles[kti];
          const int64_t j0 = ktile.start, nk = ktile.size;
          const uint8_t* tile_valid = key_valid + j0;
          if (!ktile.all_valid && !any_valid(tile_valid, nk)) continue;
          // padded keys and values enter the GEMMs as zeros, whatever the tensors hold there
          auto valid_rows = [&](const scalar_t* x, acc_t* scratch) {
            return [&, x, scratch](const Tile& t) {
              return load_valid_rows<scalar_t, acc_t>(x + bh * N * Dh, t.start, t.size, Dh, key_valid + t.start,
                                                      t.all_valid, scratch);
            };
          };
          // (double: used in place, so each keeps its own scratch; kt and kp then hold the same rows)
          const acc_t* kt = valid_rows(k, kbuf.data())(ktile);  // read by dK; packed from here when not yet
          const acc_t *kp = nullptr, *vp = nullptr;
          const uint16_t *kp16 = nullptr, *vp16 = nullptr;
          if (bf16.on()) {
            kp16 = bf16.keys(bh, key_tiles, kti, k + bh * N * Dh, key_valid, true, 0);
            vp16 = bf16.keys(bh, key_tiles, kti, v + bh * N * Dh, key_valid, true, 1);
          } else {
            kp = key_panels.get(bh, key_tiles, kti, [kt](const Tile&) { return kt; });  // tile kti is ktile
            vp = value_panels.get(bh, key_tiles, kti, valid_rows(v, vbuf.data()));
          }
          // Row blocks: P and dS of a few query rows, then their share of dV, dQ and dK.
          for (int64_t i0 = 0; i0 < nr; i0 += row_block) {
            const int64_t nb = std::min(row_block, nr - i0);
            const acc_t* qb = qt + i0 * Dh;
            const acc_t* dob = dot + i0 * Dh;
            if constexpr (std::is_same_v<acc_t, float>) {
              if (bf16.on()) {
                bf16.scores(nb, nk, scale, q16 + i0 * Dh, kp16, scores.data(), ldS, nullptr);
                bf16.scores(nb, nk, 1.0f, do16 + i0 * Dh, vp16, dp.data(), ldS, nullptr);
              }
            }
            if (!bf16.on()) {
              gemm.scores(nb, nk, Dh, scale, qb, kp, scores.data(), ldS, nullptr);
              gemm.scores(nb, nk, Dh, acc_t(1), dob, vp, dp.data(), ldS, nullptr);
            }
            for (int64_t ib = 0; ib < nb; ++ib) {
              const int64_t i = i0 + ib;
              acc_t* s = scores.data() + ib * ldS;
              acc_t* dpi = dp.data() + ib * ldS;
              if (!qtile.all_valid && !key_valid[r0 + i]) {
                std::fill(s, s + nk, acc_t(0));
                std::fill(dpi, dpi + nk, acc_t(0));
                continue;
              }
              ops.backward_row(s, dpi, ktile.all_valid ? nullptr : key_mask + j0, nk, lse[i], delta[i],
                               dropout ? layout.col_hash.data() + j0 : nullptr, row_keys[i], threshold, inv_keep);
            }
            gemm.ptx(nb, nk, Dh, acc_t(1), scores.data(), ldS, dob, dV + j0 * Dh);
            gemm.pv(nb, Dh, nk, scale, dp.data(), ldS, kt, dQ + (r0 + i0) * Dh, nullptr);
            gemm.ptx(nb, nk, Dh, scale, dp.data(), ldS, qb, dK + j0 * Dh);
          }
        }
      }
      if (dq0rot != nullptr) std::copy_n(dQ, Dh, dq0rot + bh * Dh);
      if constexpr (convert) {
        store_rows(dQ, Nq * Dh, dq_out + bh * Nq * Dh);
        store_rows(dK, N * Dh, dk_out + bh * N * Dh);
        store_rows(dV, N * Dh, dv_out + bh * N * Dh);
      }
    }
  });
}

}  // namespace

void attention_backward(const Problem& p, const BackwardBuffers& buf) {
  dispatch_dtype(p.dtype, [&](auto tag) { backward_impl<decltype(tag)>(p, buf); });
}

}  // namespace rollingq
