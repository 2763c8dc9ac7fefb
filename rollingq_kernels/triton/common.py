"""Device helpers (``@triton.jit``) every Triton kernel of the op shares.

* the program prologue: which tile of which ``(b, h)`` a program owns;
* the token layout: segments, runs of valid tokens and validity of a block of indices,
  read from the segment table and the ``lengths`` tensor (see :mod:`.tables`);
* the counter-based dropout hash of ``docs/op.md`` on ``tl.uint32``;
* ``tl.dot`` with the interpreter's bfloat16 work-around, and host floats split into
  float32 halves for float64 kernels.

Layout vocabulary used by every kernel:

* **segment** ``s`` (``0 <= s <= M``): ``0`` is the class token ``[0, 1)``, ``s >= 1`` is
  modality ``s - 1`` at ``[T[s], T[s + 1])`` with ``T`` the segment table; its valid
  tokens are ``[T[s], valid_end)``, ``valid_end = T[s] + clamp(lengths[b, s - 1], 0, L)``.
* **run** ``r`` (``0 <= r < M``): the valid tokens of modality ``r`` as one contiguous
  range, the class token merged into run 0 (``[0, valid_end(1))``); without lengths
  there is one run ``[0, N)``. Kernels loop over runs, so padded tokens are never read.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LOG2E_K = tl.constexpr(LOG2E)  # for use inside @triton.jit functions
LN2_K = tl.constexpr(LN2)


# ----------------------------------------------------------------------------- program prologue


@triton.jit
def program_tile(NUM_TILES):
    """``(tile, bh)`` of this program: grids are 1-d with the tile index fastest; ``bh`` is int64."""
    pid = tl.program_id(0)
    return pid % NUM_TILES, (pid // NUM_TILES).to(tl.int64)


@triton.jit
def join_float(hi, lo, IS_FP64: tl.constexpr):
    """A host float passed as float32 ``hi + lo``: ``hi + lo`` in float64 kernels, ``hi`` otherwise.

    Both halves are float32-exact, so promoting them through ``one`` is exact whether they arrive
    as float32 scalars (compiled) or Python floats (interpreter).
    """
    if IS_FP64:
        one = tl.full([], 1.0, tl.float64)
        return one * hi + one * lo
    else:
        return hi + tl.zeros([], tl.float32)


# ----------------------------------------------------------------------------- token layout


@triton.jit
def segment_bounds(Table, Lengths, b, s, NUM_MOD: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Segment ``s`` of sample ``b``: ``(start, valid_end, end)`` int32 scalars.

    ``lengths[b, s - 1]`` is clamped to ``[0, L]``, so an out-of-range length (not checked on
    CUDA, see ``docs/op.md``) never reaches another segment's tokens.
    """
    start = tl.load(Table + s)
    end = tl.load(Table + s + 1)
    if HAS_LENGTHS:
        n = tl.load(Lengths + b * NUM_MOD + (s - 1), mask=s > 0, other=1)
        n = tl.minimum(tl.maximum(n, 0), (end - start).to(n.dtype)).to(tl.int32)
        valid_end = start + n
    else:
        valid_end = end
    return start, valid_end, end


@triton.jit
def run_bounds(Table, Lengths, b, r, N, NUM_MOD: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Run ``r`` of valid tokens ``[start, end)`` (int32 scalars); see the module docstring."""
    if HAS_LENGTHS:
        start, end, _ = segment_bounds(Table, Lengths, b, r + 1, NUM_MOD, HAS_LENGTHS)
        start = tl.where(r == 0, 0, start)
    else:
        start = tl.zeros([], tl.int32)
        end = N + tl.zeros([], tl.int32)
    return start, end


@triton.jit
def valid_tokens(idx, Table, Lengths, b, N, NUM_MOD: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """``(BLOCK,)`` bool: index ``idx`` is a valid token (inside a run, below ``N``)."""
    ok = idx < N
    if HAS_LENGTHS:
        in_run = idx < 0
        for r in tl.static_range(NUM_MOD):
            start, end = run_bounds(Table, Lengths, b, r, N, NUM_MOD, HAS_LENGTHS)
            in_run = in_run | ((idx >= start) & (idx < end))
        ok = ok & in_run
    return ok


@triton.jit
def token_tile(Table, Lengths, H, n, NUM_MOD: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile of ``BLOCK`` token indices among the ``n`` of its ``(b, h)``: ``(bh, b, idx, idx_ok)``.

    The grid is :func:`program_tile`'s with ``cdiv(n, BLOCK)`` tiles; ``bh``, ``b`` int64; ``idx`` int32
    ``(BLOCK,)``; ``idx_ok`` its valid tokens (:func:`valid_tokens`).
    """
    tile, bh = program_tile(tl.cdiv(n, BLOCK))
    b = bh // H
    idx = tile * BLOCK + tl.arange(0, BLOCK)
    return bh, b, idx, valid_tokens(idx, Table, Lengths, b, n, NUM_MOD, HAS_LENGTHS)


@triton.jit
def key_run(K, V, kv_base, Table, Lengths, b, r, N, offs_n, offs_d, NUM_MOD: tl.constexpr,
            HAS_LENGTHS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Run ``r`` of valid keys for a loop over its key tiles: ``(k_ptrs, v_ptrs, lo, hi, n_full, full_end)``.

    ``k_ptrs``, ``v_ptrs`` ``(BLOCK_N, BLOCK_D)`` point at the run's first tile (``kv_base`` is the
    ``(b, h)`` slice's offset); the run ``[lo, hi)`` holds ``n_full`` full tiles up to ``full_end``, then
    a masked tail when ``full_end < hi``.
    """
    lo, hi = run_bounds(Table, Lengths, b, r, N, NUM_MOD, HAS_LENGTHS)
    kv_off = (lo + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    n_full = (hi - lo) // BLOCK_N
    return K + kv_base + kv_off, V + kv_base + kv_off, lo, hi, n_full, lo + n_full * BLOCK_N


# ----------------------------------------------------------------------------- tiles


@triton.jit
def tile_mask(idx_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(BLOCK, BLOCK_D)`` mask of rows ``idx_ok`` and the real head dimension (free when ``Dh == BLOCK_D``)."""
    if HEAD_DIM == BLOCK_D:
        return idx_ok[:, None]  # broadcast over the head dimension
    else:
        return idx_ok[:, None] & (offs_d[None, :] < HEAD_DIM)


@triton.jit
def load_rows(ptrs, idx, limit, offs_d, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A ``(BLOCK, BLOCK_D)`` tile of rows; ``MASKED``: rows ``idx >= limit`` read as 0 (never loaded).

    Unmasked tiles of a power-of-two head dimension load without any mask (the fast path).
    """
    if MASKED:
        return tl.load(ptrs, mask=tile_mask(idx < limit, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    elif HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def load_query_tile(q_ptrs, q0_ptr, rows, offs_d, mask, ROTATED: tl.constexpr):
    """The query tile at ``q_ptrs`` (``mask``ed rows read as 0); ``ROTATED``: row 0 from ``q0_ptr + offs_d``.

    ``q0_ptr`` points at this ``(b, h)``'s rotated class row. Selecting pointers keeps q one plain load
    (a shared-memory wgmma operand); q itself is never copied.
    """
    if ROTATED:
        q_ptrs = tl.where(rows[:, None] == 0, q0_ptr + offs_d[None, :], q_ptrs)
    return tl.load(q_ptrs, mask=mask, other=0.0)


# ----------------------------------------------------------------------------- dropout hash


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
def row_dropout_keys(seed, b, h, rows, DROPOUT: tl.constexpr):
    """:func:`dropout_row_keys` of ``rows`` (int32) of head ``(b, h)`` when ``DROPOUT``; otherwise unused."""
    if DROPOUT:
        return dropout_row_keys(seed, b.to(tl.int32), h.to(tl.int32), rows)
    else:
        return rows.to(tl.uint32)  # unused


@triton.jit
def dropout_keep(row_keys, col_hash, threshold):
    """Keep-mask ``(x >> 8) >= threshold`` with ``x = mix(r ^ c(col))``; broadcasting uint32 inputs -> bool."""
    x = mix32(row_keys ^ col_hash)
    return (x >> 8).to(tl.int32) >= threshold


# ----------------------------------------------------------------------------- tile matmul


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``acc + a @ b`` (``acc`` gives the accumulation dtype).

    ``EMULATE_BF16`` (set only under ``TRITON_INTERPRET`` for bfloat16 inputs) upcasts the operands
    to float32 first: Triton 3.8's interpreter multiplies the raw uint16 bit patterns of bfloat16
    operands. Products of bfloat16 values are exact in float32, so the result is what the GPU computes.
    """
    if EMULATE_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype)
