// The float row kernels for the AVX512 level, compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
// (setup.py and CMakeLists.txt add the flags); see row_ops_impl.h.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "row_ops_impl.h"
