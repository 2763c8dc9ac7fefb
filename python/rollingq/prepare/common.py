"""What every preparer shares: running one job per clip (optionally in worker processes), collecting
failures into one error that names the files, and writing list files atomically."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm import tqdm

from ..data.common import DataError
from ..files import atomic_write_bytes

logger = logging.getLogger("rollingq.prepare")

MAX_LISTED = 5


def run_jobs(jobs: Sequence[Any], work: Callable[[Any], str | None], processes: int, what: str) -> list[str]:
    """Run ``work(job)`` for every job; return the problems (``"file: reason"``) it reported or raised.

    ``work`` returns None when done (or already done) and a problem string when the clip is bad;
    with ``processes > 1`` the jobs run in that many worker processes (``work`` must be a module-level
    function).
    """
    problems: list[str] = []
    show = sys.stderr.isatty()
    if processes > 1:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            results = pool.map(work, jobs, chunksize=4)
            for result in tqdm(results, total=len(jobs), desc=what, disable=not show):
                if result:
                    problems.append(result)
    else:
        for job in tqdm(jobs, desc=what, disable=not show):
            result = work(job)
            if result:
                problems.append(result)
    return problems


def check_problems(problems: list[str], skip_bad: bool, what: str) -> None:
    """Raise one :class:`DataError` listing the bad clips, or (``skip_bad``) log them."""
    if not problems:
        return
    listed = "; ".join(problems[:MAX_LISTED]) + (f"; … {len(problems) - MAX_LISTED} more" if len(problems) >
                                                  MAX_LISTED else "")
    if not skip_bad:
        raise DataError(f"{what}: {len(problems)} clip(s) could not be prepared: {listed} "
                        "(fix or remove them, or pass --skip-bad to leave them out of the lists)")
    logger.warning("%s: left out %d clip(s) that could not be prepared: %s", what, len(problems), listed)


def write_lines(path: str, lines: list[str]) -> None:
    """A UTF-8 text file of ``lines``, written atomically."""
    atomic_write_bytes(("\n".join(lines) + "\n").encode("utf-8"), path)


def clip_error(path: str, exc: BaseException) -> str:
    """``"path: Type: message"`` for a clip that failed."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{path}: {type(exc).__name__}: {message}"
