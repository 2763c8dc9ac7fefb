"""The segment table the kernels read, built without a host synchronisation in steady state.

The table of a layout ``segments = (L_1, ..., L_M)`` is the int32 vector
``T = [0, 1, o_2, ..., o_M, N]`` of segment starts (class token, then modalities) and ``N``:
segment ``s`` spans ``[T[s], T[s + 1])``. The kernels read the lengths themselves, so the
table depends on the layout only.

* Eager calls on plain tensors take it from a cache keyed by ``(segments, device)``. The
  first call of a layout copies it to the device (one synchronising copy); every later call,
  a captured CUDA graph included, copies nothing.
* When ``torch.compile`` traces the op (fake or functional tensors), or a CUDA graph is
  captured before the layout was ever used, it is built on the device from scalar fills
  instead: no host tensor, no copy, so the compiled or captured graph never synchronises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_TABLES: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def segment_offsets(segments: Sequence[int]) -> list[int]:
    """``[0, 1, o_2, ..., o_M, N]`` for padded modality sizes ``segments``."""
    offsets = [0, 1]
    for size in segments:
        offsets.append(offsets[-1] + int(size))
    return offsets


def _is_plain(t: torch.Tensor) -> bool:
    """An ordinary eager tensor (not fake, functional or another subclass seen while tracing)."""
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _built_on_device(offsets: list[int], like: torch.Tensor) -> torch.Tensor:
    """The table from one fill per entry: capturable and traceable, no host data."""
    table = like.new_empty((len(offsets),), dtype=torch.int32)
    for i, value in enumerate(offsets):
        table.select(0, i).fill_(value)  # a Python scalar: no host tensor enters the graph
    return table


def segment_table(segments: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """The ``(M + 2,)`` int32 segment table on ``like``'s device (see the module docstring)."""
    offsets = segment_offsets(segments)
    if not _is_plain(like):  # traced: fake or functional tensors
        return _built_on_device(offsets, like)
    key = (tuple(offsets), like.device)
    table = _TABLES.get(key)
    if table is None:
        if _capturing(like.device):  # a copy from the host cannot be captured; not cached (graph memory)
            return _built_on_device(offsets, like)
        table = torch.tensor(offsets, dtype=torch.int32, device=like.device)
        _TABLES[key] = table
    return table
