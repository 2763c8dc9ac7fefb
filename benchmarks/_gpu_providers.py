"""SDPA with one backend forced, the fastest attention a user has on a GPU today.

* ``sdpa-flash`` — FlashAttention takes no mask, so the valid tokens of each sample are packed
  into jagged nested tensors (``torch.nested``, layout ``jagged``: FlashAttention's variable-length
  kernel), attended, and scattered back (padded query rows 0), as a user of flash would do it;
  the packing is part of the time.
* ``sdpa-cudnn`` — the cuDNN backend on the dense tensors with the boolean key-padding mask, like
  ``sdpa`` (which lets PyTorch choose).

Both compute the op of ``docs/op.md`` without statistics (rotated class row, key padding, padded
query rows zeroed); ``test_providers.py`` checks that on CPU, where the math backend stands in.
On CUDA a backend that cannot run a case (head dimension, dtype, mask) is skipped with the reason
PyTorch gives, found by one small probe call per (mode, dtype, head dimension).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rollingq_kernels.class_query import rotate_class_query
from rollingq_kernels.reference import key_valid_mask

from ._inputs import OpInputs, make_inputs
from ._shapes import BenchShape

GPU_PROVIDERS = ("sdpa-flash", "sdpa-cudnn")
_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def _backend(provider: str, device: torch.device) -> SDPBackend:
    """The forced backend on CUDA; the math backend elsewhere (correctness checks on CPU)."""
    return _BACKENDS[provider] if device.type == "cuda" else SDPBackend.MATH


def _rotated_query(x: OpInputs) -> torch.Tensor:
    """``q`` with its class row rotated (a new tensor; ``q`` keeps its gradient path)."""
    q0_rot = rotate_class_query(x.q[:, :, 0, :], x.rotation)
    if x.q.shape[2] == 1:
        return q0_rot.unsqueeze(2)
    return torch.cat([q0_rot.unsqueeze(2), x.q[:, :, 1:, :]], dim=2)


def _packed(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, H, L, Dh)`` -> jagged ``(B, H, j, Dh)`` holding the ``valid`` ``(B, L)`` positions only."""
    values = t.transpose(1, 2)[valid]  # (total, H, Dh)
    counts = valid.sum(dim=1)
    offsets = F.pad(counts.cumsum(0), (1, 0))
    jagged = torch.nested.nested_tensor_from_jagged(values, offsets, max_seqlen=int(counts.max()))
    return jagged.transpose(1, 2)


def sdpa_flash(x: OpInputs) -> tuple[torch.Tensor, None]:
    """SDPA (FlashAttention on CUDA) on the packed valid tokens; padded query rows 0."""
    q_rot = _rotated_query(x)
    B, H, nq, Dh = q_rot.shape
    key_valid = key_valid_mask(x.lengths, x.segments, B, x.k.device)
    q_valid = key_valid if nq > 1 else torch.ones(B, 1, dtype=torch.bool, device=x.k.device)
    with sdpa_kernel(_backend("sdpa-flash", x.k.device)):
        packed = F.scaled_dot_product_attention(
            _packed(q_rot, q_valid), _packed(x.k, key_valid), _packed(x.v, key_valid), scale=Dh**-0.5
        )
    out = q_rot.new_zeros((B, nq, H, Dh))
    out = out.index_put((q_valid,), packed.transpose(1, 2).values())
    return out.transpose(1, 2), None


def sdpa_cudnn(x: OpInputs) -> tuple[torch.Tensor, None]:
    """SDPA (cuDNN on CUDA) with the boolean key-padding mask; padded query rows 0."""
    q_rot = _rotated_query(x)
    B, _, nq, Dh = q_rot.shape
    key_valid = key_valid_mask(x.lengths, x.segments, B, x.k.device)
    with sdpa_kernel(_backend("sdpa-cudnn", x.k.device)):
        out = F.scaled_dot_product_attention(q_rot, x.k, x.v, attn_mask=key_valid[:, None, None, :], scale=Dh**-0.5)
    if nq > 1:
        out = out * key_valid[:, None, :, None].to(out.dtype)
    return out, None


def build_gpu_provider(name: str) -> Callable:
    """The callable ``OpInputs -> (out, None)`` of a provider in :data:`GPU_PROVIDERS`."""
    table = {"sdpa-flash": sdpa_flash, "sdpa-cudnn": sdpa_cudnn}
    if name not in table:
        raise ValueError(f"provider: expected one of {GPU_PROVIDERS}, got {name!r}")
    return table[name]


@functools.lru_cache(maxsize=64)
def _probe(provider: str, mode: str, dtype: torch.dtype, head_dim: int, device: str) -> str | None:
    """Run ``provider`` once on a small problem; the error text when its backend cannot."""
    shape = BenchShape("probe", 2, 2, head_dim, (13, 17))
    x = make_inputs(shape, mode, dtype, torch.device(device), seed=1, requires_grad=True)
    try:
        out, _ = build_gpu_provider(provider)(x)
        out.backward(x.grad_out)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{provider}: the backend cannot run this case ({first[:160]})"
    return None


def gpu_skip_reason(provider: str, shape, mode: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a provider of :data:`GPU_PROVIDERS` cannot run this case, or None."""
    if provider not in GPU_PROVIDERS or device.type != "cuda":
        return None
    return _probe(provider, mode, dtype, shape.head_dim, str(device))
