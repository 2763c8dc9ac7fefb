"""The class-query math every backend shares: compute dtype, rotation and its chain rule.

The reference (the oracle) and the kernels' launchers both import this module,
so no backend depends on the oracle (``docs/op.md``, "Rotation of the class
query").
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (the contract's ``c``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate_class_query(q0: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Rotate the class query ``q0`` ``(B, H, Dh)``: global ``(H·Dh, H·Dh)`` or per head ``(H, Dh, Dh)``.

    Computed in the compute dtype and rounded back to ``q0.dtype``; the column
    convention ``y = R x`` means rows are multiplied by ``Rᵀ``. Returns ``q0``
    itself when ``rotation`` is None.
    """
    if rotation is None:
        return q0
    c = compute_dtype(q0.dtype)
    B, H, Dh = q0.shape
    r = rotation.to(c)
    if rotation.dim() == 2:
        out = (q0.reshape(B, H * Dh).to(c) @ r.T).reshape(B, H, Dh)
    else:
        out = torch.einsum("bhd,hed->bhe", q0.to(c), r)
    return out.to(q0.dtype)


def rotation_chain_rule(dq0_rot: torch.Tensor, rotation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dq0 = dq0_rot @ R`` (global on ``H·Dh`` vectors, or per head) in the compute dtype, rounded to ``dtype``.

    ``dq0_rot`` is ``(B, H, Dh)``; the result has the same shape.
    """
    c = compute_dtype(dtype)
    B, H, Dh = dq0_rot.shape
    r = rotation.to(c)
    if rotation.dim() == 2:
        out = (dq0_rot.reshape(B, H * Dh).to(c) @ r).reshape(B, H, Dh)
    else:
        out = torch.einsum("bhe,hed->bhd", dq0_rot.to(c), r)
    return out.to(dtype)
