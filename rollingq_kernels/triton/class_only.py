"""Class-only kernels: the class row attends over the keys (``q`` is ``(B, H, 1, Dh)``).

* :func:`class_only_fwd_kernel` — ``N`` is split into ``SPLITS`` chunks when ``B·H`` alone cannot
  fill the GPU; each program loops over the segments inside its chunk (valid tokens only) and
  writes partials: ``(max, denominator)``, the weighted value sum, the per-segment probability
  sums at its max and, per modality, the sum of its valid keys. ``WITH_V=False`` skips the values:
  the all-query launcher uses that variant for the statistics of the class row.
* :func:`class_only_combine_kernel` — one program per ``(b, h)`` merges the splits in split order
  (deterministic) into ``out``, ``lse`` and the statistics.
* :func:`class_only_bwd_kernel` — one program per (chunk, b, h) writes the ``dk``/``dv`` rows of its
  keys (zeros for padded keys) and its share of ``dq``; the launcher sums the shares in a fixed order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LN2_K,
    LOG2E_K,
    counter_hash,
    dropout_keep,
    join_float,
    load_rows,
    program_tile,
    row_dropout_keys,
    segment_bounds,
    tile_mask,
)
from .configs import CLASS_ONLY_BWD_KEY, CLASS_ONLY_CONFIGS, CLASS_ONLY_KEY, autotune, prune_class_only


@triton.jit
def _class_row_prologue(Q0, H, N, CHUNK, SPLITS, seed, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr):
    """What a class-only program owns: ``(split, bh, b, q, row_key, chunk_lo, chunk_hi, offs_d, offs_n)``.

    ``q`` is the class row ``(BLOCK_D,)`` in ``ACC``; ``row_key`` its dropout key (row 0);
    the program's keys are ``[chunk_lo, chunk_hi)``.
    """
    split, bh = program_tile(SPLITS)
    b = bh // H
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q0 + bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(ACC)
    row_key = row_dropout_keys(seed, b, bh % H, tl.zeros([1], tl.int32), DROPOUT)
    chunk_lo = split * CHUNK
    chunk_hi = tl.minimum(chunk_lo + CHUNK, N)
    return split, bh, b, q, row_key, chunk_lo, chunk_hi, offs_d, offs_n


@triton.jit
def _class_fwd_tile(
    acc, l_i, m_i, seg_sum, key_sum, q, k_ptrs, v_ptrs, cols, limit, offs_d, is_seg, qk_scale, dropout_scale,
    threshold, row_key, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    STATS: tl.constexpr, WITH_V: tl.constexpr, DROPOUT: tl.constexpr,
):
    """One key tile of the class row's online softmax (scores in scaled log2 units, ``c > 0``)."""
    k = load_rows(k_ptrs, cols, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D).to(acc.dtype)
    s = tl.sum(q[None, :] * k, axis=1)
    if MASKED:
        s = tl.where(cols < limit, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new)
    alpha = tl.exp2(m_i - m_new)
    p_sum = tl.sum(p, 0)
    l_i = l_i * alpha + p_sum
    if STATS:
        seg_sum = seg_sum * alpha + tl.where(is_seg, p_sum, 0.0)
        key_sum += tl.sum(k, axis=0)
    if WITH_V:
        if DROPOUT:
            keep = dropout_keep(row_key, counter_hash(cols), threshold)
            p = tl.where(keep, p * dropout_scale, 0.0)
        v = load_rows(v_ptrs, cols, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D).to(acc.dtype)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
    return acc, l_i, m_new, seg_sum, key_sum


@autotune(CLASS_ONLY_CONFIGS, CLASS_ONLY_KEY, prune_class_only)
@triton.jit(do_not_specialize=["H", "N", "CHUNK", "SPLITS", "seed", "threshold"])
def class_only_fwd_kernel(
    Q0, K, V, PartML, PartAcc, PartSeg, PartKey, Table, Lengths,
    H, N, CHUNK, SPLITS, qk_hi, qk_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, STATS: tl.constexpr, WITH_V: tl.constexpr, DROPOUT: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Keys ``[split·CHUNK, (split+1)·CHUNK) ∩ [0, N)`` of one class row.

    Q0 ``(B·H, Dh)`` rotated class rows; K, V ``(B·H, N, Dh)``; Table ``(M + 2,)`` int32; Lengths
    ``(B, M)`` int64 (read when ``HAS_LENGTHS``). Partials (compute dtype): PartML ``(B·H, SPLITS, 2)``
    (running max in scaled log2 units, denominator); PartAcc ``(B·H, SPLITS, Dh)`` when ``WITH_V``;
    PartSeg ``(B·H, SPLITS, S_PAD)`` (per-segment probability sums at that max) and PartKey
    ``(B·H, SPLITS, M, Dh)`` (sums of valid keys per modality) when ``STATS``.
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    split, bh, b, q, row_key, chunk_lo, chunk_hi, offs_d, offs_n = _class_row_prologue(
        Q0, H, N, CHUNK, SPLITS, seed, HEAD_DIM, BLOCK_D, BLOCK_N, DROPOUT, ACC)
    qk_scale = join_float(qk_hi, qk_lo, IS_FP64)
    dropout_scale = join_float(drop_hi, drop_lo, IS_FP64)
    s_idx = tl.arange(0, S_PAD)
    m_i = tl.full([], float("-inf"), ACC)
    l_i = tl.zeros([], ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    seg_sum = tl.zeros([S_PAD], ACC)
    part = bh * SPLITS + split
    kv_base = bh * N * HEAD_DIM
    for seg in range(0, NUM_MOD + 1):
        start, valid_end, _ = segment_bounds(Table, Lengths, b, seg, NUM_MOD, HAS_LENGTHS)
        lo = tl.maximum(start, chunk_lo)
        hi = tl.minimum(valid_end, chunk_hi)
        is_seg = s_idx == seg
        key_sum = tl.zeros([BLOCK_D], ACC)
        kv_off = (lo + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
        k_ptrs = K + kv_base + kv_off
        v_ptrs = V + kv_base + kv_off
        n_full = tl.maximum(hi - lo, 0) // BLOCK_N
        full_end = lo + n_full * BLOCK_N
        for i in range(0, n_full):
            acc, l_i, m_i, seg_sum, key_sum = _class_fwd_tile(
                acc, l_i, m_i, seg_sum, key_sum, q, k_ptrs, v_ptrs, lo + i * BLOCK_N + offs_n, hi, offs_d, is_seg,
                qk_scale, dropout_scale, threshold, row_key, False, HEAD_DIM, BLOCK_D, STATS, WITH_V, DROPOUT,
            )
            k_ptrs += BLOCK_N * HEAD_DIM
            v_ptrs += BLOCK_N * HEAD_DIM
        if full_end < hi:
            acc, l_i, m_i, seg_sum, key_sum = _class_fwd_tile(
                acc, l_i, m_i, seg_sum, key_sum, q, k_ptrs, v_ptrs, full_end + offs_n, hi, offs_d, is_seg,
                qk_scale, dropout_scale, threshold, row_key, True, HEAD_DIM, BLOCK_D, STATS, WITH_V, DROPOUT,
            )
        if STATS:
            if seg > 0:
                tl.store(PartKey + (part * NUM_MOD + seg - 1) * HEAD_DIM + offs_d, key_sum, mask=offs_d < HEAD_DIM)
    two = tl.arange(0, 2)
    tl.store(PartML + part * 2 + two, tl.where(two == 0, m_i, l_i))
    if WITH_V:
        tl.store(PartAcc + part * HEAD_DIM + offs_d, acc, mask=offs_d < HEAD_DIM)
    if STATS:
        tl.store(PartSeg + part * S_PAD + s_idx, seg_sum)


@triton.jit(do_not_specialize=["H", "SPLITS"])
def class_only_combine_kernel(
    PartML, PartAcc, PartSeg, PartKey, Out, Lse, Table, Lengths, KeyMean, Mass, ScoreMax,
    H, SPLITS,
    NUM_MOD: tl.constexpr, S_PAD: tl.constexpr, M_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr, STATS: tl.constexpr, WITH_V: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """Merge the splits of one ``(b, h)`` in split order (deterministic).

    Writes Out ``(B·H, Dh)`` and Lse ``(B·H,)`` when ``WITH_V``; when ``STATS`` the kernel statistics of
    ``rollingq_kernels.stats.STATISTICS`` but ``query`` (the launcher's), in the table's order: KeyMean
    ``(B·H, M, Dh)``, Mass ``(B·H, M+1)`` and ScoreMax ``(B·H,)`` (float32; the class row's largest scaled
    score in natural units).
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    offs_d = tl.arange(0, BLOCK_D)
    s_idx = tl.arange(0, S_PAD)
    m_idx = tl.arange(0, M_PAD)
    d_ok = offs_d < HEAD_DIM
    key_mask = (m_idx[:, None] < NUM_MOD) & d_ok[None, :]
    m = tl.full([], float("-inf"), ACC)
    for i in range(0, SPLITS):
        m = tl.maximum(m, tl.load(PartML + (bh * SPLITS + i) * 2))
    l_sum = tl.zeros([], ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    seg_sum = tl.zeros([S_PAD], ACC)
    key_sum = tl.zeros([M_PAD, BLOCK_D], ACC)
    for i in range(0, SPLITS):
        part = bh * SPLITS + i
        w = tl.exp2(tl.load(PartML + part * 2) - m)
        l_sum += w * tl.load(PartML + part * 2 + 1)
        if WITH_V:
            acc += w * tl.load(PartAcc + part * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        if STATS:
            seg_sum += w * tl.load(PartSeg + part * S_PAD + s_idx)
            key_sum += tl.load(PartKey + (part * NUM_MOD + m_idx[:, None]) * HEAD_DIM + offs_d[None, :],
                               mask=key_mask, other=0.0)
    if WITH_V:
        tl.store(Out + bh * HEAD_DIM + offs_d, (acc / l_sum).to(Out.dtype.element_ty), mask=d_ok)
        tl.store(Lse + bh, ((m + tl.log2(l_sum)) * LN2_K).to(tl.float32))
    if STATS:
        tl.store(Mass + bh * (NUM_MOD + 1) + s_idx, (seg_sum / l_sum).to(tl.float32), mask=s_idx <= NUM_MOD)
        tl.store(ScoreMax + bh, (m * LN2_K).to(tl.float32))  # the max is kept in scaled log2 units
        count = tl.zeros([M_PAD], tl.int32)
        for mod in tl.static_range(NUM_MOD):
            start, valid_end, _ = segment_bounds(Table, Lengths, b, mod + 1, NUM_MOD, HAS_LENGTHS)
            count = tl.where(m_idx == mod, valid_end - start, count)
        key_mean = key_sum / tl.maximum(count, 1).to(ACC)[:, None]
        tl.store(KeyMean + (bh * NUM_MOD + m_idx[:, None]) * HEAD_DIM + offs_d[None, :], key_mean.to(tl.float32),
                 mask=key_mask)


@autotune(CLASS_ONLY_CONFIGS, CLASS_ONLY_BWD_KEY, prune_class_only)
@triton.jit(do_not_specialize=["H", "N", "CHUNK", "SPLITS", "seed", "threshold"])
def class_only_bwd_kernel(
    Q0, K, V, Out, DO, Lse, DK, DV, DQPart, Table, Lengths,
    H, N, CHUNK, SPLITS, qk_hi, qk_lo, sc_hi, sc_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward for keys ``[split·CHUNK, (split+1)·CHUNK) ∩ [0, N)`` of one class row.

    Q0, Out, DO ``(B·H, Dh)``; K, V, DK, DV ``(B·H, N, Dh)``; Lse ``(B·H,)``. Writes the dK, dV rows of
    the chunk (exact zeros for padded keys, which are never read) and DQPart ``(B·H, SPLITS, Dh)``
    (compute dtype): the chunk's share of ``dq`` before the scale.
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    split, bh, b, q, row_key, chunk_lo, chunk_hi, offs_d, offs_n = _class_row_prologue(
        Q0, H, N, CHUNK, SPLITS, seed, HEAD_DIM, BLOCK_D, BLOCK_N, DROPOUT, ACC)
    qk_scale = join_float(qk_hi, qk_lo, IS_FP64)
    scale = join_float(sc_hi, sc_lo, IS_FP64)
    dropout_scale = join_float(drop_hi, drop_lo, IS_FP64)
    d_ok = offs_d < HEAD_DIM
    do = tl.load(DO + bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(ACC)
    o = tl.load(Out + bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(ACC)
    delta = tl.sum(o * do, axis=0)
    lse2 = tl.load(Lse + bh).to(ACC) * LOG2E_K
    kv_base = bh * N * HEAD_DIM
    dq = tl.zeros([BLOCK_D], ACC)
    for seg in range(0, NUM_MOD + 1):
        start, valid_end, end = segment_bounds(Table, Lengths, b, seg, NUM_MOD, HAS_LENGTHS)
        lo = tl.maximum(start, chunk_lo)
        hi = tl.minimum(valid_end, chunk_hi)
        kv_off = (lo + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
        n_full = tl.maximum(hi - lo, 0) // BLOCK_N
        full_end = lo + n_full * BLOCK_N
        for i in range(0, n_full):
            dq = _class_bwd_tile(dq, q, do, delta, lse2, K + kv_base + kv_off, V + kv_base + kv_off,
                                 DK + kv_base + kv_off, DV + kv_base + kv_off, lo + i * BLOCK_N + offs_n, hi, offs_d,
                                 qk_scale, scale, dropout_scale, threshold, row_key,
                                 False, HEAD_DIM, BLOCK_D, DROPOUT)
            kv_off += BLOCK_N * HEAD_DIM
        if full_end < hi:
            dq = _class_bwd_tile(dq, q, do, delta, lse2, K + kv_base + kv_off, V + kv_base + kv_off,
                                 DK + kv_base + kv_off, DV + kv_base + kv_off, full_end + offs_n, hi, offs_d,
                                 qk_scale, scale, dropout_scale, threshold, row_key,
                                 True, HEAD_DIM, BLOCK_D, DROPOUT)
        if HAS_LENGTHS:  # padded keys of this segment inside the chunk: zero gradients, nothing read
            pad_lo = tl.maximum(valid_end, chunk_lo)
            pad_hi = tl.minimum(end, chunk_hi)
            zero = tl.zeros([BLOCK_N, BLOCK_D], DK.dtype.element_ty)
            for start_n in range(pad_lo, pad_hi, BLOCK_N):
                cols = start_n + offs_n
                off = kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
                z_mask = (cols < pad_hi)[:, None] & d_ok[None, :]
                tl.store(DK + off, zero, mask=z_mask)
                tl.store(DV + off, zero, mask=z_mask)
    tl.store(DQPart + (bh * SPLITS + split) * HEAD_DIM + offs_d, dq, mask=d_ok)


@triton.jit
def _class_bwd_tile(
    dq, q, do, delta, lse2, k_ptrs, v_ptrs, dk_ptrs, dv_ptrs, cols, limit, offs_d, qk_scale, scale,
    dropout_scale, threshold, row_key, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """One key tile of the class-only backward: writes its dK, dV rows, returns ``dq`` plus its share."""
    k = load_rows(k_ptrs, cols, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D).to(dq.dtype)
    v = load_rows(v_ptrs, cols, limit, offs_d, MASKED, HEAD_DIM, BLOCK_D).to(dq.dtype)
    s = tl.sum(q[None, :] * k, axis=1)
    p = tl.exp2(s * qk_scale - lse2)
    if MASKED:
        p = tl.where(cols < limit, p, 0.0)
    dp = tl.sum(do[None, :] * v, axis=1)
    if DROPOUT:
        keep = dropout_keep(row_key, counter_hash(cols), threshold)
        p_d = tl.where(keep, p * dropout_scale, 0.0)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    else:
        p_d = p
    ds = p * (dp - delta)
    if MASKED:
        st_mask = tile_mask(cols < limit, offs_d, HEAD_DIM, BLOCK_D)
    elif HEAD_DIM == BLOCK_D:
        st_mask = None
    else:
        st_mask = (offs_d < HEAD_DIM)[None, :]
    tl.store(dv_ptrs, (p_d[:, None] * do[None, :]).to(dv_ptrs.dtype.element_ty), mask=st_mask)
    tl.store(dk_ptrs, (ds[:, None] * q[None, :] * scale).to(dk_ptrs.dtype.element_ty), mask=st_mask)
    return dq + tl.sum(ds[:, None] * k, axis=0)
