"""``FusedRollingQAttention``: a drop-in, timm-compatible attention layer.

The layer holds the projections of timm's ViT ``Attention`` (``qkv`` and ``proj``, same parameter names and
layout) and is called the way timm's ``Block`` calls its attention, ``attn(x, attn_mask=None, is_causal=False)``,
so ``block.attn = FusedRollingQAttention.from_timm(block.attn, segments=...)`` swaps it into a timm ViT, whose
plain state dicts then load strictly (absent rotation keys mean the identity). It calls
:func:`rollingq_kernels.ops.rollingq_attention`, which rotates the query token's query by the layer's
``rotation`` buffer (the one source of truth: every forward reads it) and returns the RollingQ statistics in the
same pass. Its other jobs live beside it: the call's layout (:mod:`~rollingq_kernels.layout`), the statistics
(:mod:`~rollingq_kernels.tap`, which the :class:`~rollingq_kernels.controller.RollingQ` controller reads), the
adapters (:mod:`~rollingq_kernels.adapters`, :mod:`~rollingq_kernels.integrations`) and the argument checks
(:mod:`~rollingq_kernels.layer_checks`).

Tokens are ``[prefix tokens, modality 1, …, modality M]``; the first prefix token (the class token) is the query
token (:mod:`~rollingq_kernels.layout` says how the other prefix tokens join no modality).

Arguments of :class:`FusedRollingQAttention`:

* ``dim``, ``num_heads``: ``C`` and ``H`` (``Dh = C / H``); ``qkv_bias``, ``proj_bias``: biases of ``qkv``, ``proj``.
* ``attn_drop``: attention dropout (training only; a fresh seed per call from Python's ``random``; under
  ``torch.compile`` such a call runs eagerly, so ``fullgraph=True`` needs ``attn_drop=0``); ``proj_drop``:
  dropout after ``proj``.
* ``num_modalities``: ``M ≥ 2`` (default: ``len(segments)``, else 2).
* ``rotation_mode``: ``"global"`` (one ``(C, C)`` rotation) or ``"per_head"`` (``(H, Dh, Dh)``).
* ``class_query_only``: only the query token queries; ``forward`` returns ``(B, 1, C)`` (exact, and ``N`` times
  cheaper, for a last fusion layer whose class output alone feeds the head).
* ``backend``: the op's backend (``"auto"``, ``"cpp"``, ``"triton"``, ``"reference"``).
* ``scale``: score scale (default ``Dh ** -0.5``); ``window``: the statistics window (``"epoch"`` or ``K``).
* ``segments``: the ``M`` padded modality sizes, or a rule ``n -> sizes`` of the ``n = N − P`` modality tokens
  (:class:`~rollingq_kernels.layout.EvenSplit`); a call may pass its own.
* ``num_prefix_tokens``: ``P ≥ 1``; ``projections``: False leaves out ``qkv``/``proj`` (integrations that project
  themselves call :meth:`FusedRollingQAttention.attend`).

Buffers (in ``state_dict``): ``rotation``, float32 (float64 in a float64 layer), identity at start, read by every
forward (in-place writes, EMA, DDP's buffer broadcast and ``load_state_dict`` take effect; a state dict with this
layer's ``qkv.weight`` but no ``rotation`` loads as the identity, even strictly); ``num_rotations``, int64, the
rotations applied so far.
"""

# No `from __future__ import annotations`: TorchScript reads the forward's annotations as objects.
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters, scripting
from .accumulator import StatisticsAccumulator, Sums, Window, WindowStatistics, zero_sums
from .checks import check_segments
from .dropout import SEED_LIMIT
from .layer_checks import (  # noqa: F401 (ROTATION_MODES, ORTHOGONALITY_TOL: re-exported, the config reads them)
    ORTHOGONALITY_TOL,
    ROTATION_MODES,
    check_layer_arguments,
    check_probability,
    identity_rotation,
    rotation_problem,
    state_problem,
)
from .layout import CallLayout, SegmentsSpec, check_prefix, check_segments_spec, fold_prefix_segment, resolve_call
from .ops import rollingq_attention
from .rebalance import compose_rotations
from .stats import AttentionStats
from .tap import StatisticsTap


def _attend(q, k, v, layout: CallLayout, rotation, scale: float, dropout_p: float, backend: str):
    """The op, with a fresh dropout seed from Python's ``random`` when ``dropout_p > 0``.

    Kept out of ``torch.compile`` graphs with dropout (``torch.compiler.disable``, applied when first
    compiled): a traced call would bake the seed into the graph.
    """
    seed = random.randrange(SEED_LIMIT) if dropout_p > 0.0 else None
    return rollingq_attention(q, k, v, layout.op_segments(), lengths=layout.op_lengths(), rotation=rotation,
                              scale=scale, dropout_p=dropout_p, seed=seed, backend=backend)


def _project(qkv: nn.Linear, x: torch.Tensor, num_heads: int, class_query_only: bool):
    """``(q, k, v)`` of ``x`` ``(B, N, C)``, each ``(B, H, N, Dh)`` (``q`` ``(B, H, 1, Dh)`` class-query-only)."""
    B, N, C = x.shape
    H, Dh = num_heads, C // num_heads
    if not class_query_only:
        return qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    w, b = qkv.weight, qkv.bias
    q = F.linear(x[:, :1], w[:C], None if b is None else b[:C]).reshape(B, 1, H, Dh).transpose(1, 2)
    kv = F.linear(x, w[C:], None if b is None else b[C:]).reshape(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4)
    return (q, *kv.unbind(0))


_EAGER: dict[str, Any] = {}  # torch.compiler.disable(_attend), made on first use (it imports torch._dynamo)


class FusedRollingQAttention(nn.Module):
    """Multi-head self-attention whose query token's query is rotated (RollingQ); arguments: the module doc."""

    __jit_unused_properties__ = ["rotation_is_identity", "statistics", "last_stats", "collect_statistics"]

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, num_modalities: int | None = None, rotation_mode: str = "global",
                 class_query_only: bool = False, backend: str = "auto", *, proj_bias: bool = True,
                 scale: float | None = None, window: Window = "epoch", segments: SegmentsSpec | None = None,
                 num_prefix_tokens: int = 1, projections: bool = True) -> None:
        super().__init__()
        if num_modalities is None:
            num_modalities = 2 if segments is None or callable(segments) else len(check_segments(segments))
        check_layer_arguments(dim, num_heads, num_modalities, rotation_mode, backend, scale)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.num_modalities, self.rotation_mode, self.backend = num_modalities, rotation_mode, backend
        self.segments = check_segments_spec(segments, num_modalities)
        self.num_prefix_tokens = check_prefix(num_prefix_tokens)
        self.class_query_only = bool(class_query_only)
        self.scale = float(scale) if scale is not None else self.head_dim**-0.5
        self.attn_drop_p = check_probability("attn_drop", attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias) if projections else None
        self.proj = nn.Linear(dim, dim, bias=proj_bias) if projections else None
        self.proj_drop = nn.Dropout(check_probability("proj_drop", proj_drop))
        self.register_buffer("rotation", identity_rotation(self.rotation_shape()), persistent=True)
        self.register_buffer("num_rotations", torch.zeros((), dtype=torch.int64), persistent=True)
        self.tap = StatisticsTap(window)
        self._lengths: list[Any] = []  # see using_lengths()
        self._script_key = 0  # see __prepare_scriptable__

    @classmethod
    def from_timm(cls, attn: nn.Module, **kwargs: Any) -> "FusedRollingQAttention":
        """A layer holding a timm ``Attention``'s ``qkv``/``proj``: with the identity rotation it computes what
        ``attn`` computes (:func:`rollingq_kernels.adapters.from_timm`; ``class_query_only`` is refused)."""
        return adapters.from_timm(cls, attn, **kwargs)

    def set_segments(self, segments: SegmentsSpec | None) -> None:
        """Store the modality sizes, or a rule ``n -> sizes``, every call uses (None: each call passes its own)."""
        self.segments = check_segments_spec(segments, self.num_modalities)

    @contextmanager
    def using_lengths(self, lengths: Any) -> Iterator[None]:
        """Calls inside use ``lengths`` (``(B, M)`` valid tokens per modality) unless they pass their own padding:
        for a layer inside a model whose forward passes none, ``with attn.using_lengths(lengths): vit(x)``."""
        self._lengths.append(lengths)
        try:
            yield
        finally:
            self._lengths.pop()

    # ------------------------------------------------------------------ rotation state
    def rotation_shape(self) -> tuple[int, ...]:
        """``(C, C)`` for a global rotation, ``(H, Dh, Dh)`` per head."""
        return (self.dim, self.dim) if self.rotation_mode == "global" else (self.num_heads,) + (self.head_dim,) * 2

    def _apply(self, fn, recurse: bool = True):
        """Keep ``rotation`` float32 when the layer is cast (``.half()``, ``.to(bfloat16)``)."""
        before = self.rotation
        super()._apply(fn, recurse)
        if self.rotation.dtype not in (torch.float32, torch.float64):
            self.rotation = before.to(device=self.rotation.device)
        return self

    @property
    def rotation_is_identity(self) -> bool:
        """True while the ``rotation`` buffer holds the identity (read from the buffer)."""
        eye = identity_rotation(self.rotation_shape(), self.rotation.device)
        return torch.equal(self.rotation, eye.to(self.rotation.dtype))

    @torch.no_grad()
    def apply_rotation(self, new: torch.Tensor) -> None:
        """Compose a ``rotation_shape()`` rotation into the buffer, ``R ← new @ R``, and count it (any float dtype;
        finite, orthogonal with determinant +1 to within ``1e-4`` for float32/float64)."""
        problem = rotation_problem("new", new, self)
        if problem:
            raise (TypeError if not isinstance(new, torch.Tensor) else ValueError)(problem)
        self.rotation.copy_(compose_rotations(new.to(self.rotation.device), self.rotation))
        self.num_rotations += 1

    @torch.no_grad()
    def restore_rotation(self, rotation: torch.Tensor, num_rotations: int) -> None:
        """Put back a rotation saved earlier, and its count (the controller's rollback)."""
        problem = rotation_problem("rotation", rotation, self)
        count = int(num_rotations)
        if problem or count < 0:  # checked before anything changes
            raise ValueError(problem or f"num_rotations: expected an integer >= 0, got {count}")
        self.rotation.copy_(rotation)
        self.num_rotations.fill_(count)

    @torch.no_grad()
    def reset_rotation(self) -> None:
        """Back to the identity rotation and zero rotations."""
        self.rotation.copy_(identity_rotation(self.rotation_shape(), self.rotation.device))
        self.num_rotations.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        problem = state_problem(state_dict, prefix, self)
        if problem:  # torch passes strict=True here whatever the caller asked: a bad value fails either way
            raise ValueError(problem)
        keys = (prefix + "rotation", prefix + "num_rotations")
        absent = not any(key in state_dict for key in keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        missing_keys[:] = [key for key in missing_keys if key not in keys]  # absent: the identity, strict too
        if absent and (prefix + "qkv.weight" in state_dict or self.qkv is None):
            self.reset_rotation()  # the weights of a plain (unrotated) attention layer

    # ------------------------------------------------------------------ statistics (the tap's)
    @property
    def statistics(self) -> StatisticsAccumulator:
        """The window fed by training calls (the one the controller decides on)."""
        return self.tap.statistics

    @property
    def last_stats(self) -> AttentionStats | None:
        """The op's statistics of the last call (detached), or None before the first call."""
        return self.tap.last

    @property
    def collect_statistics(self) -> bool:
        """Feed :attr:`statistics` in training mode (default True)."""
        return self.tap.enabled

    @collect_statistics.setter
    def collect_statistics(self, value: bool) -> None:
        self.tap.enabled = bool(value)

    def collecting(self, accumulator: StatisticsAccumulator, *, window: bool = True):
        """Also add every call's statistics to ``accumulator`` while open (:meth:`StatisticsTap.subscribe`)."""
        return self.tap.subscribe(accumulator, window=window)

    def set_window(self, window: Window) -> None:
        self.tap.set_window(window)

    def reset_statistics(self) -> None:
        self.tap.reset()

    def window_statistics(self) -> WindowStatistics | None:
        return self.tap.reduce()

    def zero_sums(self) -> Sums:
        """Zero sums shaped like this layer's (a rank without batches joins an all-reduce with them)."""
        return zero_sums(self.num_heads, self.num_modalities, self.head_dim, self.rotation.device)

    # ------------------------------------------------------------------ forward
    def layout(self, x_shape: Sequence[int], device: torch.device, attn_mask: Any = None, is_causal: Any = False,
               segments: Any = None, lengths: Any = None) -> CallLayout:
        """The canonical layout of a call (:func:`rollingq_kernels.layout.resolve_call`)."""
        context = self._lengths[-1] if self._lengths else None
        return resolve_call(x_shape, device, stored=self.segments, num_modalities=self.num_modalities,
                            prefix=self.num_prefix_tokens, attn_mask=attn_mask, is_causal=is_causal,
                            segments=segments, lengths=lengths, context_lengths=context)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: CallLayout,
               dropout_p: float | None = None) -> torch.Tensor:
        """The op on projected ``(B, H, Nq, Dh)`` q and ``(B, H, N, Dh)`` k, v; feeds the tap; ``(B, H, Nq, Dh)``."""
        p = (self.attn_drop_p if self.training else 0.0) if dropout_p is None else dropout_p
        attend = _attend
        if p > 0.0 and torch.compiler.is_compiling():
            attend = _EAGER.get("attend") or _EAGER.setdefault("attend", torch.compiler.disable(_attend))
        out, stats = attend(q, k, v, layout, self.rotation, self.scale, p, self.backend)
        if stats is not None:
            self.tap.record(fold_prefix_segment(stats) if layout.prefix > 1 else stats, self.training)
        return out

    def __prepare_scriptable__(self) -> "FusedRollingQAttention":
        self._script_key = scripting.register(self)
        return self

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                segments: list[int] | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over ``x`` ``(B, N, C)``; called like timm's ``Attention`` once the segments are set.

        ``attn_mask``: a key-padding mask (:func:`rollingq_kernels.layout.mask_lengths`), ``is_causal`` False;
        ``segments`` (sizes or a rule) and ``lengths`` (``(B, M)`` valid tokens) override the stored ones and the
        :meth:`using_lengths` context; ``layer(x, segments, lengths)`` works too. Returns ``(B, N, C)``, or
        ``(B, 1, C)`` with ``class_query_only``, in the dtype of ``x``.
        """
        return self._forward(x, attn_mask, is_causal, segments, lengths)

    @torch.jit.ignore
    def _forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                 segments: list[int] | None, lengths: torch.Tensor | None) -> torch.Tensor:
        layer = scripting.owner(self, FusedRollingQAttention)  # TorchScript calls with its scripted module
        if layer.training != self.training:
            layer.train(self.training)  # the scripted module's mode (model.eval() after scripting)
        if layer.qkv is None:
            raise RuntimeError("forward: this layer has no projections (projections=False); call attend(q, k, v)")
        if x.dim() != 3 or x.shape[-1] != layer.dim:
            raise ValueError(f"x: expected shape (B, N, {layer.dim}), got {tuple(x.shape)}")
        layout = layer.layout(x.shape, x.device, attn_mask, is_causal, segments, lengths)
        out = layer.attend(*_project(layer.qkv, x, layer.num_heads, layer.class_query_only), layout)
        B, H, nq, Dh = out.shape
        return layer.proj_drop(layer.proj(out.transpose(1, 2).reshape(B, nq, H * Dh)))

    def extra_repr(self) -> str:
        segments = "" if self.segments is None else f", segments={self.segments}"
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_modalities={self.num_modalities}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, rotation_mode={self.rotation_mode!r}, "
                f"class_query_only={self.class_query_only}, attn_drop={self.attn_drop_p}, "
                f"backend={self.backend!r}{segments}")
