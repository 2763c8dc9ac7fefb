"""A one-head fused layer whose q, k and v are its input, so a test writes the keys and the class query."""

from __future__ import annotations

import torch

from rollingq_kernels.module import FusedRollingQAttention


def identity_layer(dim: int) -> FusedRollingQAttention:
    """One head of width ``dim``, float64, class query only, reference backend, in training mode.

    The qkv projection is three identities with zero bias: q = k = v = the input ``(B, N, dim)``.
    """
    layer = FusedRollingQAttention(dim, num_heads=1, qkv_bias=True, class_query_only=True, backend="reference")
    layer = layer.to(torch.float64)
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.cat([torch.eye(dim, dtype=torch.float64)] * 3))
        layer.qkv.bias.zero_()
    return layer.train()
