"""The benchmarked providers and their inputs.

Every provider computes the op of ``docs/op.md`` (rotated class query, key
padding mask, padded query rows zeroed) on the same inputs:

* ``fused`` — ``rollingq_attention(backend="auto")``: Triton on CUDA, C++ on CPU
  (the eager reference when the C++ extension is not built: rows say ``fallback``);
* ``fused-nostats`` — the same kernel with ``compute_stats=False``;
* ``eager`` — ``backend="reference"``: materialized attention, then statistics;
* ``sdpa`` — ``torch.nn.functional.scaled_dot_product_attention`` with the rotated
  class row and a boolean key-padding mask, no statistics (what a user has today);
* ``sdpa+stats`` — ``sdpa`` plus what a user writes today to get the statistics:
  a separate no-grad pass over K computing the class row's scores
  (``scale · q0_rot · Kᵀ``, masked, softmax) for ``mass`` and the masked
  per-modality key sums for ``key_mean``, then ``finish_stats`` for the cosines;
* ``compile-eager`` — ``torch.compile`` of the eager reference;
* ``sdpa-flash``, ``sdpa-cudnn`` — SDPA with the FlashAttention (valid tokens packed as
  jagged tensors) or cuDNN backend forced (``_gpu_providers.py``; CUDA backends, math on CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rollingq_kernels
from rollingq_kernels.class_query import rotate_class_query
from rollingq_kernels.ops import resolve_backend
from rollingq_kernels.reference import key_valid_mask, modality_index
from rollingq_kernels.stats import AttentionStats, finish_stats

from ._gpu_providers import GPU_PROVIDERS, build_gpu_provider, gpu_skip_reason
from ._shapes import COMPILE_SHAPES, BenchShape

PROVIDERS = ("fused", "fused-nostats", "eager", "sdpa", "sdpa+stats", "compile-eager") + GPU_PROVIDERS
MODES = ("all-query", "class-only")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MATERIALIZING = ("eager", "compile-eager")

ProviderFn = Callable[["OpInputs"], tuple[torch.Tensor, "AttentionStats | None"]]


@dataclass
class OpInputs:
    """One input set.

    Attributes:
        q: ``(B, H, Nq, Dh)`` (``Nq = N`` all-query, ``1`` class-only), the benchmark dtype.
        k, v: ``(B, H, N, Dh)``, the benchmark dtype.
        lengths: ``(B, M)`` int64 valid tokens per modality (60–100 % of each segment).
        rotation: ``(H·Dh, H·Dh)`` float32 random orthogonal matrix (global rotation).
        grad_out: ``(B, H, Nq, Dh)`` the upstream gradient for backward passes.
        segments: the padded modality sizes.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
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
    segs = torch.tensor(shape.segments, dtype=torch.int64)
    low = torch.clamp((segs.double() * 0.6).ceil().long(), min=1)
    lengths = low + (torch.rand(B, len(shape.segments), generator=g) * (segs - low + 1).double()).long()
    lengths = torch.minimum(lengths, segs).to(device)
    rotation = random_rotation(H * Dh, g).to(device)
    grad_out = torch.randn(B, H, nq, Dh, generator=g).to(device=device, dtype=dtype)
    return OpInputs(q, k, v, lengths, rotation, grad_out, list(shape.segments))


def _fused(compute_stats: bool) -> ProviderFn:
    def run(x: OpInputs) -> tuple[torch.Tensor, AttentionStats | None]:
        return rollingq_kernels.rollingq_attention(
            x.q, x.k, x.v, x.segments, lengths=x.lengths, rotation=x.rotation, backend="auto",
            compute_stats=compute_stats,
        )

    return run


def eager(x: OpInputs) -> tuple[torch.Tensor, AttentionStats | None]:
    """The eager reference (materializes ``(B, H, Nq, N)`` scores), with statistics."""
    return rollingq_kernels.rollingq_attention(
        x.q, x.k, x.v, x.segments, lengths=x.lengths, rotation=x.rotation, backend="reference"
    )


def sdpa(x: OpInputs) -> tuple[torch.Tensor, None]:
    """SDPA with the rotated class row and a ``(B, 1, 1, N)`` boolean key-padding mask; no statistics."""
    out, _ = _sdpa_with_query(x)
    return out, None


def _sdpa_with_query(x: OpInputs) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = x.q, x.k, x.v
    B, _, nq, Dh = q.shape
    q0_rot = rotate_class_query(q[:, :, 0, :], x.rotation)
    q_rot = torch.cat([q0_rot.unsqueeze(2), q[:, :, 1:, :]], dim=2) if nq > 1 else q0_rot.unsqueeze(2)
    key_valid = key_valid_mask(x.lengths, x.segments, B, k.device)  # (B, N)
    out = F.scaled_dot_product_attention(q_rot, k, v, attn_mask=key_valid[:, None, None, :], scale=Dh**-0.5)
    if nq > 1:
        out = out * key_valid[:, None, :, None].to(out.dtype)  # padded query rows output 0, as the op
    return out, q0_rot


def separate_stats(q0_rot: torch.Tensor, x: OpInputs) -> AttentionStats:
    """The statistics from a separate no-grad pass over K (what a user writes next to SDPA).

    Args:
        q0_rot: ``(B, H, Dh)`` the rotated class query (input dtype).
        x: the inputs; reads ``k (B, H, N, Dh)``, ``lengths``, ``segments``.

    Returns:
        The :class:`AttentionStats` of the class row (float32), as ``docs/op.md`` defines them.
    """
    with torch.no_grad():
        k = x.k.detach().float()
        B, H, N, Dh = k.shape
        M = len(x.segments)
        key_valid = key_valid_mask(x.lengths, x.segments, B, k.device)
        onehot = F.one_hot(modality_index(x.segments, k.device), M + 1).float()  # (N, M+1)
        scores = (Dh**-0.5) * torch.einsum("bhd,bhnd->bhn", q0_rot.detach().float(), k)
        probs = torch.softmax(scores.masked_fill(~key_valid[:, None, :], float("-inf")), dim=-1)
        mass = probs @ onehot  # (B, H, M+1)
        key_sum = torch.einsum("bhnd,nm->bhmd", k * key_valid[:, None, :, None], onehot[:, 1:])
        counts = (key_valid.float() @ onehot[:, 1:]).clamp_min(1.0)  # (B, M)
        key_mean = key_sum / counts[:, None, :, None]
        return finish_stats(key_mean, mass, q0_rot.detach().float(), x.lengths, x.segments)


def sdpa_stats(x: OpInputs) -> tuple[torch.Tensor, AttentionStats]:
    """``sdpa`` followed by :func:`separate_stats`."""
    out, q0_rot = _sdpa_with_query(x)
    return out, separate_stats(q0_rot, x)


def compiled_eager() -> ProviderFn:
    """A fresh ``torch.compile`` of the eager reference (the session keeps one per shape, mode and dtype)."""
    compiled = torch.compile(rollingq_kernels.rollingq_attention_reference, dynamic=False)

    def run(x: OpInputs) -> tuple[torch.Tensor, AttentionStats | None]:
        return compiled(x.q, x.k, x.v, x.segments, lengths=x.lengths, rotation=x.rotation)

    return run


def build_provider(name: str) -> ProviderFn:
    """The callable ``OpInputs -> (out, stats | None)`` of provider ``name``."""
    table: dict[str, Callable[[], ProviderFn]] = {
        "fused": lambda: _fused(True),
        "fused-nostats": lambda: _fused(False),
        "eager": lambda: eager,
        "sdpa": lambda: sdpa,
        "sdpa+stats": lambda: sdpa_stats,
        "compile-eager": compiled_eager,
        **{p: functools.partial(build_gpu_provider, p) for p in GPU_PROVIDERS},
    }
    if name not in table:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")
    return table[name]()


def fused_backend(device: torch.device) -> str:
    """What ``backend="auto"`` runs on ``device``: ``cpp``, ``triton`` or ``fallback`` (the reference)."""
    chosen = resolve_backend("auto", device)
    return "fallback" if chosen == "reference" else chosen


def materialized_bytes(shape: BenchShape, mode: str) -> int:
    """Bytes of one float32 ``(B, H, Nq, N)`` score matrix (the eager reference keeps several)."""
    nq = shape.n_keys if mode == "all-query" else 1
    return 4 * shape.batch * shape.heads * nq * shape.n_keys


def skip_reason(
    provider: str, shape: BenchShape, mode: str, device: torch.device, quick: bool, memory_budget: int
) -> str | None:
    """Why ``provider`` cannot run this case here, or None when it can.

    ``memory_budget`` is the bytes the eager providers may spend on score
    matrices (they keep about four ``B·H·Nq·N`` float32 matrices for a backward).
    """
    gpu_reason = gpu_skip_reason(provider, shape, mode, torch.bfloat16, device)
    if gpu_reason:
        return gpu_reason
    if provider == "compile-eager":
        if quick:
            return "compile-eager: not in --quick mode (compilation takes minutes)"
        allowed = COMPILE_SHAPES.get(device.type, ())
        if shape.name not in allowed:
            return f"compile-eager: on {device.type} only for shapes {allowed} (each case compiles anew)"
    if provider in MATERIALIZING and 4 * materialized_bytes(shape, mode) > memory_budget:
        need = 4 * materialized_bytes(shape, mode) / 2**30
        budget = memory_budget / 2**30
        return f"{provider}: needs about {need:.1f} GiB of score matrices, over the budget {budget:.1f} GiB"
    if provider.startswith("fused") and device.type == "cuda":
        try:
            from rollingq_kernels import triton  # noqa: F401
        except ImportError as exc:
            return f"{provider}: the Triton kernels are not importable ({exc})"
    return None

