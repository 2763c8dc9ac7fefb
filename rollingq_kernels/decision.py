"""What the RollingQ controller decided for one layer at one step: :class:`RotationRecord`.

Each record carries an ``action`` and a ``reason``:

========== ===================================================================================
action     reasons
========== ===================================================================================
rotate     ``rotated``: the proposed rotation was applied
cap        ``capped``: applied, with the angle cut to ``max_angle_deg``
refuse     ``query_opposes_keys``, ``anchor_too_far``, ``mass_disagrees``,
           ``reverses_attention`` (the safety rule), ``after_rollback``, ``degenerate``
wait       ``before_start_epoch``, ``accuracy_guard``, ``no_samples``, ``below_threshold``,
           ``max_rotations``
rollback   ``collapsed``: the last rotation was undone (training loss or accuracy collapsed)
========== ===================================================================================
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

ACTIONS: tuple[str, ...] = ("rotate", "cap", "refuse", "wait", "rollback")

#: The reason of every action (see the module docstring).
REASONS: dict[str, str] = {
    "rotated": "rotate", "capped": "cap",
    "query_opposes_keys": "refuse", "anchor_too_far": "refuse", "mass_disagrees": "refuse",
    "reverses_attention": "refuse", "after_rollback": "refuse", "degenerate": "refuse",
    "before_start_epoch": "wait", "accuracy_guard": "wait", "no_samples": "wait", "below_threshold": "wait",
    "max_rotations": "wait",
    "collapsed": "rollback",
}


@dataclass
class RotationRecord:
    """What :meth:`~rollingq_kernels.controller.RollingQ.step` decided for one layer.

    Attributes:
        layer: the layer's name (or index) in the controller.
        epoch: the epoch passed to ``step`` (None if not given).
        air: the window's AIR (NaN when no sample had modalities 0 and 1).
        spread: ``max − min`` of the mean cosines.
        cos_mean: mean cosine per modality (per sample, then averaged).
        mass: mean class-row attention mass on [class, modality 1, …, M] (averaged over heads).
        alpha: the anchor weights α per modality (per head: one list per head); empty without an anchor.
        rotated: whether the layer's rotation was updated (``action`` rotate or cap).
        angle_deg: the proposed angle, between E[q] and the anchor (per head: their mean).
        applied_angle_deg: the angle applied (after the cap; 0 when nothing was applied).
        cos_before_after: cosine between E[q] and R_b E[q] (1 when not rotated).
        count: samples in the decision window (summed over ranks).
        num_rotations: the layer's rotations after this step.
        action: ``rotate``, ``cap``, ``refuse``, ``wait`` or ``rollback`` (:data:`ACTIONS`).
        reason: why (:data:`REASONS`); ``detail`` says it in words.
        detail: a sentence naming the values that decided.
        indicator: the indicator the decision used (``"cos"`` or ``"score"``).
        value: its value (AIR for ``"cos"`` with two modalities; the spread for more).
        tokens: mean valid tokens per sample per modality in the window.
        key_norm: ‖E[k̄^m]‖ per modality (heads concatenated).
        assumption_warning: the indicator and the attention mass favour different modalities.
        cos_query_keys: cos(E[q], E[k̄_m]) per modality (heads concatenated), from the anchor's inputs.
        direction: ``"anchor"`` or ``"random"`` (the direction of the applied rotation).
        probe_samples: samples the attention probe read (0: no probe).
        logit_spread: the class row's ``max − min`` logit, mean over probe samples and heads, [before, after].
        max_prob: its largest attention probability, [before, after].
        topk_share: the mass of its ``probe_top_k`` largest probabilities, [before, after].
        probe_mass: the probe's class-row mass per [class, modality 1, …, M], [before, after].
        rank_correlation: Spearman correlation of the class row's attention before vs after the applied
            (or, when refused, the proposed) rotation over all keys, mean over probe samples and heads (None:
            no probe). A rotation that moves attention between modalities lowers it by design.
        within_rank_correlation: the same within each modality, averaged over the modalities: does the query
            still prefer the same tokens of each modality?
        anchor_within_rank_correlation: ``within_rank_correlation`` of the rotation towards the anchor (the
            one the safety rule reads; equal to it with ``direction="anchor"``).
        rolled_back_epoch: with ``action="rollback"``, the epoch whose rotation was undone.
    """

    layer: str
    epoch: int | None
    air: float
    spread: float
    cos_mean: list[float]
    mass: list[float] = field(default_factory=list)
    alpha: list = field(default_factory=list)
    rotated: bool = False
    angle_deg: float = 0.0
    cos_before_after: float = 1.0
    count: int = 0
    num_rotations: int = 0
    reason: str = ""
    indicator: str = "cos"
    value: float = math.nan
    tokens: list = field(default_factory=list)
    key_norm: list = field(default_factory=list)
    assumption_warning: bool = False
    action: str = ""
    detail: str = ""
    applied_angle_deg: float = 0.0
    cos_query_keys: list = field(default_factory=list)
    direction: str = "anchor"
    probe_samples: int = 0
    logit_spread: list = field(default_factory=list)
    max_prob: list = field(default_factory=list)
    topk_share: list = field(default_factory=list)
    probe_mass: list = field(default_factory=list)
    rank_correlation: float | None = None
    within_rank_correlation: float | None = None
    anchor_within_rank_correlation: float | None = None
    rolled_back_epoch: int | None = None

    def decide(self, reason: str, detail: str = "") -> RotationRecord:
        """Set ``reason``, its ``action`` and ``detail``; returns the record."""
        self.reason, self.action, self.detail = reason, REASONS[reason], detail
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-friendly dict of the record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RotationRecord:
        """A record from :meth:`to_dict` (records saved before a field existed take its default)."""
        return cls(**values)
