"""bfloat16 in the C++ kernels (docs/op.md, "Backends"): the AVX512_BF16 tile GEMMs where the CPU and level have
them, else the float32 upcast, both within the documented bfloat16 tolerance; the upcast is said once per process
(checked in a child process, since "once" is per process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cpp_cases import CASES, STAT_FIELDS, check_reduced_precision
from subprocess_env import child_pythonpath

import rollingq_kernels
from rollingq_kernels import _library

pytestmark = pytest.mark.skipif(not rollingq_kernels.HAS_CPP, reason="rollingq_kernels._C (C++ kernels) not built")


def test_bfloat16_gets_the_avx512_bf16_kernels_exactly_where_the_cpu_has_them(cpu_level):
    # docs/op.md: the bfloat16 GEMMs at the AVX512 level on CPUs with AVX512_BF16, the float32 upcast elsewhere
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert _library._C._bf16_kernels() == (cpu_level == "avx512" and "avx512_bf16" in flags)


# odd head dim (bfloat16 pairs with a zero half), key tiles of odd sizes, empty and one-token modalities
BF16_CASES = {
    "aq-odd-dh": (2, 2, 17, (40, 1, 29), [[40, 1, 0], [3, 0, 29]], False, "global"),
    "aq-multi-tile-dh64": (1, 2, 64, (300, 333), [[211, 333]], False, "per_head"),
}


@pytest.mark.parametrize("name", sorted(BF16_CASES))
def test_bfloat16_within_tolerance_table_at_every_level(name, cpu_level, monkeypatch):
    # the bfloat16 tile GEMMs (AVX512_BF16) and the float32 upcast (other levels) both stay within the
    # documented bfloat16 tolerance: outputs, every gradient and the statistics
    monkeypatch.setitem(CASES, name, BF16_CASES[name])
    check_reduced_precision(name, torch.bfloat16, seed=5, stats=STAT_FIELDS, label=cpu_level, stat_atol=5e-5)


CHILD = """
import warnings
import torch
from rollingq_kernels import _C, rollingq_attention
_C._set_cpu_capability("default")  # no bfloat16 kernels at this level, whatever the CPU
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 2, 23, 16, generator=g).to(torch.bfloat16) for _ in range(3))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        rollingq_attention(q, k, v, [10, 12], backend="cpp")
print("python warnings:", sum("computed in float32 (upcast)" in str(w.message) for w in caught))
"""


def test_bfloat16_upcast_warns_once_per_process():
    env = dict(os.environ, PYTHONPATH=child_pythonpath(os.environ.get("PYTHONPATH", "")))
    env.pop("ATEN_CPU_CAPABILITY", None)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    # TORCH_WARN: a Python warning where the caller installed c10's Python handler, else c10's stderr log
    said = int(out.stdout.split("python warnings:")[1]) + out.stderr.count("computed in float32 (upcast)")
    assert said == 1, out.stdout + out.stderr
