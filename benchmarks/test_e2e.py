"""End-to-end: one epoch of the synthetic task with RollingQ, fused vs the official code's way (``_e2e.py``).

Needs the training package (``rollingq``) and ``rollingq_kernels.module`` /
``rollingq_kernels.controller``; skips with the import error otherwise. The
records (median seconds per epoch, rotation included, and the ratio
official / fused) go into the end-of-run report and the results file.
"""

from __future__ import annotations

import importlib

import pytest

import rollingq_kernels

from ._arith import speedup
from ._e2e import E2E_FULL, E2E_QUICK, run_epochs, synthetic_train_set
from ._session import BenchSession


def test_end_to_end_epoch(bench: BenchSession) -> None:
    if bench.config.device.type != "cpu":
        pytest.skip("end-to-end: CPU only (the GPU suite benchmarks the kernels)")
    try:
        importlib.import_module("rollingq_kernels.controller")
        importlib.import_module("rollingq_kernels.module")

        cfg = E2E_QUICK if bench.config.quick else E2E_FULL
        mods, labels = synthetic_train_set(cfg)
    except ImportError as exc:
        pytest.skip(f"end-to-end: the training package or the module/controller are not importable ({exc}); "
                    "install the package (`pip install --no-build-isolation -e .`) or set PYTHONPATH=python")
    fused = run_epochs("fused", cfg, mods, labels)
    official = run_epochs("official", cfg, mods, labels)
    ratio = speedup(official["median_epoch_s"], fused["median_epoch_s"])
    for rec in (fused, official):
        rec["x_fused"] = speedup(rec["median_epoch_s"], fused["median_epoch_s"])
        rec["fused_backend"] = "cpp" if rollingq_kernels.HAS_CPP else "fallback"
        bench.end_to_end.append(rec)
    assert fused["rotations"] == official["rotations"] == cfg.epochs, "each timed epoch must end with a rotation"
    assert ratio > 0
