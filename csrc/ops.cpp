// Registration of rollingq::attention_fwd / attention_bwd and their CPU
// implementations: argument checks (every message names the argument),
// contiguous copies, output allocation and the class-query rotation around the
// raw-pointer kernels of forward.cpp / backward.cpp. The schemas are those of
// rollingq_kernels/_library.py (FWD_SCHEMA, BWD_SCHEMA), the one definition;
// tests/test_cpp_kernels.py fails when the two differ.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <optional>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "attention_kernels.h"

namespace rollingq {
namespace {

using at::Tensor;

bool supported_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Argument errors: TORCH_CHECK_VALUE (Python ValueError) for shapes, sizes and
// values, TORCH_CHECK_TYPE (TypeError) for dtypes, devices and undefined
// tensors; every message starts with the argument's name.
void check_tensor(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK_TYPE(t.device().is_cpu(), name, ": the rollingq CPU kernels expect a CPU tensor, got device ",
                   t.device());
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected a 4-d tensor (B, H, N, Dh), got shape ", t.sizes());
  TORCH_CHECK_TYPE(supported_dtype(t.scalar_type()), name,
                   ": expected dtype float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

// N * Dh must stay below this bound (the rows of one (batch, head) are indexed
// with 32-bit BLAS leading dimensions and offsets).
constexpr int64_t kMaxRowElements = int64_t{1} << 31;

// N * Dh for the size error's message: the product where it fits in int64, else a bound.
std::string row_elements_text(int64_t n, int64_t dh) {
  return n <= std::numeric_limits<int64_t>::max() / dh ? std::to_string(n * dh) : std::string("more than 2**63");
}

// Checks every argument the two ops share and returns the call's sizes.
Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, c10::IntArrayRef segments,
                     const std::optional<Tensor>& lengths, const std::optional<Tensor>& rotation, double scale,
                     double dropout_p, int64_t seed) {
  check_tensor(q, "q");
  check_tensor(k, "k");
  check_tensor(v, "v");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "q, k, v: expected one dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  Problem p;
  p.B = k.size(0);
  p.H = k.size(1);
  p.N = k.size(2);
  p.Dh = k.size(3);
  p.Nq = q.size(2);
  p.M = static_cast<int64_t>(segments.size());
  p.dtype = q.scalar_type();
  // B = 0 or H = 0 are fine: the ops return empty results, as SDPA does
  TORCH_CHECK_VALUE(p.Dh >= 1, "k: expected Dh >= 1, got shape ", k.sizes());
  TORCH_CHECK_VALUE(q.size(0) == p.B && q.size(1) == p.H && q.size(3) == p.Dh && (p.Nq == p.N || p.Nq == 1),
                    "q: expected shape (", p.B, ", ", p.H, ", ", p.N, ", ", p.Dh, ") (all-query) or (", p.B, ", ", p.H,
                    ", 1, ", p.Dh, ") (class-only), got ", q.sizes());
  TORCH_CHECK_VALUE(p.M >= 2, "segments: expected at least 2 modalities, got ", segments);
  p.offsets.assign(1, 1);
  for (int64_t m = 0; m < p.M; ++m) {
    TORCH_CHECK_VALUE(segments[m] >= 1 && segments[m] <= p.N, "segments: every padded size must be in [1, N = ", p.N,
                      "], got ", segments);
    p.offsets.push_back(p.offsets.back() + segments[m]);
  }
  TORCH_CHECK_VALUE(p.offsets.back() == p.N, "segments: N must equal 1 + sum(segments) = ", p.offsets.back(),
                    " for segments ", segments, ", but k has N = ", p.N);
  // N * Dh < 2**31 tested as N <= (2**31 - 1) / Dh, never by forming N * Dh: with B = 0 or H = 0
  // the tensors hold no elements, so N and Dh may be any int64 sizes and the product may overflow.
  TORCH_CHECK_VALUE(p.N <= (kMaxRowElements - 1) / p.Dh, "k: N * Dh must be below 2**31, got N * Dh = ", p.N, " * ",
                    p.Dh, " = ", row_elements_text(p.N, p.Dh), " for shape ", k.sizes());
  if (lengths.has_value() && lengths->defined()) {
    const Tensor& len = *lengths;
    TORCH_CHECK_TYPE(len.scalar_type() == at::kLong, "lengths: expected dtype int64, got ", len.scalar_type());
    TORCH_CHECK_TYPE(len.device().is_cpu(), "lengths: expected a CPU tensor, got device ", len.device());
    TORCH_CHECK_VALUE(len.dim() == 2 && len.size(0) == p.B && len.size(1) == p.M, "lengths: expected shape (", p.B,
                      ", ", p.M, "), got ", len.sizes());
  }
  if (rotation.has_value() && rotation->defined()) {
    const Tensor& r = *rotation;
    const int64_t hd = p.H * p.Dh;
    TORCH_CHECK_TYPE(r.scalar_type() == at::kFloat || r.scalar_type() == at::kDouble,
                     "rotation: expected float32 or float64, got ", r.scalar_type());
    TORCH_CHECK_TYPE(r.device().is_cpu(), "rotation: expected a CPU tensor, got device ", r.device());
    const bool global = r.dim() == 2 && r.size(0) == hd && r.size(1) == hd;
    const bool per_head = r.dim() == 3 && r.size(0) == p.H && r.size(1) == p.Dh && r.size(2) == p.Dh;
    TORCH_CHECK_VALUE(global || per_head, "rotation: expected shape (", hd, ", ", hd, ") (global) or (", p.H, ", ",
                      p.Dh, ", ", p.Dh, ") (per head), got ", r.sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale: expected a finite float, got ", scale);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected a float in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(seed >= 0 && seed < (int64_t{1} << 31), "seed: expected an int in [0, 2**31), got ", seed);
  p.scale = scale;
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint32_t>(seed);
  return p;
}

// The kernels write their large outputs (out of all-query calls, dq, dk, dv)
// once, right after allocating them. With 4 KiB pages the first touch costs a
// page fault per 4 KiB: at B=64, N=373, Dh=768 the ~36k faults of dk and dv
// took longer than the backward itself. So ask Linux for transparent huge pages
// on the still untouched allocation, as torch's own allocator does under
// THP_MEM_ALLOC_ENABLE=1. Advice only: nothing changes where THP is disabled.
// ROLLINGQ_HUGE_PAGES=0 (read once per process) turns the advice off, e.g. where
// the kernel's compaction for huge pages would cost latency on a fragmented host.
bool huge_page_advice_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("ROLLINGQ_HUGE_PAGES");
    return value == nullptr || std::string(value) != "0";
  }();
  return enabled;
}

Tensor new_output(const Tensor& like, c10::IntArrayRef sizes) {
  Tensor t = like.new_empty(sizes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_page_advice_enabled()) return t;
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t hi = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // failure is harmless
#endif
  return t;
}

// Contiguous int64 lengths with every value range-checked; undefined if absent.
Tensor checked_lengths(const std::optional<Tensor>& lengths, Problem& p) {
  if (!lengths.has_value() || !lengths->defined()) return Tensor();
  Tensor len = lengths->contiguous();
  const int64_t* data = len.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t m = 0; m < p.M; ++m) {
      const int64_t cap = p.offsets[m + 1] - p.offsets[m];
      TORCH_CHECK_VALUE(data[b * p.M + m] >= 0 && data[b * p.M + m] <= cap,
                        "lengths: expected 0 <= lengths[b, m] <= segments[m]; lengths[", b, ", ", m,
                        "] = ", data[b * p.M + m], " with segments[", m, "] = ", cap);
    }
  p.lengths = data;
  return len;
}

// The kernels write contiguous results; the registered fakes promise
// empty_like(like) strides, so a non-contiguous `like` gets a strided copy.
Tensor with_strides_of(const Tensor& result, const Tensor& like) {
  if (like.is_contiguous()) return result;
  Tensor strided = at::empty_like(like);
  strided.copy_(result);
  return strided;
}

// The rotation in the compute dtype (float64 for float64 inputs, else float32),
// with the pointer the kernels read. A transposed view of a contiguous matrix
// (per head: of contiguous (Dh, Dh) blocks) is read in place, not copied.
struct RotationInput {
  Tensor storage;  // keeps the converted copy alive; undefined when there is no rotation
  Rotation view;
};

RotationInput rotation_in_compute_dtype(const std::optional<Tensor>& rotation, const Problem& p) {
  RotationInput r;
  if (!rotation.has_value() || !rotation->defined()) return r;
  const auto c = p.dtype == at::kDouble ? at::kDouble : at::kFloat;
  Tensor t = rotation->to(c);  // keeps the layout of a dense tensor
  if (!t.is_contiguous() && t.transpose(-2, -1).is_contiguous()) {
    r.storage = t.transpose(-2, -1);
    r.view.transposed = true;
  } else {
    r.storage = t.contiguous();
  }
  r.view.data = r.storage.const_data_ptr();
  r.view.global = r.storage.dim() == 2;
  return r;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_fwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, c10::IntArrayRef segments,
    const std::optional<Tensor>& lengths, const std::optional<Tensor>& rotation, double scale, double dropout_p,
    int64_t seed, bool compute_stats) {
  Problem p = make_problem(q, k, v, segments, lengths, rotation, scale, dropout_p, seed);
  const Tensor len = checked_lengths(lengths, p);
  const RotationInput rot = rotation_in_compute_dtype(rotation, p);
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto f32 = qc.options().dtype(at::kFloat);
  Tensor out = new_output(qc, qc.sizes());
  Tensor lse = qc.new_empty({p.B, p.H, p.Nq}, f32);
  Tensor key_mean = qc.new_empty(compute_stats ? c10::IntArrayRef({p.B, p.H, p.M, p.Dh}) : c10::IntArrayRef({0}), f32);
  Tensor mass = qc.new_empty(compute_stats ? c10::IntArrayRef({p.B, p.H, p.M + 1}) : c10::IntArrayRef({0}), f32);
  Tensor query = qc.new_empty(compute_stats ? c10::IntArrayRef({p.B, p.H, p.Dh}) : c10::IntArrayRef({0}), f32);
  Tensor score_max = qc.new_empty(compute_stats ? c10::IntArrayRef({p.B, p.H}) : c10::IntArrayRef({0}), f32);
  if (p.B * p.H == 0) return {with_strides_of(out, q), lse, key_mean, mass, query, score_max};  // empty, as SDPA
  float* query_stat = compute_stats ? query.mutable_data_ptr<float>() : nullptr;

  Tensor q0rot;
  if (rot.storage.defined()) {
    q0rot = qc.new_empty({p.B, p.H, p.Dh});
    rotate_class_query(p, qc.const_data_ptr(), rot.view, q0rot.mutable_data_ptr(), query_stat);
  } else if (compute_stats) {
    class_query_stat(p, qc.const_data_ptr(), query_stat);
  }
  ForwardBuffers buf;
  buf.q = qc.const_data_ptr();
  buf.k = kc.const_data_ptr();
  buf.v = vc.const_data_ptr();
  buf.q0rot = q0rot.defined() ? q0rot.const_data_ptr() : nullptr;
  buf.out = out.mutable_data_ptr();
  buf.lse = lse.mutable_data_ptr<float>();
  buf.key_mean = compute_stats ? key_mean.mutable_data_ptr<float>() : nullptr;
  buf.mass = compute_stats ? mass.mutable_data_ptr<float>() : nullptr;
  buf.score_max = compute_stats ? score_max.mutable_data_ptr<float>() : nullptr;
  attention_forward(p, buf);
  return {with_strides_of(out, q), lse, key_mean, mass, query, score_max};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cpu(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                     const Tensor& v, const Tensor& out, const Tensor& lse,
                                                     c10::IntArrayRef segments, const std::optional<Tensor>& lengths,
                                                     const std::optional<Tensor>& rotation, double scale,
                                                     double dropout_p, int64_t seed) {
  Problem p = make_problem(q, k, v, segments, lengths, rotation, scale, dropout_p, seed);
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    TORCH_CHECK_TYPE(t.defined() && t.device().is_cpu(), name, ": expected a defined CPU tensor");
    TORCH_CHECK_VALUE(t.sizes() == q.sizes(), name, ": expected the shape of q ", q.sizes(), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), ", got ",
                     t.scalar_type());
  }
  TORCH_CHECK_TYPE(lse.defined() && lse.device().is_cpu(), "lse: expected a defined CPU tensor");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse: expected dtype float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H && lse.size(2) == p.Nq,
                    "lse: expected shape (", p.B, ", ", p.H, ", ", p.Nq, "), got ", lse.sizes());
  const Tensor len = checked_lengths(lengths, p);
  const RotationInput rot = rotation_in_compute_dtype(rotation, p);
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const Tensor gc = grad_out.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  Tensor dq = new_output(qc, qc.sizes()), dk = new_output(kc, kc.sizes()), dv = new_output(vc, vc.sizes());
  if (p.B * p.H == 0) return {with_strides_of(dq, q), with_strides_of(dk, k), with_strides_of(dv, v)};

  Tensor q0rot, dq0rot;
  if (rot.storage.defined()) {
    q0rot = qc.new_empty({p.B, p.H, p.Dh});
    rotate_class_query(p, qc.const_data_ptr(), rot.view, q0rot.mutable_data_ptr(), nullptr);
    dq0rot = qc.new_empty({p.B, p.H, p.Dh}, qc.options().dtype(rot.storage.scalar_type()));
  }
  BackwardBuffers buf;
  buf.grad_out = gc.const_data_ptr();
  buf.q = qc.const_data_ptr();
  buf.k = kc.const_data_ptr();
  buf.v = vc.const_data_ptr();
  buf.out = oc.const_data_ptr();
  buf.lse = lc.const_data_ptr<float>();
  buf.q0rot = q0rot.defined() ? q0rot.const_data_ptr() : nullptr;
  buf.dq = dq.mutable_data_ptr();
  buf.dk = dk.mutable_data_ptr();
  buf.dv = dv.mutable_data_ptr();
  buf.dq0rot = dq0rot.defined() ? dq0rot.mutable_data_ptr() : nullptr;
  attention_backward(p, buf);
  if (rot.storage.defined()) rotate_class_grad(p, dq0rot.const_data_ptr(), rot.view, dq.mutable_data_ptr());
  return {with_strides_of(dq, q), with_strides_of(dk, k), with_strides_of(dv, v)};
}

}  // namespace
}  // namespace rollingq

TORCH_LIBRARY(rollingq, m) {
  m.set_python_module("rollingq_kernels._library");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, int[] segments, Tensor? lengths, "
      "Tensor? rotation, float scale, float dropout_p, int seed, bool compute_stats) "
      "-> (Tensor out, Tensor lse, Tensor key_mean, Tensor mass, Tensor query, Tensor score_max)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int[] segments, Tensor? lengths, Tensor? rotation, float scale, float dropout_p, int seed) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(rollingq, CPU, m) {
  m.impl("attention_fwd", &rollingq::attention_fwd_cpu);
  m.impl("attention_bwd", &rollingq::attention_bwd_cpu);
}
