// The typed errors of errors.h: c10::ValueError and c10::TypeError, which
// PyTorch's Python bindings raise as ValueError and TypeError. This unit is
// compiled against c10 (no TORCH_TARGET_VERSION), as the kernel units are;
// c10's own TORCH_CHECK_VALUE / TORCH_CHECK_TYPE build the errors, so their
// layout is the running libc10's.
#include "errors.h"

#include <c10/util/Exception.h>

namespace rollingq {

void throw_value_error(const std::string& message) {
  TORCH_CHECK_VALUE(false, message);
  __builtin_unreachable();
}

void throw_type_error(const std::string& message) {
  TORCH_CHECK_TYPE(false, message);
  __builtin_unreachable();
}

}  // namespace rollingq
