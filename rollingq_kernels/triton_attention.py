"""Triton kernels of the op (``docs/op.md``): forward and backward on GPU, statistics for free.

Kernels (all deterministic, no atomics):

* ``_fwd_kernel`` — all-query forward: one program per (query block, b, h); online
  softmax in base 2 (``scale·log2(e)`` folded into the scores). The program that owns
  query row 0 also accumulates the class row's statistics inside the same loop over
  K tiles: per-segment probability sums rescaled with the running max (like the
  softmax denominator) and per-modality valid-key sums; normalized in the epilogue.
* ``_decode_fwd_kernel`` + ``_decode_combine_kernel`` — class-only forward
  (decode style): ``N`` is split across programs when ``B·H`` alone cannot fill the
  GPU; each split writes partial ``(m, l, acc, segment sums, key sums)`` and one
  program per (b, h) combines them in a fixed order.
* ``_bwd_preprocess_kernel`` (``delta = rowsum(dO·O)``), ``_bwd_dkdv_kernel`` (one
  program per key block, loop over query blocks) and ``_bwd_dq_kernel`` (one
  program per query block, loop over key blocks) — all-query backward.
* ``_decode_bwd_kernel`` — class-only backward: one program per (key block, b, h)
  writes ``dk``/``dv`` rows and a partial ``dq``; partials are summed in a fixed order.

Dropout is regenerated from the seed with the contract's hash. The rotation of the
class query (a tiny matmul) and its chain rule run as torch ops in the launchers.
Importing this module registers :func:`attention_fwd` / :func:`attention_bwd` as
the CUDA kernels of ``rollingq::attention_fwd`` / ``rollingq::attention_bwd``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import _library  # noqa: F401  (defines the op schemas when the C++ extension is absent)
from ._library import triton_interpret
from ._triton_utils import (
    LN2_K,
    LOG2E,
    LOG2E_K,
    MAX_HEAD_DIM_ALL_QUERY,
    MAX_HEAD_DIM_CLASS_ONLY,
    block_dim,
    class_only_splits,
    counter_hash,
    dot_precision,
    dropout_keep,
    dropout_row_keys,
    mma,
    segment_membership,
    segment_pad,
    segment_tables,
    valid_pad,
)
from .class_query import rotate_class_query, rotation_chain_rule
from .dropout import dropout_threshold

logger = logging.getLogger("rollingq_kernels")

SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SMEM_BUDGET = 200 * 1024  # bytes of shared memory a config may plan for (H100: 227 KiB)

# ----------------------------------------------------------------------------- autotune configs


def _configs(candidates: Sequence[tuple[int, int, int, int]], interpret_config: dict[str, int]) -> list[triton.Config]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` candidates on GPU; one small config under the interpreter.

    The candidate lists are short on purpose: every distinct combination of dtype and constexpr
    flags compiles each candidate once, and autotuning in the interpreter would be far too slow.
    """
    if triton_interpret():
        return [triton.Config(dict(interpret_config), num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in candidates]


def _smallest(configs: list[triton.Config]) -> list[triton.Config]:
    return [min(configs, key=lambda c: (c.kwargs.get("BLOCK_M", 1) * c.kwargs["BLOCK_N"], c.num_stages))]


def _smem_element_size(q: torch.Tensor) -> float:
    """Shared-memory bytes per tile element: float32 tiles count 1.5x (3xTF32 keeps split operands)."""
    return 6.0 if q.dtype == torch.float32 else float(q.element_size())


def _fits_problem(cfg: triton.Config, n_q: int, n_k: int) -> bool:
    return (cfg.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(n_q))
            and cfg.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n_k)))


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop forward configs whose blocks exceed the problem or overflow registers / shared memory.

    Per program: shared memory for the resident Q tile and ``num_stages`` pipelined K and V tiles;
    registers for the accumulator tile and the score and probability tiles (compute dtype).
    """
    n_q, n_k, block_d = named_args["Nq"], named_args["N"], kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    esize = _smem_element_size(named_args["Q"])
    acc_words = 2 if esize == 8 else 1
    kept = []
    for cfg in configs:
        bm, bn, threads = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], 32 * cfg.num_warps
        smem = (bm * block_d + cfg.num_stages * 2 * bn * block_d) * esize
        regs = (bm * block_d + 2 * bm * bn) * acc_words // threads
        if _fits_problem(cfg, n_q, n_k) and smem <= _SMEM_BUDGET and regs <= 192:
            kept.append(cfg)
    return kept or _smallest(configs)


def _prune_bwd(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop backward configs that exceed the problem or overflow registers / shared memory.

    One estimate covers both backward kernels (dK/dV: two accumulator tiles over the key block and
    pipelined Q/dO tiles; dQ: one accumulator and pipelined K/V tiles): the worst of the two.
    """
    n_q, n_k, block_d = named_args["Nq"], named_args["N"], kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    esize = _smem_element_size(named_args["Q"])
    acc_words = 2 if esize == 8 else 1
    kept = []
    for cfg in configs:
        bm, bn, threads = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], 32 * cfg.num_warps
        big = max(bm, bn)
        smem = (2 * big * block_d + cfg.num_stages * 2 * big * block_d) * esize
        regs = (2 * big * block_d + 2 * bm * bn) * acc_words // threads
        if _fits_problem(cfg, n_q, n_k) and smem <= _SMEM_BUDGET and regs <= 192:
            kept.append(cfg)
    return kept or _smallest(configs)


def _prune_decode(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Class-only configs: the key tile ``BLOCK_N × BLOCK_D`` must fit registers, ``BLOCK_N`` the split."""
    chunk, block_d = named_args["CHUNK"], kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(chunk))
        and c.kwargs["BLOCK_N"] * block_d <= 64 * 32 * c.num_warps
    ]
    return kept or _smallest(configs)


_FWD_CONFIGS = _configs(
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 4),
     (128, 32, 4, 4), (32, 32, 4, 2)],
    {"BLOCK_M": 16, "BLOCK_N": 16},
)
_BWD_CONFIGS = _configs(
    [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 3), (32, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2),
     (32, 32, 4, 2)],
    {"BLOCK_M": 16, "BLOCK_N": 16},
)
_DECODE_CONFIGS = (
    [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)] if triton_interpret() else [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=2) for bn in (16, 32, 64, 128) for w in (4, 8)
    ]
)
_AUTOTUNE_KEY = ["Nq", "N", "HEAD_DIM", "NUM_MOD"]


# ----------------------------------------------------------------------------- forward, all-query


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, seg_sum, key_sum, q, k_base, v_base, offs_d, d_ok, N, HEAD_DIM, qk_scale, dropout_scale,
    threshold, row_keys, valid_start, valid_end, seg_start, seg_end,
    HAS_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr, WITH_STATS: tl.constexpr, IS_FP64: tl.constexpr,
    DOT_PREC: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The loop over K/V tiles of one query block: online softmax in base 2.

    ``WITH_STATS`` (only the program owning query row 0) also accumulates, for local row 0, the
    per-segment probability sums ``seg_sum`` ``(S_PAD,)`` at the running max and the valid-key
    sums ``key_sum`` ``(S_PAD, BLOCK_D)``. The plain variant keeps the hot loop free of it.
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    local = tl.arange(0, BLOCK_M)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_in = cols < N
        kv_off = cols.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = col_in[:, None] & d_ok[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), DOT_PREC, ACC, EMULATE_BF16) * qk_scale
        if HAS_LENGTHS:
            s = tl.where(_is_valid(cols, valid_start, valid_end)[None, :], s, float("-inf"))
        else:
            s = tl.where(col_in[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            keep = dropout_keep(row_keys[:, None], counter_hash(cols)[None, :], threshold)
            p_d = tl.where(keep, p * dropout_scale, 0.0)
        else:
            p_d = p
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + mma(p_d.to(v.dtype), v, DOT_PREC, ACC, EMULATE_BF16)
        if WITH_STATS:
            member = segment_membership(cols, seg_start, seg_end)
            alpha0 = tl.sum(tl.where(local == 0, alpha, 0.0), axis=0)
            p0 = tl.sum(tl.where(local[:, None] == 0, p, 0.0), axis=0)
            seg_sum = seg_sum * alpha0 + tl.sum(tl.where(member, p0[None, :], 0.0), axis=1)
            key_sum += mma(member.to(tl.float32).to(k.dtype), k, "ieee", ACC, EMULATE_BF16)
        m_i = m_new
    return acc, l_i, m_i, seg_sum, key_sum


@triton.jit
def _is_valid(idx, valid_start, valid_end):
    """``(BLOCK,)`` bool: token ``idx`` is valid (inside the valid prefix of its segment)."""
    return tl.max(segment_membership(idx, valid_start, valid_end).to(tl.int32), axis=0) > 0


@triton.jit
def _join(hi, lo, ACC: tl.constexpr):
    """A host float passed as float32 ``hi + lo`` (exact enough for float64 kernels).

    Both halves are float32-exact, so promoting them through ``one`` is exact whether they arrive
    as float32 scalars (compiled) or Python floats (interpreter).
    """
    one = tl.full([], 1.0, ACC)
    return one * hi + one * lo


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(
    Q, K, V, Out, Lse, KeyMean, Mass, SegStart, SegEnd,
    stride_seg_b, H, Nq, N, HEAD_DIM, qk_hi, qk_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, S_PAD: tl.constexpr, V_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, STATS: tl.constexpr, DROPOUT: tl.constexpr,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Q ``(B·H, Nq, Dh)``; K, V ``(B·H, N, Dh)`` (contiguous, one dtype); Out like Q; Lse ``(B·H, Nq)`` f32.

    KeyMean ``(B·H, M, Dh)`` f32 and Mass ``(B·H, M+1)`` f32 are written by the program owning row 0
    when ``STATS``. ``qk = scale·log2(e)`` and ``drop = 1/(1-p)`` arrive as float32 hi/lo pairs;
    Lse is stored in natural log. SegStart ``(S_PAD,)`` / SegEnd ``(B, S_PAD)`` int32: segment tables
    (class, modalities, empty padding), their first ``V_PAD`` entries cover every segment.
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = (pid // num_m).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale = _join(qk_hi, qk_lo, ACC)
    dropout_scale = _join(drop_hi, drop_lo, ACC)

    k_base = K + pid_bh * N * HEAD_DIM
    v_base = V + pid_bh * N * HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_in = rows < Nq
    q_off = pid_bh * Nq * HEAD_DIM + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_in[:, None] & d_ok[None, :], other=0.0)

    v_idx = tl.arange(0, V_PAD)
    valid_start = tl.load(SegStart + v_idx)
    valid_end = tl.load(SegEnd + b * stride_seg_b + v_idx)
    if DROPOUT:
        row_keys = dropout_row_keys(seed, b.to(tl.int32), h.to(tl.int32), rows)
    else:
        row_keys = rows.to(tl.uint32)  # unused

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    seg_sum = tl.zeros([S_PAD], ACC)
    key_sum = tl.zeros([S_PAD, BLOCK_D], ACC)
    s_idx = tl.arange(0, S_PAD)
    seg_start = tl.load(SegStart + s_idx)
    seg_end = tl.load(SegEnd + b * stride_seg_b + s_idx)
    if STATS:
        if pid_m == 0:
            acc, l_i, m_i, seg_sum, key_sum = _fwd_inner(
                acc, l_i, m_i, seg_sum, key_sum, q, k_base, v_base, offs_d, d_ok, N, HEAD_DIM, qk_scale,
                dropout_scale, threshold, row_keys, valid_start, valid_end, seg_start, seg_end,
                HAS_LENGTHS, DROPOUT, True, IS_FP64, DOT_PREC, EMULATE_BF16, BLOCK_M, BLOCK_N,
            )
        else:
            acc, l_i, m_i, seg_sum, key_sum = _fwd_inner(
                acc, l_i, m_i, seg_sum, key_sum, q, k_base, v_base, offs_d, d_ok, N, HEAD_DIM, qk_scale,
                dropout_scale, threshold, row_keys, valid_start, valid_end, seg_start, seg_end,
                HAS_LENGTHS, DROPOUT, False, IS_FP64, DOT_PREC, EMULATE_BF16, BLOCK_M, BLOCK_N,
            )
    else:
        acc, l_i, m_i, seg_sum, key_sum = _fwd_inner(
            acc, l_i, m_i, seg_sum, key_sum, q, k_base, v_base, offs_d, d_ok, N, HEAD_DIM, qk_scale,
            dropout_scale, threshold, row_keys, valid_start, valid_end, seg_start, seg_end,
            HAS_LENGTHS, DROPOUT, False, IS_FP64, DOT_PREC, EMULATE_BF16, BLOCK_M, BLOCK_N,
        )

    out = acc / l_i[:, None]
    if HAS_LENGTHS:
        out = tl.where(_is_valid(rows, valid_start, valid_end)[:, None], out, 0.0)
    tl.store(Out + q_off, out.to(Out.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * LN2_K
    tl.store(Lse + pid_bh * Nq + rows, lse.to(tl.float32), mask=row_in)

    if STATS:
        if pid_m == 0:
            l0 = tl.sum(tl.where(tl.arange(0, BLOCK_M) == 0, l_i, 0.0), axis=0)
            _store_stats(KeyMean, Mass, pid_bh, seg_sum / l0, key_sum, seg_start, seg_end,
                         HEAD_DIM, NUM_MOD, S_PAD, BLOCK_D)


@triton.jit
def _store_stats(KeyMean, Mass, pid_bh, mass, key_sum, seg_start, seg_end,
                 HEAD_DIM, NUM_MOD: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write ``mass`` ``(S_PAD,)`` rows ``0..M`` and ``key_sum / count`` rows ``1..M`` as ``key_mean`` (f32)."""
    s_idx = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(Mass + pid_bh * (NUM_MOD + 1) + s_idx, mass.to(tl.float32), mask=s_idx <= NUM_MOD)
    count = tl.maximum(seg_end - seg_start, 1).to(key_sum.dtype)
    key_mean = key_sum / count[:, None]
    ptrs = KeyMean + pid_bh * NUM_MOD * HEAD_DIM + (s_idx[:, None] - 1) * HEAD_DIM + offs_d[None, :]
    mask = (s_idx[:, None] >= 1) & (s_idx[:, None] <= NUM_MOD) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, key_mean.to(tl.float32), mask=mask)


# ----------------------------------------------------------------------------- forward, class-only


@triton.autotune(configs=_DECODE_CONFIGS, key=["N", "CHUNK", "HEAD_DIM", "NUM_MOD"],
                 prune_configs_by={"early_config_prune": _prune_decode})
@triton.jit(do_not_specialize=["seed"])
def _decode_fwd_kernel(
    Q, K, V, PartML, PartAcc, PartSeg, PartKey, SegStart, SegEnd,
    stride_seg_b, H, N, CHUNK, SPLITS, HEAD_DIM, qk_hi, qk_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, S_PAD: tl.constexpr, V_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, STATS: tl.constexpr, DROPOUT: tl.constexpr, IS_FP64: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One split of the class row: keys ``[split·CHUNK, (split+1)·CHUNK) ∩ [0, N)``.

    Q ``(B·H, Dh)`` (rotated class rows); K, V ``(B·H, N, Dh)``. Writes partials (compute dtype):
    PartML ``(B·H, SPLITS, 2)`` = (running max in base 2, denominator), PartAcc ``(B·H, SPLITS, Dh)``,
    and when ``STATS`` PartSeg ``(B·H, SPLITS, S_PAD)`` (segment probability sums at that max) and
    PartKey ``(B·H, SPLITS, S_PAD, Dh)`` (valid-key sums).
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0)
    split = pid % SPLITS
    pid_bh = (pid // SPLITS).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale = _join(qk_hi, qk_lo, ACC)
    dropout_scale = _join(drop_hi, drop_lo, ACC)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + pid_bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(ACC)
    k_base = K + pid_bh * N * HEAD_DIM
    v_base = V + pid_bh * N * HEAD_DIM
    s_idx = tl.arange(0, S_PAD)
    seg_start = tl.load(SegStart + s_idx)
    seg_end = tl.load(SegEnd + b * stride_seg_b + s_idx)
    v_idx = tl.arange(0, V_PAD)
    valid_start = tl.load(SegStart + v_idx)
    valid_end = tl.load(SegEnd + b * stride_seg_b + v_idx)
    if DROPOUT:
        row_key = dropout_row_keys(seed, b.to(tl.int32), h.to(tl.int32), tl.zeros([1], tl.int32))

    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    m_i = tl.full([1], float("-inf"), ACC)
    l_i = tl.zeros([1], ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    seg_sum = tl.zeros([S_PAD], ACC)
    key_sum = tl.zeros([S_PAD, BLOCK_D], ACC)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_in = cols < hi
        kv_off = cols.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = col_in[:, None] & d_ok[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        s = tl.sum(q[None, :] * k.to(ACC), axis=1) * qk_scale
        if HAS_LENGTHS:
            col_ok = col_in & _is_valid(cols, valid_start, valid_end)  # col_in: the split's own keys only
        else:
            col_ok = col_in
        s = tl.where(col_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no valid key
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        if DROPOUT:
            keep = dropout_keep(row_key, counter_hash(cols), threshold)
            p_d = tl.where(keep, p * dropout_scale, 0.0)
        else:
            p_d = p
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p_d[:, None] * v.to(ACC), axis=0)
        if STATS:
            member = segment_membership(cols, seg_start, seg_end) & col_in[None, :]
            seg_sum = seg_sum * alpha + tl.sum(tl.where(member, p[None, :], 0.0), axis=1)
            key_sum += mma(member.to(tl.float32).to(k.dtype), k, "ieee", ACC, EMULATE_BF16)
        m_i = m_new

    part = pid_bh * SPLITS + split
    two = tl.arange(0, 2)
    tl.store(PartML + part * 2 + two, tl.where(two == 0, m_i, l_i))
    tl.store(PartAcc + part * HEAD_DIM + offs_d, acc, mask=d_ok)
    if STATS:
        tl.store(PartSeg + part * S_PAD + s_idx, seg_sum)
        tl.store(PartKey + part * S_PAD * HEAD_DIM + s_idx[:, None] * HEAD_DIM + offs_d[None, :], key_sum,
                 mask=d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    PartML, PartAcc, PartSeg, PartKey, Out, Lse, KeyMean, Mass, SegStart, SegEnd,
    stride_seg_b, H, SPLITS, HEAD_DIM,
    NUM_MOD: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr, STATS: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """Combine the splits of one (b, h) in split order (deterministic); Out ``(B·H, Dh)``, Lse ``(B·H,)``."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    s_idx = tl.arange(0, S_PAD)
    m = tl.full([1], float("-inf"), ACC)
    for i in range(0, SPLITS):
        m = tl.maximum(m, tl.load(PartML + (pid_bh * SPLITS + i) * 2 + tl.zeros([1], tl.int32)))
    l_sum = tl.zeros([1], ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    seg_sum = tl.zeros([S_PAD], ACC)
    key_sum = tl.zeros([S_PAD, BLOCK_D], ACC)
    for i in range(0, SPLITS):
        part = pid_bh * SPLITS + i
        w = tl.exp2(tl.load(PartML + part * 2 + tl.zeros([1], tl.int32)) - m)
        l_sum += w * tl.load(PartML + part * 2 + 1 + tl.zeros([1], tl.int32))
        acc += w * tl.load(PartAcc + part * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        if STATS:
            seg_sum += w * tl.load(PartSeg + part * S_PAD + s_idx)
            key_sum += tl.load(PartKey + part * S_PAD * HEAD_DIM + s_idx[:, None] * HEAD_DIM + offs_d[None, :],
                               mask=d_ok[None, :], other=0.0)
    tl.store(Out + pid_bh * HEAD_DIM + offs_d, (acc / l_sum).to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + pid_bh + tl.zeros([1], tl.int32), ((m + tl.log2(l_sum)) * LN2_K).to(tl.float32))
    if STATS:
        seg_start = tl.load(SegStart + s_idx)
        seg_end = tl.load(SegEnd + b * stride_seg_b + s_idx)
        _store_stats(KeyMean, Mass, pid_bh, seg_sum / l_sum, key_sum, seg_start, seg_end,
                     HEAD_DIM, NUM_MOD, S_PAD, BLOCK_D)


# ----------------------------------------------------------------------------- backward, all-query


@triton.jit
def _bwd_preprocess_kernel(Out, DO, Delta, Nq, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           IS_FP64: tl.constexpr):
    """``Delta[bh, i] = sum_d dO·O`` in the compute dtype; Out, DO ``(B·H, Nq, Dh)``, Delta ``(B·H, Nq)``."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    pid_bh = (pid // num_m).to(tl.int64)
    rows = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    off = pid_bh * Nq * HEAD_DIM + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(Out + off, mask=mask, other=0.0).to(ACC)
    do = tl.load(DO + off, mask=mask, other=0.0).to(ACC)
    tl.store(Delta + pid_bh * Nq + rows, tl.sum(o * do, axis=1), mask=rows < Nq)


@triton.autotune(configs=_BWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit(do_not_specialize=["seed"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, SegStart, SegEnd,
    stride_seg_b, H, Nq, N, HEAD_DIM, qk_hi, qk_lo, sc_hi, sc_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, S_PAD: tl.constexpr, V_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr, IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for one key block; loops over query blocks. Q, DO ``(B·H, Nq, Dh)``; K, V, DK, DV ``(B·H, N, Dh)``.

    Padded query rows contribute nothing (their dO is masked to 0 and their delta is 0).
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    pid_bh = (pid // num_n).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale = _join(qk_hi, qk_lo, ACC)
    scale = _join(sc_hi, sc_lo, ACC)
    dropout_scale = _join(drop_hi, drop_lo, ACC)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_in = cols < N
    kv_off = pid_bh * N * HEAD_DIM + cols.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = col_in[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    v_idx = tl.arange(0, V_PAD)
    valid_start = tl.load(SegStart + v_idx)
    valid_end = tl.load(SegEnd + b * stride_seg_b + v_idx)
    if HAS_LENGTHS:
        col_ok = _is_valid(cols, valid_start, valid_end)
    else:
        col_ok = col_in
    if DROPOUT:
        col_hash = counter_hash(cols)

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    q_base = Q + pid_bh * Nq * HEAD_DIM
    do_base = DO + pid_bh * Nq * HEAD_DIM
    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_in = rows < Nq
        if HAS_LENGTHS:
            row_ok = row_in & (_is_valid(rows, valid_start, valid_end))
        else:
            row_ok = row_in
        q_off = rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_base + q_off, mask=row_in[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = tl.load(Lse + pid_bh * Nq + rows, mask=row_in, other=0.0).to(ACC) * LOG2E_K
        delta = tl.load(Delta + pid_bh * Nq + rows, mask=row_ok, other=0.0)
        s_t = mma(k, tl.trans(q), DOT_PREC, ACC, EMULATE_BF16) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse2[None, :])
        p_t = tl.where(col_ok[:, None] & row_ok[None, :], p_t, 0.0)
        dp_t = mma(v, tl.trans(do), DOT_PREC, ACC, EMULATE_BF16)
        if DROPOUT:
            row_keys = dropout_row_keys(seed, b.to(tl.int32), h.to(tl.int32), rows)
            keep_t = dropout_keep(row_keys[None, :], col_hash[:, None], threshold)
            pd_t = tl.where(keep_t, p_t * dropout_scale, 0.0)
            dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
        else:
            pd_t = p_t
        dv += mma(pd_t.to(do.dtype), do, DOT_PREC, ACC, EMULATE_BF16)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += mma(ds_t.to(q.dtype), q, DOT_PREC, ACC, EMULATE_BF16)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_BWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit(do_not_specialize=["seed"])
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, SegStart, SegEnd,
    stride_seg_b, H, Nq, N, HEAD_DIM, qk_hi, qk_lo, sc_hi, sc_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, S_PAD: tl.constexpr, V_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr, IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ (of the rotated q) for one query block; loops over key blocks. DQ ``(B·H, Nq, Dh)`` in the input dtype."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = (pid // num_m).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale = _join(qk_hi, qk_lo, ACC)
    scale = _join(sc_hi, sc_lo, ACC)
    dropout_scale = _join(drop_hi, drop_lo, ACC)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_in = rows < Nq
    v_idx = tl.arange(0, V_PAD)
    valid_start = tl.load(SegStart + v_idx)
    valid_end = tl.load(SegEnd + b * stride_seg_b + v_idx)
    if HAS_LENGTHS:
        row_ok = row_in & (_is_valid(rows, valid_start, valid_end))
    else:
        row_ok = row_in
    q_off = pid_bh * Nq * HEAD_DIM + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_in[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse2 = tl.load(Lse + pid_bh * Nq + rows, mask=row_in, other=0.0).to(ACC) * LOG2E_K
    delta = tl.load(Delta + pid_bh * Nq + rows, mask=row_ok, other=0.0)
    if DROPOUT:
        row_keys = dropout_row_keys(seed, b.to(tl.int32), h.to(tl.int32), rows)

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    k_base = K + pid_bh * N * HEAD_DIM
    v_base = V + pid_bh * N * HEAD_DIM
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_in = cols < N
        kv_off = cols.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = col_in[:, None] & d_ok[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        if HAS_LENGTHS:
            col_ok = _is_valid(cols, valid_start, valid_end)
        else:
            col_ok = col_in
        s = mma(q, tl.trans(k), DOT_PREC, ACC, EMULATE_BF16) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(col_ok[None, :] & row_ok[:, None], p, 0.0)
        dp = mma(do, tl.trans(v), DOT_PREC, ACC, EMULATE_BF16)
        if DROPOUT:
            keep = dropout_keep(row_keys[:, None], counter_hash(cols)[None, :], threshold)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(k.dtype), k, DOT_PREC, ACC, EMULATE_BF16)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- backward, class-only


@triton.autotune(configs=_DECODE_CONFIGS, key=["N", "CHUNK", "HEAD_DIM", "NUM_MOD"],
                 prune_configs_by={"early_config_prune": _prune_decode})
@triton.jit(do_not_specialize=["seed"])
def _decode_bwd_kernel(
    Q, K, V, Out, DO, Lse, DK, DV, DQPart, SegStart, SegEnd,
    stride_seg_b, H, N, CHUNK, HEAD_DIM, qk_hi, qk_lo, sc_hi, sc_lo, drop_hi, drop_lo, seed, threshold,
    NUM_MOD: tl.constexpr, S_PAD: tl.constexpr, V_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr, IS_FP64: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Class-only backward for keys ``[blk·CHUNK, (blk+1)·CHUNK)`` of one (b, h).

    Q, Out, DO ``(B·H, Dh)``; K, V, DK, DV ``(B·H, N, Dh)``; Lse ``(B·H,)``. Writes dK, dV rows and
    DQPart ``(B·H, num_blocks, Dh)`` (compute dtype), the block's share of dQ (before the scale).
    """
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    num_blk = tl.cdiv(N, CHUNK)
    pid = tl.program_id(0)
    blk = pid % num_blk
    pid_bh = (pid // num_blk).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale = _join(qk_hi, qk_lo, ACC)
    scale = _join(sc_hi, sc_lo, ACC)
    dropout_scale = _join(drop_hi, drop_lo, ACC)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + pid_bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(ACC)
    o = tl.load(Out + pid_bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(ACC)
    do = tl.load(DO + pid_bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(ACC)
    delta = tl.sum(o * do, axis=0)
    lse2 = tl.load(Lse + pid_bh).to(ACC) * LOG2E_K
    v_idx = tl.arange(0, V_PAD)
    valid_start = tl.load(SegStart + v_idx)
    valid_end = tl.load(SegEnd + b * stride_seg_b + v_idx)
    if DROPOUT:
        row_key = dropout_row_keys(seed, b.to(tl.int32), h.to(tl.int32), tl.zeros([1], tl.int32))

    dq = tl.zeros([BLOCK_D], ACC)
    lo = blk * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_in = cols < hi
        kv_off = pid_bh * N * HEAD_DIM + cols.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = col_in[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(ACC)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(ACC)
        if HAS_LENGTHS:
            col_ok = col_in & (_is_valid(cols, valid_start, valid_end))
        else:
            col_ok = col_in
        s = tl.sum(q[None, :] * k, axis=1) * qk_scale
        p = tl.where(col_ok, tl.exp2(s - lse2), 0.0)
        dp = tl.sum(do[None, :] * v, axis=1)
        if DROPOUT:
            keep = dropout_keep(row_key, counter_hash(cols), threshold)
            p_d = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            p_d = p
        ds = p * (dp - delta)
        tl.store(DV + kv_off, (p_d[:, None] * do[None, :]).to(DV.dtype.element_ty), mask=kv_mask)
        tl.store(DK + kv_off, (ds[:, None] * q[None, :] * scale).to(DK.dtype.element_ty), mask=kv_mask)
        dq += tl.sum(ds[:, None] * k, axis=0)
    tl.store(DQPart + (pid_bh * num_blk + blk) * HEAD_DIM + offs_d, dq, mask=d_ok)


# ----------------------------------------------------------------------------- launchers


def _check_head_dim(head_dim: int, class_only: bool) -> None:
    limit = MAX_HEAD_DIM_CLASS_ONLY if class_only else MAX_HEAD_DIM_ALL_QUERY
    if head_dim > limit:
        mode = "class-only" if class_only else "all-query"
        raise ValueError(
            f"q: backend='triton' supports head dim Dh <= {limit} in {mode} mode, got Dh = {head_dim}; "
            "use backend='cpp' or backend='reference', which support any Dh"
        )


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[int],
                   lengths: torch.Tensor | None) -> None:
    """Cheap re-checks (no device sync) of what the kernels rely on."""
    if q.dtype not in SUPPORTED or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: expected one dtype among {SUPPORTED}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-d (B, H, N, Dh) tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, Dh = k.shape
    if q.shape[2] not in (1, N) or q.shape[:2] != k.shape[:2] or q.shape[3] != Dh:
        raise ValueError(f"q: expected shape ({B}, {H}, {N} or 1, {Dh}), got {tuple(q.shape)}")
    if len(segments) < 2 or 1 + sum(segments) != N:
        raise ValueError(f"segments: expected M >= 2 sizes summing to N - 1 = {N - 1}, got {list(segments)}")
    if lengths is not None and (lengths.dtype != torch.int64 or tuple(lengths.shape) != (B, len(segments))):
        raise ValueError(f"lengths: expected int64 ({B}, {len(segments)}), got {lengths.dtype} {tuple(lengths.shape)}")


def _rotated_class_query(q: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``q0_rot`` ``(B, H, Dh)`` in the input dtype (rotation in the compute dtype, then rounded)."""
    return rotate_class_query(q[:, :, 0, :], rotation)


def _with_class_row(q: torch.Tensor, q0_rot: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Contiguous q whose row 0 is ``q0_rot`` (a copy only when there is a rotation)."""
    if rotation is None:
        return q.contiguous()
    q_rot = q.clone(memory_format=torch.contiguous_format)
    q_rot[:, :, 0, :] = q0_rot
    return q_rot


def _empty_stats(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(q.new_empty((0,), dtype=torch.float32) for _ in range(3))  # type: ignore[return-value]


def _split_float(x: float) -> tuple[float, float]:
    """``x`` as float32 ``hi + lo``: Triton passes Python floats as float32, float64 kernels need more."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def _scalars(scale: float, dropout_p: float) -> dict[str, tuple[float, float]]:
    """The kernels' float arguments as hi/lo pairs: ``scale·log2(e)``, ``scale`` and ``1/(1-p)``."""
    return dict(qk=_split_float(float(scale) * LOG2E), scale=_split_float(float(scale)),
                drop=_split_float(1.0 / (1.0 - float(dropout_p))))


def _common_meta(q: torch.Tensor, segments: Sequence[int], lengths: torch.Tensor | None, dropout_p: float) -> dict:
    head_dim = q.shape[3]
    return dict(
        NUM_MOD=len(segments), S_PAD=segment_pad(len(segments)), V_PAD=valid_pad(len(segments)),
        BLOCK_D=block_dim(head_dim),
        HAS_LENGTHS=lengths is not None, DROPOUT=dropout_p > 0.0, IS_FP64=q.dtype == torch.float64,
        EMULATE_BF16=triton_interpret() and q.dtype == torch.bfloat16,
    )


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[int], lengths: torch.Tensor | None,
    rotation: torch.Tensor | None, scale: float, dropout_p: float, seed: int, compute_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's forward (``rollingq::attention_fwd``) with Triton kernels.

    Args:
        q: ``(B, H, N, Dh)`` or ``(B, H, 1, Dh)``; k, v: ``(B, H, N, Dh)``; float16/bfloat16/float32/float64.
        segments: ``M >= 2`` padded modality sizes; lengths: int64 ``(B, M)`` or None.
        rotation: None, ``(H·Dh, H·Dh)`` or ``(H, Dh, Dh)`` (float32/float64).

    Returns:
        ``out`` (like q), ``lse`` ``(B, H, Nq)`` f32 (natural log), ``key_mean`` ``(B, H, M, Dh)``,
        ``mass`` ``(B, H, M+1)``, ``query`` ``(B, H, Dh)`` (f32; empty ``(0,)`` without stats).
    """
    segments = [int(s) for s in segments]
    _check_tensors(q, k, v, segments, lengths)
    B, H, N, Dh = k.shape
    nq = q.shape[2]
    _check_head_dim(Dh, nq == 1)
    k, v = k.contiguous(), v.contiguous()
    q0_rot = _rotated_class_query(q, rotation)
    seg_start, seg_end, stride_seg_b = segment_tables(segments, lengths, B, q.device)
    meta = _common_meta(q, segments, lengths, dropout_p)
    M = len(segments)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, nq), dtype=torch.float32, device=q.device)
    if compute_stats:
        key_mean = torch.empty((B, H, M, Dh), dtype=torch.float32, device=q.device)
        mass = torch.empty((B, H, M + 1), dtype=torch.float32, device=q.device)
        query = q0_rot.float().contiguous()
    else:
        key_mean, mass, query = _empty_stats(q)
    sc = _scalars(scale, dropout_p)
    args = (*sc["qk"], *sc["drop"], int(seed), dropout_threshold(dropout_p))
    if nq == 1:
        _class_only_fwd(q0_rot.contiguous(), k, v, out, lse, key_mean, mass, seg_start, seg_end, stride_seg_b,
                        compute_stats, meta, args)
    else:
        q_rot = _with_class_row(q, q0_rot, rotation)
        grid = lambda cfg: (triton.cdiv(nq, cfg["BLOCK_M"]) * B * H,)  # noqa: E731
        _fwd_kernel[grid](
            q_rot, k, v, out, lse, key_mean, mass, seg_start, seg_end, stride_seg_b, H, nq, N, Dh, *args,
            STATS=compute_stats, DOT_PREC=dot_precision(q.dtype), **meta,
        )
    return out, lse, key_mean, mass, query


def _class_only_fwd(q0: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    key_mean: torch.Tensor, mass: torch.Tensor, seg_start: torch.Tensor, seg_end: torch.Tensor,
                    stride_seg_b: int, compute_stats: bool, meta: dict, args: tuple) -> None:
    """Split-N decode forward + deterministic combine; q0 ``(B, H, Dh)`` rotated class rows.

    ``args``: the kernel's ``(qk_hi, qk_lo, drop_hi, drop_lo, seed, threshold)``.
    """
    B, H, N, Dh = k.shape
    bh = B * H
    splits = class_only_splits(bh, N, k.device)
    chunk = triton.cdiv(N, splits)
    splits = triton.cdiv(N, chunk)
    acc_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    s_pad = meta["S_PAD"]
    part_ml = torch.empty((bh, splits, 2), dtype=acc_dtype, device=k.device)
    part_acc = torch.empty((bh, splits, Dh), dtype=acc_dtype, device=k.device)
    if compute_stats:
        part_seg = torch.empty((bh, splits, s_pad), dtype=acc_dtype, device=k.device)
        part_key = torch.empty((bh, splits, s_pad, Dh), dtype=acc_dtype, device=k.device)
    else:
        part_seg = part_key = part_ml  # never read nor written
    logger.debug("rollingq triton class-only forward: B*H=%d N=%d splits=%d", bh, N, splits)
    _decode_fwd_kernel[(bh * splits,)](
        q0, k, v, part_ml, part_acc, part_seg, part_key, seg_start, seg_end, stride_seg_b, H, N, chunk, splits, Dh,
        *args, STATS=compute_stats, **meta,
    )
    _decode_combine_kernel[(bh,)](
        part_ml, part_acc, part_seg, part_key, out, lse, key_mean, mass, seg_start, seg_end, stride_seg_b, H,
        splits, Dh, NUM_MOD=meta["NUM_MOD"], S_PAD=s_pad, BLOCK_D=meta["BLOCK_D"], STATS=compute_stats,
        IS_FP64=meta["IS_FP64"], num_warps=4 if meta["BLOCK_D"] <= 256 else 8,
    )


def attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, segments: Sequence[int], lengths: torch.Tensor | None, rotation: torch.Tensor | None,
    scale: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward (``rollingq::attention_bwd``) with Triton kernels.

    Args:
        grad_out, out: like q; lse: ``(B, H, Nq)`` f32 from :func:`attention_fwd`; the rest as there.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtype of ``q, k, v``; ``dq`` includes the rotation's chain rule.
    """
    segments = [int(s) for s in segments]
    _check_tensors(q, k, v, segments, lengths)
    B, H, N, Dh = k.shape
    nq = q.shape[2]
    _check_head_dim(Dh, nq == 1)
    k, v = k.contiguous(), v.contiguous()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    q0_rot = _rotated_class_query(q, rotation)
    seg_start, seg_end, stride_seg_b = segment_tables(segments, lengths, B, q.device)
    meta = _common_meta(q, segments, lengths, dropout_p)
    sc = _scalars(scale, dropout_p)
    scalars = (*sc["qk"], *sc["scale"], *sc["drop"], int(seed), dropout_threshold(dropout_p))
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if nq == 1:
        bh = B * H
        blocks = class_only_splits(bh, N, k.device)
        chunk = triton.cdiv(N, blocks)
        blocks = triton.cdiv(N, chunk)
        acc_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
        dq_part = torch.empty((bh, blocks, Dh), dtype=acc_dtype, device=k.device)
        _decode_bwd_kernel[(bh * blocks,)](
            q0_rot.contiguous(), k, v, out, grad_out, lse, dk, dv, dq_part, seg_start, seg_end, stride_seg_b,
            H, N, chunk, Dh, *scalars, **meta,
        )
        dq0 = (dq_part.sum(dim=1) * float(scale)).reshape(B, H, Dh)  # fixed-order sum: deterministic
        if rotation is not None:
            return rotation_chain_rule(dq0, rotation, q.dtype).unsqueeze(2), dk, dv
        return dq0.to(q.dtype).unsqueeze(2), dk, dv
    else:
        q_rot = _with_class_row(q, q0_rot, rotation)
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        delta = torch.empty((B, H, nq), dtype=acc_dtype, device=q.device)
        pre_block = 16 if triton_interpret() else 64
        _bwd_preprocess_kernel[(triton.cdiv(nq, pre_block) * B * H,)](
            out, grad_out, delta, nq, Dh, BLOCK_M=pre_block, BLOCK_D=meta["BLOCK_D"], IS_FP64=meta["IS_FP64"],
        )
        common = (stride_seg_b, H, nq, N, Dh, *scalars)
        prec = dot_precision(q.dtype)
        _bwd_dkdv_kernel[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]) * B * H,)](
            q_rot, k, v, grad_out, lse, delta, dk, dv, seg_start, seg_end, *common, DOT_PREC=prec, **meta,
        )
        dq_rot = torch.empty_like(q_rot)
        _bwd_dq_kernel[lambda cfg: (triton.cdiv(nq, cfg["BLOCK_M"]) * B * H,)](
            q_rot, k, v, grad_out, lse, delta, dq_rot, seg_start, seg_end, *common, DOT_PREC=prec, **meta,
        )
    if rotation is not None:
        dq_rot[:, :, 0, :] = rotation_chain_rule(dq_rot[:, :, 0, :], rotation, q.dtype)
    return dq_rot, dk, dv


def _register_cuda_kernels() -> None:
    """Make these launchers the CUDA implementation of the two ``rollingq`` ops (once per process)."""
    torch.library.register_kernel("rollingq::attention_fwd", "cuda", attention_fwd)
    torch.library.register_kernel("rollingq::attention_bwd", "cuda", attention_bwd)


_register_cuda_kernels()
__all__ = ["attention_bwd", "attention_fwd"]
