"""The op library: the ``rollingq`` op schemas, the compiled extension and the fake kernels.

This is the bottom layer of the kernel package; it imports only modules of the same layer (the
statistics table :mod:`rollingq_kernels.stats` and the forward-mode AD formula
:mod:`rollingq_kernels.forward_ad`). It

* holds the two schemas (:data:`FWD_SCHEMA`, :data:`BWD_SCHEMA`): the one
  definition the C++ registration (``csrc/ops.cpp``) is checked against
  (``tests/test_cpp_kernels.py``) and the one the fallback below defines;
* loads ``rollingq_kernels._C`` (the C++ CPU kernels, which register the ops
  with ``TORCH_LIBRARY``) or, when it is missing, defines the schemas itself so
  the Triton path and ``torch.compile`` still work (:data:`HAS_CPP` says which);
* registers the fake (meta) implementations ``torch.compile`` and ``opcheck``
  use;
* registers the op's autograd formula (``torch.library.register_autograd``):
  ``torch.ops.rollingq.attention_fwd`` is differentiable in ``q``, ``k``, ``v``
  on every device, its backward is ``rollingq::attention_bwd``, and a second
  derivative raises :data:`DOUBLE_BACKWARD_ERROR` (as PyTorch's fused attention
  does) instead of returning zeros; under forward-mode AD (``torch.func.jvp``,
  ``torch.autograd.forward_ad``) the forward's ``out`` gets the tangent of
  :func:`~rollingq_kernels.forward_ad.output_tangent` (a custom op's registered
  autograd formula alone would drop the tangents silently);
* answers whether Triton runs in its CPU interpreter (:func:`triton_interpret`).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.autograd.forward_ad as fwAD
from torch._library.autograd import Info, make_autograd_impl  # the kernel torch.library.register_autograd builds

from .forward_ad import output_tangent, tangents_of
from .stats import KernelOutputs, empty_kernel_stats, forward_outputs_schema

#: ``rollingq::attention_fwd`` (without the namespace); its outputs are ``out``, ``lse`` and the kernel
#: statistics of :data:`rollingq_kernels.stats.STATISTICS` (:class:`~rollingq_kernels.stats.KernelOutputs`).
FWD_SCHEMA = (
    "attention_fwd(Tensor q, Tensor k, Tensor v, int[] segments, Tensor? lengths, "
    "Tensor? rotation, float scale, float dropout_p, int seed, bool compute_stats) "
    "-> " + forward_outputs_schema()
)
#: ``rollingq::attention_bwd`` (without the namespace).
BWD_SCHEMA = (
    "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "int[] segments, Tensor? lengths, Tensor? rotation, float scale, float dropout_p, int seed) "
    "-> (Tensor dq, Tensor dk, Tensor dv)"
)

#: How to get the compiled kernels (used in messages).
BUILD_HINT = (
    "build them with `pip install --no-build-isolation -e .` "
    "(unset ROLLINGQ_SKIP_EXTENSION; needs a C++ compiler)"
)

try:  # the compiled CPU kernels; importing registers the ops with the dispatcher
    from . import _C  # type: ignore[attr-defined]  # noqa: F401

    HAS_CPP = True
    CPP_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised in the skip-extension install
    HAS_CPP = False
    if importlib.util.find_spec("rollingq_kernels._C") is None:
        CPP_IMPORT_ERROR = "rollingq_kernels._C is not built"
    else:  # built but not loadable, e.g. compiled against another torch
        CPP_IMPORT_ERROR = f"rollingq_kernels._C failed to load: {exc}"
    _fallback_lib = torch.library.Library("rollingq", "DEF")  # noqa: TOR901
    _fallback_lib.define(FWD_SCHEMA)
    _fallback_lib.define(BWD_SCHEMA)


def triton_interpret() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: The message of a second derivative through the op (double backward is not implemented).
DOUBLE_BACKWARD_ERROR = (
    "rollingq_attention: double backward (a gradient of the op's gradient, e.g. torch.autograd.grad with "
    "create_graph=True followed by another grad) is not implemented by the fused kernels; "
    "use backend='reference' for second-order gradients"
)

#: Positions of the differentiable inputs q, k, v in the forward schema; the other 7 inputs get no gradient.
_NON_DIFFERENTIABLE_INPUTS = 7


def save_for_backward(ctx, inputs: tuple, outputs: tuple) -> None:
    """Keep what the backward needs: ``q, k, v, out, lse`` (never probabilities) and the op's arguments.

    ``inputs`` are the forward's 10 arguments, ``outputs`` its results (:class:`KernelOutputs`, or the
    plain tuple of the op). The statistics and ``lse`` are marked non-differentiable.
    """
    q, k, v, segments, lengths, rotation, scale, dropout_p, seed, _compute_stats = inputs
    named = KernelOutputs(*outputs)
    ctx.save_for_backward(q, k, v, named.out, named.lse, lengths, rotation)
    ctx.segments, ctx.scale, ctx.dropout_p, ctx.seed = list(segments), scale, dropout_p, seed
    ctx.mark_non_differentiable(*named[1:])


def backward_inputs(ctx, grad_out: torch.Tensor) -> tuple:
    """The arguments of ``attention_bwd`` for ``grad_out`` (the gradient of ``out``)."""
    q, k, v, out, lse, lengths, rotation = ctx.saved_tensors
    return (grad_out.contiguous(), q, k, v, out, lse, ctx.segments, lengths, rotation, ctx.scale,
            ctx.dropout_p, ctx.seed)


def _setup_context(ctx, inputs, output) -> None:
    save_for_backward(ctx, inputs, output)


def _setup_backward_context(ctx, inputs, output) -> None:
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


_impl_lib = torch.library.Library("rollingq", "IMPL")  # noqa: TOR901  (the forward op's autograd kernel)


def _register_with_forward_ad(fwd_name: str, backward) -> None:
    """``torch.library.register_autograd(fwd_name, backward)`` plus forward-mode AD of ``out``.

    The kernel ``register_autograd`` builds runs the op below autograd whenever no input requires a
    gradient, so dual inputs lose their tangents without an error. Wrapped here: when ``q``, ``k`` or
    ``v`` carries a tangent the op runs on the primals and ``out`` becomes a dual tensor with the tangent
    of :func:`~rollingq_kernels.forward_ad.output_tangent`; otherwise the generated kernel runs as is.
    """
    namespace, name = fwd_name.split("::")
    generated = make_autograd_impl(getattr(getattr(torch.ops, namespace), name).default,
                                   Info(backward, _setup_context))

    def autograd_kernel(keyset, *args):
        tangents = tangents_of(*args[:3])
        if all(t is None for t in tangents):
            return generated(keyset, *args)
        primals = [fwAD.unpack_dual(t).primal for t in args[:3]]
        outputs = generated(keyset, *primals, *args[3:])
        tangent = output_tangent(*primals, tangents, *args[3:9])
        return (fwAD.make_dual(outputs[0], tangent), *outputs[1:])

    _impl_lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def register_op_autograd(fwd_name: str, bwd_name: str) -> None:
    """Register the op's autograd formula on a forward/backward pair of ops with the two schemas.

    The forward's backward runs ``bwd_name`` on the saved ``q, k, v, out, lse``; the backward op's
    own backward raises :data:`DOUBLE_BACKWARD_ERROR` (it records a node only when a graph of the
    gradient is built, ``create_graph=True``; differentiating that node is the double backward the
    kernels do not implement). The forward also gets forward-mode AD (:func:`_register_with_forward_ad`;
    for a ``triton_op`` this replaces the autograd kernel it registered itself). Used for
    ``rollingq::attention_fwd/bwd`` here and for the Triton ``triton_op`` twins in
    :mod:`rollingq_kernels.triton.register`.
    """
    namespace, name = bwd_name.split("::")

    def backward(ctx, grad_out, *_unused):
        if grad_out is None:  # only the statistics were used: no gradient flows
            return (None,) * (3 + _NON_DIFFERENTIABLE_INPUTS)
        dq, dk, dv = getattr(getattr(torch.ops, namespace), name)(*backward_inputs(ctx, grad_out))
        return (dq, dk, dv) + (None,) * _NON_DIFFERENTIABLE_INPUTS

    _register_with_forward_ad(fwd_name, backward)
    torch.library.register_autograd(bwd_name, _no_double_backward, setup_context=_setup_backward_context)


register_op_autograd("rollingq::attention_fwd", "rollingq::attention_bwd")


@torch.library.register_fake("rollingq::attention_fwd")
def _attention_fwd_fake(q, k, v, segments, lengths, rotation, scale, dropout_p, seed, compute_stats):
    B, H, nq, Dh = q.shape
    lse = q.new_empty((B, H, nq), dtype=torch.float32)
    return tuple(KernelOutputs(torch.empty_like(q), lse, **empty_kernel_stats(q, segments, compute_stats)))


@torch.library.register_fake("rollingq::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, segments, lengths, rotation, scale, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
