"""The eager reference of the op: the correctness oracle of every backend.

It implements ``docs/op.md`` literally with plain, differentiable PyTorch ops and
materializes the ``(B, H, Nq, N)`` score matrix. It is also the benchmarks'
"eager" provider: what a user writes today to get attention plus RollingQ
statistics. Run it in float64 for tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .class_query import compute_dtype, rotate_class_query
from .dropout import dropout_mask
from .stats import AttentionStats, finish_stats
from .token_layout import key_valid_mask, modality_index

__all__ = ["key_valid_mask", "modality_index", "rollingq_attention_reference"]


def rollingq_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[int], *,
    lengths: torch.Tensor | None = None, rotation: torch.Tensor | None = None, scale: float | None = None,
    dropout_p: float = 0.0, seed: int | None = None, compute_stats: bool = True,
) -> tuple[torch.Tensor, AttentionStats | None]:
    """Rotated class-query attention with RollingQ statistics, eagerly.

    Args:
        q: ``(B, H, N, Dh)`` (all-query) or ``(B, H, 1, Dh)`` (class-query-only).
        k, v: ``(B, H, N, Dh)``; ``N = 1 + sum(segments)``.
        segments: padded sizes ``(L_1, …, L_M)`` of the ``M ≥ 2`` modalities.
        lengths: ``(B, M)`` valid tokens per modality, or None.
        rotation: ``(H·Dh, H·Dh)``, ``(H, Dh, Dh)`` or None.
        scale: score scale, default ``Dh ** -0.5``.
        dropout_p, seed: dropout with the contract's counter-based mask
            (``seed`` is required when ``dropout_p > 0``).
        compute_stats: return ``None`` instead of the statistics when False.

    Returns:
        ``out`` with the shape and dtype of ``q``, and the
        :class:`AttentionStats` of the class-token row (or None).

    Inputs are assumed validated (``rollingq_attention`` validates them).

    Padding is never read (``docs/op.md``): padded keys and values and padded
    query rows are replaced by zeros with ``torch.where`` (whose gradient there is
    exactly 0, never ``0 · NaN``) before any arithmetic, so NaN or inf placed
    there changes nothing. ``rotation`` is a constant (detached).
    """
    B, H, N, Dh = k.shape
    nq = q.shape[2]
    class_query_only = nq == 1
    c = compute_dtype(q.dtype)
    scale = Dh**-0.5 if scale is None else float(scale)

    key_valid = key_valid_mask(lengths, segments, B, k.device)  # (B, N)
    padded = lengths is not None
    key_valid4 = key_valid[:, None, :, None]  # (B, 1, N, 1)
    k_c, v_c = k.to(c), v.to(c)
    if padded:
        k_c = torch.where(key_valid4, k_c, 0.0)
        v_c = torch.where(key_valid4, v_c, 0.0)

    q0_rot = rotate_class_query(q[:, :, 0, :], None if rotation is None else rotation.detach())
    if class_query_only:
        q_rot = q0_rot.unsqueeze(2)
    else:
        rest = q[:, :, 1:, :]
        if padded:  # padded query rows are never read
            rest = torch.where(key_valid4[:, :, 1:], rest, torch.zeros((), dtype=q.dtype, device=q.device))
        q_rot = torch.cat([q0_rot.unsqueeze(2), rest], dim=2)

    scores = scale * torch.matmul(q_rot.to(c), k_c.transpose(-1, -2))  # (B, H, Nq, N)
    scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs_d = probs
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("seed: required by the reference when dropout_p > 0")
        keep = dropout_mask(seed, B, H, nq, N, dropout_p, device=k.device)
        probs_d = probs * keep.to(c) / (1.0 - dropout_p)
    out = torch.matmul(probs_d, v_c)
    if not class_query_only and padded:
        out = torch.where(key_valid4, out, 0.0)  # padded query rows output exactly 0
    out = out.to(q.dtype)
    if not compute_stats:
        return out, None

    with torch.no_grad():
        mod = modality_index(segments, k.device)
        M = len(segments)
        onehot = torch.nn.functional.one_hot(mod, M + 1).to(c)  # (N, M+1)
        mass = probs[:, :, 0, :].detach() @ onehot  # (B, H, M+1)
        key_sum = torch.einsum("bhnd,nm->bhmd", k_c.detach(), onehot[:, 1:])  # (B, H, M, Dh); padding is 0
        counts = (key_valid.to(c) @ onehot[:, 1:]).clamp_min(1.0)  # (B, M)
        key_mean = key_sum / counts[:, None, :, None]
        class_scores = scores[:, :, 0, :].detach()  # (B, H, N), invalid keys -inf
        stats = finish_stats(key_mean.float(), mass.float(), q0_rot.detach().float(), lengths, segments,
                             score_max=class_scores.amax(-1), lse=torch.logsumexp(class_scores, -1, keepdim=True))
    return out, stats
