"""The C++ CPU kernels (``rollingq_kernels._C``) against the float64 eager reference.

Covers the forward, every statistic and the three input gradients across
layouts (all-query / class-only, lengths with empty and one-token modalities,
M = 3, rotations, dropout), gradcheck, opcheck of both registered ops,
bitwise determinism across runs and thread counts, torch.compile, reduced
precision, the registered schemas and the kernels' own argument checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rollingq_kernels
from rollingq_kernels import _library, rollingq_attention

pytestmark = pytest.mark.skipif(not rollingq_kernels.HAS_CPP, reason="rollingq_kernels._C (C++ kernels) not built")

STAT_FIELDS = ("key_mean", "mass", "cos", "cos_per_head", "query", "valid")


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_stats_and_grads_match_float64_reference(name, dtype):
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


@pytest.mark.parametrize("name", ["aq-lengths-empty-modality", "aq-varlen-gaps"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_padded_query_rows_output_zero_and_get_no_gradient(name, dropout_p):
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


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_class_only_never_reads_padded_keys(dropout_p):
    # The class-row paths skip padded keys (scores, key sums and V rows) instead of masking them
    # after the fact, so garbage there (NaN, inf) cannot reach any output or gradient.
    q, k, v, segs, lengths, rotation = case_inputs("co-lengths-M3", torch.float32)
    valid = rollingq_kernels.reference.key_valid_mask(lengths, segs, q.shape[0], q.device)  # (B, N)
    pad = ~valid[:, None, :, None].expand_as(k)
    k_bad, v_bad = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf"))
    g = torch.randn(q.shape)
    kw = dict(lengths=lengths, rotation=rotation, dropout_p=dropout_p, seed=5)
    clean = run("cpp", q, k, v, segs, grad_out=g, **kw)
    dirty = run("cpp", q, k_bad, v_bad, segs, grad_out=g, **kw)
    assert torch.equal(clean[0], dirty[0])
    for field in STAT_FIELDS:
        assert torch.equal(getattr(clean[1], field), getattr(dirty[1], field)), field
    for a, b in zip(clean[2], dirty[2]):
        assert torch.equal(a, b)


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
    out, lse, *_ = torch.ops.rollingq.attention_fwd(*args)
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
    with_stats = torch.ops.rollingq.attention_fwd(*fwd_args(q, k, v, segs, lengths, rotation))
    without = torch.ops.rollingq.attention_fwd(*fwd_args(q, k, v, segs, lengths, rotation, compute_stats=False))
    assert torch.equal(with_stats[0], without[0]) and torch.equal(with_stats[1], without[1])
    for t in without[2:]:
        assert t.shape == (0,) and t.dtype == torch.float32


def _fwd_bwd(name, dtype, dropout_p=0.3):
    q, k, v, segs, lengths, rotation = case_inputs(name, dtype)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out, stats, grads = run("cpp", q, k, v, segs, grad_out=g, lengths=lengths, rotation=rotation,
                            dropout_p=dropout_p, seed=77)
    return [out, stats.key_mean, stats.mass, *grads]


@pytest.mark.parametrize("name", ["aq-multi-tile", "co-multi-tile", "aq-varlen-gaps"])
def test_bitwise_deterministic_across_runs_and_thread_counts(name):
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


BAD_INPUTS = {
    "q rank": (dict(q=torch.randn(2, 3, 8)), "q"),
    "k rank": (dict(k=torch.randn(2, 3, 8, 4, 1)), "k"),
    "v shape": (dict(v=torch.randn(2, 3, 7, 4)), "v"),
    "q shape": (dict(q=torch.randn(2, 3, 5, 4)), "q"),
    "dtype mismatch": (dict(v=torch.randn(2, 3, 8, 4, dtype=torch.float64)), "q, k, v"),
    "int dtype": (dict(q=torch.ones(2, 3, 8, 4, dtype=torch.int32)), "q"),
    "N mismatch": (dict(segments=[3, 5]), "segments"),
    "one modality": (dict(segments=[7]), "segments"),
    "zero segment": (dict(segments=[7, 0]), "segments"),
    "negative segment": (dict(segments=[9, -2]), "segments"),
    "lengths too long": (dict(lengths=torch.tensor([[3, 5], [0, 1]])), "lengths"),
    "lengths negative": (dict(lengths=torch.tensor([[3, 4], [-1, 1]])), "lengths"),
    "lengths shape": (dict(lengths=torch.tensor([[3, 4, 1], [0, 1, 1]])), "lengths"),
    "lengths dtype": (dict(lengths=torch.tensor([[3, 4], [0, 1]], dtype=torch.int32)), "lengths"),
    "rotation shape": (dict(rotation=torch.eye(4)), "rotation"),
    "rotation per-head shape": (dict(rotation=torch.randn(2, 4, 4)), "rotation"),
    "rotation dtype": (dict(rotation=torch.eye(12, dtype=torch.float16)), "rotation"),
    "dropout_p": (dict(dropout_p=1.0), "dropout_p"),
    "seed": (dict(seed=-1), "seed"),
    "scale": (dict(scale=float("nan")), "scale"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_forward_op_rejects_bad_input_naming_the_argument(case):
    override, name = BAD_INPUTS[case]
    args = {**_good_args(), **override}
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        torch.ops.rollingq.attention_fwd(*args.values())


@pytest.mark.parametrize("per_head", [False, True])
def test_ops_reject_a_non_finite_rotation_with_a_value_error(per_head):
    args = _good_args()
    rotation = torch.eye(4).repeat(3, 1, 1) if per_head else torch.eye(12)
    rotation[..., 2, 1] = float("inf")
    args["rotation"] = rotation.mT  # a transposed view: read in place by the kernels
    with pytest.raises(ValueError, match=r"rotation: expected finite values, got NaN or inf"):
        torch.ops.rollingq.attention_fwd(*args.values())
    good = {**args, "rotation": torch.eye(12)}
    out, lse, *_ = torch.ops.rollingq.attention_fwd(*good.values())
    bwd = (torch.randn_like(out), args["q"], args["k"], args["v"], out, lse, args["segments"], args["lengths"],
           args["rotation"], args["scale"], 0.0, 0)
    with pytest.raises(ValueError, match=r"rotation: expected finite values"):
        torch.ops.rollingq.attention_bwd(*bwd)
    nan_q = {**good, "q": torch.full_like(args["q"], float("nan"))}  # NaN from q, R finite: no error
    assert torch.isnan(torch.ops.rollingq.attention_fwd(*nan_q.values())[0][:, :, 0]).all()


@pytest.mark.parametrize(
    "override,name",
    [
        (dict(lse=torch.zeros(2, 3, 7)), "lse"),
        (dict(lse=torch.zeros(2, 3, 8, dtype=torch.float64)), "lse"),
        (dict(grad_out=torch.zeros(2, 3, 1, 4)), "grad_out"),
        (dict(out=torch.zeros(2, 3, 8, 4, dtype=torch.float64)), "out"),
        (dict(segments=[2, 4]), "segments"),
        (dict(lengths=torch.tensor([[4, 4], [0, 1]])), "lengths"),
    ],
)
def test_backward_op_rejects_bad_input_naming_the_argument(override, name):
    a = _good_args()
    out, lse, *_ = torch.ops.rollingq.attention_fwd(*a.values())
    args = dict(grad_out=torch.randn_like(out), q=a["q"], k=a["k"], v=a["v"], out=out, lse=lse,
                segments=a["segments"], lengths=a["lengths"], rotation=None, scale=0.5, dropout_p=0.0, seed=0)
    args.update(override)
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        torch.ops.rollingq.attention_bwd(*args.values())
