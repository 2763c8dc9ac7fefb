// The GEMM-rate probe of the benchmarks' CPU roofline (gemm_probe.cpp), exposed by
// python_module.cpp as rollingq_kernels._C._tile_gemm_seconds.
#pragma once

#include <cstdint>

namespace rollingq {

// Seconds of the fastest of `reps` runs of S = Q K^T, O += S V (float32, the kernels' own tile
// GEMMs) over `tiles` independent tiles of `rows` queries, `keys` keys and `head_dim`, split over
// torch's threads by tile. 4 * tiles * rows * keys * head_dim flops per run.
double tile_gemm_seconds(int64_t tiles, int64_t rows, int64_t keys, int64_t head_dim, int64_t reps);

}  // namespace rollingq
