"""Validation of the op's inputs, shared by every backend (see ``docs/op.md``).

Every check raises before any kernel runs, with a message that names the
argument, what it got and what was expected.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .dropout import SEED_LIMIT

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "cpp", "triton", "reference", "flex")
INDEX_LIMIT = 2**31
"""``N·Dh`` must be below this on every backend (32-bit offsets within one ``(b, h)`` slice)."""


@dataclass(frozen=True)
class OpShape:
    """Sizes of one call.

    Attributes:
        batch, heads: ``B`` and ``H``.
        n_query: ``Nq``, the query rows: ``N`` (all-query) or 1 (class-query-only).
        n_keys: ``N = 1 + sum(segments)``.
        head_dim: ``Dh``.
        segments: the padded modality sizes ``(L_1, …, L_M)``.
    """

    batch: int
    heads: int
    n_query: int
    n_keys: int
    head_dim: int
    segments: tuple[int, ...]

    @property
    def class_query_only(self) -> bool:
        """Only the class token queries (``Nq == 1``)."""
        return self.n_query == 1


#: Environment variable: ``1`` runs the value checks on CUDA too (each one synchronises with the host).
DEBUG_CHECKS_ENV = "ROLLINGQ_DEBUG_CHECKS"


def _tracing() -> bool:
    """Value checks (a host sync) are skipped while torch.compile traces; the kernels check again."""
    return torch.compiler.is_compiling()


def _reads_values(device: torch.device) -> bool:
    """Whether checks that read tensor values run for tensors on ``device``.

    Never while tracing or on the meta device (no values); on CUDA only with ``ROLLINGQ_DEBUG_CHECKS=1`` (reading
    a value back synchronises with the GPU; the Triton kernels clamp ``lengths`` instead, see ``docs/op.md``).
    """
    if _tracing() or device.type == "meta":
        return False
    return device.type != "cuda" or os.environ.get(DEBUG_CHECKS_ENV, "0") not in ("", "0")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_alike(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``q, k, v`` share one dtype and one device, and ``v`` has the shape of ``k`` (every backend's rule)."""
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise TypeError(f"q, k, v: expected one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {_shape(k)}, got {_shape(v)}")


def check_segments(segments: Sequence[int], n_keys: int | None = None) -> tuple[int, ...]:
    """Validate ``segments`` (M ≥ 2 positive ints) and, if given, ``N == 1 + sum``."""
    if isinstance(segments, torch.Tensor):
        segments = segments.tolist()
    try:
        segs = tuple(operator.index(s) for s in segments)
    except TypeError as exc:
        raise TypeError(f"segments: expected a sequence of ints, got {segments!r}") from exc
    if len(segs) < 2:
        raise ValueError(f"segments: expected at least 2 modalities, got {len(segs)} ({segs})")
    if any(s < 1 for s in segs):
        raise ValueError(f"segments: every padded size must be >= 1, got {segs}")
    if n_keys is not None and n_keys != 1 + sum(segs):
        raise ValueError(
            f"segments: N must equal 1 + sum(segments) = {1 + sum(segs)} for segments {segs}, "
            f"but k has N = {n_keys}"
        )
    return segs


def check_scale(scale: float, dtype: torch.dtype) -> None:
    """``scale`` is a finite real number representable in the compute dtype of ``dtype`` inputs.

    The scores are ``scale · q kᵀ`` in the compute dtype (float64 for float64 inputs, float32
    otherwise): ``|scale|`` must not exceed its largest finite value, and a non-zero scale must be at
    least its smallest normal value (below it, it rounds towards 0).
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError as exc:  # an int beyond float64
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}") from exc
    if not math.isfinite(value):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    c = torch.float64 if dtype == torch.float64 else torch.float32
    info = torch.finfo(c)
    if abs(value) > info.max:
        raise ValueError(
            f"scale: {scale!r} overflows the {str(c).replace('torch.', '')} scores of {dtype} inputs; "
            f"expected |scale| <= {info.max:.4g}"
        )
    if value != 0.0 and abs(value) < info.smallest_normal:
        raise ValueError(
            f"scale: {scale!r} underflows the {str(c).replace('torch.', '')} scores of {dtype} inputs; "
            f"expected 0 or |scale| >= {info.smallest_normal:.4g}"
        )


def _all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` holds no NaN or inf.

    One reduction (``aminmax`` propagates NaN, and an inf is the min or the max)
    instead of an element-wise ``isfinite`` mask: ~20x faster on a 768x768 matrix.
    """
    if t.numel() == 0:
        return True
    if not t.is_contiguous() and t.mT.is_contiguous():
        t = t.mT  # same elements; reductions over a transposed layout are ~20x slower
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_rotation_values(rotation: torch.Tensor | None) -> None:
    """``rotation`` holds no NaN or inf (skipped while tracing and, without the debug flag, on CUDA).

    Not part of :func:`check_inputs`: the C++ kernels make the same check on
    their own for free (on the rotated query), so the CPU path skips this one.
    """
    if rotation is not None and _reads_values(rotation.device) and not _all_finite(rotation):
        raise ValueError("rotation: expected finite values, got NaN or inf")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Sequence[int],
    lengths: torch.Tensor | None,
    rotation: torch.Tensor | None,
    scale: float | None,
    dropout_p: float,
    seed: int | None,
    backend: str,
) -> OpShape:
    """Check every argument of ``rollingq_attention``; return the call's sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d tensor (B, H, N, Dh), got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}"
            )
    check_alike(q, k, v)
    B, H, N, Dh = k.shape
    if Dh < 1:
        raise ValueError(f"k: expected Dh >= 1 (B = 0 or H = 0 are accepted), got shape {_shape(k)}")
    if N * Dh >= INDEX_LIMIT:
        raise ValueError(f"k: N * Dh must be below 2**31, got N * Dh = {N} * {Dh} = {N * Dh} (shape {_shape(k)})")
    if q.shape[0] != B or q.shape[1] != H or q.shape[3] != Dh or q.shape[2] not in (1, N):
        raise ValueError(
            f"q: expected shape ({B}, {H}, {N}, {Dh}) (all-query) or ({B}, {H}, 1, {Dh}) "
            f"(class-query-only), got {_shape(q)}"
        )
    segs = check_segments(segments, N)
    M = len(segs)
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths: expected a ({B}, {M}) integer tensor, got {type(lengths).__name__}")
        if lengths.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            raise TypeError(f"lengths: expected an integer dtype, got {lengths.dtype}")
        if tuple(lengths.shape) != (B, M):
            raise ValueError(f"lengths: expected shape ({B}, {M}), got {_shape(lengths)}")
        if lengths.device != q.device:
            raise TypeError(f"lengths: expected device {q.device}, got {lengths.device}")
        if lengths.numel() and _reads_values(lengths.device):
            caps = torch.tensor(segs, device=lengths.device, dtype=torch.int64)
            bad = (lengths.to(torch.int64) < 0) | (lengths.to(torch.int64) > caps)
            if bool(bad.any()):
                b, m = (int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"lengths: expected 0 <= lengths[b, m] <= segments[m]; "
                    f"lengths[{b}, {m}] = {int(lengths[b, m])} with segments[{m}] = {segs[m]}"
                )
    if rotation is not None:
        if not isinstance(rotation, torch.Tensor):
            raise TypeError(f"rotation: expected a tensor or None, got {type(rotation).__name__}")
        if rotation.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"rotation: expected float32 or float64, got {rotation.dtype}")
        if rotation.device != q.device:
            raise TypeError(f"rotation: expected device {q.device}, got {rotation.device}")
        glob, per_head = (H * Dh, H * Dh), (H, Dh, Dh)
        if tuple(rotation.shape) not in (glob, per_head):
            raise ValueError(
                f"rotation: expected shape {glob} (global) or {per_head} (per head), "
                f"got {_shape(rotation)}"
            )
        if rotation.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "rotation: requires_grad=True, but the rotation gets no gradient on any backend "
                "(docs/op.md); pass rotation.detach(), or call the op under torch.no_grad()"
            )
    if scale is not None:
        check_scale(scale, q.dtype)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if seed is not None and not _tracing():
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected None or an int in [0, 2**31), got {type(seed).__name__}")
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed: expected None or an int in [0, 2**31), got {seed!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "flex":
        check_flex(q, float(dropout_p))
    return OpShape(B, H, q.shape[2], N, Dh, segs)


def check_flex(q: torch.Tensor, dropout_p: float) -> None:
    """What ``backend="flex"`` cannot do: dropout (FlexAttention has none), float64 on CPU (compiled Flex)."""
    if dropout_p > 0.0:
        raise ValueError(
            f"dropout_p: backend='flex' has no dropout (FlexAttention has none), got dropout_p={dropout_p!r}; "
            "pass dropout_p=0.0, or use backend='cpp', 'triton' or 'reference'"
        )
    if q.device.type == "cpu" and q.dtype == torch.float64:
        raise TypeError(
            "q: backend='flex' on CPU runs compiled FlexAttention, which supports float32, float16 and bfloat16, "
            "got float64; use backend='reference' or 'cpp' for float64"
        )
