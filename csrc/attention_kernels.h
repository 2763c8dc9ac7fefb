// Raw-pointer CPU kernels of the rollingq op (docs/op.md), shared by the two
// kernel translation units (forward.cpp, backward.cpp) and the registration
// glue (ops.cpp). This header deliberately avoids ATen's Tensor so the kernel
// units compile quickly: everything here is plain pointers and sizes.
//
// Layouts (all contiguous, row-major):
//   q        (B, H, Nq, Dh) scalar_t, Nq == N (all-query) or 1 (class-only)
//   k, v     (B, H, N, Dh)  scalar_t
//   out      (B, H, Nq, Dh) scalar_t
//   lse      (B, H, Nq)     float32
//   q0rot    (B, H, Dh)     scalar_t, the rotated class query (already rounded)
//   key_mean (B, H, M, Dh)  float32;  mass (B, H, M+1) float32;  score_max (B, H) float32
//   lengths  (B, M)         int64 or nullptr (every token valid)
#pragma once

// header-only (torch/headeronly): ops.cpp, a stable-ABI unit, includes this file too
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace rollingq {

// Sizes and scalar arguments of one call; segment offsets are precomputed.
struct Problem {
  int64_t B = 0, H = 0, Nq = 0, N = 0, Dh = 0, M = 0;
  std::vector<int64_t> offsets;  // M + 1 entries: start of each modality, then N
  const int64_t* lengths = nullptr;
  double scale = 1.0;
  double dropout_p = 0.0;
  uint32_t seed = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

// The operands both passes read, in p.dtype: q (B, H, Nq, Dh), k and v (B, H, N, Dh), and the rotated
// class query q0rot (B, H, Dh; nullptr: row 0 of q is used unrotated).
struct AttentionInputs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* q0rot = nullptr;
};

struct ForwardBuffers : AttentionInputs {
  void* out = nullptr;
  float* lse = nullptr;
  float* key_mean = nullptr;   // nullptr: statistics skipped
  float* mass = nullptr;
  float* score_max = nullptr;  // the class row's largest scaled score (with key_mean)
};

struct BackwardBuffers : AttentionInputs {
  const void* grad_out = nullptr;
  const void* out = nullptr;
  const float* lse = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // (B, H, Dh) in the compute dtype (double for float64, else float): receives
  // the gradient of the rotated class query when q0rot is given; dq row 0 is
  // then left for the caller to fill with the rotation's chain rule.
  void* dq0rot = nullptr;
};

// Forward pass: out, lse and (if key_mean != nullptr) the class-row statistics.
void attention_forward(const Problem& p, const ForwardBuffers& buf);

// Backward pass, deterministic: parallel over (batch, head) only.
void attention_backward(const Problem& p, const BackwardBuffers& buf);

// The class-query rotation R in the compute dtype (double for float64 inputs,
// else float). global: R is (H*Dh, H*Dh); per head: R is (H, Dh, Dh).
// transposed: the memory holds R^T row-major (each matrix), as for a
// transposed view of a contiguous matrix; read as is, never copied.
struct Rotation {
  const void* data = nullptr;
  bool global = true;
  bool transposed = false;
};

// q0rot[b] = round_to_dtype(q0[b] @ R^T), q0 being row 0 of q.
// query_stat (B, H, Dh) float32, optional: receives float(q0rot).
void rotate_class_query(const Problem& p, const void* q, const Rotation& rotation, void* q0rot, float* query_stat);

// Copies row 0 of q (unrotated) into query_stat (B, H, Dh) float32.
void class_query_stat(const Problem& p, const void* q, float* query_stat);

// dq[b, h, 0, :] = round_to_dtype(dq0rot[b] @ R), the rotation's chain rule.
void rotate_class_grad(const Problem& p, const void* dq0rot, const Rotation& rotation, void* dq);

}  // namespace rollingq
