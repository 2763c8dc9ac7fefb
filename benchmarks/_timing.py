"""Timing, peak memory and the machine's reference rates.

* CPU: wall clock (``time.perf_counter``) around each call; CPU ops are synchronous.
* CUDA: a pair of CUDA events around each call, then a synchronization; the
  median over rounds is the device time.
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was
  allocated before the call; on CPU the peak of the running sum of the
  allocations and frees the torch profiler records (``profile_memory=True``)
  during one extra call: bytes the call allocated on top of its inputs.
* Machine rates (once per session): copy bandwidth of a large ``copy_`` and the
  rate of a large square matmul (the fastest of a few calls: the best the
  machine does), so rows can report fractions of them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._arith import copy_bandwidth_gbps, matmul_tflops

logger = logging.getLogger("benchmarks")


class CallTimer:
    """Wraps a callable and records the duration of every call in seconds.

    On CUDA the durations come from CUDA events (read after a synchronization);
    on CPU from ``time.perf_counter``.
    """

    def __init__(self, fn: Callable[..., Any], device: torch.device) -> None:
        self.fn = fn
        self.device = device
        self._cpu: list[float] = []
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.fn(*args, **kwargs)
            end.record()
            torch.cuda.synchronize(self.device)
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            self.fn(*args, **kwargs)
            self._cpu.append(time.perf_counter() - t0)

    def samples(self, skip: int = 0) -> list[float]:
        """Durations in seconds of every call after the first ``skip`` (the warm-up)."""
        if self.device.type == "cuda":
            return [s.elapsed_time(e) / 1e3 for s, e in self._events[skip:]]
        return self._cpu[skip:]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    fn: Callable[..., Any], setup: Callable[[], tuple[tuple, dict]], device: torch.device, warmup: int, rounds: int
) -> list[float]:
    """Call ``setup`` (untimed) then ``fn(*args, **kwargs)`` (timed), ``warmup + rounds`` times.

    Returns the ``rounds`` timed durations in seconds. Used when pytest-benchmark is disabled.
    """
    timer = CallTimer(fn, device)
    for _ in range(warmup + rounds):
        args, kwargs = setup()
        synchronize(device)
        timer(*args, **kwargs)
    return timer.samples(skip=warmup)


def _cpu_profiled_peak(fn: Callable[..., Any], args: tuple, kwargs: dict) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args, **kwargs)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.remove(path)
    mem = [e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    mem.sort(key=lambda e: (e.get("ts", 0.0), e["args"].get("Ev Idx", 0)))
    running, peak = 0, 0
    for e in mem:
        running += int(e["args"].get("Bytes", 0))
        peak = max(peak, running)
    return peak


def peak_memory_bytes(
    fn: Callable[..., Any], setup: Callable[[], tuple[tuple, dict]], device: torch.device
) -> int:
    """Peak bytes allocated by one call ``fn(*args, **kwargs)`` on top of what existed before it.

    ``setup()`` (e.g. the forward before a timed backward) runs first and is not counted.
    """
    args, kwargs = setup()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(*args, **kwargs)
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return _cpu_profiled_peak(fn, args, kwargs)


@dataclass(frozen=True)
class MachineRates:
    """The machine's measured reference rates.

    Attributes:
        copy_gbps: GB/s of a large device-to-device ``copy_`` (read + write counted).
        matmul_tflops: dtype name -> TFLOP/s of a large square matmul in that dtype.
    """

    copy_gbps: float
    matmul_tflops: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"copy_gbps": self.copy_gbps, "matmul_tflops": dict(self.matmul_tflops)}


def _best_time(fn: Callable[[], Any], device: torch.device, rounds: int) -> float:
    """Fastest seconds of ``fn`` over ``rounds`` calls after one warm-up call (the machine's best rate)."""
    return min(time_rounds(fn, lambda: ((), {}), device, warmup=1, rounds=rounds))


def measure_machine(device: torch.device, dtypes: dict[str, torch.dtype], quick: bool) -> MachineRates:
    """Measure copy bandwidth and matmul rates on ``device`` (a few seconds; less in quick mode)."""
    if device.type == "cuda":
        copy_bytes, n = (256 << 20, 4096) if quick else (1 << 30, 8192)
    else:
        copy_bytes, n = (32 << 20, 512) if quick else (256 << 20, 3072)
    rounds = 3 if quick else 5
    src = torch.rand(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = copy_bandwidth_gbps(copy_bytes, _best_time(lambda: dst.copy_(src), device, rounds))
    rates: dict[str, float] = {}
    for name, dt in dtypes.items():
        a = torch.rand(n, n, device=device).to(dt)
        b = torch.rand(n, n, device=device).to(dt)
        rates[name] = matmul_tflops(n, _best_time(lambda a=a, b=b: torch.mm(a, b), device, rounds))
    logger.info("machine: copy %.1f GB/s, matmul %s TFLOP/s", copy, rates)
    return MachineRates(copy, rates)
