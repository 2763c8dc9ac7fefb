"""bfloat16 on a level without the AVX512_BF16 kernels (docs/op.md, "Backends"): the inputs are upcast to
float32 and the first such call says so, once per process. A child process, since "once" is per process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from subprocess_env import child_pythonpath

from rollingq_kernels import _library

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


@pytest.mark.skipif(not _library.HAS_CPP, reason="needs the C++ kernels")
def test_bfloat16_upcast_warns_once_per_process():
    env = dict(os.environ, PYTHONPATH=child_pythonpath(os.environ.get("PYTHONPATH", "")))
    env.pop("ATEN_CPU_CAPABILITY", None)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    # TORCH_WARN: a Python warning where the caller installed c10's Python handler, else c10's stderr log
    said = int(out.stdout.split("python warnings:")[1]) + out.stderr.count("computed in float32 (upcast)")
    assert said == 1, out.stdout + out.stderr
