"""The benchmark shapes: the paper's fusion layers, long sequences, CPU-sized and quick variants.

A :class:`BenchShape` describes ``k``/``v`` of one attention call; the mode
(all-query or class-only) is chosen separately. ``roles`` tags the shapes the
regression gates read (``_gates.py``), so that quick mode exercises the same
gates on small shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CREMAD_SEGMENTS = (176, 196)  # CREMA-D fusion: audio, visual tokens (the paper's setup)
KS_SEGMENTS = (512, 588)  # Kinetics-Sounds fusion

ROLE_GATE_ALL_QUERY = "gate-all-query"  # fused vs sdpa / eager, every query
ROLE_GATE_CLASS_ONLY = "gate-class-only"  # fused class-only vs eager all-query
ROLE_GATE_ROOFLINE = "gate-roofline"  # fused all-query forward as a fraction of the tile GEMM rate

# The largest tiles of the C++ kernels (query rows x keys), which are also SDPA's CPU blocks: the
# roofline's GEMMs run at these shapes (``tile_shape``).
TILE_ROWS, TILE_KEYS = 256, 512


@dataclass(frozen=True)
class BenchShape:
    """One benchmark shape.

    Attributes:
        name: short id used in test ids and result rows.
        batch, heads, head_dim: ``B, H, Dh``.
        segments: padded modality sizes; ``N = 1 + sum(segments)``.
        roles: gate roles this shape plays (see module docstring).
        padded: per-sample lengths of 60–100 % of each segment (masking exercised); False: every
            token valid and ``lengths = None`` (the providers run without a mask).
    """

    name: str
    batch: int
    heads: int
    head_dim: int
    segments: tuple[int, ...]
    roles: tuple[str, ...] = field(default=())
    padded: bool = True

    def __post_init__(self) -> None:
        if len(self.segments) < 2 or any(s < 1 for s in self.segments):
            raise ValueError(f"BenchShape.segments: expected >= 2 positive sizes, got {self.segments}")

    @property
    def n_keys(self) -> int:
        """``N = 1 + sum(segments)``."""
        return 1 + sum(self.segments)

    @property
    def label(self) -> str:
        """Human-readable ``B×H×N×Dh``."""
        return f"B{self.batch} H{self.heads} N{self.n_keys} Dh{self.head_dim}" + ("" if self.padded else " unpadded")


GPU_SHAPES = (
    BenchShape("cremad", 64, 12, 64, CREMAD_SEGMENTS),
    BenchShape("ks", 64, 12, 64, KS_SEGMENTS, roles=(ROLE_GATE_ALL_QUERY,)),
    BenchShape("cremad-1head", 64, 1, 768, CREMAD_SEGMENTS, roles=(ROLE_GATE_CLASS_ONLY,)),
    BenchShape("ks-1head", 64, 1, 768, KS_SEGMENTS),
    BenchShape("long-4k", 4, 12, 64, (2047, 2048)),
    BenchShape("long-16k", 1, 12, 64, (8191, 8192)),
)

CPU_SHAPES = (
    BenchShape("cremad-b8", 8, 12, 64, CREMAD_SEGMENTS),
    BenchShape("ks-b8", 8, 12, 64, KS_SEGMENTS, roles=(ROLE_GATE_ALL_QUERY,)),
    # every token valid: no mask for any provider, so nothing is skipped and SDPA pays no masking
    BenchShape("ks-b4-unpadded", 4, 12, 64, KS_SEGMENTS, roles=(ROLE_GATE_ALL_QUERY, ROLE_GATE_ROOFLINE),
               padded=False),
    BenchShape("cremad-1head", 64, 1, 768, CREMAD_SEGMENTS, roles=(ROLE_GATE_CLASS_ONLY,)),
)

QUICK_SHAPES = (
    BenchShape("quick", 2, 3, 16, (13, 17), roles=(ROLE_GATE_ALL_QUERY, ROLE_GATE_ROOFLINE)),
    BenchShape("quick-1head", 3, 1, 48, (11, 19), roles=(ROLE_GATE_CLASS_ONLY,)),
)

# torch.compile of the eager reference compiles once per case (minutes on a 2-core CPU, tens of
# seconds on a GPU): only these shapes.
COMPILE_SHAPES = {"cpu": ("cremad-b8",), "cuda": ("ks",)}


@dataclass(frozen=True)
class TileShape:
    """The GEMMs of one attention tile, ``tiles`` times: ``S = Q Kᵀ`` with ``Q`` ``(rows, head_dim)`` and ``K``
    ``(keys, head_dim)``, then ``O = S V``: ``4 · tiles · rows · keys · head_dim`` FLOPs."""

    tiles: int
    rows: int
    keys: int
    head_dim: int

    @property
    def flops(self) -> int:
        """FLOPs of the two GEMMs over every tile."""
        return 4 * self.tiles * self.rows * self.keys * self.head_dim


def tile_shape(shape: BenchShape) -> TileShape:
    """The roofline's GEMMs for ``shape``: one tile of at most ``TILE_ROWS`` x ``TILE_KEYS`` per (batch, head)."""
    n = shape.n_keys
    return TileShape(shape.batch * shape.heads, min(TILE_ROWS, n), min(TILE_KEYS, n), shape.head_dim)


def shapes_for(device_type: str, quick: bool) -> tuple[BenchShape, ...]:
    """The shapes to run on ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    if quick:
        return QUICK_SHAPES
    if device_type == "cuda":
        return GPU_SHAPES
    if device_type == "cpu":
        return CPU_SHAPES
    raise ValueError(f"device_type: expected 'cpu' or 'cuda', got {device_type!r}")


# CPU bf16 runs only these providers, on the all-query gate shapes: fused against SDPA in bf16 (issue 28)
CPU_BF16_PROVIDERS = ("fused", "sdpa")


def dtypes_for(device_type: str, quick: bool) -> tuple[str, ...]:
    """dtype names to run: fp32 on CPU (and bf16 for ``CPU_BF16_PROVIDERS`` in full runs); bf16 and fp16 on GPU
    (bf16 only in quick mode)."""
    if device_type == "cpu":
        return ("fp32",) if quick else ("fp32", "bf16")
    return ("bf16",) if quick else ("bf16", "fp16")
