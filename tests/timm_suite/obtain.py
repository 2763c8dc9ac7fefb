"""Get timm's own ``tests/test_models.py`` for the installed timm, from its source distribution on PyPI.

CI reaches PyPI but not GitHub, and timm's sdist ships its tests. The file is cached per version under
``$ROLLINGQ_CACHE`` (default ``~/.cache/rollingq``)/``timm-tests/<version>/``. ``ROLLINGQ_TIMM_TESTS`` may name a
``test_models.py`` to use instead (offline machines, a checkout of timm's repository).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TEST_FILE = "test_models.py"


class TimmTestsUnavailable(RuntimeError):
    """timm's test file could not be obtained (no network, no sdist for this version)."""


def cache_dir(version: str) -> Path:
    root = Path(os.environ.get("ROLLINGQ_CACHE", Path.home() / ".cache" / "rollingq"))
    return root / "timm-tests" / version


def _download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-deps", "--no-binary", ":all:",
           "--quiet", "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    archives = sorted(into.glob("timm-*.tar.gz"))
    if done.returncode != 0 or not archives:
        raise TimmTestsUnavailable(f"pip download timm=={version} (sdist) failed: {done.stderr.strip()[-500:]}")
    return archives[0]


def timm_test_file(version: str | None = None) -> Path:
    """The path of timm's ``tests/test_models.py`` for ``version`` (default: the installed timm)."""
    given = os.environ.get("ROLLINGQ_TIMM_TESTS")
    if given:
        path = Path(given)
        if not path.is_file():
            raise TimmTestsUnavailable(f"ROLLINGQ_TIMM_TESTS: expected a test_models.py, got {given!r}")
        return path
    if version is None:
        import timm

        version = timm.__version__
    target = cache_dir(version) / TEST_FILE
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download_sdist(version, Path(tmp))
        member = f"timm-{version}/tests/{TEST_FILE}"
        with tarfile.open(archive) as tar:
            try:
                data = tar.extractfile(member)
            except KeyError as exc:
                raise TimmTestsUnavailable(f"{archive.name} has no {member}") from exc
            text = data.read() if data is not None else b""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(text)
    partial.replace(target)
    logger.info("timm %s tests/%s cached at %s", version, TEST_FILE, target)
    return target
