"""``FusedRollingQAttention``: a drop-in, timm-compatible attention layer.

The layer holds the projections of timm's ViT ``Attention`` (``qkv`` and
``proj``, same parameter names and layout) and is called the way timm's
``Block`` calls its attention, ``attn(x, attn_mask=None, is_causal=False)``, so
``block.attn = FusedRollingQAttention.from_timm(block.attn, segments=...)``
swaps it into a timm ViT, whose plain state dicts then load strictly (absent
rotation keys mean the identity). It calls
:func:`rollingq_kernels.ops.rollingq_attention`, which rotates the class query
by the layer's ``rotation`` buffer (the one source of truth: every forward
reads it) and returns the RollingQ statistics in the same pass. In training mode every forward adds
those statistics to the layer's :class:`StatisticsAccumulator` (its window),
and to every accumulator passed to :meth:`FusedRollingQAttention.collecting`
in any mode; the :class:`~rollingq_kernels.controller.RollingQ` controller
reads the window at the end of an epoch and updates ``rotation``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .accumulator import StatisticsAccumulator, Sums, Window, WindowStatistics, batch_sums, check_window, zero_sums
from .checks import BACKENDS, check_segments
from .dropout import SEED_LIMIT
from .ops import rollingq_attention
from .rebalance import compose_rotations
from .stats import AttentionStats

logger = logging.getLogger("rollingq_kernels")

ROTATION_MODES = ("global", "per_head")
#: Largest ``|RᵀR − I|`` entry a float32/float64 rotation may have (applied or loaded).
ORTHOGONALITY_TOL = 1e-4


def _attend_with_dropout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: tuple[int, ...],
    lengths: torch.Tensor | None,
    rotation: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    backend: str,
):
    """The op with attention dropout and a fresh seed from Python's ``random``.

    Kept out of ``torch.compile`` graphs (:func:`_eager_attend_with_dropout`): a traced call
    would bake the seed into the graph (the same mask every step, or a recompile per seed).
    """
    return rollingq_attention(
        q, k, v, segments, lengths=lengths, rotation=rotation, scale=scale,
        dropout_p=dropout_p, seed=random.randrange(SEED_LIMIT), backend=backend,
    )


_EAGER: dict[str, Any] = {}


def _eager_attend_with_dropout():
    """``torch.compiler.disable(_attend_with_dropout)``, made when first needed (under ``torch.compile``).

    Not a decorator at import: ``torch.compiler.disable`` imports ``torch._dynamo`` (about 1.5 s),
    which an eager user never needs.
    """
    fn = _EAGER.get("dropout")
    if fn is None:
        fn = _EAGER["dropout"] = torch.compiler.disable(_attend_with_dropout)
    return fn


def _check_probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {value!r} ({type(value).__name__})")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {value!r}")
    return float(value)


def orthogonality_error(rotation: torch.Tensor) -> tuple[float, bool]:
    """``(max |RᵀR − I|, det R > 0)`` of a ``(D, D)`` or ``(H, D, D)`` matrix, computed in float64."""
    r = rotation.detach().to(torch.float64)
    eye = torch.eye(r.shape[-1], dtype=torch.float64, device=r.device)
    error = float((r.mT @ r - eye).abs().max())
    proper = bool((torch.linalg.slogdet(r).sign > 0).all()) if error < 0.5 else False
    return error, proper


def key_padding_lengths(attn_mask: torch.Tensor, segments: tuple[int, ...]) -> torch.Tensor:
    """The ``(B, M)`` valid lengths a timm-style key-padding mask describes.

    Args:
        attn_mask: bool ``(B, N)`` or ``(B, 1, 1, N)`` (True: the key takes part, SDPA's meaning), or a float
            additive mask of those shapes holding only 0 (take part) and -inf (masked).
        segments: the ``M`` padded modality sizes, ``N = 1 + sum(segments)``.

    Raises:
        ValueError: another shape or values, a masked class token, or masked keys that are not
            the end of their segment (the op's padding sits at the end of each segment).
    """
    n = 1 + sum(segments)
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() == 4 and shape[1:3] == (1, 1):
        mask = attn_mask[:, 0, 0]
    elif attn_mask.dim() == 2:
        mask = attn_mask
    else:
        raise ValueError(
            f"attn_mask: FusedRollingQAttention takes key-padding masks only, of shape (B, {n}) or (B, 1, 1, {n}); "
            f"got {shape} (query-dependent masks are not supported)"
        )
    if mask.shape[-1] != n:
        raise ValueError(f"attn_mask: expected {n} keys (1 + sum(segments) for segments {segments}), got {shape}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise TypeError(f"attn_mask: expected a bool or float mask, got {mask.dtype}")
        keep = mask == 0
        if not bool((keep | (mask == float("-inf"))).all()):
            raise ValueError("attn_mask: a float mask must hold only 0 (take part) and -inf (masked)")
        mask = keep
    if not bool(mask[:, 0].all()):
        raise ValueError("attn_mask: the class token (key 0) must take part in every sample")
    parts = torch.split(mask[:, 1:], list(segments), dim=1)
    lengths = torch.stack([p.sum(1) for p in parts], dim=1)
    for m, (part, size) in enumerate(zip(parts, segments)):
        prefix = torch.arange(size, device=mask.device) < lengths[:, m : m + 1]
        if not torch.equal(part, prefix):
            raise ValueError(
                f"attn_mask: the masked keys of modality {m} are not the end of its segment of {size}; "
                "the op takes padding at the end of each segment"
            )
    return lengths


class FusedRollingQAttention(nn.Module):
    """Multi-head self-attention whose class query is rotated (RollingQ).

    Args:
        dim: token width ``C``; must be divisible by ``num_heads``.
        num_heads: ``H``; the head size is ``Dh = C / H``.
        qkv_bias: bias of the ``qkv`` projection (timm's ``qkv_bias``).
        attn_drop: attention-probability dropout, applied in training only.
            Each call draws its mask seed from Python's ``random`` (seed it
            with ``random.seed`` for reproducible masks). The op takes the
            seed as a Python int, which a compiled graph would bake in, so
            under ``torch.compile`` a training call with dropout runs the
            attention eagerly (one graph break; ``fullgraph=True`` needs
            ``attn_drop=0``).
        proj_drop: dropout after ``proj``.
        num_modalities: ``M ≥ 2``, the number of modality segments after the
            class token (default: ``len(segments)``, else 2).
        rotation_mode: ``"global"`` (one ``(C, C)`` rotation of the
            concatenated heads) or ``"per_head"`` (``(H, Dh, Dh)``).
        class_query_only: only the class token queries; ``forward`` returns
            ``(B, 1, C)``. Exact for a last fusion layer whose class output
            alone feeds the head, and ``N`` times cheaper.
        backend: the op's backend (``"auto"``, ``"cpp"``, ``"triton"``,
            ``"reference"``).
        proj_bias: bias of ``proj`` (timm's ``proj_bias``).
        scale: score scale; default ``Dh ** -0.5`` (timm's).
        window: the statistics window, ``"epoch"`` or the last ``K`` batches
            (the controller sets it when it registers the layer).
        segments: the padded modality sizes ``(L_1, …, L_M)`` of the token
            layout ``[class token, modality 1, …, modality M]``, set once so
            that the layer can be called like timm's ``Attention``
            (:meth:`set_segments` changes them; a call may also pass its own).

    Buffers (saved in ``state_dict``):
        rotation: float32 (float64 if the layer is cast to float64; casts to
            16-bit types leave it float32), identity at start; ``(C, C)`` or
            ``(H, Dh, Dh)``. Every forward passes it to the op: writing it in
            place (EMA weights, DDP's buffer broadcast, ``load_state_dict``)
            changes the next forward. A state dict that holds this layer's
            ``qkv.weight`` but no ``rotation`` (a plain timm checkpoint) loads
            as the identity, even with ``strict=True``.
        num_rotations: int64 scalar, rotations applied so far.

    Attributes:
        segments: the stored modality sizes, or None.
        last_stats: the op's :class:`AttentionStats` of the last call (detached),
            or None before the first call.
        statistics: the :class:`StatisticsAccumulator` fed in training mode
            (the window the controller decides on).
        collect_statistics: feed ``statistics`` in training mode (default True).
    """

    rotation: torch.Tensor
    num_rotations: torch.Tensor

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        num_modalities: int | None = None,
        rotation_mode: str = "global",
        class_query_only: bool = False,
        backend: str = "auto",
        *,
        proj_bias: bool = True,
        scale: float | None = None,
        window: Window = "epoch",
        segments: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of dim={dim}, got {num_heads!r}")
        segs = None if segments is None else check_segments(segments)
        if num_modalities is None:
            num_modalities = 2 if segs is None else len(segs)
        if isinstance(num_modalities, bool) or not isinstance(num_modalities, int) or num_modalities < 2:
            raise ValueError(f"num_modalities: expected an int >= 2, got {num_modalities!r}")
        if segs is not None and len(segs) != num_modalities:
            raise ValueError(f"segments: expected num_modalities={num_modalities} sizes, got {list(segs)}")
        if rotation_mode not in ROTATION_MODES:
            raise ValueError(f"rotation_mode: expected one of {ROTATION_MODES}, got {rotation_mode!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"scale: expected a finite float > 0 or None, got {scale!r}")
        self.attn_drop_p = _check_probability("attn_drop", attn_drop)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_modalities = num_modalities
        self.segments: tuple[int, ...] | None = segs
        self.rotation_mode = rotation_mode
        self.class_query_only = bool(class_query_only)
        self.backend = backend
        self.scale = float(scale) if scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(_check_probability("proj_drop", proj_drop))
        self.register_buffer("rotation", self._identity(), persistent=True)
        self.register_buffer("num_rotations", torch.zeros((), dtype=torch.int64), persistent=True)
        self.last_stats: AttentionStats | None = None
        self.statistics = StatisticsAccumulator(check_window(window))
        self.collect_statistics = True
        self._collectors: list[StatisticsAccumulator] = []  # see collecting()
        self._window_paused = 0
        self._lengths: list[torch.Tensor | None] = []  # see using_lengths()

    # ------------------------------------------------------------------ construction
    def rotation_shape(self) -> tuple[int, ...]:
        """``(C, C)`` for a global rotation, ``(H, Dh, Dh)`` per head."""
        if self.rotation_mode == "global":
            return (self.dim, self.dim)
        return (self.num_heads, self.head_dim, self.head_dim)

    def _identity(self, device: torch.device | None = None) -> torch.Tensor:
        if self.rotation_mode == "global":
            return torch.eye(self.dim, dtype=torch.float32, device=device)
        eye = torch.eye(self.head_dim, dtype=torch.float32, device=device)
        return eye.repeat(self.num_heads, 1, 1)

    def set_segments(self, segments: Sequence[int] | None) -> None:
        """Store the padded modality sizes ``(L_1, …, L_M)`` every call uses (None: each call passes its own)."""
        if segments is None:
            self.segments = None
            return
        segs = check_segments(segments)
        if len(segs) != self.num_modalities:
            raise ValueError(
                f"segments: expected {self.num_modalities} modality sizes (num_modalities), got {list(segs)}"
            )
        self.segments = segs

    @contextmanager
    def using_lengths(self, lengths: torch.Tensor | None) -> Iterator[None]:
        """Calls inside the context use ``lengths``, ``(B, M)`` valid tokens per modality (the batch's padding).

        For a layer inside a model whose forward does not pass lengths (a timm ``Block``):
        ``with attn.using_lengths(lengths): vit(x)``. Contexts nest; a call's own ``lengths=``
        or ``attn_mask`` wins.
        """
        self._lengths.append(lengths)
        try:
            yield
        finally:
            self._lengths.pop()

    @classmethod
    def from_timm(cls, attn: nn.Module, **kwargs: Any) -> FusedRollingQAttention:
        """Build a layer with the weights of a ``timm.models.vision_transformer.Attention``.

        ``dim``, ``num_heads``, the biases, dropouts and scale are read from
        ``attn``; ``kwargs`` sets the rest (``segments``, ``num_modalities``,
        ``rotation_mode``, ``class_query_only``, ``backend``, ``window``). The
        weights are copied (same device and dtype). With the identity rotation
        the layer computes exactly what ``attn`` computes, and it replaces
        ``attn`` inside a timm ``Block`` as is::

            block.attn = FusedRollingQAttention.from_timm(block.attn, segments=(98, 98))

        Raises:
            ValueError: ``attn`` uses q/k normalization, scale normalization,
                gating or a head width different from its input width, which
                this layer does not implement.
        """
        for name in ("qkv", "proj", "num_heads", "head_dim"):
            if not hasattr(attn, name):
                raise TypeError(f"attn: expected a timm vision_transformer.Attention, got {type(attn).__name__} "
                                f"without {name!r}")
        for name in ("q_norm", "k_norm", "norm"):
            sub = getattr(attn, name, None)
            if sub is not None and not isinstance(sub, nn.Identity):
                flag = "scale_norm" if name == "norm" else "qk_norm"
                raise ValueError(
                    f"attn: has a {name} layer ({type(sub).__name__}, timm's {flag}=True); "
                    "FusedRollingQAttention supports only attention without q/k or scale normalization"
                )
        if getattr(attn, "gate", None) is not None:
            raise ValueError("attn: uses a gated output (timm's gated=True), which is not supported")
        dim = attn.qkv.in_features
        if attn.qkv.out_features != 3 * dim or attn.proj.out_features != dim:
            raise ValueError(
                f"attn: expected qkv {dim}->{3 * dim} and proj {dim}->{dim}, got qkv "
                f"{attn.qkv.in_features}->{attn.qkv.out_features} and proj {attn.proj.in_features}->"
                f"{attn.proj.out_features} (attn_head_dim / dim_out are not supported)"
            )
        attn_drop = attn.attn_drop.p if isinstance(getattr(attn, "attn_drop", None), nn.Dropout) else 0.0
        proj_drop = attn.proj_drop.p if isinstance(getattr(attn, "proj_drop", None), nn.Dropout) else 0.0
        kwargs.setdefault("scale", float(getattr(attn, "scale", attn.head_dim**-0.5)))
        layer = cls(
            dim,
            num_heads=attn.num_heads,
            qkv_bias=attn.qkv.bias is not None,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            proj_bias=attn.proj.bias is not None,
            **kwargs,
        )
        weight = attn.qkv.weight
        layer.to(device=weight.device, dtype=weight.dtype)  # the rotation stays float32 (see _apply)
        with torch.no_grad():
            layer.qkv.weight.copy_(attn.qkv.weight)
            layer.proj.weight.copy_(attn.proj.weight)
            if attn.qkv.bias is not None:
                layer.qkv.bias.copy_(attn.qkv.bias)
            if attn.proj.bias is not None:
                layer.proj.bias.copy_(attn.proj.bias)
        layer.train(attn.training)
        return layer

    # ------------------------------------------------------------------ rotation state
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
        return torch.equal(self.rotation, self._identity(self.rotation.device).to(self.rotation.dtype))

    def _check_rotation(self, what: str, rotation: torch.Tensor) -> str | None:
        """None if ``rotation`` is a finite proper rotation of the layer's shape, else what is wrong."""
        if tuple(rotation.shape) != self.rotation_shape():
            return (f"{what}: expected shape {self.rotation_shape()} for rotation_mode={self.rotation_mode!r} "
                    f"(dim={self.dim}, num_heads={self.num_heads}), got {tuple(rotation.shape)}")
        if not rotation.is_floating_point():
            return f"{what}: expected a float tensor, got {rotation.dtype}"
        if rotation.device.type == "meta":
            return None
        if not bool(torch.isfinite(rotation).all()):
            return f"{what}: expected a finite rotation, got NaN or inf"
        tol = ORTHOGONALITY_TOL if rotation.dtype in (torch.float32, torch.float64) else 1e-2
        error, proper = orthogonality_error(rotation)
        if error > tol:
            return f"{what}: expected an orthogonal matrix (max |R^T R - I| <= {tol:g}), got {error:.3g}"
        if not proper:
            return f"{what}: expected a rotation (determinant +1), got a reflection (determinant -1)"
        return None

    @torch.no_grad()
    def apply_rotation(self, new: torch.Tensor) -> None:
        """Compose a rotation into the buffer, ``R ← new @ R``, and count it.

        Args:
            new: ``rotation_shape()`` rotation (any float dtype, finite, orthogonal with
                determinant +1 to within ``1e-4`` for float32/float64).
        """
        if not isinstance(new, torch.Tensor):
            raise TypeError(f"new: expected a tensor, got {type(new).__name__}")
        problem = self._check_rotation("new", new)
        if problem:
            raise ValueError(problem)
        self.rotation.copy_(compose_rotations(new.to(self.rotation.device), self.rotation))
        self.num_rotations += 1

    @torch.no_grad()
    def restore_rotation(self, rotation: torch.Tensor, num_rotations: int) -> None:
        """Put back a rotation saved earlier, and its count (the controller's rollback)."""
        problem = self._check_rotation("rotation", rotation)
        if problem:
            raise ValueError(problem)
        self.rotation.copy_(rotation)
        self.num_rotations.fill_(int(num_rotations))

    @torch.no_grad()
    def reset_rotation(self) -> None:
        """Back to the identity rotation and zero rotations."""
        self.rotation.copy_(self._identity(self.rotation.device).to(self.rotation.dtype))
        self.num_rotations.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        rot_key, count_key = prefix + "rotation", prefix + "num_rotations"
        problems = []
        if rot_key in state_dict:
            problem = self._check_rotation(f"state_dict[{rot_key!r}]", state_dict[rot_key])
            if problem:
                problems.append((rot_key, problem))
        if count_key in state_dict:
            count = state_dict[count_key]
            if not isinstance(count, torch.Tensor) or count.numel() != 1 or count.is_floating_point() or (
                    count.device.type != "meta" and int(count) < 0):
                problems.append((count_key, f"state_dict[{count_key!r}]: expected a count >= 0 (an int64 scalar), "
                                            f"got {count!r}"))
        if problems:  # torch passes strict=True here whatever the caller asked: a bad value fails either way
            raise ValueError(problems[0][1])
        absent = rot_key not in state_dict and count_key not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in (rot_key, count_key):  # absent rotation keys mean the identity, also for strict=True
            if key in missing_keys:
                missing_keys.remove(key)
        if absent and prefix + "qkv.weight" in state_dict:
            self.reset_rotation()  # the weights of a plain (unrotated) attention layer

    # ------------------------------------------------------------------ statistics
    def reset_statistics(self) -> None:
        """Start a fresh statistics window."""
        self.statistics.reset()

    def set_window(self, window: Window) -> None:
        """Use the statistics window ``"epoch"`` or the last ``K`` batches (a change starts it empty)."""
        if check_window(window) != self.statistics.window:
            self.statistics = StatisticsAccumulator(window)

    def window_statistics(self) -> WindowStatistics | None:
        """The window's reduced statistics (:class:`~rollingq_kernels.accumulator.WindowStatistics`), or None."""
        return self.statistics.reduce()

    def zero_sums(self) -> Sums:
        """Zero sums shaped like this layer's (a rank without batches joins an all-reduce with them)."""
        return zero_sums(self.num_heads, self.num_modalities, self.head_dim, self.rotation.device)

    @contextmanager
    def collecting(self, accumulator: StatisticsAccumulator, *, window: bool = True) -> Iterator[StatisticsAccumulator]:
        """Also add every forward's statistics to ``accumulator`` while the context is open.

        It receives the statistics of training and evaluation forwards alike
        (the trainer's epoch log, a validation pass, the controller's
        estimation pass). Contexts nest.

        Args:
            accumulator: where the statistics go.
            window: keep feeding the layer's own window (:attr:`statistics`,
                training forwards only) meanwhile; False pauses it, so extra
                forwards never enter the controller's decision window.

        Yields:
            ``accumulator``.
        """
        if not isinstance(accumulator, StatisticsAccumulator):
            raise TypeError(f"accumulator: expected a StatisticsAccumulator, got {type(accumulator).__name__}")
        self._collectors.append(accumulator)
        self._window_paused += not window
        try:
            yield accumulator
        finally:
            self._collectors.remove(accumulator)
            self._window_paused -= not window

    def _record(self, stats: AttentionStats) -> None:
        self.last_stats = stats
        targets = list(self._collectors)
        if self.training and self.collect_statistics and not self._window_paused:
            targets.append(self.statistics)
        if targets:
            sums = batch_sums(stats)  # once, whatever the number of accumulators
            for accumulator in targets:
                accumulator.add_sums(sums)

    # ------------------------------------------------------------------ forward
    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        H, Dh = self.num_heads, self.head_dim
        if not self.class_query_only:
            qkv = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            return q, k, v
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:C], None if b is None else b[:C]).reshape(B, 1, H, Dh).transpose(1, 2)
        kv = F.linear(x, w[C:], None if b is None else b[C:]).reshape(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        return q, k, v

    def _call_layout(self, attn_mask, is_causal, segments, lengths):
        """Resolve a call's segments and lengths (see :meth:`forward`)."""
        if isinstance(attn_mask, (list, tuple)):  # the positional form layer(x, segments[, lengths]) of 0.1
            if segments is not None:
                raise TypeError("segments: given twice (positionally and as segments=)")
            segments, attn_mask = attn_mask, None
            if is_causal is None or isinstance(is_causal, torch.Tensor):
                if lengths is not None:
                    raise TypeError("lengths: given twice (positionally and as lengths=)")
                lengths, is_causal = is_causal, False
        if is_causal is not False:
            if is_causal is True:
                raise ValueError("is_causal: class-query attention over modality segments is not causal; "
                                 "expected False")
            raise TypeError(f"is_causal: expected False, got {is_causal!r}")
        if segments is None:
            segments = self.segments
            if segments is None:
                raise ValueError(
                    "segments: not set; pass the modality sizes once (FusedRollingQAttention(..., segments=...), "
                    "from_timm(attn, segments=...) or set_segments()) or per call (segments=...)"
                )
        elif len(segments) != self.num_modalities:
            raise ValueError(
                f"segments: expected {self.num_modalities} modality sizes (num_modalities), got {list(segments)}"
            )
        segments = tuple(segments)
        if attn_mask is not None:
            if lengths is not None:
                raise ValueError("attn_mask, lengths: give the padding once, as lengths or as a key-padding mask")
            if not isinstance(attn_mask, torch.Tensor):
                raise TypeError(f"attn_mask: expected a tensor or None, got {type(attn_mask).__name__}")
            lengths = key_padding_lengths(attn_mask, check_segments(segments))
        elif lengths is None and self._lengths:
            lengths = self._lengths[-1]
        return segments, lengths

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        segments: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over ``[class token, modality 1 tokens, …, modality M tokens]``.

        Called like timm's ``Attention`` (``attn(x, attn_mask=None, is_causal=False)``) once the
        segments are set; ``layer(x, segments, lengths)`` (positional) is accepted too.

        Args:
            x: ``(B, N, C)`` tokens, ``N = 1 + sum(segments)``; any float dtype
                the op supports.
            attn_mask: None, or a key-padding mask (bool ``(B, N)`` / ``(B, 1, 1, N)``, True = take
                part; or float 0 / -inf) whose masked keys are the end of each segment; it becomes
                ``lengths``. Query-dependent masks are not supported.
            is_causal: must be False (timm passes it).
            segments: the ``M`` padded modality sizes of this call (default: the stored ones).
            lengths: optional ``(B, M)`` integer tensor of valid tokens per
                modality (padding at the end of each segment); default: the
                innermost :meth:`using_lengths` context, else no padding.

        Returns:
            ``(B, N, C)``, or ``(B, 1, C)`` (the class token only) when
            ``class_query_only``; the dtype of ``x``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (B, N, {self.dim}), got {tuple(x.shape)}")
        segments, lengths = self._call_layout(attn_mask, is_causal, segments, lengths)
        q, k, v = self._project(x)
        if self.training and self.attn_drop_p > 0.0:
            attend = _eager_attend_with_dropout() if torch.compiler.is_compiling() else _attend_with_dropout
            out, stats = attend(
                q, k, v, segments, lengths, self.rotation, self.scale, self.attn_drop_p, self.backend
            )
        else:
            out, stats = rollingq_attention(
                q, k, v, segments, lengths=lengths, rotation=self.rotation, scale=self.scale, backend=self.backend
            )
        if stats is not None:
            self._record(stats)
        B, H, nq, Dh = out.shape
        out = out.transpose(1, 2).reshape(B, nq, H * Dh)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_modalities={self.num_modalities}, "
            f"rotation_mode={self.rotation_mode!r}, class_query_only={self.class_query_only}, "
            f"attn_drop={self.attn_drop_p}, backend={self.backend!r}"
            + ("" if self.segments is None else f", segments={self.segments}")
        )
