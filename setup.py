"""Build script: packages ``rollingq_kernels`` (top level) and ``rollingq`` (from
``python/``) and compiles the CPU kernels ``rollingq_kernels._C`` from ``csrc/``
with ninja through ``torch.utils.cpp_extension``.

Environment flags:

* ``ROLLINGQ_SKIP_EXTENSION=1`` — install without compiling; CPU calls then run
  the eager reference (the package says so once, with how to build).
* ``ROLLINGQ_NATIVE=0`` — do not pass ``-march=native`` (portable binaries).
* ``MAX_JOBS=N`` — parallel compile jobs (read by torch's ninja build).
* ``CXX`` — the C++ compiler to use (default ``c++``).

Build against the torch that will run the package: install torch first, then
``pip install --no-build-isolation -e .`` (an isolated build may compile against
a different torch than the one that ends up installed).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no", "off")


def _extension_setup() -> dict:
    if _flag("ROLLINGQ_SKIP_EXTENSION"):
        print("rollingq: ROLLINGQ_SKIP_EXTENSION is set; not compiling rollingq_kernels._C", file=sys.stderr)
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        sys.exit(
            "rollingq: building the C++ kernels needs torch installed first "
            f"({exc}). Install it (`pip install torch==2.14.1`), then run "
            "`pip install --no-build-isolation -e .`, or set ROLLINGQ_SKIP_EXTENSION=1."
        )
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        sys.exit(
            f"rollingq: no C++ compiler found (looked for `{cxx}` on PATH; set CXX to choose one). "
            "Install g++ (Debian/Ubuntu: `apt-get install g++`) or set ROLLINGQ_SKIP_EXTENSION=1 "
            "to install without the CPU kernels."
        )
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-DNDEBUG"]  # torch adds its own -std (C++20 for torch 2.14)
    if _flag("ROLLINGQ_NATIVE", "1"):
        cxx_flags.append("-march=native")
    ext = CppExtension(
        name="rollingq_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True, no_python_abi_suffix=False)},
    }


setup(
    packages=["rollingq_kernels"] + find_packages("python"),
    package_dir={"rollingq_kernels": "rollingq_kernels", "": "python"},
    **_extension_setup(),
)
