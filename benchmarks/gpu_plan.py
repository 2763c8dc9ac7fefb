"""What the one GPU run (``benchmarks/run_gpu.sh``) does, sized to fit its time budget.

``python -m benchmarks.gpu_plan bench-ids`` prints the benchmark cases of the run (pytest node
ids): every GPU shape and mode in bfloat16, the ``fwd`` and ``fwd_bwd`` passes, every provider
(SDPA's flash and cuDNN backends and FlexAttention included; ``compile-eager`` and FlexAttention
only on the shapes below, each of their cases compiles anew; the eager reference only up to
2048 keys). fp16 and the backward-only pass are left to a longer run (``benchmarks/run_gpu.sh``
takes extra pytest arguments).

``python -m benchmarks.gpu_plan warm --jobs N`` compiles the Triton kernels the run will launch
(the CUDA tests' fixed configurations, every autotune candidate of the benchmarked variants) in
N processes into Triton's cache, so the tests and the autotuner find them compiled.

``python -m benchmarks.gpu_plan dry-run`` checks the plan without a GPU: it lists the cases and
the warm-up compilations and counts them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

BENCH_FILE = "benchmarks/test_attention.py"
PLAN_DTYPES = ("bf16",)
PLAN_PASSES = ("fwd", "fwd_bwd")
FLEX_SHAPES = ("ks", "long-4k")  # FlexAttention compiles once per case
EAGER_MAX_KEYS = 2048  # the eager reference materializes (B, H, Nq, N) scores: seconds per call beyond this


def bench_cases() -> list:
    """The benchmark cases of the GPU run (``Case`` objects of ``benchmarks/_session.py``)."""
    import torch

    from ._session import BenchConfig

    cfg = dataclasses.replace(BenchConfig.create("cpu", quick=False), device=torch.device("cuda"), quick=False)
    cases = []
    for case in cfg.cases():
        if case.dtype not in PLAN_DTYPES or case.pass_ not in PLAN_PASSES:
            continue
        if case.provider.startswith("flex") and case.shape.name not in FLEX_SHAPES:
            continue
        if case.provider == "eager" and case.shape.n_keys > EAGER_MAX_KEYS:
            continue
        cases.append(case)
    return cases


def bench_ids() -> list[str]:
    """pytest node ids of :func:`bench_cases`."""
    return [f"{BENCH_FILE}::test_attention[{case.id}]" for case in bench_cases()]


# ----------------------------------------------------------------------------- Triton cache warm-up

_ALL_QUERY_FLAG_SETS = [dict(HAS_LENGTHS=a, DROPOUT=b, ROTATED=c) for a in (False, True) for b in (False, True)
                        for c in (False, True)]
_CLASS_FWD_FLAG_SETS = ([dict(HAS_LENGTHS=a, DROPOUT=b, STATS=c, WITH_V=True) for a in (False, True)
                         for b in (False, True) for c in (False, True)]
                        + [dict(HAS_LENGTHS=a, DROPOUT=False, STATS=True, WITH_V=False) for a in (False, True)])
_CLASS_BWD_FLAG_SETS = [dict(HAS_LENGTHS=a, DROPOUT=b) for a in (False, True) for b in (False, True)]
_COMBINE_FLAG_SETS = [dict(HAS_LENGTHS=a, STATS=b, WITH_V=c) for a in (False, True) for b in (False, True)
                      for c in (False, True) if b or c]


def warm_variants() -> list:
    """The compilations the GPU run will ask for (first candidate for the tests, all for the benchmarks)."""
    from .compile_gate import Variant, _candidates

    out: dict = {}

    def add(kernel, dtype, dh, flag_sets, m, every_candidate):
        for flags in flag_sets:
            cands = _candidates(kernel, dtype, dh, flags.get("DROPOUT", False))
            for cfg in cands if every_candidate else cands[:1]:
                out[Variant(kernel, dtype, dh, tuple(flags.items()), num_mod=m, **cfg)] = None

    # tests/test_triton_cuda.py (ROLLINGQ_TRITON_AUTOTUNE=0: the first candidate)
    for dtype in ("bf16", "fp16", "fp32"):
        for m in (2, 3):
            for dh in (32, 64):
                for kernel in ("fwd", "dkdv", "dq"):
                    add(kernel, dtype, dh, _ALL_QUERY_FLAG_SETS, m, False)
                add("delta", dtype, dh, [dict(HAS_LENGTHS=a) for a in (False, True)], m, False)
            for dh in (64, 768, 1024):
                add("class_fwd", dtype, dh, _CLASS_FWD_FLAG_SETS, m, False)
                add("class_bwd", dtype, dh, _CLASS_BWD_FLAG_SETS, m, False)
                add("class_combine", dtype, dh, _COMBINE_FLAG_SETS, m, False)
    # the benchmarks (autotuned: every candidate): lengths and a rotation, no dropout, M = 2
    for dtype in PLAN_DTYPES:
        plain = dict(HAS_LENGTHS=True, DROPOUT=False, ROTATED=True)
        for kernel in ("fwd", "dkdv", "dq"):
            add(kernel, dtype, 64, [plain], 2, True)
        for dh in (64, 768):
            add("class_fwd", dtype, dh, [dict(HAS_LENGTHS=True, DROPOUT=False, STATS=s, WITH_V=True)
                                         for s in (False, True)]
                + [dict(HAS_LENGTHS=True, DROPOUT=False, STATS=True, WITH_V=False)], 2, True)
            add("class_bwd", dtype, dh, [dict(HAS_LENGTHS=True, DROPOUT=False)], 2, True)
    return list(out)


def _compile_only(v) -> tuple[str, bool, float, str]:
    """Compile ``v`` into Triton's cache for the local GPU's target (no analysis)."""
    from .compile_gate import _arguments

    start = time.perf_counter()
    try:
        fn, args, kwargs = _arguments(v)
        extra = {"maxnreg": v.maxnreg} if v.maxnreg else {}
        fn.warmup(*args, grid=(1,), num_warps=v.warps, num_stages=v.stages, **kwargs, **extra)
    except Exception as exc:  # noqa: BLE001  (reported, the run goes on)
        return v.label, False, time.perf_counter() - start, f"{type(exc).__name__}: {str(exc)[:200]}"
    return v.label, True, time.perf_counter() - start, ""


def warm(jobs: int) -> int:
    """Compile :func:`warm_variants` in ``jobs`` processes; returns the number that failed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    todo = warm_variants()
    start = time.perf_counter()
    # spawn: each worker starts its own CUDA driver (Triton asks it for the GPU's target)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_only, todo, chunksize=4))
    failed = [r for r in results if not r[1]]
    for label, _, _, err in failed:
        print(f"warm: FAILED {label}: {err}")
    print(f"warm: {len(results) - len(failed)} of {len(results)} kernels compiled into Triton's cache in "
          f"{time.perf_counter() - start:.0f} s with {jobs} processes (sum of compile times "
          f"{sum(r[2] for r in results):.0f} s)")
    return len(failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("bench-ids", "warm", "dry-run"))
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "bench-ids":
        print("\n".join(bench_ids()))
        return 0
    if args.command == "warm":
        return 1 if warm(args.jobs) else 0
    ids = bench_ids()
    variants = warm_variants()
    providers = sorted({c.provider for c in bench_cases()})
    print(f"dry run: {len(ids)} benchmark cases ({', '.join(providers)}), {len(variants)} kernels to warm")
    return 0 if ids and variants else 1


if __name__ == "__main__":
    sys.exit(main())
