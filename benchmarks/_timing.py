"""Timing, peak memory and the machine's reference rates.

* CPU: wall clock (``time.perf_counter``) around each call; CPU ops are synchronous.
* CUDA: a pair of CUDA events around each call, then a synchronization; the
  median over rounds is the device time.
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was
  allocated before the call; on CPU the peak of the running sum of the
  allocations and frees the torch profiler records (``profile_memory=True``)
  during one extra call: bytes the call allocated on top of its inputs.
* Machine rates (once per session): copy bandwidth of a large ``copy_``, the
  rate of a large square matmul, and the **tile GEMM rate** (the roofline): the
  two GEMMs of an attention tile (``S = Q Kᵀ``, ``O = S V``, ``_shapes.TileShape``)
  over one tile per (batch, head) at the same thread count, by torch's batched
  GEMM and, on CPU, by the C++ kernels' own GEMMs (``_C._tile_gemm_seconds``);
  the faster of the two is the machine's rate at those shapes. Each is the
  fastest of a few calls: the best the machine does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._arith import copy_bandwidth_gbps, matmul_tflops, tflops
from ._shapes import TileShape

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


def tile_key(dtype: str, head_dim: int) -> str:
    """The key of a tile GEMM rate in :attr:`MachineRates.tile_gemm`: ``"fp32-dh64"``."""
    return f"{dtype}-dh{head_dim}"


@dataclass(frozen=True)
class MachineRates:
    """The machine's measured reference rates.

    Attributes:
        copy_gbps: GB/s of a large device-to-device ``copy_`` (read + write counted).
        matmul_tflops: dtype name -> TFLOP/s of a large square matmul in that dtype.
        tile_gemm: :func:`tile_key` -> ``{"blas": TFLOP/s of torch's batched GEMM, "own": of the C++ kernels'
            GEMMs (absent where they do not exist), "best": the larger, "tiles", "rows", "keys", "head_dim"}``.
    """

    copy_gbps: float
    matmul_tflops: dict[str, float]
    tile_gemm: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def tile_rate(self, dtype: str, head_dim: int) -> float | None:
        """The best tile GEMM rate (TFLOP/s) measured for ``dtype`` and ``head_dim``, or None."""
        entry = self.tile_gemm.get(tile_key(dtype, head_dim))
        return None if entry is None else entry["best"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"copy_gbps": self.copy_gbps, "matmul_tflops": dict(self.matmul_tflops),
                "tile_gemm": {k: dict(v) for k, v in self.tile_gemm.items()}}


def _best_time(fn: Callable[[], Any], device: torch.device, rounds: int) -> float:
    """Fastest seconds of ``fn`` over ``rounds`` calls after one warm-up call (the machine's best rate)."""
    return min(time_rounds(fn, lambda: ((), {}), device, warmup=1, rounds=rounds))


class TileGemm:
    """The tile GEMMs of the roofline for one :class:`TileShape` and dtype: torch's batched GEMM (``blas``)
    and, for float32 on CPU with the C++ kernels built, their own GEMMs (``own``)."""

    def __init__(self, tile: TileShape, dtype: torch.dtype, device: torch.device) -> None:
        self.tile, self.device = tile, device
        g = torch.Generator().manual_seed(3)
        t, r, k, d = tile.tiles, tile.rows, tile.keys, tile.head_dim
        self._q, self._kt, self._v = (torch.randn(*s, generator=g).to(device=device, dtype=dtype)
                                      for s in ((t, r, d), (t, d, k), (t, k, d)))
        self.has_own = False
        if device.type == "cpu" and dtype == torch.float32:
            try:
                from rollingq_kernels import _C

                self._own_seconds = _C._tile_gemm_seconds
                self.has_own = True
            except (ImportError, AttributeError):
                pass

    def blas_seconds(self, rounds: int) -> float:
        """Fastest seconds of ``bmm(bmm(Q, Kᵀ), V)`` over ``rounds`` calls (after one warm-up)."""
        return _best_time(lambda: torch.bmm(torch.bmm(self._q, self._kt), self._v), self.device, rounds)

    def own_seconds(self, rounds: int) -> float | None:
        """Fastest seconds of the C++ kernels' tile GEMMs over ``rounds`` runs, or None without them."""
        if not self.has_own:
            return None
        t = self.tile
        return self._own_seconds(t.tiles, t.rows, t.keys, t.head_dim, rounds)

    def rates(self, rounds: int) -> dict[str, float]:
        """``{"blas": TFLOP/s, ["own": TFLOP/s,] "best": the larger}`` from ``rounds`` calls of each."""
        out = {"blas": tflops(self.tile.flops, self.blas_seconds(rounds))}
        own = self.own_seconds(rounds)
        if own is not None:
            out["own"] = tflops(self.tile.flops, own)
        out["best"] = max(v for v in out.values() if math.isfinite(v))
        return out


def measure_machine(device: torch.device, dtypes: dict[str, torch.dtype], quick: bool,
                    tiles: list[TileShape] | tuple[TileShape, ...] = ()) -> MachineRates:
    """Measure copy bandwidth, square matmul and tile GEMM rates (``tiles``, every dtype) on ``device``
    (a few seconds; less in quick mode)."""
    if device.type == "cuda":
        copy_bytes, n = (256 << 20, 4096) if quick else (1 << 30, 8192)
    else:
        copy_bytes, n = (32 << 20, 512) if quick else (256 << 20, 3072)
    rounds = 3 if quick else 5
    src = torch.rand(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = copy_bandwidth_gbps(copy_bytes, _best_time(lambda: dst.copy_(src), device, rounds))
    rates: dict[str, float] = {}
    tile_rates: dict[str, dict[str, float]] = {}
    for name, dt in dtypes.items():
        a = torch.rand(n, n, device=device).to(dt)
        b = torch.rand(n, n, device=device).to(dt)
        rates[name] = matmul_tflops(n, _best_time(lambda a=a, b=b: torch.mm(a, b), device, rounds))
        for tile in tiles:
            entry = TileGemm(tile, dt, device).rates(rounds)
            tile_rates[tile_key(name, tile.head_dim)] = {
                **entry, "tiles": tile.tiles, "rows": tile.rows, "keys": tile.keys, "head_dim": tile.head_dim}
    logger.info("machine: copy %.1f GB/s, matmul %s TFLOP/s, tile GEMM %s", copy, rates, tile_rates)
    return MachineRates(copy, rates, tile_rates)
