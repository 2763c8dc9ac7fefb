"""The all-query backward kernels (FlashAttention-2 style, deterministic: no atomics).

* :func:`all_query_delta_kernel` — ``delta = rowsum(dO·O)`` per query row;
* :func:`all_query_dkdv_kernel` — one program per key tile, looping over the runs of valid
  query rows: ``dV = Σ P_dᵀ dO``, ``dK = scale · Σ dSᵀ Q``;
* :func:`all_query_dq_kernel` — one program per query tile, looping over the runs of valid keys:
  ``dQ = scale · Σ dS K``.

Padded rows and keys are never read: tiles without a valid token only write zeros, full tiles
inside a run are loaded without masks, tails are masked. Row 0 of each ``(b, h)`` is the rotated
class row, read from Q0 when ``ROTATED`` (q itself is never copied).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LOG2E_K,
    counter_hash,
    dropout_keep,
    dropout_row_keys,
    join_float,
    key_run,
    load_query_tile,
    load_rows,
    mma,
    row_dropout_keys,
    run_bounds,
    tile_mask,
    token_tile,
)
from .configs import ALL_QUERY_KEY, DKDV_CONFIGS, DQ_CONFIGS, autotune, prune_all_query_dkdv, prune_all_query_dq


@triton.jit(do_not_specialize=["H", "Nq"])
def all_query_delta_kernel(Out, DO, Delta, Table, Lengths, H, Nq, NUM_MOD: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr, IS_FP64: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """``Delta[bh, i] = Σ_d dO·O`` in the compute dtype; Out, DO ``(B·H, Nq, Dh)``, Delta ``(B·H, Nq)``.

    Padded rows are not read (their delta is 0).
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    bh, _, rows, row_ok = token_tile(Table, Lengths, H, Nq, NUM_MOD, HAS_LENGTHS, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    off = bh * Nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(Out + off, mask=mask, other=0.0).to(ACC)
    do = tl.load(DO + off, mask=mask, other=0.0).to(ACC)
    tl.store(Delta + bh * Nq + rows, tl.sum(o * do, axis=1), mask=rows < Nq)


@triton.jit
def _load_vec(ptr, idx, limit, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=idx < limit, other=0.0)
    else:
        return tl.load(ptr)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, rows, limit, offs_d, col_hash, qk_scale, dropout_scale,
    seed, b, h, threshold, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """One query tile's contribution to a key tile's ``dk`` (unscaled) and ``dv``.

    Masked rows (``rows >= limit``) read as zero q, dO, lse and delta: their ``p`` is 1 and their
    ``dS`` and ``P·dO`` are 0, so they add nothing.
    """
    q = load_rows(q_ptrs, rows, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    do = load_rows(do_ptrs, rows, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    lse2 = _load_vec(lse_ptr, rows, limit, MASKED).to(dk.dtype) * LOG2E_K
    delta = _load_vec(delta_ptr, rows, limit, MASKED).to(dk.dtype)
    s_t = mma(k, tl.trans(q), tl.zeros([k.shape[0], q.shape[0]], dk.dtype), DOT_PREC, EMULATE_BF16)
    p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
    dp_t = mma(v, tl.trans(do), tl.zeros([k.shape[0], q.shape[0]], dk.dtype), DOT_PREC, EMULATE_BF16)
    if DROPOUT:
        row_keys = dropout_row_keys(seed, b, h, rows)
        keep_t = dropout_keep(row_keys[None, :], col_hash[:, None], threshold)
        pd_t = tl.where(keep_t, p_t * dropout_scale, 0.0)
        dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
    else:
        pd_t = p_t
    dv = mma(pd_t.to(do.dtype), do, dv, DOT_PREC, EMULATE_BF16)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = mma(ds_t.to(q.dtype), q, dk, DOT_PREC, EMULATE_BF16)
    return dk, dv


@autotune(DKDV_CONFIGS, ALL_QUERY_KEY, prune_all_query_dkdv)
@triton.jit(do_not_specialize=["H", "Nq", "N", "seed", "threshold"])
def all_query_dkdv_kernel(
    Q, Q0, K, V, DO, Lse, Delta, DK, DV, Table, Lengths,
    H, Nq, N, qk_hi, qk_lo, sc_hi, sc_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr, ROTATED: tl.constexpr,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key tile. Q, DO ``(B·H, Nq, Dh)``; K, V, DK, DV ``(B·H, N, Dh)``; Lse, Delta ``(B·H, Nq)``.

    Padded keys get exact zeros (their rows are never read).
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    NUM_RUNS: tl.constexpr = NUM_MOD if HAS_LENGTHS else 1
    bh, b, cols, col_ok = token_tile(Table, Lengths, H, N, NUM_MOD, HAS_LENGTHS, BLOCK_N)
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    kv_off = bh * N * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = tile_mask(col_ok, offs_d, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    if tl.max(col_ok.to(tl.int32), 0) > 0:
        qk_scale = join_float(qk_hi, qk_lo, IS_FP64)
        dropout_scale = join_float(drop_hi, drop_lo, IS_FP64)
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        if DROPOUT:
            col_hash = counter_hash(cols)
        else:
            col_hash = cols.to(tl.uint32)  # unused
        q_base = bh * Nq * HEAD_DIM
        row_base = bh * Nq
        b32 = b.to(tl.int32)
        h32 = h.to(tl.int32)
        for r in tl.static_range(NUM_RUNS):
            lo, hi = run_bounds(Table, Lengths, b, r, Nq, NUM_MOD, HAS_LENGTHS)
            if ROTATED and r == 0:  # the tile holding the class row reads row 0 from Q0
                rows = offs_m
                q_off = q_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
                q_ptrs = tl.where(rows[:, None] == 0, Q0 + bh * HEAD_DIM + offs_d[None, :], Q + q_off)
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, q_ptrs, DO + q_off, Lse + row_base + rows, Delta + row_base + rows,
                    rows, hi, offs_d, col_hash, qk_scale, dropout_scale, seed, b32, h32, threshold,
                    True, HEAD_DIM, BLOCK_D, DROPOUT, DOT_PREC, EMULATE_BF16,
                )
                lo = tl.minimum(BLOCK_M, hi)
            q_off = q_base + (lo + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
            q_ptrs = Q + q_off
            do_ptrs = DO + q_off
            lse_ptr = Lse + row_base + lo + offs_m
            delta_ptr = Delta + row_base + lo + offs_m
            n_full = (hi - lo) // BLOCK_M
            full_end = lo + n_full * BLOCK_M
            for i in range(0, n_full):  # counted from 0: keeps the pipeline's buffer indices uniform
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, lo + i * BLOCK_M + offs_m, hi, offs_d,
                    col_hash, qk_scale, dropout_scale, seed, b32, h32, threshold,
                    False, HEAD_DIM, BLOCK_D, DROPOUT, DOT_PREC, EMULATE_BF16,
                )
                q_ptrs += BLOCK_M * HEAD_DIM
                do_ptrs += BLOCK_M * HEAD_DIM
                lse_ptr += BLOCK_M
                delta_ptr += BLOCK_M
            if full_end < hi:
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, full_end + offs_m, hi, offs_d,
                    col_hash, qk_scale, dropout_scale, seed, b32, h32, threshold,
                    True, HEAD_DIM, BLOCK_D, DROPOUT, DOT_PREC, EMULATE_BF16,
                )
        scale = join_float(sc_hi, sc_lo, IS_FP64)
        dk = tl.where(col_ok[:, None], dk * scale, 0.0)
        dv = tl.where(col_ok[:, None], dv, 0.0)
    st_mask = tile_mask(cols < N, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, cols, limit, offs_d, row_keys, qk_scale, dropout_scale, threshold,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """One key tile's contribution to a query tile's ``dq`` (unscaled); masked keys add nothing."""
    k = load_rows(k_ptrs, cols, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    v = load_rows(v_ptrs, cols, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    s = mma(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dq.dtype), DOT_PREC, EMULATE_BF16)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where((cols < limit)[None, :], p, 0.0)
    dp = mma(do, tl.trans(v), tl.zeros([q.shape[0], k.shape[0]], dq.dtype), DOT_PREC, EMULATE_BF16)
    if DROPOUT:
        keep = dropout_keep(row_keys[:, None], counter_hash(cols)[None, :], threshold)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return mma(ds.to(k.dtype), k, dq, DOT_PREC, EMULATE_BF16)


@autotune(DQ_CONFIGS, ALL_QUERY_KEY, prune_all_query_dq)
@triton.jit(do_not_specialize=["H", "Nq", "N", "seed", "threshold"])
def all_query_dq_kernel(
    Q, Q0, K, V, DO, Lse, Delta, DQ, Table, Lengths,
    H, Nq, N, qk_hi, qk_lo, sc_hi, sc_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr, ROTATED: tl.constexpr,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of the rotated q for one query tile; DQ ``(B·H, Nq, Dh)`` in the input dtype (padded rows: 0)."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    NUM_RUNS: tl.constexpr = NUM_MOD if HAS_LENGTHS else 1
    bh, b, rows, row_ok = token_tile(Table, Lengths, H, Nq, NUM_MOD, HAS_LENGTHS, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q_off = bh * Nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    io_mask = tile_mask(row_ok, offs_d, HEAD_DIM, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    if tl.max(row_ok.to(tl.int32), 0) > 0:
        qk_scale = join_float(qk_hi, qk_lo, IS_FP64)
        dropout_scale = join_float(drop_hi, drop_lo, IS_FP64)
        q = load_query_tile(Q + q_off, Q0 + bh * HEAD_DIM, rows, offs_d, io_mask, ROTATED)
        do = tl.load(DO + q_off, mask=io_mask, other=0.0)
        lse2 = tl.load(Lse + bh * Nq + rows, mask=row_ok, other=0.0).to(ACC) * LOG2E_K
        delta = tl.load(Delta + bh * Nq + rows, mask=row_ok, other=0.0).to(ACC)
        row_keys = row_dropout_keys(seed, b, bh % H, rows, DROPOUT)
        kv_base = bh * N * HEAD_DIM
        for r in tl.static_range(NUM_RUNS):
            k_ptrs, v_ptrs, lo, hi, n_full, full_end = key_run(
                K, V, kv_base, Table, Lengths, b, r, N, offs_n, offs_d, NUM_MOD, HAS_LENGTHS, HEAD_DIM, BLOCK_N)
            for i in range(0, n_full):  # counted from 0: keeps the pipeline's buffer indices uniform
                dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, lo + i * BLOCK_N + offs_n, hi, offs_d, row_keys,
                              qk_scale, dropout_scale, threshold, False, HEAD_DIM, BLOCK_D, DROPOUT, DOT_PREC,
                              EMULATE_BF16)
                k_ptrs += BLOCK_N * HEAD_DIM
                v_ptrs += BLOCK_N * HEAD_DIM
            if full_end < hi:
                dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, full_end + offs_n, hi, offs_d, row_keys,
                              qk_scale, dropout_scale, threshold, True, HEAD_DIM, BLOCK_D, DROPOUT, DOT_PREC,
                              EMULATE_BF16)
        scale = join_float(sc_hi, sc_lo, IS_FP64)
        dq = tl.where(row_ok[:, None], dq * scale, 0.0)
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=tile_mask(rows < Nq, offs_d, HEAD_DIM, BLOCK_D))
