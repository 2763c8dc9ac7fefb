// Typed argument errors for the stable-ABI registration (ops.cpp).
//
// LibTorch's stable ABI has no typed errors: STD_TORCH_CHECK throws
// std::runtime_error, which Python sees as RuntimeError. The op's contract
// (docs/op.md, "Errors") promises ValueError for shapes, sizes and values and
// TypeError for dtypes and devices, as TORCH_CHECK_VALUE / TORCH_CHECK_TYPE
// give. So these two functions, defined in errors.cpp (a translation unit
// compiled against c10, like the kernel units), throw c10::ValueError and
// c10::TypeError. This header itself includes nothing of c10 or ATen, so the
// stable-ABI unit can include it.
#pragma once

#include <sstream>
#include <string>

namespace rollingq {

[[noreturn]] void throw_value_error(const std::string& message);
[[noreturn]] void throw_type_error(const std::string& message);

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  ((out << args), ...);
  return out.str();
}
}  // namespace detail

}  // namespace rollingq

// ROLLINGQ_CHECK_VALUE(cond, parts...): ValueError with the parts streamed into one message.
#define ROLLINGQ_CHECK_VALUE(cond, ...) \
  if (!(cond)) ::rollingq::throw_value_error(::rollingq::detail::concat(__VA_ARGS__))
// ROLLINGQ_CHECK_TYPE(cond, parts...): TypeError, likewise.
#define ROLLINGQ_CHECK_TYPE(cond, ...) \
  if (!(cond)) ::rollingq::throw_type_error(::rollingq::detail::concat(__VA_ARGS__))
