"""Working memory of the C++ kernels at a long sequence (the O(N) claim).

Peak resident-set growth (VmHWM) of one forward and one backward call of the
registered ops at fp32 B=1, H=12, Dh=64, N=8193, minus the bytes of the ops'
outputs, compared with one N x N fp32 matrix. Run it in a fresh process from the
repository root: ``python -m benchmarks.measure_memory``.
"""

from __future__ import annotations

import logging
import re
import time

import torch

import rollingq_kernels  # noqa: F401  (registers torch.ops.rollingq)
from rollingq_kernels.stats import KernelOutputs

logger = logging.getLogger("measure_memory")


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    B, H, Dh, segs = 1, 12, 64, [4096, 4096]
    N = 1 + sum(segs)
    q, k, v, g = (torch.randn(B, H, N, Dh) for _ in range(4))
    lengths = torch.tensor([[4000, 3001]])
    square = N * N * 4
    scale = Dh**-0.5

    base, t0 = peak_rss(), time.perf_counter()
    fwd = KernelOutputs(*torch.ops.rollingq.attention_fwd(q, k, v, segs, lengths, None, scale, 0.0, 0, True))
    grow, secs = peak_rss() - base, time.perf_counter() - t0
    work = grow - nbytes(*fwd)
    logger.info("forward  N=%d: working memory %.2f MiB = %.2f%% of one N*N fp32 matrix (%.0f MiB), %.1f s",
                N, work / 2**20, 100 * work / square, square / 2**20, secs)

    base, t0 = peak_rss(), time.perf_counter()
    grads = torch.ops.rollingq.attention_bwd(g, q, k, v, fwd.out, fwd.lse, segs, lengths, None, scale, 0.0, 0)
    grow, secs = peak_rss() - base, time.perf_counter() - t0
    work = grow - nbytes(*grads)
    logger.info("backward N=%d: working memory %.2f MiB = %.2f%% of one N*N fp32 matrix, %.1f s",
                N, work / 2**20, 100 * work / square, secs)


if __name__ == "__main__":
    main()
