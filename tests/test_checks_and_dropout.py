"""Bad input is refused with clear messages; the dropout hash is the contract's."""

from __future__ import annotations

import pytest
import torch

import rollingq_kernels
from rollingq_kernels import dropout_mask, rollingq_attention
from rollingq_kernels.dropout import MASK32, dropout_threshold

B, H, Dh, SEGS = 2, 2, 4, (3, 2)
N = 1 + sum(SEGS)


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, Dh, generator=g, dtype=dtype) for _ in range(3))


def _call(q=None, k=None, v=None, segments=SEGS, **kw):
    q0, k0, v0 = _qkv()
    kw.setdefault("backend", "reference")
    return rollingq_attention(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v, segments, **kw)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(q=torch.randn(B, N, Dh)), ValueError, r"q: expected a 4-d tensor .*got shape \(2, 6, 4\)"),
        (dict(k=torch.randn(B, H, N + 1, Dh), v=torch.randn(B, H, N + 1, Dh)), ValueError, r"q: expected shape"),
        (dict(q=torch.randn(B, H, 3, Dh)), ValueError, r"q: expected shape \(2, 2, 6, 4\) .* or \(2, 2, 1, 4\)"),
        (dict(v=torch.randn(B, H, N, Dh + 1)), ValueError, r"v: expected the shape of k"),
        (dict(segments=(3, 3)), ValueError, r"segments: N must equal 1 \+ sum\(segments\) = 7 .* N = 6"),
        (dict(segments=(5,)), ValueError, r"segments: expected at least 2 modalities, got 1"),
        (dict(segments=(5, 0)), ValueError, r"segments: every padded size must be >= 1"),
        (dict(segments=(2.5, 2.5)), TypeError, r"segments: expected a sequence of ints"),
        (dict(lengths=torch.tensor([[3, 2]])), ValueError, r"lengths: expected shape \(2, 2\), got \(1, 2\)"),
        (dict(lengths=torch.tensor([[3, 2], [4, 0]])), ValueError, r"lengths\[1, 0\] = 4 with segments\[0\] = 3"),
        (dict(lengths=torch.tensor([[3, -1], [1, 0]])), ValueError, r"lengths\[0, 1\] = -1"),
        (dict(lengths=torch.tensor([[3.0, 2.0], [1.0, 0.0]])), TypeError, r"lengths: expected an integer dtype"),
        (dict(rotation=torch.eye(Dh)), ValueError, r"rotation: expected shape \(8, 8\) \(global\) or \(2, 4, 4\)"),
        (dict(rotation=torch.full((H * Dh, H * Dh), float("nan"))), ValueError, r"rotation: expected finite"),
        (dict(rotation=torch.eye(H * Dh, dtype=torch.float16)), TypeError, r"rotation: expected float32 or float64"),
        (dict(q=torch.randn(B, H, N, Dh, dtype=torch.float64)), TypeError, r"q, k, v: expected one dtype"),
        (dict(q=torch.randint(0, 3, (B, H, N, Dh))), TypeError, r"q: expected dtype float16"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p: expected a float in \[0, 1\), got 1.0"),
        (dict(dropout_p=0.1, seed=-1), ValueError, r"seed: expected None or an int in \[0, 2\*\*31\)"),
        (dict(scale=float("inf")), ValueError, r"scale: expected a finite float"),
        (dict(scale="0.5"), TypeError, r"scale: expected a float or None, got str"),
        (dict(dropout_p="0.1"), TypeError, r"dropout_p: expected a float in \[0, 1\), got str"),
        (dict(dropout_p=0.1, seed=1.5), TypeError, r"seed: expected None or an int"),
        (dict(compute_stats=1), TypeError, r"compute_stats: expected a bool, got int"),
        (dict(backend="cuda"), ValueError, r"backend: expected one of"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**kwargs)


def _with_one(value: float, transposed: bool, per_head: bool) -> torch.Tensor:
    r = torch.eye(Dh).repeat(H, 1, 1) if per_head else torch.eye(H * Dh)
    r[..., 1, 2] = value
    return r.mT.contiguous().mT if transposed else r


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_rotation_entry_is_found_in_any_layout(value, transposed, per_head, backend):
    # backend="cpp": the check is the C++ kernels' own (on the rotated query, then R)
    if backend == "cpp" and not rollingq_kernels.HAS_CPP:
        pytest.skip("C++ kernels not built")
    with pytest.raises(ValueError, match=r"rotation: expected finite values"):
        _call(rotation=_with_one(value, transposed, per_head), backend=backend)
    _call(rotation=_with_one(3.0e38, transposed, per_head), backend=backend)  # huge but finite: accepted


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _call(backend="triton")


def _mix_py(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def _keep_py(seed, b, h, row, col, p):
    c = lambda i: _mix_py((i + 0x9E3779B9) & MASK32)  # noqa: E731
    r = _mix_py(_mix_py(_mix_py(seed ^ c(b)) ^ c(h)) ^ c(row))
    return (_mix_py(r ^ c(col)) >> 8) >= round(p * 2**24)


def test_dropout_mask_matches_plain_python_uint32():
    seed, p = 2**31 - 5, 0.37
    mask = dropout_mask(seed, 3, 2, 5, 7, p)
    for b, h, row, col in [(0, 0, 0, 0), (2, 1, 4, 6), (1, 0, 3, 2), (2, 0, 0, 5), (0, 1, 2, 1)]:
        assert bool(mask[b, h, row, col]) == _keep_py(seed, b, h, row, col, p)


def test_dropout_mask_statistics_and_determinism():
    p = 0.3
    m1 = dropout_mask(7, 4, 3, 64, 65, p)
    assert torch.equal(m1, dropout_mask(7, 4, 3, 64, 65, p))
    assert not torch.equal(m1, dropout_mask(8, 4, 3, 64, 65, p))
    assert abs(float(m1.float().mean()) - (1 - p)) < 0.01
    # class-query-only (one row) equals row 0 of the all-query mask; a larger batch extends it
    torch.testing.assert_close(dropout_mask(7, 4, 3, 1, 65, p), m1[:, :, :1])
    torch.testing.assert_close(dropout_mask(7, 5, 3, 64, 65, p)[:4], m1)
    assert dropout_mask(7, 2, 2, 3, 3, 0.0).all()
    assert dropout_threshold(0.5) == 2**23


@pytest.mark.parametrize("seed", [-1, 2**31, 1.5])
def test_dropout_mask_rejects_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        dropout_mask(seed, 1, 1, 1, 1, 0.1)
