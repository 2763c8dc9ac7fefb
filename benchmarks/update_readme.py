"""Regenerate the results section of ``benchmarks/README.md`` from ``benchmarks/results/*.json``.

For every machine and instruction-set level (the file name without its date) the
latest file is shown: its metadata, the instruction sets the kernels and ATen ran
with, the CPU's vector flags, the machine's measured rates, the gates, the
end-to-end records and every row. Run ``python -m benchmarks.update_readme`` from
the repository root.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from ._report import e2e_table, gates_table, rows_table
from ._results import RESULTS_DIR, load_results

logger = logging.getLogger("benchmarks")

README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
_DATED = re.compile(r"^(?P<machine>.+)-(?P<date>\d{4}-\d{2}-\d{2})$")


def latest_per_machine(directory: Path) -> list[Path]:
    """The newest results file of each machine in ``directory`` (sorted by machine)."""
    latest: dict[str, tuple[str, Path]] = {}
    for path in sorted(directory.glob("*.json")):
        m = _DATED.match(path.stem)
        machine, date = (m["machine"], m["date"]) if m else (path.stem, "")
        if machine not in latest or date > latest[machine][0]:
            latest[machine] = (date, path)
    return [latest[k][1] for k in sorted(latest)]


def _machine_line(machine: dict[str, Any]) -> str:
    mm = ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in machine.get("matmul_tflops", {}).items())
    line = f"measured by the suite: copy bandwidth {machine.get('copy_gbps', float('nan')):.1f} GB/s; matmul {mm}"
    tiles = []
    for key, t in machine.get("tile_gemm", {}).items():
        parts = [f"{src} {t[src]:.3f}" for src in ("blas", "own") if t.get(src) is not None]
        tiles.append(f"{key} ({t['tiles']} tiles of {t['rows']}x{t['keys']}): " + ", ".join(parts) + " TFLOP/s")
    if tiles:
        line += "; tile GEMM (the roofline, `% tile GEMM` divides by the faster): " + "; ".join(tiles)
    return line


# The flags that decide which vector code can run (the full list is in the results file).
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "amx_tile", "neon", "asimd", "sve")


def _isa_line(meta: dict[str, Any]) -> str | None:
    cap = meta.get("cpu_capability")
    if not cap:
        return None
    flags = [f for f in VECTOR_FLAGS if f in set(meta.get("cpu_flags") or [])]
    env = {k: v for k, v in (meta.get("env") or {}).items() if v is not None}
    return (
        f"Instruction sets: C++ kernels **{cap.get('kernels')}**"
        + (f" ({cap['level']})" if cap.get("level") else "")
        + " (supported here: "
        f"{', '.join(cap.get('kernels_supported') or []) or '-'}; -march=native: {cap.get('kernels_march_native')}), "
        f"ATen **{cap.get('aten')}**; CPU vector flags: {' '.join(flags) or '-'}; "
        f"environment: {', '.join(f'{k}={v}' for k, v in env.items()) or 'none set'}."
    )


def section(path: Path) -> str:
    """The Markdown section of one results file."""
    payload = load_results(path)
    meta = payload["metadata"]
    level = (meta.get("cpu_capability") or {}).get("kernels")
    title = meta["device_name"] + (f" — {level}" if level else "")
    isa = _isa_line(meta)
    lines = [
        f"### {title} — {meta['date']}",
        "",
        f"`{path.name}`: torch {meta['torch']}, triton {meta.get('triton')}, C++ kernels built: {meta['has_cpp']}, "
        f"{meta.get('cpu_count')} CPU cores, {meta.get('torch_threads')} torch threads, "
        f"{meta.get('min_rounds')}–{meta.get('max_rounds')} rounds after {meta.get('warmup')} warm-up "
        f"({meta.get('input_sets')} input sets), {meta.get('gate_pairs', 0)} alternating pairs per gate, "
        f"load average {meta.get('loadavg_start')} → {meta.get('loadavg_end')}, "
        f"quick: {meta['quick']}, commit {meta.get('git_commit')}."
        + (f" Note: {meta['note']}" if meta.get("note") else ""),
        "",
        *([isa, ""] if isa else []),
        _machine_line(payload.get("machine", {})),
        "",
        "#### Gates",
        "",
        gates_table(payload.get("gates", []), markdown=True),
        "",
    ]
    if payload.get("end_to_end"):
        lines += ["#### End to end (one epoch with RollingQ, rotation included)", "",
                  e2e_table(payload["end_to_end"], markdown=True), ""]
    if payload["rows"]:
        lines += ["#### Kernels (`x fused` = t_provider / t_fused, same run)", "",
                  rows_table(payload["rows"], markdown=True), ""]
    return "\n".join(lines)


def render(directory: Path) -> str:
    """The whole generated block (between the markers)."""
    files = latest_per_machine(directory)
    if not files:
        return "No results yet."
    return "\n".join(section(p) for p in files)


def update_readme(readme: Path = README, directory: Path = RESULTS_DIR) -> None:
    """Replace the text between the markers of ``readme`` with :func:`render` of ``directory``."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"readme: {readme} lacks the markers {BEGIN} and {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render(directory)}\n{END}{tail}")
    logger.info("updated %s from %s", readme, directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    update_readme(args.readme, args.results_dir)


if __name__ == "__main__":
    main()
