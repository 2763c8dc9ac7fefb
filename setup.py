"""Build script: packages ``rollingq_kernels`` (top level) and ``rollingq`` (from
``python/``) and compiles the CPU kernels ``rollingq_kernels._C`` from ``csrc/``
with ninja through ``torch.utils.cpp_extension``.

Environment flags:

* ``ROLLINGQ_SKIP_EXTENSION=1`` — install without compiling; CPU calls then run
  the eager reference (the package says so once, with how to build).
* ``ROLLINGQ_NATIVE=1`` — compile everything with ``-march=native`` (a binary for
  this CPU only). Off by default: the float row kernels are compiled once per
  instruction set (``csrc/cpu/``: DEFAULT, and on x86-64 AVX2 and AVX512, each
  with its own flags, as ATen builds its kernels) and the fastest one the CPU
  runs is chosen at run time, so a default build is portable and fast.
* ``MAX_JOBS=N`` — parallel compile jobs (read by torch's ninja build).
* ``CXX`` — the C++ compiler to use (default ``c++``).

The extension is built for LibTorch's stable ABI where the code allows it
(``csrc/ops.cpp``: registration and glue) and for CPython's limited API
(``py_limited_api``: one ``_C.abi3.so`` for CPython >= 3.10), so one wheel
serves several torch and Python versions; ``docs/install.md`` lists the torch
versions measured and what still uses the unstable C++ API. The compiler's
OpenMP is probed (:func:`compiler_has_openmp`); without it (Apple clang) the
kernels are built without it and run on one thread, with a message at build time.
Build with ``pip install --no-build-isolation -e .`` or ``pip wheel
--no-build-isolation --no-deps .`` so that the build uses the torch installed
(an isolated build would first download torch into a temporary environment).
"""

from __future__ import annotations

import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The per-instruction-set translation units of the float row kernels and the
# flags each is compiled with (ATen's flags for its CPU_CAPABILITY builds). The
# DEFAULT one is compiled with the common flags; the others only on x86-64.
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _isa_source(level: str) -> str:
    return os.path.join("csrc", "cpu", f"row_ops_{level}.cpp")


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no", "off")


#: The oldest CPython whose limited API (abi3) the extension module targets; the wheel's tag.
PY_LIMITED_API = "cp310"

_OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def compiler_has_openmp(cxx: str) -> bool:
    """Whether ``cxx`` compiles and links a program with ``-fopenmp`` (Apple clang does not).

    ``cxx`` may hold arguments (``"ccache g++"``). The probe writes into a temporary folder only.
    """
    with tempfile.TemporaryDirectory(prefix="rollingq-omp-") as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write(_OPENMP_PROBE)
        cmd = shlex.split(cxx) + ["-fopenmp", source, "-o", os.path.join(tmp, "probe")]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _openmp_flags(cxx: str) -> list[str]:
    """``["-fopenmp"]`` when the compiler has OpenMP, else ``[]`` with a build-time message."""
    if compiler_has_openmp(cxx):
        return ["-fopenmp"]
    print(
        f"rollingq: the C++ compiler `{cxx}` has no OpenMP (-fopenmp failed), e.g. Apple clang; "
        "building the CPU kernels without it: they run on one thread. For threads, set CXX to a compiler "
        "with OpenMP (on macOS e.g. Homebrew's llvm clang++ with libomp).",
        file=sys.stderr,
    )
    return []


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
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + [_isa_source("default")]
    openmp = _openmp_flags(cxx)
    cxx_flags = ["-O3", "-DNDEBUG", *openmp]  # torch adds its own -std (C++20 for torch 2.14)
    if _flag("ROLLINGQ_NATIVE", "0"):
        cxx_flags += ["-march=native", "-DROLLINGQ_MARCH_NATIVE=1"]
    isa_units = {level: flags for level, flags in ISA_FLAGS.items() if X86_64}
    if isa_units:  # the dispatcher (cpu_capability.cpp) offers the x86 levels exactly when they are compiled
        cxx_flags.append("-DROLLINGQ_X86_LEVELS=1")
    ext = CppExtension(
        name="rollingq_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=list(openmp),
        py_limited_api=True,  # python_module.cpp uses CPython's limited API only: one _C.abi3.so
        # every file under csrc/: an edited header or ISA unit rebuilds the extension
        depends=sorted(glob.glob(os.path.join("csrc", "**", "*.[ch]*"), recursive=True)),
    )

    class BuildWithIsaUnits(BuildExtension):
        """torch's ninja build, plus the per-instruction-set units compiled with their own flags.

        torch's ninja file has one set of flags for every source, so each ISA unit is
        compiled by its own call (one small file each) and linked in after the
        baseline objects. Shared header code they include lives in a per-level inline
        namespace (csrc/isa_namespace.h), so no copy is shared whatever the link order.
        """

        isa_levels = isa_units  # level -> its flags: the ISA units this build compiles (tests read it)

        def build_extension(self, extension):
            base = list(extension.extra_compile_args["cxx"])  # with the flags torch added
            objects = []
            for level, flags in self.isa_levels.items():
                objects += self.compiler.compile(
                    [_isa_source(level)], output_dir=self.build_temp, include_dirs=extension.include_dirs,
                    extra_postargs={"cxx": base + flags}, depends=extension.depends,
                )
            extension.extra_objects = objects
            super().build_extension(extension)

        def run(self):
            super().run()
            if self.inplace:  # an editable build: an older _C.cpython-3xx-*.so would shadow the new _C.abi3.so
                built = os.path.abspath(self.get_ext_filename("rollingq_kernels._C"))  # relative to the project
                for stale in glob.glob(os.path.join("rollingq_kernels", "_C.*.so")):
                    if os.path.abspath(stale) != built:
                        print(f"rollingq: removing the stale {stale}", file=sys.stderr)
                        os.remove(stale)

    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildWithIsaUnits.with_options(use_ninja=True, no_python_abi_suffix=False)},
        "options": {"bdist_wheel": {"py_limited_api": PY_LIMITED_API}},
    }


#: Every package the wheel holds: rollingq_kernels with its subpackages (triton/) from the root, rollingq from python/.
PACKAGES = find_packages(include=["rollingq_kernels", "rollingq_kernels.*"]) + find_packages("python")

if __name__ == "__main__":  # setuptools' build backend runs this file as __main__ too; tests import it
    setup(
        packages=PACKAGES,
        package_dir={"rollingq_kernels": "rollingq_kernels", "": "python"},
        **_extension_setup(),
    )
