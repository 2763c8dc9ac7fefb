"""OGM-GE: on-the-fly gradient modulation with generalization enhancement (Peng et al., CVPR 2022).

A static-fusion imbalance baseline. After ``loss.backward()``, each modality's
score is the summed softmax probability of the true class under its part of
the fused logits; a modality whose score exceeds the others' mean by the ratio
``r > 1`` has its encoder gradients scaled by ``1 − tanh(alpha · r)`` (as in the
official code) and perturbed by Gaussian noise of the gradient's own standard
deviation (the "GE" part). Scores are summed over processes under DDP, so every
rank applies the same coefficients.
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import all_reduce_sum


@torch.no_grad()
def ogm_coefficients(unimodal_logits: list[torch.Tensor], labels: torch.Tensor, alpha: float) -> list[float]:
    """Per-modality gradient coefficients from the unimodal logits ``[(B, C)]`` and labels ``(B,)``."""
    scores = torch.stack(
        [torch.softmax(lg.float(), dim=1).gather(1, labels[:, None]).sum() for lg in unimodal_logits]
    )
    scores = all_reduce_sum(scores)
    coeffs = []
    for m in range(len(unimodal_logits)):
        others = torch.cat([scores[:m], scores[m + 1 :]]).mean()
        ratio = float(scores[m] / others.clamp_min(1e-12))
        coeffs.append(1.0 - float(torch.tanh(torch.tensor(alpha * ratio))) if ratio > 1.0 else 1.0)
    return coeffs


@torch.no_grad()
def modulate_gradients(encoders: nn.ModuleList, coeffs: list[float]) -> None:
    """Scale each encoder's gradients by its coefficient and add N(0, std(grad)) noise where scaled."""
    for encoder, coeff in zip(encoders, coeffs):
        if coeff == 1.0:
            continue
        for p in encoder.parameters():
            if p.grad is None:
                continue
            std = float(p.grad.std()) if p.grad.numel() > 1 else 0.0
            p.grad.mul_(coeff)
            if std > 0:
                p.grad.add_(torch.randn_like(p.grad) * (std + 1e-8))
