// The float row kernels for the DEFAULT level: plain C++ compiled with the
// build's baseline flags, on every architecture (on aarch64 ATen's
// Vectorized<float> is NEON, which the baseline includes); see row_ops_impl.h.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "row_ops_impl.h"
