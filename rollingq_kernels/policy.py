"""The rotation policy's rules: when RollingQ may rotate, and when it must not.

Every rule reads :class:`~rollingq_kernels.settings.RollingQSettings` and returns either None (the
rule lets the rotation through) or ``(reason, detail)``: a reason of
:data:`~rollingq_kernels.decision.REASONS` and a sentence naming the values that decided. The
controller (:class:`~rollingq_kernels.controller.RollingQ`) asks them in this order, per layer:

1. :meth:`RotationPolicy.rollback`: the rotation of the previous step made the training loss or
   accuracy collapse → roll it back.
2. :meth:`RotationPolicy.gate`: before ``start_epoch``, or the first-rotation guard holds → wait.
3. :meth:`RotationPolicy.threshold`: no usable statistics, ``|imbalance|`` below β, no rotation left,
   or the layer was rolled back before → wait / refuse.
4. :meth:`RotationPolicy.screen` (the safety rule, from the statistics): the query's cosine with
   every mean key is negative, the anchor lies more than ``anchor_limit_deg`` from E[q], or the
   indicator and the attention mass favour different modalities → refuse.
5. :meth:`RotationPolicy.cap`: the angle is cut to ``max_angle_deg`` → cap.
6. :meth:`RotationPolicy.reverses` (the safety rule, from the attention probe): within each
   modality, the class row's attention ranks before and after the rotation correlate below
   ``min_rank_correlation`` → refuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .settings import RollingQSettings

Verdict = tuple[str, str] | None


def accuracy_guard(accuracy: float, majority: float, min_gain: float) -> str | None:
    """The first-rotation guard: None when a rotation may happen, else why not.

    A class query that has learned nothing has no preference worth correcting: rotating it (the paper
    assumes trained encoders, Sec. 3.3) moves it by a large angle in an arbitrary direction. A rotation
    is allowed only after an epoch whose training accuracy ``accuracy`` exceeds ``majority`` (the share
    of the most frequent class among that epoch's training labels: the accuracy of a model that learned
    only the class priors) by at least ``min_gain``. ``min_gain < 0`` switches the guard off.
    """
    for name, value in (("accuracy", accuracy), ("majority", majority), ("min_gain", min_gain)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if min_gain < 0 or accuracy >= majority + min_gain:
        return None
    return (f"training accuracy {accuracy:.3f} is below the majority-class share {majority:.3f} + "
            f"min_accuracy_gain {min_gain:.3f}: the model has not learned enough to rotate its class query")


@dataclass(frozen=True)
class EpochResult:
    """The training loss and accuracy of one epoch (what the rollback rule compares)."""

    epoch: int | None
    loss: float | None
    accuracy: float | None

    @property
    def complete(self) -> bool:
        return all(isinstance(v, (int, float)) and math.isfinite(v) for v in (self.loss, self.accuracy))


class RotationPolicy:
    """The rules of :mod:`rollingq_kernels.policy` for one set of settings."""

    def __init__(self, settings: RollingQSettings) -> None:
        self.settings = settings

    def gate(self, epoch: int | None, accuracy: float | None, majority: float | None) -> Verdict:
        """Wait before ``start_epoch``, and while the first-rotation guard holds (needs both numbers)."""
        s = self.settings
        if epoch is not None and epoch < s.start_epoch:
            return "before_start_epoch", f"epoch {epoch} is before rollingq start_epoch {s.start_epoch}"
        if accuracy is not None and majority is not None:
            held = accuracy_guard(accuracy, majority, s.min_accuracy_gain)
            if held is not None:
                return "accuracy_guard", held
        return None

    def threshold(self, value: float, num_rotations: int, rolled_back: int) -> Verdict:
        """Is a rotation due: usable statistics, ``|value|`` over β, budget left, no earlier rollback?"""
        s = self.settings
        if not math.isfinite(value):
            return "no_samples", f"no usable statistics (imbalance {value})"
        below = abs(value) <= s.beta if s.beta_strict else abs(value) < s.beta
        if below:
            return "below_threshold", f"|imbalance| {abs(value):.4f} {'<=' if s.beta_strict else '<'} beta {s.beta:g}"
        if num_rotations >= s.max_rotations:
            return "max_rotations", f"{num_rotations} rotations made, max_rotations {s.max_rotations}"
        if rolled_back:
            return "after_rollback", "a rotation of this layer was rolled back: it is not rotated again"
        return None

    def screen(self, cos_query_keys: list[list[float]], anchor_angle: list[float], mass_disagrees: bool) -> Verdict:
        """The safety rule on the statistics (off without ``safety``).

        Args:
            cos_query_keys: per rotation unit (one for a global rotation, one per head), cos(E[q], E[k̄_m])
                for each modality.
            anchor_angle: per unit, the angle in degrees between E[q] and the anchor.
            mass_disagrees: the indicator and the class-row mass favour different modalities.
        """
        s = self.settings
        if not s.safety:
            return None
        for unit, cosines in enumerate(cos_query_keys):
            if cosines and all(c < 0 for c in cosines):
                where = "" if len(cos_query_keys) == 1 else f" (head {unit})"
                return "query_opposes_keys", (
                    f"the mean query's cosines with every mean key are negative{where}: "
                    f"{', '.join(f'{c:+.3f}' for c in cosines)}; it attends by selecting tokens, and rotating it "
                    "towards the mean keys would reverse what it attends to")
        far = max(anchor_angle, default=0.0)
        if far > s.anchor_limit_deg:
            return "anchor_too_far", (f"the anchor lies {far:.1f} deg from the mean query, more than "
                                      f"anchor_limit_deg {s.anchor_limit_deg:g}")
        if mass_disagrees:
            return "mass_disagrees", ("the indicator and the attention mass favour different modalities: a rotation "
                                      "would move the query towards the modality that already has the attention")
        return None

    def cap(self, angle_deg: float) -> Verdict:
        """``("capped", …)`` when the proposed angle exceeds ``max_angle_deg`` (the rotation is then cut)."""
        s = self.settings
        if angle_deg > s.max_angle_deg:
            return "capped", f"angle {angle_deg:.1f} deg cut to max_angle_deg {s.max_angle_deg:g}"
        return None

    def reverses(self, rank_correlation: float) -> Verdict:
        """The safety rule on the attention probe: refuse a rotation that reorders the class row's attention."""
        s = self.settings
        if s.safety and math.isfinite(rank_correlation) and rank_correlation < s.min_rank_correlation:
            return "reverses_attention", (
                f"within each modality, the class row's attention before and after the rotation has rank correlation "
                f"{rank_correlation:+.3f} < min_rank_correlation {s.min_rank_correlation:g} on the probe batch")
        return None

    def rollback(self, before: EpochResult, after: EpochResult) -> Verdict:
        """Undo a rotation when the epoch after it collapsed relative to the epoch before it."""
        s = self.settings
        if not s.rollback or not (before.complete and after.complete):
            return None
        drop = before.accuracy - after.accuracy
        rise = (after.loss - before.loss) / max(abs(before.loss), 1e-12)
        if drop > s.rollback_acc_drop or rise > s.rollback_loss_rise:
            return "collapsed", (
                f"after the rotation of epoch {before.epoch}, epoch {after.epoch}'s training accuracy "
                f"{before.accuracy:.3f} -> {after.accuracy:.3f} (drop limit {s.rollback_acc_drop:g}) and loss "
                f"{before.loss:.4f} -> {after.loss:.4f} (rise limit {s.rollback_loss_rise:.0%}): rolled back")
        return None
