"""Inputs, tolerances and comparisons shared by the tests of the Triton kernels (``rollingq_kernels/triton``).

They run in Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set before Triton is imported; CI's
step of ``.ci/run``) or on a CUDA GPU; each test module calls :func:`skip_without_triton` first, before
it imports ``rollingq_kernels.triton``. Tests: ``test_triton_kernels.py`` (the kernels against the
float64 reference), ``test_triton_launch.py`` (launchers, tables, registration) and
``test_triton_configs.py`` (the tile candidates and autotuning keys).
"""

from __future__ import annotations

import os

import pytest
import torch

from rollingq_kernels import rollingq_attention
from rollingq_kernels.stats import STATISTICS

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
COLLECT_ONLY = os.environ.get("ROLLINGQ_COLLECT_ONLY") == "1"  # benchmarks/run_gpu.sh --dry-run lists the cases
DEVICE = torch.device("cpu" if INTERPRET else "cuda")


def skip_without_triton() -> None:
    """Skip the calling test module unless Triton's interpreter is on or a CUDA GPU is there."""
    if not INTERPRET and not torch.cuda.is_available() and not COLLECT_ONLY:
        pytest.skip("needs TRITON_INTERPRET=1 (Triton's CPU interpreter) or a CUDA GPU", allow_module_level=True)


# (atol = rtol) of the Triton result against the float64 reference computed from the same
# (already rounded) inputs. float64 gradients are limited by the float32 log-sum-exp the
# forward saves (the contract's lse dtype); float16/bfloat16 by the rounding of P and dS to
# the input dtype before the tile matmuls, as in every flash-attention kernel.
TOL = {
    torch.float64: {"out": 1e-10, "grad": 1e-6},
    torch.float32: {"out": 1e-5, "grad": 1e-5},
    torch.float16: {"out": 2e-3, "grad": 4e-3},
    torch.bfloat16: {"out": 2e-2, "grad": 3e-2},
}

FLOAT_STATS = tuple(s.name for s in STATISTICS if s.dtype.is_floating_point)  # every float statistic

STATS_TOL = 2e-5  # statistics are float32 and computed from exact products in every dtype

def make_inputs(B, H, N, Dh, class_only, dtype, seed):
    """Random float64 ``q, k, v`` cast to ``dtype`` and a float64 upstream gradient (``nq = 1`` class-only)."""
    g = torch.Generator().manual_seed(seed)
    nq = 1 if class_only else N
    q = torch.randn(B, H, nq, Dh, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, H, nq, Dh, generator=g, dtype=torch.float64)
    return q, k, v, grad

def random_rotation(kind, H, Dh, seed):
    """None, a global ``(H·Dh, H·Dh)`` float64 or a per-head ``(H, Dh, Dh)`` float32 orthogonal matrix."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "global":
        return torch.linalg.qr(torch.randn(H * Dh, H * Dh, generator=g, dtype=torch.float64))[0]
    return torch.linalg.qr(torch.randn(H, Dh, Dh, generator=g, dtype=torch.float64))[0].float()

def run(backend, q, k, v, grad, segments, dtype, device, **kw):
    """Forward + backward with ``backend``; inputs cast to ``dtype`` on ``device``."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    kw = dict(kw)
    if kw.get("lengths") is not None:
        kw["lengths"] = kw["lengths"].to(device)
    if kw.get("rotation") is not None:
        kw["rotation"] = kw["rotation"].to(device)
    out, stats = rollingq_attention(*leaves, segments, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, grad.to(device=device, dtype=dtype))
    return out.detach(), stats, grads

def compare(segments, *, B=2, H=2, Dh=24, class_only=False, dtype=torch.float32, lengths=None,
             rotation_kind=None, dropout_p=0.0, seed=0, compute_stats=True):
    """Triton against the float64 reference: output, gradients and every float statistic within ``TOL``."""
    N = 1 + sum(segments)
    q, k, v, grad = make_inputs(B, H, N, Dh, class_only, dtype, seed)
    rot = random_rotation(rotation_kind, H, Dh, seed + 1)
    kw = dict(lengths=lengths, rotation=rot, dropout_p=dropout_p, seed=1234 + seed, compute_stats=compute_stats)
    out, stats, grads = run("triton", q, k, v, grad, segments, dtype, DEVICE, **kw)
    ref_kw = dict(kw, rotation=None if rot is None else rot.double())
    r_out, r_stats, r_grads = run("reference", q, k, v, grad, segments, torch.float64, torch.device("cpu"), **ref_kw)
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.cpu().double(), r_out, atol=tol["out"], rtol=tol["out"])
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.cpu().double(), r, atol=tol["grad"], rtol=tol["grad"],
                                   msg=lambda m, name=name: f"{name}: {m}")
    if not compute_stats:
        assert stats is None
        return out, grads, lengths
    for field in FLOAT_STATS:
        a, r = getattr(stats, field), getattr(r_stats, field)
        assert a.dtype == torch.float32, field
        torch.testing.assert_close(a.cpu().double(), r.double(), atol=STATS_TOL, rtol=STATS_TOL,
                                   msg=lambda m, field=field: f"{field}: {m}")
    assert torch.equal(stats.valid.cpu(), r_stats.valid)
    return out, grads, lengths

LENGTHS_2 = torch.tensor([[5, 11], [7, 3]])  # segments (7, 11): odd lengths, one full modality

LENGTHS_3 = torch.tensor([[3, 0, 4], [5, 6, 1]])  # segments (5, 7, 4): an empty modality
