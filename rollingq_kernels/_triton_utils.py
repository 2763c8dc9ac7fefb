"""Building blocks shared by the Triton kernels of ``triton_attention.py``.

Device helpers (``@triton.jit``): the counter-based dropout hash of
``docs/op.md`` on ``tl.uint32`` and the segment-membership test. Host helpers:
block-size arithmetic, the segment tables the kernels read, autotune config
pruning and the split-N heuristic of the class-only kernel.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LOG2E_K = tl.constexpr(LOG2E)  # for use inside @triton.jit functions
LN2_K = tl.constexpr(LN2)

# Largest head dimension each mode supports in Triton (register/shared-memory budget).
MAX_HEAD_DIM_ALL_QUERY = 256
MAX_HEAD_DIM_CLASS_ONLY = 1024

SPLITS_ENV = "ROLLINGQ_TRITON_SPLITS"




# ----------------------------------------------------------------------------- device helpers


@triton.jit
def mix32(x):
    """The contract's 32-bit finalizer on ``tl.uint32`` (wrapping multiplies, logical shifts)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def counter_hash(i):
    """``c(i) = mix(i + 0x9e3779b9)`` for an integer tensor ``i`` (non-negative, < 2**31)."""
    return mix32(i.to(tl.uint32) + tl.full([], 0x9E3779B9, tl.uint32))


@triton.jit
def dropout_row_keys(seed, b, h, rows):
    """Per-row key ``r = mix(mix(mix(seed ^ c(b)) ^ c(h)) ^ c(row))``; ``rows`` int32 ``(BLOCK,)`` -> uint32."""
    key_bh = mix32(mix32(seed.to(tl.uint32) ^ counter_hash(b)) ^ counter_hash(h))
    return mix32(key_bh ^ counter_hash(rows))


@triton.jit
def dropout_keep(row_keys, col_hash, threshold):
    """Keep-mask ``(x >> 8) >= threshold`` with ``x = mix(r ^ c(col))``; broadcasting uint32 inputs -> bool."""
    x = mix32(row_keys ^ col_hash)
    return (x >> 8).to(tl.int32) >= threshold


@triton.jit
def segment_membership(idx, seg_start, seg_end):
    """``(S_PAD, BLOCK)`` bool: token ``idx[j]`` is a valid token of segment ``s``.

    Valid means ``seg_start[s] <= idx < seg_end[s]``.
    """
    return (idx[None, :] >= seg_start[:, None]) & (idx[None, :] < seg_end[:, None])


@triton.jit
def mma(a, b, PREC: tl.constexpr, ACC: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``tl.dot(a, b)`` accumulating in ``ACC``.

    ``EMULATE_BF16`` (set only under ``TRITON_INTERPRET`` for bfloat16 inputs) upcasts the operands
    to float32 first: Triton 3.8's interpreter multiplies the raw uint16 bit patterns of bfloat16
    operands. Products of bfloat16 values are exact in float32, so the result is what the GPU computes.
    """
    if EMULATE_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)


# ----------------------------------------------------------------------------- host helpers


def block_dim(head_dim: int) -> int:
    """``BLOCK_D``: the next power of two ``>= head_dim`` (at least 16, the smallest ``tl.dot`` size)."""
    return max(16, triton.next_power_of_2(head_dim))


def segment_pad(num_modalities: int) -> int:
    """``S_PAD``: rows of the segment tables (class + ``M`` modalities), padded for ``tl.dot``."""
    return max(16, triton.next_power_of_2(num_modalities + 1))


def valid_pad(num_modalities: int) -> int:
    """``V_PAD``: the leading table rows that cover every segment (for validity tests; no ``tl.dot``)."""
    return max(2, triton.next_power_of_2(num_modalities + 1))


@functools.lru_cache(maxsize=64)
def _segment_starts_cpu(segments: tuple[int, ...], s_pad: int) -> tuple[list[int], list[int]]:
    n = 1 + sum(segments)
    starts, sizes, o = [0], [1], 1
    for size in segments:
        starts.append(o)
        sizes.append(size)
        o += size
    pad = s_pad - len(starts)
    return starts + [n] * pad, sizes + [0] * pad


def segment_tables(
    segments: Sequence[int], lengths: torch.Tensor | None, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The tables the kernels use to tell valid tokens and their segment.

    Segment ``s`` is the class token for ``s = 0`` and modality ``s - 1`` otherwise;
    rows ``s > M`` are empty padding.

    Returns:
        ``seg_start`` ``(S_PAD,)`` int32: first index of each segment along ``N``;
        ``seg_end`` ``(B, S_PAD)`` int32: one past its last *valid* index (a view with
        batch stride 0 when ``lengths`` is None);
        the batch stride of ``seg_end``.
    """
    s_pad = segment_pad(len(segments))
    starts, sizes = _segment_starts_cpu(tuple(int(s) for s in segments), s_pad)
    seg_start = torch.tensor(starts, dtype=torch.int32, device=device)
    if lengths is None:
        seg_end = seg_start + torch.tensor(sizes, dtype=torch.int32, device=device)
        return seg_start, seg_end.unsqueeze(0), 0
    m = len(segments)
    valid = torch.zeros(batch, s_pad, dtype=torch.int32, device=device)
    valid[:, 0] = 1
    # clamp to [0, L_m]: out-of-range lengths (unchecked under torch.compile) never read another segment's keys
    caps = torch.tensor(sizes[1 : m + 1], dtype=torch.int32, device=device)
    valid[:, 1 : m + 1] = torch.minimum(lengths.to(torch.int32).clamp_min(0), caps)
    seg_end = (seg_start.unsqueeze(0) + valid).contiguous()
    return seg_start, seg_end, s_pad




def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32-accurate ``tf32x3`` for float32, exact ``ieee`` otherwise."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 132 off CUDA, for the split heuristic)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def class_only_splits(bh: int, n_keys: int, device: torch.device, min_keys_per_split: int = 64) -> int:
    """How many programs share one class-query row in the class-only forward.

    Enough splits that ``B·H·splits`` fills about two waves of the GPU, but at
    least ``min_keys_per_split`` keys per split. ``ROLLINGQ_TRITON_SPLITS`` (an
    int >= 1) overrides the heuristic (tests use it to force the split path).
    """
    forced = os.environ.get(SPLITS_ENV)
    if forced:
        try:
            value = int(forced)
        except ValueError as exc:
            raise ValueError(f"{SPLITS_ENV}: expected an int >= 1, got {forced!r}") from exc
        if value < 1:
            raise ValueError(f"{SPLITS_ENV}: expected an int >= 1, got {forced!r}")
        return min(value, n_keys)
    target = triton.cdiv(2 * num_sms(device), bh)
    most = max(1, triton.cdiv(n_keys, min_keys_per_split))
    return max(1, min(target, most))
