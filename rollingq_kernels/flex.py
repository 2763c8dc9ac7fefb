"""``backend="flex"``: the op on PyTorch's FlexAttention, a fallback and a GPU reference (``docs/op.md``).

* The attention is ``torch.nn.attention.flex_attention`` (compiled once per process with
  ``torch.compile(dynamic=False)``; each new shape compiles again) with a ``mask_mod`` of the valid keys
  built from ``segments`` and ``lengths`` (no block mask without ``lengths``). The class query is rotated
  first (:func:`~rollingq_kernels.class_query.rotate_class_query`); padded keys, values and query rows are
  replaced by zeros before the call (Flex multiplies masked probabilities by the values, and ``0 · NaN`` is
  NaN); padded query rows are masked too, and Flex outputs exactly 0 for a fully masked row.
* The statistics come from an extra class-row pass (:func:`class_row_pass`): the class row's scores
  against the valid keys, ``O(B·H·N·Dh)``, no values. Flex returns no per-segment sums anywhere, and on
  CPU no log-sum-exp or row max either.
* No dropout (FlexAttention has none): ``dropout_p > 0`` is refused by
  :func:`~rollingq_kernels.checks.check_inputs`, as is float64 on CPU (compiled Flex on CPU runs
  float32, float16 and bfloat16).
* Gradients: on CUDA Flex's own backward. On CPU compiled Flex is inference-only, so when a gradient is
  needed the forward still runs Flex and the backward recomputes the reference formula (the eager
  reference's memory) and differentiates it: the gradients are the reference's.
* Forward-mode AD runs the eager reference (with a one-time warning): compiled Flex cannot take the
  tensors of ``torch.func.jvp``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .class_query import compute_dtype, rotate_class_query
from .forward_ad import has_tangent
from .reference import rollingq_attention_reference
from .stats import AttentionStats, finish_stats
from .token_layout import key_valid_mask, modality_index

logger = logging.getLogger("rollingq_kernels")

_compiled: list[Callable] = []  # torch.compile(flex_attention), built on first use


def compiled_flex() -> Callable:
    """``flex_attention`` as it must run: ``torch.compile(flex_attention, dynamic=False)``, built once.

    Inside a region ``torch.compile`` traces, plain ``flex_attention``: the outer compilation compiles it.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    if not _compiled:
        _compiled.append(torch.compile(flex_attention, dynamic=False))
    return _compiled[0]


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """Flex over keys masked by ``key_valid`` ``(B, N)`` (None: every key); ``q`` ``(B, H, Nq, Dh)``.

    With ``Nq > 1`` a padded query row is masked too: a fully masked row outputs exactly 0 in Flex, so no
    epilogue zeroes it (Inductor's CPU Flex template cannot fuse one under an outer ``torch.compile``).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = None
    if key_valid is not None:
        if q.shape[2] == 1:
            def mask_mod(b, h, q_idx, kv_idx):
                return key_valid[b, kv_idx]
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return key_valid[b, kv_idx] & key_valid[b, q_idx]

        block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    return compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[int],
            lengths: torch.Tensor | None, rotation: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``out`` of the op with Flex (rotation, padding zeroed, padded query rows 0); differentiable where Flex is.

    The rotated class row is put in place with ``torch.where`` over the rows, not ``torch.cat``: under an outer
    ``torch.compile``, Inductor's Flex lowering cannot read a 4-d view of the rotation's matmul (or of a
    concatenation), while a ``where`` gives it a fresh 4-d buffer.
    """
    B, _, N, _ = k.shape
    q0 = rotate_class_query(q[:, :, 0, :], rotation).unsqueeze(2)  # (B, H, 1, Dh)
    row0 = (torch.arange(q.shape[2], device=q.device) == 0)[None, None, :, None]
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    if lengths is None:
        return _flex(torch.where(row0, q0, q), k, v, None, scale)
    key_valid = key_valid_mask(lengths, segments, B, k.device)  # (B, N)
    valid4 = key_valid[:, None, :, None]
    k, v = torch.where(valid4, k, zero), torch.where(valid4, v, zero)
    rest = q if q.shape[2] == 1 else torch.where(valid4, q, zero)  # padded query rows are never read
    # all-query: padded query rows are also masked in Flex, which outputs exactly 0 for a fully masked row
    return _flex(torch.where(row0, q0, rest), k, v, key_valid, scale)


class _ReferenceBackward(torch.autograd.Function):
    """Flex's forward with the reference formula's gradient (CPU: compiled Flex is inference-only)."""

    @staticmethod
    def forward(q, k, v, segments, lengths, rotation, scale):
        return _attend(q, k, v, segments, lengths, rotation, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, segments, lengths, rotation, scale = inputs
        ctx.save_for_backward(q, k, v, lengths, rotation)
        ctx.segments, ctx.scale = segments, scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, lengths, rotation = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            out, _ = rollingq_attention_reference(*leaves, ctx.segments, lengths=lengths, rotation=rotation,
                                                  scale=ctx.scale, compute_stats=False)
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return tuple(next(grads) if t.requires_grad else None for t in leaves) + (None,) * 4


def class_row_pass(q0_rot: torch.Tensor, k: torch.Tensor, segments: Sequence[int], lengths: torch.Tensor | None,
                   scale: float) -> AttentionStats:
    """The statistics of the class row from its scores against the valid keys (no values read).

    Args:
        q0_rot: ``(B, H, Dh)`` the rotated class query (input dtype); k: ``(B, H, N, Dh)``.

    Returns:
        The :class:`~rollingq_kernels.stats.AttentionStats` (``docs/op.md``); the class row's ``lse`` and
        ``score_max`` come from the same scores.
    """
    with torch.no_grad():
        B, _, N, _ = k.shape
        c = compute_dtype(k.dtype)
        key_valid = key_valid_mask(lengths, segments, B, k.device)  # (B, N)
        k_c = torch.where(key_valid[:, None, :, None], k.detach().to(c), 0.0)
        scores = scale * torch.einsum("bhd,bhnd->bhn", q0_rot.detach().to(c), k_c)
        scores = scores.masked_fill(~key_valid[:, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H, 1)
        onehot = F.one_hot(modality_index(segments, k.device), len(segments) + 1).to(c)  # (N, M+1)
        mass = torch.exp(scores - lse) @ onehot
        counts = (key_valid.to(c) @ onehot[:, 1:]).clamp_min(1.0)  # (B, M)
        key_mean = torch.einsum("bhnd,nm->bhmd", k_c, onehot[:, 1:]) / counts[:, None, :, None]
        return finish_stats(key_mean, mass, q0_rot.detach().float(), lengths, segments,
                            score_max=scores.amax(-1), lse=lse)


_said: set[str] = set()


def _log_forward_ad_once() -> None:
    if "forward_ad" not in _said:
        _said.add("forward_ad")
        logger.warning("rollingq_kernels: backend='flex' under forward-mode AD runs the eager reference "
                       "(compiled Flex cannot take forward-mode AD's tensors); its tangents are exact")


def rollingq_attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[int], *,
    lengths: torch.Tensor | None, rotation: torch.Tensor | None, scale: float, compute_stats: bool,
) -> tuple[torch.Tensor, AttentionStats | None]:
    """The op with FlexAttention (see the module docstring); inputs validated by ``rollingq_attention``.

    Args:
        q: ``(B, H, N, Dh)`` or ``(B, H, 1, Dh)``; k, v: ``(B, H, N, Dh)``; one dtype (float64 on CUDA only).
        segments, lengths, rotation, scale, compute_stats: as ``rollingq_attention`` (no dropout).

    Returns:
        ``(out, stats)`` as ``rollingq_attention``.
    """
    B, H = k.shape[:2]
    rotation = None if rotation is None else rotation.detach()
    if has_tangent(q, k, v):
        _log_forward_ad_once()
    if B * H == 0 or has_tangent(q, k, v):  # Flex refuses empty batches and functorch's tensors
        return rollingq_attention_reference(q, k, v, segments, lengths=lengths, rotation=rotation, scale=scale,
                                            compute_stats=compute_stats)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and q.device.type == "cpu":
        out = _ReferenceBackward.apply(q, k, v, list(segments), lengths, rotation, scale)
    else:
        out = _attend(q, k, v, segments, lengths, rotation, scale)
    if not compute_stats:
        return out, None
    q0_rot = rotate_class_query(q[:, :, 0, :], rotation)
    return out, class_row_pass(q0_rot, k, segments, lengths, scale)
