"""Models: per-modality encoders, fusion heads and detached linear probes.

``build_model(cfg)(modalities)`` returns a :class:`ModelOutput`. The model
exposes ``encode(modalities)`` (per-modality tokens) and ``fusion_attention``
(the last active :class:`~rollingq_kernels.module.FusedRollingQAttention`, or
None for static heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.specs import input_specs
from .encoders import ModalityEncoder, load_vit_checkpoint
from .fusion import AttentionFusion, StaticFusion

__all__ = ["ATTENTION_FUSIONS", "FUSIONS", "ModelOutput", "MultimodalModel", "build_model"]

ATTENTION_FUSIONS = ("vanilla_mt", "vanilla_mt_star")
STATIC_FUSIONS = ("unimodal", "concat", "sum", "ogm_ge")
FUSIONS = STATIC_FUSIONS + ATTENTION_FUSIONS


@dataclass
class ModelOutput:
    """What a forward pass returns.

    Attributes:
        logits: ``(B, C)`` float, the fused prediction.
        probe_logits: one ``(B, C)`` per modality: linear probes on the detached
            pooled features (they report unimodal accuracy and never train the encoders).
        stats: the last fusion layer's class-row
            :class:`~rollingq_kernels.stats.AttentionStats`, None for static heads.
        unimodal_logits: per-modality parts of a static head's logits (OGM-GE
            uses them), None otherwise.
    """

    logits: torch.Tensor
    probe_logits: list[torch.Tensor]
    stats: object | None = None
    unimodal_logits: list[torch.Tensor] | None = field(default=None)


class MultimodalModel(nn.Module):
    """Encoders (one per modality) + a fusion head + detached linear probes.

    ``forward(modalities: list[Tensor (B, ...)]) -> ModelOutput``; each input
    has the shape of its spec (see :mod:`rollingq.data.specs`).
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        m_cfg = cfg["model"]
        mods = list(cfg["data"]["modalities"])
        dim = int(m_cfg["dim"])
        num_classes = int(cfg["data"]["num_classes"])
        fusion = m_cfg["fusion"]
        if fusion not in FUSIONS:
            raise ValueError(f"model.fusion: expected one of {FUSIONS}, got {fusion!r}")
        if cfg["rollingq"]["enabled"] and fusion not in ATTENTION_FUSIONS:
            raise ValueError(f"rollingq.enabled: RollingQ needs an attention fusion {ATTENTION_FUSIONS}, got model.fusion={fusion!r}")
        if fusion in ATTENTION_FUSIONS and len(mods) < 2:
            raise ValueError(f"data.modalities: attention fusion needs >= 2 modalities, got {mods}")
        self.modality_names = mods
        self.fusion_kind = fusion
        specs = input_specs(cfg)
        self.encoders = nn.ModuleList(
            [
                ModalityEncoder(
                    spec, dim, int(m_cfg["encoder_depth"]), int(m_cfg["encoder_heads"]),
                    float(m_cfg.get("mlp_ratio", 2.0)), float(m_cfg.get("drop", 0.0)), m_cfg.get("backbone", "vit"),
                )
                for spec in specs
            ]
        )
        if m_cfg.get("pretrained"):
            for encoder in self.encoders:
                load_vit_checkpoint(encoder, m_cfg["pretrained"])
        self.probes = nn.ModuleList([nn.Linear(dim, num_classes) for _ in mods])
        if fusion in ATTENTION_FUSIONS:
            layers = 2 if fusion == "vanilla_mt_star" else 1
            self.head: nn.Module = AttentionFusion(dim, num_classes, len(mods), layers, m_cfg)
        else:
            only = None
            if fusion == "unimodal":
                name = m_cfg.get("modality")
                if name not in mods:
                    raise ValueError(f"model.modality: the unimodal head needs one of {mods}, got {name!r}")
                only = mods.index(name)
            self.head = StaticFusion(fusion, dim, num_classes, len(mods), only)

    @property
    def fusion_attention(self) -> nn.Module | None:
        """The last active FusedRollingQAttention layer, or None for static heads."""
        return self.head.active_attention if isinstance(self.head, AttentionFusion) else None

    def fusion_attentions(self) -> list[nn.Module]:
        """Every FusedRollingQAttention layer (active or not)."""
        return [b.attn for b in self.head.blocks] if isinstance(self.head, AttentionFusion) else []

    def set_stage(self, stage: int) -> None:
        """Progressive training stage of ``vanilla_mt_star`` (no-op for other heads)."""
        if isinstance(self.head, AttentionFusion):
            self.head.set_stage(stage)

    def encode(self, modalities: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-modality token features ``[(B, L_m, D)]``."""
        if len(modalities) != len(self.encoders):
            raise ValueError(f"modalities: expected {len(self.encoders)} tensors ({self.modality_names}), got {len(modalities)}")
        return [enc(x) for enc, x in zip(self.encoders, modalities)]

    def forward(self, modalities: list[torch.Tensor]) -> ModelOutput:
        tokens = self.encode(modalities)
        pooled = [t.mean(1) for t in tokens]
        probe_logits = [probe(p.detach()) for probe, p in zip(self.probes, pooled)]
        if isinstance(self.head, AttentionFusion):
            logits, stats = self.head(tokens)
            return ModelOutput(logits=logits, probe_logits=probe_logits, stats=stats)
        logits, parts = self.head(pooled)
        return ModelOutput(logits=logits, probe_logits=probe_logits, stats=None, unimodal_logits=parts)


def build_model(cfg: dict) -> MultimodalModel:
    """The model described by ``cfg["model"]`` for the dataset ``cfg["data"]``."""
    return MultimodalModel(cfg)
