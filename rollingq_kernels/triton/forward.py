"""The all-query forward kernel: every query row attends over the valid keys (online softmax).

One program per (query tile, b, h). The loop runs over the runs of valid keys (see
:mod:`.common`): full tiles without masks, one masked tail per run, so padded keys and
values are never read. Query tiles without a valid row only write zeros. The statistics
are not computed here (they would raise every program's register count): the launcher
runs the class-only kernel on the class row for them (``docs/op.md``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LN2_K,
    counter_hash,
    dropout_keep,
    join_float,
    key_run,
    load_query_tile,
    load_rows,
    mma,
    row_dropout_keys,
    tile_mask,
    token_tile,
    valid_tokens,
)
from .configs import ALL_QUERY_KEY, FWD_CONFIGS, autotune, prune_all_query_fwd


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, cols, limit, offs_d, qk_scale, dropout_scale, threshold, row_keys,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """One key tile of the online softmax; ``MASKED`` tiles hold keys ``cols >= limit`` to skip.

    The scale is folded into the exponent (``exp2(s·c − m)``, one FMA per score) with the
    running max kept in scaled units; ``c > 0`` (the launcher flips the sign of q otherwise).
    """
    k = load_rows(k_ptrs, cols, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], acc.dtype), DOT_PREC, EMULATE_BF16)
    if MASKED:
        s = tl.where((cols < limit)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = dropout_keep(row_keys[:, None], counter_hash(cols)[None, :], threshold)
        p = tl.where(keep, p * dropout_scale, 0.0)
    v = load_rows(v_ptrs, cols, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    acc = mma(p.to(v.dtype), v, acc, DOT_PREC, EMULATE_BF16)
    return acc, l_i, m_new


@autotune(FWD_CONFIGS, ALL_QUERY_KEY, prune_all_query_fwd)
@triton.jit(do_not_specialize=["H", "Nq", "N", "seed", "threshold"])
def all_query_fwd_kernel(
    Q, Q0, K, V, Out, Lse, Table, Lengths,
    H, Nq, N, qk_hi, qk_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr, ROTATED: tl.constexpr,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Q ``(B·H, Nq, Dh)``; K, V ``(B·H, N, Dh)`` (contiguous, one dtype); Out like Q; Lse ``(B·H, Nq)`` f32.

    ``ROTATED``: row 0 of each ``(b, h)`` is read from Q0 ``(B·H, Dh)`` (the rotated class rows) instead
    of Q. Table ``(M + 2,)`` int32 and Lengths ``(B, M)`` int64 are read when ``HAS_LENGTHS``.
    ``qk = scale·log2(e) > 0`` and ``drop = 1/(1-p)`` arrive as float32 hi/lo pairs; Lse is stored in
    natural log (padded query rows: 0).
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    NUM_RUNS: tl.constexpr = NUM_MOD if HAS_LENGTHS else 1
    bh, b, rows, row_ok = token_tile(Table, Lengths, H, Nq, NUM_MOD, HAS_LENGTHS, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q_tile = rows[:, None] * HEAD_DIM + offs_d[None, :]  # int32 within one (b, h)
    q_base = bh * Nq * HEAD_DIM
    io_mask = tile_mask(row_ok, offs_d, HEAD_DIM, BLOCK_D)
    if tl.max(row_ok.to(tl.int32), 0) > 0:
        qk_scale = join_float(qk_hi, qk_lo, IS_FP64)
        dropout_scale = join_float(drop_hi, drop_lo, IS_FP64)
        q = load_query_tile(Q + q_base + q_tile, Q0 + bh * HEAD_DIM, rows, offs_d, io_mask, ROTATED)
        row_keys = row_dropout_keys(seed, b, bh % H, rows, DROPOUT)
        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_M], ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        kv_base = bh * N * HEAD_DIM
        for r in tl.static_range(NUM_RUNS):  # unrolled: a runtime loop around the pipelined one costs registers
            k_ptrs, v_ptrs, lo, hi, n_full, full_end = key_run(
                K, V, kv_base, Table, Lengths, b, r, N, offs_n, offs_d, NUM_MOD, HAS_LENGTHS, HEAD_DIM, BLOCK_N)
            for i in range(0, n_full):  # counted from 0: keeps the pipeline's buffer indices uniform
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, k_ptrs, v_ptrs, lo + i * BLOCK_N + offs_n, hi, offs_d, qk_scale, dropout_scale,
                    threshold, row_keys, False, HEAD_DIM, BLOCK_D, DROPOUT, DOT_PREC, EMULATE_BF16,
                )
                k_ptrs += BLOCK_N * HEAD_DIM
                v_ptrs += BLOCK_N * HEAD_DIM
            if full_end < hi:
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, k_ptrs, v_ptrs, full_end + offs_n, hi, offs_d, qk_scale, dropout_scale,
                    threshold, row_keys, True, HEAD_DIM, BLOCK_D, DROPOUT, DOT_PREC, EMULATE_BF16,
                )
        row_ok = valid_tokens(rows, Table, Lengths, b, Nq, NUM_MOD, HAS_LENGTHS)  # recomputed: not live in the loop
        out = tl.where(row_ok[:, None], acc / l_i[:, None], 0.0)
        lse = tl.where(row_ok, (m_i + tl.log2(l_i)) * LN2_K, 0.0)
    else:
        out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lse = tl.zeros([BLOCK_M], tl.float32)
    row_in = rows < Nq
    tl.store(Out + q_base + q_tile, out.to(Out.dtype.element_ty), mask=tile_mask(row_in, offs_d, HEAD_DIM, BLOCK_D))
    tl.store(Lse + bh * Nq + rows, lse.to(tl.float32), mask=row_in)
