// Registration of rollingq::attention_fwd / attention_bwd and their CPU
// implementations: argument checks (every message names the argument),
// contiguous copies, output allocation and the class-query rotation around the
// raw-pointer kernels of forward.cpp / backward.cpp. The schemas are those of
// rollingq_kernels/_library.py (FWD_SCHEMA, BWD_SCHEMA), the one definition;
// tests/test_cpp_kernels.py fails when the two differ.
//
// This unit uses LibTorch's stable ABI only (torch/csrc/stable: the C shims and
// header-only wrappers): the registration, the tensor handles and the few ATen
// ops it calls (new_empty, empty_like, copy_, to, transpose, contiguous) keep
// working across torch releases without a rebuild. TORCH_TARGET_VERSION below
// is the oldest torch it targets (pyproject's floor); torch's headers refuse
// c10/ATen includes in a unit that defines it, which keeps this unit honest.
// The kernels (forward.cpp, backward.cpp, rotation.cpp, csrc/cpu/) and the
// typed errors (errors.cpp) are compiled against c10/ATen; docs/install.md
// lists what they still use and why.
#ifndef TORCH_TARGET_VERSION
#define TORCH_TARGET_VERSION (((0ULL + 2) << 56) | ((0ULL + 11) << 48))  // torch 2.11
#endif
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "attention_kernels.h"
#include "errors.h"

namespace rollingq {
namespace {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Sizes = std::vector<int64_t>;

bool supported_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16 || t == ScalarType::Half;
}

// Sizes and lists printed as c10 prints an IntArrayRef: "[2, 3, 8]".
template <typename List>
std::string list_text(const List& list) {
  std::string text = "[";
  for (size_t i = 0; i < list.size(); ++i) text += (i ? ", " : "") + std::to_string(list[i]);
  return text + "]";
}

std::string shape_text(const Tensor& t) { return list_text(t.sizes()); }

// A device as c10 prints it ("cuda:0", "meta"), for the wrong-device message.
std::string device_text(const Tensor& t) {
  using torch::headeronly::DeviceType;
  const auto device = t.device();
  std::string name;
  switch (device.type()) {
    case DeviceType::CPU: name = "cpu"; break;
    case DeviceType::CUDA: name = "cuda"; break;
    case DeviceType::HIP: name = "hip"; break;
    case DeviceType::XPU: name = "xpu"; break;
    case DeviceType::MPS: name = "mps"; break;
    case DeviceType::Meta: name = "meta"; break;
    default: name = "device type " + std::to_string(static_cast<int>(device.type()));
  }
  return device.has_index() ? name + ":" + std::to_string(device.index()) : name;
}

bool same_sizes(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

// t itself when contiguous, else a contiguous copy. Every stable ATen call is a boxed dispatcher
// call (a few microseconds), so the common case asks the tensor only.
Tensor contiguous_of(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// Argument errors: ROLLINGQ_CHECK_VALUE (Python ValueError) for shapes, sizes
// and values, ROLLINGQ_CHECK_TYPE (TypeError) for dtypes, devices and undefined
// tensors (errors.h); every message starts with the argument's name.
void check_tensor(const Tensor& t, const char* name) {
  ROLLINGQ_CHECK_TYPE(t.defined(), name, ": expected a tensor, got an undefined one");
  ROLLINGQ_CHECK_TYPE(t.is_cpu(), name, ": the rollingq CPU kernels expect a CPU tensor, got device ",
                      device_text(t));
  ROLLINGQ_CHECK_VALUE(t.dim() == 4, name, ": expected a 4-d tensor (B, H, N, Dh), got shape ", shape_text(t));
  ROLLINGQ_CHECK_TYPE(supported_dtype(t.scalar_type()), name,
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
Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Sizes& segments,
                     const std::optional<Tensor>& lengths, const std::optional<Tensor>& rotation, double scale,
                     double dropout_p, int64_t seed) {
  check_tensor(q, "q");
  check_tensor(k, "k");
  check_tensor(v, "v");
  ROLLINGQ_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                      "q, k, v: expected one dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ",
                      v.scalar_type());
  ROLLINGQ_CHECK_VALUE(same_sizes(v, k), "v: expected the shape of k ", shape_text(k), ", got ", shape_text(v));
  Problem p;
  p.B = k.size(0);
  p.H = k.size(1);
  p.N = k.size(2);
  p.Dh = k.size(3);
  p.Nq = q.size(2);
  p.M = static_cast<int64_t>(segments.size());
  p.dtype = q.scalar_type();
  // B = 0 or H = 0 are fine: the ops return empty results, as SDPA does
  ROLLINGQ_CHECK_VALUE(p.Dh >= 1, "k: expected Dh >= 1, got shape ", shape_text(k));
  ROLLINGQ_CHECK_VALUE(q.size(0) == p.B && q.size(1) == p.H && q.size(3) == p.Dh && (p.Nq == p.N || p.Nq == 1),
                       "q: expected shape (", p.B, ", ", p.H, ", ", p.N, ", ", p.Dh, ") (all-query) or (", p.B,
                       ", ", p.H, ", 1, ", p.Dh, ") (class-only), got ", shape_text(q));
  ROLLINGQ_CHECK_VALUE(p.M >= 2, "segments: expected at least 2 modalities, got ", list_text(segments));
  p.offsets.assign(1, 1);
  for (int64_t m = 0; m < p.M; ++m) {
    ROLLINGQ_CHECK_VALUE(segments[m] >= 1 && segments[m] <= p.N, "segments: every padded size must be in [1, N = ",
                         p.N, "], got ", list_text(segments));
    p.offsets.push_back(p.offsets.back() + segments[m]);
  }
  ROLLINGQ_CHECK_VALUE(p.offsets.back() == p.N, "segments: N must equal 1 + sum(segments) = ", p.offsets.back(),
                       " for segments ", list_text(segments), ", but k has N = ", p.N);
  // N * Dh < 2**31 tested as N <= (2**31 - 1) / Dh, never by forming N * Dh: with B = 0 or H = 0
  // the tensors hold no elements, so N and Dh may be any int64 sizes and the product may overflow.
  ROLLINGQ_CHECK_VALUE(p.N <= (kMaxRowElements - 1) / p.Dh, "k: N * Dh must be below 2**31, got N * Dh = ", p.N,
                       " * ", p.Dh, " = ", row_elements_text(p.N, p.Dh), " for shape ", shape_text(k));
  if (lengths.has_value() && lengths->defined()) {
    const Tensor& len = *lengths;
    ROLLINGQ_CHECK_TYPE(len.scalar_type() == ScalarType::Long, "lengths: expected dtype int64, got ",
                        len.scalar_type());
    ROLLINGQ_CHECK_TYPE(len.is_cpu(), "lengths: expected a CPU tensor, got device ", device_text(len));
    ROLLINGQ_CHECK_VALUE(len.dim() == 2 && len.size(0) == p.B && len.size(1) == p.M, "lengths: expected shape (",
                         p.B, ", ", p.M, "), got ", shape_text(len));
  }
  if (rotation.has_value() && rotation->defined()) {
    const Tensor& r = *rotation;
    const int64_t hd = p.H * p.Dh;
    ROLLINGQ_CHECK_TYPE(r.scalar_type() == ScalarType::Float || r.scalar_type() == ScalarType::Double,
                        "rotation: expected float32 or float64, got ", r.scalar_type());
    ROLLINGQ_CHECK_TYPE(r.is_cpu(), "rotation: expected a CPU tensor, got device ", device_text(r));
    const bool global = r.dim() == 2 && r.size(0) == hd && r.size(1) == hd;
    const bool per_head = r.dim() == 3 && r.size(0) == p.H && r.size(1) == p.Dh && r.size(2) == p.Dh;
    ROLLINGQ_CHECK_VALUE(global || per_head, "rotation: expected shape (", hd, ", ", hd, ") (global) or (", p.H,
                         ", ", p.Dh, ", ", p.Dh, ") (per head), got ", shape_text(r));
  }
  ROLLINGQ_CHECK_VALUE(std::isfinite(scale), "scale: expected a finite float, got ", scale);
  ROLLINGQ_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected a float in [0, 1), got ",
                       dropout_p);
  ROLLINGQ_CHECK_VALUE(seed >= 0 && seed < (int64_t{1} << 31), "seed: expected an int in [0, 2**31), got ", seed);
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

// An uninitialized tensor on like's device, in like's dtype or the one given.
Tensor new_tensor(const Tensor& like, const Sizes& sizes, std::optional<ScalarType> dtype = std::nullopt) {
  return torch::stable::new_empty(like, torch::headeronly::IntHeaderOnlyArrayRef(sizes), dtype);
}

Tensor new_output(const Tensor& like, const Sizes& sizes) {
  Tensor t = new_tensor(like, sizes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_page_advice_enabled()) return t;
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.mutable_data_ptr());
  const uintptr_t lo = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t hi = (begin + static_cast<uintptr_t>(t.numel()) * t.element_size()) & ~(kHugePage - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // failure is harmless
#endif
  return t;
}

Sizes sizes_of(const Tensor& t) {
  const auto s = t.sizes();
  return Sizes(s.begin(), s.end());
}

// Contiguous int64 lengths with every value range-checked; undefined if absent.
Tensor checked_lengths(const std::optional<Tensor>& lengths, Problem& p) {
  if (!lengths.has_value() || !lengths->defined()) return Tensor();
  Tensor len = contiguous_of(*lengths);
  const int64_t* data = len.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t m = 0; m < p.M; ++m) {
      const int64_t cap = p.offsets[m + 1] - p.offsets[m];
      ROLLINGQ_CHECK_VALUE(data[b * p.M + m] >= 0 && data[b * p.M + m] <= cap,
                           "lengths: expected 0 <= lengths[b, m] <= segments[m]; lengths[", b, ", ", m, "] = ",
                           data[b * p.M + m], " with segments[", m, "] = ", cap);
    }
  p.lengths = data;
  return len;
}

// The kernels write contiguous results; the registered fakes promise
// empty_like(like) strides, so a non-contiguous `like` gets a strided copy.
Tensor with_strides_of(const Tensor& result, const Tensor& like) {
  if (like.is_contiguous()) return result;
  Tensor strided = torch::stable::empty_like(like);
  torch::stable::copy_(strided, result);
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
  const ScalarType c = p.dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor t = rotation->scalar_type() == c ? *rotation : torch::stable::to(*rotation, c);  // keeps the layout
  const int64_t last = t.dim() - 1;
  Tensor swapped = t.is_contiguous() ? Tensor() : torch::stable::transpose(t, last - 1, last);
  if (swapped.defined() && swapped.is_contiguous()) {
    r.storage = swapped;
    r.view.transposed = true;
  } else {
    r.storage = contiguous_of(t);
  }
  r.view.data = r.storage.const_data_ptr();
  r.view.global = r.storage.dim() == 2;
  return r;
}

// Outputs of attention_fwd, in schema order.
using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardResult attention_fwd_cpu(Tensor q, Tensor k, Tensor v, Sizes segments, std::optional<Tensor> lengths,
                                std::optional<Tensor> rotation, double scale, double dropout_p, int64_t seed,
                                bool compute_stats) {
  Problem p = make_problem(q, k, v, segments, lengths, rotation, scale, dropout_p, seed);
  const Tensor len = checked_lengths(lengths, p);
  const RotationInput rot = rotation_in_compute_dtype(rotation, p);
  const Tensor qc = contiguous_of(q), kc = contiguous_of(k), vc = contiguous_of(v);
  const ScalarType f32 = ScalarType::Float;
  const auto stat_sizes = [&](Sizes sizes) { return compute_stats ? sizes : Sizes{0}; };
  Tensor out = new_output(qc, sizes_of(qc));
  Tensor lse = new_tensor(qc, {p.B, p.H, p.Nq}, f32);
  Tensor key_mean = new_tensor(qc, stat_sizes({p.B, p.H, p.M, p.Dh}), f32);
  Tensor mass = new_tensor(qc, stat_sizes({p.B, p.H, p.M + 1}), f32);
  Tensor query = new_tensor(qc, stat_sizes({p.B, p.H, p.Dh}), f32);
  Tensor score_max = new_tensor(qc, stat_sizes({p.B, p.H}), f32);
  if (p.B * p.H == 0) return {with_strides_of(out, q), lse, key_mean, mass, query, score_max};  // empty, as SDPA
  float* query_stat = compute_stats ? query.mutable_data_ptr<float>() : nullptr;

  Tensor q0rot;
  if (rot.storage.defined()) {
    q0rot = new_tensor(qc, {p.B, p.H, p.Dh});
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

// A grad_out or out argument of attention_bwd: defined, on the CPU, with q's shape and dtype.
void check_like_q(const Tensor& t, const Tensor& q, const char* name) {
  ROLLINGQ_CHECK_TYPE(t.defined() && t.is_cpu(), name, ": expected a defined CPU tensor");
  ROLLINGQ_CHECK_VALUE(same_sizes(t, q), name, ": expected the shape of q ", shape_text(q), ", got ",
                       shape_text(t));
  ROLLINGQ_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), ", got ",
                      t.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,
                                                     Tensor lse, Sizes segments, std::optional<Tensor> lengths,
                                                     std::optional<Tensor> rotation, double scale,
                                                     double dropout_p, int64_t seed) {
  Problem p = make_problem(q, k, v, segments, lengths, rotation, scale, dropout_p, seed);
  check_like_q(grad_out, q, "grad_out");
  check_like_q(out, q, "out");
  ROLLINGQ_CHECK_TYPE(lse.defined() && lse.is_cpu(), "lse: expected a defined CPU tensor");
  ROLLINGQ_CHECK_TYPE(lse.scalar_type() == ScalarType::Float, "lse: expected dtype float32, got ",
                      lse.scalar_type());
  ROLLINGQ_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H && lse.size(2) == p.Nq,
                       "lse: expected shape (", p.B, ", ", p.H, ", ", p.Nq, "), got ", shape_text(lse));
  const Tensor len = checked_lengths(lengths, p);
  const RotationInput rot = rotation_in_compute_dtype(rotation, p);
  const Tensor qc = contiguous_of(q), kc = contiguous_of(k), vc = contiguous_of(v);
  const Tensor gc = contiguous_of(grad_out), oc = contiguous_of(out), lc = contiguous_of(lse);
  Tensor dq = new_output(qc, sizes_of(qc)), dk = new_output(kc, sizes_of(kc)), dv = new_output(vc, sizes_of(vc));
  if (p.B * p.H == 0) return {with_strides_of(dq, q), with_strides_of(dk, k), with_strides_of(dv, v)};

  Tensor q0rot, dq0rot;
  if (rot.storage.defined()) {
    q0rot = new_tensor(qc, {p.B, p.H, p.Dh});
    rotate_class_query(p, qc.const_data_ptr(), rot.view, q0rot.mutable_data_ptr(), nullptr);
    dq0rot = new_tensor(qc, {p.B, p.H, p.Dh}, rot.storage.scalar_type());
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

STABLE_TORCH_LIBRARY(rollingq, m) {
#if defined(TORCH_VERSION_2_13_0) && TORCH_FEATURE_VERSION >= TORCH_VERSION_2_13_0  // undefined before 2.13
  m.set_python_module("rollingq_kernels._library");  // where the fake kernels live (stable since torch 2.13)
#endif
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, int[] segments, Tensor? lengths, "
      "Tensor? rotation, float scale, float dropout_p, int seed, bool compute_stats) "
      "-> (Tensor out, Tensor lse, Tensor key_mean, Tensor mass, Tensor query, Tensor score_max)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int[] segments, Tensor? lengths, Tensor? rotation, float scale, float dropout_p, int seed) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

STABLE_TORCH_LIBRARY_IMPL(rollingq, CPU, m) {
  m.impl("attention_fwd", TORCH_BOX(&rollingq::attention_fwd_cpu));
  m.impl("attention_bwd", TORCH_BOX(&rollingq::attention_bwd_cpu));
}
