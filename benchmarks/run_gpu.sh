#!/usr/bin/env bash
# The whole GPU run in one command, for an H100/H200 machine image with torch and Triton
# preinstalled and no package registry. Everything it writes goes under $OUT (at most 8 files):
#
#   env.txt          GPU, driver, Python, torch, Triton, the pip list
#   setup.log        1. what the image lacks, installed from the wheels in .whl/ (no registry;
#                       fetch them once where pip works: benchmarks/fetch_wheels.sh), then
#                       `pip install --no-deps --no-build-isolation -e .` (C++ extension only
#                       with BUILD_CPP=1: the GPU run measures the Triton kernels)
#   warm.log         2. Triton's cache filled in parallel (python -m benchmarks.gpu_plan warm)
#   tests.log/.xml   3. the CUDA tests (tests/test_triton_cuda.py, the GPU half of
#                       tests/test_triton_kernels.py), fixed configurations (no autotuning)
#   bench.log        4. the GPU benchmark suite: bf16, fwd and fwd+bwd, every GPU shape, every
#   <gpu>-<date>.json   provider (SDPA flash and cuDNN, FlexAttention); the plan is
#                       benchmarks/gpu_plan.py, extra arguments go to that pytest run
#   summary.txt      each step's status and time
#
# The run keeps to a deadline (DEADLINE_S, default 480 s = 8 minutes): each step has a share
# and the benchmarks get what is left; they are interrupted (SIGINT, so pytest still writes
# its results file) at the deadline. The exit status is 0 only if every step passed.
#
#   OUT=/tmp/out benchmarks/run_gpu.sh             # the run
#   benchmarks/run_gpu.sh --dry-run                # no GPU needed: checks and lists the plan
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
OUT=${OUT:-benchmarks/results/gpu-run-$(date +%Y%m%d-%H%M%S)}
DEADLINE_S=${DEADLINE_S:-480}
WHEEL_DIR=${WHEEL_DIR:-.whl}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=0
: > "$OUT/summary.txt"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE_S - $(elapsed) )); }
note() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }
# step NAME LIMIT_S LOG CMD...: run CMD with a time limit (SIGINT first), log to LOG, note the outcome
step() {
    local name=$1 limit=$2 log=$3 t0 rc
    shift 3
    if (( limit < 5 )); then
        note "SKIP $name: only ${limit}s of the ${DEADLINE_S}s budget left"
        FAILED=1
        return 1
    fi
    t0=$(date +%s)
    printf '\n=== %s (limit %ss) ===\n' "$name" "$limit" >> "$log"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    if (( rc == 0 )); then
        note "ok   $name ($(( $(date +%s) - t0 ))s)"
    else
        note "FAIL $name: exit $rc after $(( $(date +%s) - t0 ))s (log: $(basename "$log"))"
        FAILED=1
    fi
    return $rc
}

# ----------------------------------------------------------------------------- 0. environment
{
    echo "date: $(date -u +%FT%TZ)"; echo "host: $(hostname)"; echo "git: $(git rev-parse HEAD 2>/dev/null)"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF' 2>&1
import platform, sys
print("python", sys.version.replace("\n", " "), platform.machine())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
except Exception as exc:
    print("torch: not importable:", exc)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
EOF
    "$PYTHON" -m pip list 2>/dev/null
} > "$OUT/env.txt"
note "run_gpu.sh: OUT=$OUT, deadline ${DEADLINE_S}s, $(grep -E '^(torch|triton|gpu) ' "$OUT/env.txt" | tr '\n' ';')"

# ----------------------------------------------------------------------------- 1. setup
NEEDED=("setuptools>=77" "pytest-benchmark")
if (( DRY_RUN )); then
    step "the wheels in $WHEEL_DIR install on CPython 3.12 (pip --dry-run)" 120 "$OUT/setup.log" \
        "$PYTHON" -m pip install --dry-run --ignore-installed --no-deps --no-index --find-links "$WHEEL_DIR" \
        --python-version 3.12 --only-binary=:all: --target /tmp/rollingq-dry-run "${NEEDED[@]}" py-cpuinfo2
    for w in "$WHEEL_DIR"/*.whl; do  # their dependencies beyond each other: pytest (in the image)
        unzip -p "$w" '*.dist-info/METADATA' | awk '/^$/ {exit} /^Requires-Dist/ && !/extra ==/' \
            | sed "s|^|$(basename "$w"): |"
    done >> "$OUT/setup.log" 2>&1
    step "sources compile" 120 "$OUT/setup.log" "$PYTHON" -m compileall -q rollingq_kernels benchmarks tests
    step "shell syntax" 10 "$OUT/setup.log" bash -n benchmarks/run_gpu.sh
    step "benchmark plan and warm-up list" 300 "$OUT/setup.log" "$PYTHON" -m benchmarks.gpu_plan dry-run
    ROLLINGQ_COLLECT_ONLY=1 step "CUDA tests collect" 300 "$OUT/tests.log" \
        "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider tests/test_triton_cuda.py tests/test_triton_kernels.py \
        tests/test_triton_launch.py
    grep -E "tests? collected|error" "$OUT/tests.log" | tee -a "$OUT/summary.txt"
    exit $FAILED
fi
step "install what the image lacks from $WHEEL_DIR" 60 "$OUT/setup.log" \
    "$PYTHON" -m pip install --no-index --find-links "$WHEEL_DIR" "${NEEDED[@]}"
if [[ "${BUILD_CPP:-0}" == "1" ]]; then
    export MAX_JOBS=${MAX_JOBS:-$JOBS}
else
    export ROLLINGQ_SKIP_EXTENSION=1
fi
step "pip install --no-deps --no-build-isolation -e ." 120 "$OUT/setup.log" \
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e .

# ----------------------------------------------------------------------------- 2. Triton cache
step "warm Triton's cache ($JOBS processes)" $(( $(left) < 100 ? $(left) : 100 )) "$OUT/warm.log" \
    "$PYTHON" -m benchmarks.gpu_plan warm --jobs "$JOBS"

# ----------------------------------------------------------------------------- 3. CUDA tests
# tests/test_triton_cuda.py, then the contract tests of tests/test_triton_kernels.py and _launch.py on the GPU
# (padding never read, empty batches, launcher errors, negative scale); fixed configurations
TESTS_LIMIT=$(( $(left) - 190 ))
TESTS_LIMIT=$(( TESTS_LIMIT > 150 ? 150 : TESTS_LIMIT ))
ROLLINGQ_TRITON_AUTOTUNE=0 step "CUDA tests" "$TESTS_LIMIT" "$OUT/tests.log" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs --junitxml="$OUT/tests.xml" tests/test_triton_cuda.py
ROLLINGQ_TRITON_AUTOTUNE=0 step "contract tests on the GPU" $(( $(left) < 200 ? $(left) - 160 : 40 )) \
    "$OUT/tests.log" "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs tests/test_triton_kernels.py \
    tests/test_triton_launch.py -k "padded or empty or launcher or negative or alias or deterministic"

# ----------------------------------------------------------------------------- 4. benchmarks
mapfile -t BENCH_IDS < <("$PYTHON" -m benchmarks.gpu_plan bench-ids)
note "benchmark plan: ${#BENCH_IDS[@]} cases"
step "GPU benchmark suite" $(( $(left) - 10 )) "$OUT/bench.log" \
    "$PYTHON" -m pytest -q -p no:cacheprovider --bench-device cuda --results-dir "$OUT" \
    --benchmark-columns=min,median,max,rounds --benchmark-sort=name "${BENCH_IDS[@]}" "$@"

note "done in $(elapsed)s; exit $FAILED"
exit $FAILED
