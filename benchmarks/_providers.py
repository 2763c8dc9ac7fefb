"""The benchmarked providers.

Every provider computes the op of ``docs/op.md`` (rotated class query, key
padding mask, padded query rows zeroed) on the same inputs (``_inputs.py``):

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
* ``flex`` — ``torch.nn.attention.flex_attention`` (compiled), what a user would
  pick instead of a custom kernel: the per-sample lengths as a ``mask_mod`` over
  key positions (the block mask is built inside the timed call, as a user builds
  it per batch), the rotated class row, padded query rows zeroed, no statistics.
  On CPU Flex runs forward only (torch raises for inputs that need a gradient);
* ``flex+stats`` — ``flex`` plus the statistics the way a Flex user gets them:
  on CUDA from Flex's log-sum-exp (``mass`` of segment m = exp(LSE_m − LSE) with
  LSE_m from one class-row Flex call masked to segment m) and a masked mean of
  the keys; on CPU, where compiled Flex returns no LSE, the separate pass of
  ``sdpa+stats``;
* ``compile-eager`` — ``torch.compile`` of the eager reference;
* ``sdpa-flash``, ``sdpa-cudnn`` — SDPA with the FlashAttention (valid tokens packed as
  jagged tensors) or cuDNN backend forced (``_gpu_providers.py``; CUDA backends, math on CPU).

Unpadded shapes (``BenchShape.padded`` False) have ``lengths = None``: the
providers then run without any mask, as a user with unpadded data would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

import rollingq_kernels
from rollingq_kernels.class_query import rotate_class_query
from rollingq_kernels.ops import resolve_backend
from rollingq_kernels.reference import key_valid_mask, modality_index
from rollingq_kernels.stats import AttentionStats, finish_stats

from ._gpu_providers import GPU_PROVIDERS, build_gpu_provider, gpu_skip_reason
from ._inputs import DTYPES, MODES, OpInputs, make_inputs  # noqa: F401 (DTYPES, MODES, make_inputs: _session reads them here)
from ._shapes import COMPILE_SHAPES, CPU_BF16_PROVIDERS, ROLE_GATE_ALL_QUERY, BenchShape

PROVIDERS = (
    "fused", "fused-nostats", "eager", "sdpa", "sdpa+stats", "flex", "flex+stats", "compile-eager"
) + GPU_PROVIDERS
MATERIALIZING = ("eager", "compile-eager")
COMPILED = ("compile-eager", "flex", "flex+stats")  # compiled once per (shape, mode, dtype)

ProviderFn = Callable[[OpInputs], tuple[torch.Tensor, "AttentionStats | None"]]


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


def _rotated_query(x: OpInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q with the rotated class row, q0_rot (B, H, Dh))``."""
    q = x.q
    q0_rot = rotate_class_query(q[:, :, 0, :], x.rotation)
    q_rot = torch.cat([q0_rot.unsqueeze(2), q[:, :, 1:, :]], dim=2) if q.shape[2] > 1 else q0_rot.unsqueeze(2)
    return q_rot, q0_rot


def _zero_padded_rows(out: torch.Tensor, x: OpInputs) -> torch.Tensor:
    """Padded query rows output 0, as the op (all-query with lengths only)."""
    if x.lengths is None or out.shape[2] == 1:
        return out
    key_valid = key_valid_mask(x.lengths, x.segments, out.shape[0], out.device)  # (B, N)
    return out * key_valid[:, None, :, None].to(out.dtype)


def _sdpa_with_query(x: OpInputs) -> tuple[torch.Tensor, torch.Tensor]:
    q_rot, q0_rot = _rotated_query(x)
    mask = None
    if x.lengths is not None:
        mask = key_valid_mask(x.lengths, x.segments, x.q.shape[0], x.k.device)[:, None, None, :]
    out = F.scaled_dot_product_attention(q_rot, x.k, x.v, attn_mask=mask, scale=x.q.shape[-1] ** -0.5)
    return _zero_padded_rows(out, x), q0_rot


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


def compiled_flex() -> Callable:
    """A fresh ``torch.compile`` of ``flex_attention`` (one per shape, mode and dtype, shared by both Flex
    providers: each new shape recompiles)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _key_mask_mod(key_valid: torch.Tensor) -> Callable:
    """The ``mask_mod`` of a ``(B, N)`` key-validity tensor (and of a key range, for the segment calls)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return key_valid[b, kv_idx]

    return mask_mod


def _flex_call(flex: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
               return_lse: bool):
    """One Flex call with keys masked by ``key_valid`` ``(B, N)`` (None: no mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = None
    if key_valid is not None:
        B, _, nq, _ = q.shape
        block_mask = create_block_mask(_key_mask_mod(key_valid), B, None, nq, k.shape[2], device=q.device)
    kwargs = {"return_lse": True} if return_lse else {}
    return flex(q, k, v, block_mask=block_mask, scale=q.shape[-1] ** -0.5, **kwargs)


def _flex_stats_from_lse(flex: Callable, q0_rot: torch.Tensor, lse0: torch.Tensor, x: OpInputs) -> AttentionStats:
    """CUDA: ``mass`` from Flex's log-sum-exp, one class-row call masked to each segment; masked key means."""
    B = q0_rot.shape[0]
    key_valid = key_valid_mask(x.lengths, x.segments, B, x.k.device)  # (B, N)
    segment = modality_index(x.segments, x.k.device)  # (N,)
    q0 = q0_rot.unsqueeze(2)
    with torch.no_grad():
        masses = []
        for m in range(len(x.segments) + 1):
            in_segment = key_valid & (segment == m)[None, :]
            _, lse_m = _flex_call(flex, q0.detach(), x.k.detach(), x.v.detach(), in_segment, return_lse=True)
            masses.append(torch.exp(lse_m[:, :, 0].float() - lse0.float()))
        mass = torch.stack(masses, dim=-1)  # (B, H, M+1)
        onehot = F.one_hot(segment, len(x.segments) + 1)[:, 1:].float()  # (N, M)
        k = x.k.detach().float() * key_valid[:, None, :, None]
        counts = (key_valid.float() @ onehot).clamp_min(1.0)  # (B, M)
        key_mean = torch.einsum("bhnd,nm->bhmd", k, onehot) / counts[:, None, :, None]
        return finish_stats(key_mean, mass, q0_rot.detach().float(), x.lengths, x.segments)


def flex_provider(flex: Callable, stats: bool) -> ProviderFn:
    """The ``flex`` (``stats=False``) or ``flex+stats`` provider around one compiled ``flex_attention``."""

    def run(x: OpInputs) -> tuple[torch.Tensor, AttentionStats | None]:
        q_rot, q0_rot = _rotated_query(x)
        key_valid = None if x.lengths is None else key_valid_mask(x.lengths, x.segments, x.q.shape[0], x.k.device)
        k, v = x.k, x.v
        if not x.q.is_cuda:  # CPU Flex refuses inputs that require a gradient (it has no backward there)
            q_rot, k, v = q_rot.detach(), k.detach(), v.detach()
        with_lse = stats and x.q.is_cuda  # compiled Flex on CPU has no return_lse (torch 2.14)
        result = _flex_call(flex, q_rot, k, v, key_valid, return_lse=with_lse)
        out, lse = result if with_lse else (result, None)
        out = _zero_padded_rows(out, x)
        if not stats:
            return out, None
        if lse is not None:
            return out, _flex_stats_from_lse(flex, q0_rot, lse[:, :, 0], x)
        return out, separate_stats(q0_rot, x)

    return run


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
    if name in ("flex", "flex+stats"):
        return flex_provider(compiled_flex(), stats=name == "flex+stats")
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
    provider: str, shape: BenchShape, mode: str, device: torch.device, quick: bool, memory_budget: int,
    pass_: str = "fwd", dtype: str = "fp32",
) -> str | None:
    """Why ``provider`` cannot run this case (``pass_``) here, or None when it can.

    ``memory_budget`` is the bytes the eager providers may spend on score
    matrices (they keep about four ``B·H·Nq·N`` float32 matrices for a backward).
    """
    gpu_reason = gpu_skip_reason(provider, shape, mode, torch.bfloat16, device)
    if gpu_reason:
        return gpu_reason
    if device.type == "cpu" and dtype == "bf16" and (
            provider not in CPU_BF16_PROVIDERS or ROLE_GATE_ALL_QUERY not in shape.roles):
        return f"{provider}: CPU bf16 runs only {CPU_BF16_PROVIDERS} on the all-query gate shapes (fused vs SDPA)"
    if provider == "compile-eager":
        if quick:
            return "compile-eager: not in --quick mode (compilation takes minutes)"
        allowed = COMPILE_SHAPES.get(device.type, ())
        if shape.name not in allowed:
            return f"compile-eager: on {device.type} only for shapes {allowed} (each case compiles anew)"
    if provider.startswith("flex"):
        if quick:
            return f"{provider}: not in --quick mode (each shape compiles anew; test_providers.py checks it)"
        if device.type == "cpu" and pass_ != "fwd":
            return f"{provider}: FlexAttention on CPU is forward only (torch raises for inputs needing a gradient)"
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

