"""Tables of a run: the ratio table, the gate table, as plain text (terminal) or Markdown (README)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._gates import GateResult
from ._providers import PROVIDERS
from ._results import Row

PASS_ORDER = {"fwd": 0, "bwd": 1, "fwd_bwd": 2}
PROVIDER_ORDER = {p: i for i, p in enumerate(PROVIDERS)}

ROW_HEADER = ("shape", "mode", "dtype", "pass", "provider", "median ms", "x fused", "TFLOP/s", "GB/s",
              "% copy BW", "% matmul", "% tile GEMM", "peak MiB")
GATE_HEADER = ("gate", "shape", "dtype", "ratio", "min pair", "rows' ratio", "threshold", "status", "note")


def _num(x: float | None, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def sort_rows(rows: Sequence[Row]) -> list[Row]:
    """Rows grouped by shape, mode, dtype, pass; providers in a fixed order inside a group."""
    return sorted(
        rows,
        key=lambda r: (r.shape, r.mode, r.dtype, PASS_ORDER.get(r.pass_, 9), PROVIDER_ORDER.get(r.provider, 99)),
    )


def row_cells(r: Row) -> list[str]:
    """The cells of one row, in :data:`ROW_HEADER` order."""
    provider = r.provider + (" (fallback)" if r.fallback else "")
    return [
        r.shape, r.mode, r.dtype, r.pass_, provider,
        _num(r.median_s * 1e3, ".3f"),
        _num(r.ratio_to_fused, ".2f"),
        _num(r.tflops, ".3f"),
        _num(r.gbps, ".1f"),
        _num(100 * r.frac_copy_bw, ".1f"),
        _num(100 * r.frac_matmul, ".1f"),
        _num(100 * r.frac_gemm, ".1f"),
        _num(r.peak_mem_bytes / 2**20, ".1f"),
    ]


def gate_cells(g: GateResult | dict[str, Any]) -> list[str]:
    """The cells of one gate result (object or its ``to_dict``), in :data:`GATE_HEADER` order."""
    d = g.to_dict() if isinstance(g, GateResult) else g
    note = "; ".join(x for x in (d.get("reason", ""), d.get("source", "")) if x)
    return [
        d["name"], d["shape"], d["dtype"], _num(d["ratio"], ".2f"), _num(d.get("min_ratio"), ".2f"),
        _num(d.get("row_ratio"), ".2f"), threshold_text(d), d["status"], note,
    ]


def threshold_text(d: dict[str, Any]) -> str:
    """``>= 1.2, min >= 1.05`` (the median's threshold, then the smallest pair's), ``-`` without one."""
    thr, low = d["threshold"], d.get("min_threshold")
    if thr is None:
        return "-"
    return f">= {thr:g}" + (f", min >= {low:g}" if low is not None else "")


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width plain-text table."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def rows_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The ratio table of ``rows``."""
    cells = [row_cells(r) for r in sort_rows(rows)]
    return markdown_table(ROW_HEADER, cells) if markdown else text_table(ROW_HEADER, cells)


def gates_table(gates: Sequence[GateResult | dict[str, Any]], markdown: bool = False) -> str:
    """The gate table."""
    cells = [gate_cells(g) for g in gates]
    return markdown_table(GATE_HEADER, cells) if markdown else text_table(GATE_HEADER, cells)


E2E_HEADER = ("variant", "attention", "estimate", "median s/epoch", "x fused", "rotations", "train size", "batch",
              "segments", "dim")


def e2e_cells(rec: dict[str, Any]) -> list[str]:
    """The cells of one end-to-end record, in :data:`E2E_HEADER` order."""
    return [
        str(rec["variant"]), str(rec["attention"]), str(rec["estimate"]), _num(rec["median_epoch_s"], ".2f"),
        _num(rec.get("x_fused"), ".2f"), str(rec["rotations"]), str(rec["train_size"]), str(rec["batch_size"]),
        str(tuple(rec["segments"])), str(rec["dim"]),
    ]


def e2e_table(records: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The end-to-end table."""
    cells = [e2e_cells(r) for r in records]
    return markdown_table(E2E_HEADER, cells) if markdown else text_table(E2E_HEADER, cells)
