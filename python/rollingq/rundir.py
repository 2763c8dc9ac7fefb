"""The run folder: its name, its lock, the refusal of a folder that holds another run, and ``--overwrite``
(which removes what the folder's manifest says rollingq wrote, nothing else)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import torch

from . import distributed
from .config import Config
from .files import TEMPORARY
from .records import (
    CHECKPOINT_DIR,
    CHECKPOINT_NAMES,
    CONFIG_FILENAME,
    LOG_FILENAME,
    MANIFEST_FILENAME,
    METRICS_FILENAME,
    TENSORBOARD_DIR,
    checkpoint_path,
    recorded_files,
    run_files,
)
from .runlock import RunLock, RunLockedError

logger = logging.getLogger("rollingq.train")

MAX_LISTED = 8


def make_run_dir(cfg: Config, run_dir: str | None) -> str:
    """``run_dir`` if given, else ``<out_dir>/<dataset>_<name>_<timestamp>``."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        label = f"{cfg.data.name}_{cfg.name}".replace("+", "_")
        run_dir = os.path.join(cfg.out_dir, f"{label}_{stamp}")
    return run_dir


def _missing_folders(path: str) -> list[str]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


@contextmanager
def claimed(run_dir: str, what: str, info: distributed.DistInfo) -> Iterator[RunLock | None]:
    """Hold ``run_dir`` for one run: create it if missing and take its lock (:class:`~rollingq.runlock.RunLock`,
    main process; every process of a ``torchrun`` launch learns whether it got it). On the way out the lock
    is released, and folders this call created are removed again when nothing was written into them (a run
    that cannot start leaves nothing behind).

    Raises:
        RunLockedError: another process holds the folder (the message names its pid).
    """
    created: list[str] = []
    lock, failure = None, None
    if info.is_main:
        created = _missing_folders(run_dir)
        try:
            os.makedirs(run_dir, exist_ok=True)
            lock = RunLock(run_dir, what)
        except (RunLockedError, OSError) as exc:
            failure = exc
    if info.distributed:
        failed = distributed.all_reduce_sum(torch.tensor([float(failure is not None)], device=info.device))
        if float(failed.sum()) and failure is None:
            failure = RunLockedError(f"{what}: the main process could not take the lock of {run_dir!r}")
    try:
        if failure is not None:
            raise failure
        yield lock
    finally:
        if lock is not None:
            lock.release()
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def short_list(items: list[str]) -> str:
    more = f", … {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def check_run_dir_free(run_dir: str, overwrite: bool) -> list[str]:
    """Refuse ``run_dir`` if it holds a run's files, unless ``overwrite``; returns those files.

    Raises:
        FileExistsError: naming the files, and ``--resume`` when the folder holds a checkpoint.
    """
    existing = run_files(run_dir)
    if existing and not overwrite:
        names = short_list([os.path.relpath(p, run_dir) for p in existing])
        if os.path.exists(checkpoint_path(run_dir, "last")):
            raise FileExistsError(
                f"--out: {run_dir!r} already holds a run (checkpoints/last.pt; {names}); continue it with "
                f"`rollingq train --resume {run_dir}`, choose another folder, or replace it with --overwrite"
            )
        raise FileExistsError(
            f"--out: {run_dir!r} holds another run's files ({names}); choose another folder, or replace "
            "that run with --overwrite (its files are removed first)"
        )
    return existing


TRAINING_FILES = [CONFIG_FILENAME, METRICS_FILENAME, LOG_FILENAME, TENSORBOARD_DIR,
                  *(f"{CHECKPOINT_DIR}/{name}.pt" for name in CHECKPOINT_NAMES)]
"""What ``rollingq train`` writes into a run folder (recorded in its manifest before the first write)."""


def _temporaries(path: str) -> list[str]:
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if (m := TEMPORARY.match(n)) and m["target"] == name]


def remove_run_files(run_dir: str) -> list[str]:
    """Remove what rollingq wrote in ``run_dir``: the paths of its manifest (:func:`rollingq.records.recorded_files`;
    a recorded folder with all it holds), their temporaries and the manifest itself, then folders left empty.
    A folder without a manifest (written before it existed) falls back to the fixed names of
    :func:`rollingq.records.run_files`. Nothing else is touched; returns the removed paths."""
    entries = recorded_files(run_dir)
    if entries:
        targets = [os.path.join(run_dir, *e.split("/")) for e in entries]
        targets += [t for path in targets for t in _temporaries(path)]
        targets.append(os.path.join(run_dir, MANIFEST_FILENAME))
    else:
        targets = run_files(run_dir)
    removed = []
    for path in targets:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(path)
    folders = sorted({os.path.dirname(p) for p in targets} - {os.path.normpath(run_dir), run_dir}, reverse=True)
    for folder in folders:
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    if removed:
        logger.warning("--overwrite: removed the previous run's files in %s: %s", run_dir,
                       short_list([os.path.relpath(p, run_dir) for p in removed]))
    return removed
