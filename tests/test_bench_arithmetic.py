"""The benchmark suite's own arithmetic: FLOP and byte counts, rates, ratios, gate judgement.

Hand-computed cases; runs in the normal ``pytest tests/`` (no benchmarking).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds the `benchmarks` package

from benchmarks._arith import (  # noqa: E402
    OpDims,
    attention_bytes,
    attention_flops,
    copy_bandwidth_gbps,
    fraction,
    gbps,
    matmul_tflops,
    median_seconds,
    pair_call_counts,
    speedup,
    stats_output_bytes,
    tflops,
)
from benchmarks._gates import GATES, TILE_GEMM, evaluate_gates, gate_cases, judge  # noqa: E402
from benchmarks._results import Recorder, Row, results_path, slugify  # noqa: E402
from benchmarks._shapes import BenchShape, TileShape, tile_shape  # noqa: E402

# B=3, H=5, N=1+7+11=19, Dh=13, M=2, fp32
ALLQ = OpDims(batch=3, heads=5, n_keys=19, head_dim=13, n_queries=19, num_modalities=2, itemsize=4)
CLS = OpDims(batch=3, heads=5, n_keys=19, head_dim=13, n_queries=1, num_modalities=2, itemsize=2)


def test_flops_all_query_and_class_only() -> None:
    fwd = 4 * 3 * 5 * 19 * 19 * 13  # 281580
    assert attention_flops(ALLQ, "fwd") == 281580 == fwd
    assert attention_flops(ALLQ, "bwd") == 703950  # 2.5 x
    assert attention_flops(ALLQ, "fwd_bwd") == 281580 + 703950
    assert attention_flops(CLS, "fwd") == 4 * 3 * 5 * 1 * 19 * 13 == 14820
    assert attention_flops(CLS, "fwd_bwd") == 14820 + 37050


def test_stats_bytes() -> None:
    # key_mean 3*5*2*13 + mass 3*5*3 + query 3*5*13 floats
    assert stats_output_bytes(ALLQ) == 4 * (390 + 45 + 195) == 2520


def test_bytes_forward_backward_by_hand() -> None:
    q = kv = 3 * 5 * 19 * 13 * 4  # 14820 bytes each (all-query)
    lse = 3 * 5 * 19 * 4  # 1140
    rot = 4 * 65 * 65  # 16900
    lengths = 8 * 3 * 2  # 48
    fwd_nostats = q + 2 * kv + rot + lengths + q + lse
    assert attention_bytes(ALLQ, "fwd", stats=False) == fwd_nostats == 77368
    assert attention_bytes(ALLQ, "fwd", stats=True) == fwd_nostats + 2520
    # grad_out q k v out lse rot lengths read; dq dk dv written: 8 tensors of 14820
    bwd = (q + q + 2 * kv + q + lse + rot + lengths) + (q + 2 * kv)
    assert attention_bytes(ALLQ, "bwd", stats=True) == bwd == 136648
    assert attention_bytes(ALLQ, "fwd_bwd", stats=False) == fwd_nostats + bwd
    assert attention_bytes(ALLQ, "fwd", stats=False, rotation=False, lengths=False) == fwd_nostats - rot - lengths


def test_bytes_class_only_half_precision() -> None:
    q = 3 * 5 * 1 * 13 * 2  # 390
    kv = 3 * 5 * 19 * 13 * 2  # 7410
    lse = 3 * 5 * 1 * 4  # 60
    assert attention_bytes(CLS, "fwd", stats=False, rotation=False, lengths=False) == q + 2 * kv + q + lse == 15660


def test_rates_and_fractions() -> None:
    assert tflops(3_000_000_000_000, 1.5) == pytest.approx(2.0)
    assert gbps(7_000_000_000, 0.5) == pytest.approx(14.0)
    assert copy_bandwidth_gbps(1_000_000_000, 0.25) == pytest.approx(8.0)  # read + write
    assert matmul_tflops(1000, 2e-6) == pytest.approx(1000.0)  # 2e9 FLOP in 2 us
    assert fraction(3.0, 12.0) == pytest.approx(0.25)
    assert math.isnan(fraction(1.0, None)) and math.isnan(fraction(1.0, 0.0))
    assert math.isnan(tflops(10, 0.0)) and math.isnan(gbps(10, float("inf")))


def test_speedup_and_median() -> None:
    assert speedup(t_other=0.9, t_fused=0.3) == pytest.approx(3.0)
    assert speedup(0.2, 0.4) == pytest.approx(0.5)
    assert math.isnan(speedup(0.2, 0.0))
    assert median_seconds([0.5, 0.1, 0.3, 0.9, 0.2]) == pytest.approx(0.3)
    assert median_seconds([0.4, 0.1]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="samples"):
        median_seconds([])


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="pass_"):
        attention_flops(ALLQ, "forward")
    with pytest.raises(ValueError, match="n_queries"):
        OpDims(batch=1, heads=1, n_keys=7, head_dim=3, n_queries=3, num_modalities=2, itemsize=4)
    with pytest.raises(ValueError, match="batch"):
        OpDims(batch=0, heads=1, n_keys=7, head_dim=3, n_queries=7, num_modalities=2, itemsize=4)


def _row(provider: str, median_s: float, pass_: str = "fwd", backend: str = "cpp") -> Row:
    nan = float("nan")
    return Row(provider, "s", "B1", [3, 5], "all-query", "fp32", pass_, "cpu", backend, median_s, median_s, 5,
               1, 1, nan, nan, nan, nan, 0)


def test_recorder_ratios_are_against_fused_of_the_same_group() -> None:
    rec = Recorder()
    rec.add(_row("fused", 0.02))
    rec.add(_row("eager", 0.07))
    rec.add(_row("sdpa", 0.01))
    rec.add(_row("eager", 0.5, pass_="bwd"))  # no fused row in that group
    rec.add(_row("eager", 0.08))  # replaces the first eager row
    rec.fill_ratios()
    by = {(r.provider, r.pass_): r.ratio_to_fused for r in rec.rows}
    assert by[("fused", "fwd")] == pytest.approx(1.0)
    assert by[("eager", "fwd")] == pytest.approx(4.0)
    assert by[("sdpa", "fwd")] == pytest.approx(0.5)
    assert by[("eager", "bwd")] is None
    assert len(rec.rows) == 4


def test_row_json_round_trip_turns_nan_into_none() -> None:
    r = _row("fused", 0.02, backend="fallback")
    d = r.to_dict()
    assert d["pass"] == "fwd" and d["fallback"] is True and d["tflops"] is None
    back = Row.from_dict(d)
    assert back.pass_ == "fwd" and back.median_s == pytest.approx(0.02) and math.isnan(back.tflops)


def test_gate_judgement_and_slug() -> None:
    assert judge(1.2, 1.2) == "PASS" and judge(1.19, 1.2) == "FAIL"
    assert judge(float("nan"), 1.0) == "FAIL" and judge(0.1, None) == "INFO"
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slugify("AMD EPYC 9R14 (2 cores)") == "amd-epyc-9r14-2-cores"


def test_rounds_grow_for_fast_cases_within_bounds() -> None:
    import torch

    from benchmarks._session import BenchConfig

    cfg = BenchConfig(torch.device("cpu"), quick=False, warmup=1, rounds=3, max_rounds=30, target_s=5.0, input_sets=3,
                      gate_pairs=7)
    assert cfg.rounds_for(1.3) == 4  # ceil(5 / 1.3)
    assert cfg.rounds_for(10.0) == 3  # never below the minimum
    assert cfg.rounds_for(0.01) == 30  # never above the maximum
    assert cfg.rounds_for(0.0) == 30


def test_unpadded_shapes_read_no_lengths() -> None:
    # an unpadded call passes lengths=None: the (B, M) int64 tensor is not read
    assert attention_bytes(ALLQ, "fwd", stats=False, lengths=False) == attention_bytes(ALLQ, "fwd", stats=False) - 48


def _gate_row(provider: str, pass_: str, median_s: float, backend: str = "cpp") -> Row:
    return Row(provider, "ks-b8", "B8 H12 N1101 Dh64", [512, 588], "all-query", "fp32", pass_, "cpu", backend,
               median_s, median_s, 5, 1, 1, 1.0, 1.0, 1.0, 1.0, 0, ["gate-all-query"])


def test_gates_judge_the_median_of_alternating_pairs_and_report_the_rows_ratio() -> None:
    rec = Recorder()
    rec.add(_gate_row("fused", "fwd", 0.20))
    rec.add(_gate_row("sdpa", "fwd", 0.18))  # rows measured minutes apart: 0.90
    rec.add(_gate_row("eager", "fwd", 1.00))
    gate = next(g for g in GATES if g.name == "cpu fwd vs sdpa")
    assert (gate, "ks-b8", "fp32") in gate_cases(rec, "cpu")
    assert all(g.threshold is not None for g, _, _ in gate_cases(rec, "cpu"))

    def result(paired):
        return next(r for r in evaluate_gates(rec, "cpu", paired) if r.gate.name == "cpu fwd vs sdpa")

    without = result(None)
    assert without.status == "FAIL" and without.ratio == pytest.approx(0.9) and without.pair_ratios == ()
    with_pairs = result({("cpu fwd vs sdpa", "ks-b8", "fp32"): [1.3, 1.1, 1.25]})
    assert with_pairs.status == "PASS" and with_pairs.ratio == pytest.approx(1.25)
    assert with_pairs.min_ratio == pytest.approx(1.1)
    assert with_pairs.row_ratio == pytest.approx(0.9) and with_pairs.to_dict()["pair_ratios"] == [1.3, 1.1, 1.25]
    assert result({("cpu fwd vs sdpa", "ks-b8", "fp32"): [1.19, 1.1, 1.5]}).status == "FAIL"  # median 1.19

    rec.add(_gate_row("fused", "fwd", 0.20, backend="fallback"))  # no compiled kernel: nothing to re-measure
    assert not gate_cases(rec, "cpu")


def test_a_steady_margin_needs_every_pair_above_the_floor() -> None:
    # issue 28: fused >= 1.2x SDPA as the median of the pairs AND no pair below 1.05x
    rec = Recorder()
    rec.add(_gate_row("fused", "fwd", 0.20))
    rec.add(_gate_row("sdpa", "fwd", 0.30))
    gate = next(g for g in GATES if g.name == "cpu fwd vs sdpa")
    assert (gate.threshold, gate.min_threshold) == (1.2, 1.05)
    paired = {("cpu fwd vs sdpa", "ks-b8", "fp32"): [1.4, 1.5, 1.02, 1.45, 1.3]}  # median 1.4, one lucky-low pair
    r = next(r for r in evaluate_gates(rec, "cpu", paired) if r.gate.name == "cpu fwd vs sdpa")
    assert r.ratio == pytest.approx(1.4) and r.min_ratio == pytest.approx(1.02) and r.status == "FAIL"
    assert judge(1.4, 1.2, 1.05, 1.05) == "PASS" and judge(1.4, 1.2, 1.049, 1.05) == "FAIL"
    assert judge(1.4, 1.2) == "PASS"  # rows' ratio only: no pairs, no minimum to judge
    # every mode and pass of the issue has its SDPA gate at the same thresholds
    sdpa_gates = {(g.fused_mode, g.pass_) for g in GATES
                  if g.device_type == "cpu" and g.other == "sdpa" and (g.threshold, g.min_threshold) == (1.2, 1.05)}
    assert sdpa_gates == {(m, p) for m in ("all-query", "class-only") for p in ("fwd", "fwd_bwd")}


def test_cpu_bf16_rows_are_reported_against_sdpa_bf16_but_not_gated() -> None:
    rec = Recorder()
    for provider, t in (("fused", 0.1), ("sdpa", 0.3)):
        row = _gate_row(provider, "fwd", t)
        row.dtype = "bf16"
        rec.add(row)
    assert not gate_cases(rec, "cpu")  # the thresholds of issue 28 are for float32
    judged = [r for r in evaluate_gates(rec, "cpu") if r.status != "SKIP"]
    assert [(r.gate.name, r.status, round(r.ratio, 6)) for r in judged] == [("cpu bf16 fwd vs sdpa bf16", "INFO", 3.0)]


def test_the_roofline_gate_reads_the_fused_rows_fraction_of_the_tile_gemm_rate() -> None:
    rec = Recorder()
    row = _gate_row("fused", "fwd", 0.20)
    row.roles = ["gate-roofline"]
    row.frac_gemm = 0.8
    rec.add(row)
    gate = next(g for g in GATES if g.other == TILE_GEMM)
    assert gate.threshold == 0.75 and gate.pass_ == "fwd" and gate.fused_mode == "all-query"
    assert (gate, "ks-b8", "fp32") in gate_cases(rec, "cpu")  # no second row needed
    result = next(r for r in evaluate_gates(rec, "cpu") if r.gate is gate)
    assert result.status == "PASS" and result.ratio == pytest.approx(0.8)
    paired = {(gate.name, "ks-b8", "fp32"): [0.7, 0.74, 0.72]}
    assert next(r for r in evaluate_gates(rec, "cpu", paired) if r.gate is gate).status == "FAIL"


def test_the_roofline_tiles_are_one_kernel_tile_per_batch_and_head() -> None:
    ks = BenchShape("ks", 4, 12, 64, (512, 588))
    assert tile_shape(ks) == TileShape(tiles=48, rows=256, keys=512, head_dim=64)
    assert tile_shape(ks).flops == 4 * 48 * 256 * 512 * 64
    small = BenchShape("small", 2, 3, 16, (13, 17))  # N = 31: smaller than one tile
    assert tile_shape(small) == TileShape(tiles=6, rows=31, keys=31, head_dim=16)


def test_results_file_names_carry_the_cpu_instruction_set() -> None:
    meta = {"device_type": "cpu", "device_name": "AMD EPYC (2 cores)", "date": "2026-11-29T10:00:00Z",
            "cpu_capability": {"kernels": "avx2", "aten": "AVX2"}}
    assert results_path(Path("r"), meta) == Path("r/amd-epyc-2-cores-avx2-2026-11-29.json")
    assert results_path(Path("r"), {**meta, "quick": True}).name == "amd-epyc-2-cores-avx2-2026-11-29-quick.json"
    no_kernels = {**meta, "cpu_capability": {"kernels": None, "aten": "AVX2"}}
    assert results_path(Path("r"), no_kernels).name == "amd-epyc-2-cores-2026-11-29.json"
    gpu = {**meta, "device_type": "cuda", "device_name": "NVIDIA H100"}
    assert results_path(Path("r"), gpu).name == "nvidia-h100-2026-11-29.json"


def test_gate_pairs_time_the_faster_side_about_as_long_as_the_slower():
    assert pair_call_counts([0.005, 0.40]) == [15, 1]  # class-only vs eager all-query: capped
    assert pair_call_counts([0.10, 0.31]) == [3, 1]
    assert pair_call_counts([0.21, 0.20]) == [1, 1]  # comparable sides: one call each
    assert pair_call_counts([0.0, 0.5], most=4) == [4, 1]  # a zero probe does not divide by zero


def test_gate_pairs_time_short_calls_several_times_on_both_sides():
    # class-only vs SDPA: two ~2 ms calls; one call each would let one preemption decide the pair
    assert pair_call_counts([0.002, 0.0025]) == [15, 12]
    assert pair_call_counts([0.006, 0.012]) == [5, 3]
    assert pair_call_counts([0.002, 0.0025], min_side_s=0.0) == [1, 1]  # the old rule: equal durations only
