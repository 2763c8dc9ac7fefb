"""The state one benchmark session shares between tests: settings, machine rates, inputs, rows."""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._arith import (
    PASSES,
    OpDims,
    attention_bytes,
    attention_flops,
    fraction,
    gbps,
    median_seconds,
    pair_call_counts,
    tflops,
)
from ._gates import TILE_GEMM, Gate, PairedRatios
from ._providers import (
    DTYPES,
    MODES,
    PROVIDERS,
    OpInputs,
    build_provider,
    compiled_flex,
    flex_provider,
    fused_backend,
    make_inputs,
)
from ._results import Recorder, Row
from ._shapes import ROLE_GATE_ROOFLINE, BenchShape, TileShape, dtypes_for, shapes_for, tile_shape
from ._timing import MachineRates, TileGemm, measure_machine, time_rounds

logger = logging.getLogger("benchmarks")

#: timed probe calls per side of a gate pair (their fastest sizes the pair's call counts: one preempted
#: probe of a 2 ms call measured 40 ms on the shared VM and would have timed the other side 15 times)
PROBE_CALLS = 3

STATS_PROVIDERS = ("fused", "eager", "sdpa+stats", "flex+stats", "compile-eager")


@dataclass(frozen=True)
class Case:
    """One parametrized benchmark: provider × shape × mode × dtype × pass."""

    provider: str
    shape: BenchShape
    mode: str
    dtype: str
    pass_: str

    @property
    def id(self) -> str:
        """The pytest id."""
        return f"{self.shape.name}-{self.mode}-{self.dtype}-{self.pass_}-{self.provider}"


@dataclass(frozen=True)
class BenchConfig:
    """Settings of a run.

    Attributes:
        device: where the benchmarks run.
        quick: small shapes, few rounds (the CI smoke test).
        warmup: untimed calls per case (their times size the rounds).
        rounds: the fewest timed calls per case.
        max_rounds, target_s: fast cases get more rounds, up to ``max_rounds`` or about
            ``target_s`` seconds of timed calls, so the median resists scheduler noise.
        input_sets: distinct random input sets cycled through the rounds (so caches do not flatter).
        gate_pairs: alternating (fused, other) pairs of the gates' re-measurement (``_gates.py``).
    """

    device: torch.device
    quick: bool
    warmup: int
    rounds: int
    max_rounds: int
    target_s: float
    input_sets: int
    gate_pairs: int

    @classmethod
    def create(cls, device_opt: str, quick: bool) -> BenchConfig:
        """From the command line: ``device_opt`` is ``auto``, ``cpu`` or ``cuda``."""
        if device_opt not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--bench-device: expected auto, cpu or cuda, got {device_opt!r}")
        if device_opt == "cuda" and not torch.cuda.is_available():
            raise ValueError("--bench-device: cuda requested but torch.cuda.is_available() is False")
        use_cuda = device_opt == "cuda" or (device_opt == "auto" and torch.cuda.is_available())
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        if quick:
            return cls(device, True, warmup=1, rounds=7, max_rounds=15, target_s=0.1, input_sets=2, gate_pairs=3)
        if use_cuda:
            return cls(device, False, warmup=3, rounds=20, max_rounds=200, target_s=0.5, input_sets=3, gate_pairs=21)
        return cls(device, False, warmup=1, rounds=3, max_rounds=30, target_s=5.0, input_sets=3, gate_pairs=7)

    def rounds_for(self, seconds_per_call: float) -> int:
        """Timed rounds for a case whose warm-up call took ``seconds_per_call``."""
        if not seconds_per_call > 0:
            return self.max_rounds
        return max(self.rounds, min(self.max_rounds, math.ceil(self.target_s / seconds_per_call)))

    def cases(self) -> list[Case]:
        """Every case of this run; the provider varies fastest so consecutive tests share inputs."""
        return [
            Case(p, s, m, d, ps)
            for s in shapes_for(self.device.type, self.quick)
            for m in MODES
            for d in dtypes_for(self.device.type, self.quick)
            for ps in PASSES
            for p in PROVIDERS
        ]

    def memory_budget(self) -> int:
        """Bytes the materializing providers may spend on score matrices."""
        if self.device.type == "cuda":
            return int(0.5 * torch.cuda.get_device_properties(self.device).total_memory)
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 8 << 30
        return int(0.25 * total)  # the CPU is shared: stay well below the machine's memory


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): how shared the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class BenchSession:
    """Shared state: settings, rows, lazily measured machine rates, the current input sets."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.recorder = Recorder()
        self._machine: MachineRates | None = None
        self._inputs_key: tuple | None = None
        self._inputs: list[OpInputs] = []
        self.end_to_end: list[dict] = []
        self.paired: PairedRatios = {}
        # (gate name, shape, dtype) -> calls timed per pair on the fused side and on the other side
        self.pair_calls: dict[tuple[str, str, str], tuple[int, int]] = {}
        self.loadavg_start = load_average()
        self.started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._compiled: dict[tuple[str, str, str, str], Callable] = {}

    def roofline_tiles(self) -> dict[int, TileShape]:
        """Head dim -> the roofline's tile GEMMs: those of the roofline gate's shape for its head dim, else of
        the first shape with that head dim."""
        shapes = shapes_for(self.config.device.type, self.config.quick)
        ordered = sorted(shapes, key=lambda s: ROLE_GATE_ROOFLINE not in s.roles)  # stable: roofline shape first
        tiles: dict[int, TileShape] = {}
        for s in ordered:
            tiles.setdefault(s.head_dim, tile_shape(s))
        return tiles

    @property
    def machine(self) -> MachineRates:
        """Copy bandwidth, matmul and tile GEMM rates, measured on first use."""
        if self._machine is None:
            dtypes = {d: DTYPES[d] for d in dtypes_for(self.config.device.type, self.config.quick)}
            self._machine = measure_machine(self.config.device, dtypes, self.config.quick,
                                            list(self.roofline_tiles().values()))
        return self._machine

    def input_sets(self, shape: BenchShape, mode: str, dtype: str) -> list[OpInputs]:
        """``config.input_sets`` random input sets (cached for the latest ``(shape, mode, dtype)`` only)."""
        key = (shape, mode, dtype)
        if key != self._inputs_key:
            self._inputs = []  # free the previous sets first
            self._inputs = [
                make_inputs(shape, mode, DTYPES[dtype], self.config.device, seed=1009 * i + 17, requires_grad=True)
                for i in range(self.config.input_sets)
            ]
            self._inputs_key = key
        return self._inputs

    def provider(self, case: Case) -> Callable:
        """The provider's callable. ``compile-eager`` is compiled once per (shape, mode, dtype), so the
        ``bwd`` and ``fwd_bwd`` cases share one compilation (``fwd`` under no_grad adds a second graph);
        ``flex`` and ``flex+stats`` share one compiled ``flex_attention`` per (shape, mode, dtype)."""
        if case.provider == "compile-eager":
            key = ("compile-eager", case.shape.name, case.mode, case.dtype)
            if key not in self._compiled:
                self._compiled[key] = build_provider("compile-eager")
            return self._compiled[key]
        if case.provider in ("flex", "flex+stats"):
            key = ("flex", case.shape.name, case.mode, case.dtype)
            if key not in self._compiled:
                self._compiled[key] = compiled_flex()
            return flex_provider(self._compiled[key], stats=case.provider == "flex+stats")
        return build_provider(case.provider)

    def paired_ratios(self, gate: Gate, shape_name: str, dtype: str) -> list[float]:
        """Re-measures one gate in ``config.gate_pairs`` alternating pairs (fused, then the other provider,
        each after its untimed setup) following one warm-up call of each; returns t_other / t_fused per pair.

        Within a pair each side is timed for about as long as the slower side's probe (the fastest of
        ``PROBE_CALLS`` timed calls of each after the warm-up), and for at least
        ``_arith.PAIR_MIN_SIDE_S``: a side k times faster runs up to ``_arith.PAIR_MAX_CALLS`` calls back
        to back and counts their median, so that one scheduler hiccup on a 2-5 ms call (class-only
        against SDPA, or against a 0.4 s eager call) cannot decide the pair. The sides are then timed
        differently (several warm calls against one), which can favour the repeated side by a few
        per cent; the counts are kept in :attr:`pair_calls` and the results file."""
        shape = next(s for s in shapes_for(self.config.device.type, self.config.quick) if s.name == shape_name)
        if gate.other == TILE_GEMM:
            return self._roofline_ratios(gate, shape, dtype)
        sides = []
        for provider, mode in ((gate.fused_provider, gate.fused_mode), (gate.other, gate.other_mode)):
            sets = [
                make_inputs(shape, mode, DTYPES[dtype], self.config.device, seed=1009 * i + 17, requires_grad=True)
                for i in range(2)
            ]
            setup, target = pass_functions(gate.pass_, self.provider(Case(provider, shape, mode, dtype, gate.pass_)),
                                           sets)
            time_rounds(target, setup, self.config.device, warmup=1, rounds=0)
            first = min(time_rounds(target, setup, self.config.device, warmup=0, rounds=PROBE_CALLS))
            sides.append((setup, target, first))
        calls = pair_call_counts([first for _, _, first in sides])
        self.pair_calls[(gate.name, shape_name, dtype)] = (calls[0], calls[1])
        ratios = []
        for _ in range(self.config.gate_pairs):
            fused_s, other_s = (
                statistics.median(time_rounds(target, setup, self.config.device, 0, n))
                for (setup, target, _), n in zip(sides, calls)
            )
            ratios.append(other_s / fused_s)
        return ratios

    def _roofline_ratios(self, gate: Gate, shape: BenchShape, dtype: str) -> list[float]:
        """The roofline gate in ``config.gate_pairs`` alternating pairs: the fused call's rate (its median over
        the pair's calls) divided by the tile GEMM rate measured right after it (the fastest of as many calls
        of torch's batched GEMM and of the kernels' own GEMMs, the faster of the two)."""
        nq = shape.n_keys if gate.fused_mode == "all-query" else 1
        dims = OpDims(shape.batch, shape.heads, shape.n_keys, shape.head_dim, nq, len(shape.segments),
                      DTYPES[dtype].itemsize)
        flops = attention_flops(dims, gate.pass_)
        sets = [make_inputs(shape, gate.fused_mode, DTYPES[dtype], self.config.device, seed=1009 * i + 17,
                            requires_grad=True) for i in range(2)]
        provider = self.provider(Case(gate.fused_provider, shape, gate.fused_mode, dtype, gate.pass_))
        setup, target = pass_functions(gate.pass_, provider, sets)
        tiles = TileGemm(self.roofline_tiles()[shape.head_dim], DTYPES[dtype], self.config.device)
        time_rounds(target, setup, self.config.device, warmup=1, rounds=0)
        fused_probe = min(time_rounds(target, setup, self.config.device, warmup=0, rounds=PROBE_CALLS))
        gemm_probe = tiles.blas_seconds(1)
        calls = pair_call_counts([fused_probe, gemm_probe])
        self.pair_calls[(gate.name, shape.name, dtype)] = (calls[0], calls[1])
        ratios = []
        for _ in range(self.config.gate_pairs):
            fused_s = statistics.median(time_rounds(target, setup, self.config.device, 0, calls[0]))
            rates = [tflops(tiles.tile.flops, tiles.blas_seconds(calls[1]))]
            own = tiles.own_seconds(calls[1])
            if own is not None:
                rates.append(tflops(tiles.tile.flops, own))
            ratios.append(tflops(flops, fused_s) / max(rates))
        return ratios

    def make_row(self, case: Case, samples: list[float], peak_mem: int) -> Row:
        """A :class:`Row` with the derived columns of ``case`` measured as ``samples`` seconds."""
        s = case.shape
        dims = OpDims(
            s.batch, s.heads, s.n_keys, s.head_dim, s.n_keys if case.mode == "all-query" else 1,
            len(s.segments), DTYPES[case.dtype].itemsize,
        )
        med = median_seconds(samples)
        flops = attention_flops(dims, case.pass_)
        nbytes = attention_bytes(dims, case.pass_, stats=case.provider in STATS_PROVIDERS, lengths=s.padded)
        achieved_tflops, achieved_gbps = tflops(flops, med), gbps(nbytes, med)
        backend = fused_backend(self.config.device) if case.provider.startswith("fused") else case.provider
        return Row(
            provider=case.provider, shape=s.name, label=s.label, segments=list(s.segments), mode=case.mode,
            dtype=case.dtype, pass_=case.pass_, device=self.config.device.type, backend=backend,
            median_s=med, min_s=min(samples), rounds=len(samples), flops=flops, bytes=nbytes,
            tflops=achieved_tflops, gbps=achieved_gbps,
            frac_copy_bw=fraction(achieved_gbps, self.machine.copy_gbps),
            frac_matmul=fraction(achieved_tflops, self.machine.matmul_tflops.get(case.dtype)),
            peak_mem_bytes=peak_mem, roles=list(s.roles),
            frac_gemm=fraction(achieved_tflops, self.machine.tile_rate(case.dtype, s.head_dim)),
        )


PassFns = tuple[Callable[[], tuple[tuple, dict]], Callable[..., None]]


def pass_functions(case_pass: str, provider: Callable, sets: list[OpInputs]) -> PassFns:
    """``(setup, target)`` for one pass; ``setup()`` is untimed, ``target(*args)`` is timed.

    * ``fwd``: the forward under ``torch.no_grad()`` (inference);
    * ``bwd``: ``setup`` runs the forward with autograd, ``target`` the backward only;
    * ``fwd_bwd``: the forward with autograd and the backward.

    Each call of ``setup`` takes the next input set (round robin).
    """
    counter = {"i": 0}

    def next_set() -> OpInputs:
        x = sets[counter["i"] % len(sets)]
        counter["i"] += 1
        x.zero_grads()
        return x

    if case_pass == "fwd":

        def fwd(x: OpInputs) -> None:
            with torch.no_grad():
                provider(x)

        return (lambda: ((next_set(),), {})), fwd
    if case_pass == "bwd":

        def setup_bwd() -> tuple[tuple, dict]:
            x = next_set()
            out, _ = provider(x)
            return (out, x.grad_out), {}

        def bwd(out: torch.Tensor, grad: torch.Tensor) -> None:
            out.backward(grad)

        return setup_bwd, bwd
    if case_pass == "fwd_bwd":

        def fwd_bwd(x: OpInputs) -> None:
            out, _ = provider(x)
            out.backward(x.grad_out)

        return (lambda: ((next_set(),), {})), fwd_bwd
    raise ValueError(f"case_pass: expected one of {PASSES}, got {case_pass!r}")
