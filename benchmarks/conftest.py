"""pytest wiring of the benchmark suite: options, parametrization, the end-of-run tables and results file.

Options:

* ``--quick``: small shapes, few rounds (CI's smoke test, < 3 minutes on 2 cores);
  gates are reported but do not fail; results go to a temporary directory unless
  ``--save-results`` is given.
* ``--bench-device {auto,cpu,cuda}``: where to run (auto: CUDA when available).
* ``--save-results``: write the results file into ``benchmarks/results/`` even in quick mode.
* ``--results-dir DIR``: write the results file there instead.
* ``--bench-note TEXT``: stored in the results' metadata (e.g. "cores shared with other jobs").
* ``--bench-threads N``: ``torch.set_num_threads(N)`` for the run (default: torch's default). On an
  oversubscribed CPU every multi-threaded op waits for a descheduled thread (tens of ms per
  parallel region), which penalizes many-op providers; ``1`` measures them fairly there.
"""

from __future__ import annotations

import getpass
import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch._dynamo

import rollingq_kernels

from ._gates import evaluate_gates
from ._report import e2e_table, gates_table, rows_table
from ._results import RESULTS_DIR, run_metadata, write_results
from ._session import BenchConfig, BenchSession, load_average

logger = logging.getLogger("benchmarks")

_SESSION_KEY = pytest.StashKey[BenchSession]()


def _configure_compilers() -> None:
    """Settings for the compiled providers (compile-eager, flex), before anything compiles.

    * TorchInductor's on-disk cache does not key its CPU kernels on ``ATEN_CPU_CAPABILITY``: in
      torch 2.14 a kernel compiled in an AVX-512 run and loaded by an AVX2-forced run computed
      wrong indices ("index out of bounds", an abort). One cache per ATen level keeps the runs of
      different levels apart (an explicit ``TORCHINDUCTOR_CACHE_DIR`` wins).
    * Every shape and mode compiles ``flex_attention`` anew (``dynamic=False``); past dynamo's
      default of 8 recompilations it would silently run Flex unfused (eager), which is not what a
      Flex user runs.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    level = torch.backends.cpu.get_cpu_capability().lower()
    # inductor writes its default into the environment on first use: only that value is replaced
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_rollingq_{level}"
        )
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


_configure_compilers()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rollingq benchmarks")
    group.addoption("--quick", action="store_true", help="small shapes, few rounds; gates do not fail")
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"), help="where to benchmark")
    group.addoption("--save-results", action="store_true", help="write results into benchmarks/results/ in --quick")
    group.addoption("--results-dir", default=None, help="directory for the results JSON file")
    group.addoption("--bench-note", default="", help="free text stored in the results' metadata")
    group.addoption("--bench-threads", type=int, default=None, help="torch.set_num_threads for the run")


def bench_session(config: pytest.Config) -> BenchSession:
    """The run's :class:`BenchSession`, created on first use."""
    if _SESSION_KEY not in config.stash:
        threads = config.getoption("--bench-threads")
        if threads is not None:
            if threads < 1:
                raise pytest.UsageError(f"--bench-threads: expected a positive int, got {threads}")
            torch.set_num_threads(threads)
        cfg = BenchConfig.create(config.getoption("--bench-device"), bool(config.getoption("--quick")))
        config.stash[_SESSION_KEY] = BenchSession(cfg)
    return config.stash[_SESSION_KEY]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        cases = bench_session(metafunc.config).config.cases()
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def bench(request: pytest.FixtureRequest) -> BenchSession:
    """The shared benchmark session."""
    return bench_session(request.config)


def _results_dir(config: pytest.Config, quick: bool) -> Path:
    explicit = config.getoption("--results-dir")
    if explicit:
        return Path(explicit)
    if quick and not config.getoption("--save-results"):
        return Path(tempfile.mkdtemp(prefix="rollingq-bench-"))
    return RESULTS_DIR


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _SESSION_KEY not in config.stash:
        return
    session = config.stash[_SESSION_KEY]
    if not session.recorder.rows and not session.end_to_end:
        return
    session.recorder.fill_ratios()
    gates = evaluate_gates(session.recorder, session.config.device.type, session.paired)
    tr = terminalreporter
    quick = session.config.quick
    if session.recorder.rows:
        tr.write_sep("=", "rollingq benchmarks: times and ratios (x fused = t_provider / t_fused, same run)")
        tr.write_line(rows_table(session.recorder.rows))
    if session.end_to_end:
        tr.write_sep("=", "rollingq end-to-end: one epoch with RollingQ")
        tr.write_line(e2e_table(session.end_to_end))
    tr.write_sep("=", "rollingq regression gates" + (" (--quick: reported, never failing)" if quick else ""))
    tr.write_line(gates_table(gates))
    metadata = run_metadata(session.config.device, quick, config.getoption("--bench-note"), rollingq_kernels.HAS_CPP)
    metadata["partial"] = bool(config.getoption("keyword") or config.getoption("markexpr"))
    metadata["warmup"] = session.config.warmup
    metadata["input_sets"] = session.config.input_sets
    metadata["gate_pairs"] = session.config.gate_pairs
    metadata["gate_pair_calls"] = {" | ".join(key): list(calls) for key, calls in session.pair_calls.items()}
    metadata["started"] = session.started
    metadata["min_rounds"], metadata["max_rounds"] = session.config.rounds, session.config.max_rounds
    metadata["loadavg_start"], metadata["loadavg_end"] = session.loadavg_start, load_average()
    path = write_results(
        _results_dir(config, quick), metadata, session.machine.to_dict(), session.recorder.rows,
        [g.to_dict() for g in gates], session.end_to_end,
    )
    tr.write_line(f"results written to {path}")
