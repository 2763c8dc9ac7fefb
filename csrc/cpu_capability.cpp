// Run-time choice of the float row kernels' instruction set (cpu_capability.h)
// and the table of the chosen level (row_ops.h).
#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "float_row_ops.h"

// The build defines ROLLINGQ_X86_LEVELS=1 exactly when it compiles the AVX2 and
// AVX512 units (setup.py, CMakeLists.txt), so the dispatcher never offers a
// level whose table is not linked in, and never misses one that is.
#ifndef ROLLINGQ_X86_LEVELS
#define ROLLINGQ_X86_LEVELS 0
#endif
#if ROLLINGQ_X86_LEVELS && !(defined(__x86_64__) || defined(_M_X64))
#error "ROLLINGQ_X86_LEVELS=1 (the AVX2 and AVX512 units) needs an x86-64 target"
#endif

namespace rollingq {
namespace {

bool cpu_runs(CpuCapability c) {
  switch (c) {
    case CpuCapability::kDefault:
      return true;
#if ROLLINGQ_X86_LEVELS && (defined(__GNUC__) || defined(__clang__))
    // ATen's conditions (aten/src/ATen/native/DispatchStub.cpp); __builtin_cpu_supports
    // also checks that the OS saves the vector registers (XCR0).
    case CpuCapability::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuCapability::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
#endif
    default:
      return false;
  }
}

CpuCapability best_supported() {
  const std::vector<CpuCapability> levels = supported_capabilities();
  return levels.back();
}

// ATEN_CPU_CAPABILITY, read as ATen reads it: exact lower-case names, an unknown
// value is ignored with a warning.
CpuCapability initial_capability() {
  const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
  if (forced == nullptr) return best_supported();
  CpuCapability c;
  if (!parse_capability(forced, &c)) {
    TORCH_WARN("rollingq: ignoring invalid value for ATEN_CPU_CAPABILITY: ", forced);
    return best_supported();
  }
  if (!cpu_runs(c)) {
    const CpuCapability best = best_supported();
    TORCH_WARN("rollingq: ATEN_CPU_CAPABILITY=", forced, " but this CPU cannot run ", forced,
               " kernels; the rollingq kernels use ", capability_name(best));
    return best;
  }
  return c;
}

std::atomic<int>& current_level() {
  static std::atomic<int> level{static_cast<int>(initial_capability())};
  return level;
}

}  // namespace

const char* capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::kAvx2:
      return "avx2";
    case CpuCapability::kAvx512:
      return "avx512";
    default:
      return "default";
  }
}

bool parse_capability(const char* name, CpuCapability* out) {
  for (CpuCapability c : {CpuCapability::kDefault, CpuCapability::kAvx2, CpuCapability::kAvx512}) {
    if (std::strcmp(name, capability_name(c)) == 0) {
      *out = c;
      return true;
    }
  }
  return false;
}

std::vector<CpuCapability> supported_capabilities() {
  std::vector<CpuCapability> levels;
  for (CpuCapability c : {CpuCapability::kDefault, CpuCapability::kAvx2, CpuCapability::kAvx512})
    if (cpu_runs(c)) levels.push_back(c);
  return levels;
}

CpuCapability cpu_capability() { return static_cast<CpuCapability>(current_level().load(std::memory_order_relaxed)); }

CpuCapability set_cpu_capability(CpuCapability c) {
  TORCH_CHECK_VALUE(cpu_runs(c), "cpu_capability: this CPU (or build) cannot run ", capability_name(c),
                    " kernels");
  return static_cast<CpuCapability>(current_level().exchange(static_cast<int>(c)));
}

const FloatRowOps& float_row_ops() {
  switch (cpu_capability()) {
#if ROLLINGQ_X86_LEVELS
    case CpuCapability::kAvx512:
      return AVX512::float_row_ops();
    case CpuCapability::kAvx2:
      return AVX2::float_row_ops();
#endif
    default:
      return DEFAULT::float_row_ops();
  }
}

}  // namespace rollingq
