"""The registered op is differentiable: ``torch.library.register_autograd`` on ``rollingq::attention_fwd``.

``torch.ops.rollingq.attention_fwd`` gets its gradient from ``rollingq::attention_bwd`` without the Python
wrapper, opcheck's autograd tests pass, and a second derivative raises a clear error (issue 15 item 2,
issue 13 item 3).
"""

from __future__ import annotations

import pytest
import torch

from rollingq_kernels import HAS_CPP
from rollingq_kernels.ops import rollingq_attention
from rollingq_kernels.stats import KernelOutputs

pytestmark = pytest.mark.skipif(not HAS_CPP, reason="needs the compiled C++ kernels (the op's CPU implementation)")

F64 = torch.float64
SEGS = [6, 5, 3]  # N = 15, M = 3


def _inputs(dtype, class_only: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, H, N, Dh = 3, 2, 1 + sum(SEGS), 5
    q = torch.randn(B, H, 1 if class_only else N, Dh, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, N, Dh, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, N, Dh, generator=g, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([[6, 5, 3], [2, 0, 3], [1, 5, 1]])
    rotation = torch.linalg.qr(torch.randn(H * Dh, H * Dh, generator=g, dtype=F64))[0].to(dtype)
    return q, k, v, lengths, rotation


def _op_args(q, k, v, lengths, rotation, dropout_p=0.0, seed=0):
    return (q, k, v, SEGS, lengths, rotation, q.shape[-1] ** -0.5, dropout_p, seed, True)


@pytest.mark.parametrize("class_only", [False, True])
def test_the_raw_op_has_the_reference_gradient(class_only):
    q, k, v, lengths, rotation = _inputs(F64, class_only)
    out = KernelOutputs(*torch.ops.rollingq.attention_fwd(*_op_args(q, k, v, lengths, rotation))).out
    assert out.requires_grad
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref, _ = rollingq_attention(q, k, v, SEGS, lengths=lengths, rotation=rotation, backend="reference")
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_raw_op_passes_gradcheck_with_dropout():
    q, k, v, lengths, rotation = _inputs(F64, class_only=False, seed=1)
    fn = lambda q, k, v: KernelOutputs(  # noqa: E731
        *torch.ops.rollingq.attention_fwd(*_op_args(q, k, v, lengths, rotation, 0.2, 7))).out
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("class_only", [False, True])
def test_opcheck_covers_autograd(class_only):
    q, k, v, lengths, rotation = _inputs(torch.float32, class_only, seed=2)
    torch.library.opcheck(
        torch.ops.rollingq.attention_fwd.default, _op_args(q, k, v, lengths, rotation.float(), 0.1, 3),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_statistics_of_the_raw_op_are_not_differentiable():
    q, k, v, lengths, rotation = _inputs(F64, class_only=True, seed=3)
    fwd = KernelOutputs(*torch.ops.rollingq.attention_fwd(*_op_args(q, k, v, lengths, rotation)))
    assert fwd.out.requires_grad and not any(getattr(fwd, name).requires_grad for name in fwd._fields[1:])


def test_double_backward_through_the_raw_op_raises():
    q, k, v, lengths, rotation = _inputs(F64, class_only=False, seed=4)
    out = KernelOutputs(*torch.ops.rollingq.attention_fwd(*_op_args(q, k, v, lengths, rotation))).out
    (dq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="rollingq_attention: double backward"):
        torch.autograd.grad(dq.sum(), (k,))
