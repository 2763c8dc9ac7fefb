"""The kernel benchmarks: provider × shape × mode × dtype × pass (parametrized in ``conftest.py``).

Each test times one case with pytest-benchmark's ``pedantic`` driving the
rounds (``setup`` untimed: next input set, and for ``bwd`` the forward; the
warm-up calls run first and their time sizes the number of rounds) while
:class:`~benchmarks._timing.CallTimer` records the suite's own per-call times
(CUDA events on GPU, ``perf_counter`` on CPU) from which the rows' medians and
the same-run ratios are computed. Then one extra call measures peak memory.
"""

from __future__ import annotations

import pytest
import torch

from ._providers import skip_reason
from ._session import BenchSession, Case, pass_functions
from ._timing import CallTimer, peak_memory_bytes, synchronize, time_rounds


def test_attention(case: Case, bench: BenchSession, benchmark) -> None:
    cfg = bench.config
    reason = skip_reason(case.provider, case.shape, case.mode, cfg.device, cfg.quick, cfg.memory_budget(), case.pass_,
                         case.dtype)
    if reason:
        pytest.skip(reason)
    provider = bench.provider(case)
    sets = bench.input_sets(case.shape, case.mode, case.dtype)
    setup, target = pass_functions(case.pass_, provider, sets)
    try:
        warm = time_rounds(target, setup, cfg.device, warmup=0, rounds=cfg.warmup)
        rounds = cfg.rounds_for(min(warm))
        if benchmark.disabled:  # --benchmark-disable: pedantic calls once; the rounds happen inside that call
            samples = benchmark.pedantic(
                time_rounds, args=(target, setup, cfg.device, 0, rounds), rounds=1, iterations=1
            )
        else:
            timer = CallTimer(target, cfg.device)

            def synced_setup() -> tuple[tuple, dict]:
                args = setup()
                synchronize(cfg.device)
                return args

            benchmark.pedantic(timer, setup=synced_setup, rounds=rounds, warmup_rounds=0, iterations=1)
            samples = timer.samples()
        peak = peak_memory_bytes(target, setup, cfg.device)
    except torch.OutOfMemoryError as exc:
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(f"{case.provider}: out of memory ({exc})")
    finally:
        for x in sets:
            x.zero_grads()
    row = bench.make_row(case, samples, peak)
    bench.recorder.add(row)
    benchmark.extra_info.update(
        {"backend": row.backend, "median_ms": row.median_s * 1e3, "tflops": row.tflops, "gbps": row.gbps,
         "peak_mem_mib": peak / 2**20}
    )
    assert len(samples) == rounds and all(t > 0 for t in samples), f"bad timing samples {samples}"
