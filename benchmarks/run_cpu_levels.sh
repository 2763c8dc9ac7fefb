#!/usr/bin/env bash
# The CPU benchmark suite once per instruction-set level, then the README tables.
#
# Each run forces one level on the C++ kernels and ATen alike (ATEN_CPU_CAPABILITY)
# and on MKL (MKL_ENABLE_INSTRUCTIONS), and writes its own results file,
# benchmarks/results/<cpu>-<level>-<date>.json; a level below 1.0x SDPA fails its
# run's gates. Levels: LEVELS="avx512 avx2" by default where the CPU runs AVX-512
# (native first, then AVX2 forced), else the best level it runs.
#
#   bash benchmarks/run_cpu_levels.sh                 # every gated level, then update_readme
#   LEVELS=avx2 bash benchmarks/run_cpu_levels.sh     # one level
#   bash benchmarks/run_cpu_levels.sh --bench-note "quiet machine"   # extra pytest arguments
set -uo pipefail
cd "$(dirname "$0")/.."
supported=$(python -c "from rollingq_kernels import _C; print(' '.join(_C.supported_cpu_capabilities()))") || {
  echo "run_cpu_levels.sh: the C++ kernels are not built (pip install --no-build-isolation -e .)" >&2
  exit 2
}
default_levels=$(python - "$supported" <<'PY'
import sys
supported = sys.argv[1].split()
print(" ".join(level for level in ("avx512", "avx2") if level in supported) or supported[-1])
PY
)
status=0
for level in ${LEVELS:-$default_levels}; do
  case "$level" in
    avx512) mkl=AVX512 ;;
    avx2) mkl=AVX2 ;;
    *) mkl=SSE4_2 ;;
  esac
  echo "=== level $level (ATEN_CPU_CAPABILITY=$level MKL_ENABLE_INSTRUCTIONS=$mkl), load $(cut -d' ' -f1-3 /proc/loadavg)"
  # one TorchInductor cache per level (conftest.py explains why)
  ATEN_CPU_CAPABILITY=$level MKL_ENABLE_INSTRUCTIONS=$mkl \
    TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/torchinductor_$(id -un)_rollingq_$level" \
    python -m pytest benchmarks/ --bench-device cpu -q -p no:cacheprovider --benchmark-disable "$@" || status=1
done
python -m benchmarks.update_readme
exit $status
