"""Which layers a RollingQ controller controls, and whether a saved window fits them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .module import FusedRollingQAttention


def as_named_layers(
    modules: FusedRollingQAttention | Iterable[FusedRollingQAttention] | Mapping[str, FusedRollingQAttention],
) -> dict[str, FusedRollingQAttention]:
    """``{name: layer}`` of a layer (named ``"0"``), a sequence of layers (``"0"``, ``"1"``, …) or a mapping.

    Raises:
        TypeError: anything else, naming what was expected (and, for a model holding layers, how to pass them).
        ValueError: no layer at all.
    """
    expected = "a FusedRollingQAttention, a sequence of them or a {name: layer} mapping"
    if isinstance(modules, FusedRollingQAttention):
        named = {"0": modules}
    elif isinstance(modules, Mapping):
        named = {str(k): v for k, v in modules.items()}
    elif isinstance(modules, torch.nn.Module) and not isinstance(modules, (torch.nn.ModuleList, torch.nn.Sequential)):
        found = [name for name, m in modules.named_modules() if isinstance(m, FusedRollingQAttention)]
        hint = (f"; it holds FusedRollingQAttention layers ({', '.join(found[:3])}{', …' if len(found) > 3 else ''}): "
                "pass them, e.g. {name: m for name, m in model.named_modules() if isinstance(m, "
                "FusedRollingQAttention)}") if found else ""
        raise TypeError(f"modules: expected {expected}, got a {type(modules).__name__}{hint}")
    elif isinstance(modules, Iterable) and not isinstance(modules, (str, bytes, torch.Tensor)):
        named = {str(i): m for i, m in enumerate(modules)}
    else:
        raise TypeError(f"modules: expected {expected}, got {type(modules).__name__}")
    if not named:
        raise ValueError("modules: expected at least one FusedRollingQAttention, got none")
    for name, m in named.items():
        if not isinstance(m, FusedRollingQAttention):
            raise TypeError(f"modules: expected FusedRollingQAttention layers, got {type(m).__name__} for {name!r}")
    return named


def check_window_state(name: str, layer: FusedRollingQAttention, state: Any) -> None:
    """The saved window of ``layer`` has its sums' fields and shapes (a model of another size fails here)."""
    if not isinstance(state, Mapping) or not {"total", "batches"} <= set(state):
        raise ValueError(f"state['statistics'][{name!r}]: expected a StatisticsAccumulator.state_dict(), "
                         f"got {type(state).__name__}")
    expected = {k: tuple(v.shape) for k, v in layer.zero_sums().items()}
    saved = ([] if state["total"] is None else [state["total"]]) + list(state["batches"])
    for sums in saved:
        got = {k: tuple(v.shape) for k, v in sums.items()} if isinstance(sums, Mapping) else None
        if got != expected:
            where = (f"layer {name!r} (num_heads={layer.num_heads}, num_modalities={layer.num_modalities}, "
                     f"head_dim={layer.head_dim})")
            if got is None or got.keys() != expected.keys():
                missing, extra = sorted(expected.keys() - (got or {}).keys()), sorted((got or {}).keys() - expected)
                detail = (f"missing {missing}" + (f", unexpected {extra}" if extra else "")) if got else \
                    f"got {type(sums).__name__}"
                raise ValueError(f"state['statistics'][{name!r}]: expected the sums {sorted(expected)} of {where}; "
                                 f"{detail} (a state written by another version of rollingq_kernels?)")
            field = next(k for k in expected if got[k] != expected[k])
            raise ValueError(f"state['statistics'][{name!r}]: saved for another layer size: {field} has shape "
                             f"{got[field]}, {where} expects {expected[field]}")
