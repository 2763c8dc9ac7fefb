"""``backend="flex"`` (FlexAttention) against the float64 reference on CPU (float32: compiled Flex on CPU).

Every new shape compiles Flex again (seconds each), so the cases share two shapes: all-query and
class-only, with lengths (an empty modality) and NaN in every padded position.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from rollingq_kernels import ops, rollingq_attention
from rollingq_kernels.reference import key_valid_mask
from rollingq_kernels.stats import STATISTICS

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch.nn.attention.flex_attention") is None, reason="FlexAttention is missing"
)

SEGS = [4, 3, 5]
LENGTHS = torch.tensor([[4, 0, 2], [1, 3, 5], [3, 2, 1]])
ATOL = 2e-5  # float32 Flex against the float64 reference


def _case(class_only: bool, seed: int = 0, padded: bool = True):
    g = torch.Generator().manual_seed(seed)
    B, H, Dh = 3, 2, 5
    N = 1 + sum(SEGS)
    q = torch.randn(B, H, 1 if class_only else N, Dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64) for _ in range(2))
    if padded:
        bad = ~key_valid_mask(LENGTHS, SEGS, B, k.device)[:, None, :, None]
        k, v = (t.masked_fill(bad, float("nan")) for t in (k, v))
        if not class_only:
            q = q.masked_fill(bad, float("nan"))
    rotation = torch.linalg.qr(torch.randn(H * Dh, H * Dh, generator=g, dtype=torch.float64))[0]
    return (q, k, v), dict(lengths=LENGTHS if padded else None, rotation=rotation, scale=0.6)


def _run(backend, primals, dtype, kw, grad_seed=9):
    leaves = [t.to(dtype).requires_grad_() for t in primals]
    kw = dict(kw, rotation=kw["rotation"].to(torch.float32 if dtype != torch.float64 else dtype))
    out, stats = rollingq_attention(*leaves, SEGS, backend=backend, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    return out.detach(), stats, grads


def _close(got, want, what):
    torch.testing.assert_close(torch.nan_to_num(got.double(), nan=1e30), torch.nan_to_num(want.double(), nan=1e30),
                               atol=ATOL, rtol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_outputs_statistics_and_gradients_match_the_reference(class_only):
    primals, kw = _case(class_only)
    out, stats, grads = _run("flex", primals, torch.float32, kw)
    r_out, r_stats, r_grads = _run("reference", primals, torch.float64, kw)
    assert out.dtype == torch.float32 and out.shape == primals[0].shape
    _close(out, r_out, "out")
    for s in STATISTICS:
        _close(getattr(stats, s.name), getattr(r_stats, s.name), f"stats.{s.name}")
    for name, a, b in zip(("dq", "dk", "dv"), grads, r_grads):
        _close(a, b, name)
    if not class_only:  # padded query rows output exactly 0 and pass no gradient; padded keys get none either
        rows = ~key_valid_mask(LENGTHS, SEGS, 3, out.device)[:, None, :, None].expand_as(out)
        assert (out[rows] == 0).all() and (grads[0][rows] == 0).all() and (grads[1][rows] == 0).all()


def test_without_lengths_and_without_statistics():
    primals, kw = _case(class_only=False, padded=False)
    with torch.no_grad():
        out, stats = rollingq_attention(*(t.float() for t in primals), SEGS, backend="flex", compute_stats=False,
                                        **dict(kw, rotation=kw["rotation"].float()))
    want, _ = rollingq_attention(*primals, SEGS, backend="reference", **kw)
    assert stats is None
    _close(out, want, "out")


def test_forward_mode_ad_runs_the_reference_and_says_so_once(monkeypatch, caplog):
    from rollingq_kernels import flex

    monkeypatch.setattr(flex, "_said", set())
    primals, kw = _case(class_only=True, seed=1)
    tangents = tuple(torch.randn_like(t) for t in primals)
    f32 = dict(kw, rotation=kw["rotation"].float())
    with caplog.at_level(logging.WARNING, logger="rollingq_kernels"):
        for _ in range(2):
            _, got = torch.func.jvp(lambda *x: rollingq_attention(*x, SEGS, backend="flex", **f32)[0],
                                    tuple(t.float() for t in primals), tuple(t.float() for t in tangents))
    _, want = torch.func.jvp(lambda *x: rollingq_attention(*x, SEGS, backend="reference", **kw)[0], primals, tangents)
    _close(got, want, "tangent")
    assert len([r for r in caplog.records if "forward-mode AD runs the eager reference" in r.getMessage()]) == 1


def test_works_under_torch_compile():
    """Inside a region torch.compile traces, Flex is compiled by the outer compilation (forward and backward)."""
    primals, kw = _case(class_only=True, seed=2)
    f32 = dict(kw, rotation=kw["rotation"].float())
    fn = torch.compile(lambda q, k, v: rollingq_attention(q, k, v, SEGS, backend="flex", **f32))
    leaves = [t.float().requires_grad_() for t in primals]
    out, stats = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    ref = [t.clone().requires_grad_() for t in primals]
    r_out, r_stats = rollingq_attention(*ref, SEGS, backend="reference", **kw)
    _close(out.detach(), r_out.detach(), "out")
    _close(stats.max_prob, r_stats.max_prob, "stats.max_prob")
    for name, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(r_out.sum(), ref)):
        _close(a, b, name)


def test_dropout_and_float64_on_cpu_are_refused_naming_the_argument():
    (q, k, v), kw = _case(class_only=True)
    with pytest.raises(ValueError, match=r"dropout_p: backend='flex' has no dropout.*dropout_p=0.1"):
        rollingq_attention(q.float(), k.float(), v.float(), SEGS, backend="flex", dropout_p=0.1)
    with pytest.raises(TypeError, match=r"q: backend='flex' on CPU .* float64"):
        rollingq_attention(q, k, v, SEGS, backend="flex")


@pytest.mark.parametrize(("B", "H"), [(0, 2), (2, 0)])
def test_empty_batch_or_heads_give_empty_results(B, H):
    q, k, v = (torch.randn(B, H, 8, 4) for _ in range(3))
    out, stats = rollingq_attention(q, k, v, [3, 4], backend="flex")
    assert out.shape == q.shape and stats.max_prob.shape == (B, H)


def test_backends_are_consistent_between_checks_dispatch_and_the_docs():
    """``checks.BACKENDS``, ``resolve_backend`` and the Backends section of docs/op.md name the same backends."""
    from pathlib import Path

    from rollingq_kernels.checks import BACKENDS

    text = (Path(__file__).resolve().parents[1] / "docs" / "op.md").read_text()
    section = text[text.index("## Backends"): text.index("\n## ", text.index("## Backends") + 1)]
    documented = {line.split("`")[1].strip('"') for line in section.splitlines() if line.startswith('- `"')}
    assert documented == set(BACKENDS)
    for backend in BACKENDS:
        if backend in ("auto", "reference", "flex"):  # the others need their kernels (tested in their modules)
            assert ops.resolve_backend(backend, torch.device("cpu")) in BACKENDS
