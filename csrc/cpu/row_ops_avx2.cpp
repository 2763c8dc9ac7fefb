// The float row kernels for the AVX2 level, compiled with -mavx2 -mfma
// (setup.py and CMakeLists.txt add the flags); see row_ops_impl.h.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "row_ops_impl.h"
