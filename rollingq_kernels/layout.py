"""Input normalisation for :class:`~rollingq_kernels.module.FusedRollingQAttention`: one layout per call.

A layer's tokens are ``[prefix tokens, modality 1 tokens, …, modality M tokens]``. The first of the
``P = num_prefix_tokens ≥ 1`` prefix tokens is the *query token* whose query RollingQ rotates (the class token;
timm's first register token in a model without one). The other ``P − 1`` prefix tokens (timm's distillation or
register tokens) join no modality: the op sees them as one extra segment before the modalities, every query
attends to them, and :func:`fold_prefix_segment` takes that segment out of the statistics again (its attention
mass is added to the query token's).

Inside the layer a call has one canonical form, :class:`CallLayout`: ``segments`` a tuple of ``M`` padded sizes,
``lengths`` None or a ``(B, M)`` int64 tensor on the device of ``x``. Every other form is converted here, at the
edge, with an error naming the argument:

* segments stored on the layer or given per call, as sizes or as a rule ``n -> sizes`` of the ``n = N − P``
  modality tokens (:class:`EvenSplit`), so that another input size works;
* lengths as any integer tensor or nested sequence, as a key-padding ``attn_mask`` (:func:`mask_lengths`),
  positionally in the form ``layer(x, segments, lengths)`` of version 0.1, or from the layer's
  ``using_lengths`` context.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import torch

from .checks import check_segments
from .stats import STATISTICS, AttentionStats

STATISTICS_BY_NAME = {stat.name: stat for stat in STATISTICS}

SegmentsRule = Callable[[int], Sequence[int]]
SegmentsSpec = Union[Sequence[int], SegmentsRule]  # noqa: UP007 (a runtime alias; `|` needs both sides types)

#: An additive float mask entry at or below this value masks its key (timm and Hugging Face use
#: ``finfo(dtype).min``, older code ``-10000``); 0 keeps it; any other value is a bias the op does not take.
MASKED_AT_OR_BELOW = -1e4


@dataclass(frozen=True)
class EvenSplit:
    """A segments rule: the ``n`` modality tokens in ``parts`` consecutive near-equal segments.

    ``EvenSplit(2)(197 - 1) == (98, 98)``; the first ``n % parts`` segments get one token more.
    """

    parts: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.parts, bool) or not isinstance(self.parts, int) or self.parts < 2:
            raise ValueError(f"parts: expected an int >= 2, got {self.parts!r}")

    def __call__(self, n: int) -> tuple[int, ...]:
        if n < self.parts:
            raise ValueError(f"segments: EvenSplit({self.parts}) needs at least {self.parts} modality tokens, got {n}")
        size, extra = divmod(n, self.parts)
        return tuple(size + (i < extra) for i in range(self.parts))


class CallLayout(NamedTuple):
    """The canonical layout of one call.

    Attributes:
        segments: the ``M`` padded modality sizes.
        lengths: None (no padding) or ``(B, M)`` int64 valid tokens per modality, on the device of ``x``.
        prefix: ``P``, the prefix tokens before the modalities (the query token first).
    """

    segments: tuple[int, ...]
    lengths: torch.Tensor | None
    prefix: int

    def op_segments(self) -> list[int]:
        """The op's segments: ``[P − 1, L_1, …, L_M]`` with other prefix tokens, else ``[L_1, …, L_M]``."""
        return ([self.prefix - 1] if self.prefix > 1 else []) + list(self.segments)

    def op_lengths(self) -> torch.Tensor | None:
        """The op's ``lengths``: the prefix segment is always full."""
        if self.lengths is None or self.prefix == 1:
            return self.lengths
        full = torch.full_like(self.lengths[:, :1], self.prefix - 1)
        return torch.cat([full, self.lengths], dim=1)


def check_prefix(num_prefix_tokens: Any) -> int:
    """``num_prefix_tokens``: an int ``≥ 1`` (the query token and the other prefix tokens)."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 1:
        raise ValueError(
            f"num_prefix_tokens: expected an int >= 1 (the query token first), got {num_prefix_tokens!r}"
        )
    return num_prefix_tokens


def check_segments_spec(segments: SegmentsSpec | None, num_modalities: int) -> SegmentsSpec | None:
    """Validate segments to store on a layer: None, a rule (callable), or ``num_modalities`` sizes."""
    if segments is None or callable(segments):
        return segments
    segs = check_segments(segments)
    if len(segs) != num_modalities:
        raise ValueError(f"segments: expected num_modalities={num_modalities} sizes, got {list(segs)}")
    return segs


NO_SEGMENTS = ("segments: not set; pass the modality sizes or a rule once (FusedRollingQAttention(..., segments=...), "
               "from_timm(attn, segments=...) or set_segments()) or per call (segments=...)")


def resolve_segments(spec: SegmentsSpec | None, n_modality_tokens: int, num_modalities: int,
                     missing: str = NO_SEGMENTS) -> tuple[int, ...]:
    """The sizes of one call: ``spec`` itself, or the rule applied to the ``n = N − P`` modality tokens."""
    if spec is None:
        raise ValueError(missing)
    sizes = spec(n_modality_tokens) if callable(spec) else spec
    segs = check_segments(sizes)
    if len(segs) != num_modalities:
        raise ValueError(f"segments: expected num_modalities={num_modalities} sizes, got {list(segs)}")
    if sum(segs) != n_modality_tokens:
        raise ValueError(
            f"segments: the sizes must add up to the {n_modality_tokens} tokens after the prefix "
            f"(N - num_prefix_tokens), got {list(segs)} (sum {sum(segs)})"
        )
    return segs


def canonical_lengths(lengths: Any, batch: int, num_modalities: int, device: torch.device) -> torch.Tensor:
    """``lengths`` as a ``(B, M)`` int64 tensor on ``device`` (from any integer tensor or nested sequence)."""
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.tensor([[operator.index(v) for v in row] for row in lengths], dtype=torch.int64)
        except TypeError as exc:
            raise TypeError(
                f"lengths: expected a (B, {num_modalities}) integer tensor or nested sequence of ints, "
                f"got {type(lengths).__name__}"
            ) from exc
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths: expected an integer tensor, got {lengths.dtype}")
    if tuple(lengths.shape) != (batch, num_modalities):
        raise ValueError(f"lengths: expected shape ({batch}, {num_modalities}), got {tuple(lengths.shape)}")
    return lengths.to(device=device, dtype=torch.int64)


def _key_mask(attn_mask: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """The ``(B, N)`` bool keys that take part, from a mask that is key-only in effect."""
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() == 2:
        mask = attn_mask[:, None, None, :]
    elif attn_mask.dim() == 4 and shape[1] == 1 and shape[2] in (1, n):
        mask = attn_mask
    else:
        raise ValueError(
            f"attn_mask: expected a key-padding mask of shape (B, {n}), (B, 1, 1, {n}) or (B, 1, {n}, {n}), "
            f"got {shape}"
        )
    if mask.shape[-1] != n or mask.shape[0] not in (1, batch):
        raise ValueError(f"attn_mask: expected {batch} samples and {n} keys, got shape {shape}")
    if mask.dtype == torch.bool:
        keep = mask[:, 0]
    elif mask.is_floating_point():
        keep, masked = mask[:, 0] == 0, mask[:, 0] <= MASKED_AT_OR_BELOW
        if not bool((keep | masked).all()):
            raise ValueError(
                f"attn_mask: an additive float mask must hold 0 (take part) or a large negative value "
                f"(<= {MASKED_AT_OR_BELOW:g}: masked, e.g. -inf or finfo.min); other values are a bias, "
                "which the op does not take"
            )
    else:
        raise TypeError(f"attn_mask: expected a bool or float mask, got {mask.dtype}")
    keys = keep[:, 0]  # the query token's row: which keys take part
    if keep.shape[1] > 1:  # (B, N, N): every valid token's row must be that row; a padded token's row may be empty
        same = (keep == keys[:, None, :]).all(-1)
        empty = ~keep.any(-1)
        if not bool((same | (empty & ~keys)).all()):
            raise ValueError(
                "attn_mask: the mask depends on the query (rows of valid tokens differ); FusedRollingQAttention "
                "takes key-padding masks only (a row per query that is the same for every valid token)"
            )
    return keys.expand(batch, n)


def mask_lengths(attn_mask: torch.Tensor, segments: tuple[int, ...], prefix: int, batch: int) -> torch.Tensor:
    """The ``(B, M)`` valid lengths a key-only mask describes.

    Args:
        attn_mask: bool (True: the key takes part, SDPA's meaning) or additive float (0: take part;
            ``<= -1e4``, e.g. -inf or ``finfo.min``: masked), of shape ``(B, N)``, ``(B, 1, 1, N)`` or
            ``(B, 1, N, N)`` (the rows of valid tokens equal; a padded token's row may mask everything, as in
            timm's NaFlexViT). A batch dimension of 1 broadcasts.
        segments: the ``M`` padded modality sizes.
        prefix: ``P``; every prefix token must take part.

    Raises:
        ValueError: another shape, a query-dependent mask, a masked prefix token, or masked keys that are not
            the end of their segment (the op's padding sits at the end of each segment).
    """
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a tensor or None, got {type(attn_mask).__name__}")
    keys = _key_mask(attn_mask, batch, prefix + sum(segments))
    if not bool(keys[:, :prefix].all()):
        raise ValueError(f"attn_mask: the {prefix} prefix token(s) (the query token first) must take part in every "
                         "sample")
    parts = torch.split(keys[:, prefix:], list(segments), dim=1)
    lengths = torch.stack([p.sum(1) for p in parts], dim=1)
    for m, (part, size) in enumerate(zip(parts, segments)):
        prefix_of = torch.arange(size, device=keys.device) < lengths[:, m : m + 1]
        if not torch.equal(part, prefix_of):
            raise ValueError(
                f"attn_mask: the masked keys of modality {m} are not the end of its segment of {size}; "
                "the op takes padding at the end of each segment"
            )
    return lengths.to(torch.int64)


def split_call(attn_mask: Any, is_causal: Any, segments: Any, lengths: Any) -> tuple[Any, Any, Any]:
    """``(attn_mask, segments, lengths)`` of a call, the positional form ``layer(x, segments, lengths)`` unfolded.

    Raises:
        TypeError, ValueError: an argument given twice, or ``is_causal`` other than False.
    """
    if isinstance(attn_mask, (list, tuple)):  # version 0.1: layer(x, segments[, lengths])
        if segments is not None:
            raise TypeError("segments: given twice (positionally and as segments=)")
        segments, attn_mask = attn_mask, None
        if is_causal is None or isinstance(is_causal, torch.Tensor):
            if lengths is not None:
                raise TypeError("lengths: given twice (positionally and as lengths=)")
            lengths, is_causal = is_causal, False
    if is_causal is not False:
        if is_causal is True:
            raise ValueError("is_causal: class-query attention over modality segments is not causal; expected False")
        raise TypeError(f"is_causal: expected False, got {is_causal!r}")
    return attn_mask, segments, lengths


def resolve_call(
    x_shape: Sequence[int],
    device: torch.device,
    *,
    stored: SegmentsSpec | None,
    num_modalities: int,
    prefix: int,
    attn_mask: Any = None,
    is_causal: Any = False,
    segments: Any = None,
    lengths: Any = None,
    context_lengths: Any = None,
    missing: str = NO_SEGMENTS,
) -> CallLayout:
    """The :class:`CallLayout` of a call ``layer(x, attn_mask, is_causal, segments=, lengths=)``.

    A call's own ``segments`` win over the ``stored`` ones; the padding comes from ``lengths`` or ``attn_mask``
    (not both), else from ``context_lengths`` (the layer's ``using_lengths``), else there is none. ``missing`` is
    the error when no segments are given at all.
    """
    attn_mask, segments, lengths = split_call(attn_mask, is_causal, segments, lengths)
    batch, n = int(x_shape[0]), int(x_shape[1])
    if n <= prefix:
        raise ValueError(f"x: expected more than num_prefix_tokens={prefix} tokens, got N={n}")
    segs = resolve_segments(stored if segments is None else segments, n - prefix, num_modalities, missing)
    if attn_mask is not None:
        if lengths is not None:
            raise ValueError("attn_mask, lengths: give the padding once, as lengths or as a key-padding mask")
        lengths = mask_lengths(attn_mask, segs, prefix, batch)
    elif lengths is None:
        lengths = context_lengths
    if lengths is not None:
        lengths = canonical_lengths(lengths, batch, num_modalities, device)
    return CallLayout(segs, lengths, prefix)


def fold_prefix_segment(stats: AttentionStats) -> AttentionStats:
    """The statistics of ``[query token, other prefix tokens, modality 1…M]`` as those of ``M`` modalities.

    The extra prefix segment (the op's first) leaves every per-modality statistic (the ``M`` axis of its shape rule
    in :data:`~rollingq_kernels.stats.STATISTICS`); its class-row attention mass (the ``M+1`` axis) is added to the
    query token's, so ``mass`` still sums to 1 over ``[prefix tokens, modality 1, …, M]``.
    """
    fields = {}
    for name, value in zip(stats._fields, stats):
        shape = STATISTICS_BY_NAME[name].shape
        if "M+1" in shape:  # [class, prefix segment, modality 1…M]: the prefix segment's mass joins the class token's
            axis = shape.index("M+1")
            head, rest = value.narrow(axis, 0, 2).sum(axis, keepdim=True), value.narrow(axis, 2, value.shape[axis] - 2)
            value = torch.cat([head, rest], dim=axis)
        elif "M" in shape:
            axis = shape.index("M")
            value = value.narrow(axis, 1, value.shape[axis] - 1)
        fields[name] = value
    return type(stats)(**fields)
