"""Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) through the op on every CPU backend.

The tangents are checked in float64 against central finite differences and against the reference's own jvp
(plain PyTorch, exact). Under ``TRITON_INTERPRET=1`` the Triton backend is checked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import rollingq_kernels
from rollingq_kernels import rollingq_attention
from rollingq_kernels._library import triton_interpret
from rollingq_kernels.reference import key_valid_mask
from rollingq_kernels.stats import KernelOutputs

F64 = torch.float64
SEGS = [4, 3, 5]
BACKENDS = ["reference"] + (["cpp"] if rollingq_kernels.HAS_CPP else []) + (["triton"] if triton_interpret() else [])


def _case(class_only: bool, seed: int, padded: bool = True):
    """Inputs and tangents with odd sizes, an empty modality and NaN in every padded position."""
    g = torch.Generator().manual_seed(seed)
    B, H, Dh = 3, 2, 5
    N = 1 + sum(SEGS)
    nq = 1 if class_only else N
    q, tq = (torch.randn(B, H, nq, Dh, generator=g, dtype=F64) for _ in range(2))
    k, v, tk, tv = (torch.randn(B, H, N, Dh, generator=g, dtype=F64) for _ in range(4))
    lengths = torch.tensor([[4, 0, 2], [1, 3, 5], [3, 2, 1]]) if padded else None
    if padded:
        bad = ~key_valid_mask(lengths, SEGS, B, k.device)[:, None, :, None]
        k, v, tk, tv = (t.masked_fill(bad, float("nan")) for t in (k, v, tk, tv))
        if not class_only:
            q, tq = (t.masked_fill(bad, float("nan")) for t in (q, tq))
    rotation = torch.linalg.qr(torch.randn(H, Dh, Dh, generator=g, dtype=F64))[0]
    kw = dict(lengths=lengths, rotation=rotation, scale=0.7, dropout_p=0.25, seed=17)
    return (q, k, v), (tq, tk, tv), kw


def _finite_difference(fn, primals, tangents, eps=1e-6):
    plus = fn(*(p + eps * t for p, t in zip(primals, tangents)))
    minus = fn(*(p - eps * t for p, t in zip(primals, tangents)))
    return (plus - minus) / (2 * eps)


def _assert_tangent(got, want, atol):
    torch.testing.assert_close(torch.nan_to_num(got, nan=1e30), torch.nan_to_num(want, nan=1e30), atol=atol, rtol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_tangents_match_finite_differences_and_the_reference(backend, class_only, api):
    primals, tangents, kw = _case(class_only, seed=3)

    def fn(q, k, v):
        return rollingq_attention(q, k, v, SEGS, backend=backend, **kw)[0]

    def ref(q, k, v):
        return rollingq_attention(q, k, v, SEGS, backend="reference", **kw)[0]

    if api == "func.jvp":
        out, tangent = torch.func.jvp(fn, primals, tangents)
    else:
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents))))
            out, tangent = dual.primal, dual.tangent
    assert tangent is not None, f"{backend}: no tangent"
    assert torch.isfinite(tangent).all()
    _, want = torch.func.jvp(ref, primals, tangents)
    _assert_tangent(tangent, want, atol=1e-9)
    _assert_tangent(tangent, _finite_difference(ref, primals, tangents), atol=1e-6)
    torch.testing.assert_close(out, fn(*primals), rtol=0, atol=0)  # the primal is the plain call's


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tangent_on_one_input_only(backend):
    primals, (_, _, tv), kw = _case(class_only=False, seed=4, padded=False)
    q, k, v = primals

    def fn(v):
        return rollingq_attention(q, k, v, SEGS, backend=backend, **kw)[0]

    _, got = torch.func.jvp(fn, (v,), (tv,))
    _assert_tangent(got, _finite_difference(fn, (v,), (tv,)), atol=1e-6)


@pytest.mark.skipif(not rollingq_kernels.HAS_CPP, reason="rollingq_kernels._C (C++ kernels) not built")
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_the_raw_op_has_forward_ad(class_only):
    (q, k, v), tangents, kw = _case(class_only, seed=5)
    args = (SEGS, kw["lengths"], kw["rotation"], kw["scale"], kw["dropout_p"], kw["seed"], True)

    def raw(q, k, v):
        return KernelOutputs(*torch.ops.rollingq.attention_fwd(q, k, v, *args)).out

    _, got = torch.func.jvp(raw, (q, k, v), tangents)
    _, want = torch.func.jvp(lambda *x: rollingq_attention(*x, SEGS, backend="reference", **kw)[0], (q, k, v),
                             tangents)
    _assert_tangent(got, want, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_over_reverse_still_gives_the_gradient(backend):
    """A dual input that also requires grad: the tangent is right and the backward still runs."""
    (q, k, v), (tq, tk, tv), kw = _case(class_only=False, seed=6, padded=False)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(leaves, (tq, tk, tv))]
        out = rollingq_attention(*duals, SEGS, backend=backend, **kw)[0]
        tangent = fwAD.unpack_dual(out).tangent
        grads = torch.autograd.grad(fwAD.unpack_dual(out).primal.sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = rollingq_attention(*ref_leaves, SEGS, backend="reference", **kw)[0]
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), ref_leaves)):  # limited by the float32 lse (docs/op.md)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    _, want = torch.func.jvp(lambda *x: rollingq_attention(*x, SEGS, backend="reference", **kw)[0], (q, k, v),
                             (tq, tk, tv))
    _assert_tangent(tangent.detach(), want, atol=1e-9)


@pytest.mark.skipif(not triton_interpret(), reason="needs TRITON_INTERPRET=1 (the triton_op on CPU tensors)")
def test_the_triton_op_has_forward_ad():
    from rollingq_kernels.triton import register

    (q, k, v), tangents, kw = _case(class_only=False, seed=7)
    args = (SEGS, kw["lengths"], kw["rotation"], kw["scale"], kw["dropout_p"], kw["seed"], True)
    _, got = torch.func.jvp(lambda *x: KernelOutputs(*register.triton_attention_fwd(*x, *args)).out, (q, k, v),
                            tangents)
    _, want = torch.func.jvp(lambda *x: rollingq_attention(*x, SEGS, backend="reference", **kw)[0], (q, k, v),
                             tangents)
    _assert_tangent(got, want, atol=1e-9)
