// The GEMM-rate probe of the benchmarks' CPU roofline (benchmarks/_timing.py): the forward's two
// tile GEMMs, S = Q K^T and O += S V, over independent (rows x keys, head_dim) tiles, by the
// kernels' own float32 GEMMs (tile_gemm.h) at the instruction-set level in use and torch's thread
// count. The benchmarks compare it with torch's batched GEMM of the same shapes and divide each
// provider's rate by the faster of the two.
#include "gemm_probe.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <vector>

#include "tile_gemm.h"

namespace rollingq {

double tile_gemm_seconds(int64_t tiles, int64_t rows, int64_t keys, int64_t head_dim, int64_t reps) {
  TORCH_CHECK_VALUE(tiles >= 1 && rows >= 1 && keys >= 1 && head_dim >= 1 && reps >= 1,
                    "tile_gemm_seconds: expected positive sizes, got tiles ", tiles, ", rows ", rows, ", keys ", keys,
                    ", head_dim ", head_dim, ", reps ", reps);
  const TileGemm<float> gemm;
  const int64_t ldS = gemm.padded_cols(keys), packed = gemm.packed_size(keys, head_dim);
  std::vector<float> q(tiles * rows * head_dim), k(keys * head_dim), v(tiles * keys * head_dim);
  std::vector<float> kp(tiles * packed), out(tiles * rows * head_dim, 0.0f);
  uint32_t state = 12345;  // small values in [-0.5, 0.5): no overflow over the repetitions
  auto next = [&state] {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / 16777216.0f - 0.5f;
  };
  for (float& x : q) x = next();
  for (float& x : v) x = next();
  for (int64_t t = 0; t < tiles; ++t) {  // keys packed once per tile, as the kernels pack once per (batch, head)
    for (float& x : k) x = next();
    gemm.pack(k.data(), keys, head_dim, kp.data() + t * packed);
  }
  double best = std::numeric_limits<double>::infinity();
  for (int64_t rep = 0; rep < reps; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> s(rows * ldS);
      for (int64_t t = begin; t < end; ++t) {
        gemm.scores(rows, keys, head_dim, 1.0f, q.data() + t * rows * head_dim, kp.data() + t * packed, s.data(), ldS,
                    nullptr);
        gemm.pv(rows, head_dim, keys, 1.0f, s.data(), ldS, v.data() + t * keys * head_dim,
                out.data() + t * rows * head_dim, nullptr);
      }
    });
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

}  // namespace rollingq
