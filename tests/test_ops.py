"""Backend dispatch of :func:`rollingq_kernels.rollingq_attention` (``rollingq_kernels/ops.py``)."""

from __future__ import annotations

import logging

import torch

from rollingq_kernels import ops, rollingq_attention


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    segs = [3, 4]
    q, k, v = (torch.randn(2, 3, 8, 5, generator=g) for _ in range(3))
    return q, k, v, segs


def test_auto_on_mps_runs_the_reference_and_says_so_once(monkeypatch, caplog):
    """No MPS here: the device-type decision is made to see an MPS device while the tensors stay on CPU."""
    monkeypatch.setattr(ops, "_warned_eager_devices", set(), raising=False)
    real = ops.resolve_backend
    seen = []

    def as_if_mps(backend, device):
        seen.append(real(backend, torch.device("mps")))
        return seen[-1]

    monkeypatch.setattr(ops, "resolve_backend", as_if_mps)
    q, k, v, segs = _inputs()
    with caplog.at_level(logging.WARNING, logger="rollingq_kernels"):
        out, stats = rollingq_attention(q, k, v, segs)
        again, _ = rollingq_attention(q, k, v, segs)
    assert seen == ["reference", "reference"]
    warnings = [r for r in caplog.records if "eager reference runs" in r.getMessage()]
    assert len(warnings) == 1 and "MPS" in warnings[0].getMessage()
    want, want_stats = rollingq_attention(q, k, v, segs, backend="reference")
    assert torch.equal(out, want) and torch.equal(again, want) and torch.equal(stats.mass, want_stats.mass)


def test_an_explicit_reference_backend_on_mps_says_nothing(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_warned_eager_devices", set(), raising=False)
    with caplog.at_level(logging.WARNING, logger="rollingq_kernels"):
        assert ops.resolve_backend("reference", torch.device("mps")) == "reference"
        assert ops.resolve_backend("auto", torch.device("cpu")) in ("cpp", "reference")
    assert "eager reference runs" not in caplog.text
