"""The suite's arithmetic: FLOP and byte counts of the op, derived rates and ratios.

Pure functions of shapes and times (no torch), tested by ``tests/test_bench_arithmetic.py``.

Conventions (stated in ``benchmarks/README.md``):

* FLOPs: the two matrix products of attention, ``4 · B · H · Nq · N · Dh`` for
  the forward (``Nq = N`` all-query, ``Nq = 1`` class-only: the work a
  class-only layer actually needs), ``2.5×`` that for the backward, ``3.5×``
  for forward+backward. Softmax, masking, rotation and statistics are not counted.
* Bytes: each input read once, each output written once (the minimum traffic).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

PASSES = ("fwd", "bwd", "fwd_bwd")
BACKWARD_FLOP_FACTOR = 2.5


@dataclass(frozen=True)
class OpDims:
    """The sizes that determine the op's work.

    Attributes:
        batch, heads, n_keys, head_dim: ``B, H, N, Dh`` of ``k`` and ``v``.
        n_queries: ``Nq``: ``N`` (all-query) or ``1`` (class-only).
        num_modalities: ``M``.
        itemsize: bytes per element of ``q, k, v`` (4 fp32, 2 bf16/fp16).
    """

    batch: int
    heads: int
    n_keys: int
    head_dim: int
    n_queries: int
    num_modalities: int
    itemsize: int

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "n_keys", "head_dim", "n_queries", "num_modalities", "itemsize"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"OpDims.{name}: expected a positive int, got {value!r}")
        if self.n_queries not in (1, self.n_keys):
            raise ValueError(f"OpDims.n_queries: expected 1 or n_keys={self.n_keys}, got {self.n_queries}")


def _check_pass(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"pass_: expected one of {PASSES}, got {pass_!r}")


def attention_flops(dims: OpDims, pass_: str) -> int:
    """FLOPs of one call: ``4·B·H·Nq·N·Dh`` forward, ×2.5 backward, ×3.5 both."""
    _check_pass(pass_)
    fwd = 4 * dims.batch * dims.heads * dims.n_queries * dims.n_keys * dims.head_dim
    if pass_ == "fwd":
        return fwd
    bwd = int(BACKWARD_FLOP_FACTOR * fwd)
    return bwd if pass_ == "bwd" else fwd + bwd


def stats_output_bytes(dims: OpDims) -> int:
    """Bytes of the statistics the kernels write: ``key_mean``, ``mass``, ``query`` (float32)."""
    b, h, m, d = dims.batch, dims.heads, dims.num_modalities, dims.head_dim
    return 4 * (b * h * m * d + b * h * (m + 1) + b * h * d)


def attention_bytes(dims: OpDims, pass_: str, *, stats: bool, rotation: bool = True, lengths: bool = True) -> int:
    """Bytes moved by one call when each input is read once and each output written once.

    Forward reads ``q, k, v`` (+ the float32 ``(H·Dh)²`` rotation, the int64
    ``(B, M)`` lengths) and writes ``out``, the float32 ``lse`` ``(B, H, Nq)``
    and, with ``stats``, the statistics. Backward reads ``grad_out, q, k, v,
    out, lse`` (+ rotation, lengths) and writes ``dq, dk, dv``. Forward+backward
    is the sum of both.
    """
    _check_pass(pass_)
    e = dims.itemsize
    q = dims.batch * dims.heads * dims.n_queries * dims.head_dim * e
    kv = dims.batch * dims.heads * dims.n_keys * dims.head_dim * e
    lse = dims.batch * dims.heads * dims.n_queries * 4
    extras = (4 * (dims.heads * dims.head_dim) ** 2 if rotation else 0) + (
        8 * dims.batch * dims.num_modalities if lengths else 0
    )
    fwd = q + 2 * kv + extras + q + lse + (stats_output_bytes(dims) if stats else 0)
    bwd = q + q + 2 * kv + q + lse + extras + q + 2 * kv  # grad_out, q, k, v, out, lse, extras; dq, dk, dv
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[pass_]


def rate(amount: float, seconds: float) -> float:
    """``amount / seconds``; NaN when ``seconds`` is not positive and finite."""
    if not (seconds > 0 and math.isfinite(seconds)):
        return math.nan
    return amount / seconds


def tflops(flops: int, seconds: float) -> float:
    """TFLOP/s (1e12 FLOP per second)."""
    return rate(flops, seconds) / 1e12


def gbps(nbytes: int, seconds: float) -> float:
    """GB/s (1e9 bytes per second)."""
    return rate(nbytes, seconds) / 1e9


def fraction(achieved: float, peak: float | None) -> float:
    """``achieved / peak`` (NaN when ``peak`` is missing or not positive)."""
    if peak is None or not (peak > 0):
        return math.nan
    return achieved / peak


def speedup(t_other: float, t_fused: float) -> float:
    """How many times faster ``fused`` is than ``other``: ``t_other / t_fused`` (>1: fused faster)."""
    if not (t_fused > 0 and t_other > 0):
        return math.nan
    return t_other / t_fused


def median_seconds(samples: Sequence[float]) -> float:
    """Median of timing samples in seconds; raises on an empty list."""
    if len(samples) == 0:
        raise ValueError("samples: expected at least one timing sample, got none")
    return float(statistics.median(samples))


def copy_bandwidth_gbps(nbytes: int, seconds: float) -> float:
    """GB/s of a ``dst.copy_(src)`` of ``nbytes`` bytes: it reads and writes them (``2·nbytes``)."""
    return gbps(2 * nbytes, seconds)


def matmul_tflops(n: int, seconds: float) -> float:
    """TFLOP/s of an ``n×n @ n×n`` product (``2·n³`` FLOPs)."""
    return tflops(2 * n**3, seconds)


#: the most calls one side of a gate pair is timed with (their median counts)
PAIR_MAX_CALLS = 15
#: the shortest a side of a gate pair should last: a side of ms calls is timed several times, so one
#: preemption on a shared machine (several ms) cannot decide a pair alone
PAIR_MIN_SIDE_S = 0.03


def pair_call_counts(probe_seconds: list[float], most: int = PAIR_MAX_CALLS,
                     min_side_s: float = PAIR_MIN_SIDE_S) -> list[int]:
    """Calls per pair for each side of a gate, from one probe call of each: a side ``k`` times faster than
    the slowest is timed ``round(k)`` times, so each side lasts about as long, and every side at least
    ``ceil(min_side_s / t)`` times (at least 1, at most ``most``)."""
    longest = max(probe_seconds)
    counts = []
    for t in probe_seconds:
        t = max(t, 1e-9)
        counts.append(min(most, max(1, round(longest / t), math.ceil(min_side_s / t))))
    return counts
