"""The token layout of the op (``docs/op.md``, "Semantics"): which keys are valid, which segment each is in.

Position 0 is the class token, then the ``M`` modality segments of padded sizes ``segments``; the valid tokens
of modality ``m`` are the first ``lengths[b, m]`` of its segment. The reference and the forward-mode AD formula
share these two tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def key_valid_mask(
    lengths: torch.Tensor | None, segments: Sequence[int], batch: int, device: torch.device
) -> torch.Tensor:
    """``(B, N)`` bool: key ``j`` of sample ``b`` is valid (class token always)."""
    n = 1 + sum(segments)
    if lengths is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    parts = [torch.ones(batch, 1, dtype=torch.bool, device=device)]
    for m, size in enumerate(segments):
        pos = torch.arange(size, device=device).unsqueeze(0)
        parts.append(pos < lengths[:, m : m + 1].to(torch.int64))
    return torch.cat(parts, dim=1)


def modality_index(segments: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(N,)`` int64: 0 for the class token, ``m + 1`` for modality ``m``."""
    ids = [torch.zeros(1, dtype=torch.int64, device=device)]
    for m, size in enumerate(segments):
        ids.append(torch.full((size,), m + 1, dtype=torch.int64, device=device))
    return torch.cat(ids)
