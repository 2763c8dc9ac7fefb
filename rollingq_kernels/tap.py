"""The statistics tap of one attention layer: where each call's :class:`AttentionStats` go.

A :class:`StatisticsTap` keeps the last call's statistics, feeds the layer's own window (a
:class:`StatisticsAccumulator`, training calls only: the window the controller decides on) and every
accumulator subscribed with :meth:`StatisticsTap.subscribe` (any mode: the trainer's epoch log, a validation pass,
the controller's estimation pass). Each call's statistics become sums once (:func:`batch_sums`), whatever the
number of accumulators. :class:`~rollingq_kernels.module.FusedRollingQAttention` delegates its statistics methods
(``statistics``, ``last_stats``, ``collecting``, ``set_window``, ``reset_statistics``, ``window_statistics``) here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .accumulator import StatisticsAccumulator, Window, WindowStatistics, batch_sums, check_window
from .stats import AttentionStats


class StatisticsTap:
    """Statistics of one layer's calls.

    Args:
        window: the window of :attr:`statistics`, ``"epoch"`` or the last ``K`` batches.

    Attributes:
        last: the op's statistics of the last call (detached), or None before the first call.
        statistics: the layer's window, fed by training calls while :attr:`enabled`.
        enabled: feed :attr:`statistics` (the trainer turns it off on layers no controller reads).
    """

    def __init__(self, window: Window = "epoch") -> None:
        self.last: AttentionStats | None = None
        self.statistics = StatisticsAccumulator(check_window(window))
        self.enabled = True
        self._subscribers: list[StatisticsAccumulator] = []
        self._paused = 0

    def record(self, stats: AttentionStats, training: bool) -> None:
        """Take one call's statistics: keep them as :attr:`last`, add their sums where they go."""
        self.last = stats
        targets = list(self._subscribers)
        if training and self.enabled and not self._paused:
            targets.append(self.statistics)
        if targets:
            sums = batch_sums(stats)  # once, whatever the number of accumulators
            for accumulator in targets:
                accumulator.add_sums(sums)

    @contextmanager
    def subscribe(self, accumulator: StatisticsAccumulator, *, window: bool = True
                  ) -> Iterator[StatisticsAccumulator]:
        """Add every call's statistics to ``accumulator`` while the context is open (contexts nest).

        Args:
            accumulator: where the statistics go.
            window: keep feeding :attr:`statistics` meanwhile; False pauses it, so extra calls never
                enter the controller's decision window.

        Yields:
            ``accumulator``.
        """
        if not isinstance(accumulator, StatisticsAccumulator):
            raise TypeError(f"accumulator: expected a StatisticsAccumulator, got {type(accumulator).__name__}")
        self._subscribers.append(accumulator)
        self._paused += not window
        try:
            yield accumulator
        finally:
            self._subscribers.remove(accumulator)
            self._paused -= not window

    def set_window(self, window: Window) -> None:
        """Use the window ``"epoch"`` or the last ``K`` batches (a change starts it empty)."""
        if check_window(window) != self.statistics.window:
            self.statistics = StatisticsAccumulator(window)

    def reset(self) -> None:
        """Start a fresh window."""
        self.statistics.reset()

    def reduce(self) -> WindowStatistics | None:
        """The window's reduced statistics, or None when it is empty."""
        return self.statistics.reduce()
