"""The op: registration glue, the shared autograd Function and backend dispatch.

Two ops live in the ``rollingq`` namespace (schemas, loading of the compiled
extension and fake kernels: :mod:`rollingq_kernels._library`):

* ``rollingq::attention_fwd`` -> ``(out, lse, key_mean, mass, query)``
* ``rollingq::attention_bwd`` -> ``(dq, dk, dv)``

The C++ extension implements them for CPU, the Triton module for CUDA.
:class:`RollingQAttentionFunction` is the one autograd Function that drives
every compiled backend; :func:`rollingq_attention` validates and dispatches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ._library import BUILD_HINT, CPP_IMPORT_ERROR, HAS_CPP, triton_interpret
from .checks import check_inputs, check_rotation_values
from .dropout import SEED_LIMIT
from .reference import rollingq_attention_reference
from .stats import AttentionStats, finish_stats

logger = logging.getLogger("rollingq_kernels")

_warned_missing_cpp = False


def _warn_missing_cpp_once() -> None:
    global _warned_missing_cpp
    if not _warned_missing_cpp:
        _warned_missing_cpp = True
        logger.warning(
            "rollingq_kernels: the C++ CPU kernels are missing (%s); CPU calls run the eager "
            "reference instead; %s.",
            CPP_IMPORT_ERROR,
            BUILD_HINT,
        )


class KernelPair(NamedTuple):
    """Forward and backward implementations with the registered ops' signatures."""

    fwd: Callable
    bwd: Callable


def _registered_ops() -> KernelPair:
    return KernelPair(torch.ops.rollingq.attention_fwd.default, torch.ops.rollingq.attention_bwd.default)


class RollingQAttentionFunction(torch.autograd.Function):
    """The autograd Function shared by the C++ and Triton backends.

    ``forward`` runs ``kernels.fwd`` and saves ``out`` and the log-sum-exp;
    ``backward`` runs ``kernels.bwd``. Statistics are non-differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, segments, lengths, rotation, scale, dropout_p, seed, compute_stats, kernels):
        out, lse, key_mean, mass, query = kernels.fwd(
            q, k, v, segments, lengths, rotation, scale, dropout_p, seed, compute_stats
        )
        ctx.save_for_backward(q, k, v, out, lse, lengths, rotation)
        ctx.segments, ctx.scale, ctx.dropout_p, ctx.seed, ctx.kernels = segments, scale, dropout_p, seed, kernels
        ctx.mark_non_differentiable(lse, key_mean, mass, query)
        return out, lse, key_mean, mass, query

    @staticmethod
    def backward(ctx, grad_out, *unused):
        q, k, v, out, lse, lengths, rotation = ctx.saved_tensors
        dq, dk, dv = ctx.kernels.bwd(
            grad_out.contiguous(), q, k, v, out, lse, ctx.segments, lengths, rotation,
            ctx.scale, ctx.dropout_p, ctx.seed,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` (possibly ``"auto"``) to ``"cpp"``, ``"triton"`` or ``"reference"``."""
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and HAS_CPP:
            return "cpp"
        if device.type == "cpu":
            _warn_missing_cpp_once()
        return "reference"
    if backend == "cpp":
        if not HAS_CPP:
            raise RuntimeError(f"backend='cpp': the C++ kernels are not built ({CPP_IMPORT_ERROR}); {BUILD_HINT}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp': runs on CPU tensors only, got tensors on {device}; use backend='triton'")
    if backend == "triton":
        if device.type == "cpu" and not triton_interpret():
            raise ValueError(
                "backend='triton': CPU tensors need TRITON_INTERPRET=1 set before Triton is imported "
                "(Triton's interpreter); on CPU use backend='cpp' or 'reference'"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton': expected CUDA tensors, got tensors on {device}")
    return backend


def _kernels_for(backend: str, device: torch.device) -> KernelPair:
    if backend == "triton" and device.type == "cpu":
        from .triton import launch  # interpreter path: launch directly, not through the dispatcher

        return KernelPair(launch.attention_fwd, launch.attention_bwd)
    if backend == "triton":  # the triton_ops: torch.compile traces into their kernels
        from .triton import register

        return KernelPair(register.triton_attention_fwd, register.triton_attention_bwd)
    return _registered_ops()


def draw_seed() -> int:
    """A dropout seed from torch's default generator, in ``[0, 2**31)``."""
    return int(torch.randint(0, SEED_LIMIT, (1,)).item())


def rollingq_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Sequence[int],
    *,
    lengths: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
    compute_stats: bool = True,
) -> tuple[torch.Tensor, AttentionStats | None]:
    """Rotated class-query attention returning RollingQ statistics for free.

    See ``docs/op.md`` for the full contract.

    Args:
        q: ``(B, H, N, Dh)`` or ``(B, H, 1, Dh)`` (class-only); float16/bfloat16/float32/float64.
        k, v: ``(B, H, N, Dh)``, same dtype and device as ``q``.
        segments: ``(L_1, …, L_M)``, ``M ≥ 2``, ``N == 1 + sum(segments)``.
        lengths: optional ``(B, M)`` integer tensor of valid tokens per modality.
        rotation: optional ``(H·Dh, H·Dh)`` or ``(H, Dh, Dh)`` rotation of the class query.
        scale: score scale (default ``Dh ** -0.5``).
        dropout_p: probability dropout in ``[0, 1)`` with the counter-based mask.
        seed: dropout seed in ``[0, 2**31)``; drawn from torch's generator if None.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.
        compute_stats: skip the statistics when False (``stats`` is then None).

    Returns:
        ``(out, stats)``: ``out`` has the shape and dtype of ``q``;
        ``stats`` is an :class:`AttentionStats` of the class-token row.
    """
    shape = check_inputs(q, k, v, segments, lengths, rotation, scale, dropout_p, seed, backend)
    if not isinstance(compute_stats, bool):
        raise TypeError(f"compute_stats: expected a bool, got {type(compute_stats).__name__}")
    segs = list(shape.segments)
    scale = shape.head_dim**-0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed()
    seed = 0 if seed is None else int(seed)
    chosen = resolve_backend(backend, q.device)
    if chosen != "cpp":  # the C++ kernels check the rotation's values themselves
        check_rotation_values(rotation)
    if chosen == "reference":
        return rollingq_attention_reference(
            q, k, v, segs, lengths=lengths, rotation=rotation, scale=scale,
            dropout_p=dropout_p, seed=seed, compute_stats=compute_stats,
        )
    lengths64 = None if lengths is None else lengths.to(torch.int64).contiguous()
    kernels = _kernels_for(chosen, q.device)
    out, _lse, key_mean, mass, query = RollingQAttentionFunction.apply(
        q, k, v, segs, lengths64, rotation, scale, dropout_p, seed, compute_stats, kernels
    )
    if not compute_stats:
        return out, None
    return out, finish_stats(key_mean, mass, query, lengths64, segs)
