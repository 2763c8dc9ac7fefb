"""Install-time flags of setup.py and the package's behaviour without the C++ kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_py(env_update: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_update}
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_skip_extension_flag_configures_no_extension():
    res = _setup_py({"ROLLINGQ_SKIP_EXTENSION": "1", "CXX": "no-such-compiler-rollingq"})
    assert res.returncode == 0, res.stderr
    assert "ROLLINGQ_SKIP_EXTENSION is set; not compiling rollingq_kernels._C" in res.stderr
    assert res.stdout.strip().splitlines()[-1] == "rollingq"


def test_missing_compiler_is_a_clear_error():
    res = _setup_py({"ROLLINGQ_SKIP_EXTENSION": "0", "CXX": "no-such-compiler-rollingq"})
    assert res.returncode != 0
    assert "no C++ compiler found (looked for `no-such-compiler-rollingq` on PATH" in res.stderr
    assert "ROLLINGQ_SKIP_EXTENSION=1" in res.stderr


_WITHOUT_EXTENSION = r"""
import builtins, logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
real_import = builtins.__import__
def no_extension(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 1 and fromlist and "_C" in fromlist and (globals or {}).get("__name__") == "rollingq_kernels._library":
        raise ImportError("simulated: not built")
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = no_extension
import torch, rollingq_kernels as rk
assert not rk.HAS_CPP
q = torch.randn(2, 2, 6, 4, dtype=torch.float64)
for _ in range(3):
    out, st = rk.rollingq_attention(q, q, q, (2, 3))
ref, _ = rk.rollingq_attention(q, q, q, (2, 3), backend="reference")
assert torch.equal(out, ref)
try:
    rk.rollingq_attention(q, q, q, (2, 3), backend="cpp")
except RuntimeError as exc:
    print("CPP-ERROR", exc)
"""


def test_without_the_extension_the_package_warns_once_and_runs_the_reference():
    res = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTENSION], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("the C++ CPU kernels are missing") == 1, res.stderr
    assert "pip install --no-build-isolation -e ." in res.stderr
    assert "CPP-ERROR backend='cpp': the C++ kernels are not built" in res.stdout
