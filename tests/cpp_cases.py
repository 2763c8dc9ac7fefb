"""Inputs, cases and comparisons shared by the tests of the C++ kernels (``rollingq_kernels._C``).

``test_cpp_kernels.py`` (the numerics of csrc/forward.cpp and backward.cpp), ``test_cpp_ops.py`` (the
registered ops of csrc/ops.cpp: schemas, argument checks, opcheck, torch.compile) and
``test_cpu_capability.py`` (csrc/cpu_capability.cpp and the per-level units of csrc/cpu/) use them; the
``cpu_level`` fixture is in ``conftest.py``.
"""

from __future__ import annotations

import torch

import rollingq_kernels
from rollingq_kernels import rollingq_attention
from rollingq_kernels.stats import STATISTICS

if rollingq_kernels.HAS_CPP:
    from rollingq_kernels import _C

    LEVELS = _C.supported_cpu_capabilities()
else:
    LEVELS = ()

STAT_FIELDS = tuple(s.name for s in STATISTICS)  # every statistic of the table


def make_inputs(B, H, N, Dh, dtype, class_only=False, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    nq = 1 if class_only else N
    q = torch.randn(B, H, nq, Dh, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def random_rotation(kind, H, Dh, gen_seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(gen_seed)
    if kind == "global":
        return torch.linalg.qr(torch.randn(H * Dh, H * Dh, generator=g, dtype=torch.float64))[0]
    return torch.linalg.qr(torch.randn(H, Dh, Dh, generator=g, dtype=torch.float64))[0]


def run(backend, q, k, v, segments, grad_out=None, **kw):
    """Forward (and backward with grad_out) on fresh leaf copies; returns out, stats, grads."""
    leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v)]
    out, stats = rollingq_attention(*leaves, segments, backend=backend, **kw)
    grads = None
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        grads = [t.grad for t in leaves]
    return out.detach(), stats, grads


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * expected.abs().max().item() if expected.numel() else atol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


# (B, H, Dh, segments, lengths, class_only, rotation)
CASES = {
    "aq-plain-prime": (2, 3, 16, (7, 11), None, False, None),
    "aq-lengths-empty-modality": (3, 2, 32, (13, 5), [[13, 0], [4, 5], [1, 2]], False, "global"),
    "aq-one-token-modality": (2, 2, 64, (1, 17), [[1, 9], [0, 17]], False, "per_head"),
    "aq-M3-odd": (2, 1, 80, (5, 9, 3), [[3, 9, 1], [5, 0, 2]], False, "global"),
    "aq-dh128-bh1": (1, 1, 128, (29, 31), [[17, 23]], False, None),
    "aq-multi-tile": (2, 1, 16, (300, 333), [[211, 333], [300, 97]], False, "per_head"),
    # varlen tiling: sample 0 has a 107-key gap (tiles split), sample 1 a 1-key gap (kept inside a tile)
    "aq-varlen-gaps": (2, 2, 24, (90, 37, 120), [[20, 0, 100], [90, 36, 3]], False, "global"),
    "aq-varlen-dh768": (2, 1, 768, (61, 70), [[5, 70], [61, 2]], False, None),  # many small key tiles
    "co-plain": (3, 2, 32, (11, 13), None, True, "global"),
    "co-lengths-M3": (4, 2, 16, (6, 1, 9), [[6, 1, 0], [0, 0, 9], [2, 1, 3], [5, 0, 7]], True, "per_head"),
    "co-dh768-bh1": (1, 1, 768, (3, 4), [[2, 4]], True, None),
    "co-multi-tile": (2, 1, 64, (601, 47), [[599, 47], [1, 0]], True, "global"),
}


def case_inputs(name, dtype):
    B, H, Dh, segs, lengths, class_only, rot = CASES[name]
    N = 1 + sum(segs)
    q, k, v = make_inputs(B, H, N, Dh, dtype, class_only)
    lengths_t = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
    return q, k, v, list(segs), lengths_t, random_rotation(rot, H, Dh)


def fwd_args(q, k, v, segs, lengths, rotation, dropout_p=0.0, seed=0, compute_stats=True):
    return (q, k, v, segs, lengths, rotation, q.shape[-1] ** -0.5, dropout_p, seed, compute_stats)


LOW_PRECISION_TOLERANCE = {torch.bfloat16: (2.0, 8e-3), torch.float16: (2.0, 1e-3)}
"""dtype -> (factor, atol): the C++ kernels' error against the float64 reference may be ``factor`` times the
eager reference's error in that dtype, plus ``atol`` (docs/op.md, the tolerance table)."""


def check_reduced_precision(name, dtype, seed, stats, label, stat_atol=None):
    """The C++ kernels in ``dtype`` on case ``name`` within :data:`LOW_PRECISION_TOLERANCE` of the float64
    reference: the output, dq, dk, dv, and each statistic of ``stats`` (its floor ``stat_atol``, default the
    table's atol); ``label`` prefixes the messages."""
    factor, atol = LOW_PRECISION_TOLERANCE[dtype]
    q, k, v, segs, lengths, rotation = case_inputs(name, dtype)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    kw = dict(lengths=lengths, rotation=rotation)
    exact = run("reference", q.double(), k.double(), v.double(), segs, grad_out=g.double(), **kw)
    eager = run("reference", q, k, v, segs, grad_out=g, **kw)
    cpp = run("cpp", q, k, v, segs, grad_out=g, **kw)
    pairs = [("out", cpp[0], eager[0], exact[0], atol)]
    pairs += [(f"d{n}", a, b, c, atol) for n, a, b, c in zip("qkv", cpp[2], eager[2], exact[2])]
    pairs += [(f"stats.{f}", getattr(cpp[1], f), getattr(eager[1], f), getattr(exact[1], f),
               atol if stat_atol is None else stat_atol) for f in stats]
    for what, ours, theirs, ref, floor in pairs:
        assert ours.dtype == theirs.dtype, f"{label} {what}: {ours.dtype} vs the eager {theirs.dtype}"
        eager_err = (theirs.double() - ref.double()).abs().max().item()
        assert_close(ours, ref, factor * eager_err + floor, what=f"{label} {what} (eager error {eager_err:.2e})")
