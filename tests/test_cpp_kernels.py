"""The C++ CPU kernels (``rollingq_kernels._C``) against the float64 eager reference.

Covers the forward, every statistic and the three input gradients across
layouts (all-query / class-only, lengths with empty and one-token modalities,
M = 3, rotations, dropout), gradcheck, opcheck of both registered ops,
bitwise determinism across runs and thread counts, torch.compile, reduced
precision, the registered schemas and the kernels' own argument checks.

The float row kernels exist once per instruction set (DEFAULT, AVX2, AVX512;
csrc/cpu/) and are chosen at run time: the ``cpu_level`` fixture runs a test at
every level this build and CPU support, switching in-process with
``_C._set_cpu_capability``.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rollingq_kernels
from rollingq_kernels import _library, rollingq_attention
from rollingq_kernels.stats import KERNEL_STATISTICS, STATISTICS, KernelOutputs

pytestmark = pytest.mark.skipif(not rollingq_kernels.HAS_CPP, reason="rollingq_kernels._C (C++ kernels) not built")

if rollingq_kernels.HAS_CPP:
    from rollingq_kernels import _C

    LEVELS = _C.supported_cpu_capabilities()
else:
    LEVELS = ()

STAT_FIELDS = tuple(s.name for s in STATISTICS)  # every statistic of the table


@pytest.fixture(params=LEVELS)
def cpu_level(request):
    """Runs the test with the float row kernels of one instruction set, then restores the previous one."""
    previous = _C._set_cpu_capability(request.param)
    try:
        assert _C.cpu_capability() == request.param
        # the table the kernels now call was compiled for this level (its unit's CPU_CAPABILITY)
        assert _C._row_ops_level() == request.param
        yield request.param
    finally:
        _C._set_cpu_capability(previous)


def make_inputs(B, H, N, Dh, dtype, class_only=False, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    nq = 1 if class_only else N
    q = torch.randn(B, H, nq, Dh, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def random_rotation(kind, H, Dh, gen_seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(gen_seed)
    if kind == "global":
        return torch.linalg.qr(torch.randn(H * Dh, H * Dh, generator=g, dtype=torch.float64))[0]
    return torch.linalg.qr(torch.randn(H, Dh, Dh, generator=g, dtype=torch.float64))[0]


def run(backend, q, k, v, segments, grad_out=None, **kw):
    """Forward (and backward with grad_out) on fresh leaf copies; returns out, stats, grads."""
    leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v)]
    out, stats = rollingq_attention(*leaves, segments, backend=backend, **kw)
    grads = None
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        grads = [t.grad for t in leaves]
    return out.detach(), stats, grads


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * expected.abs().max().item() if expected.numel() else atol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


# (B, H, Dh, segments, lengths, class_only, rotation)
CASES = {
    "aq-plain-prime": (2, 3, 16, (7, 11), None, False, None),
    "aq-lengths-empty-modality": (3, 2, 32, (13, 5), [[13, 0], [4, 5], [1, 2]], False, "global"),
    "aq-one-token-modality": (2, 2, 64, (1, 17), [[1, 9], [0, 17]], False, "per_head"),
    "aq-M3-odd": (2, 1, 80, (5, 9, 3), [[3, 9, 1], [5, 0, 2]], False, "global"),
    "aq-dh128-bh1": (1, 1, 128, (29, 31), [[17, 23]], False, None),
    "aq-multi-tile": (2, 1, 16, (300, 333), [[211, 333], [300, 97]], False, "per_head"),
    # varlen tiling: sample 0 has a 107-key gap (tiles split), sample 1 a 1-key gap (kept inside a tile)
    "aq-varlen-gaps": (2, 2, 24, (90, 37, 120), [[20, 0, 100], [90, 36, 3]], False, "global"),
    "aq-varlen-dh768": (2, 1, 768, (61, 70), [[5, 70], [61, 2]], False, None),  # many small key tiles
    "co-plain": (3, 2, 32, (11, 13), None, True, "global"),
    "co-lengths-M3": (4, 2, 16, (6, 1, 9), [[6, 1, 0], [0, 0, 9], [2, 1, 3], [5, 0, 7]], True, "per_head"),
    "co-dh768-bh1": (1, 1, 768, (3, 4), [[2, 4]], True, None),
    "co-multi-tile": (2, 1, 64, (601, 47), [[599, 47], [1, 0]], True, "global"),
}


def case_inputs(name, dtype):
    B, H, Dh, segs, lengths, class_only, rot = CASES[name]
    N = 1 + sum(segs)
    q, k, v = make_inputs(B, H, N, Dh, dtype, class_only)
    lengths_t = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    return q, k, v, list(segs), lengths_t, random_rotation(rot, H, Dh)


def check_against_float64_reference(name, dtype):
    q, k, v, segs, lengths, rotation = case_inputs(name, dtype)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kw = dict(lengths=lengths, rotation=rotation)
    out, stats, grads = run("cpp", q, k, v, segs, grad_out=g, **kw)
    ref_out, ref_stats, ref_grads = run("reference", q.double(), k.double(), v.double(), segs, grad_out=g, **kw)
    tol = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-5, 1e-4)}[dtype]
    assert out.dtype == dtype and grads[0].dtype == dtype
    assert_close(out, ref_out, tol[0], what="out")
    for field in STAT_FIELDS:
        assert_close(getattr(stats, field), getattr(ref_stats, field), 2e-5, what=f"stats.{field}")
    for name_g, a, e in zip("qkv", grads, ref_grads):
        assert_close(a, e, tol[1], rtol=tol[1], what=f"d{name_g}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_forward_stats_and_grads_match_reference(name):
    check_against_float64_reference(name, torch.float64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_forward_stats_and_grads_match_float64_reference_at_every_level(name, cpu_level):
    check_against_float64_reference(name, torch.float32)


@pytest.mark.parametrize("name", ["aq-lengths-empty-modality", "aq-varlen-gaps"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_padded_query_rows_output_zero_and_get_no_gradient(name, dropout_p, cpu_level):
    q, k, v, segs, lengths, rotation = case_inputs(name, torch.float32)
    g = torch.randn(q.shape)
    out, _, (dq, dk, dv) = run("cpp", q, k, v, segs, grad_out=g, lengths=lengths, rotation=rotation,
                               dropout_p=dropout_p, seed=3)
    valid = rollingq_kernels.reference.key_valid_mask(lengths, segs, q.shape[0], q.device)  # (B, N)
    pad = ~valid[:, None, :, None].expand_as(out)
    assert (out[pad] == 0).all() and (dq[pad] == 0).all() and (dk[pad] == 0).all() and (dv[pad] == 0).all()


def _large_fwd_bwd():
    """Class-only fwd+bwd whose dk and dv (8.7 MiB each) get the huge-page advice."""
    q, k, v = make_inputs(8, 1, 373, 768, torch.float32, class_only=True, gen_seed=11)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    lengths = torch.tensor([[176, 196], [100, 37]] * 4)
    out, stats, grads = run("cpp", q, k, v, [176, 196], grad_out=g, lengths=lengths,
                            rotation=random_rotation("global", 1, 768), dropout_p=0.2, seed=9)
    return [out, stats.key_mean, *grads]


def test_huge_page_advice_off_gives_bitwise_the_same_results(tmp_path):
    # ROLLINGQ_HUGE_PAGES=0 only drops the madvise on the large outputs; a subprocess (the flag
    # is read once per process) must reproduce this process's forward and gradients exactly.
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "import test_cpp_kernels as t\n"
        "torch.save(t._large_fwd_bwd(), sys.argv[1])\n"
    )
    out_file = tmp_path / "result.pt"
    env = {**os.environ, "ROLLINGQ_HUGE_PAGES": "0"}
    subprocess.run([sys.executable, str(script), str(out_file), str(Path(__file__).parent)], env=env, check=True,
                   timeout=300)
    for a, b in zip(torch.load(out_file), _large_fwd_bwd()):
        assert torch.equal(a, b)


# Padded positions are never read: whatever q (padded query rows), k, v and grad_out (padded rows)
# hold there, every valid output, statistic and gradient is bitwise the same, padded query rows
# output exactly 0 and every padded row gets a zero gradient. "aq-varlen-gaps" keeps a 1-token gap
# inside a tile (computed and masked, not skipped); "aq-multi-tile" and "aq-lengths-empty-modality"
# end tiles in padding.
@pytest.mark.parametrize("garbage", ["nan", "inf"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize(
    "name", ["co-lengths-M3", "aq-varlen-gaps", "aq-lengths-empty-modality", "aq-multi-tile", "aq-M3-odd"]
)
def test_padding_is_never_read(name, dropout_p, garbage, cpu_level):
    for dtype in (torch.float32, torch.float64):
        q, k, v, segs, lengths, rotation = case_inputs(name, dtype)
        valid = rollingq_kernels.reference.key_valid_mask(lengths, segs, q.shape[0], q.device)  # (B, N)
        pad_kv = ~valid[:, None, :, None].expand_as(k)
        pad_q = pad_kv[:, :, : q.shape[2]]  # class-only: row 0, always valid
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
        value = float(garbage)
        dirty_inputs = [t.masked_fill(pad, value) for t, pad in ((q, pad_q), (k, pad_kv), (v, pad_kv), (g, pad_q))]
        kw = dict(lengths=lengths, rotation=rotation, dropout_p=dropout_p, seed=5)
        clean = run("cpp", q, k, v, segs, grad_out=g, **kw)
        dirty = run("cpp", *dirty_inputs[:3], segs, grad_out=dirty_inputs[3], **kw)
        assert torch.equal(clean[0], dirty[0]), f"{dtype}: out"
        assert (dirty[0][pad_q] == 0).all(), f"{dtype}: padded query rows must output 0"
        for field in STAT_FIELDS:
            assert torch.equal(getattr(clean[1], field), getattr(dirty[1], field)), f"{dtype}: stats.{field}"
        for name_g, a, b, pad in zip("qkv", clean[2], dirty[2], (pad_q, pad_kv, pad_kv)):
            assert torch.equal(a, b), f"{dtype}: d{name_g}"
            assert (b[pad] == 0).all(), f"{dtype}: d{name_g} of padded rows must be 0"


@pytest.mark.parametrize("name", ["aq-lengths-empty-modality", "co-lengths-M3", "aq-multi-tile", "aq-varlen-gaps"])
@pytest.mark.parametrize("dropout_p", [0.17, 0.5])
def test_dropout_matches_reference_with_same_seed(name, dropout_p):
    q, k, v, segs, lengths, rotation = case_inputs(name, torch.float64)
    g = torch.randn(q.shape, dtype=torch.float64)
    kw = dict(lengths=lengths, rotation=rotation, dropout_p=dropout_p, seed=123457)
    out, stats, grads = run("cpp", q, k, v, segs, grad_out=g, **kw)
    ref_out, ref_stats, ref_grads = run("reference", q, k, v, segs, grad_out=g, **kw)
    assert_close(out, ref_out, 1e-12, what="out")
    assert_close(stats.mass, ref_stats.mass, 1e-6, what="mass (before dropout)")
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, 1e-10, rtol=1e-10, what="grad")
    other, _, _ = run("cpp", q, k, v, segs, **{**kw, "seed": 99})
    assert (other - out).abs().max() > 1e-3, "a different seed must give a different mask"


@pytest.mark.parametrize("name", ["aq-lengths-empty-modality", "co-lengths-M3", "aq-multi-tile", "aq-varlen-gaps"])
@pytest.mark.parametrize("dropout_p", [0.17, 0.5])
def test_float32_dropout_matches_float64_reference_at_every_level(name, dropout_p, cpu_level):
    # float32 runs the level's vector dropout (the hash in lanes, partial tails); the float64
    # reference with the same seed drops the same scores, so only rounding separates them
    q, k, v, segs, lengths, rotation = case_inputs(name, torch.float32)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kw = dict(lengths=lengths, rotation=rotation, dropout_p=dropout_p, seed=123457)
    out, stats, grads = run("cpp", q, k, v, segs, grad_out=g, **kw)
    ref_out, ref_stats, ref_grads = run("reference", q.double(), k.double(), v.double(), segs, grad_out=g, **kw)
    assert out.dtype == torch.float32 and grads[0].dtype == torch.float32
    assert_close(out, ref_out, 2e-5, what="out")
    assert_close(stats.mass, ref_stats.mass, 2e-5, what="mass (before dropout)")
    for name_g, a, e in zip("qkv", grads, ref_grads):
        assert_close(a, e, 1e-4, rtol=1e-4, what=f"d{name_g}")


@pytest.mark.parametrize("class_only", [False, True])
def test_gradcheck_float64(class_only):
    B, H, Dh, segs = 2, 1, 4, [2, 3]
    q, k, v = make_inputs(B, H, 1 + sum(segs), Dh, torch.float64, class_only, gen_seed=3)
    lengths = torch.tensor([[2, 3], [1, 1]])
    rotation = random_rotation("global", H, Dh)

    def f(q, k, v):
        out, _ = rollingq_attention(
            q, k, v, segs, lengths=lengths, rotation=rotation, dropout_p=0.2, seed=5, backend="cpp"
        )
        return out

    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in (q, k, v)], fast_mode=True)


def fwd_args(q, k, v, segs, lengths, rotation, dropout_p=0.0, seed=0, compute_stats=True):
    return (q, k, v, segs, lengths, rotation, q.shape[-1] ** -0.5, dropout_p, seed, compute_stats)


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


def _fwd_bwd(name, dtype, dropout_p=0.3):
    q, k, v, segs, lengths, rotation = case_inputs(name, dtype)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out, stats, grads = run("cpp", q, k, v, segs, grad_out=g, lengths=lengths, rotation=rotation,
                            dropout_p=dropout_p, seed=77)
    return [out, stats.key_mean, stats.mass, *grads]


@pytest.mark.parametrize("name", ["aq-multi-tile", "co-multi-tile", "aq-varlen-gaps"])
def test_bitwise_deterministic_across_runs_and_thread_counts(name, cpu_level):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = _fwd_bwd(name, torch.float32), _fwd_bwd(name, torch.float32)
        torch.set_num_threads(1)
        single = _fwd_bwd(name, torch.float32)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("kind", ["global", "per_head"])
def test_rotation_layouts_match_reference_and_are_thread_count_independent(kind, layout):
    # H * Dh = 144: the global rotation runs as three 64-column blocks (csrc/forward.cpp rows_times),
    # read in place whether the matrix is stored as is or as a transposed view.
    B, H, Dh, segs = 3, 3, 48, [5, 8]
    q, k, v = make_inputs(B, H, 1 + sum(segs), Dh, torch.float32, class_only=True, gen_seed=3)
    rotation = random_rotation(kind, H, Dh).float()
    rotation = rotation.contiguous() if layout == "contiguous" else rotation.mT.contiguous().mT
    assert rotation.is_contiguous() == (layout == "contiguous")
    lengths = torch.tensor([[5, 2], [0, 8], [3, 0]])
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(lengths=lengths, rotation=rotation)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out, stats, grads = run("cpp", q, k, v, segs, grad_out=g, **kw)
            results.append([out, stats.query, *grads])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref_out, ref_stats, ref_grads = run("reference", q.double(), k.double(), v.double(), segs, grad_out=g, **kw)
    assert_close(results[0][0], ref_out, 2e-5, what="out")
    assert_close(results[0][1], ref_stats.query, 2e-5, what="stats.query")
    for name_g, a, e in zip("qkv", results[0][2:], ref_grads):
        assert_close(a, e, 1e-4, rtol=1e-4, what=f"d{name_g}")


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


# Reduced precision: error of the kernels against a float64 reference of the same
# rounded inputs must stay within FACTOR x the eager reference's own error in that
# dtype, plus ATOL (one rounding of an O(1) value).
LOW_PRECISION_TOLERANCE = {torch.bfloat16: (2.0, 8e-3), torch.float16: (2.0, 1e-3)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["aq-lengths-empty-modality", "co-lengths-M3", "aq-multi-tile"])
def test_reduced_precision_within_tolerance_table(name, dtype):
    factor, atol = LOW_PRECISION_TOLERANCE[dtype]
    q, k, v, segs, lengths, rotation = case_inputs(name, dtype)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    kw = dict(lengths=lengths, rotation=rotation)
    exact = run("reference", q.double(), k.double(), v.double(), segs, grad_out=g.double(), **kw)
    eager = run("reference", q, k, v, segs, grad_out=g, **kw)
    cpp = run("cpp", q, k, v, segs, grad_out=g, **kw)
    pairs = [("out", cpp[0], eager[0], exact[0])]
    pairs += [(f"d{n}", a, b, c) for n, a, b, c in zip("qkv", cpp[2], eager[2], exact[2])]
    pairs += [(f, getattr(cpp[1], f), getattr(eager[1], f), getattr(exact[1], f)) for f in ("mass", "cos")]
    for what, ours, theirs, ref in pairs:
        assert ours.dtype == theirs.dtype
        eager_err = (theirs.double() - ref.double()).abs().max().item()
        assert_close(ours, ref, factor * eager_err + atol, what=f"{dtype} {what} (eager error {eager_err:.2e})")


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


# ---- run-time instruction-set dispatch (csrc/cpu_capability.cpp) --------------------------------

_REPORT_LEVELS = (
    "import warnings, torch\n"
    "warnings.simplefilter('always')\n"
    "from rollingq_kernels import _C\n"
    "print(_C.cpu_capability(), torch.backends.cpu.get_cpu_capability())\n"
)


def _levels_in_subprocess(value):
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if value is not None:
        env["ATEN_CPU_CAPABILITY"] = value
    res = subprocess.run([sys.executable, "-c", _REPORT_LEVELS], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.split(), res.stderr


def test_aten_cpu_capability_forces_the_kernels_and_aten_alike():
    best = LEVELS[-1]
    assert _levels_in_subprocess(None)[0][0] == best  # unset: the best level the CPU runs
    for level in LEVELS:
        (ours, aten), _ = _levels_in_subprocess(level)
        assert ours == level and aten == level.upper()
    (ours, _), err = _levels_in_subprocess("sse9")  # ATen's rule: an unknown value is ignored, with a warning
    # our own warning (cpu_capability.cpp), not ATen's, which says the same without the prefix
    assert ours == best and "rollingq: ignoring invalid value for ATEN_CPU_CAPABILITY: sse9" in err


def test_set_cpu_capability_rejects_unknown_or_unsupported_levels():
    with pytest.raises(ValueError, match=r"^name: expected 'default', 'avx2' or 'avx512', got 'avx1024'"):
        _C._set_cpu_capability("avx1024")
    with pytest.raises(TypeError, match=r"^name: expected a str"):
        _C._set_cpu_capability(2)
    for level in {"default", "avx2", "avx512"} - set(LEVELS):
        with pytest.raises(ValueError, match=rf"cannot run '{level}' kernels"):
            _C._set_cpu_capability(level)


@pytest.mark.parametrize("class_only", [False, True])
def test_every_level_drops_exactly_the_contract_mask(class_only, cpu_level):
    # v = the identity (N <= Dh), so out[b, h, i, j] = P_d[b, h, i, j]: zero exactly where dropped.
    B, H, segs, p = 2, 3, [13, 19], 0.4  # N = 33: every vector width (4, 8, 16) leaves a tail
    N = 1 + sum(segs)
    q = torch.randn(B, H, 1 if class_only else N, N)
    k = torch.randn(B, H, N, N)
    v = torch.eye(N).expand(B, H, N, N).contiguous()
    out, _ = rollingq_attention(q, k, v, segs, dropout_p=p, seed=1234, backend="cpp", compute_stats=False)
    keep = rollingq_kernels.dropout_mask(1234, B, H, q.shape[2], N, p)
    assert torch.equal(out != 0, keep)


# where a level's code lives: our units' namespaces and ATen's per-level vector namespaces (a
# function name may start with its return type: "void rollingq::AVX2::..."; a name that mentions
# a level's namespace in its arguments is as unique to that level, so it counts too)
ISA_NAMESPACE = re.compile(r"(^|[\s(<,])(rollingq|at::vec)::AVX(2|512)::")
AVX512_NAMESPACE = re.compile(r"(^|[\s(<,])(rollingq|at::vec)::AVX512::")
_PREFIXES = {"lock", "rep", "repz", "repnz", "repe", "repne", "notrack", "bnd", "data16", "addr32"}
# AVX-512 state: zmm, the mask registers, and xmm/ymm 16-31 (EVEX only)
_AVX512_OPERAND = re.compile(r"%zmm\d|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")
_AVX_OPERAND = re.compile(r"%ymm\d|" + _AVX512_OPERAND.pattern)


def _isa_violations(dump: str) -> dict[str, set[str]]:
    """Functions of an ``objdump -d -C --no-show-raw-insn`` listing that use instructions their
    namespace may not: outside the ISA namespaces any VEX/EVEX instruction (mnemonic v...), any
    mask instruction (k...), ymm/zmm, %k0-7 or xmm/ymm 16-31; in the AVX2 namespaces any AVX-512
    state (zmm, %k, xmm/ymm 16-31, k... instructions). Maps function -> offending mnemonics."""
    offenders: dict[str, set[str]] = {}
    function = None
    for line in dump.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        fields = line.split("\t")
        if function is None or len(fields) < 2 or not re.fullmatch(r"\s*[0-9a-f]+:", fields[0]):
            continue
        words = fields[1].split()
        while words and words[0] in _PREFIXES:
            words = words[1:]
        if not words:
            continue
        mnemonic, operands = words[0], " ".join(words[1:]).split("<")[0]  # not the <symbol> comment
        if not ISA_NAMESPACE.search(function):
            bad = mnemonic.startswith(("v", "k")) or _AVX_OPERAND.search(operands)
        elif not AVX512_NAMESPACE.search(function):  # AVX2
            bad = mnemonic.startswith("k") or _AVX512_OPERAND.search(operands)
        else:
            bad = False
        if bad:
            offenders.setdefault(function, set()).add(mnemonic)
    return offenders


def test_isa_check_flags_avx_outside_and_avx512_inside_avx2_code():
    # the checker itself: each rule must fire on a line that breaks it, and only there
    def dump(function, insn):
        return f"0000000000001000 <{function}>:\n    1000:\t{insn}\n"

    base, avx2, avx512 = "rollingq::base::mix32(unsigned int)", "rollingq::AVX2::dot(float const*)", \
        "void at::vec::AVX512::foo()"
    for insn, mnemonic in (("vmovss (%rdi),%xmm0", "vmovss"), ("vfmadd231ps %xmm1,%xmm2,%xmm3", "vfmadd231ps"),
                           ("kmovw %eax,%k1", "kmovw"), ("movaps %xmm17,%xmm0", "movaps"),
                           ("addps %ymm0,%ymm1", "addps"), ("notrack vzeroupper", "vzeroupper")):
        assert _isa_violations(dump(base, insn)) == {base: {mnemonic}}, insn
    for insn in ("vaddps %zmm0,%zmm1,%zmm2", "kmovw %k1,%eax", "vmovups %ymm16,(%rdi)",
                 "vmovups %xmm0,%xmm31{%k1}"):
        assert avx2 in _isa_violations(dump(avx2, insn)), insn
    for function, insn in ((base, "movaps %xmm15,%xmm0"), (base, "call 10 <void rollingq::AVX2::x()>"),
                           (avx2, "vfmadd231ps %ymm1,%ymm2,%ymm15"), (avx512, "vaddps %zmm0,%zmm31,%zmm2{%k1}")):
        assert _isa_violations(dump(function, insn)) == {}, insn


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="x86-64 with objdump only")
def test_only_the_isa_units_contain_avx_code():
    # A default build runs on any x86-64 CPU: AVX2 and AVX-512 instructions appear only in the
    # per-level units (csrc/cpu/, namespaces rollingq::AVX2 / rollingq::AVX512), never in code the
    # baseline calls (e.g. an inline function of a shared header kept from an AVX unit), and the
    # AVX2 level never touches AVX-512 state. Only our library is disassembled (libtorch is linked
    # dynamically, not into it).
    if _C.MARCH_NATIVE:
        pytest.skip("built with ROLLINGQ_NATIVE=1 (-march=native): every unit may use the CPU's instructions")
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(Path(_C.__file__))],
                          capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.search(r"\tvfmadd\w+ .*%zmm", dump) and re.search(r"\tvfmadd\w+ .*%ymm", dump), \
        "the AVX2 and AVX512 units must be in the library (FMA on ymm and zmm)"
    offenders = _isa_violations(dump)
    assert not offenders, f"instructions outside their level: {sorted(offenders.items())[:10]}"
