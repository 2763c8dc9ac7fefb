"""Install-time flags of setup.py and the package's behaviour without the C++ kernels."""

from __future__ import annotations

import os
import platform
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def _extension_config(monkeypatch, **env):
    """setup.py's extension settings under `env` (setup.py imported, not run)."""
    for name in ("ROLLINGQ_SKIP_EXTENSION", "ROLLINGQ_NATIVE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    module = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    config = module["_extension_setup"]()
    return module, config["ext_modules"][0], config["cmdclass"]["build_ext"]


def test_default_build_is_portable_and_compiles_every_isa_unit(monkeypatch):
    module, ext, build_ext = _extension_config(monkeypatch)
    flags = ext.extra_compile_args["cxx"]
    assert "-march=native" not in flags and "-DROLLINGQ_MARCH_NATIVE=1" not in flags
    assert os.path.join("csrc", "cpu", "row_ops_default.cpp") in ext.sources  # baseline flags
    assert not any("avx" in src for src in ext.sources)  # built by build_ext with their own flags
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert module["ISA_FLAGS"]["avx2"] == ["-mavx2", "-mfma"]
        assert "-mavx512f" in module["ISA_FLAGS"]["avx512"]
        assert build_ext.isa_levels == module["ISA_FLAGS"]
        assert "-DROLLINGQ_X86_LEVELS=1" in flags  # the dispatcher offers the levels it is given
    assert any(c.__name__ == "BuildWithIsaUnits" for c in build_ext.__mro__)


@pytest.mark.parametrize("machine", ["x86_64", "AMD64", "aarch64", "arm64", "ppc64le"])
def test_x86_levels_macro_is_passed_exactly_when_the_avx_units_are_compiled(machine, monkeypatch):
    # csrc/cpu_capability.cpp offers AVX2 / AVX512 only under ROLLINGQ_X86_LEVELS=1: the build's
    # one decision (platform.machine()) sets both, so the dispatcher and the linked units agree.
    monkeypatch.setattr(platform, "machine", lambda: machine)
    _, ext, build_ext = _extension_config(monkeypatch)
    x86 = machine.lower() in ("x86_64", "amd64")
    assert sorted(build_ext.isa_levels) == (["avx2", "avx512"] if x86 else [])
    assert ("-DROLLINGQ_X86_LEVELS=1" in ext.extra_compile_args["cxx"]) == x86


def test_native_flag_opts_in_to_march_native(monkeypatch):
    _, ext, _ = _extension_config(monkeypatch, ROLLINGQ_NATIVE="1")
    assert {"-march=native", "-DROLLINGQ_MARCH_NATIVE=1"} <= set(ext.extra_compile_args["cxx"])


AARCH64_CXX = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.skipif(AARCH64_CXX is None, reason="no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", ["csrc/cpu/row_ops_default.cpp", "csrc/cpu_capability.cpp", "csrc/forward.cpp",
                                    "csrc/backward.cpp", "csrc/rotation.cpp", "csrc/ops.cpp"])
def test_baseline_units_compile_for_aarch64(source, tmp_path):
    # The DEFAULT level is plain C++ (ATen's Vectorized<float> is NEON there) and the dispatcher
    # knows no x86 level off x86: the portable part of the kernels builds for ARM.
    import torch

    include = Path(torch.__file__).parent / "include"
    res = subprocess.run(
        [AARCH64_CXX, "-std=c++20", "-O1", "-fopenmp", "-DNDEBUG", f"-I{ROOT / 'csrc'}", f"-I{include}", "-c",
         str(ROOT / source), "-o", str(tmp_path / "unit.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
