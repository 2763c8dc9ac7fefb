"""End-to-end benchmark: one training epoch with RollingQ, fused statistics vs the official code's way.

The task is the training package's synthetic two-modality dataset
(``rollingq.build.build_dataset``) with the paper's CREMA-D fusion lengths
(176 audio, 196 visual tokens); the model is self-contained and small: per-modality
linear embeddings, a class token, one single-head :class:`FusedRollingQAttention`
fusion layer (pre-norm) and a linear classifier on the class output.

* ``fused``: class-only query, ``backend="auto"`` (statistics come out of the
  attention kernel), controller ``estimate="accumulate"`` (no extra pass).
* ``official``: every token queries, ``backend="reference"`` (materialized
  attention, statistics recomputed from the keys afterwards), controller
  ``estimate="pass"`` with ``window=1`` (AIR from the last batch, then a full
  no-grad pass over the training set before the rotation), as the official code.

Both rotate at the end of every timed epoch (``beta=0``), so the time per epoch
includes the rotation (and, for ``official``, its extra pass).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from ._arith import median_seconds

logger = logging.getLogger("benchmarks")

SEGMENTS = (176, 196)


@dataclass(frozen=True)
class E2EConfig:
    """Sizes of the end-to-end run."""

    train_size: int
    batch_size: int
    dim: int
    feature_dim: int
    epochs: int  # timed epochs (after one untimed warm-up epoch)
    segments: tuple[int, int] = SEGMENTS


E2E_FULL = E2EConfig(train_size=512, batch_size=64, dim=128, feature_dim=16, epochs=2)
E2E_QUICK = E2EConfig(train_size=64, batch_size=32, dim=32, feature_dim=8, epochs=1, segments=(17, 23))


def synthetic_train_set(cfg: E2EConfig, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The package's synthetic training split: ``[(n, L_a, F), (n, L_v, F)]`` float32 and ``(n,)`` labels.

    Raises ImportError when the training package ``rollingq`` is not importable.
    """
    from rollingq.build import build_dataset

    data_cfg = {
        "seed": seed,
        "data": {
            "name": "synthetic",
            "modalities": ["audio", "visual"],
            "num_classes": 4,
            "synthetic": {
                "sizes": {"train": cfg.train_size, "val": 1, "test": 1},
                "tokens": list(cfg.segments),
                "feature_dim": cfg.feature_dim,
            },
        },
    }
    ds = build_dataset(data_cfg, "train")
    return [m.clone() for m in ds.modalities], ds.labels.clone()


class FusionClassifier(nn.Module):
    """Embeddings + class token + one single-head RollingQ fusion layer + linear head.

    ``forward([x_a (B, L_a, F), x_v (B, L_v, F)]) -> logits (B, C)``.
    """

    def __init__(self, cfg: E2EConfig, num_classes: int, class_query_only: bool, backend: str) -> None:
        super().__init__()
        from rollingq_kernels.module import FusedRollingQAttention

        self.segments = list(cfg.segments)
        self.embed = nn.ModuleList([nn.Linear(cfg.feature_dim, cfg.dim) for _ in cfg.segments])
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, cfg.dim))
        self.norm = nn.LayerNorm(cfg.dim)
        self.attn = FusedRollingQAttention(
            cfg.dim, num_heads=1, qkv_bias=True, num_modalities=len(cfg.segments),
            class_query_only=class_query_only, backend=backend,
        )
        self.head = nn.Linear(cfg.dim, num_classes)

    def forward(self, modalities: list[torch.Tensor]) -> torch.Tensor:
        b = modalities[0].shape[0]
        tokens = torch.cat([self.cls.expand(b, -1, -1)] + [e(x) for e, x in zip(self.embed, modalities)], dim=1)
        y = self.attn(self.norm(tokens), self.segments)  # (B, 1, D) class-only or (B, N, D)
        return self.head(y[:, 0])


def _batches(mods: list[torch.Tensor], labels: torch.Tensor, batch: int, order: torch.Tensor) -> list:
    return [([m[idx] for m in mods], labels[idx]) for idx in order.split(batch)]


def run_epochs(variant: str, cfg: E2EConfig, mods: list[torch.Tensor], labels: torch.Tensor) -> dict:
    """Train ``variant`` (``fused`` or ``official``) for 1 + ``cfg.epochs`` epochs; time the last ``cfg.epochs``.

    Returns a JSON-friendly record with the median seconds per epoch (training
    steps plus the end-of-epoch RollingQ step, rotation included).
    """
    from rollingq_kernels.controller import RollingQ

    if variant not in ("fused", "official"):
        raise ValueError(f"variant: expected 'fused' or 'official', got {variant!r}")
    official = variant == "official"
    torch.manual_seed(0)
    model = FusionClassifier(cfg, int(labels.max()) + 1, class_query_only=not official,
                             backend="reference" if official else "auto")
    controller = RollingQ(model.attn, mode="paper", rho=1.0, beta=0.0, max_rotations=1000,
                          window=1 if official else "epoch", estimate="pass" if official else "accumulate")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    times, rotations = [], 0
    for epoch in range(1 + cfg.epochs):
        model.train()
        order = torch.randperm(labels.shape[0], generator=gen)
        t0 = time.perf_counter()
        for xs, y in _batches(mods, labels, cfg.batch_size, order):
            loss = nn.functional.cross_entropy(model(xs), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if official:  # the official code's extra full no-grad pass over the training set
            full = _batches(mods, labels, cfg.batch_size, torch.arange(labels.shape[0]))
            records = controller.step(epoch=epoch, loader=full, forward_fn=lambda batch: model(batch[0]))
        else:
            records = controller.step(epoch=epoch)
        elapsed = time.perf_counter() - t0
        if epoch > 0:
            times.append(elapsed)
            rotations += sum(bool(r.rotated) for r in records)
    return {
        "variant": variant,
        "median_epoch_s": median_seconds(times),
        "epochs_timed": len(times),
        "rotations": rotations,
        "train_size": cfg.train_size,
        "batch_size": cfg.batch_size,
        "segments": list(cfg.segments),
        "dim": cfg.dim,
        "heads": 1,
        "attention": "eager all-query" if official else "fused class-only",
        "estimate": "pass" if official else "accumulate",
    }
