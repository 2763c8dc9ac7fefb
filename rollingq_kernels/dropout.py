"""The counter-based dropout mask shared by every backend (see ``docs/op.md``).

The mask is a pure function of ``(seed, b, h, query row, key col)``. This module
computes it with int64 tensor arithmetic that reproduces wrapping unsigned 32-bit
operations exactly, so the reference, the C++ kernels and the Triton kernels
agree bit for bit.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
GOLDEN = 0x9E3779B9
SEED_LIMIT = 2**31


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer finalizer ``mix`` of the contract, on int64 tensors."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    x = x ^ (x >> 16)
    return x


def counter_hash(i: torch.Tensor) -> torch.Tensor:
    """``c(i) = mix(i + golden)``: decorrelates a small counter."""
    return mix32((i + GOLDEN) & MASK32)


def dropout_threshold(dropout_p: float) -> int:
    """Integer threshold: an element is kept iff ``(x >> 8) >= threshold``."""
    return int(round(float(dropout_p) * 2**24))


def dropout_mask(
    seed: int,
    batch: int,
    heads: int,
    rows: int,
    n_keys: int,
    dropout_p: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Keep-mask of the contract.

    Args:
        seed: int in ``[0, 2**31)``.
        batch, heads: ``B`` and ``H``.
        rows: number of query rows ``Nq`` (row indices ``0 … Nq−1``; a
            class-query-only call uses ``rows=1``, which equals row 0 of the all-query mask).
        n_keys: ``N``.
        dropout_p: drop probability in ``[0, 1)``.

    Returns:
        bool tensor ``(B, H, rows, N)``, True where the probability is kept.
    """
    if not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed: expected an int in [0, 2**31), got {seed!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ar = lambda n: torch.arange(n, dtype=torch.int64, device=dev)  # noqa: E731
    cb = counter_hash(ar(batch)).view(batch, 1, 1)
    ch = counter_hash(ar(heads)).view(1, heads, 1)
    cr = counter_hash(ar(rows)).view(1, 1, rows)
    r = mix32(mix32(mix32(seed ^ cb) ^ ch) ^ cr)  # (B, H, rows)
    cc = counter_hash(ar(n_keys)).view(1, 1, 1, n_keys)
    x = mix32(r.unsqueeze(-1) ^ cc)
    return (x >> 8) >= dropout_threshold(dropout_p)
