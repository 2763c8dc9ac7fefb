"""``FusedRollingQAttention``: a drop-in, timm-compatible attention layer.

The layer holds the projections of timm's ViT ``Attention`` (``qkv`` and
``proj``, same parameter names and layout, so a timm block's weights load
unchanged) and calls :func:`rollingq_kernels.ops.rollingq_attention`, which
rotates the class query by the layer's ``rotation`` buffer and returns the
RollingQ statistics in the same pass. In training mode every forward adds
those statistics to the layer's :class:`StatisticsAccumulator` (its window),
and to every accumulator passed to :meth:`FusedRollingQAttention.collecting`
in any mode; the :class:`~rollingq_kernels.controller.RollingQ` controller
reads the window at the end of an epoch and updates ``rotation``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .accumulator import StatisticsAccumulator, Sums, Window, WindowStatistics, batch_sums, check_window, zero_sums
from .dropout import SEED_LIMIT
from .ops import rollingq_attention
from .rebalance import compose_rotations
from .stats import AttentionStats

logger = logging.getLogger("rollingq_kernels")

ROTATION_MODES = ("global", "per_head")


@torch.compiler.disable
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

    Kept out of ``torch.compile`` graphs: a traced call would bake the seed into the
    graph (the same mask every step, or a recompile per seed).
    """
    return rollingq_attention(
        q, k, v, segments, lengths=lengths, rotation=rotation, scale=scale,
        dropout_p=dropout_p, seed=random.randrange(SEED_LIMIT), backend=backend,
    )


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
            class token.
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

    Buffers (saved in ``state_dict``):
        rotation: float32 (float64 if the layer is cast to float64; casts to
            16-bit types leave it float32), identity at start; ``(C, C)`` or
            ``(H, Dh, Dh)``. While it is the identity the op gets
            ``rotation=None`` (exactly the unrotated attention).
        num_rotations: int64 scalar, rotations applied so far.

    Attributes:
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
        num_modalities: int = 2,
        rotation_mode: str = "global",
        class_query_only: bool = False,
        backend: str = "auto",
        *,
        proj_bias: bool = True,
        scale: float | None = None,
        window: Window = "epoch",
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of dim={dim}, got {num_heads!r}")
        if not isinstance(num_modalities, int) or num_modalities < 2:
            raise ValueError(f"num_modalities: expected an int >= 2, got {num_modalities!r}")
        if rotation_mode not in ROTATION_MODES:
            raise ValueError(f"rotation_mode: expected one of {ROTATION_MODES}, got {rotation_mode!r}")
        if not 0.0 <= float(attn_drop) < 1.0:
            raise ValueError(f"attn_drop: expected a float in [0, 1), got {attn_drop!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_modalities = num_modalities
        self.rotation_mode = rotation_mode
        self.class_query_only = bool(class_query_only)
        self.backend = backend
        self.scale = float(scale) if scale is not None else self.head_dim**-0.5
        self.attn_drop_p = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("rotation", self._identity(), persistent=True)
        self.register_buffer("num_rotations", torch.zeros((), dtype=torch.int64), persistent=True)
        # A host-side flag so the identity rotation costs nothing (the op gets rotation=None).
        self._rotation_active = False
        self.last_stats: AttentionStats | None = None
        self.statistics = StatisticsAccumulator(check_window(window))
        self.collect_statistics = True
        self._collectors: list[StatisticsAccumulator] = []  # see collecting()
        self._window_paused = 0

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

    @classmethod
    def from_timm(cls, attn: nn.Module, **kwargs: Any) -> FusedRollingQAttention:
        """Build a layer with the weights of a ``timm.models.vision_transformer.Attention``.

        ``dim``, ``num_heads``, the biases, dropouts and scale are read from
        ``attn``; ``kwargs`` sets the rest (``num_modalities``, ``rotation_mode``,
        ``class_query_only``, ``backend``, ``window``). The weights are copied
        (same device and dtype). With the identity rotation the layer computes
        exactly what ``attn`` computes.

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
        """True until a rotation is applied or a non-identity rotation is loaded."""
        return not self._rotation_active

    @torch.no_grad()
    def apply_rotation(self, new: torch.Tensor) -> None:
        """Compose a rotation into the buffer, ``R ← new @ R``, and count it.

        Args:
            new: ``rotation_shape()`` rotation (any float dtype, finite).
        """
        if tuple(new.shape) != self.rotation_shape():
            raise ValueError(
                f"new: expected shape {self.rotation_shape()} for rotation_mode={self.rotation_mode!r}, "
                f"got {tuple(new.shape)}"
            )
        if not bool(torch.isfinite(new).all()):
            raise ValueError("new: expected a finite rotation, got NaN or inf")
        self.rotation.copy_(compose_rotations(new.to(self.rotation.device), self.rotation))
        self.num_rotations += 1
        self._rotation_active = True

    @torch.no_grad()
    def reset_rotation(self) -> None:
        """Back to the identity rotation and zero rotations."""
        self.rotation.copy_(self._identity(self.rotation.device).to(self.rotation.dtype))
        self.num_rotations.zero_()
        self._rotation_active = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "rotation"
        if key in state_dict:
            got = tuple(state_dict[key].shape)
            if got != self.rotation_shape():
                message = (
                    f"state_dict[{key!r}]: expected a rotation of shape {self.rotation_shape()} "
                    f"(rotation_mode={self.rotation_mode!r}, dim={self.dim}, num_heads={self.num_heads}), got {got}"
                )
                if strict:
                    raise ValueError(message)
                # strict=False: load everything else; load_state_dict reports the mismatch (a RuntimeError)
                error_msgs.append(message)
                state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in state_dict:
            eye = self._identity(self.rotation.device)
            self._rotation_active = not torch.equal(self.rotation.float(), eye)

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

    def forward(self, x: torch.Tensor, segments: list[int] | tuple[int, ...],
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over ``[class token, modality 1 tokens, …, modality M tokens]``.

        Args:
            x: ``(B, N, C)`` tokens, ``N = 1 + sum(segments)``; any float dtype
                the op supports.
            segments: the ``M`` padded modality sizes.
            lengths: optional ``(B, M)`` integer tensor of valid tokens per
                modality (padding at the end of each segment).

        Returns:
            ``(B, N, C)``, or ``(B, 1, C)`` (the class token only) when
            ``class_query_only``; the dtype of ``x``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (B, N, {self.dim}), got {tuple(x.shape)}")
        if len(segments) != self.num_modalities:
            raise ValueError(
                f"segments: expected {self.num_modalities} modality sizes (num_modalities), got {list(segments)}"
            )
        q, k, v = self._project(x)
        rotation = self.rotation if self._rotation_active else None
        if self.training and self.attn_drop_p > 0.0:
            out, stats = _attend_with_dropout(
                q, k, v, tuple(segments), lengths, rotation, self.scale, self.attn_drop_p, self.backend
            )
        else:
            out, stats = rollingq_attention(
                q, k, v, segments, lengths=lengths, rotation=rotation, scale=self.scale, backend=self.backend
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
        )
