"""timm models with :class:`~rollingq_kernels.module.FusedRollingQAttention`: patch in place, export plainly.

:func:`patch_timm` replaces the timm ``Attention`` of chosen blocks of a ViT-family model (``VisionTransformer``,
DeiT, hybrids, ``NaFlexVit``; also inside a ``features_only`` wrapper) by layers holding the same projection
modules, so the weights (and an optimizer built on them) stay. The model's ``num_prefix_tokens`` becomes the
layers' prefix: the first prefix token is the query token, the others (distillation, register tokens) join no
modality (:mod:`rollingq_kernels.layout`). :func:`plain_state_dict` drops the rotation buffers so that plain timm
loads the result strictly. timm is imported on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..adapters import register_fx_leaf
from ..layout import SegmentsSpec
from ..module import FusedRollingQAttention

logger = logging.getLogger("rollingq_kernels")

QUERY_TOKENS = ("class", "first_prefix")


def find_vit(model: nn.Module) -> nn.Module | None:
    """The module holding the token layout (``num_prefix_tokens``): ``model`` or its first such submodule."""
    for module in model.modules():
        if isinstance(getattr(module, "num_prefix_tokens", None), int):
            return module
    return None


def timm_attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module of every timm ``Attention`` of ``model``, in model order."""
    from timm.layers import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def select_layers(found: Mapping[str, Any], layers: Iterable[int | str] | None, what: str = "layers") -> list[str]:
    """The names chosen by ``layers``: None (all), or indices into ``found`` (negative from the end) and names."""
    names = list(found)
    if layers is None:
        return names
    if isinstance(layers, (int, str)):
        layers = [layers]
    chosen = []
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(f"{what}: expected layer indices or names, got {item!r}")
        if isinstance(item, int):
            if not -len(names) <= item < len(names):
                raise ValueError(f"{what}: index {item} out of range for {len(names)} attention layers")
            item = names[item]
        elif item not in found:
            raise ValueError(f"{what}: {item!r} is not an attention layer; expected one of {names}")
        if item not in chosen:
            chosen.append(item)
    return chosen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def patch_timm(model: nn.Module, *, segments: SegmentsSpec, layers: Iterable[int | str] | None = None,
               query_token: str = "class", **layer_kwargs: Any) -> dict[str, FusedRollingQAttention]:
    """Replace timm ``Attention`` layers of ``model`` by :class:`FusedRollingQAttention`, in place.

    Args:
        model: a timm ViT-family model (or a wrapper holding one).
        segments: the modality sizes after the prefix tokens, or a rule ``n -> sizes`` (e.g.
            :class:`~rollingq_kernels.layout.EvenSplit`) so that any input size works.
        layers: which attention layers (indices in model order, i.e. block indices of a ViT, or qualified
            names); None: all.
        query_token: ``"class"`` (the model must have a class token) or ``"first_prefix"`` (the first prefix
            token, which is the first register token in a model without a class token).
        layer_kwargs: more :meth:`FusedRollingQAttention.from_timm` arguments (``rotation_mode``, ``backend``,
            ``window``; ``class_query_only`` is refused).

    Returns:
        qualified name -> the new layer, for each replaced layer.

    Raises:
        ValueError: no token layout or prefix token to rotate, no class token with ``query_token="class"``, or
            bad ``layers``.
    """
    if query_token not in QUERY_TOKENS:
        raise ValueError(f"query_token: expected one of {QUERY_TOKENS}, got {query_token!r}")
    vit = find_vit(model)
    if vit is None:
        raise ValueError(f"model: {type(model).__name__} has no num_prefix_tokens (not a timm ViT-family model)")
    prefix = vit.num_prefix_tokens
    if prefix < 1:
        raise ValueError(
            f"model: {type(vit).__name__} has no class or register token (num_prefix_tokens=0); RollingQ rotates "
            "the query of a prefix token: create the model with class_token=True (or reg_tokens >= 1)"
        )
    has_class = bool(getattr(vit, "has_class_token", getattr(vit, "cls_token", None) is not None))
    if query_token == "class" and not has_class:
        raise ValueError(
            f"model: {type(vit).__name__} has no class token; pass query_token='first_prefix' to rotate its first "
            "register token's query instead, or create it with class_token=True"
        )
    found = timm_attention_layers(model)
    chosen = select_layers(found, layers)
    patched = {}
    for name in chosen:
        layer = FusedRollingQAttention.from_timm(found[name], segments=segments, num_prefix_tokens=prefix,
                                                 **layer_kwargs)
        _replace(model, name, layer)
        patched[name] = layer
    register_fx_leaf(FusedRollingQAttention)
    logger.info("patch_timm: %d of %d attention layers of %s swapped (prefix tokens: %d)", len(patched),
                len(found), type(vit).__name__, prefix)
    return patched


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the layers' ``rotation`` / ``num_rotations``: what plain timm loads strictly.

    Raises:
        ValueError: a layer holds a rotation (plain timm has no place for it: the rotation acts on the query
            token's query only, which no projection weight can express).
    """
    state = model.state_dict()
    for name, layer in model.named_modules():
        if not isinstance(layer, FusedRollingQAttention):
            continue
        if not layer.rotation_is_identity:
            raise ValueError(
                f"model: layer {name!r} holds a rotation (num_rotations={int(layer.num_rotations)}), which plain "
                "timm cannot represent; export before the first rotation, or keep the rotation keys"
            )
        prefix = f"{name}." if name else ""
        state.pop(prefix + "rotation", None)
        state.pop(prefix + "num_rotations", None)
    return state
