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
* ``timm-sdpa+hook``: what a user writes today without these kernels: timm's
  ``Attention`` (every token queries, ``F.scaled_dot_product_attention`` inside)
  with a forward hook on its ``qkv`` projection that rotates the class query and
  computes the class row's statistics from the same batch's query and keys (no
  extra pass); the controller ``estimate="accumulate"`` as ``fused``. The
  rotation and the statistics window live in a :class:`FusedRollingQAttention`
  that only holds them (its own forward never runs), since the controller
  drives such layers.

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
        y = self.attend(self.norm(tokens))  # (B, 1, D) class-only or (B, N, D)
        return self.head(y[:, 0])

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The fusion layer on the normalized tokens ``(B, N, D)``."""
        return self.attn(x, self.segments)


class TimmFusionClassifier(FusionClassifier):
    """:class:`FusionClassifier` with timm's SDPA ``Attention`` as the fusion layer and the RollingQ rotation and
    statistics in a forward hook on its ``qkv`` projection (``holder`` keeps the rotation and the window)."""

    def __init__(self, cfg: E2EConfig, num_classes: int) -> None:
        from timm.models.vision_transformer import Attention

        from rollingq_kernels.module import FusedRollingQAttention

        super().__init__(cfg, num_classes, class_query_only=False, backend="reference")
        self.attn = Attention(cfg.dim, num_heads=1, qkv_bias=True)
        # not a submodule: the controller's rotation and statistics only, no weights in the optimizer
        self.__dict__["holder"] = FusedRollingQAttention(cfg.dim, num_heads=1, num_modalities=len(cfg.segments))
        self.attn.qkv.register_forward_hook(self._rotate_and_collect)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)  # timm's Attention: every token queries, SDPA inside

    def _rotate_and_collect(self, module: nn.Module, inputs: tuple, qkv: torch.Tensor) -> torch.Tensor:
        from rollingq_kernels.accumulator import batch_sums
        from rollingq_kernels.class_query import rotate_class_query

        B, N, _ = qkv.shape
        H, Dh = self.attn.num_heads, self.attn.head_dim
        q, k, v = qkv.reshape(B, N, 3, H, Dh).unbind(2)  # (B, N, H, Dh) each
        q0_rot = rotate_class_query(q[:, 0], self.holder.rotation)
        if self.training:
            self.holder.statistics.add_sums(batch_sums(class_row_stats(q0_rot, k.transpose(1, 2), self.segments)))
        q = torch.cat([q0_rot.unsqueeze(1), q[:, 1:]], dim=1)
        return torch.stack([q, k, v], dim=2).reshape(B, N, 3 * H * Dh)


def class_row_stats(q0_rot: torch.Tensor, k: torch.Tensor, segments: list[int]):
    """The op's statistics (``docs/op.md``) of the class row from its rotated query ``(B, H, Dh)`` and the keys
    ``(B, H, N, Dh)`` of the same batch, every token valid: what a forward hook computes next to SDPA."""
    from rollingq_kernels.reference import modality_index
    from rollingq_kernels.stats import finish_stats

    with torch.no_grad():
        q0, keys = q0_rot.detach().float(), k.detach().float()
        onehot = nn.functional.one_hot(modality_index(segments, keys.device), len(segments) + 1).float()  # (N, M+1)
        scores = keys.shape[-1] ** -0.5 * torch.einsum("bhd,bhnd->bhn", q0, keys)  # (B, H, N)
        probs = torch.softmax(scores, dim=-1)
        key_sum = torch.einsum("bhnd,nm->bhmd", keys, onehot[:, 1:])
        key_mean = key_sum / torch.tensor(segments, dtype=keys.dtype, device=keys.device)[None, None, :, None]
        # score_max and the class row's lse: the statistics the fused kernel also gives (max_prob)
        return finish_stats(key_mean, probs @ onehot, q0, None, segments, score_max=scores.amax(-1),
                            lse=torch.logsumexp(scores, -1, keepdim=True))


VARIANTS = ("fused", "official", "timm-sdpa+hook")


def _batches(mods: list[torch.Tensor], labels: torch.Tensor, batch: int, order: torch.Tensor) -> list:
    return [([m[idx] for m in mods], labels[idx]) for idx in order.split(batch)]


def run_epochs(variant: str, cfg: E2EConfig, mods: list[torch.Tensor], labels: torch.Tensor) -> dict:
    """Train ``variant`` (one of ``VARIANTS``) for 1 + ``cfg.epochs`` epochs; time the last ``cfg.epochs``.

    Returns a JSON-friendly record with the median seconds per epoch (training
    steps plus the end-of-epoch RollingQ step, rotation included).
    """
    from rollingq_kernels.controller import RollingQ

    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    official = variant == "official"
    torch.manual_seed(0)
    if variant == "timm-sdpa+hook":
        model = TimmFusionClassifier(cfg, int(labels.max()) + 1)
        layer = model.holder
    else:
        model = FusionClassifier(cfg, int(labels.max()) + 1, class_query_only=not official,
                                 backend="reference" if official else "auto")
        layer = model.attn
    controller = RollingQ(layer, mode="paper", rho=1.0, beta=0.0, max_rotations=1000,
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
        "attention": {"fused": "fused class-only", "official": "eager all-query",
                      "timm-sdpa+hook": "timm SDPA all-query + stats hook"}[variant],
        "estimate": "pass" if official else "accumulate",
    }
