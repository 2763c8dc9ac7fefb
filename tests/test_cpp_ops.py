"""The registered ops of the C++ extension (csrc/ops.cpp): ``torch.ops.rollingq.attention_fwd``/``_bwd``.

Their schemas against ``_library``, opcheck of both ops, non-contiguous inputs, ``compute_stats=False``,
torch.compile through the registered fake, empty batches, and the argument checks: every bad input is
refused with an error naming the argument. The kernels' numerics: ``test_cpp_kernels.py``.
"""

from __future__ import annotations

import re

import pytest
import torch
from cpp_cases import case_inputs, fwd_args, make_inputs

import rollingq_kernels
from rollingq_kernels import _library, rollingq_attention
from rollingq_kernels.stats import KERNEL_STATISTICS, KernelOutputs

pytestmark = pytest.mark.skipif(not rollingq_kernels.HAS_CPP, reason="rollingq_kernels._C (C++ kernels) not built")


@pytest.mark.parametrize("name", ["aq-lengths-empty-modality", "co-lengths-M3"])
@pytest.mark.parametrize("permuted", [False, True])
def test_opcheck_both_ops(name, permuted):
    q, k, v, segs, lengths, rotation = case_inputs(name, torch.float32)
    if permuted:  # same values, non-contiguous strides
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        assert not k.is_contiguous()
    args = fwd_args(q, k, v, segs, lengths, rotation, dropout_p=0.1, seed=11)
    torch.library.opcheck(torch.ops.rollingq.attention_fwd.default, args)
    torch.library.opcheck(torch.ops.rollingq.attention_fwd.default, args[:-1] + (False,))
    fwd = KernelOutputs(*torch.ops.rollingq.attention_fwd(*args))
    out, lse = fwd.out, fwd.lse
    g = torch.randn_like(out)
    if permuted:
        g = g.transpose(1, 2).contiguous().transpose(1, 2)
    bwd_args = (g, q, k, v, out, lse, segs, lengths, rotation, args[6], 0.1, 11)
    torch.library.opcheck(torch.ops.rollingq.attention_bwd.default, bwd_args)


def test_non_contiguous_inputs_give_the_same_result():
    q, k, v, segs, lengths, rotation = case_inputs("aq-M3-odd", torch.float32)
    args = fwd_args(q, k, v, segs, lengths, rotation)
    perm = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    a = torch.ops.rollingq.attention_fwd(*args)
    b = torch.ops.rollingq.attention_fwd(*perm, *args[3:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_compute_stats_false_returns_empty_stats_and_same_output():
    q, k, v, segs, lengths, rotation = case_inputs("aq-lengths-empty-modality", torch.float32)
    with_stats = KernelOutputs(*torch.ops.rollingq.attention_fwd(*fwd_args(q, k, v, segs, lengths, rotation)))
    without = KernelOutputs(*torch.ops.rollingq.attention_fwd(*fwd_args(q, k, v, segs, lengths, rotation,
                                                                        compute_stats=False)))
    assert torch.equal(with_stats.out, without.out) and torch.equal(with_stats.lse, without.lse)
    for stat in KERNEL_STATISTICS:
        t = getattr(without, stat.name)
        assert t.shape == (0,) and t.dtype == stat.dtype, stat.name


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v, segs, lengths, rotation = case_inputs("aq-lengths-empty-modality", torch.float32)
    g = torch.randn(q.shape)

    def f(q, k, v):
        out, stats = rollingq_attention(q, k, v, segs, lengths=lengths, rotation=rotation, backend="cpp")
        return out, stats.cos

    compiled = torch.compile(f, fullgraph=True)  # inductor: the op runs through its registered fake
    leaves_c = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_e = [t.clone().requires_grad_() for t in (q, k, v)]
    out_c, cos_c = compiled(*leaves_c)
    out_e, cos_e = f(*leaves_e)
    out_c.backward(g)
    out_e.backward(g)
    assert torch.equal(out_c, out_e)
    torch.testing.assert_close(cos_c, cos_e, rtol=1e-6, atol=1e-7)
    for a, b in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_registered_schemas_equal_ops_module():
    assert str(torch.ops.rollingq.attention_fwd.default._schema) == "rollingq::" + _library.FWD_SCHEMA
    assert str(torch.ops.rollingq.attention_bwd.default._schema) == "rollingq::" + _library.BWD_SCHEMA


def _good_args():
    q, k, v = make_inputs(2, 3, 8, 4, torch.float32)
    return dict(q=q, k=k, v=v, segments=[3, 4], lengths=torch.tensor([[3, 4], [0, 1]]), rotation=None,
                scale=0.5, dropout_p=0.0, seed=0, compute_stats=True)


# case -> (override, the argument the message names, the Python exception: ValueError for shapes,
# sizes and values, TypeError for dtypes; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE in csrc/ops.cpp)
BAD_INPUTS = {
    "q rank": (dict(q=torch.randn(2, 3, 8)), "q", ValueError),
    "k rank": (dict(k=torch.randn(2, 3, 8, 4, 1)), "k", ValueError),
    "v shape": (dict(v=torch.randn(2, 3, 7, 4)), "v", ValueError),
    "q shape": (dict(q=torch.randn(2, 3, 5, 4)), "q", ValueError),
    "dtype mismatch": (dict(v=torch.randn(2, 3, 8, 4, dtype=torch.float64)), "q, k, v", TypeError),
    "int dtype": (dict(q=torch.ones(2, 3, 8, 4, dtype=torch.int32)), "q", TypeError),
    "N mismatch": (dict(segments=[3, 5]), "segments", ValueError),
    "one modality": (dict(segments=[7]), "segments", ValueError),
    "zero segment": (dict(segments=[7, 0]), "segments", ValueError),
    "negative segment": (dict(segments=[9, -2]), "segments", ValueError),
    "lengths too long": (dict(lengths=torch.tensor([[3, 5], [0, 1]])), "lengths", ValueError),
    "lengths negative": (dict(lengths=torch.tensor([[3, 4], [-1, 1]])), "lengths", ValueError),
    "lengths shape": (dict(lengths=torch.tensor([[3, 4, 1], [0, 1, 1]])), "lengths", ValueError),
    "lengths dtype": (dict(lengths=torch.tensor([[3, 4], [0, 1]], dtype=torch.int32)), "lengths", TypeError),
    "rotation shape": (dict(rotation=torch.eye(4)), "rotation", ValueError),
    "rotation per-head shape": (dict(rotation=torch.randn(2, 4, 4)), "rotation", ValueError),
    "rotation dtype": (dict(rotation=torch.eye(12, dtype=torch.float16)), "rotation", TypeError),
    "dropout_p": (dict(dropout_p=1.0), "dropout_p", ValueError),
    "seed": (dict(seed=-1), "seed", ValueError),
    "scale": (dict(scale=float("nan")), "scale", ValueError),
    "zero head dim": (dict(q=torch.randn(2, 3, 8, 0), k=torch.randn(2, 3, 8, 0), v=torch.randn(2, 3, 8, 0)), "k",
                      ValueError),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_forward_op_rejects_bad_input_naming_the_argument(case):
    override, name, error = BAD_INPUTS[case]
    args = {**_good_args(), **override}
    with pytest.raises(error, match=rf"^{re.escape(name)}: "):
        torch.ops.rollingq.attention_fwd(*args.values())


def test_size_bound_message_matches_the_check():
    # N * Dh = 2**31 exactly must be refused ("below 2**31"). Expanded views: no memory is allocated,
    # and the size check runs before the lengths check (whose bad shape would fail any later).
    Dh, segs = 2**16, [2**14 - 1, 2**14]
    N = 1 + sum(segs)
    assert N * Dh == 2**31
    k = torch.zeros(1).expand(1, 1, N, Dh)
    q = torch.zeros(1).expand(1, 1, 1, Dh)
    bad_lengths = torch.zeros(3, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^k: N \* Dh must be below 2\*\*31, got N \* Dh = 32768 \* 65536 = "
                                         r"2147483648 for shape"):
        torch.ops.rollingq.attention_fwd(q, k, k, segs, bad_lengths, None, 1.0, 0.0, 0, True)
    k = torch.zeros(1).expand(1, 1, N - 1, Dh)  # 2**31 - Dh: within the bound, so the lengths check speaks
    with pytest.raises(ValueError, match=r"^lengths: expected shape"):
        torch.ops.rollingq.attention_fwd(q, k, k, [segs[0] - 1, segs[1]], bad_lengths, None, 1.0, 0.0, 0, True)


@pytest.mark.parametrize("Dh", [2**31, 2**40])
def test_size_bound_holds_when_n_times_dh_overflows_int64_on_an_empty_batch(Dh):
    # B = 0: no elements, so any N and Dh make a valid tensor; N * Dh = 2**64 (0 when wrapped) or
    # 2**73 must still be refused, and the message must not print a wrapped product
    segs = [2**32, 2**33 - 2**32 - 1]
    N = 1 + sum(segs)
    k = torch.zeros(1).expand(0, 1, N, Dh)
    q = torch.zeros(1).expand(0, 1, 1, Dh)
    with pytest.raises(ValueError, match=rf"^k: N \* Dh must be below 2\*\*31, got N \* Dh = {N} \* {Dh} = "
                                         r"more than 2\*\*63 for shape"):
        torch.ops.rollingq.attention_fwd(q, k, k, segs, None, None, 1.0, 0.0, 0, False)


@pytest.mark.parametrize("class_only", [False, True])
@pytest.mark.parametrize("B,H", [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_or_heads_give_empty_results(B, H, class_only):
    N, Dh, segs = 8, 4, [3, 4]
    nq = 1 if class_only else N
    q, k, v = torch.randn(B, H, nq, Dh), torch.randn(B, H, N, Dh), torch.randn(B, H, N, Dh)
    lengths = torch.zeros(B, 2, dtype=torch.int64)
    rotation = torch.eye(H * Dh)
    fwd = KernelOutputs(*torch.ops.rollingq.attention_fwd(q, k, v, segs, lengths, rotation, 0.5, 0.1, 3, True))
    assert fwd.out.shape == (B, H, nq, Dh) and fwd.out.dtype == q.dtype and fwd.lse.shape == (B, H, nq)
    for stat in KERNEL_STATISTICS:
        assert getattr(fwd, stat.name).shape == stat.shape_of(B, H, 2, Dh), stat.name
    g = torch.randn(B, H, nq, Dh)
    dq, dk, dv = torch.ops.rollingq.attention_bwd(g, q, k, v, fwd.out, fwd.lse, segs, lengths, rotation, 0.5, 0.1, 3)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    nostats = KernelOutputs(*torch.ops.rollingq.attention_fwd(q, k, v, segs, None, None, 0.5, 0.0, 0, False))
    assert nostats.out.shape == (B, H, nq, Dh)
    assert all(getattr(nostats, stat.name).shape == (0,) for stat in KERNEL_STATISTICS)


@pytest.mark.parametrize("per_head", [False, True])
def test_ops_reject_a_non_finite_rotation_with_a_value_error(per_head):
    args = _good_args()
    rotation = torch.eye(4).repeat(3, 1, 1) if per_head else torch.eye(12)
    rotation[..., 2, 1] = float("inf")
    args["rotation"] = rotation.mT  # a transposed view: read in place by the kernels
    with pytest.raises(ValueError, match=r"rotation: expected finite values, got NaN or inf"):
        torch.ops.rollingq.attention_fwd(*args.values())
    good = {**args, "rotation": torch.eye(12)}
    fwd = KernelOutputs(*torch.ops.rollingq.attention_fwd(*good.values()))
    out, lse = fwd.out, fwd.lse
    bwd = (torch.randn_like(out), args["q"], args["k"], args["v"], out, lse, args["segments"], args["lengths"],
           args["rotation"], args["scale"], 0.0, 0)
    with pytest.raises(ValueError, match=r"rotation: expected finite values"):
        torch.ops.rollingq.attention_bwd(*bwd)
    nan_q = {**good, "q": torch.full_like(args["q"], float("nan"))}  # NaN from q, R finite: no error
    assert torch.isnan(KernelOutputs(*torch.ops.rollingq.attention_fwd(*nan_q.values())).out[:, :, 0]).all()


@pytest.mark.parametrize(
    "override,name,error",
    [
        (dict(lse=torch.zeros(2, 3, 7)), "lse", ValueError),
        (dict(lse=torch.zeros(2, 3, 8, dtype=torch.float64)), "lse", TypeError),
        (dict(grad_out=torch.zeros(2, 3, 1, 4)), "grad_out", ValueError),
        (dict(out=torch.zeros(2, 3, 8, 4, dtype=torch.float64)), "out", TypeError),
        (dict(segments=[2, 4]), "segments", ValueError),
        (dict(lengths=torch.tensor([[4, 4], [0, 1]])), "lengths", ValueError),
    ],
)
def test_backward_op_rejects_bad_input_naming_the_argument(override, name, error):
    a = _good_args()
    fwd = KernelOutputs(*torch.ops.rollingq.attention_fwd(*a.values()))
    out, lse = fwd.out, fwd.lse
    args = dict(grad_out=torch.randn_like(out), q=a["q"], k=a["k"], v=a["v"], out=out, lse=lse,
                segments=a["segments"], lengths=a["lengths"], rotation=None, scale=0.5, dropout_p=0.0, seed=0)
    args.update(override)
    with pytest.raises(error, match=rf"^{name}: "):
        torch.ops.rollingq.attention_bwd(*args.values())
