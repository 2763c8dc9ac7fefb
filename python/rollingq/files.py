"""Atomic file writes: a crash leaves the old file or the new one, never a torn one.

:func:`atomic_write_bytes` writes to a temporary file in the target's folder,
flushes and fsyncs it, then renames it over the target and fsyncs the folder.
"""

from __future__ import annotations

import os
import shutil


def fsync_dir(path: str) -> None:
    """fsync a folder (its entries: a rename in it becomes durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(data: bytes | memoryview, path: str, keep_previous: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename, folder fsync).

    Args:
        data: the file's full content.
        path: the target file (its folder is created).
        keep_previous: if given and ``path`` exists, it becomes this path (hard link, then rename),
            so the previous file survives next to the new one and ``path`` is never absent.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous is not None and os.path.exists(path):
        # hard-link the current file to a temporary name and rename that over keep_previous, so
        # ``path`` exists at every moment of the rotation (a crash in between leaves the old one)
        prev_tmp = f"{keep_previous}.tmp.{os.getpid()}"
        if os.path.lexists(prev_tmp):
            os.remove(prev_tmp)
        try:
            os.link(path, prev_tmp)
        except OSError:  # pragma: no cover - file systems without hard links
            shutil.copyfile(path, prev_tmp)
        os.replace(prev_tmp, keep_previous)
    os.replace(tmp, path)
    fsync_dir(folder)
