// The namespace of header-defined inline code that the per-instruction-set
// units (csrc/cpu/) include: rollingq::ROLLINGQ_ISA_NS, an inline namespace
// named after the unit's CPU_CAPABILITY (DEFAULT, AVX2, AVX512) in those units
// and `base` everywhere else, the way ATen puts at::vec in
// at::vec::CPU_CAPABILITY. Each unit then emits its own copy under its own
// mangled name (rollingq::AVX2::mix32, rollingq::base::mix32, ...), so no
// linker, whatever order it sees the objects in, can hand code compiled with
// -mavx512f to the baseline. Callers write rollingq::mix32 as before.
//
// Include this before anything declares rollingq::DEFAULT / AVX2 / AVX512
// (float_row_ops.h does): the first declaration of an inline namespace must
// say `inline`.
#pragma once

#if defined(CPU_CAPABILITY)
#define ROLLINGQ_ISA_NS CPU_CAPABILITY
#else
#define ROLLINGQ_ISA_NS base
#endif

namespace rollingq {
inline namespace ROLLINGQ_ISA_NS {}
}  // namespace rollingq
