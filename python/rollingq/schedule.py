"""Learning-rate schedule: linear warm-up, then cosine annealing (per optimizer step)."""

from __future__ import annotations

import math

import torch


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, epochs: int) -> int:
    """The warm-up in optimizer steps: ``warmup_epochs`` (fractions allowed) of ``steps_per_epoch`` steps,
    at most the run's ``epochs`` (so a huge value such as ``1e308`` does not overflow)."""
    return int(min(float(warmup_epochs), float(epochs)) * steps_per_epoch)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with factor ``(s+1)/warmup`` during warm-up, then ``min + (1-min)·½(1+cos(π·t))``."""
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
