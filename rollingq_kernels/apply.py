"""One call: :func:`apply_rollingq` puts RollingQ into a timm or transformers model, in place.

It replaces (timm) or takes over (transformers) the attention of the chosen layers, keeps every weight, and
returns a :class:`RollingQHandle` with the layers, their statistics and a
:class:`~rollingq_kernels.controller.RollingQ` controller over them::

    handle = apply_rollingq(vit, segments=EvenSplit(2), layers=[-1])
    for epoch in range(epochs):
        train_one_epoch(vit)              # the layers gather their statistics while training
        handle.controller.step(epoch)     # rotate when the imbalance is large
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .accumulator import WindowStatistics
from .controller import RollingQ
from .integrations.timm import find_vit, patch_timm
from .layout import SegmentsSpec
from .module import FusedRollingQAttention
from .stats import AttentionStats

logger = logging.getLogger("rollingq_kernels")


@dataclass
class RollingQHandle:
    """What :func:`apply_rollingq` made.

    Attributes:
        layers: qualified name -> :class:`FusedRollingQAttention` (timm: the new attention layer; transformers:
            the state ``<attention module>.rollingq``).
        controller: a :class:`RollingQ` over :attr:`layers`, or None.
        library: ``"timm"`` or ``"transformers"``.
    """

    layers: dict[str, FusedRollingQAttention]
    controller: RollingQ | None
    library: str

    def statistics(self) -> dict[str, WindowStatistics | None]:
        """Each layer's reduced statistics window (training forwards since the last reset), or None if empty."""
        return {name: layer.window_statistics() for name, layer in self.layers.items()}

    def last_stats(self) -> dict[str, AttentionStats | None]:
        """Each layer's statistics of its last call."""
        return {name: layer.last_stats for name, layer in self.layers.items()}


def _library(model: nn.Module) -> str:
    module = type(model).__module__
    if module.startswith("transformers."):
        return "transformers"
    if module.startswith("timm.") or find_vit(model) is not None:
        return "timm"
    raise TypeError(f"model: expected a timm or transformers model, got {type(model).__name__} from {module}")


def apply_rollingq(model: nn.Module, *, segments: SegmentsSpec, layers: Iterable[int | str] | None = None,
                   controller: bool | Mapping[str, Any] = True, query_token: str = "class",
                   num_prefix_tokens: int | None = None, **layer_kwargs: Any) -> RollingQHandle:
    """Put RollingQ into the chosen attention layers of ``model`` (timm or transformers), in place.

    Args:
        model: a timm ViT-family model, or a transformers encoder whose attention uses the attention interface.
        segments: modality sizes after the prefix tokens, or a rule ``n -> sizes``
            (:class:`~rollingq_kernels.layout.EvenSplit`).
        layers: indices (model order: block indices) or qualified names of attention layers; None: all.
        controller: True (a :class:`RollingQ` with its defaults), a mapping of :class:`RollingQ` arguments, or
            False (none).
        query_token: timm: ``"class"`` or ``"first_prefix"`` (:func:`~rollingq_kernels.integrations.timm.
            patch_timm`).
        num_prefix_tokens: transformers: ``P`` (default 1, the ``[CLS]`` token); timm models say it themselves.
        layer_kwargs: more layer arguments (``rotation_mode``, ``backend``, ``window``).

    Returns:
        A :class:`RollingQHandle`.
    """
    library = _library(model)
    if library == "timm":
        if num_prefix_tokens is not None:
            raise ValueError("num_prefix_tokens: a timm model states its own (model.num_prefix_tokens); leave it None")
        layers_made = patch_timm(model, segments=segments, layers=layers, query_token=query_token, **layer_kwargs)
    else:
        if query_token != "class":
            raise ValueError("query_token: transformers models take num_prefix_tokens (the first is the query)")
        # The one optional first-party import here: importing it imports transformers and registers "rollingq".
        from .integrations import transformers as hf

        layers_made = hf.attach(model, segments=segments, layers=layers,
                                num_prefix_tokens=1 if num_prefix_tokens is None else num_prefix_tokens,
                                **layer_kwargs)
    made = None
    if controller:
        settings = dict(controller) if isinstance(controller, Mapping) else {}
        made = RollingQ(layers_made, **settings)
    return RollingQHandle(layers_made, made, library)
