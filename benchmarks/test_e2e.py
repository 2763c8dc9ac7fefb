"""End-to-end: one epoch of the synthetic task with RollingQ, fused vs the official code's way and vs timm's SDPA
attention with a statistics hook (``_e2e.py``).

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
from ._e2e import E2E_FULL, E2E_QUICK, VARIANTS, run_epochs, synthetic_train_set
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
    try:
        importlib.import_module("timm")
        variants = VARIANTS
    except ImportError:  # the peer needs timm (the `train` extra); the other two run without it
        variants = tuple(v for v in VARIANTS if v != "timm-sdpa+hook")
    records = [run_epochs(v, cfg, mods, labels) for v in variants]
    fused = records[0]
    for rec in records:
        rec["x_fused"] = speedup(rec["median_epoch_s"], fused["median_epoch_s"])
        rec["fused_backend"] = "cpp" if rollingq_kernels.HAS_CPP else "fallback"
        bench.end_to_end.append(rec)
    assert all(rec["rotations"] == cfg.epochs for rec in records), "each timed epoch must end with a rotation"
    assert all(rec["x_fused"] > 0 for rec in records)


def test_the_timm_peer_computes_the_op_and_its_statistics() -> None:
    # the peer must time the same model: the rotated class query, the same outputs and statistics
    pytest.importorskip("timm")
    try:
        from timm.models.vision_transformer import Attention

        from rollingq_kernels.module import FusedRollingQAttention

        from ._e2e import FusionClassifier, TimmFusionClassifier
    except ImportError as exc:
        pytest.skip(f"the module or timm are not importable ({exc})")
    import torch

    cfg = E2E_QUICK
    torch.manual_seed(3)
    peer = TimmFusionClassifier(cfg, 4)
    ours = FusionClassifier(cfg, 4, class_query_only=False, backend="reference")
    ours.load_state_dict(peer.state_dict(), strict=False)  # embeddings, class token, norm, head
    # a twin of the peer's Attention: from_timm holds the given qkv module, whose hook rotates the peer's query
    twin = Attention(cfg.dim, num_heads=1, qkv_bias=True)
    twin.load_state_dict(peer.attn.state_dict())
    ours.attn = FusedRollingQAttention.from_timm(twin, num_modalities=2, backend="reference")
    rotation = torch.linalg.qr(torch.randn(cfg.dim, cfg.dim, dtype=torch.float64))[0]
    if torch.linalg.det(rotation) < 0:  # a rotation, not a reflection
        rotation[:, 0] = -rotation[:, 0]
    rotation = rotation.float()
    peer.holder.apply_rotation(rotation)
    ours.attn.apply_rotation(rotation)
    xs = [torch.randn(5, n, cfg.feature_dim) for n in cfg.segments]
    torch.testing.assert_close(peer(xs), ours(xs), atol=2e-5, rtol=1e-4)
    a, b = peer.holder.statistics.reduce(), ours.attn.statistics.reduce()
    assert a.samples == b.samples == 5
    torch.testing.assert_close(a.cos_mean, b.cos_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.mass_mean, b.mass_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.max_prob_mean, b.max_prob_mean, atol=1e-5, rtol=0)  # main's epilogue statistic
    assert a.air == pytest.approx(b.air, abs=1e-5)
