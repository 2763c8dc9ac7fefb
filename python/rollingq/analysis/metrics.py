"""Pure metric functions of the evaluation (no model, no I/O).

Every function takes CPU or device tensors (or array-likes) and returns plain
Python numbers or float64 tensors, so the results go straight into JSON.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from rollingq_kernels.accumulator import attention_imbalance_rate, imbalance

from ..extras import require

logger = logging.getLogger(__name__)


def _as_labels(values: torch.Tensor | Sequence[int], name: str) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.dim() == 2:  # logits (B, C)
        t = t.argmax(dim=1)
    if t.dim() != 1:
        raise ValueError(f"{name} must be labels (B,) or logits (B, C), got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise TypeError(f"{name} as a 1-D tensor must hold integer labels, got dtype {t.dtype}")
    return t.long().cpu()


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"predictions and labels must have the same length, got {pred.shape[0]} and {target.shape[0]}")
    if pred.numel() == 0:
        raise ValueError("predictions and labels are empty; expected at least one sample")


def accuracy(pred: torch.Tensor | Sequence[int], target: torch.Tensor | Sequence[int]) -> float:
    """Share of correct predictions.

    Args:
        pred: ``(B,)`` int predicted labels or ``(B, C)`` logits (argmax is taken).
        target: ``(B,)`` int true labels.
    """
    p, t = _as_labels(pred, "pred"), _as_labels(target, "target")
    _check_pair(p, t)
    return float((p == t).double().mean())


def macro_f1(pred: torch.Tensor | Sequence[int], target: torch.Tensor | Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``target`` or ``pred``.

    Matches ``sklearn.metrics.f1_score(average="macro")`` (a class with no true and no
    predicted sample is left out; a class with zero precision and recall scores 0).

    Args:
        pred: ``(B,)`` int predicted labels or ``(B, C)`` logits.
        target: ``(B,)`` int true labels.
    """
    p, t = _as_labels(pred, "pred"), _as_labels(target, "target")
    _check_pair(p, t)
    classes = torch.unique(torch.cat([p, t]))
    scores = []
    for c in classes.tolist():
        tp = int(((p == c) & (t == c)).sum())
        fp = int(((p == c) & (t != c)).sum())
        fn = int(((p != c) & (t == c)).sum())
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def probe_accuracies(
    probe_logits: Sequence[torch.Tensor], target: torch.Tensor, modalities: Sequence[str]
) -> dict[str, float]:
    """Accuracy of each modality's linear probe.

    Args:
        probe_logits: one ``(B, C)`` tensor per modality.
        target: ``(B,)`` int labels.
        modalities: modality names, same length as ``probe_logits``.
    """
    if len(probe_logits) != len(modalities):
        raise ValueError(f"got {len(probe_logits)} probe logits for {len(modalities)} modalities {list(modalities)}")
    return {name: accuracy(logits, target) for name, logits in zip(modalities, probe_logits, strict=True)}


def modality_mass(mass: torch.Tensor) -> torch.Tensor:
    """Per-sample class-row attention mass, averaged over heads.

    Args:
        mass: ``(B, H, M+1)`` (``AttentionStats.mass``) or already ``(B, M+1)``.

    Returns:
        ``(B, M+1)`` float64: [class token, modality 1, …, modality M].
    """
    if mass.dim() == 3:
        mass = mass.double().mean(dim=1)
    if mass.dim() != 2 or mass.shape[1] < 3:
        raise ValueError(f"mass must have shape (B, H, M+1) or (B, M+1) with M >= 2, got {tuple(mass.shape)}")
    return mass.double()


def key_norms(key_mean: torch.Tensor) -> torch.Tensor:
    """Norm of each modality's mean key, heads concatenated (the vectors behind ``stats.cos``).

    Args:
        key_mean: ``(B, H, M, Dh)`` (``AttentionStats.key_mean``).

    Returns:
        ``(B, M)`` float64.
    """
    if key_mean.dim() != 4:
        raise ValueError(f"key_mean must have shape (B, H, M, Dh), got {tuple(key_mean.shape)}")
    return key_mean.double().square().sum(dim=(1, 3)).sqrt()


def mean_mass_by_modality(mass: torch.Tensor, modalities: Sequence[str]) -> dict[str, float]:
    """Mean attention mass over samples, as ``{"class": …, name_1: …, …}``.

    Args:
        mass: ``(B, M+1)`` or ``(B, H, M+1)``.
        modalities: the M modality names.
    """
    per_sample = modality_mass(mass)
    if per_sample.shape[1] != len(modalities) + 1:
        raise ValueError(
            f"mass has {per_sample.shape[1]} columns, expected 1 + {len(modalities)} for {list(modalities)}"
        )
    means = per_sample.mean(dim=0).tolist()
    return dict(zip(["class", *modalities], means, strict=True))


def air(cos: torch.Tensor, valid: torch.Tensor | None = None) -> float | None:
    """The attention imbalance the RollingQ controller decides on, over a set of samples.

    AIR = mean over samples with both modalities of ``cos_0 − cos_1`` (the paper's Eq. 9) for two
    modalities; for ``M > 2`` the spread ``max_m E[cos_m] − min_m E[cos_m]`` of the mean cosines (it
    equals ``|AIR|`` when ``M = 2``). The one definition:
    :func:`rollingq_kernels.accumulator.imbalance`.

    Args:
        cos: ``(B, M)`` per-sample cosines between the class query and each modality's mean key.
        valid: ``(B, M)`` bool, the modality is present in the sample; None means all present.

    Returns:
        The imbalance, or None when it is undefined (no sample has the modalities it needs).
    """
    if cos.dim() != 2 or cos.shape[1] < 2 or cos.shape[0] == 0:
        raise ValueError(f"cos must have shape (B, M) with B >= 1 and M >= 2, got {tuple(cos.shape)}")
    value = imbalance(attention_imbalance_rate(cos, valid))
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class QualityCorrelation:
    """Pearson correlation between input quality and the attention a modality receives.

    Attributes:
        r_replaced: r between "this modality was replaced by noise" (1/0) and its mass.
        r_quality: r between "this modality is clean" (1/0) and its mass, ``= −r_replaced``;
            positive when attention follows quality (the sign of the paper's Table 2).
        p_value: two-sided p-value of the test r = 0 (scipy.stats.pearsonr).
        num_samples: samples in the test.
        num_replaced: of which replaced.
    """

    r_replaced: float | None
    r_quality: float | None
    p_value: float | None
    num_samples: int
    num_replaced: int

    def to_dict(self) -> dict:
        return asdict(self)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def quality_attention_correlation(replaced: torch.Tensor, mass: torch.Tensor) -> QualityCorrelation:
    """Point-biserial Pearson r between "replaced by noise" and the modality's attention mass.

    Args:
        replaced: ``(B,)`` bool, the modality of sample b was replaced by noise.
        mass: ``(B,)`` float, the attention mass that modality received on sample b.

    Returns:
        A :class:`QualityCorrelation`; r and p are None when undefined (constant mass).
    """
    replaced = torch.as_tensor(replaced).cpu()
    mass = torch.as_tensor(mass).double().cpu()
    if replaced.dim() != 1 or mass.shape != replaced.shape:
        raise ValueError(
            f"replaced and mass must be 1-D of equal length, got {tuple(replaced.shape)} and {tuple(mass.shape)}"
        )
    n = int(replaced.numel())
    n_rep = int(replaced.bool().sum())
    if n < 3 or n_rep == 0 or n_rep == n:
        raise ValueError(
            f"need >= 3 samples with both replaced and clean ones, got {n} samples of which {n_rep} replaced"
        )
    x = replaced.double().numpy()
    y = mass.numpy()
    if float(np.ptp(y)) == 0.0:
        logger.warning("attention mass is constant over the %d samples; the Pearson correlation is undefined", n)
        return QualityCorrelation(None, None, None, n, n_rep)
    result = require("scipy.stats", "analysis", "the Pearson test of rollingq eval").pearsonr(x, y)
    r = _finite_or_none(result.statistic)
    return QualityCorrelation(
        r_replaced=r,
        r_quality=None if r is None else -r,
        p_value=_finite_or_none(result.pvalue),
        num_samples=n,
        num_replaced=n_rep,
    )


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the non-None values.

    Returns:
        ``(mean, std, count)``; mean and std are None when no value is given.
    """
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return None, None, 0
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    return float(np.mean(kept)), std, len(kept)
