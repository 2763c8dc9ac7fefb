"""The compile gate's yardstick: the forward loop of Triton's fused-attention tutorial, non-causal.

Written for this project in the tutorial's style (block pointers advanced per tile, no masks,
``exp2`` with the scale applied as in the tutorial: the row max of the raw scores times the
scale, then one FMA per score), so that its SASS loop is the tutorial's. The gate compiles it
in the tutorial's Hopper configuration next to our forward kernel; it is never launched.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tutorial_fwd_kernel(
    Q, K, V, sm_scale, M, Out,
    sqz, sqh, sqm, sqk, skz, skh, skn, skk, svz, svh, svk, svn, soz, soh, som, son,
    Z, H, N_CTX,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Q, K, V, Out ``(Z, H, N_CTX, HEAD_DIM)`` with the given strides; M ``(Z·H, N_CTX)`` (log2 lse)."""
    start_m = tl.program_id(0)
    zh = tl.program_id(1)
    base = (zh // H).to(tl.int64) * sqz + (zh % H).to(tl.int64) * sqh
    q_blk = tl.make_block_ptr(Q + base, (N_CTX, HEAD_DIM), (sqm, sqk), (start_m * BLOCK_M, 0),
                              (BLOCK_M, HEAD_DIM), (1, 0))
    kt_blk = tl.make_block_ptr(K + base, (HEAD_DIM, N_CTX), (skk, skn), (0, 0), (HEAD_DIM, BLOCK_N), (0, 1))
    v_blk = tl.make_block_ptr(V + base, (N_CTX, HEAD_DIM), (svk, svn), (0, 0), (BLOCK_N, HEAD_DIM), (1, 0))
    o_blk = tl.make_block_ptr(Out + base, (N_CTX, HEAD_DIM), (som, son), (start_m * BLOCK_M, 0),
                              (BLOCK_M, HEAD_DIM), (1, 0))
    scale2 = sm_scale * 1.44269504
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q = tl.load(q_blk)
    for start_n in range(0, N_CTX, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        scores = tl.dot(q, tl.load(kt_blk))
        new_max = tl.maximum(row_max, tl.max(scores, 1) * scale2)
        p = tl.math.exp2(scores * scale2 - new_max[:, None])
        alpha = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_blk)
        acc = tl.dot(p.to(v.dtype), v, acc)
        row_max = new_max
        v_blk = tl.advance(v_blk, (BLOCK_N, 0))
        kt_blk = tl.advance(kt_blk, (0, BLOCK_N))
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(M + zh * N_CTX + rows, row_max + tl.math.log2(row_sum))
    tl.store(o_blk, (acc / row_sum[:, None]).to(Out.type.element_ty))
