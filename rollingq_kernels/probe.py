"""The attention probe: the class row's attention on a few training samples, before and after a rotation.

The op's statistics hold per-modality aggregates only; whether a rotation reverses *which tokens*
the class query attends to needs the per-token attention. The probe reads it directly on a small
batch: :func:`capture_inputs` runs the model with a forward hook that keeps the layer's input
tokens (and their layout: segments from the call, valid lengths from the op's ``tokens``
statistic), then :func:`class_row` rebuilds the class query and the keys from the layer's ``qkv``
projection and computes the class row's logits and probabilities eagerly, in float64, under any
rotation (with the op's own rotation and padding conventions: :func:`~rollingq_kernels.class_query.rotate_class_query`,
:func:`~rollingq_kernels.reference.key_valid_mask`). :func:`compare` reduces two such rows to the
numbers the controller records and the safety rule reads: the rank correlation within each modality
(does the query still prefer the same tokens of a modality?) decides, since moving attention between
modalities, which is what a rotation is for, reorders the tokens of different modalities.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .class_query import rotate_class_query
from .reference import key_valid_mask, modality_index


@dataclass
class ProbeInputs:
    """One layer's input on the probe batch(es).

    Attributes:
        x: ``(B, N, C)`` the layer's input tokens (detached).
        segments: the ``M`` padded modality sizes.
        lengths: ``(B, M)`` int64 valid tokens per modality, or None (no padding).
    """

    x: torch.Tensor
    segments: tuple[int, ...]
    lengths: torch.Tensor | None


def _call_inputs(layer: nn.Module, args: tuple, kwargs: dict) -> ProbeInputs | None:
    """The probe inputs of one call ``layer(*args, **kwargs)`` that just ran (None when the segments are unknown)."""
    x = args[0] if args else kwargs.get("x")
    segments = kwargs.get("segments")
    if segments is None and len(args) > 1 and isinstance(args[1], (list, tuple)):
        segments = args[1]  # the positional form layer(x, segments[, lengths])
    segments = segments if segments is not None else getattr(layer, "segments", None)
    stats = getattr(layer, "last_stats", None)
    if x is None or segments is None or stats is None:
        return None
    segments = tuple(int(s) for s in segments)
    lengths = stats.tokens.detach().round().to(torch.int64)  # the valid lengths, however the call gave them
    full = torch.tensor(segments, dtype=torch.int64, device=lengths.device)
    return ProbeInputs(x.detach(), segments, None if bool((lengths == full).all()) else lengths)


def capture_inputs(layers: dict[str, nn.Module], run: Callable[[], Any]) -> dict[str, ProbeInputs]:
    """Run ``run()`` (forwards of the model) and keep each layer's inputs, concatenated over its calls.

    Layers whose calls do not say their segments (nor store them) are left out.
    """
    calls: dict[str, list[ProbeInputs | None]] = {name: [] for name in layers}
    handles = [layer.register_forward_hook(
        lambda module, args, kwargs, output, name=name: calls[name].append(_call_inputs(module, args, kwargs)),
        with_kwargs=True) for name, layer in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, seen in calls.items():
        if not seen or any(s is None for s in seen) or len({s.segments for s in seen}) != 1:
            continue
        lengths = None
        if any(s.lengths is not None for s in seen):
            full = torch.tensor(seen[0].segments, dtype=torch.int64)
            lengths = torch.cat([s.lengths.cpu() if s.lengths is not None else full.expand(s.x.shape[0], -1)
                                 for s in seen])
        out[name] = ProbeInputs(torch.cat([s.x for s in seen]), seen[0].segments, lengths)
    return out


def class_row(layer: nn.Module, inputs: ProbeInputs, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The class row's logits and attention probabilities under ``rotation``, in float64.

    Args:
        layer: a :class:`~rollingq_kernels.module.FusedRollingQAttention` (its ``qkv``, ``scale``, heads).
        inputs: the probe's input tokens.
        rotation: ``(C, C)`` or ``(H, Dh, Dh)``.

    Returns:
        ``(logits, probs)``, each ``(B, H, N)``; padded keys have logit −inf and probability 0.
    """
    x = inputs.x.to(torch.float64)
    B, N, C = x.shape
    H, Dh = layer.num_heads, layer.head_dim
    w, b = layer.qkv.weight.detach().double(), layer.qkv.bias
    b = None if b is None else b.detach().double()
    q = F.linear(x[:, 0], w[:C], None if b is None else b[:C]).reshape(B, H, Dh)
    k = F.linear(x, w[C : 2 * C], None if b is None else b[C : 2 * C]).reshape(B, N, H, Dh).transpose(1, 2)
    q = rotate_class_query(q, rotation.detach().double().to(x.device))
    logits = layer.scale * torch.einsum("bhd,bhnd->bhn", q, k)
    lengths = None if inputs.lengths is None else inputs.lengths.to(x.device)
    valid = key_valid_mask(lengths, inputs.segments, B, x.device)
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return logits, torch.softmax(logits, dim=-1)


def _spread(logits: torch.Tensor) -> float:
    finite = torch.isfinite(logits)
    top = logits.masked_fill(~finite, float("-inf")).amax(-1)
    low = logits.masked_fill(~finite, float("inf")).amin(-1)
    return float((top - low).mean())


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort(-1).argsort(-1).to(torch.float64)


def rank_correlation(before: torch.Tensor, after: torch.Tensor, valid: torch.Tensor,
                     groups: torch.Tensor | None = None) -> float:
    """Spearman correlation of two ``(B, H, N)`` attention rows over the valid keys ``(B, N)``, mean over rows.

    With ``groups`` ``(N,)`` (e.g. the modality of each key) it is computed within each group (with at least
    3 valid keys) and averaged: a rotation may move attention between modalities, the question is whether
    the query still prefers the same tokens within each. NaN when no row has 3 valid keys.
    """
    values = []
    ids = [None] if groups is None else groups.unique().tolist()
    for b in range(before.shape[0]):
        for g in ids:
            keep = valid[b] if g is None else valid[b] & (groups == g)
            if int(keep.sum()) < 3:
                continue
            rb, ra = _ranks(before[b][:, keep]), _ranks(after[b][:, keep])  # (H, n)
            rb, ra = rb - rb.mean(-1, keepdim=True), ra - ra.mean(-1, keepdim=True)
            values.append((rb * ra).sum(-1) / (rb.norm(dim=-1) * ra.norm(dim=-1)))
    return float(torch.cat(values).mean()) if values else math.nan


@dataclass
class ProbeComparison:
    """The probe's numbers for one rotation (see :class:`~rollingq_kernels.decision.RotationRecord`)."""

    samples: int
    logit_spread: list[float]
    max_prob: list[float]
    topk_share: list[float]
    mass: list[list[float]]
    rank_correlation: float
    within_rank_correlation: float


def compare(layer: nn.Module, inputs: ProbeInputs, old: torch.Tensor, new: torch.Tensor, top_k: int
            ) -> ProbeComparison:
    """The class row under the rotations ``old`` and ``new``: ``[before, after]`` of each number."""
    rows = [class_row(layer, inputs, r) for r in (old, new)]
    B = inputs.x.shape[0]
    lengths = None if inputs.lengths is None else inputs.lengths.to(inputs.x.device)
    valid = key_valid_mask(lengths, inputs.segments, B, inputs.x.device)
    modality = modality_index(inputs.segments, inputs.x.device)
    onehot = F.one_hot(modality, len(inputs.segments) + 1).double()
    k = min(top_k, rows[0][1].shape[-1])
    return ProbeComparison(
        samples=B,
        logit_spread=[_spread(lg) for lg, _ in rows],
        max_prob=[float(p.amax(-1).mean()) for _, p in rows],
        topk_share=[float(p.topk(k, dim=-1).values.sum(-1).mean()) for _, p in rows],
        mass=[(p @ onehot).mean((0, 1)).tolist() for _, p in rows],
        rank_correlation=rank_correlation(rows[0][1], rows[1][1], valid),
        within_rank_correlation=rank_correlation(rows[0][1], rows[1][1], valid, modality),
    )
