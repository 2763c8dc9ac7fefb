"""Every provider computes the same op: outputs, gradients and statistics agree with a float64 reference.

Guards the benchmark from timing something other than the op (e.g. SDPA without
the rotation or mask, or ``sdpa+stats`` computing different statistics). Flex
on CPU is forward only: its outputs and statistics are checked, not gradients.
"""


from __future__ import annotations

import dataclasses

import pytest
import torch

import rollingq_kernels

from ._gpu_providers import GPU_PROVIDERS
from ._inputs import OpInputs, make_inputs
from ._providers import PROVIDERS, build_provider
from ._session import BenchSession
from ._shapes import BenchShape

SHAPE = BenchShape("agree", 2, 3, 8, (7, 11))  # odd/prime sizes, N = 19
UNPADDED = BenchShape("agree-unpadded", 2, 3, 8, (7, 11), padded=False)
STATS_FIELDS = ("key_mean", "mass", "cos", "cos_per_head", "query")


def _float64(x: OpInputs) -> OpInputs:
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().requires_grad_(True)

    return dataclasses.replace(x, q=leaf(x.q), k=leaf(x.k), v=leaf(x.v), grad_out=x.grad_out.double())


@pytest.mark.parametrize("shape", [SHAPE, UNPADDED], ids=lambda s: s.name)
@pytest.mark.parametrize("mode", ["all-query", "class-only"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_matches_reference(provider: str, mode: str, shape: BenchShape, bench: BenchSession) -> None:
    if provider == "compile-eager" and bench.config.quick:
        pytest.skip("compile-eager: not in --quick mode (compilation takes minutes)")
    if provider == "flex" and bench.config.quick:
        pytest.skip("flex: not in --quick mode (flex+stats checks the same Flex call; each case compiles)")
    if provider.startswith("flex") and not shape.padded and bench.config.quick:
        pytest.skip(f"{provider}: unpadded checked in full runs only (each case compiles)")
    x = make_inputs(shape, mode, torch.float32, torch.device("cpu"), seed=2029, requires_grad=True)
    ref_in = _float64(x)
    ref_out, ref_stats = rollingq_kernels.rollingq_attention_reference(
        ref_in.q, ref_in.k, ref_in.v, ref_in.segments, lengths=ref_in.lengths, rotation=ref_in.rotation
    )
    ref_out.backward(ref_in.grad_out)

    forward_only = provider.startswith("flex")  # CPU FlexAttention has no backward
    with torch.set_grad_enabled(not forward_only):
        out, stats = build_provider(provider)(x)

    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    if not forward_only:
        out.backward(x.grad_out)
    for name, got, want in zip("qkv", x.leaves() if not forward_only else (), ref_in.leaves()):
        assert got.grad is not None, f"{provider}: no gradient for {name}"
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=1e-4, msg=f"{provider}: d{name}")
    if provider in ("fused-nostats", "sdpa", "flex", *GPU_PROVIDERS):
        assert stats is None
        return
    assert stats is not None
    for field in STATS_FIELDS:
        torch.testing.assert_close(
            getattr(stats, field).double(), getattr(ref_stats, field).double(), atol=2e-5, rtol=1e-4,
            msg=f"{provider}: stats.{field}",
        )
    assert torch.equal(stats.valid, ref_stats.valid)
