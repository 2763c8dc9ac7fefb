"""Hugging Face transformers: the op as the attention implementation ``"rollingq"``.

Importing this module registers ``"rollingq"`` with ``transformers.AttentionInterface`` (and the boolean SDPA mask
with ``AttentionMaskInterface``), so that
``AutoModel.from_config(cfg, attn_implementation="rollingq")`` or ``from_pretrained(..., attn_implementation=
"rollingq")`` runs :func:`rollingq_kernels.rollingq_attention` in every attention layer (encoders; the first
token, e.g. ``[CLS]``, is the query token)::

    with rollingq_layout(segments=(98, 98)) as run:   # or model(..., rollingq_segments=(98, 98))
        out = model(pixel_values)
    run.stats[-1].cos                                 # the last layer's statistics of this forward

Segments (sizes, or a rule ``n -> sizes`` such as :class:`~rollingq_kernels.layout.EvenSplit`) and lengths
(``(B, M)``) come from the model's keyword arguments ``rollingq_segments`` / ``rollingq_lengths`` (models that
pass their ``**kwargs`` to the attention, as ViT and BERT do), else from the innermost :func:`rollingq_layout`.
Padding may also come from the model's own ``attention_mask`` (a key-padding mask, e.g. BERT's).

Without a rotation state the op runs with the identity rotation. :func:`attach` (``apply_rollingq`` calls it)
gives chosen attention modules a :class:`~rollingq_kernels.module.FusedRollingQAttention` without projections
(``module.rollingq``): its rotation buffer, statistics window and stored segments, which the
:class:`~rollingq_kernels.controller.RollingQ` controller drives; only those modules switch to ``"rollingq"``
(each gets its own copy of the config), the others keep their implementation.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..layout import SegmentsSpec, check_prefix, fold_prefix_segment, resolve_call
from ..module import FusedRollingQAttention
from ..ops import rollingq_attention
from ..stats import AttentionStats
from .timm import select_layers

logger = logging.getLogger("rollingq_kernels")

NAME = "rollingq"
NO_SEGMENTS = ("segments: not set for the 'rollingq' attention; use rollingq_kernels.integrations.transformers."
               "rollingq_layout(segments=...), pass rollingq_segments=... to the model, or apply_rollingq(model, "
               "segments=...)")
STATE = "rollingq"  # the attribute of an attention module holding its FusedRollingQAttention state


@dataclass
class RollingQRun:
    """A :func:`rollingq_layout` context: the layout its calls use and the statistics they returned.

    Attributes:
        segments: sizes or a rule, or None (each call must get them another way).
        lengths: ``(B, M)`` valid tokens per modality, or None.
        num_prefix_tokens: ``P`` for modules without a state (a state uses its own).
        stats: every attention call's :class:`AttentionStats` in call order (one per layer and forward).
        modules: the attention module of each entry of :attr:`stats`.
    """

    segments: SegmentsSpec | None = None
    lengths: Any = None
    num_prefix_tokens: int = 1
    stats: list[AttentionStats] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)


_RUNS: list[RollingQRun] = []


@contextmanager
def rollingq_layout(segments: SegmentsSpec | None = None, lengths: Any = None, *,
                    num_prefix_tokens: int = 1) -> Iterator[RollingQRun]:
    """Calls of ``"rollingq"`` attention inside use this layout and record their statistics (contexts nest)."""
    run = RollingQRun(segments, lengths, check_prefix(num_prefix_tokens))
    _RUNS.append(run)
    try:
        yield run
    finally:
        _RUNS.remove(run)


def rollingq_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any
                               ) -> tuple[torch.Tensor, None]:
    """The ``"rollingq"`` attention: ``(B, H, N, Dh)`` q, k, v to ``((B, N, H, Dh) output, None)``.

    Raises:
        ValueError: a causal (decoder) attention, keys and values of another length than the queries, or no
            segments.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if causal and query.shape[2] > 1:
        raise ValueError(f"{type(module).__name__}: the 'rollingq' attention is bidirectional (class-query "
                         "attention over modality segments); causal attention is not supported")
    if key.shape[2] != query.shape[2] or key.shape[1] != query.shape[1]:
        raise ValueError(f"{type(module).__name__}: the 'rollingq' attention is self-attention with one key per "
                         f"query and head; got q {tuple(query.shape)}, k {tuple(key.shape)}")
    run = _RUNS[-1] if _RUNS else None
    segments = kwargs.get("rollingq_segments", run.segments if run is not None else None)
    lengths = kwargs.get("rollingq_lengths", run.lengths if run is not None else None)
    state = getattr(module, STATE, None)
    shape = (query.shape[0], query.shape[2])
    if isinstance(state, FusedRollingQAttention):
        layout = state.layout(shape, query.device, attention_mask, False, segments, lengths)
        out = state.attend(query, key, value, layout, dropout_p=float(dropout))
        stats = state.last_stats
    else:
        prefix = run.num_prefix_tokens if run is not None else 1
        layout = resolve_call(shape, query.device, stored=None, num_modalities=_modalities(segments, shape, prefix),
                              prefix=prefix, attn_mask=attention_mask, segments=segments, lengths=lengths,
                              missing=NO_SEGMENTS)
        out, stats = rollingq_attention(query, key, value, layout.op_segments(), lengths=layout.op_lengths(),
                                        scale=scaling, dropout_p=float(dropout))
        stats = fold_prefix_segment(stats) if layout.prefix > 1 else stats
    if run is not None:
        run.stats.append(stats)
        run.modules.append(module)
    return out.transpose(1, 2).contiguous(), None


def _modalities(segments: Any, shape: tuple[int, int], prefix: int) -> int:
    if segments is None:
        return 2  # resolve_call then says how to set the segments
    return len(segments(shape[1] - prefix) if callable(segments) else segments)


def register() -> None:
    """Register ``"rollingq"`` with transformers' attention and mask interfaces (done at import)."""
    AttentionInterface.register(NAME, rollingq_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module of every attention module that dispatches through the interface, in model order."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "config") and hasattr(m, "scaling") and hasattr(m, "is_causal") and _heads(m)[0]}


def _heads(module: nn.Module) -> tuple[int, int]:
    heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    return (int(heads), int(head_dim)) if heads and head_dim else (0, 0)


def attach(model: nn.Module, *, segments: SegmentsSpec, layers: Iterable[int | str] | None = None,
           num_prefix_tokens: int = 1, **layer_kwargs: Any) -> dict[str, FusedRollingQAttention]:
    """Give chosen attention modules of a transformers model a RollingQ state and switch them to ``"rollingq"``.

    Args:
        model: a transformers encoder model (ViT, BERT, …) whose attention uses the attention interface.
        segments: the modality sizes after the prefix tokens, or a rule ``n -> sizes``.
        layers: indices (model order) or qualified names of attention modules; None: all.
        num_prefix_tokens: ``P``, the first being the query token (``[CLS]``).
        layer_kwargs: more :class:`FusedRollingQAttention` arguments (``rotation_mode``, ``backend``, ``window``).

    Returns:
        qualified name of the attention module -> its state (``module.rollingq``).
    """
    found = attention_modules(model)
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no attention module that uses transformers' "
                         "attention interface (config, scaling, is_causal, heads)")
    states = {}
    for name in select_layers(found, layers):
        module = found[name]
        if getattr(module, "is_causal", False):
            raise ValueError(f"layers: {name!r} is causal (a decoder); the 'rollingq' attention is bidirectional")
        heads, head_dim = _heads(module)
        state = FusedRollingQAttention(heads * head_dim, num_heads=heads, projections=False, segments=segments,
                                       num_prefix_tokens=num_prefix_tokens, scale=float(module.scaling),
                                       **layer_kwargs)
        weight = next(module.parameters(), None)
        if weight is not None:
            state.to(device=weight.device, dtype=weight.dtype)
        state.train(module.training)
        module.add_module(STATE, state)
        module.config = copy.deepcopy(module.config)  # only this module (and no shared sub-config) switches
        module.config._attn_implementation = NAME
        states[name] = state
    logger.info("transformers: %d of %d attention modules of %s use 'rollingq'", len(states), len(found),
                type(model).__name__)
    return states
