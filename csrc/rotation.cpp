// The class-query rotation of the op (docs/op.md, step 1) on CPU: q0rot =
// round(q0 @ R^T) before the attention, the chain rule dq0 = dq0rot @ R after
// the backward, and the class-query statistic. R is global (H*Dh, H*Dh) or per
// head (H, Dh, Dh), read in place even when it is a transposed view. Small
// GEMMs over fixed column blocks: bitwise the same for any thread count.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_kernels.h"
#include "float_row_ops.h"
#include "kernel_utils.h"

namespace rollingq {
namespace {

// Y = X @ A for B rows, A an n x n block of the rotation read in place: the
// rows of X and Y are n-element slices with leading dimension ld. A is mem^T
// when a_is_mem_transposed, else mem (mem row-major, n x n).
// Column blocks of Y are fixed (kColumnBlock) and run in parallel (when the
// product is large enough to be worth it), one serial call each (float: the
// per-level kernels of float_row_ops.h; double: BLAS): the result is bitwise
// the same for any thread count.
constexpr int64_t kColumnBlock = 64;
template <typename T>
void rows_times(const T* x, const T* mem, bool a_is_mem_transposed, int64_t rows, int64_t n, int64_t ld, T* y) {
  const int64_t blocks = (n + kColumnBlock - 1) / kColumnBlock;
  // a few rows times R: bound by reading R (n x n), so also split by its bytes, a thread per
  // kRotationBytesPerThread (about 40 us of one core's reads, more than waking a thread on idle cores)
  constexpr double kRotationBytesPerThread = 1 << 20;
  const double r_bytes = static_cast<double>(n * n) * sizeof(T);
  const int64_t workers = std::max(worker_count(2.0 * static_cast<double>(rows * n) * static_cast<double>(n),
                                                at::get_num_threads()),
                                   std::min<int64_t>(at::get_num_threads(),
                                                     static_cast<int64_t>(r_bytes / kRotationBytesPerThread)));
  at::parallel_for(0, blocks, (blocks + workers - 1) / workers, [&](int64_t i0, int64_t i1) {
    SerialBlasGuard serial_blas;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c0 = i * kColumnBlock, nc = std::min(kColumnBlock, n - c0);
      if constexpr (std::is_same_v<T, float>) {  // the per-level kernels: BLAS would pack R on every call
        const FloatRowOps& ops = float_row_ops();
        if (a_is_mem_transposed)  // Y[r, c0 + j] = X[r] . mem[c0 + j]: the block of mem rows stays in cache
          for (int64_t r = 0; r < rows; ++r)
            ops.dot_rows(x + r * ld, mem + c0 * n, nc, n, 1.0f, y + r * ld + c0, nullptr);
        else
          ops.gemm_nn(rows, nc, n, 1.0f, x, ld, mem + c0, n, y + c0, ld, nullptr, false);
      } else if (a_is_mem_transposed) {  // Y[:, c0:] = X @ mem[c0:, :]^T
        gemm(true, false, nc, rows, n, T(1), mem + c0 * n, n, x, ld, T(0), y + c0, ld);
      } else {  // Y[:, c0:] = X @ mem[:, c0:]
        gemm(false, false, nc, rows, n, T(1), mem + c0, n, x, ld, T(0), y + c0, ld);
      }
    }
  });
}

// Y (B, H*Dh) = X @ A for the global rotation, or X[:, h] @ A_h per head.
template <typename T>
void apply_rotation(const Problem& p, const T* x, const T* mem, bool a_is_mem_transposed, bool global, T* y) {
  const int64_t HD = p.H * p.Dh, Dh = p.Dh;
  if (global) {
    rows_times(x, mem, a_is_mem_transposed, p.B, HD, HD, y);
  } else {
    for (int64_t h = 0; h < p.H; ++h)
      rows_times(x + h * Dh, mem + h * Dh * Dh, a_is_mem_transposed, p.B, Dh, HD, y + h * Dh);
  }
}

// Gathers q[:, :, 0, :] into a (B, H*Dh) matrix of the compute dtype.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> gather_class_rows(const Problem& p, const scalar_t* q) {
  const int64_t HD = p.H * p.Dh;
  std::vector<acc_t> rows(p.B * HD);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t d = 0; d < p.Dh; ++d)
        rows[b * HD + h * p.Dh + d] = static_cast<acc_t>(q[((b * p.H + h) * p.Nq) * p.Dh + d]);
  return rows;
}

// True if no element of x (n,) is NaN or inf; a reduction the compiler vectorizes.
template <typename T>
bool all_finite(const T* x, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(std::abs(x[i]) <= std::numeric_limits<T>::max());
  return bad == 0;
}

template <typename scalar_t>
void rotate_impl(const Problem& p, const void* q_ptr, const Rotation& rotation, void* q0rot_ptr, float* query_stat) {
  using acc_t = acc_type<scalar_t>;
  const int64_t HD = p.H * p.Dh;
  const std::vector<acc_t> q0 = gather_class_rows<scalar_t, acc_t>(p, static_cast<const scalar_t*>(q_ptr));
  std::vector<acc_t> rotated(p.B * HD);
  // rows @ R^T: A = R^T is mem^T when the memory holds R, mem when it holds R^T
  apply_rotation(p, q0.data(), static_cast<const acc_t*>(rotation.data), !rotation.transposed, rotation.global,
                 rotated.data());
  // A NaN or inf in R reaches every rotated row, so checking the small result is
  // enough to know R is finite; R itself (up to H*Dh x H*Dh) is scanned only then.
  if (!all_finite(rotated.data(), p.B * HD)) {
    const int64_t r_size = rotation.global ? HD * HD : p.H * p.Dh * p.Dh;
    TORCH_CHECK_VALUE(all_finite(static_cast<const acc_t*>(rotation.data), r_size),
                      "rotation: expected finite values, got NaN or inf");
  }
  auto* q0rot = static_cast<scalar_t*>(q0rot_ptr);  // (B, H, Dh) == (B, H*Dh)
  for (int64_t i = 0; i < p.B * HD; ++i) {
    q0rot[i] = static_cast<scalar_t>(rotated[i]);
    if (query_stat) query_stat[i] = static_cast<float>(q0rot[i]);
  }
}

template <typename scalar_t>
void rotate_grad_impl(const Problem& p, const void* dq0rot, const Rotation& rotation, void* dq_ptr) {
  using acc_t = acc_type<scalar_t>;
  const int64_t HD = p.H * p.Dh, Dh = p.Dh;
  std::vector<acc_t> grad(p.B * HD);
  // rows @ R: A = R is mem when the memory holds R, mem^T when it holds R^T
  apply_rotation(p, static_cast<const acc_t*>(dq0rot), static_cast<const acc_t*>(rotation.data),
                 rotation.transposed, rotation.global, grad.data());
  auto* dq = static_cast<scalar_t*>(dq_ptr);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t d = 0; d < Dh; ++d)
        dq[((b * p.H + h) * p.Nq) * Dh + d] = static_cast<scalar_t>(grad[b * HD + h * Dh + d]);
}

}  // namespace

void rotate_class_query(const Problem& p, const void* q, const Rotation& rotation, void* q0rot, float* query_stat) {
  dispatch_dtype(p.dtype, [&](auto tag) { rotate_impl<decltype(tag)>(p, q, rotation, q0rot, query_stat); });
}

void class_query_stat(const Problem& p, const void* q, float* query_stat) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* src = static_cast<const scalar_t*>(q);
    for (int64_t bh = 0; bh < p.B * p.H; ++bh)
      for (int64_t d = 0; d < p.Dh; ++d) query_stat[bh * p.Dh + d] = static_cast<float>(src[bh * p.Nq * p.Dh + d]);
  });
}

void rotate_class_grad(const Problem& p, const void* dq0rot, const Rotation& rotation, void* dq) {
  dispatch_dtype(p.dtype, [&](auto tag) { rotate_grad_impl<decltype(tag)>(p, dq0rot, rotation, dq); });
}

}  // namespace rollingq
