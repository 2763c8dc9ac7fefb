"""Running RollingQ statistics gathered during training (no extra pass).

Each training forward of a :class:`~rollingq_kernels.module.FusedRollingQAttention`
turns the op's :class:`~rollingq_kernels.stats.AttentionStats` into a handful
of float64 *sums* (:func:`batch_sums`) and adds them to a
:class:`StatisticsAccumulator`. Sums are kept as tensors on the device of the
statistics, so accumulating never waits for the device (no ``.item()``, no
host sync). Because only sums are kept, the statistics of a window of batches
equal the statistics of the concatenated batches, and sums from several
processes can be all-reduced before a decision (:func:`all_reduce_sums`).

A window is either ``"epoch"`` (everything since the last reset, constant
memory) or an int ``K`` (the last ``K`` batches, one set of sums per batch).

The attention imbalance has one definition here: sums of per-sample cosines
(:func:`cosine_sums`) reduced by :func:`reduce_cosines`, and
:func:`imbalance` picks AIR (two modalities) or the spread (more).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .stats import SUM_PRESENT, SUMMED_STATISTICS, AttentionStats, Statistic

Window = str | int
Sums = dict[str, torch.Tensor]

#: The cosine sums of :func:`cosine_sums` (the ``cosines`` and ``present`` reductions of the statistics table),
#: their shapes in ``M`` modalities: samples, Σ cos and Σ cos² over samples where the modality is present, the
#: number of such samples, Σ (cos_0 − cos_1) over samples with modalities 0 and 1, and their number.
COSINE_SUMS: dict[str, tuple[str, ...]] = {
    "samples": (), "cos_sum": ("M",), "cos_sq_sum": ("M",), "present": ("M",), "diff_sum": (), "diff_count": (),
}
#: The fields of one set of sums (all float64): :data:`COSINE_SUMS`, then the window sum of each summed
#: statistic of :data:`~rollingq_kernels.stats.STATISTICS` (its ``sum_name``, its shape without ``B``).
SUM_FIELDS: tuple[str, ...] = tuple(COSINE_SUMS) + tuple(s.sum_name for s in SUMMED_STATISTICS)  # type: ignore[misc]


def check_window(window: Window) -> Window:
    """Validate a window: ``"epoch"`` or an int ``K ≥ 1``; return it."""
    if window == "epoch":
        return window
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected 'epoch' or an int >= 1 (the last K batches), got {window!r}")
    return window


def cosine_sums(cos: torch.Tensor, valid: torch.Tensor | None = None) -> Sums:
    """The float64 sums of per-sample cosines that AIR and the mean cosines come from.

    The one place where a cosine enters an imbalance: the op's statistics
    (:func:`batch_sums`), the analyses and :func:`attention_imbalance_rate`
    all start here. The cosine of an absent modality never enters a sum, even
    when it is NaN.

    Args:
        cos: ``(B, M)`` per-sample cos(class query, mean key), ``M >= 2``.
        valid: ``(B, M)`` bool, modality present; None means all present.

    Returns:
        ``samples``, ``cos_sum``, ``cos_sq_sum``, ``present``, ``diff_sum``
        and ``diff_count`` (see :data:`SUM_FIELDS`), float64 on ``cos``'s device.
    """
    if cos.dim() != 2 or cos.shape[1] < 2:
        raise ValueError(f"cos: expected shape (B, M) with M >= 2, got {tuple(cos.shape)}")
    if valid is None:
        valid = torch.ones(cos.shape, dtype=torch.bool, device=cos.device)
    if valid.shape != cos.shape:
        raise ValueError(f"valid: expected shape {tuple(cos.shape)}, got {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid: expected a bool tensor, got {valid.dtype}")
    present = valid.to(torch.float64)
    c = cos.detach().to(torch.float64).masked_fill(~valid, 0.0)
    both = present[:, 0] * present[:, 1]
    return {
        "samples": torch.full((), float(cos.shape[0]), dtype=torch.float64, device=cos.device),
        "cos_sum": c.sum(0),
        "cos_sq_sum": c.square().sum(0),
        "present": present.sum(0),
        "diff_sum": ((c[:, 0] - c[:, 1]) * both).sum(),
        "diff_count": both.sum(),
    }


def _present_mask(stat: Statistic, valid: torch.Tensor) -> torch.Tensor:
    """``valid`` ``(B, M)`` shaped to broadcast over ``stat``'s shape (its ``M`` axis)."""
    return valid.reshape([valid.shape[0]] + [-1 if d == "M" else 1 for d in stat.shape[1:]])


def batch_sums(stats: AttentionStats) -> Sums:
    """The float64 sums of one batch's statistics (see :data:`SUM_FIELDS`).

    Args:
        stats: the op's statistics of a batch (:class:`~rollingq_kernels.stats.AttentionStats`): the cosine
            sums come from ``cos (B, M)`` and ``valid (B, M)`` bool, then each summed statistic of the table
            is summed over the samples (``sum_present``: where the modality is present).

    Returns:
        A dict of float64 tensors on the statistics' device; no host sync.
    """
    valid = stats.valid
    sums = cosine_sums(stats.cos, valid)
    for stat in SUMMED_STATISTICS:
        value = getattr(stats, stat.name).detach().to(torch.float64)
        if stat.reduce == SUM_PRESENT:
            value = value.masked_fill(~_present_mask(stat, valid), 0.0)
        sums[stat.sum_name] = value.sum(0)  # type: ignore[index]
    return sums


def zero_sums(num_heads: int, num_modalities: int, head_dim: int, device: torch.device | str | None = None) -> Sums:
    """Empty sums shaped like :func:`batch_sums` (a rank without batches still joins an all-reduce)."""
    H, M, Dh = num_heads, num_modalities, head_dim
    shapes = {name: tuple(M for _ in dims) for name, dims in COSINE_SUMS.items()}
    shapes.update({stat.sum_name: stat.sum_shape(H, M, Dh) for stat in SUMMED_STATISTICS})  # type: ignore[misc]
    return {name: torch.zeros(shapes[name], dtype=torch.float64, device=device) for name in SUM_FIELDS}


def add_sums(a: Sums, b: Sums) -> Sums:
    """Field-wise ``a + b`` (new tensors)."""
    if a.keys() != b.keys():
        raise ValueError(f"b: expected the fields {sorted(a)}, got {sorted(b)}")
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(
                f"b: field {name!r} has shape {tuple(b[name].shape)}, expected {tuple(a[name].shape)} "
                "(statistics of modules with different heads, head size or modalities?)"
            )
    return {name: a[name] + b[name] for name in a}


def all_reduce_sums(sums: Sums) -> Sums:
    """Sum ``sums`` over all processes of the default group (one collective).

    Without an initialized ``torch.distributed`` group this returns ``sums``
    unchanged. Every rank must call it (it is a collective).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sums
    names = sorted(sums)  # the same order on every rank, whatever order the dict was built in
    flat = torch.cat([sums[n].reshape(-1) for n in names])
    torch.distributed.all_reduce(flat)
    out, start = {}, 0
    for n in names:
        size = sums[n].numel()
        out[n] = flat[start : start + size].reshape(sums[n].shape)
        start += size
    return out


@dataclass
class WindowStatistics:
    """The reduced statistics of a window (float64 tensors on the sums' device).

    Attributes:
        samples: number of samples in the window.
        air: ``E[cos_0 − cos_1]`` over samples with modalities 0 and 1 present
            (the paper's Eq. 9); NaN when there is none.
        air_count: number of samples that entered ``air``.
        cos_mean: ``(M,)`` mean cosine per modality over the samples where it
            is present; NaN where it never is.
        cos_std: ``(M,)`` the population standard deviation of those cosines.
        spread: ``max − min`` of the present ``cos_mean`` (NaN with < 2).
        present: ``(M,)`` samples where each modality is present.
        cos_head_mean … tokens_mean: the window mean of each summed statistic of
            :data:`~rollingq_kernels.stats.STATISTICS` (its ``mean_name``):
        cos_head_mean: ``(H, M)`` mean per-head cosine (NaN where never present).
        key_mean: ``(H, M, Dh)`` E[mean key] per head and modality (0 where
            never present).
        query_mean: ``(H, Dh)`` E[rotated class query] (0 for an empty window).
        mass_mean: ``(H, M+1)`` mean class-row attention mass on
            [class, modality 1, …, M].
        tokens_mean: ``(M,)`` mean valid tokens per sample of each modality.
        max_prob_mean: ``(H,)`` mean largest class-row attention probability
            (the softmax's saturation).
    """

    samples: int
    air: float
    air_count: int
    cos_mean: torch.Tensor
    cos_std: torch.Tensor
    spread: float
    present: torch.Tensor
    cos_head_mean: torch.Tensor
    key_mean: torch.Tensor
    query_mean: torch.Tensor
    mass_mean: torch.Tensor
    tokens_mean: torch.Tensor
    max_prob_mean: torch.Tensor

    def global_key_mean(self) -> torch.Tensor:
        """``(M, H·Dh)`` the mean keys with heads concatenated (a global rotation's space)."""
        H, M, Dh = self.key_mean.shape
        return self.key_mean.permute(1, 0, 2).reshape(M, H * Dh)

    def global_query_mean(self) -> torch.Tensor:
        """``(H·Dh,)`` the mean rotated class query with heads concatenated."""
        return self.query_mean.reshape(-1)


class Imbalance(NamedTuple):
    """The attention imbalance of a batch or a window of batches.

    Attributes:
        air: ``E[cos_0 − cos_1]`` over the samples with modalities 0 and 1
            present (the paper's Eq. 9); NaN when there is none.
        spread: ``max − min`` of the present ``cos_mean`` (NaN with fewer
            than two; equals ``|air|`` for M = 2 when every sample has both).
        cos_mean: ``(M,)`` float64 mean cosine per modality over the samples
            where it is present; NaN where it never is.
        count: samples that entered ``air``.
    """

    air: float
    spread: float
    cos_mean: torch.Tensor
    count: int


def reduce_cosines(sums: Sums) -> Imbalance:
    """AIR, the spread and the mean cosines from :func:`cosine_sums` (host sync)."""
    present = sums["present"]
    has = present > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=present.device)
    cos_mean = torch.where(has, sums["cos_sum"] / present.clamp_min(1.0), nan)
    count = int(sums["diff_count"].item())
    air = float(sums["diff_sum"].item()) / count if count else math.nan
    shown = cos_mean[has]
    spread = float((shown.max() - shown.min()).item()) if shown.numel() >= 2 else math.nan
    return Imbalance(air=air, spread=spread, cos_mean=cos_mean, count=count)


def attention_imbalance_rate(cos: torch.Tensor, valid: torch.Tensor | None = None) -> Imbalance:
    """The :class:`Imbalance` of one batch of per-sample cosines.

    Args:
        cos: ``(B, M)`` per-sample cosines (``stats.cos``).
        valid: ``(B, M)`` bool (``stats.valid``); None means all present.
    """
    return reduce_cosines(cosine_sums(cos, valid))


def imbalance(window: Imbalance | WindowStatistics) -> float:
    """The imbalance RollingQ decides on: AIR for two modalities, the spread for more.

    ``window`` is an :class:`Imbalance` or a :class:`WindowStatistics`; the
    controller, the trainer's log, validation and the analyses all call this.
    """
    return window.air if window.cos_mean.shape[-1] == 2 else window.spread


def _window_mean(stat: Statistic, sums: Sums, samples: int) -> torch.Tensor:
    """A summed statistic's window mean: over the samples (``sum``) or where the modality is present."""
    total = sums[stat.sum_name]  # type: ignore[index]
    if stat.reduce != SUM_PRESENT:
        return total / max(samples, 1)
    axis = [-1 if d == "M" else 1 for d in stat.shape[1:]]
    present = sums["present"].reshape(axis)
    mean = total / present.clamp_min(1.0)
    return mean if stat.absent_mean == 0.0 else torch.where(present > 0, mean, stat.absent_mean)


def reduce_sums(sums: Sums) -> WindowStatistics:
    """Turn a window's sums into means (host sync: call once per decision)."""
    cosines = reduce_cosines(sums)
    present = sums["present"]
    has = present > 0
    n = present.clamp_min(1.0)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=present.device)
    var = (sums["cos_sq_sum"] / n - (sums["cos_sum"] / n).square()).clamp_min(0.0)
    samples = int(sums["samples"].item())
    return WindowStatistics(
        samples=samples,
        air=cosines.air,
        air_count=cosines.count,
        cos_mean=cosines.cos_mean,
        cos_std=torch.where(has, var.sqrt(), nan),
        spread=cosines.spread,
        present=present,
        **{stat.mean_name: _window_mean(stat, sums, samples) for stat in SUMMED_STATISTICS},  # type: ignore[misc]
    )


def synced_statistics(sums: Sums | None, empty: Callable[[], Sums]) -> WindowStatistics | None:
    """A window's statistics summed over every process, then reduced.

    Under ``torch.distributed`` every rank must call it (one collective); a
    rank without batches joins with ``empty()`` (zero sums of the right
    shapes). Without a process group it reduces ``sums`` as they are.

    Returns:
        The :class:`WindowStatistics`, or None when no rank added a batch
        (without a process group: when ``sums`` is None).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sums = all_reduce_sums(sums if sums is not None else empty())
    return None if sums is None else reduce_sums(sums)


class StatisticsAccumulator:
    """Float64 sums of the statistics of the batches in a window.

    Args:
        window: ``"epoch"`` (everything since the last :meth:`reset`) or an
            int ``K ≥ 1`` (the last ``K`` batches).
    """

    def __init__(self, window: Window = "epoch") -> None:
        self.window: Window = check_window(window)
        self._total: Sums | None = None
        self._batches: deque[Sums] = deque(maxlen=None if window == "epoch" else int(window))
        # batches added since the last reset (all of them, not only the window); a tensor updated in place,
        # so that a compiled training step does not guard on (and recompile for) every new count
        self._count = torch.zeros((), dtype=torch.int64)

    @property
    def num_batches(self) -> int:
        """Batches added since the last reset (all of them, not only the window)."""
        return int(self._count)

    def add(self, stats: AttentionStats) -> None:
        """Add one batch's statistics (device-side adds only, no host sync)."""
        self.add_sums(batch_sums(stats))

    def add_sums(self, sums: Sums) -> None:
        """Add one batch's precomputed sums (see :func:`batch_sums`)."""
        if self.window == "epoch":
            self._total = sums if self._total is None else add_sums(self._total, sums)
        else:
            self._batches.append(sums)
        self._count += 1

    def reset(self) -> None:
        """Forget every batch: the next window starts empty."""
        self._total = None
        self._batches.clear()
        self._count.zero_()

    def sums(self) -> Sums | None:
        """The window's sums, or None if no batch was added since the last reset."""
        if self.window == "epoch":
            return None if self._total is None else dict(self._total)
        if not self._batches:
            return None
        out = self._batches[0]
        for s in list(self._batches)[1:]:
            out = add_sums(out, s)
        return dict(out)

    def reduce(self) -> WindowStatistics | None:
        """The window's reduced statistics (see :class:`WindowStatistics`), or None if empty."""
        sums = self.sums()
        return None if sums is None else reduce_sums(sums)

    def state_dict(self) -> dict:
        """A picklable copy of the window (tensors moved to CPU)."""
        cpu = lambda s: {k: v.detach().cpu().clone() for k, v in s.items()}  # noqa: E731
        return {
            "window": self.window,
            "num_batches": self.num_batches,
            "total": None if self._total is None else cpu(self._total),
            "batches": [cpu(s) for s in self._batches],
        }

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restore a window saved by :meth:`state_dict` (its window setting included)."""
        for key in ("window", "num_batches", "total", "batches"):
            if key not in state:
                raise ValueError(f"state: missing key {key!r}; expected a StatisticsAccumulator.state_dict()")
        move = lambda s: {k: v.to(device) if device is not None else v for k, v in s.items()}  # noqa: E731
        self.window = check_window(state["window"])
        self._total = None if state["total"] is None else move(state["total"])
        self._batches = deque(
            (move(s) for s in state["batches"]), maxlen=None if self.window == "epoch" else int(self.window)
        )
        self._count.fill_(int(state["num_batches"]))
