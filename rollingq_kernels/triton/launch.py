"""Host launchers of the Triton kernels: the op's forward and backward (``docs/op.md``).

:func:`attention_fwd` / :func:`attention_bwd` have the signatures of ``rollingq::attention_fwd`` /
``rollingq::attention_bwd``. They read no tensor values on the host (no synchronisation, see
:mod:`.tables`) and launch every kernel through ``torch.library.wrap_triton``, so
``torch.compile`` traces them when they run inside the ``triton_op`` of :mod:`.register`.

* all-query: :func:`~.forward.all_query_fwd_kernel` (+ the class-only forward without values on
  the class row for the statistics); backward: delta, dK/dV and dQ kernels.
* class-only: split-N forward + combine; split-N backward + a fixed-order sum of the ``dq`` shares.

The rotation of the class query (a tiny matmul) and its chain rule run as torch ops. A negative
scale is handled by flipping the sign of q (the kernels fold the scale into ``exp2`` and need
``scale >= 0``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
import triton
from torch.library import wrap_triton

from .._library import triton_interpret
from ..checks import INDEX_LIMIT, SUPPORTED_DTYPES, check_alike
from ..class_query import rotate_class_query, rotation_chain_rule
from ..dropout import dropout_threshold
from ..stats import KernelOutputs, empty_kernel_stats
from .backward import all_query_delta_kernel, all_query_dkdv_kernel, all_query_dq_kernel
from .class_only import class_only_bwd_kernel, class_only_combine_kernel, class_only_fwd_kernel
from .common import LOG2E
from .configs import MAX_HEAD_DIM_ALL_QUERY, MAX_HEAD_DIM_CLASS_ONLY, block_dim, dot_precision, segment_pad
from .forward import all_query_fwd_kernel
from .tables import segment_table

logger = logging.getLogger("rollingq_kernels")

SPLITS_ENV = "ROLLINGQ_TRITON_SPLITS"


# ----------------------------------------------------------------------------- checks


def check_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[int],
                    lengths: torch.Tensor | None, rotation: torch.Tensor | None) -> None:
    """What the kernels rely on, checked without reading values: ``TypeError`` / ``ValueError`` naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d (B, H, N, Dh) tensor, got shape {tuple(t.shape)}")
    check_alike(q, k, v)
    B, H, N, Dh = k.shape
    if q.shape[2] not in (1, N) or q.shape[:2] != k.shape[:2] or q.shape[3] != Dh:
        raise ValueError(f"q: expected shape ({B}, {H}, {N} or 1, {Dh}), got {tuple(q.shape)}")
    if len(segments) < 2 or any(s < 1 for s in segments) or 1 + sum(segments) != N:
        raise ValueError(f"segments: expected M >= 2 sizes >= 1 summing to N - 1 = {N - 1}, got {list(segments)}")
    if lengths is not None:
        if lengths.dtype != torch.int64:
            raise TypeError(f"lengths: expected int64, got {lengths.dtype}")
        if tuple(lengths.shape) != (B, len(segments)):
            raise ValueError(f"lengths: expected shape ({B}, {len(segments)}), got {tuple(lengths.shape)}")
        if lengths.device != q.device:
            raise TypeError(f"lengths: expected device {q.device}, got {lengths.device}")
    if rotation is not None:
        if rotation.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"rotation: expected float32 or float64, got {rotation.dtype}")
        if rotation.device != q.device:
            raise TypeError(f"rotation: expected device {q.device}, got {rotation.device}")
        if tuple(rotation.shape) not in ((H * Dh, H * Dh), (H, Dh, Dh)):
            raise ValueError(f"rotation: expected shape ({H * Dh}, {H * Dh}) or ({H}, {Dh}, {Dh}), "
                             f"got {tuple(rotation.shape)}")
    class_only = q.shape[2] == 1
    limit = MAX_HEAD_DIM_CLASS_ONLY if class_only else MAX_HEAD_DIM_ALL_QUERY
    if Dh > limit:
        mode = "class-only" if class_only else "all-query"
        raise ValueError(
            f"q: backend='triton' supports head dim Dh <= {limit} in {mode} mode, got Dh = {Dh}; "
            "use backend='cpp' or backend='reference', which support any Dh"
        )
    if N * Dh >= INDEX_LIMIT:
        raise ValueError(f"k: backend='triton' needs N·Dh < 2**31 per (b, h), got N = {N}, Dh = {Dh}")


# ----------------------------------------------------------------------------- scalars and sizes


def _split_float(x: float) -> tuple[float, float]:
    """``x`` as float32 ``hi + lo``: Triton passes Python floats as float32, float64 kernels need more."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 132, an H100's, off CUDA)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def class_only_splits(bh: int, n_keys: int, device: torch.device, min_keys_per_split: int = 64) -> int:
    """How many programs share one class row in the class-only kernels.

    Enough that ``B·H·splits`` gives about four programs per multiprocessor (the one-warp
    configurations need several to keep loads in flight), at least ``min_keys_per_split`` keys
    each. ``ROLLINGQ_TRITON_SPLITS`` (an int >= 1) overrides it (tests force the split path).
    """
    forced = os.environ.get(SPLITS_ENV)
    if forced:
        try:
            value = int(forced)
        except ValueError as exc:
            raise ValueError(f"{SPLITS_ENV}: expected an int >= 1, got {forced!r}") from exc
        if value < 1:
            raise ValueError(f"{SPLITS_ENV}: expected an int >= 1, got {forced!r}")
        return min(value, n_keys)
    target = triton.cdiv(4 * _sms(device), max(bh, 1))
    most = max(1, triton.cdiv(n_keys, min_keys_per_split))
    return max(1, min(target, most))


def _meta(q: torch.Tensor, segments: Sequence[int], lengths: torch.Tensor | None) -> dict:
    head_dim = q.shape[3]
    return dict(
        NUM_MOD=len(segments), HEAD_DIM=head_dim, BLOCK_D=block_dim(head_dim), HAS_LENGTHS=lengths is not None,
        IS_FP64=q.dtype == torch.float64,
    )


def _emulate_bf16(dtype: torch.dtype) -> bool:
    return triton_interpret() and dtype == torch.bfloat16


def _tables(segments: Sequence[int], lengths: torch.Tensor | None, q: torch.Tensor,
            needed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table, lengths)`` pointers for the kernels.

    When a kernel does not read one, a one-element tensor of the same dtype stands in, so every
    call has the same kernel signature (one compilation, and a cache the GPU run can warm).
    """
    table = segment_table(segments, q) if needed else q.new_empty((1,), dtype=torch.int32)
    return table, (lengths if lengths is not None else q.new_empty((1,), dtype=torch.int64))


def _class_rows(q0_rot: torch.Tensor, sign: float) -> torch.Tensor:
    """The rotated class rows ``(B, H, Dh)`` as the kernels read them: ``(B·H, Dh)``, contiguous, sign-adjusted."""
    B, H, Dh = q0_rot.shape
    q0 = q0_rot.reshape(B * H, Dh)
    return (-q0 if sign < 0 else q0).contiguous()


# ----------------------------------------------------------------------------- forward


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[int], lengths: torch.Tensor | None,
    rotation: torch.Tensor | None, scale: float, dropout_p: float, seed: int, compute_stats: bool,
) -> KernelOutputs:
    """The op's forward (``rollingq::attention_fwd``) with Triton kernels.

    Args:
        q: ``(B, H, N, Dh)`` or ``(B, H, 1, Dh)``; k, v: ``(B, H, N, Dh)``; float16/bfloat16/float32/float64.
        segments: ``M >= 2`` padded modality sizes; lengths: int64 ``(B, M)`` or None.
        rotation: None, ``(H·Dh, H·Dh)`` or ``(H, Dh, Dh)`` (float32/float64).

    Returns:
        :class:`~rollingq_kernels.stats.KernelOutputs`: ``out`` (like q), ``lse`` ``(B, H, Nq)`` f32 (natural
        log) and the kernel statistics of the table (f32; empty ``(0,)`` without stats).
    """
    segments = [int(s) for s in segments]
    check_arguments(q, k, v, segments, lengths, rotation)
    B, H, N, Dh = k.shape
    nq = q.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, nq), dtype=torch.float32, device=q.device)
    q0_rot = rotate_class_query(q[:, :, 0, :], rotation)  # (B, H, Dh), input dtype
    stats = empty_kernel_stats(q, segments, compute_stats)
    if compute_stats:
        stats["query"].copy_(q0_rot)  # a fresh tensor even for float32 q: outputs never alias inputs
    # the statistics the class-row kernels write, in the table's order (the combine kernel's arguments)
    written = tuple(t for name, t in stats.items() if name != "query")
    result = KernelOutputs(out, lse, **stats)
    if B * H == 0:
        return result
    sign = -1.0 if scale < 0 else 1.0
    qk = _split_float(abs(float(scale)) * LOG2E)
    drop = _split_float(1.0 / (1.0 - float(dropout_p)))
    scalars = (*qk, *drop, int(seed), dropout_threshold(dropout_p))
    k, v = k.contiguous(), v.contiguous()
    q0 = _class_rows(q0_rot, sign)
    meta = _meta(q, segments, lengths)
    dropout = dropout_p > 0.0
    if nq == 1:
        table, lens = _tables(segments, lengths, q, needed=True)
        _class_only_fwd(q0, k, v, out, lse, written, table, lens, scalars, meta, compute_stats,
                        with_v=True, dropout=dropout)
        return result
    table, lens = _tables(segments, lengths, q, needed=lengths is not None or compute_stats)
    q_main = q.contiguous() if sign > 0 else -q.contiguous()
    wrap_triton(all_query_fwd_kernel)[lambda cfg: (triton.cdiv(nq, cfg["BLOCK_M"]) * B * H,)](
        q_main, q0, k, v, out, lse, table, lens, H, nq, N, *scalars,
        DROPOUT=dropout, ROTATED=rotation is not None or sign < 0, DOT_PREC=dot_precision(q.dtype),
        EMULATE_BF16=_emulate_bf16(q.dtype), **meta,
    )
    if compute_stats:  # the class row's statistics: one pass over K without values
        _class_only_fwd(q0, k, v, out, lse, written, table, lens, scalars, meta, True,
                        with_v=False, dropout=False)
    return result


def _class_only_fwd(q0: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    stat_outputs: tuple[torch.Tensor, ...], table: torch.Tensor, lens: torch.Tensor,
                    scalars: tuple, meta: dict, stats: bool, with_v: bool, dropout: bool) -> None:
    """Split-N class-row forward + deterministic combine; ``q0`` ``(B·H, Dh)``, ``scalars`` as the kernels'.

    ``stat_outputs``: the kernel statistics the combine kernel writes, in the table's order (all but ``query``).
    """
    B, H, N, Dh = k.shape
    bh = B * H
    splits = class_only_splits(bh, N, k.device)
    chunk = triton.cdiv(N, splits)
    splits = triton.cdiv(N, chunk)
    acc_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    M = meta["NUM_MOD"]
    s_pad = segment_pad(M)
    part_ml = torch.empty((bh, splits, 2), dtype=acc_dtype, device=k.device)
    part_acc = torch.empty((bh, splits, Dh) if with_v else (1,), dtype=acc_dtype, device=k.device)
    part_seg = torch.empty((bh, splits, s_pad) if stats else (1,), dtype=acc_dtype, device=k.device)
    part_key = torch.empty((bh, splits, M, Dh) if stats else (1,), dtype=acc_dtype, device=k.device)
    logger.debug("rollingq triton class-only forward: B*H=%d N=%d splits=%d", bh, N, splits)
    wrap_triton(class_only_fwd_kernel)[(bh * splits,)](
        q0, k, v, part_ml, part_acc, part_seg, part_key, table, lens, H, N, chunk, splits, *scalars,
        S_PAD=s_pad, STATS=stats, WITH_V=with_v, DROPOUT=dropout, **meta,
    )
    wrap_triton(class_only_combine_kernel)[(bh,)](
        part_ml, part_acc, part_seg, part_key, out, lse, table, lens, *stat_outputs, H, splits,
        S_PAD=s_pad, M_PAD=triton.next_power_of_2(M), STATS=stats, WITH_V=with_v, num_warps=4, **meta,
    )


# ----------------------------------------------------------------------------- backward


def attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, segments: Sequence[int], lengths: torch.Tensor | None, rotation: torch.Tensor | None,
    scale: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward (``rollingq::attention_bwd``) with Triton kernels.

    Args:
        grad_out, out: like q; lse: ``(B, H, Nq)`` f32 from :func:`attention_fwd`; the rest as there.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtype of ``q, k, v``; ``dq`` includes the rotation's chain rule.
    """
    segments = [int(s) for s in segments]
    check_arguments(q, k, v, segments, lengths, rotation)
    B, H, N, Dh = k.shape
    nq = q.shape[2]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * H == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device), dk, dv
    sign = -1.0 if scale < 0 else 1.0
    qk = _split_float(abs(float(scale)) * LOG2E)
    sc = _split_float(abs(float(scale)))
    drop = _split_float(1.0 / (1.0 - float(dropout_p)))
    scalars = (*qk, *sc, *drop, int(seed), dropout_threshold(dropout_p))
    k, v = k.contiguous(), v.contiguous()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    q0 = _class_rows(rotate_class_query(q[:, :, 0, :], rotation), sign)
    meta = _meta(q, segments, lengths)
    dropout = dropout_p > 0.0
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if nq == 1:
        table, lens = _tables(segments, lengths, q, needed=True)
        bh = B * H
        splits = class_only_splits(bh, N, k.device)
        chunk = triton.cdiv(N, splits)
        splits = triton.cdiv(N, chunk)
        dq_part = torch.empty((bh, splits, Dh), dtype=acc_dtype, device=k.device)
        wrap_triton(class_only_bwd_kernel)[(bh * splits,)](
            q0, k, v, out, grad_out, lse, dk, dv, dq_part, table, lens, H, N, chunk, splits, *scalars,
            DROPOUT=dropout, **meta,
        )
        dq0 = (dq_part.sum(dim=1) * (sign * abs(float(scale)))).reshape(B, H, Dh)  # fixed-order sum
        if rotation is not None:
            return rotation_chain_rule(dq0, rotation, q.dtype).unsqueeze(2), dk, dv
        return dq0.to(q.dtype).unsqueeze(2), dk, dv
    table, lens = _tables(segments, lengths, q, needed=lengths is not None)
    q_main = q.contiguous() if sign > 0 else -q.contiguous()
    delta = torch.empty((B, H, nq), dtype=acc_dtype, device=q.device)
    pre_block = 16 if triton_interpret() else 64
    wrap_triton(all_query_delta_kernel)[(triton.cdiv(nq, pre_block) * B * H,)](
        out, grad_out, delta, table, lens, H, nq, BLOCK_M=pre_block, **meta,
    )
    flags = dict(DROPOUT=dropout, ROTATED=rotation is not None or sign < 0, DOT_PREC=dot_precision(q.dtype),
                 EMULATE_BF16=_emulate_bf16(q.dtype), **meta)
    wrap_triton(all_query_dkdv_kernel)[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]) * B * H,)](
        q_main, q0, k, v, grad_out, lse, delta, dk, dv, table, lens, H, nq, N, *scalars, **flags,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    wrap_triton(all_query_dq_kernel)[lambda cfg: (triton.cdiv(nq, cfg["BLOCK_M"]) * B * H,)](
        q_main, q0, k, v, grad_out, lse, delta, dq, table, lens, H, nq, N, *scalars, **flags,
    )
    if sign < 0:
        dq = -dq
    if rotation is not None:
        dq[:, :, 0, :] = rotation_chain_rule(dq[:, :, 0, :], rotation, q.dtype)
    return dq, dk, dv
