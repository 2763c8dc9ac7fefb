"""Fusion heads on top of the per-modality token features.

Static heads (pooled features, no attention statistics): ``unimodal``
(one modality only), ``concat``, ``sum``, ``ogm_ge`` (concat whose training
modulates the encoders' gradients, see :mod:`rollingq.ogm`). Dynamic heads:
``vanilla_mt`` (one class-query-only block) and ``vanilla_mt_star`` (two blocks
trained progressively, Appendix B of the paper). The block is a pre-norm
transformer block (:class:`FusionBlock`, ``fusion_block="prenorm"``) or the
official code's bare attention (:class:`OfficialFusionBlock`, ``"official"``).
"""

from __future__ import annotations

import torch
from torch import nn

from rollingq_kernels.module import FusedRollingQAttention
from rollingq_kernels.stats import AttentionStats

ATTENTION_FUSIONS = ("vanilla_mt", "vanilla_mt_star")
FUSION_BLOCKS = ("prenorm", "official")
STATIC_FUSIONS = ("unimodal", "concat", "sum", "ogm_ge")
FUSIONS = STATIC_FUSIONS + ATTENTION_FUSIONS


class FusionBlock(nn.Module):
    """Pre-norm transformer block whose attention is :class:`FusedRollingQAttention`.

    ``forward(x (B, N, D), segments)``: ``N = 1 + sum(segments)`` (class token first).
    With ``class_query_only`` it returns the class token's output ``(B, 1, D)``,
    otherwise every token ``(B, N, D)``.

    Args:
        dim, heads: ``D`` and the attention heads.
        num_modalities: ``M``.
        class_query_only: only the class token queries.
        mlp_ratio: the MLP's hidden width over ``D``.
        attn_drop, drop: attention-probability dropout and dropout after the projection.
        rotation_mode, backend: of the attention layer.
    """

    def __init__(self, dim: int, heads: int, num_modalities: int, class_query_only: bool, *, mlp_ratio: float,
                 attn_drop: float, drop: float, rotation_mode: str, backend: str) -> None:
        super().__init__()
        self.class_query_only = class_query_only
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FusedRollingQAttention(
            dim,
            num_heads=heads,
            qkv_bias=True,
            attn_drop=attn_drop,
            proj_drop=drop,
            num_modalities=num_modalities,
            rotation_mode=rotation_mode,
            class_query_only=class_query_only,
            backend=backend,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, segments: list[int]) -> torch.Tensor:
        residual = x[:, :1] if self.class_query_only else x
        y = residual + self.attn(self.norm1(x), segments=segments)
        return y + self.mlp(self.norm2(y))


class OfficialFusionBlock(nn.Module):
    """The official ``AttnFusion`` block: one attention, nothing else.

    The official ``MultiHeadAttention`` (GeWu-Lab/RollingQ_ICML2025, ``models/dynamic.py``) projects
    q, k, v with biases, attends, applies ``fc`` and a dropout to its output; its ``layer_norm`` is
    never applied, and ``AttnFusion`` adds no residual and no MLP. One dropout rate (0.2 there) acts on
    the attention probabilities and on the output: ``attn_drop`` here does both.

    ``forward(x (B, N, D), segments)`` returns the class token's output ``(B, 1, D)`` with
    ``class_query_only``, otherwise every token ``(B, N, D)``.
    """

    def __init__(self, dim: int, heads: int, num_modalities: int, class_query_only: bool, *, attn_drop: float,
                 rotation_mode: str, backend: str) -> None:
        super().__init__()
        self.attn = FusedRollingQAttention(
            dim, num_heads=heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=attn_drop,
            num_modalities=num_modalities, rotation_mode=rotation_mode, class_query_only=class_query_only,
            backend=backend,
        )

    def forward(self, x: torch.Tensor, segments: list[int]) -> torch.Tensor:
        return self.attn(x, segments=segments)


class AttentionFusion(nn.Module):
    """Class token + ``layers`` fusion blocks + linear classifier (``vanilla_mt`` / ``vanilla_mt_star``).

    ``forward(tokens: list[(B, L_m, D)]) -> (logits (B, C), stats)``. ``stage``
    (1 or 2) selects how many blocks are active during progressive training;
    the last active block uses the class query only when it is the final block.

    Args:
        dim, num_classes, num_modalities: ``D``, ``C``, ``M``.
        layers: 1 (``vanilla_mt``) or 2 (``vanilla_mt_star``).
        heads, mlp_ratio, attn_drop, drop, rotation_mode, backend: of every block.
        block: ``"prenorm"`` (:class:`FusionBlock`, a LayerNorm before the classifier, the class token
            ``0.02·N(0, 1)``) or ``"official"`` (:class:`OfficialFusionBlock`, no LayerNorm, the class token
            ``trunc_normal_(std=0.02)`` as the official ``AttnFusion``).
    """

    def __init__(self, dim: int, num_classes: int, num_modalities: int, layers: int, *, heads: int,
                 mlp_ratio: float, attn_drop: float, drop: float, rotation_mode: str, backend: str,
                 block: str = "prenorm") -> None:
        super().__init__()
        if layers not in (1, 2):
            raise ValueError(f"layers: expected 1 (vanilla_mt) or 2 (vanilla_mt_star), got {layers}")
        if dim % heads:
            raise ValueError(f"model.fusion_heads: {heads} does not divide model.dim {dim}")
        if block not in FUSION_BLOCKS:
            raise ValueError(f"model.fusion_block: expected one of {FUSION_BLOCKS}, got {block!r}")
        official = block == "official"
        if official:
            self.cls = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, dim), std=0.02))
        else:
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

        def make(i: int) -> nn.Module:
            last = i == layers - 1
            if official:
                return OfficialFusionBlock(dim, heads, num_modalities, last, attn_drop=attn_drop,
                                           rotation_mode=rotation_mode, backend=backend)
            return FusionBlock(dim, heads, num_modalities, class_query_only=last, mlp_ratio=mlp_ratio,
                               attn_drop=attn_drop, drop=drop, rotation_mode=rotation_mode, backend=backend)

        self.blocks = nn.ModuleList([make(i) for i in range(layers)])
        self.norm = nn.Identity() if official else nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.stage = layers

    def set_stage(self, stage: int) -> None:
        """Use the first ``stage`` blocks (progressive training); ``stage`` in [1, len(blocks)]."""
        if not 1 <= stage <= len(self.blocks):
            raise ValueError(f"stage: expected 1..{len(self.blocks)}, got {stage}")
        self.stage = stage

    @property
    def active_attention(self) -> FusedRollingQAttention:
        """The attention module of the last active block."""
        return self.blocks[self.stage - 1].attn

    def forward(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, AttentionStats | None]:
        segments = [t.shape[1] for t in tokens]
        x = torch.cat([self.cls.expand(tokens[0].shape[0], -1, -1), *tokens], dim=1)
        for block in self.blocks[: self.stage]:
            x = block(x, segments)
        logits = self.head(self.norm(x[:, 0]))
        return logits, self.active_attention.last_stats


class StaticFusion(nn.Module):
    """Static heads on mean-pooled features ``(B, D)`` per modality.

    ``kind``: ``concat`` / ``ogm_ge`` (one linear layer on the concatenation,
    whose per-modality parts also give unimodal logits), ``sum`` (a sum of
    per-modality linear layers) or ``unimodal`` (one modality, index ``only``).
    ``forward(pooled) -> (logits (B, C), unimodal_logits list[(B, C)] | None)``.
    """

    def __init__(self, kind: str, dim: int, num_classes: int, num_modalities: int, only: int | None = None) -> None:
        super().__init__()
        self.kind, self.only, self.num_modalities = kind, only, num_modalities
        if kind in ("concat", "ogm_ge"):
            self.fc = nn.Linear(dim * num_modalities, num_classes)
        elif kind == "sum":
            self.fcs = nn.ModuleList([nn.Linear(dim, num_classes) for _ in range(num_modalities)])
        elif kind == "unimodal":
            if only is None or not 0 <= only < num_modalities:
                raise ValueError(f"unimodal modality index: expected 0..{num_modalities - 1}, got {only!r}")
            self.fc = nn.Linear(dim, num_classes)
        else:
            raise ValueError(f"static fusion kind: expected concat/ogm_ge/sum/unimodal, got {kind!r}")

    def forward(self, pooled: list[torch.Tensor]):
        if self.kind == "unimodal":
            return self.fc(pooled[self.only]), None
        if self.kind == "sum":
            parts = [fc(p) for fc, p in zip(self.fcs, pooled)]
            return torch.stack(parts).sum(0), parts
        dim = pooled[0].shape[1]
        weight = self.fc.weight
        bias = self.fc.bias / self.num_modalities
        parts = [p @ weight[:, m * dim : (m + 1) * dim].T + bias for m, p in enumerate(pooled)]
        return self.fc(torch.cat(pooled, dim=1)), parts
