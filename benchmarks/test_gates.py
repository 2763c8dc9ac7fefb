"""The regression gates (``_gates.py``), evaluated on the rows measured earlier in the same run.

Runs after ``test_attention.py`` (pytest orders files by name). First every gate
with a threshold whose rows were measured is re-measured in alternating pairs
(``BenchSession.paired_ratios``), then the gates are judged on the median pair
ratio (and, for the gates against SDPA, on the smallest pair ratio too). In a
full run a gate below its thresholds fails here, naming the instruction-set
level (native or forced) and every pair ratio; in ``--quick`` mode the gates are
only reported (in the end-of-run table): the tiny shapes and few pairs of a
CI smoke test must never make it a flaky timing gate. Gates
skip when fused ran the eager fallback or a needed row was not measured (e.g.
deselected with ``-k``).
"""

from __future__ import annotations

import pytest

from ._gates import GateResult, evaluate_gates, failing, gate_cases
from ._report import gates_table
from ._results import device_name, level_text
from ._session import BenchSession


def failure_message(bad: list[GateResult], level: str) -> str:
    """The gates that failed, with the instruction-set level and every pair ratio."""
    pairs = "\n".join(f"  {r.gate.name} / {r.shape} / {r.dtype}: pair ratios "
                      + (", ".join(f"{x:.3f}" for x in r.pair_ratios) or "none (rows' ratio judged)")
                      for r in bad)
    return f"regression gates failed at {level}:\n{gates_table(bad)}\n{pairs}"


def test_gates(bench: BenchSession) -> None:
    if not bench.recorder.rows:
        pytest.skip("no benchmark rows were measured in this run (test_attention deselected?)")
    device_type = bench.config.device.type
    for gate, shape, dtype in gate_cases(bench.recorder, device_type):
        bench.paired[(gate.name, shape, dtype)] = bench.paired_ratios(gate, shape, dtype)
    results = evaluate_gates(bench.recorder, device_type, bench.paired)
    judged = [r for r in results if r.status in ("PASS", "FAIL")]
    if not judged:
        reasons = sorted({r.reason for r in results if r.status == "SKIP"})
        pytest.skip("no gate could be judged: " + "; ".join(reasons))
    bad = failing(results)
    if bench.config.quick:
        return  # --quick: shapes too small to be meaningful; the table at the end shows the outcome
    level = level_text() if device_type == "cpu" else device_name(bench.config.device)
    assert not bad, failure_message(bad, level)
