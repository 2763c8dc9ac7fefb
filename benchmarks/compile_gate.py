"""The no-GPU compile gate of the Triton kernels: ``python -m benchmarks.compile_gate``.

Compiles every Triton kernel of ``rollingq_kernels.triton`` for ``sm_90a`` (H100/H200) on the CPU,
through a stand-in driver (no device needed), in every autotune configuration it can run with
(the candidates ``rollingq_kernels.triton.configs`` offers for the dtype and head dimension), then
runs the bundled ``ptxas -v`` and ``cuobjdump -sass`` on each and fails on:

* a compile error;
* shared memory above Hopper's 227 KB per block;
* register spills in a float16/bfloat16 configuration with ``Dh <= 128`` (spills elsewhere are
  reported);
* a missing ``wgmma`` (``HGMMA``) in a float16/bfloat16 configuration whose matrix tile is at least
  64 rows (the instruction's smallest M) with whole warpgroups;
* a main loop of the all-query forward (no dropout) more than 1.15x as long, in SASS instructions
  per iteration, as the same loop of Triton's fused-attention tutorial, compiled here in the same
  configuration (bf16, Dh 64 and 128, ``BLOCK_M=128, BLOCK_N=64``, 8 warps, 3 stages).

The default set (CI) covers bf16 and fp16 at Dh 64 and 128 (768 for class-only) in the variants
that matter; ``--full`` adds float32, float64, other head dimensions and three modalities.
``--json PATH`` writes every result; ``--jobs N`` compiles in N processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on Hopper
LOOP_RATIO_LIMIT = 1.15
BASELINE_CONFIG = (128, 64, 8, 3)

# kernels: (module, name, candidate list or None, which block is the matrix tile's M)
KERNELS = {
    "fwd": ("forward", "all_query_fwd_kernel", "FWD_CANDIDATES", "BLOCK_M"),
    "dkdv": ("backward", "all_query_dkdv_kernel", "DKDV_CANDIDATES", "BLOCK_N"),
    "dq": ("backward", "all_query_dq_kernel", "DQ_CANDIDATES", "BLOCK_M"),
    "delta": ("backward", "all_query_delta_kernel", None, None),
    "class_fwd": ("class_only", "class_only_fwd_kernel", "CLASS_ONLY_CANDIDATES", None),
    "class_combine": ("class_only", "class_only_combine_kernel", None, None),
    "class_bwd": ("class_only", "class_only_bwd_kernel", "CLASS_ONLY_CANDIDATES", None),
}


@dataclass(frozen=True)
class Variant:
    """One compilation: a kernel, a dtype, a head dimension, its flags and a launch configuration."""

    kernel: str
    dtype: str  # "bf16", "fp16", "fp32", "fp64"
    head_dim: int
    flags: tuple[tuple[str, bool], ...]
    block_m: int
    block_n: int
    warps: int
    stages: int
    num_mod: int = 2
    maxnreg: int | None = None

    @property
    def label(self) -> str:
        on = "+".join(k.lower() for k, v in self.flags if v) or "plain"
        cap = f",r{self.maxnreg}" if self.maxnreg else ""
        return (f"{self.kernel} {self.dtype} Dh{self.head_dim} M{self.num_mod} {on} "
                f"({self.block_m},{self.block_n},{self.warps}w,{self.stages}s{cap})")

    @property
    def config(self) -> tuple[int, int, int, int]:
        return (self.block_m, self.block_n, self.warps, self.stages)


@dataclass
class Result:
    """What the compilation of one :class:`Variant` gave."""

    variant: Variant
    ok: bool
    error: str = ""
    seconds: float = 0.0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0
    wgmma: int = 0
    mma: int = 0
    loops: list[int] = field(default_factory=list)  # instructions per iteration of each main loop copy
    barriers: list[int] = field(default_factory=list)  # block-wide barriers per iteration, likewise
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- variants

ALL_QUERY_FLAGS = (
    dict(HAS_LENGTHS=False, DROPOUT=False, ROTATED=False),
    dict(HAS_LENGTHS=True, DROPOUT=False, ROTATED=True),
    dict(HAS_LENGTHS=True, DROPOUT=True, ROTATED=True),
)
CLASS_FWD_FLAGS = (
    dict(HAS_LENGTHS=False, STATS=False, WITH_V=True, DROPOUT=False),
    dict(HAS_LENGTHS=True, STATS=True, WITH_V=True, DROPOUT=True),
    dict(HAS_LENGTHS=True, STATS=True, WITH_V=False, DROPOUT=False),
)
CLASS_BWD_FLAGS = (dict(HAS_LENGTHS=False, DROPOUT=False), dict(HAS_LENGTHS=True, DROPOUT=True))
COMBINE_FLAGS = (dict(HAS_LENGTHS=True, STATS=True, WITH_V=True), dict(HAS_LENGTHS=True, STATS=True, WITH_V=False))


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]


def _candidates(kernel: str, dtype: str, head_dim: int, dropout: bool = False) -> list[dict]:
    """Every configuration the autotuner may run ``kernel`` with (dtype, head dimension, dropout)."""
    from rollingq_kernels.triton import configs

    attr = KERNELS[kernel][2]
    if attr is None:  # as rollingq_kernels.triton.launch runs them
        return [dict(block_m=64, block_n=0, warps=4, stages=1)] if kernel == "delta" else \
            [dict(block_m=0, block_n=0, warps=4, stages=1)]
    chosen = configs.select_candidates(getattr(configs, attr), _torch_dtype(dtype), configs.block_dim(head_dim),
                                       1 << 20, 1 << 20, dropout)
    unique = dict.fromkeys(c.key for c in chosen)  # one compilation per launch configuration
    return [dict(zip(("block_m", "block_n", "warps", "stages", "maxnreg"), key)) for key in unique]


def variants(full: bool) -> list[Variant]:
    """The compilations of the gate.

    Default (CI): bf16 in every variant at Dh 64 and 128 (class-only also 768), fp16 in the
    heaviest variant (lengths, rotation, dropout: the most registers; fp16 and bf16 code differ
    only in conversions). ``full``: fp16/fp32/fp64 in every variant, Dh 16/80/256 (class-only
    1024), three modalities.
    """
    out: list[Variant] = []

    def add(kernel, dtype, dh, flag_sets, m=2):
        for flags in flag_sets:
            for cfg in _candidates(kernel, dtype, dh, flags.get("DROPOUT", False)):
                out.append(Variant(kernel, dtype, dh, tuple(flags.items()), num_mod=m, **cfg))

    dtypes = ("bf16", "fp16", "fp32", "fp64") if full else ("bf16", "fp16")
    for m in (2, 3) if full else (2,):
        for dtype in dtypes:
            every = full or dtype == "bf16"
            for dh in (16, 64, 80, 128, 256) if full else (64, 128):
                for kernel in ("fwd", "dkdv", "dq"):
                    add(kernel, dtype, dh, ALL_QUERY_FLAGS if every else ALL_QUERY_FLAGS[-1:], m)
                add("delta", dtype, dh, ({"HAS_LENGTHS": True},), m)
            if not every:
                continue
            for dh in (64, 128, 768, 1024) if full else (64, 128, 768):
                add("class_fwd", dtype, dh, CLASS_FWD_FLAGS, m)
                add("class_bwd", dtype, dh, CLASS_BWD_FLAGS, m)
                add("class_combine", dtype, dh, COMBINE_FLAGS, m)
    return out


# ----------------------------------------------------------------------------- compiling one variant


def _arguments(v: Variant):
    """``(jit_function, positional args, constexpr kwargs)`` for ``warmup``: dtypes stand for tensors."""
    import importlib

    import torch

    from rollingq_kernels.triton import configs

    module, name, _, _ = KERNELS[v.kernel]
    kernel = getattr(importlib.import_module(f"rollingq_kernels.triton.{module}"), name)
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):  # autotuner -> jit function
        fn = fn.fn
    dt = _torch_dtype(v.dtype)
    acc = torch.float64 if v.dtype == "fp64" else torch.float32
    tensors = {
        **dict.fromkeys(("Q", "Q0", "K", "V", "Out", "DO", "DK", "DV", "DQ"), dt),
        **dict.fromkeys(("Lse", "KeyMean", "Mass", "ScoreMax"), torch.float32),
        **dict.fromkeys(("Delta", "PartML", "PartAcc", "PartSeg", "PartKey", "DQPart"), acc),
        "Table": torch.int32, "Lengths": torch.int64,
    }
    ints = {"H": 12, "Nq": 1101, "N": 1101, "CHUNK": 128, "SPLITS": 9, "seed": 7, "threshold": 1 << 20}
    block_d = configs.block_dim(v.head_dim)
    meta = dict(v.flags, NUM_MOD=v.num_mod, HEAD_DIM=v.head_dim, BLOCK_D=block_d, IS_FP64=v.dtype == "fp64",
                DOT_PREC=configs.dot_precision(dt), EMULATE_BF16=False, S_PAD=configs.segment_pad(v.num_mod),
                M_PAD=max(1, 1 << (v.num_mod - 1).bit_length()), BLOCK_M=v.block_m, BLOCK_N=v.block_n)
    constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
    args = []
    for arg in fn.arg_names:
        if arg in constexpr_names:
            continue
        if arg in tensors:
            args.append(tensors[arg])
        elif arg in ints:
            args.append(ints[arg])
        elif arg.endswith(("_hi", "_lo")):
            args.append(0.5)
        else:
            raise KeyError(f"compile_gate: no stand-in value for argument {arg!r} of {name}")
    kwargs = {k: meta[k] for k in constexpr_names if k in meta}
    missing = constexpr_names - set(kwargs)
    if missing:
        raise KeyError(f"compile_gate: no value for constexpr {sorted(missing)} of {name}")
    return fn, args, kwargs


def _dtype_is_half(v: Variant) -> bool:
    return v.dtype in ("bf16", "fp16")


def check(result: Result) -> Result:
    """Fill ``failures`` / ``warnings`` of a compiled result (the gate's rules)."""
    v = result.variant
    if not result.ok:
        result.failures.append(f"compile error: {result.error}")
        return result
    if result.shared_bytes > SMEM_LIMIT:
        result.failures.append(f"shared memory {result.shared_bytes} B > {SMEM_LIMIT} B")
    if result.spill_stores or result.spill_loads:
        msg = f"spills: {result.spill_stores} B stored, {result.spill_loads} B loaded"
        if _dtype_is_half(v) and v.head_dim <= 128 and v.kernel != "baseline":
            result.failures.append(msg)
        else:
            result.warnings.append(msg)
    m_block = KERNELS.get(v.kernel, (None, None, None, "BLOCK_M"))[3]
    tile_m = {"BLOCK_M": v.block_m, "BLOCK_N": v.block_n}.get(m_block or "", 0)
    if _dtype_is_half(v) and tile_m >= 64 and v.warps % 4 == 0 and result.wgmma == 0 and m_block:
        result.failures.append(f"no wgmma (HGMMA) although the matrix tile has {tile_m} rows")
    return result


def compile_variant(v: Variant, arch: int = 90) -> Result:
    """Compile ``v`` for ``sm_{arch}a`` with the stand-in driver and read its resources and SASS."""
    from . import _cubin

    _cubin.StandInDriver(arch).install()
    start = time.perf_counter()
    try:
        if v.kernel == "baseline":
            fn, args, kwargs = _baseline_arguments(v)
        else:
            fn, args, kwargs = _arguments(v)
        extra = {"maxnreg": v.maxnreg} if v.maxnreg else {}
        compiled = fn.warmup(*args, grid=(1,), num_warps=v.warps, num_stages=v.stages, **kwargs, **extra)
        usage = _cubin.ptxas_usage(compiled.asm["ptx"], f"sm_{arch}a")
        sass = _cubin.sass_of(compiled.asm["cubin"])
    except Exception as exc:  # noqa: BLE001  (a compile error is a result of the gate)
        return check(Result(v, ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}",
                            seconds=time.perf_counter() - start))
    loops = _cubin.main_loops(sass)
    return check(Result(
        v, ok=True, seconds=time.perf_counter() - start, registers=usage.registers,
        spill_stores=usage.spill_stores, spill_loads=usage.spill_loads, shared_bytes=int(compiled.metadata.shared),
        wgmma=_cubin.count_ops(sass, "HGMMA"), mma=sum(_cubin.count_ops(sass, op) for op in _cubin.MMA_OPS),
        loops=[lp.instructions for lp in loops], barriers=[lp.barriers for lp in loops],
    ))


# ----------------------------------------------------------------------------- the tutorial's loop


def _baseline_arguments(v: Variant):
    """The baseline: Triton's fused-attention tutorial forward (non-causal), from ``baseline.py``."""
    import torch

    from ._tutorial_loop import tutorial_fwd_kernel

    dt = _torch_dtype(v.dtype)
    n = 4096
    strides = [16 * n * v.head_dim, n * v.head_dim, v.head_dim, 1]
    args = [dt, dt, dt, 0.125, torch.float32, dt, *(strides * 4), 4, 16, n]
    return tutorial_fwd_kernel, args, dict(HEAD_DIM=v.head_dim, BLOCK_M=v.block_m, BLOCK_N=v.block_n)


def baseline_variants() -> list[Variant]:
    return [Variant("baseline", "bf16", dh, (), *BASELINE_CONFIG) for dh in (64, 128)]


def loop_comparison(results: Iterable[Result]) -> tuple[list[str], list[str]]:
    """Rows ``ours vs tutorial`` for the forward main loop, and the failures over the limit."""
    results = list(results)
    base = {r.variant.head_dim: r for r in results if r.variant.kernel == "baseline" and r.ok}
    rows, failures = [], []
    for r in results:
        v = r.variant
        if (v.kernel != "fwd" or v.dtype != "bf16" or not r.ok or v.num_mod != 2
                or v.config != BASELINE_CONFIG or v.head_dim not in base):
            continue
        tut = base[v.head_dim].loops
        if not tut or not r.loops:
            failures.append(f"{v.label}: no main loop found in the SASS")
            continue
        worst = max(r.loops)
        ratio = worst / tut[0]
        dropout = dict(v.flags).get("DROPOUT", False)
        rows.append(f"  {v.label:<72} {','.join(map(str, r.loops)):>9} vs tutorial {tut[0]:>4}: {ratio:.2f}x"
                    + ("  (dropout: not gated)" if dropout else ""))
        if ratio > LOOP_RATIO_LIMIT and not dropout:
            failures.append(f"{v.label}: {worst} instructions per iteration, {ratio:.2f}x the tutorial's {tut[0]} "
                            f"(limit {LOOP_RATIO_LIMIT}x)")
    return rows, failures


# ----------------------------------------------------------------------------- the command


def _format(r: Result) -> str:
    status = "FAIL" if r.failures else ("warn" if r.warnings else "ok")
    if not r.ok:
        return f"{status:<4} {r.variant.label}: {r.error[:160]}"
    loops = ",".join(map(str, r.loops)) or "-"
    bars = ",".join(map(str, r.barriers)) or "-"
    return (f"{status:<4} {r.variant.label:<72} regs {r.registers:>3}  spill {r.spill_stores:>4}/{r.spill_loads:<4} "
            f"smem {r.shared_bytes / 1024:6.1f}K  hgmma {r.wgmma:>3}  loop {loops:<9} bar {bars:<5} {r.seconds:5.1f}s"
            + ("  " + "; ".join(r.failures + r.warnings) if r.failures or r.warnings else ""))


def run(full: bool = False, jobs: int = 1, arch: int = 90, only: str | None = None) -> list[Result]:
    """Compile the gate's variants (and the tutorial baseline) in ``jobs`` processes."""
    todo = baseline_variants() + variants(full)
    if only:
        todo = [v for v in todo if only in v.label]
    if jobs <= 1:
        return [compile_variant(v, arch) for v in todo]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_variant, todo, [arch] * len(todo), chunksize=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_gate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every dtype, more head dims, three modalities")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90: sm_90a)")
    parser.add_argument("--only", default=None, help="only variants whose label contains this text")
    parser.add_argument("--json", default=None, help="write every result to this file")
    parser.add_argument("--quiet", action="store_true", help="print failures, warnings and the summary only")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_gate: unset TRITON_INTERPRET (the gate compiles real kernels)", file=sys.stderr)
        return 2
    import triton

    start = time.perf_counter()
    results = run(args.full, args.jobs, args.arch, args.only)
    rows, loop_failures = loop_comparison(results)
    for r in results:
        if not args.quiet or r.failures or r.warnings:
            print(_format(r))
    print(f"\nforward main loop, SASS instructions per iteration (sm_{args.arch}a, bf16, {BASELINE_CONFIG}):")
    print("\n".join(rows) or "  (no comparable variant compiled)")
    failures = [f"{r.variant.label}: {f}" for r in results for f in r.failures] + loop_failures
    warnings = sum(len(r.warnings) for r in results)
    elapsed = time.perf_counter() - start
    print(f"\ncompile gate (triton {triton.__version__}, sm_{args.arch}a): {len(results)} compilations in "
          f"{elapsed:.0f} s with {args.jobs} jobs; {len(failures)} failures, {warnings} warnings")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"triton": triton.__version__, "arch": args.arch, "seconds": elapsed,
                       "results": [dict(asdict(r), variant=asdict(r.variant), label=r.variant.label)
                                   for r in results]}, fh, indent=1)
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
