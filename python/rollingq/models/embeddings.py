"""Input embeddings: turn one modality's raw tensor into tokens ``(B, L, D)``.

* :class:`FeatureEmbed` — feature sequences ``(B, L, F)`` (synthetic tokens, MOSEI features);
* :class:`SpectrogramPatchEmbed` — a 1-channel spectrogram ``(B, F, T)``, ViT patches;
* :class:`FramePatchEmbed` — video frames ``(B, T, 3, H, W)``, ViT patches of every frame;
* :class:`ResNetEmbed` — a timm ResNet-18 feature map of a spectrogram or frames, one token per cell.

Each adds a learned position embedding sized for the configured input shape.
"""

from __future__ import annotations

import timm
import torch
from torch import nn


def _check_shape(x: torch.Tensor, expected: tuple, name: str) -> None:
    got = tuple(x.shape[1:])
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
        want = ", ".join(str(e) for e in expected)
        raise ValueError(f"{name}: expected input of shape (B, {want}), got {tuple(x.shape)}")


class FeatureEmbed(nn.Module):
    """Linear projection of feature tokens.

    Input ``(B, L, F)`` float; output ``(B, L, D)`` with a learned position embedding.
    """

    def __init__(self, length: int, features: int, dim: int) -> None:
        super().__init__()
        self.length, self.features = length, features
        self.proj = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, (self.length, self.features), "FeatureEmbed")
        return self.proj(x) + self.pos


class SpectrogramPatchEmbed(nn.Module):
    """ViT patch embedding of a 1-channel spectrogram.

    Input ``(B, F, T)`` float (e.g. CREMA-D ``(257, 188)``, Kinetics-Sounds fbank
    ``(1024, 128)``); output ``(B, (F // p) * (T // p), D)``.
    """

    def __init__(self, freq: int, time: int, dim: int, patch: int = 16) -> None:
        super().__init__()
        if freq < patch or time < patch:
            raise ValueError(f"spectrogram shape ({freq}, {time}) is smaller than the patch size {patch}")
        self.freq, self.time = freq, time
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.num_tokens = (freq // patch) * (time // patch)
        self.pos = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, (self.freq, self.time), "SpectrogramPatchEmbed")
        return self.proj(x.unsqueeze(1)).flatten(2).transpose(1, 2) + self.pos


class FramePatchEmbed(nn.Module):
    """ViT patch embedding of several frames, tokens of all frames concatenated.

    Input ``(B, T, 3, H, W)`` float (ImageNet-normalized); output
    ``(B, T * (H // p) * (W // p), D)`` with spatial and temporal position embeddings.
    """

    def __init__(self, frames: int, size: int, dim: int, patch: int = 16) -> None:
        super().__init__()
        self.frames, self.size = frames, size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.per_frame = (size // patch) ** 2
        self.num_tokens = frames * self.per_frame
        self.pos = nn.Parameter(torch.randn(1, 1, self.per_frame, dim) * 0.02)
        self.time_pos = nn.Parameter(torch.zeros(1, frames, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, (self.frames, 3, self.size, self.size), "FramePatchEmbed")
        B, T = x.shape[:2]
        tokens = self.proj(x.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, P, D)
        tokens = tokens.reshape(B, T, self.per_frame, -1) + self.pos + self.time_pos
        return tokens.reshape(B, T * self.per_frame, -1)


class ResNetEmbed(nn.Module):
    """timm ResNet-18 (random init, no download) as a tokenizer (the paper's Table 7 backbone).

    Input ``(B, F, T)`` spectrogram (1 channel) or ``(B, T, 3, H, W)`` frames;
    output ``(B, L, D)``: the final feature map's cells (of every frame) projected to ``D``.
    """

    def __init__(self, kind: str, dim: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        if kind not in ("spectrogram", "frames"):
            raise ValueError(f"kind: expected 'spectrogram' or 'frames', got {kind!r}")
        self.kind, self.shape = kind, tuple(shape)
        in_chans = 1 if kind == "spectrogram" else 3
        self.backbone = timm.create_model(
            "resnet18", pretrained=False, num_classes=0, global_pool="", in_chans=in_chans
        )
        self.proj = nn.Linear(self.backbone.num_features, dim)
        # shape probe in eval mode: a forward in training mode would move BatchNorm's running statistics
        self.backbone.eval()
        with torch.no_grad():
            probe = torch.zeros(1, *shape) if kind == "spectrogram" else torch.zeros(1, *shape[1:])
            cells = self.backbone(probe.unsqueeze(1) if kind == "spectrogram" else probe).flatten(2).shape[-1]
        self.backbone.train()
        self.num_tokens = cells * (1 if kind == "spectrogram" else shape[0])
        self.pos = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, self.shape, "ResNetEmbed")
        B = x.shape[0]
        if self.kind == "spectrogram":
            fmap = self.backbone(x.unsqueeze(1))
        else:
            fmap = self.backbone(x.flatten(0, 1))
        tokens = fmap.flatten(2).transpose(1, 2).reshape(B, -1, fmap.shape[1])
        return self.proj(tokens) + self.pos
