"""Shared pieces of the op's fuzz tests (``test_fuzz_op.py`` for C++, ``test_fuzz_triton.py`` for Triton).

Hypothesis draws the structure of a call (shapes, segments, lengths with 0 and full ones, rotation
kind and layout, scale, dropout, dtype, contiguity); the tensors come from a torch generator seeded by a
drawn integer. :func:`compare` runs a backend and the float64 reference on the same (rounded) inputs
and compares ``out``, every statistic and the three gradients.

Profiles (``ROLLINGQ_FUZZ`` environment variable): ``ci`` (default; derandomized, fixed example
counts, no shrinking, no example database: bounded time and the same cases on every run) and ``dev``
(random, more examples, shrinking).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from rollingq_kernels import rollingq_attention
from rollingq_kernels.reference import key_valid_mask
from rollingq_kernels.stats import STATISTICS

settings.register_profile(
    "ci", derandomize=True, deadline=None, database=None, print_blob=True,
    phases=(Phase.explicit, Phase.generate), suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", deadline=None, print_blob=True, max_examples=300, suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get("ROLLINGQ_FUZZ", "ci")
settings.load_profile(PROFILE)


def examples(ci: int) -> int:
    """``ci`` examples in the CI profile, the profile's own count otherwise."""
    return ci if PROFILE == "ci" else settings().max_examples


STAT_FIELDS = tuple(s.name for s in STATISTICS if s.dtype.is_floating_point)  # every float statistic of the table
# (out, grad) absolute = relative tolerance against the float64 reference of the same rounded inputs;
# float16/bfloat16 use the eager reference's own error in that dtype (see compare()).
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-5, 2e-4)}
# (factor, atol): within factor x the eager reference's own error plus 4 units of the dtype's epsilon
# (2**-10, 2**-7): the kernels round P and dS to the input dtype before their tile matmuls, eager does not
LOW_PRECISION = {torch.float16: (2.0, 4 * 2**-10), torch.bfloat16: (2.0, 4 * 2**-7)}
STATS_TOL = 5e-5


@dataclass
class Case:
    B: int
    H: int
    Dh: int
    segments: list[int]
    lengths: list[list[int]] | None
    class_only: bool
    rotation: str | None  # None, "global", "per_head"
    rotation_transposed: bool
    rotation_dtype: torch.dtype
    scale: float | None
    dropout_p: float
    dtype: torch.dtype
    layout: str  # "contiguous", "transposed" (B, N, H, Dh storage), "sliced" (a slice of a wider Dh)
    seed: int

    @property
    def N(self) -> int:
        return 1 + sum(self.segments)


@st.composite
def cases(draw, *, max_batch=3, max_heads=3, head_dims=(1, 2, 3, 5, 8, 16, 33), max_segment=20,
          dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16), min_batch=1, min_heads=1,
          need_padding=False) -> Case:
    """A random valid call. ``need_padding``: at least one padded key (some length below its segment)."""
    B = draw(st.integers(min_batch, max_batch))
    H = draw(st.integers(min_heads, max_heads))
    Dh = draw(st.sampled_from(head_dims))
    M = draw(st.integers(2, 3))
    segments = draw(st.lists(st.integers(1, max_segment), min_size=M, max_size=M))
    lengths = None
    if need_padding or draw(st.booleans()):
        # each length: 0, full, or anything between (0 and full drawn often)
        lengths = [[draw(st.one_of(st.just(0), st.just(L), st.integers(0, L))) for L in segments] for _ in range(B)]
        if need_padding and B and all(lengths[b][m] == segments[m] for b in range(B) for m in range(M)):
            b, m = draw(st.integers(0, B - 1)), draw(st.integers(0, M - 1))
            lengths[b][m] = draw(st.integers(0, segments[m] - 1))
    return Case(
        B=B, H=H, Dh=Dh, segments=segments, lengths=lengths,
        class_only=draw(st.booleans()),
        rotation=draw(st.sampled_from([None, "global", "per_head"])),
        rotation_transposed=draw(st.booleans()),
        rotation_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        scale=draw(st.one_of(st.none(), st.floats(-1.5, 1.5, allow_nan=False).filter(lambda s: abs(s) > 1e-3))),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.45])),
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (B, H, n, Dh) in another memory layout."""
    if layout == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        wide[..., 1 : 1 + t.shape[-1]] = t
        return wide[..., 1 : 1 + t.shape[-1]]
    return t


def _rotation(case: Case, g: torch.Generator) -> torch.Tensor | None:
    if case.rotation is None:
        return None
    H, Dh = case.H, case.Dh
    if case.rotation == "global":
        r = torch.linalg.qr(torch.randn(H * Dh, H * Dh, generator=g, dtype=torch.float64))[0]
    else:
        r = torch.linalg.qr(torch.randn(H, Dh, Dh, generator=g, dtype=torch.float64))[0]
    r = r.to(case.rotation_dtype)
    if case.rotation_transposed:  # same matrix, stored transposed
        r = r.mT.contiguous().mT
    return r


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad: torch.Tensor
    lengths: torch.Tensor | None
    rotation: torch.Tensor | None
    padded_keys: torch.Tensor  # (B, 1, N, 1) bool


def make_inputs(case: Case) -> Inputs:
    g = torch.Generator().manual_seed(case.seed)
    nq = 1 if case.class_only else case.N
    q = torch.randn(case.B, case.H, nq, case.Dh, generator=g, dtype=torch.float64).to(case.dtype)
    k = torch.randn(case.B, case.H, case.N, case.Dh, generator=g, dtype=torch.float64).to(case.dtype)
    v = torch.randn(case.B, case.H, case.N, case.Dh, generator=g, dtype=torch.float64).to(case.dtype)
    grad = torch.randn(q.shape, generator=g, dtype=torch.float64).to(case.dtype)
    lengths = None
    if case.lengths is not None:  # (B, M); explicit M so that B = 0 reshapes
        lengths = torch.tensor(case.lengths, dtype=torch.int64).view(case.B, len(case.segments))
    pad = ~key_valid_mask(lengths, case.segments, case.B, torch.device("cpu"))[:, None, :, None]
    return Inputs(q, k, v, grad, lengths, _rotation(case, g), pad)


def poison(inputs: Inputs, value: float = float("nan")) -> Inputs:
    """``value`` in every padded key and value and every padded query row (all-query)."""
    pad = inputs.padded_keys
    q = inputs.q.masked_fill(pad, value) if inputs.q.shape[2] > 1 else inputs.q
    return Inputs(q, inputs.k.masked_fill(pad, value), inputs.v.masked_fill(pad, value), inputs.grad,
                  inputs.lengths, inputs.rotation, pad)


def run(backend: str, case: Case, inputs: Inputs, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Forward + backward; inputs cast to ``dtype`` (default the case's) and laid out as the case says."""
    dtype = dtype or case.dtype
    leaves = [_laid_out(t.to(dtype), case.layout).to(device).requires_grad_() for t in (inputs.q, inputs.k, inputs.v)]
    lengths = None if inputs.lengths is None else inputs.lengths.to(device)
    rotation = None if inputs.rotation is None else inputs.rotation.to(device)
    out, stats = rollingq_attention(
        *leaves, case.segments, lengths=lengths, rotation=rotation, scale=case.scale, dropout_p=case.dropout_p,
        seed=case.seed % 1000, backend=backend,
    )
    grads = torch.autograd.grad(out, leaves, inputs.grad.to(device=device, dtype=out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return out.detach().cpu(), stats, [gr.cpu() for gr in grads]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(what: str, ours: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    bound = atol + rtol * (ref.double().abs().max().item() if ref.numel() else 0.0)
    err = _max_err(ours, ref)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def compare(backend: str, case: Case, inputs: Inputs, reference_inputs: Inputs | None = None,
            device: str = "cpu", tol: dict | None = None) -> None:
    """``backend`` on ``inputs`` against the float64 reference on ``reference_inputs`` (default the same).

    ``tol``: ``{dtype: (out, grad)}`` for float64/float32 (default :data:`TOL`)."""
    tol = TOL if tol is None else tol
    ours = run(backend, case, inputs, device=device)
    exact = run("reference", case, reference_inputs or inputs, dtype=torch.float64)
    out, stats, grads = ours
    assert out.dtype == case.dtype and out.shape == inputs.q.shape
    if case.dtype in tol:
        tol_out, tol_grad = tol[case.dtype]
        bounds = [tol_out] + [tol_grad] * 3
        stat_bounds = [STATS_TOL] * len(STAT_FIELDS)
    else:  # within FACTOR x the eager reference's own error in this dtype, plus ATOL
        factor, atol = LOW_PRECISION[case.dtype]
        eager = run("reference", case, reference_inputs or inputs)
        bounds = [factor * _max_err(a, b) + atol for a, b in zip([eager[0], *eager[2]], [exact[0], *exact[2]])]
        stat_bounds = [factor * _max_err(getattr(eager[1], f), getattr(exact[1], f)) + STATS_TOL
                       for f in STAT_FIELDS]
    _check("out", out, exact[0], bounds[0], bounds[0])
    for name, a, b, bound in zip(("dq", "dk", "dv"), grads, exact[2], bounds[1:]):
        assert a.dtype == case.dtype, name
        _check(name, a, b, bound, bound)
    for field, bound in zip(STAT_FIELDS, stat_bounds):
        _check(f"stats.{field}", getattr(stats, field).cpu(), getattr(exact[1], field), bound, bound)
    assert torch.equal(stats.valid.cpu(), exact[1].valid)
    pad = inputs.padded_keys
    padded = pad.expand(case.B, case.H, case.N, case.Dh)
    assert (grads[1][padded] == 0).all() and (grads[2][padded] == 0).all(), "dk/dv of padded keys must be 0"
    if not case.class_only:
        assert (out[padded] == 0).all() and (grads[0][padded] == 0).all(), "padded query rows must be 0"
