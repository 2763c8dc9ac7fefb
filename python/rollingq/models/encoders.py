"""Per-modality encoders: an input embedding, then timm ViT blocks.

:class:`ModalityEncoder` maps one modality's raw input to tokens ``(B, L, D)``.
The paper uses 4 blocks of ViT-B/16 (``D = 768``, 12 heads); the synthetic
default uses a small CPU-sized encoder. ``model.pretrained=PATH`` loads a local
timm ViT checkpoint (no download; ``.pth``, ``.safetensors`` or ``.npz``) into
the blocks, the patch embedding and the position embedding, see
:mod:`rollingq.models.pretrained`.
"""

from __future__ import annotations

import logging

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..inputs import InputSpec
from .embeddings import FeatureEmbed, FramePatchEmbed, ResNetEmbed, SpectrogramPatchEmbed

logger = logging.getLogger("rollingq.models")


BACKBONES = ("vit", "resnet18")


def build_embedding(spec: InputSpec, dim: int, backbone: str) -> nn.Module:
    """The embedding for an input spec (``features``, ``spectrogram`` or ``frames``)."""
    kind, shape = spec.kind, spec.shape
    if backbone not in BACKBONES:
        raise ValueError(f"model.backbone: expected 'vit' or 'resnet18', got {backbone!r}")
    if kind == "features":
        return FeatureEmbed(shape[0], shape[1], dim)
    if backbone == "resnet18":
        return ResNetEmbed(kind, dim, shape)
    if kind == "spectrogram":
        return SpectrogramPatchEmbed(shape[0], shape[1], dim)
    if kind == "frames":
        return FramePatchEmbed(shape[0], shape[2], dim)
    raise ValueError(f"input spec kind: expected 'features', 'spectrogram' or 'frames', got {kind!r}")


class ModalityEncoder(nn.Module):
    """Embedding + ``depth`` timm :class:`Block` s + LayerNorm.

    ``forward(x)``: raw modality input (see the embeddings) -> ``(B, L, D)`` float tokens.
    """

    def __init__(
        self, spec: InputSpec, dim: int, depth: int, heads: int, mlp_ratio: float, drop: float, backbone: str = "vit"
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.encoder_heads: {heads} does not divide model.dim {dim}")
        self.embed = build_embedding(spec, dim, backbone)
        self.blocks = nn.ModuleList(
            [Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=drop) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)
