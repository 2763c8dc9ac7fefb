"""What every preparer shares: running one job per clip (optionally in worker processes), collecting
failures into one error that names the files, and writing list files atomically."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm import tqdm

from ..data.common import DataError
from ..files import atomic_write_bytes

logger = logging.getLogger("rollingq.prepare")

MAX_LISTED = 5


def check_separate_folders(raw: str, out: str) -> None:
    """Refuse an output folder that is the input folder, lies inside it, or holds it (symlinks resolved).

    A preparer writes files named like the release's own (``AudioWAV/<clip>.wav``), so writing into
    the input would overwrite the release in place. Called before anything is read or written.

    Raises:
        ValueError: naming ``OUT`` and ``RAW`` and how they overlap.
    """
    real_raw, real_out = os.path.realpath(raw), os.path.realpath(out)
    if real_raw == real_out:
        how = "is the same folder as"
    elif os.path.commonpath([real_raw, real_out]) == real_raw:
        how = "lies inside"
    elif os.path.commonpath([real_raw, real_out]) == real_out:
        how = "holds"
    else:
        return
    raise ValueError(f"OUT: {out!r} {how} RAW {raw!r} (resolved: {real_out} and {real_raw}); the prepared files "
                     "would overwrite or mix with the release: choose an OUT folder outside RAW")


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


def check_problems(problems: list[str], skip_bad: bool, what: str, total: int | None = None) -> None:
    """Raise one :class:`DataError` listing the bad clips, or (``skip_bad``) log them.

    With ``skip_bad``, a run in which every one of ``total`` clips failed is still an error: nothing
    was prepared, and an empty dataset must not look like a success.
    """
    if not problems:
        return
    listed = "; ".join(problems[:MAX_LISTED]) + (f"; … {len(problems) - MAX_LISTED} more" if len(problems) >
                                                  MAX_LISTED else "")
    if skip_bad and total is not None and len(problems) >= total:
        raise DataError(f"{what}: every clip ({total}) failed, nothing was prepared (--skip-bad leaves bad clips "
                        f"out, but none was good): {listed}")
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
