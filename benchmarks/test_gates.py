"""The regression gates (``_gates.py``), evaluated on the rows measured earlier in the same run.

Runs after ``test_attention.py`` (pytest orders files by name). First every gate
with a threshold whose rows were measured is re-measured in alternating pairs
(``BenchSession.paired_ratios``), then the gates are judged on the median pair
ratio. In a full run a gate whose ratio is below its threshold fails here; in
``--quick`` mode the gates are only reported (in the end-of-run table). Gates
skip when fused ran the eager fallback or a needed row was not measured (e.g.
deselected with ``-k``).
"""

from __future__ import annotations

import pytest

from ._gates import evaluate_gates, failing, gate_cases
from ._report import gates_table
from ._session import BenchSession


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
    assert not bad, "regression gates failed:\n" + gates_table(bad)
