"""The results file and README generation round-trip (no timing)."""

from __future__ import annotations

from pathlib import Path

from ._gates import GATES, GateResult
from ._results import Recorder, Row, load_results, write_results
from .update_readme import BEGIN, END, latest_per_machine, update_readme


def _row(provider: str, pass_: str, median_s: float) -> Row:
    return Row(provider, "ks-b8", "B8 H12 N1101 Dh64", [512, 588], "all-query", "fp32", pass_, "cpu", "cpp",
               median_s, 0.9 * median_s, 5, 10**9, 10**8, 0.5, 12.5, 0.25, 0.5, 3 << 20, ["gate-all-query"],
               frac_gemm=0.75)


def test_results_file_and_readme_round_trip(tmp_path: Path) -> None:
    rec = Recorder()
    rec.add(_row("fused", "fwd", 0.25))
    rec.add(_row("eager", "fwd", 1.5))
    rec.fill_ratios()
    by_name = {g.name: g for g in GATES}
    gates = [GateResult(by_name["cpu fwd vs eager"], "fp32", "ks-b8", 6.0, "PASS").to_dict(),
             GateResult(by_name["cpu fwd vs sdpa"], "fp32", "ks-b8", 1.3, "PASS", "median of 3 alternating pairs",
                        1.25, (1.3, 1.1, 1.4)).to_dict()]
    e2e = [{"variant": "fused", "attention": "fused class-only", "estimate": "accumulate", "median_epoch_s": 2.5,
            "x_fused": 1.0, "rotations": 2, "train_size": 512, "batch_size": 64, "segments": [176, 196], "dim": 128}]
    older = {"device_name": "Test CPU (2 cores)", "date": "2026-01-01T00:00:00Z", "torch": "x", "has_cpp": True,
             "quick": False}
    newer = {**older, "date": "2026-02-03T10:00:00Z", "note": "shared cores", "device_type": "cpu",
             "cpu_capability": {"kernels": "avx2", "kernels_supported": ["default", "avx2"], "aten": "AVX2",
                                "kernels_march_native": False, "level": "forced"},
             "cpu_flags": ["fpu", "avx", "avx2", "fma"],
             "env": {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": None}}
    machine = {"copy_gbps": 10.0, "matmul_tflops": {"fp32": 0.1},
               "tile_gemm": {"fp32-dh64": {"blas": 0.2, "own": 0.4, "best": 0.4, "tiles": 48, "rows": 256,
                                           "keys": 512, "head_dim": 64}}}
    write_results(tmp_path, older, machine, rec.rows[:1], [], [])
    path = write_results(tmp_path, newer, machine, rec.rows, gates, e2e)
    assert path.name == "test-cpu-2-cores-avx2-2026-02-03.json"  # one file per instruction-set level
    assert sorted(latest_per_machine(tmp_path)) == sorted([path, tmp_path / "test-cpu-2-cores-2026-01-01.json"])

    back = load_results(path)
    assert [r.provider for r in back["rows"]] == ["fused", "eager"]
    assert back["rows"][1].ratio_to_fused == 6.0

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nSTALE-TABLE\n{END}\noutro\n")
    update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "STALE-TABLE" not in text
    assert "| ks-b8 | all-query | fp32 | fwd | eager | 1500.000 | 6.00 |" in text
    assert "| cpu fwd vs eager | ks-b8 | fp32 | 6.00 | - | - | >= 3.5 | PASS |" in text
    # the SDPA gates: the median of the pairs, their minimum and both thresholds
    assert "| cpu fwd vs sdpa | ks-b8 | fp32 | 1.30 | 1.10 | 1.25 | >= 1.2, min >= 1.05 | PASS |" in text
    # the roofline: both tile GEMM rates, and each row's fraction of the faster one
    assert "tile GEMM (the roofline, `% tile GEMM` divides by the faster): fp32-dh64 (48 tiles of 256x512): " \
           "blas 0.200, own 0.400 TFLOP/s" in text
    assert "| 0.500 | 12.5 | 25.0 | 50.0 | 75.0 | 3.0 |" in text  # % copy BW, % matmul, % tile GEMM
    assert "shared cores" in text and "fused class-only" in text and "2026-02-03" in text
    assert "### Test CPU (2 cores) — avx2 — 2026-02-03" in text
    assert "C++ kernels **avx2** (forced) (supported here: default, avx2; -march=native: False), ATen **AVX2**" in text
    assert "CPU vector flags: avx avx2 fma; environment: ATEN_CPU_CAPABILITY=avx2." in text
