"""Regression gates: same-run speed ratios checked against the kernel issues' thresholds.

A gate compares ``fused`` on the shape tagged with a role (``_shapes.py``)
against another provider measured in the same run: ``ratio = t_other / t_fused``
must be ``>= threshold``. Ratios, not absolute times, so the gates survive
machine and run-to-run drift. The roofline gate (``other = TILE_GEMM``) compares
the fused call's FLOP rate with the machine's tile GEMM rate instead
(``_timing.TileGemm``): ``ratio = rate(fused) / rate(tile GEMM)``.

The ratio of a gate with a threshold is re-measured by ``test_gates.py`` in
alternating pairs (fused, other, fused, other, ...) on the rows' shape: the
median of the per-pair ratios, which a slow drift of the machine's load cannot
bias the way it can bias two medians measured minutes apart; a gate with a
``min_threshold`` also needs its smallest pair ratio at or above that (a steady
margin, not a lucky median). The ratio of the two rows' medians is reported
next to it (``row_ratio``); where no pairs were measured, the gate uses it.

Outcomes: ``PASS``, ``FAIL``, ``INFO`` (no threshold: reported only),
``SKIP`` (a row is missing, or fused ran the eager fallback because no compiled
kernel exists). In ``--quick`` mode gates are reported but never fail the run
(the shapes are too small to mean anything); in a full run ``test_gates.py``
fails for every ``FAIL``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from ._arith import speedup
from ._results import Recorder, Row
from ._shapes import ROLE_GATE_ALL_QUERY, ROLE_GATE_CLASS_ONLY, ROLE_GATE_ROOFLINE

CPP_ISSUE = "C++ kernel issue"
CPU_MARGIN_ISSUE = "issue 28 (CPU II)"
TRITON_ISSUE = "Triton kernel issue"
#: The ``other`` side of the roofline gate: the machine's tile GEMM rate, not a provider.
TILE_GEMM = "tile-gemm"


@dataclass(frozen=True)
class Gate:
    """One ratio check.

    Attributes:
        name: short id.
        device_type: ``"cpu"`` or ``"cuda"``.
        role: the shape role it reads.
        pass_: ``fwd``, ``bwd`` or ``fwd_bwd``.
        other: the provider compared with ``fused``.
        fused_mode, other_mode: ``all-query`` / ``class-only`` of each side.
        threshold: minimum ``t_other / t_fused``; None for a reported-only ratio.
        source: where the threshold comes from.
        fused_provider: the provider measured as "fused" (``fused-nostats`` for the overhead ratio).
        min_threshold: the smallest single pair ratio allowed (None: the median alone decides).
        dtypes: the dtypes it judges (empty: every dtype measured).
    """

    name: str
    device_type: str
    role: str
    pass_: str
    other: str
    fused_mode: str
    other_mode: str
    threshold: float | None
    source: str
    fused_provider: str = "fused"
    min_threshold: float | None = None
    dtypes: tuple[str, ...] = ()


def _aq(name: str, dev: str, pass_: str, other: str, thr: float | None, src: str) -> Gate:
    return Gate(name, dev, ROLE_GATE_ALL_QUERY, pass_, other, "all-query", "all-query", thr, src,
                dtypes=("fp32",) if dev == "cpu" else ())


def _cpu_vs_sdpa(name: str, pass_: str, mode: str) -> Gate:
    """Fused (statistics included) against SDPA (without them), both in ``mode``: >= 1.2x, no pair below 1.05x."""
    return Gate(name, "cpu", ROLE_GATE_ALL_QUERY, pass_, "sdpa", mode, mode, 1.2, CPU_MARGIN_ISSUE,
                min_threshold=1.05, dtypes=("fp32",))


GATES: tuple[Gate, ...] = (
    _cpu_vs_sdpa("cpu fwd vs sdpa", "fwd", "all-query"),
    _cpu_vs_sdpa("cpu fwd+bwd vs sdpa", "fwd_bwd", "all-query"),
    _cpu_vs_sdpa("cpu class-only fwd vs sdpa", "fwd", "class-only"),
    _cpu_vs_sdpa("cpu class-only fwd+bwd vs sdpa", "fwd_bwd", "class-only"),
    _aq("cpu fwd vs eager", "cpu", "fwd", "eager", 3.5, CPP_ISSUE),
    _aq("cpu fwd+bwd vs eager", "cpu", "fwd_bwd", "eager", 2.0, CPP_ISSUE),
    Gate("cpu class-only vs eager all-query", "cpu", ROLE_GATE_CLASS_ONLY, "fwd", "eager",
         "class-only", "all-query", 40.0, CPP_ISSUE, dtypes=("fp32",)),
    Gate("cpu fwd / tile GEMM rate", "cpu", ROLE_GATE_ROOFLINE, "fwd", TILE_GEMM, "all-query", "all-query", 0.75,
         CPU_MARGIN_ISSUE, dtypes=("fp32",)),
    Gate("cpu bf16 fwd vs sdpa bf16", "cpu", ROLE_GATE_ALL_QUERY, "fwd", "sdpa", "all-query", "all-query", None,
         "reported only", dtypes=("bf16",)),
    Gate("cpu bf16 fwd+bwd vs sdpa bf16", "cpu", ROLE_GATE_ALL_QUERY, "fwd_bwd", "sdpa", "all-query", "all-query",
         None, "reported only", dtypes=("bf16",)),
    Gate("cpu statistics overhead t(fused)/t(nostats)", "cpu", ROLE_GATE_ALL_QUERY, "fwd", "fused",
         "all-query", "all-query", None, "reported only", fused_provider="fused-nostats", dtypes=("fp32",)),
    _aq("gpu fwd vs sdpa", "cuda", "fwd", "sdpa", 1.2, TRITON_ISSUE),
    _aq("gpu fwd vs eager", "cuda", "fwd", "eager", None, "reported only"),
    _aq("gpu fwd+bwd vs sdpa", "cuda", "fwd_bwd", "sdpa", None, "reported only"),
    Gate("gpu class-only vs eager all-query", "cuda", ROLE_GATE_CLASS_ONLY, "fwd", "eager",
         "class-only", "all-query", None, "reported only"),
    Gate("gpu statistics overhead t(fused)/t(nostats)", "cuda", ROLE_GATE_ALL_QUERY, "fwd", "fused",
         "all-query", "all-query", None, "reported only", fused_provider="fused-nostats"),
)


@dataclass
class GateResult:
    """The outcome of one gate for one dtype.

    ``ratio`` is what the gate judges: the median of ``pair_ratios`` when pairs were
    measured, else ``row_ratio`` (the ratio of the two rows' medians).
    """

    gate: Gate
    dtype: str
    shape: str
    ratio: float
    status: str
    reason: str = ""
    row_ratio: float = math.nan
    pair_ratios: tuple[float, ...] = ()

    @property
    def min_ratio(self) -> float:
        """The smallest pair ratio (NaN without pairs)."""
        return min(self.pair_ratios) if self.pair_ratios else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731
        return {
            "name": self.gate.name,
            "dtype": self.dtype,
            "shape": self.shape,
            "pass": self.gate.pass_,
            "threshold": self.gate.threshold,
            "min_threshold": self.gate.min_threshold,
            "ratio": finite(self.ratio),
            "min_ratio": finite(self.min_ratio),
            "row_ratio": finite(self.row_ratio),
            "pair_ratios": [finite(r) for r in self.pair_ratios],
            "status": self.status,
            "reason": self.reason,
            "source": self.gate.source,
        }


def judge(ratio: float, threshold: float | None, min_ratio: float = math.nan,
          min_threshold: float | None = None) -> str:
    """``INFO`` without threshold; ``PASS`` when ``ratio >= threshold`` and, where both are given, the smallest
    pair ratio ``min_ratio >= min_threshold``; else ``FAIL`` (a NaN ratio fails)."""
    if threshold is None:
        return "INFO"
    ok = math.isfinite(ratio) and ratio >= threshold
    if min_threshold is not None and not math.isnan(min_ratio):
        ok = ok and min_ratio >= min_threshold
    return "PASS" if ok else "FAIL"


def _shapes_with_role(rows: list[Row], role: str) -> list[str]:
    return sorted({r.shape for r in rows if role in r.roles})


def _gate_dtypes(gate: Gate, rows: list[Row]) -> list[str]:
    """The measured dtypes ``gate`` judges."""
    measured = {r.dtype for r in rows}
    return sorted(measured & set(gate.dtypes) if gate.dtypes else measured)


# (gate name, shape, dtype) -> the per-pair ratios t_other / t_fused of the alternating re-measurement
PairedRatios = dict[tuple[str, str, str], list[float]]


def gate_cases(recorder: Recorder, device_type: str) -> list[tuple[Gate, str, str]]:
    """``(gate, shape, dtype)`` of every gate with a threshold whose two rows were measured with a compiled kernel."""
    cases = []
    for gate in (g for g in GATES if g.device_type == device_type and g.threshold is not None):
        for shape in _shapes_with_role(recorder.rows, gate.role):
            for dtype in _gate_dtypes(gate, recorder.rows):
                fused = recorder.find(gate.fused_provider, shape, gate.fused_mode, dtype, gate.pass_)
                other = fused if gate.other == TILE_GEMM else recorder.find(gate.other, shape, gate.other_mode,
                                                                            dtype, gate.pass_)
                if fused is not None and other is not None and not (fused.fallback or other.fallback):
                    cases.append((gate, shape, dtype))
    return cases


def evaluate_gates(recorder: Recorder, device_type: str, paired: PairedRatios | None = None) -> list[GateResult]:
    """Evaluate every gate of ``device_type`` on the recorded rows (one result per shape and dtype),
    judging the alternating-pair ratios of ``paired`` where they were measured."""
    paired = paired or {}
    results: list[GateResult] = []
    rows = recorder.rows
    for gate in (g for g in GATES if g.device_type == device_type):
        shapes = _shapes_with_role(rows, gate.role)
        if not shapes:
            results.append(GateResult(gate, "-", "-", math.nan, "SKIP", f"no measured shape has role {gate.role}"))
            continue
        for shape in shapes:
            for dtype in _gate_dtypes(gate, rows):
                results.append(_evaluate_one(recorder, gate, shape, dtype, paired.get((gate.name, shape, dtype), [])))
    return results


def _evaluate_one(recorder: Recorder, gate: Gate, shape: str, dtype: str, pair_ratios: list[float]) -> GateResult:
    fused = recorder.find(gate.fused_provider, shape, gate.fused_mode, dtype, gate.pass_)
    roofline = gate.other == TILE_GEMM
    other = fused if roofline else recorder.find(gate.other, shape, gate.other_mode, dtype, gate.pass_)
    missing = [
        f"{p} {m} {gate.pass_}"
        for p, m, r in ((gate.fused_provider, gate.fused_mode, fused), (gate.other, gate.other_mode, other))
        if r is None
    ]
    if missing:
        return GateResult(gate, dtype, shape, math.nan, "SKIP", "not measured: " + ", ".join(missing))
    assert fused is not None and other is not None
    # the roofline: the fused row's fraction of the tile GEMM rate measured in the same run
    row_ratio = fused.frac_gemm if roofline else speedup(other.median_s, fused.median_s)
    ratio = statistics.median(pair_ratios) if pair_ratios else row_ratio
    pairs = tuple(pair_ratios)
    if fused.fallback or other.fallback:
        return GateResult(gate, dtype, shape, ratio, "SKIP", "fused ran the eager fallback (no compiled kernel)",
                          row_ratio, pairs)
    reason = f"median of {len(pairs)} alternating pairs" if pairs else "ratio of the rows' medians"
    result = GateResult(gate, dtype, shape, ratio, "", reason, row_ratio, pairs)
    result.status = judge(ratio, gate.threshold, result.min_ratio, gate.min_threshold)
    return result


def failing(results: list[GateResult]) -> list[GateResult]:
    """The results whose status is ``FAIL``."""
    return [r for r in results if r.status == "FAIL"]
