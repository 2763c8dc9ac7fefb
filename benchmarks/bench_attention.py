"""Paired CPU timing of the C++ kernels against SDPA and the eager reference.

Runs each provider in blocks of back-to-back calls, in two alternating passes
so that slow phases of the shared machine hit every provider, and reports
per-provider medians and their ratios. Shapes are the issue's targets:

* all-query fp32 B=8, H=12, Dh=64, segments (512, 588): forward (with
  statistics) and forward+backward, vs SDPA and the eager reference;
* class-only fp32 B=64, H=1, Dh=768, segments (176, 196) vs the eager
  reference's all-query attention.

Usage (repository root): python -m benchmarks.bench_attention [--rounds 7] [--threads 2]

The instruction set of the C++ kernels (and ATen's) follows ATEN_CPU_CAPABILITY;
the first log line says which ran.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import rollingq_kernels as rk

from ._results import cpu_capabilities

logger = logging.getLogger("bench_attention")


def paired(providers: dict[str, Callable[[], object]], rounds: int, passes: int = 2) -> dict[str, list[float]]:
    """Times each provider ``rounds`` times in a row (ms) after a warm-up call, in
    ``passes`` alternating passes over the providers. Calls of one provider run
    back to back: switching right after another multithreaded op lets that op's
    spinning OpenMP/MKL workers steal the cores from the next call's first ms."""
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(passes):
        for name, f in providers.items():
            f()
            for _ in range(rounds):
                t0 = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(title: str, times: dict[str, list[float]], ours: str) -> None:
    meds = {k: statistics.median(v) for k, v in times.items()}
    parts = [f"{k} {m:.1f} ms" for k, m in meds.items()]
    ratios = [f"{k}/{ours} x{meds[k] / meds[ours]:.2f}" for k in times if k != ours]
    logger.info("%s: %s | %s", title, ", ".join(parts), ", ".join(ratios))


def fwd_bwd(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-eager", action="store_true", help="time only cpp and SDPA")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    caps = cpu_capabilities()
    logger.info("C++ kernels: %s, ATen: %s, threads: %d", caps["kernels"], caps["aten"], args.threads)
    torch.manual_seed(0)

    B, H, Dh, segs = 8, 12, 64, (512, 588)
    N = 1 + sum(segs)
    q, k, v, g = (torch.randn(B, H, N, Dh) for _ in range(4))
    cpp = lambda q, k, v: rk.rollingq_attention(q, k, v, segs, backend="cpp")[0]  # noqa: E731
    eager = lambda q, k, v: rk.rollingq_attention(q, k, v, segs, backend="reference")[0]  # noqa: E731
    with torch.no_grad():
        prov = {"cpp": lambda: cpp(q, k, v), "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
        if not args.skip_eager:
            prov["eager"] = lambda: eager(q, k, v)
        summarize(f"forward+stats fp32 B={B} H={H} N={N} Dh={Dh}", paired(prov, args.rounds), "cpp")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    prov = {"cpp": fwd_bwd(cpp, leaves, g), "sdpa": fwd_bwd(F.scaled_dot_product_attention, leaves, g)}
    if not args.skip_eager:
        prov["eager"] = fwd_bwd(eager, leaves, g)
    summarize("forward+backward", paired(prov, args.rounds), "cpp")

    B, H, Dh, segs = 64, 1, 768, (176, 196)
    N = 1 + sum(segs)
    q, k, v = (torch.randn(B, H, N, Dh) for _ in range(3))
    q_cls = q[:, :, :1].contiguous()
    with torch.no_grad():
        prov = {
            "cpp-class-only": lambda: rk.rollingq_attention(q_cls, k, v, segs, backend="cpp"),
            "eager-all-query": lambda: rk.rollingq_attention(q, k, v, segs, backend="reference"),
            "eager-class-only": lambda: rk.rollingq_attention(q_cls, k, v, segs, backend="reference"),
        }
        summarize(f"class-only fp32 B={B} H={H} N={N} Dh={Dh}", paired(prov, args.rounds), "cpp-class-only")


if __name__ == "__main__":
    main()
