"""The Triton kernels (forward.py, backward.py, class_only.py) against the float64 eager reference.

Run in Triton's interpreter on CPU as its own process (the variable must be set before Triton is imported):

    TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py tests/test_triton_launch.py tests/test_triton_configs.py

Shapes are tiny (N ~ 10-40) because the interpreter is slow; the interpreter uses a single
16×16 tile config, so every case spans several K and Q tiles. With CUDA and no interpreter the
same tests run on the GPU. Shared inputs and comparisons: ``triton_cases.py``.
"""

from __future__ import annotations

import pytest
import torch
from triton_cases import skip_without_triton

skip_without_triton()

from triton_cases import (  # noqa: E402
    DEVICE,
    FLOAT_STATS,
    INTERPRET,
    LENGTHS_2,
    LENGTHS_3,
    STATS_TOL,
    compare,
    make_inputs,
    random_rotation,
    run,
)

from rollingq_kernels import dropout_mask, rollingq_attention  # noqa: E402
from rollingq_kernels.stats import KERNEL_STATISTICS  # noqa: E402
from rollingq_kernels.triton import launch as ta  # noqa: E402
from rollingq_kernels.triton.launch import SPLITS_ENV  # noqa: E402

pytestmark = pytest.mark.triton_interpret


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_dtypes_with_lengths(dtype, class_only):
    out, grads, _ = compare([7, 11], class_only=class_only, dtype=dtype, lengths=LENGTHS_2, seed=1)
    if not class_only:  # padded query rows: exactly 0 output, no gradient
        pad_rows = [1 + 7 + 3 + i for i in range(8)]  # sample 1, modality 1 beyond length 3
        assert torch.count_nonzero(out[1, :, pad_rows]) == 0
        assert torch.count_nonzero(grads[0][1, :, pad_rows]) == 0

@pytest.mark.parametrize("rotation_kind", ["global", "per_head"])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_rotation_three_modalities_empty_modality(rotation_kind, class_only):
    compare([5, 7, 4], class_only=class_only, lengths=LENGTHS_3, rotation_kind=rotation_kind, seed=2)

@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_dropout_with_rotation_and_lengths(class_only):
    compare([5, 7, 4], class_only=class_only, lengths=LENGTHS_3, rotation_kind="per_head", dropout_p=0.3, seed=3)

@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_dropout_kept_positions_match_the_mask(class_only):
    """With one-hot values ``v[j] = e_j`` the output is ``P_d`` itself: non-zero exactly where kept."""
    segments, B, H, seed, p = [9, 13], 2, 3, 77, 0.4
    N = 1 + sum(segments)
    g = torch.Generator().manual_seed(5)
    nq = 1 if class_only else N
    q = torch.randn(B, H, nq, N, generator=g).to(DEVICE)
    k = torch.randn(B, H, N, N, generator=g).to(DEVICE)
    v = torch.eye(N).expand(B, H, N, N).contiguous().to(DEVICE)
    out, _ = rollingq_attention(q, k, v, segments, dropout_p=p, seed=seed, backend="triton", compute_stats=False)
    keep = dropout_mask(seed, B, H, nq, N, p)
    assert torch.equal(out.cpu() != 0, keep)

@pytest.mark.parametrize("head_dim", [16, 80])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_head_dims(head_dim, class_only):
    compare([6, 9], Dh=head_dim, H=1, class_only=class_only, lengths=torch.tensor([[6, 4], [1, 9]]), seed=4)

@pytest.mark.parametrize("splits", [3, 4])
def test_class_only_split_path(monkeypatch, splits):
    """Forced split-N: chunks of 7 / 6 keys, one split lies wholly in an empty modality (no valid key)."""
    monkeypatch.setenv(SPLITS_ENV, str(splits))
    lengths = torch.tensor([[0, 4], [12, 9]])
    compare([12, 9], class_only=True, lengths=lengths, dropout_p=0.2, rotation_kind="global", seed=6)

@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_without_stats(class_only):
    segments = [7, 11]
    N = 1 + sum(segments)
    q, k, v, _ = (t.to(DEVICE) for t in make_inputs(2, 2, N, 24, class_only, torch.float32, seed=8))
    lengths = LENGTHS_2.to(DEVICE)
    fwd = ta.attention_fwd(q, k, v, segments, lengths, None, 0.3, 0.0, 0, False)
    assert all(getattr(fwd, s.name).shape == (0,) and getattr(fwd, s.name).dtype == s.dtype for s in KERNEL_STATISTICS)
    with_stats = ta.attention_fwd(q, k, v, segments, lengths, None, 0.3, 0.0, 0, True)
    assert torch.equal(fwd.out, with_stats.out) and torch.equal(fwd.lse, with_stats.lse)
    compare(segments, class_only=class_only, lengths=lengths, compute_stats=False, seed=8)

def test_lse_is_the_natural_log_sum_exp():
    segments = [7, 11]
    N = 1 + sum(segments)
    q, k, v, _ = make_inputs(2, 2, N, 24, False, torch.float32, seed=9)
    scale = 0.37
    lse = ta.attention_fwd(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), segments, LENGTHS_2.to(DEVICE), None,
                           scale, 0.0, 0, True).lse.cpu()
    from rollingq_kernels.reference import key_valid_mask

    scores = scale * q.double() @ k.double().transpose(-1, -2)
    valid = key_valid_mask(LENGTHS_2, segments, 2, q.device)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, N)
    rows = valid[:, None, :].expand(2, 2, N)  # padded query rows: any finite value (the contract)
    torch.testing.assert_close(lse.double()[rows], torch.logsumexp(scores, -1)[rows], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()

def test_deterministic():
    segments = [5, 7, 4]
    N = 1 + sum(segments)
    q, k, v, grad = make_inputs(2, 2, N, 24, False, torch.float32, seed=10)
    runs = [run("triton", q, k, v, grad, segments, torch.float32, DEVICE, lengths=LENGTHS_3, dropout_p=0.2, seed=5)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))

def _round_to_nearest_even_casts(monkeypatch):
    """Make the interpreter round float32 -> bfloat16 to nearest even, as the GPU does.

    Triton 3.8's interpreter truncates in that cast, which roughly doubles bfloat16 errors and
    would make a comparison with PyTorch's (correctly rounded) bfloat16 meaningless.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl") or not hasattr(interpreter, "TensorHandle"):
        pytest.skip("this Triton's interpreter internals differ; the bf16 rounding fix does not apply")
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(rounded, dst_type.scalar)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float32:
            widened = (np.ascontiguousarray(src.data).astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(widened, dst_type.scalar)
        return original(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)

@pytest.mark.skipif(not INTERPRET, reason="the GPU version is tests/test_triton_cuda.py")
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_bf16_error_within_twice_eager(monkeypatch, class_only):
    """bfloat16 Triton vs PyTorch's eager reference in bfloat16, both against float64 (relative RMS)."""
    _round_to_nearest_even_casts(monkeypatch)
    segments, B, H, Dh = [45, 56], 1, 2, 32
    N = 1 + sum(segments)
    q, k, v, grad = make_inputs(B, H, N, Dh, class_only, torch.bfloat16, seed=12)
    kw = dict(lengths=torch.tensor([[40, 51]]), dropout_p=0.1, seed=3)
    tri = run("triton", q, k, v, grad, segments, torch.bfloat16, DEVICE, **kw)
    eager = run("reference", q, k, v, grad, segments, torch.bfloat16, torch.device("cpu"), **kw)
    ref = run("reference", q, k, v, grad, segments, torch.float64, torch.device("cpu"), **kw)

    def rel(x, r):
        return float((x.cpu().double() - r).norm() / r.norm())

    for name, a, e, r in zip(("out", "dq", "dk", "dv"), (tri[0], *tri[2]), (eager[0], *eager[2]), (ref[0], *ref[2])):
        assert rel(a, r) <= 2.0 * rel(e, r), (name, rel(a, r), rel(e, r))

@pytest.mark.skipif(not INTERPRET, reason="the GPU version is in tests/test_triton_cuda.py")
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_agrees_with_cpp_kernels(class_only):
    from rollingq_kernels import HAS_CPP

    if not HAS_CPP:
        pytest.skip("the C++ CPU kernels are not built")
    segments = [5, 7, 4]
    N = 1 + sum(segments)
    q, k, v, grad = make_inputs(2, 2, N, 24, class_only, torch.float32, seed=13)
    kw = dict(lengths=LENGTHS_3, rotation=random_rotation("global", 2, 24, 14).float(), dropout_p=0.25, seed=21)
    out, stats, grads = run("triton", q, k, v, grad, segments, torch.float32, DEVICE, **kw)
    c_out, c_stats, c_grads = run("cpp", q, k, v, grad, segments, torch.float32, torch.device("cpu"), **kw)
    torch.testing.assert_close(out, c_out, atol=1e-5, rtol=1e-5)
    for name, a, c in zip(("dq", "dk", "dv"), grads, c_grads):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for field in FLOAT_STATS:
        torch.testing.assert_close(getattr(stats, field), getattr(c_stats, field), atol=1e-5, rtol=1e-5)

def test_out_of_range_lengths_are_clamped_in_the_kernels():
    """Under torch.compile the Python range check is skipped; the kernels clamp lengths to [0, L_m]."""
    segs = (5, 6)
    q, k, v = (t.to(DEVICE) for t in make_inputs(2, 2, 12, 16, False, torch.float32, seed=31)[:3])
    wild = torch.tensor([[9, -3], [5, 40]], device=DEVICE)
    clamped = torch.tensor([[5, 0], [5, 6]], device=DEVICE)
    got = ta.attention_fwd(q, k, v, list(segs), wild, None, 16**-0.5, 0.0, 0, True)
    want = ta.attention_fwd(q, k, v, list(segs), clamped, None, 16**-0.5, 0.0, 0, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

def test_backward_ignores_the_lse_of_padded_query_rows():
    """The contract lets padded rows carry any finite lse: the backward must not turn it into NaN."""
    segs = (5, 6)
    q, k, v = (t.to(DEVICE) for t in make_inputs(2, 2, 12, 16, False, torch.float32, seed=32)[:3])
    lengths = torch.tensor([[2, 6], [5, 1]], device=DEVICE)
    fwd = ta.attention_fwd(q, k, v, list(segs), lengths, None, 16**-0.5, 0.0, 0, False)
    out, lse = fwd.out, fwd.lse
    padded = torch.tensor([[i >= 1 + 2 and i < 6 for i in range(12)], [i >= 7 for i in range(12)]], device=DEVICE)
    lse_wild = torch.where(padded[:, None, :], torch.full_like(lse, -1e30), lse)
    grad = torch.randn_like(out)
    ref = ta.attention_bwd(grad, q, k, v, out, lse, list(segs), lengths, None, 16**-0.5, 0.0, 0)
    got = ta.attention_bwd(grad, q, k, v, out, lse_wild, list(segs), lengths, None, 16**-0.5, 0.0, 0)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)

def _poison_padding(t: torch.Tensor, lengths: torch.Tensor, segments, value: float) -> torch.Tensor:
    """``t`` ``(B, H, N, Dh)`` with every padded token's row set to ``value`` (a copy)."""
    from rollingq_kernels.reference import key_valid_mask

    valid = key_valid_mask(lengths, segments, t.shape[0], t.device)
    return t.masked_fill(~valid[:, None, :, None], value)

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_padded_tokens_are_never_read(value, class_only):
    """NaN/inf in padded q rows, keys and values leave every valid output, statistic and gradient
    bitwise unchanged; padded query rows output exactly 0 and get zero gradients, as do padded keys."""
    segments = [5, 7, 4]
    N = 1 + sum(segments)
    q, k, v, grad = (t.to(DEVICE) for t in make_inputs(2, 2, N, 16, class_only, torch.float32, seed=41))
    lengths = LENGTHS_3.to(DEVICE)
    rot = random_rotation("per_head", 2, 16, 42).to(DEVICE)
    kw = dict(lengths=lengths, rotation=rot, dropout_p=0.2, seed=5)
    clean = run("triton", q, k, v, grad, segments, torch.float32, DEVICE, **kw)
    poisoned_q = q if class_only else _poison_padding(q, lengths, segments, value)
    poisoned_grad = grad if class_only else _poison_padding(grad, lengths, segments, value)
    dirty = run("triton", poisoned_q, _poison_padding(k, lengths, segments, value),
                 _poison_padding(v, lengths, segments, value), poisoned_grad, segments, torch.float32, DEVICE, **kw)
    from rollingq_kernels.reference import key_valid_mask

    pad = ~key_valid_mask(lengths, segments, 2, DEVICE)[:, None, :, None]  # (B, 1, N, 1)
    assert torch.equal(clean[0], dirty[0])
    if not class_only:
        assert torch.count_nonzero(dirty[0].masked_select(pad)) == 0
    for name in FLOAT_STATS:
        assert torch.equal(getattr(clean[1], name), getattr(dirty[1], name)), name
    for name, a, b in zip(("dq", "dk", "dv"), clean[2], dirty[2]):
        assert torch.equal(a, b), name
        if name != "dq" or not class_only:
            assert torch.count_nonzero(b.masked_select(pad)) == 0, name

@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_negative_scale(class_only):
    """The kernels fold the scale into exp2 and need it positive: the launcher flips q's sign instead."""
    segments = [5, 7, 4]
    N = 1 + sum(segments)
    q, k, v, grad = make_inputs(2, 2, N, 24, class_only, torch.float32, seed=43)
    rot = random_rotation("global", 2, 24, 44)
    kw = dict(lengths=LENGTHS_3, scale=-0.3, dropout_p=0.1, seed=9)
    out, stats, grads = run("triton", q, k, v, grad, segments, torch.float32, DEVICE, rotation=rot.float(), **kw)
    r_out, r_stats, r_grads = run("reference", q, k, v, grad, segments, torch.float64, torch.device("cpu"),
                                   rotation=rot, **kw)
    torch.testing.assert_close(out.cpu().double(), r_out, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, r_grads):
        torch.testing.assert_close(a.cpu().double(), r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.mass.cpu().double(), r_stats.mass.double(), atol=STATS_TOL, rtol=STATS_TOL)
