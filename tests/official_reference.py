"""The official RollingQ rotation step, written out in plain torch for the tests that check against it.

From the description of GeWu-Lab/RollingQ_ICML2025 in ``shared/notes.md`` (none of its code), and
independent of ``rollingq_kernels``: ``test_official_mode.py`` and ``test_official_semantics.py`` both
compare the package's rotation with this one.
"""

from __future__ import annotations

import torch


def official_svd_rotation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R with R x̂ = ŷ: U Vᵀ from the SVD of ŷx̂ᵀ, the last column of U negated when det < 0.

    ``x``, ``y``: ``(d,)`` of one dtype; returns ``(d, d)`` of that dtype.
    """
    xh, yh = x / x.norm(), y / y.norm()
    U, _, Vh = torch.linalg.svd(torch.outer(yh, xh))
    R = U @ Vh
    if torch.linalg.det(R) < 0:
        U = U.clone()
        U[:, -1] = -U[:, -1]
        R = U @ Vh
    return R
