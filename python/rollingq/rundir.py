"""The run folder: its name, the refusal of a folder that holds another run, and ``--overwrite``."""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime

from .config import Config
from .records import checkpoint_path, run_files

logger = logging.getLogger("rollingq.train")

MAX_LISTED = 8


def make_run_dir(cfg: Config, run_dir: str | None) -> str:
    """``run_dir`` if given, else ``<out_dir>/<dataset>_<name>_<timestamp>``."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        label = f"{cfg.data.name}_{cfg.name}".replace("+", "_")
        run_dir = os.path.join(cfg.out_dir, f"{label}_{stamp}")
    return run_dir


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


def remove_run_files(run_dir: str) -> list[str]:
    """Remove the files of the run in ``run_dir`` (:func:`rollingq.records.run_files`); returns them."""
    removed = run_files(run_dir)
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if removed:
        logger.warning("--overwrite: removed the previous run's files in %s: %s", run_dir,
                       short_list([os.path.relpath(p, run_dir) for p in removed]))
    return removed

