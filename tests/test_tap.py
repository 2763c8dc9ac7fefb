"""StatisticsTap (rollingq_kernels.tap): where a layer's statistics go, each call's sums made once."""

from __future__ import annotations

import pytest
import torch

import rollingq_kernels.tap as tap_module
from rollingq_kernels.accumulator import StatisticsAccumulator, batch_sums
from rollingq_kernels.ops import rollingq_attention
from rollingq_kernels.tap import StatisticsTap


def _stats(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 2, 10, 4, generator=g, dtype=torch.float64) for _ in range(3))
    return rollingq_attention(q, k, v, (5, 4), backend="reference")[1]


def test_training_calls_feed_the_window_and_subscribers_get_every_call(monkeypatch):
    calls = []
    monkeypatch.setattr(tap_module, "batch_sums", lambda s: calls.append(1) or batch_sums(s))
    tap = StatisticsTap(window=2)
    first, second = StatisticsAccumulator(), StatisticsAccumulator()
    stats = _stats(0)
    tap.record(stats, training=False)
    assert tap.last is stats and tap.statistics.num_batches == 0 and calls == []  # nobody to feed: no sums
    with tap.subscribe(first), tap.subscribe(second, window=False):
        tap.record(stats, training=True)  # the window is paused by the second subscriber
        assert calls == [1]  # one batch_sums for two accumulators
    tap.record(stats, training=True)
    assert (first.num_batches, second.num_batches, tap.statistics.num_batches) == (1, 1, 1)
    tap.enabled = False
    tap.record(stats, training=True)
    assert tap.statistics.num_batches == 1
    for name, value in first.sums().items():
        torch.testing.assert_close(value, tap.statistics.sums()[name], rtol=0, atol=0)
    tap.set_window("epoch")
    assert tap.statistics.window == "epoch" and tap.reduce() is None
    with pytest.raises(TypeError, match="accumulator: expected a StatisticsAccumulator"):
        with tap.subscribe([]):
            pass
