"""The controller's extra passes over the training data: the anchor's estimation pass and the probe batch.

Both run the model through ``forward_fn(batch)`` under ``torch.no_grad()`` with every controlled
layer's own window paused (:meth:`~rollingq_kernels.module.FusedRollingQAttention.collecting` with
``window=False``), so nothing they see enters a decision window. The caller chooses the mode
(the trainer runs them in eval mode, as the official code does).

The estimation pass averages either over samples (``pass_mean="sample"``) or, as the official
``method.py``, as the unweighted mean of per-batch means (``pass_mean="batch"``:
:class:`BatchMeanAccumulator`); the two differ when the batches differ in size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import torch

from .accumulator import StatisticsAccumulator, Sums, WindowStatistics, synced_statistics
from .probe import ProbeInputs, capture_inputs

#: Sums divided by the batch's count of samples where the modality is present (the rest: by its samples).
_PER_PRESENT = ("cos_sum", "cos_sq_sum", "cos_head_sum", "key_sum")


def batch_mean_sums(sums: Sums) -> Sums:
    """One batch's sums turned into the sums of its *means*: each batch then weighs 1 in a window.

    ``key_sum`` (and the cosine sums) become the batch's mean over the samples where each modality is
    present, with ``present`` 1 (0 where absent); ``query_sum``, ``mass_sum``, ``tokens_sum`` and any
    other field the batch's mean over its samples, with ``samples`` 1; ``diff_sum`` the batch's mean
    difference, with ``diff_count`` 1. Reducing a window of such sums gives the unweighted mean of
    per-batch means (the official code's estimate).
    """
    present = sums["present"]
    per_present = present.clamp_min(1.0)
    samples = sums["samples"].clamp_min(1.0)
    out = {}
    for name, value in sums.items():
        if name in _PER_PRESENT:
            shape = [1] * value.dim()
            axis = {"cos_head_sum": 1, "key_sum": 1}.get(name, 0)
            shape[axis] = -1
            out[name] = value / per_present.reshape(shape)
        elif name == "diff_sum":
            out[name] = value / sums["diff_count"].clamp_min(1.0)
        elif name in ("present", "diff_count", "samples"):
            out[name] = (value > 0).to(value.dtype)
        else:
            out[name] = value / samples
    return out


class BatchMeanAccumulator(StatisticsAccumulator):
    """A :class:`StatisticsAccumulator` whose window weighs every batch equally (:func:`batch_mean_sums`)."""

    def add_sums(self, sums: Sums) -> None:
        super().add_sums(batch_mean_sums(sums))


def estimation_pass(layers: dict[str, Any], loader: Iterable, forward_fn: Callable[[Any], Any],
                    pass_mean: str = "sample") -> dict[str, WindowStatistics | None]:
    """Each layer's statistics over one no-grad pass of ``loader`` (summed over ranks under torch.distributed).

    Args:
        layers: ``{name: FusedRollingQAttention}``.
        loader: the batches; forward_fn: runs the model on one.
        pass_mean: ``"sample"`` (every sample weighs 1) or ``"batch"`` (every batch weighs 1).
    """
    kind = BatchMeanAccumulator if pass_mean == "batch" else StatisticsAccumulator
    accumulators = {name: kind("epoch") for name in layers}
    with torch.no_grad(), ExitStack() as stack:
        for name, acc in accumulators.items():
            stack.enter_context(layers[name].collecting(acc, window=False))
        for batch in loader:
            forward_fn(batch)
    return {name: synced_statistics(acc.sums(), layers[name].zero_sums) for name, acc in accumulators.items()}


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the ranks where it is finite (NaN: none), so that every rank decides alike.

    Under ``torch.distributed`` every rank must call it (one collective); without a process group it
    returns ``value``.
    """
    has = math.isfinite(value)
    t = torch.tensor([value if has else 0.0, float(has)], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return float(t[0] / t[1]) if float(t[1]) > 0 else math.nan


def probe_inputs(layers: dict[str, Any], loader: Iterable, forward_fn: Callable[[Any], Any],
                 batches: int) -> dict[str, ProbeInputs]:
    """The layers' inputs on the first ``batches`` batches of ``loader`` (no grad, windows paused)."""
    def run() -> None:
        with torch.no_grad(), ExitStack() as stack:
            for layer in layers.values():
                stack.enter_context(layer.collecting(StatisticsAccumulator("epoch"), window=False))
            for batch in itertools.islice(loader, batches):
                forward_fn(batch)

    return capture_inputs(layers, run)
