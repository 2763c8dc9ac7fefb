"""rollingq_kernels: fused rotated class-query attention with RollingQ statistics.

The public surface:

* :func:`rollingq_attention` — the op (``docs/op.md``), with C++ (CPU) and
  Triton (CUDA) kernels and an eager reference;
* :func:`dropout_mask` — the counter-based dropout mask every backend shares;
* :mod:`rollingq_kernels.rotation` — RollingQ's math (AIR, anchor, rotations);
* :class:`FusedRollingQAttention` — a drop-in, timm-compatible attention module
  that gathers the statistics while it trains, and :class:`RollingQ`, the
  controller that rotates its class query (the paper's Algorithm 1).
"""

from .controller import RollingQ, RotationRecord
from .dropout import dropout_mask
from .module import FusedRollingQAttention
from .ops import HAS_CPP, rollingq_attention
from .reference import rollingq_attention_reference
from .stats import AttentionStats

__all__ = [
    "AttentionStats",
    "FusedRollingQAttention",
    "RollingQ",
    "RotationRecord",
    "HAS_CPP",
    "dropout_mask",
    "rollingq_attention",
    "rollingq_attention_reference",
]

__version__ = "0.1.0"
