"""Input corruptions used by the evaluation (applied to the INPUT tensors of one modality).

Two corruptions, both seeded through an explicit :class:`torch.Generator`:

* :func:`replace_with_noise` — the paper's Figure 1c/4d protocol: a sample's
  modality input is replaced by Gaussian noise with that sample's own mean and
  standard deviation (so the noise carries no information but keeps the input's
  scale).
* :func:`add_gaussian_noise` — the noise-robustness protocol (the paper's
  Table 3, after MultiBench): zero-mean Gaussian noise of standard deviation
  ``level × split_std`` is added to every sample's input.

:func:`replaced_mask` picks the seeded half of a split whose chosen modality is
replaced, for the Pearson analysis (the paper's Table 2).
"""

from __future__ import annotations

import torch

NOISE_LEVELS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Noise levels of the robustness curve (noise std = level × the modality's std over the split)."""


def _check_batch_tensor(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension (B, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def per_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of each sample over all its elements.

    Args:
        x: ``(B, ...)`` floating-point input of one modality.

    Returns:
        ``(mean, std)``, each ``(B,)`` in float64.
    """
    _check_batch_tensor(x, "x")
    flat = x.detach().reshape(x.shape[0], -1).double()
    return flat.mean(dim=1), flat.std(dim=1, unbiased=False)


def replace_with_noise(
    x: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Replace samples by Gaussian noise with each sample's own mean and standard deviation.

    Args:
        x: ``(B, ...)`` floating-point input of one modality (any device).
        generator: a CPU :class:`torch.Generator` (the noise is drawn on CPU in float64,
            so results do not depend on the device).
        mask: optional ``(B,)`` bool; only samples where it is True are replaced.
            ``None`` replaces every sample.

    Returns:
        A new tensor with the shape, dtype and device of ``x``.
    """
    _check_batch_tensor(x, "x")
    if mask is not None:
        if mask.shape != (x.shape[0],) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape ({x.shape[0]},), got dtype {mask.dtype} shape {tuple(mask.shape)}"
            )
    mean, std = per_sample_moments(x)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    noise = noise * std.cpu().reshape(shape) + mean.cpu().reshape(shape)
    noise = noise.to(device=x.device, dtype=x.dtype)
    if mask is None:
        return noise
    keep = mask.to(x.device).reshape(shape)
    return torch.where(keep, noise, x)


def add_gaussian_noise(x: torch.Tensor, level: float, split_std: float, generator: torch.Generator) -> torch.Tensor:
    """Add zero-mean Gaussian noise of standard deviation ``level * split_std``.

    Args:
        x: ``(B, ...)`` floating-point input of one modality.
        level: noise level, ``>= 0`` (``0`` returns ``x`` unchanged, without drawing).
        split_std: the modality's standard deviation over the evaluated split, ``> 0``.
        generator: a CPU :class:`torch.Generator`.

    Returns:
        A new tensor with the shape, dtype and device of ``x``.
    """
    _check_batch_tensor(x, "x")
    if not level >= 0.0:
        raise ValueError(f"level must be >= 0, got {level}")
    if not split_std > 0.0:
        raise ValueError(f"split_std must be > 0, got {split_std}")
    if level == 0.0:
        return x.clone()
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64) * (level * split_std)
    return x + noise.to(device=x.device, dtype=x.dtype)


def replaced_mask(num_samples: int, seed: int, fraction: float = 0.5) -> torch.Tensor:
    """A seeded choice of ``floor(fraction * num_samples)`` samples to replace.

    Args:
        num_samples: size of the split, ``>= 2``.
        seed: seed of the choice.
        fraction: share of replaced samples, in ``(0, 1)``.

    Returns:
        ``(num_samples,)`` bool, indexed by the dataset's sample index.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to have both clean and replaced samples, got {num_samples}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    count = min(max(int(fraction * num_samples), 1), num_samples - 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_samples, generator=generator)
    mask = torch.zeros(num_samples, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


class RunningMoments:
    """Streaming mean and standard deviation of all elements of a modality over a split.

    Batches are merged with Chan et al.'s pairwise update in float64, so large
    offsets do not cancel the variance.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``(B, ...)`` of inputs."""
        flat = x.detach().double().reshape(-1)
        n = flat.numel()
        if n == 0:
            return
        batch_mean = float(flat.mean())
        batch_m2 = float((flat - batch_mean).square().sum())
        total = self.count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def mean(self) -> float:
        if self.count == 0:
            raise ValueError("RunningMoments.mean: no data was added")
        return self._mean

    @property
    def std(self) -> float:
        """Population standard deviation (``0`` for constant input)."""
        if self.count == 0:
            raise ValueError("RunningMoments.std: no data was added")
        return (self._m2 / self.count) ** 0.5
