"""Block sizes, autotune candidates and their pruning for the Triton kernels.

Every tuned kernel gets the union of its candidates; ``early_config_prune`` keeps those of the
call's dtype class (``half``: float16/bfloat16, ``fp32``, ``fp64``) and head dimension that fit
the problem, in preference order. The candidate lists were checked with
``python -m benchmarks.compile_gate``: every kept configuration compiles for ``sm_90a`` within
Hopper's shared memory, and the half-precision ones for ``Dh <= 128`` do not spill.

The autotune keys hold every argument the choice depends on and nothing batch-dependent:
the sizes ``Nq``/``N`` (all-query) or ``N`` (class-only), the head dimension, the number of
modalities and every constexpr variant flag; Triton adds the tensors' dtypes. So a training
run tunes once per variant, never again for a smaller last batch.

``ROLLINGQ_TRITON_AUTOTUNE=0`` turns benchmarking off: each kernel then runs the first kept
candidate (:data:`FIXED_ENV`). The choice depends only on the key, so results are bitwise
reproducible across processes on the same GPU model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from .._library import triton_interpret

#: Environment variable: ``0`` picks one configuration per key without benchmarking.
FIXED_ENV = "ROLLINGQ_TRITON_AUTOTUNE"

# Largest head dimension each mode supports (register / shared-memory budget of the tiles).
MAX_HEAD_DIM_ALL_QUERY = 256
MAX_HEAD_DIM_CLASS_ONLY = 1024


def autotune_enabled() -> bool:
    """False when ``ROLLINGQ_TRITON_AUTOTUNE=0``: one fixed configuration per key."""
    return os.environ.get(FIXED_ENV, "1").strip() not in ("0", "false", "no", "off")


def block_dim(head_dim: int) -> int:
    """``BLOCK_D``: the next power of two ``>= head_dim`` (at least 16, the smallest ``tl.dot`` size)."""
    return max(16, triton.next_power_of_2(head_dim))


def segment_pad(num_modalities: int) -> int:
    """``S_PAD``: a power of two ``>= M + 1`` (class + modalities), for per-segment vectors."""
    return max(2, triton.next_power_of_2(num_modalities + 1))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32-accurate ``tf32x3`` for float32, exact ``ieee`` otherwise."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def dtype_class(dtype: torch.dtype | str) -> str:
    """``"half"`` (float16/bfloat16), ``"fp32"`` or ``"fp64"``."""
    name = str(dtype).replace("torch.", "")
    if name in ("float16", "bfloat16", "fp16", "bf16"):
        return "half"
    if name in ("float32", "fp32"):
        return "fp32"
    if name in ("float64", "fp64"):
        return "fp64"
    raise ValueError(f"dtype: expected float16, bfloat16, float32 or float64, got {dtype}")


@dataclass(frozen=True)
class Candidate:
    """One autotune candidate and where it applies.

    Attributes:
        block_m, block_n: tile sizes (class-only kernels use ``block_n`` only).
        warps, stages: ``num_warps`` and ``num_stages``.
        dtypes: dtype classes it is offered for.
        max_head_dim: the largest ``BLOCK_D`` it is offered for.
    """

    block_m: int
    block_n: int
    warps: int
    stages: int
    dtypes: tuple[str, ...]
    max_head_dim: int
    maxnreg: int | None = None  # a register cap (two programs of 8 warps per SM at 128)
    with_dropout: bool = True  # False: not offered to dropout variants (they spill under the cap)

    def config(self, tiled_m: bool = True) -> triton.Config:
        kwargs = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n} if tiled_m else {"BLOCK_N": self.block_n}
        return triton.Config(kwargs, num_warps=self.warps, num_stages=self.stages, maxnreg=self.maxnreg)

    @property
    def key(self) -> tuple:
        return (self.block_m, self.block_n, self.warps, self.stages, self.maxnreg)


H, F32, F64 = ("half",), ("fp32",), ("fp64",)

# Preference order matters: with autotuning off the first kept candidate runs. ``max_head_dim``
# bounds BLOCK_D; candidates that spilled registers or ran past Hopper's shared memory in the
# compile gate are not offered for that head dimension.
FWD_CANDIDATES = (
    Candidate(128, 64, 8, 3, H, 64, maxnreg=128, with_dropout=False),
    Candidate(128, 64, 8, 3, H, 128),
    Candidate(64, 64, 4, 2, H, 128),
    Candidate(64, 32, 4, 2, H + F32, 256),
    Candidate(64, 64, 4, 2, F32, 64),
    Candidate(32, 32, 4, 2, H + F32, 256),
    Candidate(32, 32, 4, 1, F64, 256),
    Candidate(16, 32, 4, 1, F64, 256),
)
# dK/dV: the key tile (BLOCK_N) is the matrix tile's M, the loop runs over query tiles of BLOCK_M.
DKDV_CANDIDATES = (
    Candidate(32, 128, 8, 2, H, 64),
    Candidate(32, 64, 8, 2, H, 128),
    Candidate(32, 64, 4, 2, H + F32, 64),
    Candidate(32, 128, 8, 1, H, 64),
    Candidate(32, 64, 8, 1, H + F32, 256),
    Candidate(32, 32, 4, 2, H + F32, 64),
    Candidate(16, 32, 4, 1, F32 + F64, 256),
    Candidate(16, 16, 4, 1, F64, 256),
)
# dQ: the query tile (BLOCK_M) is the matrix tile's M, the loop runs over key tiles of BLOCK_N.
DQ_CANDIDATES = (
    Candidate(128, 64, 8, 2, H, 128),
    Candidate(128, 32, 8, 2, H, 128),
    Candidate(64, 64, 4, 2, H, 64),
    Candidate(64, 32, 4, 2, H + F32, 256),
    Candidate(32, 32, 4, 2, H + F32, 256),
    Candidate(32, 16, 4, 1, F32 + F64, 256),
    Candidate(16, 16, 4, 1, F64, 256),
)
# Class-only kernels are memory-bound loops over key tiles of BLOCK_N rows. With several warps the
# reductions over the head dimension and over the keys cross warps (shared memory and barriers:
# 12-22 per tile); one-warp programs reduce with shuffles only (no barrier, about 40 % fewer
# instructions per key in the compile gate) but hold fewer loads in flight per program.
CLASS_ONLY_CANDIDATES = (
    Candidate(1, 32, 4, 2, H + F32, 128),
    Candidate(1, 32, 8, 2, H + F32, 512),
    Candidate(1, 16, 8, 2, H + F32 + F64, 1024),
    Candidate(1, 16, 1, 2, H + F32, 64),
    Candidate(1, 4, 1, 2, H, 512),
    Candidate(1, 4, 1, 2, F32, 256),
    Candidate(1, 2, 1, 2, H, 1024),
    Candidate(1, 8, 4, 1, F64, 256),
)

_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


def _configs(candidates: Sequence[Candidate], tiled_m: bool) -> list[triton.Config]:
    """The autotuner's list: every candidate on GPU, one small config under the interpreter."""
    if triton_interpret():
        kwargs = dict(_INTERPRETER_CONFIG) if tiled_m else {"BLOCK_N": _INTERPRETER_CONFIG["BLOCK_N"]}
        return [triton.Config(kwargs, num_warps=1, num_stages=1)]
    seen: dict[tuple, triton.Config] = {}
    for c in candidates:
        seen.setdefault(c.key, c.config(tiled_m))
    return list(seen.values())


FWD_CONFIGS = _configs(FWD_CANDIDATES, tiled_m=True)
DKDV_CONFIGS = _configs(DKDV_CANDIDATES, tiled_m=True)
DQ_CONFIGS = _configs(DQ_CANDIDATES, tiled_m=True)
CLASS_ONLY_CONFIGS = _configs(CLASS_ONLY_CANDIDATES, tiled_m=False)

#: Autotune keys (Triton appends the tensors' dtypes).
ALL_QUERY_KEY = ["Nq", "N", "HEAD_DIM", "NUM_MOD", "HAS_LENGTHS", "DROPOUT", "ROTATED"]
CLASS_ONLY_KEY = ["N", "HEAD_DIM", "NUM_MOD", "HAS_LENGTHS", "DROPOUT", "STATS", "WITH_V"]
CLASS_ONLY_BWD_KEY = ["N", "HEAD_DIM", "NUM_MOD", "HAS_LENGTHS", "DROPOUT"]


def _arg(named_args: dict, kwargs: dict, name: str):
    return kwargs[name] if name in kwargs else named_args[name]


def _size(x) -> int:
    """A size argument as an int (a symbolic size while ``torch.compile`` traces: its hint)."""
    try:
        return int(x)
    except TypeError:  # pragma: no cover - symbolic sizes
        return int(getattr(x, "node", x).hint)


def _key_of(cfg: triton.Config) -> tuple:
    return (cfg.kwargs.get("BLOCK_M", 1), cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages,
            getattr(cfg, "maxnreg", None))


def select_candidates(candidates: Sequence[Candidate], dtype, block_d: int, max_m: int,
                      max_n: int, dropout: bool = False) -> list[Candidate]:
    """Candidates offered for (dtype class, ``block_d``, dropout) whose blocks fit ``max_m`` x ``max_n``, in order.

    Never empty: when nothing fits, the smallest offered candidate stays.
    """
    cls = dtype_class(dtype)
    offered = [c for c in candidates
               if cls in c.dtypes and block_d <= c.max_head_dim and (c.with_dropout or not dropout)]
    if not offered:
        raise ValueError(f"no Triton configuration for dtype {dtype} and BLOCK_D = {block_d}")
    fitting = [c for c in offered if c.block_m <= max_m and c.block_n <= max_n]
    return fitting or sorted(offered, key=lambda c: (c.block_m * c.block_n, c.stages))[:1]


def _prune(configs: list[triton.Config], candidates: Sequence[Candidate], dtype, block_d: int,
           max_m: int, max_n: int, dropout: bool) -> list[triton.Config]:
    """The autotuner's configs of :func:`select_candidates`; only the first with autotuning off."""
    if triton_interpret():
        return configs[:1]
    by_key = {_key_of(c): c for c in configs}
    kept: list[triton.Config] = []
    for c in select_candidates(candidates, dtype, block_d, max_m, max_n, dropout):
        cfg = by_key[c.key]
        if cfg not in kept:
            kept.append(cfg)
    return kept if autotune_enabled() else kept[:1]


def _cap(n: int) -> int:
    """Largest useful block for ``n`` rows: blocks beyond ``next_power_of_2(n)`` are pure padding."""
    return max(16, triton.next_power_of_2(max(n, 1)))


def _prune_all_query(configs, candidates, named_args, kwargs):
    return _prune(configs, candidates, named_args["Q"].dtype, _arg(named_args, kwargs, "BLOCK_D"),
                  _cap(_size(named_args["Nq"])), _cap(_size(named_args["N"])),
                  bool(_arg(named_args, kwargs, "DROPOUT")))


def prune_all_query_fwd(configs, named_args, **kwargs):
    """``early_config_prune`` of the all-query forward."""
    return _prune_all_query(configs, FWD_CANDIDATES, named_args, kwargs)


def prune_all_query_dkdv(configs, named_args, **kwargs):
    """``early_config_prune`` of the all-query dK/dV kernel."""
    return _prune_all_query(configs, DKDV_CANDIDATES, named_args, kwargs)


def prune_all_query_dq(configs, named_args, **kwargs):
    """``early_config_prune`` of the all-query dQ kernel."""
    return _prune_all_query(configs, DQ_CANDIDATES, named_args, kwargs)


def prune_class_only(configs, named_args, **kwargs):
    """``early_config_prune`` of the class-only kernels (depends on ``N``, never on the batch)."""
    return _prune(configs, CLASS_ONLY_CANDIDATES, named_args["K"].dtype, _arg(named_args, kwargs, "BLOCK_D"),
                  1, _cap(_size(named_args["N"])), bool(_arg(named_args, kwargs, "DROPOUT")))


@functools.lru_cache(maxsize=8)
def _bench(warmup: int, rep: int):
    import triton.testing

    def do_bench(kernel_call, quantiles=None, **kw):
        return triton.testing.do_bench(kernel_call, warmup=warmup, rep=rep, quantiles=quantiles)

    return do_bench


def autotune(configs: list[triton.Config], key: list[str], prune):
    """``triton.autotune`` with short benchmarks (10 ms warm-up, 40 ms timed per candidate)."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           do_bench=_bench(10, 40))
