"""``PYTHONPATH`` for tests that run ``python -m rollingq`` in a child process.

From a source checkout the child finds the packages through the repository (``python/`` and the root).
When the tests run against an installed wheel (``ROLLINGQ_TEST_INSTALLED=1``, ``.ci/run``), the child
must import the same installed copy as the test process, not the source tree's ``rollingq_kernels``
(which has no compiled ``_C`` there), so nothing is prepended.
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_pythonpath(existing: str = "") -> str:
    """The ``PYTHONPATH`` a child process of the tests gets, given the one it would inherit."""
    if os.environ.get("ROLLINGQ_TEST_INSTALLED", "0") not in ("", "0"):
        return existing
    return os.pathsep.join([os.path.join(REPO, "python"), REPO, existing])
