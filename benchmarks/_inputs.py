"""The inputs every benchmarked provider runs on: one random set per (shape, mode, dtype, seed).

Both ``_providers.py`` and ``_gpu_providers.py`` build on these (the GPU providers' probe call
needs a small input set), so they live below both: neither provider module imports the other's
inputs from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._shapes import BenchShape

MODES = ("all-query", "class-only")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class OpInputs:
    """One input set.

    Attributes:
        q: ``(B, H, Nq, Dh)`` (``Nq = N`` all-query, ``1`` class-only), the benchmark dtype.
        k, v: ``(B, H, N, Dh)``, the benchmark dtype.
        lengths: ``(B, M)`` int64 valid tokens per modality (60–100 % of each segment), or
            None for an unpadded shape (every token valid).
        rotation: ``(H·Dh, H·Dh)`` float32 random orthogonal matrix (global rotation).
        grad_out: ``(B, H, Nq, Dh)`` the upstream gradient for backward passes.
        segments: the padded modality sizes.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor | None
    rotation: torch.Tensor
    grad_out: torch.Tensor
    segments: list[int]

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)``, the tensors gradients flow to."""
        return self.q, self.k, self.v

    def zero_grads(self) -> None:
        """Drop accumulated gradients of ``q, k, v``."""
        for t in self.leaves():
            t.grad = None


def random_rotation(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A ``(dim, dim)`` float32 orthogonal matrix from the QR of a float64 Gaussian matrix (CPU)."""
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    qmat, r = torch.linalg.qr(a)
    return (qmat * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()


def make_inputs(
    shape: BenchShape, mode: str, dtype: torch.dtype, device: torch.device, seed: int, requires_grad: bool
) -> OpInputs:
    """Fresh random inputs (standard normal, never zeros) for ``shape`` in ``mode``.

    The generator is seeded with ``seed`` (on CPU, then moved), so runs are reproducible.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    g = torch.Generator().manual_seed(seed)
    B, H, N, Dh = shape.batch, shape.heads, shape.n_keys, shape.head_dim
    nq = N if mode == "all-query" else 1

    def leaf(n: int) -> torch.Tensor:
        t = torch.randn(B, H, n, Dh, generator=g).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    q, k, v = leaf(nq), leaf(N), leaf(N)
    lengths = None
    if shape.padded:
        segs = torch.tensor(shape.segments, dtype=torch.int64)
        low = torch.clamp((segs.double() * 0.6).ceil().long(), min=1)
        lengths = low + (torch.rand(B, len(shape.segments), generator=g) * (segs - low + 1).double()).long()
        lengths = torch.minimum(lengths, segs).to(device)
    rotation = random_rotation(H * Dh, g).to(device)
    grad_out = torch.randn(B, H, nq, Dh, generator=g).to(device=device, dtype=dtype)
    return OpInputs(q, k, v, lengths, rotation, grad_out, list(shape.segments))
