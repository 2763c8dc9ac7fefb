"""Adapters from other libraries' attention layers to :class:`~rollingq_kernels.module.FusedRollingQAttention`.

:func:`from_timm` builds a layer around a timm ``Attention``'s projections (the class method
``FusedRollingQAttention.from_timm`` calls it); :func:`register_fx_leaf` makes the layer a leaf of timm's FX
tracer. Whole-model patching lives in :mod:`rollingq_kernels.integrations`.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

logger = logging.getLogger("rollingq_kernels")


def register_fx_leaf(layer_type: type) -> None:
    """Make ``layer_type`` a leaf of timm's FX tracer (feature extraction, ``torch.fx`` tests), if timm is here.

    Its forward resolves the layout from concrete shapes and calls the op with Python ints, which symbolic
    tracing cannot follow; as a leaf the traced graph calls the layer as a whole.
    """
    try:
        from timm.layers import register_notrace_module
    except ImportError:  # no timm: nothing to register with
        return
    register_notrace_module(layer_type)


def timm_attention_arguments(attn: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a layer equal to a timm ``vision_transformer.Attention``.

    Raises:
        TypeError: ``attn`` lacks ``qkv``, ``proj``, ``num_heads`` or ``head_dim``.
        ValueError: ``attn`` uses q/k normalization, scale normalization, gating or a head width different
            from its input width, which the layer does not implement.
    """
    for name in ("qkv", "proj", "num_heads", "head_dim"):
        if not hasattr(attn, name):
            raise TypeError(f"attn: expected a timm vision_transformer.Attention, got {type(attn).__name__} "
                            f"without {name!r}")
    for name in ("q_norm", "k_norm", "norm"):
        sub = getattr(attn, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            flag = "scale_norm" if name == "norm" else "qk_norm"
            raise ValueError(
                f"attn: has a {name} layer ({type(sub).__name__}, timm's {flag}=True); "
                "FusedRollingQAttention supports only attention without q/k or scale normalization"
            )
    if getattr(attn, "gate", None) is not None:
        raise ValueError("attn: uses a gated output (timm's gated=True), which is not supported")
    dim = attn.qkv.in_features
    if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim or attn.proj.out_features != dim:
        raise ValueError(
            f"attn: expected qkv {dim}->{3 * dim} and proj {dim}->{dim}, got qkv "
            f"{attn.qkv.in_features}->{attn.qkv.out_features} and proj {attn.proj.in_features}->"
            f"{attn.proj.out_features} (attn_head_dim / dim_out are not supported)"
        )
    drop = getattr(attn, "attn_drop", None)
    proj_drop = getattr(attn, "proj_drop", None)
    return {
        "dim": dim,
        "num_heads": attn.num_heads,
        "attn_drop": drop.p if isinstance(drop, nn.Dropout) else 0.0,
        "proj_drop": proj_drop.p if isinstance(proj_drop, nn.Dropout) else 0.0,
        "scale": float(getattr(attn, "scale", attn.head_dim**-0.5)),
    }


def from_timm(layer_type: type, attn: nn.Module, **kwargs: Any) -> Any:
    """A ``layer_type`` layer that takes over the projections of a timm ``Attention`` (see the class method).

    ``kwargs`` sets the rest (``segments``, ``num_prefix_tokens``, ``num_modalities``, ``rotation_mode``,
    ``backend``, ``window``; ``scale`` overrides timm's). The layer holds ``attn``'s own ``qkv`` and ``proj``
    modules (the same Parameters: an optimizer built before the swap still trains them, frozen ones stay
    frozen); its rotation buffers are made on their device.

    Raises:
        ValueError: ``class_query_only=True``: timm's ``Block`` adds the attention output to every token
            (``x + attn(x)``), so a ``(B, 1, C)`` output would be broadcast onto all of them.
    """
    if kwargs.get("class_query_only"):
        raise ValueError(
            "class_query_only: from_timm builds a drop-in for timm's Attention, whose Block adds the output to "
            "every token (x + attn(x)); a (B, 1, C) class-token output would be broadcast onto all tokens. "
            "Use class_query_only=True only on a layer whose class-token output alone is read (a fusion head: "
            "FusedRollingQAttention(dim, num_heads, class_query_only=True) and load_state_dict(attn.state_dict()))"
        )
    arguments = timm_attention_arguments(attn)
    arguments["scale"] = kwargs.pop("scale", arguments["scale"])
    layer = layer_type(**arguments, qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
                       projections=False, **kwargs)
    layer.qkv, layer.proj = attn.qkv, attn.proj
    weight = attn.qkv.weight
    layer.to(device=weight.device, dtype=weight.dtype)  # the rotation follows (float32 for 16-bit weights)
    layer.train(attn.training)
    register_fx_leaf(layer_type)
    return layer
