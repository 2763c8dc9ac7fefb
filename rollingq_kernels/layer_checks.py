"""Checks of :class:`~rollingq_kernels.module.FusedRollingQAttention`'s arguments and rotation state.

Each check names the argument (or state-dict key), what it got and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .checks import BACKENDS

ROTATION_MODES = ("global", "per_head")
#: Largest ``|RᵀR − I|`` entry a float32/float64 rotation may have (applied or loaded).
ORTHOGONALITY_TOL = 1e-4


def check_probability(name: str, value: Any) -> float:
    """A dropout probability in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {value!r} ({type(value).__name__})")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {value!r}")
    return float(value)


def check_layer_arguments(dim: Any, num_heads: Any, num_modalities: Any, rotation_mode: Any, backend: Any,
                          scale: Any) -> None:
    """The sizes, modes and scale of a layer (the segments, dropouts and window are checked where they are kept)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected a positive int, got {dim!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads: expected a positive divisor of dim={dim}, got {num_heads!r}")
    if isinstance(num_modalities, bool) or not isinstance(num_modalities, int) or num_modalities < 2:
        raise ValueError(f"num_modalities: expected an int >= 2, got {num_modalities!r}")
    if rotation_mode not in ROTATION_MODES:
        raise ValueError(f"rotation_mode: expected one of {ROTATION_MODES}, got {rotation_mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale: expected a finite float > 0 or None, got {scale!r}")


def identity_rotation(shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """The float32 identity of shape ``(D, D)`` or ``(H, D, D)``."""
    eye = torch.eye(shape[-1], dtype=torch.float32, device=device)
    return eye if len(shape) == 2 else eye.repeat(shape[0], 1, 1)


def orthogonality_error(rotation: torch.Tensor) -> tuple[float, bool]:
    """``(max |RᵀR − I|, det R > 0)`` of a ``(D, D)`` or ``(H, D, D)`` matrix, computed in float64."""
    r = rotation.detach().to(torch.float64)
    eye = torch.eye(r.shape[-1], dtype=torch.float64, device=r.device)
    error = float((r.mT @ r - eye).abs().max())
    proper = bool((torch.linalg.slogdet(r).sign > 0).all()) if error < 0.5 else False
    return error, proper


def rotation_problem(what: str, rotation: Any, layer: Any) -> str | None:
    """None if ``rotation`` is a finite proper rotation of ``layer.rotation_shape()``, else what is wrong (naming
    ``what``); ``layer`` is a :class:`~rollingq_kernels.module.FusedRollingQAttention`."""
    if not isinstance(rotation, torch.Tensor):
        return f"{what}: expected a tensor, got {type(rotation).__name__}"
    shape = layer.rotation_shape()
    mode_text = f"rotation_mode={layer.rotation_mode!r} (dim={layer.dim}, num_heads={layer.num_heads})"
    if tuple(rotation.shape) != shape:
        return f"{what}: expected shape {shape} for {mode_text}, got {tuple(rotation.shape)}"
    if not rotation.is_floating_point():
        return f"{what}: expected a float tensor, got {rotation.dtype}"
    if rotation.device.type == "meta":
        return None
    if not bool(torch.isfinite(rotation).all()):
        return f"{what}: expected a finite rotation, got NaN or inf"
    tol = ORTHOGONALITY_TOL if rotation.dtype in (torch.float32, torch.float64) else 1e-2
    error, proper = orthogonality_error(rotation)
    if error > tol:
        return f"{what}: expected an orthogonal matrix (max |R^T R - I| <= {tol:g}), got {error:.3g}"
    if not proper:
        return f"{what}: expected a rotation (determinant +1), got a reflection (determinant -1)"
    return None


def count_problem(key: str, count: Any) -> str | None:
    """None if ``count`` is a saved rotation count (an int64 scalar ``>= 0``), else what is wrong."""
    if not isinstance(count, torch.Tensor) or count.numel() != 1 or count.is_floating_point() or (
            count.device.type != "meta" and int(count) < 0):
        return f"state_dict[{key!r}]: expected a count >= 0 (an int64 scalar), got {count!r}"
    return None


def state_problem(state_dict: Mapping[str, Any], prefix: str, layer: Any) -> str | None:
    """The first problem of a layer's saved ``rotation`` / ``num_rotations`` in ``state_dict``, or None."""
    rot_key, count_key = prefix + "rotation", prefix + "num_rotations"
    if rot_key in state_dict:
        problem = rotation_problem(f"state_dict[{rot_key!r}]", state_dict[rot_key], layer)
        if problem:
            return problem
    if count_key in state_dict:
        return count_problem(count_key, state_dict[count_key])
    return None
