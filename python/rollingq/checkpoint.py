"""Atomic checkpoint files and safe loading.

:func:`atomic_save` (and :func:`atomic_write_bytes` for any file) writes to a temporary file in the same folder, flushes and
fsyncs it, then renames it over the target (and fsyncs the folder), so a crash
leaves either the old file or the new one, never a torn one.
:func:`load_checkpoint` uses ``torch.load(weights_only=True)`` and turns any
unreadable file into a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import io
import os
import shutil
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not a rollingq checkpoint (the message names the file)."""


def _fsync_dir(path: str) -> None:
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


def atomic_save(obj: Any, path: str, keep_previous: str | None = None) -> None:
    """Save ``obj`` with ``torch.save`` to ``path`` atomically.

    Args:
        obj: a picklable object of tensors, dicts, lists and primitives (loadable with ``weights_only=True``).
        path: the target file.
        keep_previous: if given and ``path`` exists, it becomes this path (hard link, then rename),
            so the previous checkpoint survives next to the new one and ``path`` is never absent.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getbuffer(), path, keep_previous=keep_previous)


def atomic_write_bytes(data: bytes | memoryview, path: str, keep_previous: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename, folder fsync).

    Args:
        data: the file's full content.
        path: the target file (its folder is created).
        keep_previous: as in :func:`atomic_save`.
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
    _fsync_dir(folder)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`atomic_save` (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or lacks the ``epoch`` and ``model`` keys.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for torn zip files
        size = os.path.getsize(path)
        raise CheckpointError(
            f"checkpoint {path!r} ({size} bytes) cannot be read: it is truncated or corrupt "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"checkpoint {path!r}: expected a dict with 'model' and 'epoch', got {type(state).__name__}")
    return state
