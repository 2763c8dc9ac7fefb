"""Result rows, same-run ratios, run metadata and the results JSON files.

One JSON file per machine, instruction-set level and date:
``benchmarks/results/<device-slug>[-<level>]-<YYYY-MM-DD>.json`` with
``{"metadata": {...}, "machine": {...}, "rows": [...], "gates": [...]}``. On CPU
``<level>`` is the instruction set the C++ kernels ran with (``default``,
``avx2``, ``avx512``; ``ATEN_CPU_CAPABILITY`` forces it for them and ATen alike).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._arith import speedup

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One measured case: a provider on a shape, mode, dtype and pass.

    Times are seconds; ``ratio_to_fused`` is ``t_provider / t_fused`` from the
    same run (``> 1``: fused is faster), filled by :meth:`Recorder.fill_ratios`.
    ``backend`` is what ran for the fused providers (``cpp``, ``triton`` or
    ``fallback`` = the eager reference because no compiled kernel exists).
    """

    provider: str
    shape: str
    label: str
    segments: list[int]
    mode: str
    dtype: str
    pass_: str
    device: str
    backend: str
    median_s: float
    min_s: float
    rounds: int
    flops: int
    bytes: int
    tflops: float
    gbps: float
    frac_copy_bw: float
    frac_matmul: float
    peak_mem_bytes: int
    roles: list[str] = field(default_factory=list)
    ratio_to_fused: float | None = None
    frac_gemm: float = math.nan  # of the machine's tile GEMM rate (the roofline; NaN in older files)

    @property
    def group(self) -> tuple[str, str, str, str]:
        """``(shape, mode, dtype, pass)``: rows of one group are compared with each other."""
        return (self.shape, self.mode, self.dtype, self.pass_)

    @property
    def fallback(self) -> bool:
        """True for a fused row that ran the eager reference (no compiled kernel)."""
        return self.backend == "fallback"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (NaN becomes None)."""
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        d["fallback"] = self.fallback
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        """Inverse of :meth:`to_dict` (None times become NaN)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {("pass_" if k == "pass" else k): v for k, v in d.items() if ("pass_" if k == "pass" else k) in names}
        for k in ("tflops", "gbps", "frac_copy_bw", "frac_matmul", "frac_gemm", "median_s", "min_s"):
            if kw.get(k) is None:
                kw[k] = math.nan
        return cls(**kw)


class Recorder:
    """Collects the rows of one run and derives the ratios to ``fused``."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        """Record ``row`` (replacing an earlier row of the same case, e.g. a rerun)."""
        self.rows = [r for r in self.rows if (r.provider, r.group) != (row.provider, row.group)]
        self.rows.append(row)

    def find(self, provider: str, shape: str, mode: str, dtype: str, pass_: str) -> Row | None:
        """The row of that case, or None if it was not measured."""
        for r in self.rows:
            if r.provider == provider and r.group == (shape, mode, dtype, pass_):
                return r
        return None

    def fill_ratios(self) -> None:
        """Set ``ratio_to_fused = t_provider / t_fused`` for every row whose group has a fused row."""
        fused = {r.group: r for r in self.rows if r.provider == "fused"}
        for r in self.rows:
            f = fused.get(r.group)
            r.ratio_to_fused = None if f is None else speedup(r.median_s, f.median_s)


# Environment variables that change what runs: recorded in every results file.
RUN_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "ROLLINGQ_HUGE_PAGES",
           "THP_MEM_ALLOC_ENABLE", "TORCHINDUCTOR_CACHE_DIR")


def cpu_flags() -> list[str]:
    """The CPU's feature flags (``/proc/cpuinfo``, as ``lscpu`` shows them); empty where unavailable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def cpu_capabilities() -> dict[str, Any]:
    """The instruction sets in use: the C++ kernels' (None without them) and ATen's, and the build's.

    ``level`` says whether the kernels run the best level this CPU and build support (``native``) or a lower
    one forced by ``ATEN_CPU_CAPABILITY`` (``forced``): a forced level does not predict a CPU that has only it.
    """
    kernels, supported, native = None, [], None
    try:
        from rollingq_kernels import _C

        kernels, supported, native = _C.cpu_capability(), list(_C.supported_cpu_capabilities()), _C.MARCH_NATIVE
    except (ImportError, AttributeError):
        pass
    level = None if kernels is None else ("native" if supported and kernels == supported[-1] else "forced")
    return {"kernels": kernels, "kernels_supported": supported, "kernels_march_native": native,
            "aten": torch.backends.cpu.get_cpu_capability(), "level": level}


def level_text() -> str:
    """One line naming the instruction sets a run measures: ``C++ kernels avx2 (forced; the CPU runs avx512),
    ATen AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2`` (for gate failures and logs)."""
    cap = cpu_capabilities()
    best = cap["kernels_supported"][-1] if cap["kernels_supported"] else None
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
    return (f"C++ kernels {cap['kernels']} ({cap['level']}; this CPU and build run up to {best}), "
            f"ATen {cap['aten']}" + (f", MKL_ENABLE_INSTRUCTIONS={mkl}" if mkl else ""))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, ``<CPU model> (<n> cores)`` on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores)"


def slugify(text: str) -> str:
    """Lower-case ``[a-z0-9-]`` slug of ``text``: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def _git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


#: HEAD when the suite was imported, i.e. when the run started: the code the run measured (a commit made
#: while a long run is under way must not be recorded as the measured one)
START_COMMIT = _git_commit(RESULTS_DIR.parent.parent)


def run_metadata(device: torch.device, quick: bool, note: str, has_cpp: bool) -> dict[str, Any]:
    """What a results file says about the run: device, versions, settings."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    meta: dict[str, Any] = {
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "has_cpp": has_cpp,
        "quick": quick,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": START_COMMIT,
        "note": note,
        "cpu_capability": cpu_capabilities(),
        "cpu_flags": cpu_flags(),
        "env": {name: os.environ.get(name) for name in RUN_ENV},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return meta


def results_path(directory: Path, metadata: dict[str, Any]) -> Path:
    """``<directory>/<device-slug>[-<level>]-<YYYY-MM-DD>[-quick][-partial].json``.

    ``<level>`` is the C++ kernels' instruction set on CPU (one file per level); a quick or
    partial (``-k``/``-m`` selected) run gets its own suffix, so it never replaces the day's
    full run of the same machine and level.
    """
    level = (metadata.get("cpu_capability") or {}).get("kernels") if metadata.get("device_type") == "cpu" else None
    machine = slugify(metadata["device_name"]) + (f"-{slugify(level)}" if level else "")
    suffix = ("-quick" if metadata.get("quick") else "") + ("-partial" if metadata.get("partial") else "")
    return directory / f"{machine}-{metadata['date'][:10]}{suffix}.json"


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: replace them (recursively) by None rather than fail at the end of a run."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_results(
    directory: Path,
    metadata: dict[str, Any],
    machine: dict[str, Any],
    rows: list[Row],
    gates: list[dict[str, Any]],
    end_to_end: list[dict[str, Any]],
) -> Path:
    """Write one results file atomically and return its path (replaces a file of the same machine, date and kind)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = results_path(directory, metadata)
    payload = {
        "metadata": metadata,
        "machine": machine,
        "rows": [r.to_dict() for r in rows],
        "gates": gates,
        "end_to_end": end_to_end,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite_or_none(payload), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written results file
    return path


def load_results(path: Path) -> dict[str, Any]:
    """Read a results file; ``rows`` become :class:`Row` objects."""
    payload = json.loads(Path(path).read_text())
    payload["rows"] = [Row.from_dict(d) for d in payload.get("rows", [])]
    return payload
