"""The no-GPU compile gate (``benchmarks/compile_gate.py``): SASS parsing, its rules, one real compile.

The real compilation needs Triton's bundled ``ptxas``/``cuobjdump`` (present in every CUDA build of
Triton) and no GPU; it runs outside the interpreter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds the `benchmarks` package

from benchmarks import _cubin  # noqa: E402
from benchmarks.compile_gate import Result, Variant, check, compile_variant, loop_comparison  # noqa: E402

_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0030*/                   NOP ;
        /*0040*/               @P0 FFMA R2, R3, R4, R5 ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0058*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/              @!P1 BRA 0x20 ;
        /*0070*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0080*/                   BRA 0x10 ;
        /*0090*/                   EXIT ;
"""


def test_sass_loops_count_one_iteration_and_find_the_innermost():
    loops = _cubin.sass_loops(_SASS)
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x60), (0x10, 0x80)]
    inner, outer = loops
    assert inner.innermost and not outer.innermost
    assert inner.instructions == 5  # NOP excluded, the predicated FFMA, the barrier and the branch counted
    assert inner.wgmma == inner.mma == 2 and inner.barriers == 1
    assert [lp.instructions for lp in _cubin.main_loops(_SASS)] == [5]
    assert _cubin.count_ops(_SASS, "HGMMA") == 2


def _result(kernel="fwd", dtype="bf16", dh=64, cfg=(128, 64, 8, 3), **kw) -> Result:
    return Result(Variant(kernel, dtype, dh, (), *cfg), ok=True, **kw)


def test_rules_fail_spills_smem_and_missing_wgmma_where_they_matter():
    assert check(_result(spill_stores=8, wgmma=8)).failures  # bf16, Dh 64: a spill fails
    assert not check(_result(dtype="fp32", spill_stores=8, wgmma=8)).failures  # fp32: reported only
    assert check(_result(dtype="fp32", spill_stores=8, wgmma=8)).warnings
    assert not check(_result(dh=256, spill_stores=8, wgmma=8)).failures  # Dh > 128: reported only
    assert check(_result(shared_bytes=228 * 1024, wgmma=8)).failures
    assert check(_result(wgmma=0)).failures  # a 128-row tile without wgmma
    assert not check(_result(cfg=(32, 32, 4, 2), wgmma=0)).failures  # 32 rows: below wgmma's M
    assert check(_result(kernel="dkdv", cfg=(32, 64, 8, 2), wgmma=0)).failures  # dK/dV: the key tile is M
    assert not check(Result(Variant("class_fwd", "bf16", 64, (), 1, 32, 4, 2), ok=True)).failures
    assert check(Result(Variant("fwd", "bf16", 64, (), 128, 64, 8, 3), ok=False, error="boom")).failures


def test_loop_comparison_gates_the_forward_against_the_tutorial():
    base = Result(Variant("baseline", "bf16", 64, (), 128, 64, 8, 3), ok=True, loops=[300])
    good = _result(loops=[320, 340])
    bad = _result(loops=[350])
    dropout = Result(Variant("fwd", "bf16", 64, (("DROPOUT", True),), 128, 64, 8, 3), ok=True, loops=[900])
    rows, failures = loop_comparison([base, good, dropout])
    assert len(rows) == 2 and not failures
    _, failures = loop_comparison([base, bad])
    assert len(failures) == 1 and "1.17x" in failures[0]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiles real kernels")
def test_compiles_for_sm90a_without_a_gpu():
    pytest.importorskip("triton")
    base = compile_variant(Variant("baseline", "bf16", 64, (), 128, 64, 8, 3))
    assert base.ok, base.error
    assert base.registers > 0 and base.wgmma > 0 and base.shared_bytes > 0 and len(base.loops) == 1
    delta = compile_variant(Variant("delta", "bf16", 64, (("HAS_LENGTHS", True),), 64, 0, 4, 1))
    assert delta.ok and not delta.failures, delta.error or delta.failures
