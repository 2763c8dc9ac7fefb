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
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise CheckpointError(f"checkpoint {path!r}: 'epoch' must be the number of finished epochs (an integer "
                              f">= 1), got {_short(epoch)}; the file is damaged or not a rollingq checkpoint")
    stage = state.get("stage", 1)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (1, 2):
        raise CheckpointError(f"checkpoint {path!r}: 'stage' must be 1 or 2, got {_short(state['stage'])}")
    if not isinstance(state["model"], dict):
        raise CheckpointError(f"checkpoint {path!r}: 'model' must be a state dict, got {type(state['model']).__name__}")
    return state


RESUME_KEYS = {"optimizer": dict, "scheduler": dict, "rng": dict, "history": list, "best_val": (int, float)}
"""What a checkpoint needs besides ``model`` and ``epoch`` to continue a run, and its type."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def check_resume_state(state: dict, path: str) -> None:
    """Refuse a checkpoint (loaded by :func:`load_checkpoint`) that cannot continue a run: a missing or
    mistyped ``optimizer``, ``scheduler``, ``rng``, ``history`` or ``best_val``, or a history that is not
    one row per finished epoch.

    Raises:
        CheckpointError: naming the file and the key.
    """
    for key, kind in RESUME_KEYS.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path!r} has no {key!r}: it cannot continue a run (a damaged "
                                  "file, or one not written by rollingq train)")
        if isinstance(state[key], bool) or not isinstance(state[key], kind):
            raise CheckpointError(f"checkpoint {path!r}: {key!r} has the wrong type ({type(state[key]).__name__})")
    missing = [k for k in ("python", "numpy", "torch") if k not in state["rng"]]
    if missing:
        raise CheckpointError(f"checkpoint {path!r}: 'rng' lacks the {', '.join(missing)} RNG state(s)")
    if not {"state", "param_groups"} <= set(state["optimizer"]):
        raise CheckpointError(f"checkpoint {path!r}: 'optimizer' is not an optimizer's state dict")
    if not isinstance(state["scheduler"].get("last_epoch"), int):
        raise CheckpointError(f"checkpoint {path!r}: 'scheduler' is not a learning-rate scheduler's state dict")
    history = state["history"]
    if len(history) != state["epoch"] or not all(isinstance(row, dict) for row in history):
        raise CheckpointError(f"checkpoint {path!r}: 'history' holds {len(history)} row(s) for 'epoch' "
                              f"{state['epoch']} (expected one per finished epoch)")
