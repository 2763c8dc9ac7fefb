"""Forward-mode AD of the op (``torch.func.jvp``, ``torch.autograd.forward_ad``): the tangent of ``out``.

The fused kernels have no forward-mode kernels. Under forward-mode AD the op's primal outputs still come
from the kernels, and the tangent of ``out`` from the attention's JVP, evaluated eagerly in the compute
dtype ``c`` with the ``(B, H, Nq, N)`` probabilities materialized (the reference's memory, not the
kernels'); ``lse`` and the statistics have no tangent (they are non-differentiable outputs):

    dS = scale · (dq_rot kᵀ + q_rot dkᵀ)        (dq_rot: row 0 is the rotated tangent dq0 Rᵀ)
    dP = P ⊙ (dS − Σ_j P dS)
    d out = dP_d v + P_d dv                      (P_d, dP_d: dropped and rescaled by the contract's mask)

Padding is never read here either: padded keys, values and query rows (and their tangents) are replaced
by zeros with ``torch.where`` before any arithmetic, and padded query rows get a zero tangent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD

from .class_query import compute_dtype, rotate_class_query
from .dropout import dropout_mask
from .token_layout import key_valid_mask


def tangents_of(*tensors: object) -> list[torch.Tensor | None]:
    """The forward-mode tangent of each argument (None for non-tensors and tensors without one)."""
    return [fwAD.unpack_dual(t).tangent if isinstance(t, torch.Tensor) else None for t in tensors]


def has_tangent(*tensors: object) -> bool:
    """True when forward-mode AD tracks one of ``tensors`` (a dual tensor, also inside ``torch.func.jvp``)."""
    return any(t is not None for t in tangents_of(*tensors))


def output_tangent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tangents: Sequence[torch.Tensor | None],
    segments: Sequence[int], lengths: torch.Tensor | None, rotation: torch.Tensor | None, scale: float,
    dropout_p: float, seed: int,
) -> torch.Tensor:
    """The tangent of the op's ``out`` for tangents ``(dq, dk, dv)`` of ``q, k, v`` (None: zero).

    Args:
        q: ``(B, H, Nq, Dh)`` (``Nq`` is ``N`` or 1); k, v: ``(B, H, N, Dh)``: primals, not dual tensors.
        tangents: ``(dq, dk, dv)`` with the shapes of ``q, k, v``, or None for an input without tangent.
        segments, lengths, rotation, scale, dropout_p, seed: the op's arguments (``docs/op.md``).

    Returns:
        ``(B, H, Nq, Dh)`` in the dtype of ``q``; exactly 0 in padded query rows.
    """
    dq, dk, dv = (torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), tangents))
    B, H, N, _ = k.shape
    nq = q.shape[2]
    c = compute_dtype(q.dtype)
    valid = key_valid_mask(lengths, segments, B, k.device)[:, None, :, None]  # (B, 1, N, 1)

    def keys(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x.to(c), 0.0)

    def queries(x: torch.Tensor) -> torch.Tensor:  # row 0 rotated (a linear map: the same for the tangent)
        row0 = rotate_class_query(x[:, :, 0, :], rotation).unsqueeze(2)
        if nq == 1:
            return row0.to(c)
        return torch.cat([row0.to(c), torch.where(valid[:, :, 1:], x[:, :, 1:].to(c), 0.0)], dim=2)

    k_c, v_c, dk_c, dv_c = (keys(x) for x in (k, v, dk, dv))
    q_c, dq_c = queries(q), queries(dq)
    key_ok = valid[:, :, None, :, 0]  # (B, 1, 1, N)
    p = torch.softmax((scale * (q_c @ k_c.mT)).masked_fill(~key_ok, float("-inf")), dim=-1)
    ds = scale * (dq_c @ k_c.mT + q_c @ dk_c.mT)  # 0 at padded keys (their k and dk are zeros)
    dp = p * (ds - (p * ds).sum(-1, keepdim=True))
    if dropout_p > 0.0:
        keep = dropout_mask(seed, B, H, nq, N, dropout_p, device=k.device).to(c) / (1.0 - dropout_p)
        p, dp = p * keep, dp * keep
    out = dp @ v_c + p @ dv_c
    if nq > 1 and lengths is not None:
        out = torch.where(valid, out, 0.0)  # padded query rows
    return out.to(q.dtype)
