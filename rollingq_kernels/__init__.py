"""rollingq_kernels: fused rotated class-query attention with RollingQ statistics.

The public surface:

* :func:`rollingq_attention` — the op (``docs/op.md``), with C++ (CPU) and
  Triton (CUDA) kernels and an eager reference;
* :func:`dropout_mask` — the counter-based dropout mask every backend shares;
* :mod:`rollingq_kernels.accumulator` — the statistics' sums and windows, and
  the attention imbalance (:func:`~rollingq_kernels.accumulator.imbalance`);
* :mod:`rollingq_kernels.rebalance` — RollingQ's math (anchor, rotations);
* :class:`FusedRollingQAttention` — a drop-in, timm-compatible attention module
  that gathers the statistics while it trains, and :class:`RollingQ`, the
  controller that rotates its class query (the paper's Algorithm 1) under the
  rules of :mod:`rollingq_kernels.policy` (the first-rotation guard
  :func:`accuracy_guard`, the safety rule, the angle cap, the rollback), with
  every setting in :class:`RollingQSettings`;
* :func:`apply_rollingq` — one call that puts the layer and a controller into a timm or transformers model
  (:mod:`rollingq_kernels.integrations`).
"""

from ._library import HAS_CPP
from .apply import RollingQHandle, apply_rollingq
from .controller import RollingQ, RotationRecord, accuracy_guard
from .dropout import dropout_mask
from .layout import EvenSplit
from .module import FusedRollingQAttention
from .ops import rollingq_attention
from .reference import rollingq_attention_reference
from .settings import RollingQSettings
from .stats import AttentionStats

__all__ = [
    "AttentionStats",
    "EvenSplit",
    "FusedRollingQAttention",
    "RollingQ",
    "RollingQSettings",
    "RollingQHandle",
    "apply_rollingq",
    "RotationRecord",
    "accuracy_guard",
    "HAS_CPP",
    "dropout_mask",
    "rollingq_attention",
    "rollingq_attention_reference",
]

__version__ = "0.1.0"
