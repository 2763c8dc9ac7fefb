"""Which ``rollingq_kernels`` the tests run against.

The package is imported here, before any test module, so that the copy found first on ``sys.path``
at the start is the one every test uses (some test modules put the repository root on ``sys.path``).
With ``ROLLINGQ_TEST_INSTALLED=1`` (CI's wheel run, ``.ci/run``) the session refuses to start unless
that copy is an installed one, not the source tree's, with its compiled ``_C``; the header line says
where it was loaded from either way.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cpp_cases import LEVELS  # the CPU levels the C++ kernels run here (none without them)

import rollingq_kernels

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "rollingq_kernels"  # the source tree's copy (an installed one may still live under ROOT, in a venv)
INSTALLED_ENV = "ROLLINGQ_TEST_INSTALLED"


def _loaded_from() -> Path:
    return Path(rollingq_kernels.__file__).resolve().parent


def pytest_report_header(config) -> str:
    where = _loaded_from()
    source = "the source tree" if where == SOURCE else "an installed copy"
    return f"rollingq_kernels: {where} ({source}); C++ kernels: {rollingq_kernels.HAS_CPP}"


def pytest_sessionstart(session) -> None:
    if os.environ.get(INSTALLED_ENV, "0") in ("", "0"):
        return
    where = _loaded_from()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # also under -q, which hides the header: the CI log shows what was tested
        reporter.write_line(pytest_report_header(session.config))
    if where == SOURCE or not rollingq_kernels.HAS_CPP:
        raise pytest.UsageError(
            f"{INSTALLED_ENV}=1: expected an installed rollingq_kernels (not {SOURCE}) with its C++ kernels, "
            f"got {where} (C++ kernels: {rollingq_kernels.HAS_CPP}); run pytest from outside the repository"
        )


@pytest.fixture(params=LEVELS)
def cpu_level(request):
    """Runs the test with the float row kernels of one instruction set, then restores the previous one."""
    from rollingq_kernels import _C

    previous = _C._set_cpu_capability(request.param)
    try:
        assert _C.cpu_capability() == request.param
        # the table the kernels now call was compiled for this level (its unit's CPU_CAPABILITY)
        assert _C._row_ops_level() == request.param
        yield request.param
    finally:
        _C._set_cpu_capability(previous)
