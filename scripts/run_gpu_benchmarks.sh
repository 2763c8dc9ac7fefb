#!/usr/bin/env bash
# The whole GPU benchmark suite in one command.
#
# Runs `pytest benchmarks/` on the CUDA device (bf16 and fp16; the paper's CREMA-D and
# Kinetics-Sounds fusion shapes at B=64, H=12, Dh=64, the single-head D=768 shapes, N=4096 and
# N=16384), writes benchmarks/results/<gpu-slug>-<date>.json and regenerates the tables in
# benchmarks/README.md from the results files. Extra arguments go to pytest, e.g.
#   scripts/run_gpu_benchmarks.sh --quick            # the smoke test on a GPU
#   scripts/run_gpu_benchmarks.sh -k "ks and fwd"    # a subset (the results file then holds only it)
# The exit status is pytest's: non-zero when a gate fails in a full run. Commit the results file
# and README afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu_benchmarks.sh: torch.cuda.is_available() is False; this script needs a CUDA GPU" >&2
    exit 2
fi
python -c "import triton" 2>/dev/null || { echo "run_gpu_benchmarks.sh: triton is not importable" >&2; exit 2; }

status=0
python -m pytest benchmarks/ --bench-device cuda --save-results -p no:cacheprovider \
    --benchmark-columns=min,median,max,rounds --benchmark-sort=name "$@" || status=$?
python -m benchmarks.update_readme
exit "$status"
