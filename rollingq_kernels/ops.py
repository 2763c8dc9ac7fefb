"""The op: backend dispatch and the public :func:`rollingq_attention`.

Two ops live in the ``rollingq`` namespace (schemas, loading of the compiled
extension, fake kernels and the autograd formula: :mod:`rollingq_kernels._library`):

* ``rollingq::attention_fwd`` -> ``(out, lse, <kernel statistics>)``, named by
  :class:`~rollingq_kernels.stats.KernelOutputs` (built from the statistics table)
* ``rollingq::attention_bwd`` -> ``(dq, dk, dv)``

The C++ extension implements them for CPU, the Triton package for CUDA, where
:func:`rollingq_attention` calls its ``triton_op`` twins
``rollingq::triton_attention_fwd/bwd`` (same schemas and autograd, traceable by
``torch.compile``; :mod:`rollingq_kernels.triton.register`). The Triton package
is imported at import only where CUDA is available (its tensors use the Triton
backend), elsewhere on the first use of the Triton backend
(:func:`load_triton`): importing Triton costs time, and
``TRITON_INTERPRET`` must be set before it. :func:`rollingq_attention`
validates and dispatches; the eager reference is one more backend, called as
is; Triton's CPU interpreter (tests) launches the Triton functions directly
through :class:`_InterpretedTriton`, because the op's CPU kernel is the C++ one.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from ._library import BUILD_HINT, CPP_IMPORT_ERROR, HAS_CPP, backward_inputs, save_for_backward, triton_interpret
from .checks import check_inputs, check_rotation_values
from .dropout import SEED_LIMIT
from .flex import rollingq_attention_flex
from .forward_ad import output_tangent
from .reference import rollingq_attention_reference
from .stats import AttentionStats, KernelOutputs, stats_from_outputs

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


_warned_eager_devices: set[str] = set()


def _warn_eager_device_once(device: torch.device) -> None:
    """``backend="auto"`` on a device without kernels (MPS, XPU, …): the reference runs; say so once per type.

    The message names MPS (the device users meet this on); an explicit ``backend="reference"`` is silent.
    """
    if device.type not in _warned_eager_devices:
        _warned_eager_devices.add(device.type)
        logger.warning(
            "rollingq_kernels: backend='auto' on %s tensors: no fused kernels for this device, the eager reference "
            "runs (it materializes the (B, H, Nq, N) scores); pass backend='reference' to silence this.",
            device.type.upper() if device.type == "mps" else device.type,
        )


def has_triton() -> bool:
    """True when Triton is installed (it ships with torch's CUDA wheels); does not import it."""
    return importlib.util.find_spec("triton") is not None


def load_triton() -> ModuleType:
    """Import the Triton kernels (once) and return their module.

    Importing it registers the CUDA kernels of the two ``rollingq`` ops;
    :func:`rollingq_attention` calls this on the first use of the Triton
    backend. Call it yourself before calling ``torch.ops.rollingq.*`` on CUDA
    tensors directly.

    Raises:
        RuntimeError: Triton is not installed.
    """
    if not has_triton():
        raise RuntimeError("backend='triton': Triton is not installed (it comes with torch's CUDA builds)")
    # The one optional first-party import of the kernel package (docs/architecture.md, "Optional imports").
    from . import triton as triton_kernels

    return triton_kernels


if has_triton() and torch.cuda.is_available():  # a CUDA machine: Triton is the backend its tensors use
    load_triton()


class _InterpretedTriton(torch.autograd.Function):
    """The Triton launchers on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``; tests only).

    The same saved tensors and backward arguments as the registered autograd formula; a second
    derivative raises (``once_differentiable``); forward-mode AD gives ``out`` the tangent of
    :func:`~rollingq_kernels.forward_ad.output_tangent`, as the registered op does.
    """

    @staticmethod
    def forward(q, k, v, segments, lengths, rotation, scale, dropout_p, seed, compute_stats):
        outputs = load_triton().attention_fwd(q, k, v, segments, lengths, rotation, scale, dropout_p, seed,
                                              compute_stats)
        return tuple(outputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_for_backward(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])
        ctx.op_arguments = inputs[3:9]  # segments, lengths, rotation, scale, dropout_p, seed
        ctx.attention_bwd = load_triton().attention_bwd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_unused):
        dq, dk, dv = ctx.attention_bwd(*backward_inputs(ctx, grad_out))
        return dq, dk, dv, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dq, dk, dv, *_unused):
        q, k, v = ctx.saved_tensors
        tangent = output_tangent(q, k, v, (dq, dk, dv), *ctx.op_arguments)
        return (tangent,) + (None,) * (len(KernelOutputs._fields) - 1)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` (possibly ``"auto"``, which never picks ``"flex"``) to the backend that runs."""
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and HAS_CPP:
            return "cpp"
        if device.type == "cpu":
            _warn_missing_cpp_once()
        else:
            _warn_eager_device_once(device)
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
        q: ``(B, H, N, Dh)`` or ``(B, H, 1, Dh)`` (class-query-only); float16/bfloat16/float32/float64.
        k, v: ``(B, H, N, Dh)``, same dtype and device as ``q``.
        segments: ``(L_1, …, L_M)``, ``M ≥ 2``, ``N == 1 + sum(segments)``.
        lengths: optional ``(B, M)`` integer tensor of valid tokens per modality.
        rotation: optional ``(H·Dh, H·Dh)`` or ``(H, Dh, Dh)`` rotation of the class query.
        scale: score scale (default ``Dh ** -0.5``).
        dropout_p: probability dropout in ``[0, 1)`` with the counter-based mask.
        seed: dropout seed in ``[0, 2**31)``; drawn from torch's generator if None.
        backend: ``"auto"``, ``"cpp"``, ``"triton"``, ``"reference"`` or ``"flex"`` (FlexAttention, no dropout).
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
    if chosen == "flex":
        return rollingq_attention_flex(q, k, v, segs, lengths=lengths, rotation=rotation, scale=scale,
                                       compute_stats=compute_stats)
    if chosen == "reference":
        return rollingq_attention_reference(
            q, k, v, segs, lengths=lengths, rotation=rotation, scale=scale,
            dropout_p=dropout_p, seed=seed, compute_stats=compute_stats,
        )
    lengths64 = None if lengths is None else lengths.to(torch.int64).contiguous()
    args = (q, k, v, segs, lengths64, rotation, scale, dropout_p, seed, compute_stats)
    if chosen == "triton" and q.device.type == "cpu":  # the interpreter: not through the dispatcher
        outputs = KernelOutputs(*_InterpretedTriton.apply(*args))
    elif chosen == "triton":  # CUDA: the triton_op, so torch.compile traces into its kernels
        if not torch.compiler.is_compiling():
            load_triton()  # a no-op after the first call (Python caches the module)
        outputs = KernelOutputs(*torch.ops.rollingq.triton_attention_fwd(*args))
    else:
        outputs = KernelOutputs(*torch.ops.rollingq.attention_fwd(*args))
    if not compute_stats:
        return outputs.out, None
    return outputs.out, stats_from_outputs(outputs, lengths64, segs)
