"""The C++ CPU kernels (csrc/forward.cpp, backward.cpp) against the float64 eager reference.

Covers the forward, every statistic and the three input gradients across
layouts (all-query / class-only, lengths with empty and one-token modalities,
M = 3, rotations, dropout), padding never read, gradcheck, bitwise determinism
across runs and thread counts, and reduced precision. The registered ops'
schemas, argument checks, opcheck and torch.compile: ``test_cpp_ops.py``; the
run-time instruction-set dispatch: ``test_cpu_capability.py``.

The float row kernels exist once per instruction set (DEFAULT, AVX2, AVX512;
csrc/cpu/) and are chosen at run time: the ``cpu_level`` fixture (``conftest.py``)
runs a test at every level this build and CPU support, switching in-process with
``_C._set_cpu_capability``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cpp_cases import (
    CASES,
    STAT_FIELDS,
    assert_close,
    case_inputs,
    check_reduced_precision,
    make_inputs,
    random_rotation,
    run,
)

import rollingq_kernels
from rollingq_kernels import rollingq_attention

pytestmark = pytest.mark.skipif(not rollingq_kernels.HAS_CPP, reason="rollingq_kernels._C (C++ kernels) not built")


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


# Reduced precision: error of the kernels against a float64 reference of the same
# rounded inputs must stay within FACTOR x the eager reference's own error in that
# dtype, plus ATOL (one rounding of an O(1) value).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["aq-lengths-empty-modality", "co-lengths-M3", "aq-multi-tile"])
def test_reduced_precision_within_tolerance_table(name, dtype):
    check_reduced_precision(name, dtype, seed=9, stats=("mass", "cos"), label=str(dtype))
