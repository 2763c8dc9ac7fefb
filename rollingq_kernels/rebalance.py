"""RollingQ's rebalancing math as plain functions (Ni et al., ICML 2025, Sec. 3.3).

The anchor weights α (Eq. 11), the balanced anchor (Eq. 10) and the rotations
that move the mean class query onto it (the minimal plane rotation, or the
paper's Eq. 12 SVD construction). The imbalance that decides whether to rotate
(AIR, Eq. 9) is measured from sums of statistics in
:mod:`rollingq_kernels.accumulator`.

Conventions: vectors are columns and a rotation ``R`` maps ``x`` to ``R x``;
a batch of row vectors is rotated as ``q @ R.T`` (the paper's official code).
Every function accepts leading batch dimensions (e.g. one per head) and
computes in float64 internally.
"""

from __future__ import annotations

import torch

EPS = 1e-12
"""Norms at or below this count as zero (a degenerate direction)."""


def balance_weights(cos_means: torch.Tensor, rho: float) -> torch.Tensor:
    """α = softmax(−2ρ·cos_means) over modalities (last dim).

    For M = 2 this is exactly the paper's α = ½(1 + tanh(−ρ·AIR)) with
    AIR = cos_means[0] − cos_means[1]. ``rho = 0`` gives uniform weights (the official
    default ``sigma = 0``: α = ½).
    """
    if not rho >= 0:
        raise ValueError(f"rho: expected rho >= 0, got {rho!r}")
    return torch.softmax(-2.0 * float(rho) * cos_means.double(), dim=-1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > EPS, x / n.clamp_min(EPS), torch.zeros_like(x))


def balanced_anchor(
    mean_keys: torch.Tensor, mean_query: torch.Tensor, cos_means: torch.Tensor, rho: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rebalance anchor q_b of Eq. 10, generalised to M modalities.

    Args:
        mean_keys: ``(..., M, D)`` E[k̄_m] per modality.
        mean_query: ``(..., D)`` E[q] (rotated class query).
        cos_means: ``(..., M)`` mean cosine per modality (decides α).
        rho: ρ > 0, the rotation intensity.

    Returns:
        ``(anchor (..., D), alpha (..., M))``: anchor = |E[q]| · Σ_m α_m · E[k̄_m]/|E[k̄_m]|.
    """
    alpha = balance_weights(cos_means, rho)
    direction = (alpha.unsqueeze(-1) * _unit(mean_keys.double())).sum(-2)
    anchor = direction * mean_query.double().norm(dim=-1, keepdim=True)
    return anchor, alpha


def _orthogonal_direction(u: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to unit ``u`` (..., D) (Gram-Schmidt on the least aligned axis)."""
    idx = u.abs().argmin(dim=-1, keepdim=True)
    e = torch.zeros_like(u).scatter_(-1, idx, 1.0)
    w = e - (e * u).sum(-1, keepdim=True) * u
    return _unit(w)


def plane_rotation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The minimal rotation taking direction ``x`` to direction ``y``.

    It rotates in the plane span(x, y) by the angle between them and is the
    identity on the orthogonal complement. Antiparallel inputs rotate by π in a
    plane through a fixed orthogonal axis; a zero vector gives the identity.

    Args:
        x, y: ``(..., D)``.

    Returns:
        ``(..., D, D)`` float64, orthogonal with determinant +1, ``R x̂ = ŷ``.
    """
    if x.shape != y.shape:
        raise ValueError(f"y: expected the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    x, y = x.double(), y.double()
    D = x.shape[-1]
    eye = torch.eye(D, dtype=torch.float64, device=x.device).expand(*x.shape[:-1], D, D)
    u, yh = _unit(x), _unit(y)
    degenerate = (x.norm(dim=-1) <= EPS) | (y.norm(dim=-1) <= EPS)
    cos_t = (u * yh).sum(-1).clamp(-1.0, 1.0)
    perp = yh - cos_t.unsqueeze(-1) * u
    w = _unit(perp)
    no_plane = perp.norm(dim=-1) <= 1e-9
    w = torch.where(no_plane.unsqueeze(-1), _orthogonal_direction(u), w)
    sin_t = torch.where(no_plane, torch.zeros_like(cos_t), (w * yh).sum(-1))
    cos_t = torch.where(no_plane, torch.sign(cos_t) + (cos_t == 0).double(), cos_t)
    uu = u.unsqueeze(-1) * u.unsqueeze(-2)
    ww = w.unsqueeze(-1) * w.unsqueeze(-2)
    wu = w.unsqueeze(-1) * u.unsqueeze(-2)
    c, s = cos_t[..., None, None], sin_t[..., None, None]
    rot = eye + (c - 1.0) * (uu + ww) + s * (wu - wu.transpose(-1, -2))
    return torch.where(degenerate[..., None, None], eye, rot)


def rescaled_anchor(mean_keys: torch.Tensor, mean_query: torch.Tensor, alpha: torch.Tensor,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The anchor as the official code builds it: ``t = Σ_m α_m E[k̄_m]/|E[k̄_m]|``, then ``t·|E[q]|/|t|``.

    Its direction is :func:`balanced_anchor`'s; its norm is ``|E[q]|`` (the official ``method.py``).
    Computed in ``dtype`` step by step in the official order, so that with ``dtype`` the model's
    (float32) it is the ``Y`` the official code hands to its SVD.

    Args:
        mean_keys: ``(..., M, D)``; mean_query: ``(..., D)``; alpha: ``(..., M)``.

    Returns:
        ``(..., D)`` in ``dtype``.
    """
    k, q, a = mean_keys.to(dtype), mean_query.to(dtype), alpha.to(dtype)
    unit = k / k.norm(dim=-1, keepdim=True)
    target = (a.unsqueeze(-1) * unit).sum(-2)
    return target * q.norm(dim=-1, keepdim=True) / target.norm(dim=-1, keepdim=True)


def capped_target(x: torch.Tensor, y: torch.Tensor, max_angle_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a rotation from ``x`` towards ``y`` lands when its angle is cut to ``max_angle_deg``.

    Args:
        x, y: ``(..., D)``.
        max_angle_deg: the largest angle, in (0, 180].

    Returns:
        ``(target (..., D) float64, angle (...,) degrees applied)``: ``y`` itself where the angle
        ``∠(x, y) ≤ max_angle_deg``, else the vector of norm ``|x|`` at ``max_angle_deg`` from ``x``
        in the plane span(x, y), on ``y``'s side.
    """
    x, y = x.double(), y.double()
    angle = rotation_angle_degrees(x, y)
    u = _unit(x)
    w = _unit(y - (y * u).sum(-1, keepdim=True) * u)
    theta = torch.deg2rad(torch.full_like(angle, float(max_angle_deg)))
    capped = x.norm(dim=-1, keepdim=True) * (torch.cos(theta).unsqueeze(-1) * u + torch.sin(theta).unsqueeze(-1) * w)
    over = angle > max_angle_deg
    return torch.where(over.unsqueeze(-1), capped, y), torch.where(over, torch.full_like(angle, max_angle_deg), angle)


def random_target(x: torch.Tensor, angle_deg: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A vector of norm ``|x|`` at ``angle_deg`` from ``x`` in a random direction (the random-rotation control).

    Args:
        x: ``(..., D)``; angle_deg: ``(...,)`` degrees; generator: seeds the direction (deterministic).

    Returns:
        ``(..., D)`` float64: ``|x|(cos θ x̂ + sin θ ŵ)`` with ``ŵ`` a Gaussian direction orthogonal to ``x``.
    """
    x = x.double()
    u = _unit(x)
    g = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    w = _unit(g - (g * u).sum(-1, keepdim=True) * u)
    theta = torch.deg2rad(angle_deg.double().to(x.device)).unsqueeze(-1)
    return x.norm(dim=-1, keepdim=True) * (torch.cos(theta) * u + torch.sin(theta) * w)


def svd_rotation(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The paper's Eq. 12 construction, for exact reproduction of the official code.

    ``U Σ Vᵀ = svd(ŷ x̂ᵀ)`` and ``R = U Vᵀ`` with the last column of ``U``
    negated when ``det(U Vᵀ) < 0``. It maps ``x̂`` to ``ŷ``, but what it does on
    the complement of span(x, y) is whatever the SVD returns.

    Args:
        x, y: ``(..., D)``.
        dtype: the dtype of every step (float64 by default; the model's dtype to compute what the
            official code computes from the same ``x`` and ``y``).

    Returns:
        ``(..., D, D)`` rotation in ``dtype`` (det +1) with ``R x̂ = ŷ``.
    """
    if x.shape != y.shape:
        raise ValueError(f"y: expected the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    u_, y_ = _unit(x.to(dtype)), _unit(y.to(dtype))
    m = y_.unsqueeze(-1) * u_.unsqueeze(-2)
    U, _, Vh = torch.linalg.svd(m)
    # the SVD fixes the first singular pair only up to sign: make U[:,0] = ŷ, V[:,0] = x̂
    sign = torch.sign((U[..., :, 0] * y_).sum(-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    U = U.clone()
    U[..., :, 0] = U[..., :, 0] * sign.unsqueeze(-1)
    Vh = Vh.clone()
    Vh[..., 0, :] = Vh[..., 0, :] * sign.unsqueeze(-1)
    R = U @ Vh
    flip = torch.linalg.det(R) < 0
    if bool(flip.any()):
        U[..., :, -1] = torch.where(flip.unsqueeze(-1), -U[..., :, -1], U[..., :, -1])
        R = U @ Vh
    return R


def build_rotation(method: str, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The rotation taking ``x`` towards ``y`` by ``method``: ``"plane"`` (:func:`plane_rotation`, float64) or
    ``"svd"`` (:func:`svd_rotation` in ``dtype``)."""
    if method == "svd":
        return svd_rotation(x, y, dtype)
    if method == "plane":
        return plane_rotation(x.double(), y)
    raise ValueError(f"method: expected one of plane, svd, got {method!r}")


def rotation_angle_degrees(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angle between ``x`` and ``y`` (..., D) in degrees."""
    c = (_unit(x.double()) * _unit(y.double())).sum(-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(c))


def compose_rotations(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Rotation applying ``old`` first, then ``new``: ``R ← R_new @ R_old``.

    Works for global ``(D, D)`` and per-head ``(H, Dh, Dh)`` rotations alike;
    the result has ``old``'s dtype.
    """
    if new.shape != old.shape:
        raise ValueError(f"new: expected the shape of old {tuple(old.shape)}, got {tuple(new.shape)}")
    return (new.double() @ old.double()).to(old.dtype)
