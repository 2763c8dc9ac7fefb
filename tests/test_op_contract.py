"""The contract's edges on the reference and in the shared checks (docs/op.md): padding is never read,
B = 0 / H = 0 are empty calls, the scale is representable, the size bound says what it checks, and the
rotation gets no gradient on any backend."""

from __future__ import annotations

import pytest
import torch

import rollingq_kernels
from rollingq_kernels import rollingq_attention
from rollingq_kernels.checks import INDEX_LIMIT, check_inputs
from rollingq_kernels.reference import key_valid_mask
from rollingq_kernels.stats import STATISTICS

F64 = torch.float64
STAT_FIELDS = tuple(s.name for s in STATISTICS)  # every statistic of the table
SEGS = (5, 4, 6)
LENGTHS = torch.tensor([[3, 0, 6], [5, 1, 2], [1, 4, 0]])


def _inputs(B=3, H=2, Dh=7, segs=SEGS, class_only=False, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    N = 1 + sum(segs)
    q = torch.randn(B, H, 1 if class_only else N, Dh, generator=g, dtype=F64).to(dtype)
    k = torch.randn(B, H, N, Dh, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, H, N, Dh, generator=g, dtype=F64).to(dtype)
    grad = torch.randn(q.shape, generator=g, dtype=F64).to(dtype)
    rot = torch.linalg.qr(torch.randn(H * Dh, H * Dh, generator=g, dtype=F64))[0]
    return q, k, v, grad, rot


def _run(q, k, v, grad, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, stats = rollingq_attention(*leaves, list(SEGS), backend="reference", **kw)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), stats, grads


def _poison(q, k, v, lengths, value):
    """Copies of q, k, v with ``value`` in every padded key/value and padded query row."""
    pad = ~key_valid_mask(lengths, SEGS, k.shape[0], k.device)[:, None, :, None]  # (B, 1, N, 1)
    k, v = k.masked_fill(pad, value), v.masked_fill(pad, value)
    if q.shape[2] > 1:
        q = q.masked_fill(pad, value)
    return q, k, v, pad


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e300])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_reference_never_reads_padding(value, class_only, dropout_p):
    """NaN/inf/huge values in padded rows, keys and values change nothing: outputs, statistics and gradients
    are bitwise those of the same call with other padding; padded rows and their gradients are exactly 0."""
    q, k, v, grad, rot = _inputs(class_only=class_only)
    kw = dict(lengths=LENGTHS, rotation=rot, dropout_p=dropout_p, seed=5)
    clean = _run(q, k, v, grad, **kw)
    pq, pk, pv, pad = _poison(q, k, v, LENGTHS, value)
    dirty = _run(pq, pk, pv, grad, **kw)
    assert torch.equal(dirty[0], clean[0])
    for field in STAT_FIELDS:
        assert torch.equal(getattr(dirty[1], field), getattr(clean[1], field)), field
    for name, a, b in zip("qkv", dirty[2], clean[2]):
        assert torch.equal(a, b), f"d{name}"
        assert torch.isfinite(a).all(), f"d{name}"
    padded = pad.expand_as(k)
    assert (dirty[2][1][padded] == 0).all() and (dirty[2][2][padded] == 0).all()
    if not class_only:
        assert (dirty[0][padded] == 0).all() and (dirty[2][0][padded] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_rotation_that_requires_grad_is_refused_on_every_backend(backend):
    """Before: the reference gave R a gradient and the C++ backend gave None. Now both refuse it while
    gradients are recorded, and accept it under no_grad (nothing to differentiate)."""
    if backend == "cpp" and not rollingq_kernels.HAS_CPP:
        pytest.skip("C++ kernels not built")
    q, k, v, _, rot = _inputs(dtype=torch.float32)
    rot = rot.requires_grad_()
    with pytest.raises(ValueError, match=r"rotation: requires_grad=True.*rotation.detach\(\)"):
        rollingq_attention(q, k, v, SEGS, rotation=rot, backend=backend)
    with torch.no_grad():
        out, _ = rollingq_attention(q, k, v, SEGS, rotation=rot, backend=backend)
    ref, _ = rollingq_attention(q, k, v, SEGS, rotation=rot.detach(), backend=backend)
    assert torch.equal(out, ref)


def test_reference_called_directly_treats_the_rotation_as_a_constant():
    from rollingq_kernels.reference import rollingq_attention_reference

    q, k, v, grad, rot = _inputs()
    q.requires_grad_()
    rot.requires_grad_()
    out, _ = rollingq_attention_reference(q, k, v, SEGS, rotation=rot)
    assert out.requires_grad and rot.grad is None
    out.backward(grad)
    assert rot.grad is None and q.grad is not None


@pytest.mark.parametrize("B,H", [(0, 2), (3, 0), (0, 0)])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
@pytest.mark.parametrize("rotation", [None, "global", "per_head"])
def test_empty_batch_or_heads_give_empty_outputs_on_the_reference(B, H, class_only, rotation):
    Dh, M = 5, len(SEGS)
    N = 1 + sum(SEGS)
    q = torch.randn(B, H, 1 if class_only else N, Dh, requires_grad=True)
    k = torch.randn(B, H, N, Dh, requires_grad=True)
    v = torch.randn(B, H, N, Dh, requires_grad=True)
    rot = {None: None, "global": torch.eye(H * Dh), "per_head": torch.eye(Dh).repeat(H, 1, 1)}[rotation]
    lengths = torch.zeros(B, M, dtype=torch.int64)
    out, st = rollingq_attention(q, k, v, SEGS, lengths=lengths, rotation=rot, dropout_p=0.1, seed=1,
                                 backend="reference")
    assert out.shape == q.shape and out.dtype == q.dtype
    shapes = {"key_mean": (B, H, M, Dh), "mass": (B, H, M + 1), "cos": (B, M), "cos_per_head": (B, H, M),
              "query": (B, H, Dh), "valid": (B, M)}
    for field, shape in shapes.items():
        assert tuple(getattr(st, field).shape) == shape, field
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_zero_head_dim_is_still_refused():
    q = torch.randn(2, 2, 16, 0)
    with pytest.raises(ValueError, match=r"k: expected Dh >= 1"):
        rollingq_attention(q, q, q, SEGS, backend="reference")


@pytest.mark.parametrize(
    "dtype, scale, ok",
    [
        (torch.float32, 1e300, False), (torch.float16, 1e300, False), (torch.bfloat16, -1e39, False),
        (torch.float64, 1e300, True), (torch.float32, 3e38, True), (torch.float16, 1e5, True),
        (torch.float32, 1e-300, False), (torch.float32, 1e-30, True), (torch.float64, 1e-300, True),
        (torch.float32, 0.0, True), (torch.float32, -0.5, True), (torch.float32, 10**400, False),
    ],
)
def test_scale_must_be_representable_in_the_compute_dtype(dtype, scale, ok):
    q, k, v, _, _ = _inputs(B=1, H=1, Dh=4, dtype=dtype)
    if ok:
        out, _ = rollingq_attention(q, k, v, SEGS, scale=scale, backend="reference")
        assert out.shape == q.shape
    else:
        with pytest.raises(ValueError, match=r"^scale: "):
            rollingq_attention(q, k, v, SEGS, scale=scale, backend="reference")


def test_scale_1e300_in_float32_names_scale_and_the_dtypes():
    q, k, v, _, _ = _inputs(B=1, H=1, Dh=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"scale: 1e\+300 overflows the float32 scores of torch.float32 inputs"):
        rollingq_attention(q, k, v, SEGS, scale=1e300)


def _expanded(n: int, dh: int) -> torch.Tensor:
    """A (1, 1, n, dh) tensor without its memory (zero strides)."""
    return torch.zeros(()).expand(1, 1, n, dh)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_size_bound_message_matches_the_check(backend):
    """N·Dh = 2**31 is refused ("below 2**31" means strictly below); 2**31 − Dh passes the check."""
    dh = 2**10
    n = INDEX_LIMIT // dh  # N·Dh == 2**31
    segs = (n - 2, 1)
    t = _expanded(n, dh)
    with pytest.raises(ValueError, match=r"k: N \* Dh must be below 2\*\*31, got N \* Dh = 2097152 \* 1024 = "
                                         r"2147483648"):
        rollingq_attention(t, t, t, segs, backend=backend)
    t = _expanded(n - 1, dh)
    shape = check_inputs(t, t, t, (n - 3, 1), None, None, None, 0.0, None, backend)
    assert shape.n_keys * shape.head_dim == INDEX_LIMIT - dh
