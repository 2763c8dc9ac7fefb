"""The op's statistics record and the cheap epilogue shared by all backends.

Kernels produce ``key_mean``, ``mass`` and ``query`` while they read K;
:func:`finish_stats` derives the cosines and the validity mask from those
without touching K again (``O(B·H·M·Dh)`` work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class AttentionStats(NamedTuple):
    """Statistics of the class-token query row (float32 unless noted, no grad).

    Attributes:
        key_mean: ``(B, H, M, Dh)`` mean valid key per modality (0 if empty).
        mass: ``(B, H, M+1)`` class-row attention on [class, modality 1…M].
        cos: ``(B, M)`` cosine(rotated class query, mean key), heads concatenated.
        cos_per_head: ``(B, H, M)`` the same cosine per head.
        query: ``(B, H, Dh)`` the rotated class query.
        valid: ``(B, M)`` bool, modality non-empty.
        tokens: ``(B, M)`` valid tokens per modality (``lengths``, or the
            padded sizes ``segments`` without ``lengths``).
    """

    key_mean: torch.Tensor
    mass: torch.Tensor
    cos: torch.Tensor
    cos_per_head: torch.Tensor
    query: torch.Tensor
    valid: torch.Tensor
    tokens: torch.Tensor


def safe_cosine(dot: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """``dot / (|a||b|)``, defined as 0 where either norm is 0."""
    denom = norm_a * norm_b
    return (dot / denom.clamp_min(torch.finfo(dot.dtype).tiny)).masked_fill_(denom == 0, 0.0)


def valid_modalities(
    lengths: torch.Tensor | None, batch: int, segments: Sequence[int], device: torch.device
) -> torch.Tensor:
    """``(B, M)`` bool: modality ``m`` of sample ``b`` has at least one valid token."""
    if lengths is None:
        return torch.ones(batch, len(segments), dtype=torch.bool, device=device)
    return lengths > 0


def token_counts(
    lengths: torch.Tensor | None, batch: int, segments: Sequence[int], device: torch.device
) -> torch.Tensor:
    """``(B, M)`` float32 valid tokens per modality: ``lengths``, or ``segments`` for every sample.

    Without ``lengths`` the counts are filled on ``device`` (no host-to-device copy), so the call
    never waits for the GPU and can be captured in a CUDA graph (``docs/op.md``, no host syncs).
    """
    if lengths is None:
        columns = [torch.full((batch,), float(s), dtype=torch.float32, device=device) for s in segments]
        return torch.stack(columns, dim=1)
    return lengths.float()


def finish_stats(
    key_mean: torch.Tensor,
    mass: torch.Tensor,
    query: torch.Tensor,
    lengths: torch.Tensor | None,
    segments: Sequence[int],
) -> AttentionStats:
    """Derive ``cos``, ``cos_per_head``, ``valid`` and ``tokens`` from the kernel outputs.

    Args:
        key_mean: ``(B, H, M, Dh)`` float32.
        mass: ``(B, H, M+1)`` float32.
        query: ``(B, H, Dh)`` float32, the rotated class query.
        lengths: ``(B, M)`` integer tensor or None.
        segments: the padded modality sizes.
    """
    key_mean = key_mean.float()
    query = query.float()
    B, H, M, Dh = key_mean.shape
    # Few, fused reductions: this epilogue runs on every call, next to a memory-bound kernel.
    dots = (key_mean * query.unsqueeze(2)).sum(-1)  # (B, H, M)
    cos_per_head = safe_cosine(
        dots,
        torch.linalg.vector_norm(query, dim=-1).unsqueeze(-1),
        torch.linalg.vector_norm(key_mean, dim=-1),
    )
    cos = safe_cosine(  # heads concatenated: sums over h of the dots and squared norms
        dots.sum(1),
        torch.linalg.vector_norm(query, dim=(1, 2)).unsqueeze(-1),
        torch.linalg.vector_norm(key_mean, dim=(1, 3)),
    )
    valid = valid_modalities(lengths, B, segments, key_mean.device)
    return AttentionStats(
        key_mean=key_mean,
        mass=mass.float(),
        cos=cos,
        cos_per_head=cos_per_head,
        query=query,
        valid=valid,
        tokens=token_counts(lengths, B, segments, key_mean.device),
    )
