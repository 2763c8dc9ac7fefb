#!/usr/bin/env bash
# Download the wheels the GPU run (benchmarks/run_gpu.sh) installs when its machine image lacks them.
#
# The GPU image (H100/H200: torch 2.11, Triton 3.6, Python 3.12) reaches no package registry, so
# what the run needs beyond the image travels as wheels in the git-ignored folder .whl/ (carry
# it with the working tree). Run this once where pip reaches PyPI:
#
#   benchmarks/fetch_wheels.sh            # into .whl/
#   WHEEL_DIR=/tmp/w benchmarks/fetch_wheels.sh
#
# The wheels are pure Python (or built for CPython 3.12 on manylinux x86-64) and pinned, so the
# folder is the same wherever it is fetched. Together they are well under 2 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_DIR=${WHEEL_DIR:-.whl}
PYTHON=${PYTHON:-python3}

# What the run needs that the image may lack: the benchmark suite's pytest plugin (and its one
# dependency), and a setuptools new enough for pyproject.toml's license string (>= 77).
WHEELS=(
    "pytest-benchmark==5.3.1"
    "py-cpuinfo2==10.1.1"
    "setuptools==84.2.1"
)

mkdir -p "$WHEEL_DIR"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEEL_DIR" "${WHEELS[@]}"
ls -l "$WHEEL_DIR"
du -sh "$WHEEL_DIR"
