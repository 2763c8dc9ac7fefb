"""The Triton kernels against the float64 eager reference, in Triton's interpreter (CPU).

Run as its own process (the variable must be set before Triton is imported):

    TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py

Shapes are tiny (N ~ 10-40) because the interpreter is slow; the interpreter uses a single
16×16 tile config, so every case spans several K and Q tiles. With CUDA and no interpreter the
same tests run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_COLLECT_ONLY = os.environ.get("ROLLINGQ_COLLECT_ONLY") == "1"  # benchmarks/run_gpu.sh --dry-run lists the cases
if not _INTERPRET and not torch.cuda.is_available() and not _COLLECT_ONLY:
    pytest.skip("needs TRITON_INTERPRET=1 (Triton's CPU interpreter) or a CUDA GPU", allow_module_level=True)

from rollingq_kernels import dropout_mask, rollingq_attention  # noqa: E402
from rollingq_kernels.stats import KERNEL_STATISTICS, STATISTICS, KernelOutputs  # noqa: E402
from rollingq_kernels.triton import configs  # noqa: E402
from rollingq_kernels.triton import launch as ta  # noqa: E402
from rollingq_kernels.triton.launch import SPLITS_ENV  # noqa: E402

pytestmark = pytest.mark.triton_interpret
DEVICE = torch.device("cpu" if _INTERPRET else "cuda")

# (atol = rtol) of the Triton result against the float64 reference computed from the same
# (already rounded) inputs. float64 gradients are limited by the float32 log-sum-exp the
# forward saves (the contract's lse dtype); float16/bfloat16 by the rounding of P and dS to
# the input dtype before the tile matmuls, as in every flash-attention kernel.
TOL = {
    torch.float64: {"out": 1e-10, "grad": 1e-6},
    torch.float32: {"out": 1e-5, "grad": 1e-5},
    torch.float16: {"out": 2e-3, "grad": 4e-3},
    torch.bfloat16: {"out": 2e-2, "grad": 3e-2},
}
FLOAT_STATS = tuple(s.name for s in STATISTICS if s.dtype.is_floating_point)  # every float statistic
STATS_TOL = 2e-5  # statistics are float32 and computed from exact products in every dtype


def _inputs(B, H, N, Dh, class_only, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    nq = 1 if class_only else N
    q = torch.randn(B, H, nq, Dh, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, H, nq, Dh, generator=g, dtype=torch.float64)
    return q, k, v, grad


def _rotation(kind, H, Dh, seed):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "global":
        return torch.linalg.qr(torch.randn(H * Dh, H * Dh, generator=g, dtype=torch.float64))[0]
    return torch.linalg.qr(torch.randn(H, Dh, Dh, generator=g, dtype=torch.float64))[0].float()


def _run(backend, q, k, v, grad, segments, dtype, device, **kw):
    """Forward + backward with ``backend``; inputs cast to ``dtype`` on ``device``."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    kw = dict(kw)
    if kw.get("lengths") is not None:
        kw["lengths"] = kw["lengths"].to(device)
    if kw.get("rotation") is not None:
        kw["rotation"] = kw["rotation"].to(device)
    out, stats = rollingq_attention(*leaves, segments, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, grad.to(device=device, dtype=dtype))
    return out.detach(), stats, grads


def _compare(segments, *, B=2, H=2, Dh=24, class_only=False, dtype=torch.float32, lengths=None,
             rotation_kind=None, dropout_p=0.0, seed=0, compute_stats=True):
    N = 1 + sum(segments)
    q, k, v, grad = _inputs(B, H, N, Dh, class_only, dtype, seed)
    rot = _rotation(rotation_kind, H, Dh, seed + 1)
    kw = dict(lengths=lengths, rotation=rot, dropout_p=dropout_p, seed=1234 + seed, compute_stats=compute_stats)
    out, stats, grads = _run("triton", q, k, v, grad, segments, dtype, DEVICE, **kw)
    ref_kw = dict(kw, rotation=None if rot is None else rot.double())
    r_out, r_stats, r_grads = _run("reference", q, k, v, grad, segments, torch.float64, torch.device("cpu"), **ref_kw)
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.cpu().double(), r_out, atol=tol["out"], rtol=tol["out"])
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.cpu().double(), r, atol=tol["grad"], rtol=tol["grad"],
                                   msg=lambda m, name=name: f"{name}: {m}")
    if not compute_stats:
        assert stats is None
        return out, grads, lengths
    for field in FLOAT_STATS:
        a, r = getattr(stats, field), getattr(r_stats, field)
        assert a.dtype == torch.float32, field
        torch.testing.assert_close(a.cpu().double(), r.double(), atol=STATS_TOL, rtol=STATS_TOL,
                                   msg=lambda m, field=field: f"{field}: {m}")
    assert torch.equal(stats.valid.cpu(), r_stats.valid)
    return out, grads, lengths


LENGTHS_2 = torch.tensor([[5, 11], [7, 3]])  # segments (7, 11): odd lengths, one full modality
LENGTHS_3 = torch.tensor([[3, 0, 4], [5, 6, 1]])  # segments (5, 7, 4): an empty modality


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_dtypes_with_lengths(dtype, class_only):
    out, grads, _ = _compare([7, 11], class_only=class_only, dtype=dtype, lengths=LENGTHS_2, seed=1)
    if not class_only:  # padded query rows: exactly 0 output, no gradient
        pad_rows = [1 + 7 + 3 + i for i in range(8)]  # sample 1, modality 1 beyond length 3
        assert torch.count_nonzero(out[1, :, pad_rows]) == 0
        assert torch.count_nonzero(grads[0][1, :, pad_rows]) == 0


@pytest.mark.parametrize("rotation_kind", ["global", "per_head"])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_rotation_three_modalities_empty_modality(rotation_kind, class_only):
    _compare([5, 7, 4], class_only=class_only, lengths=LENGTHS_3, rotation_kind=rotation_kind, seed=2)


@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_dropout_with_rotation_and_lengths(class_only):
    _compare([5, 7, 4], class_only=class_only, lengths=LENGTHS_3, rotation_kind="per_head", dropout_p=0.3, seed=3)


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
    _compare([6, 9], Dh=head_dim, H=1, class_only=class_only, lengths=torch.tensor([[6, 4], [1, 9]]), seed=4)


@pytest.mark.parametrize("splits", [3, 4])
def test_class_only_split_path(monkeypatch, splits):
    """Forced split-N: chunks of 7 / 6 keys, one split lies wholly in an empty modality (no valid key)."""
    monkeypatch.setenv(SPLITS_ENV, str(splits))
    lengths = torch.tensor([[0, 4], [12, 9]])
    _compare([12, 9], class_only=True, lengths=lengths, dropout_p=0.2, rotation_kind="global", seed=6)


def test_split_heuristic_fills_the_gpu(monkeypatch):
    monkeypatch.delenv(SPLITS_ENV, raising=False)
    from rollingq_kernels.triton.launch import class_only_splits

    cpu = torch.device("cpu")  # nominal 132 SMs off CUDA
    assert class_only_splits(64, 373, cpu) == 6  # 373 keys allow at most ceil(373 / 64) splits
    assert class_only_splits(64, 4097, cpu) == 9  # ceil(4 * 132 / 64): about four programs per SM
    assert class_only_splits(1024, 4097, cpu) == 1  # B*H alone fills the GPU
    monkeypatch.setenv(SPLITS_ENV, "0")
    with pytest.raises(ValueError, match=SPLITS_ENV):
        class_only_splits(64, 373, cpu)


@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_without_stats(class_only):
    segments = [7, 11]
    N = 1 + sum(segments)
    q, k, v, _ = (t.to(DEVICE) for t in _inputs(2, 2, N, 24, class_only, torch.float32, seed=8))
    lengths = LENGTHS_2.to(DEVICE)
    fwd = ta.attention_fwd(q, k, v, segments, lengths, None, 0.3, 0.0, 0, False)
    assert all(getattr(fwd, s.name).shape == (0,) and getattr(fwd, s.name).dtype == s.dtype for s in KERNEL_STATISTICS)
    with_stats = ta.attention_fwd(q, k, v, segments, lengths, None, 0.3, 0.0, 0, True)
    assert torch.equal(fwd.out, with_stats.out) and torch.equal(fwd.lse, with_stats.lse)
    _compare(segments, class_only=class_only, lengths=lengths, compute_stats=False, seed=8)


def test_lse_is_the_natural_log_sum_exp():
    segments = [7, 11]
    N = 1 + sum(segments)
    q, k, v, _ = _inputs(2, 2, N, 24, False, torch.float32, seed=9)
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
    q, k, v, grad = _inputs(2, 2, N, 24, False, torch.float32, seed=10)
    runs = [_run("triton", q, k, v, grad, segments, torch.float32, DEVICE, lengths=LENGTHS_3, dropout_p=0.2, seed=5)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


@pytest.mark.parametrize(("nq", "head_dim", "mode"), [(1, 1032, "class-only"), (19, 264, "all-query")])
def test_head_dim_limit_error(nq, head_dim, mode):
    segments = [9, 9]
    q = torch.randn(1, 1, nq, head_dim)
    k = torch.randn(1, 1, 19, head_dim)
    with pytest.raises(ValueError, match=f"{mode}.*backend='cpp' or backend='reference'"):
        ta.attention_fwd(q, k, k, segments, None, None, 0.1, 0.0, 0, True)


def test_cuda_kernels_are_registered():
    for op in ("rollingq::attention_fwd", "rollingq::attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


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


@pytest.mark.skipif(not _INTERPRET, reason="the GPU version is tests/test_triton_cuda.py")
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_bf16_error_within_twice_eager(monkeypatch, class_only):
    """bfloat16 Triton vs PyTorch's eager reference in bfloat16, both against float64 (relative RMS)."""
    _round_to_nearest_even_casts(monkeypatch)
    segments, B, H, Dh = [45, 56], 1, 2, 32
    N = 1 + sum(segments)
    q, k, v, grad = _inputs(B, H, N, Dh, class_only, torch.bfloat16, seed=12)
    kw = dict(lengths=torch.tensor([[40, 51]]), dropout_p=0.1, seed=3)
    tri = _run("triton", q, k, v, grad, segments, torch.bfloat16, DEVICE, **kw)
    eager = _run("reference", q, k, v, grad, segments, torch.bfloat16, torch.device("cpu"), **kw)
    ref = _run("reference", q, k, v, grad, segments, torch.float64, torch.device("cpu"), **kw)

    def rel(x, r):
        return float((x.cpu().double() - r).norm() / r.norm())

    for name, a, e, r in zip(("out", "dq", "dk", "dv"), (tri[0], *tri[2]), (eager[0], *eager[2]), (ref[0], *ref[2])):
        assert rel(a, r) <= 2.0 * rel(e, r), (name, rel(a, r), rel(e, r))


def test_candidate_selection_fits_the_problem_and_dtype():
    def blocks(cands):
        return [(c.block_m, c.block_n, c.warps, c.stages) for c in cands]

    half = configs.select_candidates(configs.FWD_CANDIDATES, torch.bfloat16, 64, 2048, 2048)
    assert blocks(half)[0] == (128, 64, 8, 3) and half[0].maxnreg == 128  # the preferred Hopper tile comes first
    assert all("half" in c.dtypes and c.max_head_dim >= 64 for c in half)
    with_dropout = configs.select_candidates(configs.FWD_CANDIDATES, torch.bfloat16, 64, 2048, 2048, dropout=True)
    assert with_dropout[0].maxnreg is None  # the register cap spills with the dropout hash
    small = configs.select_candidates(configs.FWD_CANDIDATES, torch.float16, 64, 32, 32)
    assert small and all(c.block_m <= 32 and c.block_n <= 32 for c in small)  # beyond next_pow2(20): padding
    fp32 = configs.select_candidates(configs.DKDV_CANDIDATES, torch.float32, 256, 4096, 4096)
    assert fp32 and all("fp32" in c.dtypes and c.max_head_dim >= 256 for c in fp32)
    tiny = configs.select_candidates(configs.FWD_CANDIDATES, torch.float64, 256, 1, 1)
    assert len(tiny) == 1  # nothing fits: the smallest offered candidate stays
    wide = configs.select_candidates(configs.CLASS_ONLY_CANDIDATES, torch.bfloat16, 1024, 1, 4096)
    assert wide and all(c.max_head_dim >= 1024 for c in wide)
    with pytest.raises(ValueError, match="BLOCK_D"):
        configs.select_candidates(configs.FWD_CANDIDATES, torch.float16, 2048, 64, 64)


_KEY_FREE = {"BLOCK_M", "BLOCK_N", "BLOCK_D", "S_PAD", "DOT_PREC", "IS_FP64", "EMULATE_BF16"}  # follow from the key


@pytest.mark.parametrize("name", ["all_query_fwd_kernel", "all_query_dkdv_kernel", "all_query_dq_kernel",
                                  "class_only_fwd_kernel", "class_only_bwd_kernel"])
def test_autotune_keys_hold_every_variant_and_nothing_batch_dependent(name):
    import importlib
    import inspect

    module = {"all_query_fwd_kernel": "forward", "class_only_fwd_kernel": "class_only",
              "class_only_bwd_kernel": "class_only"}.get(name, "backward")
    kernel = getattr(importlib.import_module(f"rollingq_kernels.triton.{module}"), name)
    params = inspect.signature(kernel.base_fn).parameters
    constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    assert constexprs - _KEY_FREE <= set(kernel.keys), (name, constexprs - _KEY_FREE - set(kernel.keys))
    assert not {"B", "H", "CHUNK", "SPLITS"} & set(kernel.keys)


def test_fixed_config_mode_picks_one_config(monkeypatch):
    monkeypatch.setenv(configs.FIXED_ENV, "0")
    assert not configs.autotune_enabled()
    monkeypatch.setenv(configs.FIXED_ENV, "1")
    assert configs.autotune_enabled()


@pytest.mark.skipif(not _INTERPRET, reason="the GPU version is in tests/test_triton_cuda.py")
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_agrees_with_cpp_kernels(class_only):
    from rollingq_kernels import HAS_CPP

    if not HAS_CPP:
        pytest.skip("the C++ CPU kernels are not built")
    segments = [5, 7, 4]
    N = 1 + sum(segments)
    q, k, v, grad = _inputs(2, 2, N, 24, class_only, torch.float32, seed=13)
    kw = dict(lengths=LENGTHS_3, rotation=_rotation("global", 2, 24, 14).float(), dropout_p=0.25, seed=21)
    out, stats, grads = _run("triton", q, k, v, grad, segments, torch.float32, DEVICE, **kw)
    c_out, c_stats, c_grads = _run("cpp", q, k, v, grad, segments, torch.float32, torch.device("cpu"), **kw)
    torch.testing.assert_close(out, c_out, atol=1e-5, rtol=1e-5)
    for name, a, c in zip(("dq", "dk", "dv"), grads, c_grads):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for field in FLOAT_STATS:
        torch.testing.assert_close(getattr(stats, field), getattr(c_stats, field), atol=1e-5, rtol=1e-5)


def test_out_of_range_lengths_are_clamped_in_the_kernels():
    """Under torch.compile the Python range check is skipped; the kernels clamp lengths to [0, L_m]."""
    segs = (5, 6)
    q, k, v = (t.to(DEVICE) for t in _inputs(2, 2, 12, 16, False, torch.float32, seed=31)[:3])
    wild = torch.tensor([[9, -3], [5, 40]], device=DEVICE)
    clamped = torch.tensor([[5, 0], [5, 6]], device=DEVICE)
    got = ta.attention_fwd(q, k, v, list(segs), wild, None, 16**-0.5, 0.0, 0, True)
    want = ta.attention_fwd(q, k, v, list(segs), clamped, None, 16**-0.5, 0.0, 0, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_ignores_the_lse_of_padded_query_rows():
    """The contract lets padded rows carry any finite lse: the backward must not turn it into NaN."""
    segs = (5, 6)
    q, k, v = (t.to(DEVICE) for t in _inputs(2, 2, 12, 16, False, torch.float32, seed=32)[:3])
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
    q, k, v, grad = (t.to(DEVICE) for t in _inputs(2, 2, N, 16, class_only, torch.float32, seed=41))
    lengths = LENGTHS_3.to(DEVICE)
    rot = _rotation("per_head", 2, 16, 42).to(DEVICE)
    kw = dict(lengths=lengths, rotation=rot, dropout_p=0.2, seed=5)
    clean = _run("triton", q, k, v, grad, segments, torch.float32, DEVICE, **kw)
    poisoned_q = q if class_only else _poison_padding(q, lengths, segments, value)
    poisoned_grad = grad if class_only else _poison_padding(grad, lengths, segments, value)
    dirty = _run("triton", poisoned_q, _poison_padding(k, lengths, segments, value),
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


@pytest.mark.parametrize(("B", "H"), [(0, 2), (2, 0)])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_empty_batch_or_heads_give_empty_outputs(B, H, class_only):
    segments = [3, 4]
    N = 1 + sum(segments)
    q = torch.randn(B, H, 1 if class_only else N, 16, device=DEVICE)
    k, v = torch.randn(B, H, N, 16, device=DEVICE), torch.randn(B, H, N, 16, device=DEVICE)
    fwd = ta.attention_fwd(q, k, v, segments, None, None, 0.25, 0.0, 0, True)
    assert fwd.out.shape == q.shape and fwd.lse.shape == (B, H, q.shape[2])
    for s in KERNEL_STATISTICS:
        assert getattr(fwd, s.name).shape == s.shape_of(B, H, 2, 16), s.name
    dq, dk, dv = ta.attention_bwd(torch.randn_like(q), q, k, v, fwd.out, fwd.lse, segments, None, None, 0.25, 0.0, 0)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_launcher_errors_name_the_argument():
    segments = [3, 4]
    q, k = torch.randn(1, 2, 8, 16, device=DEVICE), torch.randn(1, 2, 8, 16, device=DEVICE)
    call = lambda **kw: ta.attention_fwd(**{**dict(q=q, k=k, v=k, segments=segments, lengths=None,  # noqa: E731
                                                   rotation=None, scale=0.25, dropout_p=0.0, seed=0,
                                                   compute_stats=True), **kw})
    with pytest.raises(TypeError, match="q, k, v: expected one dtype"):
        call(k=k.double())
    with pytest.raises(TypeError, match="lengths: expected int64"):
        call(lengths=torch.ones(1, 2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(1, 2\)"):
        call(lengths=torch.ones(2, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="segments: expected"):
        call(segments=[3, 5])
    with pytest.raises(TypeError, match="rotation: expected float32 or float64"):
        call(rotation=torch.eye(32, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="rotation: expected shape"):
        call(rotation=torch.eye(16, device=DEVICE))
    with pytest.raises(ValueError, match="q: expected shape"):
        call(q=torch.randn(1, 2, 5, 16, device=DEVICE))


@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_negative_scale(class_only):
    """The kernels fold the scale into exp2 and need it positive: the launcher flips q's sign instead."""
    segments = [5, 7, 4]
    N = 1 + sum(segments)
    q, k, v, grad = _inputs(2, 2, N, 24, class_only, torch.float32, seed=43)
    rot = _rotation("global", 2, 24, 44)
    kw = dict(lengths=LENGTHS_3, scale=-0.3, dropout_p=0.1, seed=9)
    out, stats, grads = _run("triton", q, k, v, grad, segments, torch.float32, DEVICE, rotation=rot.float(), **kw)
    r_out, r_stats, r_grads = _run("reference", q, k, v, grad, segments, torch.float64, torch.device("cpu"),
                                   rotation=rot, **kw)
    torch.testing.assert_close(out.cpu().double(), r_out, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, r_grads):
        torch.testing.assert_close(a.cpu().double(), r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.mass.cpu().double(), r_stats.mass.double(), atol=STATS_TOL, rtol=STATS_TOL)


def test_outputs_never_alias_inputs_and_q_is_not_copied_for_the_rotation():
    segments = [3, 4]
    q = torch.randn(2, 2, 1, 16, device=DEVICE)
    k = torch.randn(2, 2, 8, 16, device=DEVICE)
    outs = ta.attention_fwd(q, k, k, segments, None, None, 0.25, 0.0, 0, True)  # fp32, class-only, no rotation
    storages = {t.untyped_storage().data_ptr() for t in (q, k)}
    assert all(t.untyped_storage().data_ptr() not in storages for t in outs)
    q_all = torch.randn(2, 2, 8, 16, device=DEVICE)
    before = q_all.clone()
    rot = torch.linalg.qr(torch.randn(2, 16, 16, dtype=torch.float64))[0].float().to(DEVICE)
    ta.attention_fwd(q_all, k, k, segments, None, rot, 0.25, 0.0, 0, True)
    assert torch.equal(q_all, before)


def test_segment_table_is_cached_per_layout_and_device():
    from rollingq_kernels.triton import tables

    a = tables.segment_table([5, 7, 4], torch.empty(1, device=DEVICE))
    b = tables.segment_table((5, 7, 4), torch.empty(3, device=DEVICE))
    assert a is b and a.tolist() == [0, 1, 6, 13, 17] and a.dtype == torch.int32
    assert tables.segment_table([5, 7], torch.empty(1, device=DEVICE)) is not a


def test_value_checks_on_cuda_only_under_the_debug_flag(monkeypatch):
    """Reading ``lengths``/``rotation`` back synchronises with the GPU: on CUDA only with ROLLINGQ_DEBUG_CHECKS=1."""
    from rollingq_kernels import checks

    monkeypatch.delenv(checks.DEBUG_CHECKS_ENV, raising=False)
    assert checks._reads_values(torch.device("cpu"))
    assert not checks._reads_values(torch.device("cuda", 0))
    monkeypatch.setenv(checks.DEBUG_CHECKS_ENV, "1")
    assert checks._reads_values(torch.device("cuda", 0))


@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_triton_ops_schema_no_aliasing_no_mutation(class_only):
    """``torch.library.opcheck``'s schema test: outputs never alias inputs (float32 class-only ``query``
    included), inputs are not written."""
    from rollingq_kernels.triton import register

    segs = [3, 4]
    nq = 1 if class_only else 8
    q, k, v = (torch.randn(2, 2, n, 16, device=DEVICE) for n in (nq, 8, 8))
    lengths = torch.tensor([[2, 4], [3, 1]], device=DEVICE)
    fwd_args = (q, k, v, segs, lengths, None, 0.25, 0.1, 3, True)
    torch.library.opcheck(register.triton_attention_fwd, fwd_args, test_utils=("test_schema",))
    fwd = KernelOutputs(*register.triton_attention_fwd(*fwd_args))
    out, lse = fwd.out, fwd.lse
    bwd_args = (torch.randn_like(q), q, k, v, out, lse, segs, lengths, None, 0.25, 0.1, 3)
    torch.library.opcheck(register.triton_attention_bwd, bwd_args, test_utils=("test_schema",))
