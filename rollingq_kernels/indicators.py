"""The imbalance indicators RollingQ decides on, and their check against the attention mass.

Policy math, not sums: :mod:`rollingq_kernels.accumulator` sums the op's statistics and reduces
them to a :class:`~rollingq_kernels.accumulator.WindowStatistics`; the functions here turn its
mean cosines, token counts and mean-key norms into the per-modality values an indicator compares
(:func:`indicator_cosines`), the decision quantity (:func:`indicator_value`) and the check that the
indicator and the class-row attention mass point at the same modality (:func:`mass_disagreement`).
"""

from __future__ import annotations

import math

import torch

#: ``"cos"``: the paper's AIR (Eq. 9), cosines only. ``"score"``: each modality's cosine weighted by its share
#: of the summed attention score of Eq. 3, ``L^m · ‖k̄^m‖ · cos θ^m`` (``L^m`` tokens, ``‖k̄^m‖`` the norm of
#: the mean key), normalised so that it equals AIR when token counts and key norms are equal.
INDICATORS: tuple[str, ...] = ("cos", "score")


def check_indicator(indicator: str) -> str:
    """Validate an indicator name (one of :data:`INDICATORS`); return it."""
    if indicator not in INDICATORS:
        raise ValueError(f"indicator: expected one of {INDICATORS}, got {indicator!r}")
    return indicator


def score_weights(key_norm: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Eq. 3's per-modality factor ``L^m·‖k̄^m‖`` divided by its mean over the modalities.

    Args:
        key_norm: ``(..., M)`` norms of the mean keys (float).
        tokens: ``(M,)`` mean valid tokens per sample of each modality.

    Returns:
        ``(..., M)`` float64 weights with mean 1 over ``M`` (all ones where every factor is 0).
    """
    if tokens.shape[-1] != key_norm.shape[-1]:
        raise ValueError(f"tokens: expected {key_norm.shape[-1]} modality counts, got shape {tuple(tokens.shape)}")
    factor = key_norm.double() * tokens.double().to(key_norm.device)
    mean = factor.mean(-1, keepdim=True)
    return torch.where(mean > 0, factor / mean.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(factor))


def indicator_cosines(cos_mean: torch.Tensor, key_norm: torch.Tensor, tokens: torch.Tensor | None,
                      indicator: str) -> torch.Tensor:
    """The per-modality values the indicator compares: ``cos`` itself, or ``score_weights · cos``.

    Args:
        cos_mean: ``(..., M)`` mean cosine per modality.
        key_norm: ``(..., M)`` norms of the mean keys.
        tokens: ``(M,)`` mean valid tokens per sample (needed for ``"score"``).
        indicator: one of :data:`INDICATORS`.

    Returns:
        ``(..., M)`` float64. For ``M = 2`` the indicator is ``out[..., 0] − out[..., 1]`` (AIR for ``"cos"``);
        the anchor weights are ``softmax(−2ρ·out)``.
    """
    check_indicator(indicator)
    if indicator == "cos":
        return cos_mean.double()
    if tokens is None:
        raise ValueError("tokens: the 'score' indicator needs the token counts per modality, got None")
    return score_weights(key_norm, tokens) * cos_mean.double()


def indicator_value(values: torch.Tensor) -> float:
    """``values[0] − values[1]`` for two modalities, ``max − min`` for more (NaN entries ignored).

    ``values`` is ``(M,)``.
    """
    if values.dim() != 1:
        raise ValueError(f"values: expected an (M,) tensor, got shape {tuple(values.shape)}")
    flat = values
    if flat.numel() == 2:
        return float(flat[0] - flat[1])
    shown = flat[~torch.isnan(flat)]
    return float(shown.max() - shown.min()) if shown.numel() >= 2 else math.nan


def mass_disagreement(values: torch.Tensor, mass: torch.Tensor, margin: float = 0.1) -> bool:
    """Does the indicator point at another modality than the class-row attention mass does?

    Args:
        values: ``(M,)`` the indicator's per-modality values (:func:`indicator_cosines`).
        mass: ``(M,)`` mean attention mass per modality (class token excluded).
        margin: only a mass lead of at least this much counts as an imbalance.

    Returns:
        True when the modality the mass favours (by at least ``margin`` over the runner-up) is not the one
        with the largest indicator value (for ``M = 2``: the signs of the indicator and of
        ``mass[0] − mass[1]`` differ).
    """
    if values.shape != mass.shape or values.dim() != 1 or values.numel() < 2:
        raise ValueError(f"values, mass: expected two (M,) tensors with M >= 2, got {tuple(values.shape)} "
                         f"and {tuple(mass.shape)}")
    if bool(torch.isnan(values).any()) or bool(torch.isnan(mass).any()):
        return False
    top2 = torch.topk(mass.double(), 2)
    if float(top2.values[0] - top2.values[1]) < margin:
        return False
    return int(torch.argmax(values)) != int(top2.indices[0])
