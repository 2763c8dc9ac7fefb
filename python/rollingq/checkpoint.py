"""Atomic checkpoint files and safe loading.

:func:`atomic_save` writes a checkpoint with :func:`rollingq.files.atomic_write_bytes`
(a crash leaves the old file or the new one). :func:`load_checkpoint` uses
``torch.load(weights_only=True)`` and turns any unreadable file into a
:class:`CheckpointError` naming it.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from .files import atomic_write_bytes


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not a rollingq checkpoint (the message names the file)."""


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
            f"checkpoint {path!r} ({size} bytes) cannot be read with weights_only=True: it is truncated or "
            f"corrupt, or holds Python objects beyond tensors and plain containers ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(
            f"checkpoint {path!r}: expected a dict with 'model' and 'epoch', got {type(state).__name__}"
        )
    return state
