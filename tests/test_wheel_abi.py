"""The wheel's build: CPython's limited API, LibTorch's stable ABI for the glue, and no OpenMP where the
compiler has none (docs/install.md)."""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

import rollingq_kernels
from rollingq_kernels import _library

ROOT = Path(__file__).resolve().parents[1]

# Symbols of torch's unstable C++ API the built _C may use, by the unit that needs them (docs/install.md,
# "Stable ABI"). Everything else it takes from torch must be a stable C shim (aoti_torch_*, torch_*).
UNSTABLE_ALLOWED = {
    # at::parallel_for (ATen/Parallel.h) in the kernels: forward.cpp, backward.cpp, rotation.cpp, gemm_probe.cpp
    r"at::get_thread_num\(\)", r"at::get_num_threads\(\)", r"at::init_num_threads\(\)",
    r"at::in_parallel_region\(\)", r"at::internal::set_thread_num\(int\)", r"c10::ParallelGuard::.*",
    # typed errors (errors.cpp, rotation.cpp, cpu_capability.cpp) and TORCH_CHECK in the kernels
    r"c10::ValueError::ValueError\(.*", r"c10::TypeError::TypeError\(.*", r"c10::Error::.*",
    r"(typeinfo|vtable) for c10::(Error|ValueError|TypeError)", r"c10::detail::torchCheckFail\(.*",
    r"c10::detail::torchInternalAssertFail\(.*",
    # TORCH_WARN in cpu_capability.cpp and bf16_tiles.h (once, through a static: no TORCH_WARN_ONCE)
    r"c10::warn\(.*", r"c10::Warning::Warning\(.*",
}


def _setup_module(monkeypatch) -> dict:
    for name in ("ROLLINGQ_SKIP_EXTENSION", "ROLLINGQ_NATIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    copy = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    return copy["_extension_setup"].__globals__  # the namespace setup.py's functions read (run_path returns a copy)


def test_the_extension_module_uses_the_limited_api_and_the_wheel_is_abi3(monkeypatch):
    module = _setup_module(monkeypatch)
    config = module["_extension_setup"]()
    assert config["ext_modules"][0].py_limited_api
    assert config["options"]["bdist_wheel"]["py_limited_api"] == module["PY_LIMITED_API"] == "cp310"


@pytest.mark.parametrize("has_openmp", [False, True])
def test_without_openmp_the_kernels_build_serially_and_the_build_says_so(has_openmp, monkeypatch, capsys):
    module = _setup_module(monkeypatch)
    probed = []
    module["compiler_has_openmp"] = lambda cxx: probed.append(cxx) or has_openmp  # e.g. Apple clang: False
    monkeypatch.setenv("CXX", "c++")
    ext = module["_extension_setup"]()["ext_modules"][0]
    assert probed == ["c++"]
    assert ("-fopenmp" in ext.extra_compile_args["cxx"]) == has_openmp
    assert ("-fopenmp" in ext.extra_link_args) == has_openmp
    message = "the C++ compiler `c++` has no OpenMP (-fopenmp failed)"
    assert (message in capsys.readouterr().err) != has_openmp


def test_the_openmp_probe_compiles_with_the_given_compiler(monkeypatch):
    probe = _setup_module(monkeypatch)["compiler_has_openmp"]
    assert probe("no-such-compiler-rollingq") is False
    assert probe("false") is False  # a "compiler" that fails
    if shutil.which("g++"):
        assert probe("g++") is True  # GCC has OpenMP (libgomp)


@pytest.mark.skipif(not _library.HAS_CPP or shutil.which("nm") is None, reason="needs the built _C and nm")
def test_the_built_module_takes_from_torch_only_stable_shims_and_the_listed_gaps():
    so = Path(_library._C.__file__)
    out = subprocess.run(["nm", "-D", "--undefined-only", "-C", str(so)], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split(None, 1)[1].rsplit("@", 1)[0] for line in out.splitlines() if line.strip()]
    torch_cxx = [n for n in names if re.match(r"(typeinfo for |vtable for )?(c10|at|torch|caffe2)::", n)]
    unlisted = [n for n in torch_cxx if not any(re.fullmatch(p, n) for p in UNSTABLE_ALLOWED)]
    assert not unlisted, f"{so.name} uses torch C++ symbols outside the stable ABI and the listed gaps: {unlisted}"
    assert any(n.startswith(("aoti_torch_", "torch_")) for n in names)  # the registration goes through the shims
    assert so.name.endswith(".abi3.so"), so.name
    assert rollingq_kernels.HAS_CPP


def test_the_wheel_holds_every_package_of_both_trees(monkeypatch):
    # an editable install maps whole folders, so a subpackage missing here shows only in a wheel
    packages = set(_setup_module(monkeypatch)["PACKAGES"])
    found = {".".join(init.parent.relative_to(base).parts)
             for base, top in ((ROOT, "rollingq_kernels"), (ROOT / "python", "rollingq"))
             for init in (base / top).rglob("__init__.py")}
    assert "rollingq_kernels.triton" in found and "rollingq.models" in found
    assert found <= packages, found - packages
