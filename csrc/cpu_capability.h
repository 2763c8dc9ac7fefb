// Which vector instruction set the float row kernels (csrc/cpu/) run with,
// chosen at run time from the CPU's features the way ATen chooses its own
// kernels: ATEN_CPU_CAPABILITY=default|avx2|avx512 forces a level (read once
// per process, the same variable and values as ATen, so one setting forces
// both); otherwise the best level the CPU and OS support. No torch headers
// here: python_module.cpp includes this file too.
#pragma once

#include <vector>

namespace rollingq {

// Ordered: a CPU that runs a level runs every lower one.
enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// "default", "avx2", "avx512" (ATen's spelling in ATEN_CPU_CAPABILITY).
const char* capability_name(CpuCapability c);

// Parses one of the names above; false for anything else.
bool parse_capability(const char* name, CpuCapability* out);

// The levels this binary has kernels for and this CPU (and OS) can run, lowest first.
std::vector<CpuCapability> supported_capabilities();

// The level the kernels use now: on first use, ATEN_CPU_CAPABILITY if it names
// a supported level, else the best supported level (a forced level the CPU
// cannot run falls back to the best one, with a warning, where ATen would
// fault on an illegal instruction).
CpuCapability cpu_capability();

// Makes the kernels use `c` from now on (tests run every level in one
// process); throws c10::ValueError if `c` is not supported. Returns the
// previous level.
CpuCapability set_cpu_capability(CpuCapability c);

}  // namespace rollingq
