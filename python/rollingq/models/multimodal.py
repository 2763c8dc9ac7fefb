"""The multimodal model: one encoder per modality, a fusion head and detached linear probes.

``MultimodalModel(...)(modalities)`` returns a :class:`ModelOutput`. The model exposes
``encode(modalities)`` (per-modality tokens) and ``fusion_attention`` (the last active
:class:`~rollingq_kernels.module.FusedRollingQAttention`, or None for static heads).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rollingq_kernels.module import FusedRollingQAttention
from rollingq_kernels.stats import AttentionStats

from ..inputs import InputSpec
from .encoders import ModalityEncoder
from .fusion import ATTENTION_FUSIONS, FUSIONS, AttentionFusion, StaticFusion
from .pretrained import load_vit_weights, read_pretrained

logger = logging.getLogger("rollingq.models")


@dataclass
class ModelOutput:
    """What a forward pass returns.

    Attributes:
        logits: ``(B, C)`` float, the fused prediction.
        probe_logits: one ``(B, C)`` per modality: linear probes on the detached
            pooled features (they report unimodal accuracy and never train the encoders).
        stats: the last fusion layer's per-sample class-row statistics (for per-sample
            analyses; aggregates come from the layer's accumulators), None for static heads.
        unimodal_logits: per-modality parts of a static head's logits (OGM-GE
            uses them), None otherwise.
    """

    logits: torch.Tensor
    probe_logits: list[torch.Tensor]
    stats: AttentionStats | None = None
    unimodal_logits: list[torch.Tensor] | None = field(default=None)


class MultimodalModel(nn.Module):
    """Encoders (one per modality) + a fusion head + detached linear probes.

    ``forward(modalities: list[Tensor (B, ...)]) -> ModelOutput``; each input has the shape of its spec.

    Args:
        input_specs: one :class:`~rollingq.inputs.InputSpec` per modality.
        modalities: the modality names, in input order.
        num_classes: ``C``.
        fusion: one of :data:`~rollingq.models.fusion.FUSIONS`.
        dim: token width ``D`` of every encoder and of the fusion.
        encoder_depth, encoder_heads, mlp_ratio, drop: the encoders' timm ViT blocks.
        backbone: ``"vit"`` or ``"resnet18"`` (image and spectrogram tokenizer).
        pretrained: a timm ViT model id or a local checkpoint file loaded into every encoder, or None.
        fusion_heads, attn_drop, rotation_mode, backend: the fusion attention
            (:class:`~rollingq_kernels.module.FusedRollingQAttention`).
        modality: the modality the ``unimodal`` head uses (ignored by other heads).
        fusion_block: the attention heads' block, ``"prenorm"`` or ``"official"``
            (:class:`~rollingq.models.fusion.AttentionFusion`).
    """

    def __init__(
        self,
        input_specs: Sequence[InputSpec],
        *,
        modalities: Sequence[str],
        num_classes: int,
        fusion: str,
        dim: int,
        encoder_depth: int,
        encoder_heads: int,
        mlp_ratio: float,
        drop: float,
        backbone: str,
        pretrained: str | None,
        fusion_heads: int,
        attn_drop: float,
        rotation_mode: str,
        backend: str,
        modality: str | None,
        fusion_block: str = "prenorm",
    ) -> None:
        super().__init__()
        mods = list(modalities)
        if fusion not in FUSIONS:
            raise ValueError(f"model.fusion: expected one of {FUSIONS}, got {fusion!r}")
        if len(input_specs) != len(mods):
            raise ValueError(f"input_specs: expected one per modality {mods}, got {len(input_specs)}")
        if fusion in ATTENTION_FUSIONS and len(mods) < 2:
            raise ValueError(f"data.modalities: attention fusion needs >= 2 modalities, got {mods}")
        self.modality_names = mods
        self.fusion_kind = fusion
        self.encoders = nn.ModuleList([
            ModalityEncoder(spec, dim, encoder_depth, encoder_heads, mlp_ratio, drop, backbone) for spec in input_specs
        ])
        if pretrained:
            state = read_pretrained(pretrained)
            for name, encoder in zip(mods, self.encoders, strict=True):
                report = load_vit_weights(encoder, state)
                logger.info("model.pretrained: %s encoder from %s: %s", name, pretrained, report.summary())
        elif backbone == "vit" and dim == 768 and encoder_heads == 12 and any(
                spec.kind in ("frames", "spectrogram") for spec in input_specs):
            logger.warning(
                "model.pretrained is not set: the ViT-B/16 encoders (model.dim=768, encoder_heads=12) train from "
                "scratch, while the paper initializes them with ImageNet-21k weights; set model.pretrained to a timm "
                "id (vit_base_patch16_224.augreg_in21k) or a local checkpoint (.pth, .safetensors or .npz; "
                "docs/training.md, 'Pretrained weights')")
        self.probes = nn.ModuleList([nn.Linear(dim, num_classes) for _ in mods])
        if fusion in ATTENTION_FUSIONS:
            self.head: nn.Module = AttentionFusion(
                dim, num_classes, len(mods), layers=2 if fusion == "vanilla_mt_star" else 1, heads=fusion_heads,
                mlp_ratio=mlp_ratio, attn_drop=attn_drop, drop=drop, rotation_mode=rotation_mode, backend=backend,
                block=fusion_block,
            )
        else:
            only = None
            if fusion == "unimodal":
                if modality not in mods:
                    raise ValueError(f"model.modality: the unimodal head needs one of {mods}, got {modality!r}")
                only = mods.index(modality)
            self.head = StaticFusion(fusion, dim, num_classes, len(mods), only)

    @property
    def fusion_attention(self) -> FusedRollingQAttention | None:
        """The last active FusedRollingQAttention layer, or None for static heads."""
        return self.head.active_attention if isinstance(self.head, AttentionFusion) else None

    def fusion_attentions(self) -> list[FusedRollingQAttention]:
        """Every FusedRollingQAttention layer (active or not)."""
        return [b.attn for b in self.head.blocks] if isinstance(self.head, AttentionFusion) else []

    def set_stage(self, stage: int) -> None:
        """Progressive training stage of ``vanilla_mt_star`` (no-op for other heads)."""
        if isinstance(self.head, AttentionFusion):
            self.head.set_stage(stage)

    def encode(self, modalities: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-modality token features ``[(B, L_m, D)]``."""
        if len(modalities) != len(self.encoders):
            raise ValueError(
                f"modalities: expected {len(self.encoders)} tensors ({self.modality_names}), got {len(modalities)}"
            )
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
