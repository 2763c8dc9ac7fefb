"""Per-modality encoders: an input embedding, then timm ViT blocks.

:class:`ModalityEncoder` maps one modality's raw input to tokens ``(B, L, D)``.
The paper uses 4 blocks of ViT-B/16 (``D = 768``, 12 heads); the synthetic
default uses a small CPU-sized encoder. ``model.pretrained=PATH`` loads a local
timm ViT checkpoint (no download) into the blocks (and the patch embedding when
it fits), see :func:`load_vit_checkpoint`.
"""

from __future__ import annotations

import logging
import os

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


def load_vit_checkpoint(encoder: ModalityEncoder, path: str) -> int:
    """Load a local timm ViT checkpoint into ``encoder``; return the number of tensors loaded.

    Maps ``blocks.{i}.*`` for ``i < depth`` and ``norm.*``; the patch projection
    ``patch_embed.proj.*`` is loaded into a ViT frame embedding as is and into a
    spectrogram embedding summed over the 3 input channels. Shapes must match
    (e.g. ``model.dim=768``, ``model.encoder_heads=12`` for ViT-B/16).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.pretrained: no checkpoint file at {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained: {path!r} does not hold a state dict (got {type(state).__name__})")
    own = encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = None
        if key.startswith("blocks.") and key in own:
            target = key
        elif key.startswith("norm.") and key in own:
            target = key
        elif key == "patch_embed.proj.weight" and "embed.proj.weight" in own:
            target = "embed.proj.weight"
            if own[target].shape[1] == 1 and value.dim() == 4 and value.shape[1] == 3:
                value = value.sum(1, keepdim=True)
        elif key == "patch_embed.proj.bias" and "embed.proj.bias" in own:
            target = "embed.proj.bias"
        if target is None:
            continue
        if own[target].shape != value.shape:
            raise ValueError(
                f"model.pretrained: {key} in {path!r} has shape {tuple(value.shape)}, "
                f"the encoder expects {tuple(own[target].shape)} (check model.dim / encoder_heads)"
            )
        mapped[target] = value
    if not mapped:
        raise ValueError(f"model.pretrained: no ViT tensors (blocks.*, norm.*, patch_embed.*) found in {path!r}")
    encoder.load_state_dict(mapped, strict=False)
    logger.info("loaded %d tensors from %s", len(mapped), path)
    return len(mapped)
