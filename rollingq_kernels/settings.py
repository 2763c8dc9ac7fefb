"""The RollingQ controller's settings: one frozen dataclass, validated in one place, with named presets.

Every rule of the rotation policy (:mod:`rollingq_kernels.policy`) reads a field of
:class:`RollingQSettings`. The controller's constructor, its ``state_dict`` / ``load_state_dict``
and the YAML ``rollingq:`` section of the training package (``rollingq.config.RollingQConfig``
takes this class's fields and checks) all go through it, so each default and each check is stated here only.

Modes (:data:`PRESETS`) are named starting points; explicit values override them:

* ``"safe"`` (the default): the paper's Algorithm 1 with the safety rule, the angle cap and the
  rollback on (``docs/controller.md``).
* ``"paper"``: Algorithm 1 as this project shipped it before the safety rule (no refusal, no cap, no
  rollback).
* ``"official"``: the semantics of the official code (GeWu-Lab/RollingQ_ICML2025), point by point:
  AIR of the last training batch, an eval-mode estimation pass averaging per-batch means, α = 0.5
  (``rho=0``), a rotation whenever ``|AIR| > 0``, after the first epoch, no guard, the SVD rotation
  computed in the model's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .indicators import INDICATORS

MODES: tuple[str, ...] = ("safe", "paper", "official")
METHODS: tuple[str, ...] = ("plane", "svd")
ESTIMATES: tuple[str, ...] = ("accumulate", "pass")
#: How the estimation pass averages: over samples, or the unweighted mean of per-batch means (official).
PASS_MEANS: tuple[str, ...] = ("sample", "batch")
#: ``"anchor"``: rotate towards the balanced anchor; ``"random"``: the same angle in a random direction (a control).
DIRECTIONS: tuple[str, ...] = ("anchor", "random")
#: ``"float64"``: anchor and rotation in float64; ``"model"``: in the layer's dtype, as the official code.
PRECISIONS: tuple[str, ...] = ("float64", "model")

#: The settings a controller state held before this class existed.
OLD_KEYS: tuple[str, ...] = ("rho", "beta", "max_rotations", "window", "method", "estimate", "indicator")

#: The angle cap of the safe mode, in degrees: chosen on tuning seeds by study II (docs/synthetic_study.md).
DEFAULT_MAX_ANGLE_DEG = 30.0


@dataclass(frozen=True)
class RollingQSettings:
    """Every setting of the RollingQ controller (frozen; validated when built).

    Attributes:
        mode: the preset these settings started from (:data:`MODES`); a label, the fields decide.
        rho: ρ ≥ 0, the rotation intensity: α = softmax(−2ρ·E[cos]) (Eq. 11); 0 gives α uniform.
        beta: β ≥ 0, the imbalance threshold.
        beta_strict: rotate when ``|imbalance| > beta`` (the official code) instead of ``≥``.
        max_rotations: the most rotations per layer (paper: 1 or 3).
        window: the statistics window, ``"epoch"`` or the last ``K`` batches.
        method: ``"plane"`` (the minimal rotation) or ``"svd"`` (the paper's Eq. 12).
        estimate: ``"accumulate"`` (anchor from the training window) or ``"pass"`` (a no-grad pass).
        pass_mean: ``"sample"`` or ``"batch"`` (unweighted mean of per-batch means, the official code).
        indicator: ``"cos"`` (the paper's AIR) or ``"score"`` (Eq. 3 weighted).
        start_epoch: the first epoch (numbered as the caller of ``step`` numbers them; the trainer counts
            from 1) at whose end a rotation may happen; 0: from the first step on.
        min_accuracy_gain: the first-rotation guard: rotate only after an epoch whose training accuracy
            beats the majority-class share by this much (negative: off).
        safety: refuse a rotation that would reverse what the query attends to (see ``docs/controller.md``).
        anchor_limit_deg: with ``safety``, refuse when the anchor is farther than this from E[q].
        max_angle_deg: the largest angle applied in one rotation (180: no cap).
        mass_margin: a mass lead of at least this counts as the mass favouring a modality.
        min_rank_correlation: with ``safety``, refuse when the probe's rank correlation of the class
            row's attention before vs after the rotation, within each modality, is below this.
        probe_batches: training batches the attention probe reads (0: no probe).
        probe_top_k: the ``k`` of the probe's top-k mass share.
        rollback: undo a rotation after which the training loss or accuracy collapsed.
        rollback_acc_drop: collapse: training accuracy fell by more than this (absolute) ...
        rollback_loss_rise: ... or the training loss rose by more than this fraction.
        direction: ``"anchor"`` or ``"random"`` (the same angle in a random direction: a control).
        rotation_precision: ``"float64"`` or ``"model"`` (anchor and SVD in the layer's dtype).
    """

    mode: str = "safe"
    rho: float = 1.0
    beta: float = 0.1
    beta_strict: bool = False
    max_rotations: int = 1
    window: str | int = "epoch"
    method: str = "plane"
    estimate: str = "accumulate"
    pass_mean: str = "sample"
    indicator: str = "cos"
    start_epoch: int = 0
    min_accuracy_gain: float = 0.05
    safety: bool = True
    anchor_limit_deg: float = 90.0
    max_angle_deg: float = DEFAULT_MAX_ANGLE_DEG
    mass_margin: float = 0.1
    min_rank_correlation: float = 0.0
    probe_batches: int = 1
    probe_top_k: int = 5
    rollback: bool = True
    rollback_acc_drop: float = 0.05
    rollback_loss_rise: float = 0.10
    direction: str = "anchor"
    rotation_precision: str = "float64"

    def __post_init__(self) -> None:
        for name, choices in (("mode", MODES), ("method", METHODS), ("estimate", ESTIMATES),
                              ("pass_mean", PASS_MEANS), ("indicator", INDICATORS), ("direction", DIRECTIONS),
                              ("rotation_precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("beta_strict", "safety", "rollback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name, low, high in (("rho", 0.0, math.inf), ("beta", 0.0, math.inf), ("min_accuracy_gain", -math.inf, 1.0),
                                ("mass_margin", 0.0, 1.0), ("min_rank_correlation", -1.0, 1.0),
                                ("rollback_acc_drop", 0.0, 1.0), ("rollback_loss_rise", 0.0, math.inf)):
            self._number(name, low, high, open_low=False)
        for name in ("anchor_limit_deg", "max_angle_deg"):
            self._number(name, 0.0, 180.0, open_low=True)
        for name, low in (("max_rotations", 0), ("start_epoch", 0), ("probe_batches", 0), ("probe_top_k", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        w = self.window
        if w != "epoch" and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"window: expected 'epoch' or an integer >= 1 (the last K batches), got {w!r}")

    def _number(self, name: str, low: float, high: float, open_low: bool) -> None:
        value = getattr(self, name)
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if bad or value < low or value > high or (open_low and value == low):
            bounds = " and ".join(part for part in (
                "" if low == -math.inf else f"{'>' if open_low else '>='} {low:g}",
                "" if high == math.inf else f"<= {high:g}") if part)
            raise ValueError(f"{name}: expected a finite number {bounds}, got {value!r}")
        object.__setattr__(self, name, float(value))

    # ------------------------------------------------------------------ building
    @classmethod
    def preset(cls, mode: str = "safe", **overrides: Any) -> RollingQSettings:
        """The settings of ``mode`` (:data:`PRESETS`) with ``overrides`` applied (each a field name)."""
        if mode not in PRESETS:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        return cls.from_dict({**PRESETS[mode], **overrides, "mode": mode})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RollingQSettings:
        """Settings from a ``{field: value}`` mapping (missing fields take their defaults)."""
        names = field_names()
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"settings: unknown {unknown}; expected fields among {', '.join(names)}")
        return cls(**{k: values[k] for k in names if k in values})

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RollingQSettings:
        """The settings stored in a ``RollingQ.state_dict()`` (its top-level keys). A state saved before the
        settings had a ``mode`` holds only :data:`OLD_KEYS`: it loads as the ``"paper"`` preset with those
        values, the behaviour it was saved with."""
        if "mode" in state:
            return cls.from_dict({k: state[k] for k in field_names() if k in state})
        return cls.preset("paper", **{k: state[k] for k in OLD_KEYS if k in state})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain ``{name: value}`` dict (JSON- and YAML-friendly)."""
        return {name: getattr(self, name) for name in field_names()}

    def replace(self, **changes: Any) -> RollingQSettings:
        """A copy with ``changes`` (validated)."""
        return self.from_dict({**self.to_dict(), **changes})

    def rotation_dtype(self, layer_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the anchor and the rotation: float64, or with ``rotation_precision="model"`` the layer's
        (float32 for 16-bit layers)."""
        if self.rotation_precision == "float64":
            return torch.float64
        return layer_dtype if layer_dtype in (torch.float32, torch.float64) else torch.float32

    def deviations(self, mode: str | None = None) -> dict[str, tuple[Any, Any]]:
        """``{field: (value, preset value)}`` where these settings differ from the preset ``mode`` (default:
        their own)."""
        reference = RollingQSettings.preset(mode or self.mode).to_dict()
        mine = self.to_dict()
        return {k: (mine[k], reference[k]) for k in mine if k != "mode" and mine[k] != reference[k]}


def field_names() -> list[str]:
    """The fields of :class:`RollingQSettings`, in order."""
    return [f.name for f in dataclasses.fields(RollingQSettings)]


#: The presets: the fields each mode sets (the others keep the defaults of :class:`RollingQSettings`).
PRESETS: dict[str, dict[str, Any]] = {
    "safe": {},
    "paper": {"safety": False, "max_angle_deg": 180.0, "rollback": False, "probe_batches": 0},
    "official": {
        "rho": 0.0, "beta": 0.0, "beta_strict": True, "max_rotations": 1, "window": 1, "method": "svd",
        "estimate": "pass", "pass_mean": "batch", "indicator": "cos", "start_epoch": 0, "min_accuracy_gain": -1.0,
        "safety": False, "max_angle_deg": 180.0, "rollback": False, "direction": "anchor",
        "rotation_precision": "model",
    },
}
