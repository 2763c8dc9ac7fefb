"""Registration of the Triton launchers with PyTorch's dispatcher.

Two ``torch.library.triton_op`` ops carry the CUDA path:

* ``rollingq::triton_attention_fwd`` and ``rollingq::triton_attention_bwd`` have the schemas of
  ``rollingq::attention_fwd`` / ``rollingq::attention_bwd`` (:mod:`rollingq_kernels._library`)
  under their own names: the C++ extension defines those two with ``TORCH_LIBRARY``, and an op
  name has one definition. ``torch.compile`` traces into a ``triton_op`` (its kernels are
  launched through ``wrap_triton``), so Inductor sees the Triton kernels rather than an opaque
  call. :mod:`rollingq_kernels.ops` dispatches CUDA tensors to these two ops, which carry the same
  autograd formula (:func:`rollingq_kernels._library.register_op_autograd`).
* ``rollingq::attention_fwd`` / ``rollingq::attention_bwd`` also get a CUDA kernel that forwards
  to them, so the shared op names work on every device.

Importing this module registers everything, once per process.
"""

from __future__ import annotations

import torch

from .. import _library
from .launch import attention_bwd, attention_fwd

FWD_OP = "rollingq::triton_attention_fwd"
BWD_OP = "rollingq::triton_attention_bwd"


def _signature(schema: str) -> str:
    """``"(args) -> (outs)"`` of a schema ``"name(args) -> (outs)"``."""
    return schema[schema.index("(") :]


def _attention_fwd(q, k, v, segments, lengths, rotation, scale, dropout_p, seed, compute_stats):
    """:func:`~.launch.attention_fwd` as the op returns it: a plain tuple (callers name it with ``KernelOutputs``)."""
    return tuple(attention_fwd(q, k, v, segments, lengths, rotation, scale, dropout_p, seed, compute_stats))


def _define() -> tuple[torch._ops.OpOverload, torch._ops.OpOverload]:
    fwd = torch.library.triton_op(FWD_OP, _attention_fwd, mutates_args=(), schema=_signature(_library.FWD_SCHEMA))
    bwd = torch.library.triton_op(BWD_OP, attention_bwd, mutates_args=(), schema=_signature(_library.BWD_SCHEMA))
    return fwd._opoverload, bwd._opoverload


triton_attention_fwd, triton_attention_bwd = _define()
_library.register_op_autograd(FWD_OP, BWD_OP)


def _fwd_cuda(q, k, v, segments, lengths, rotation, scale, dropout_p, seed, compute_stats):
    return triton_attention_fwd(q, k, v, segments, lengths, rotation, scale, dropout_p, seed, compute_stats)


def _bwd_cuda(grad_out, q, k, v, out, lse, segments, lengths, rotation, scale, dropout_p, seed):
    return triton_attention_bwd(grad_out, q, k, v, out, lse, segments, lengths, rotation, scale, dropout_p, seed)


torch.library.register_kernel("rollingq::attention_fwd", "cuda", _fwd_cuda)
torch.library.register_kernel("rollingq::attention_bwd", "cuda", _bwd_cuda)
