"""Classification metrics and a model evaluation pass (accuracy, macro-F1, attention statistics)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows = true class, columns = prediction."""
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro_f1(conf: torch.Tensor) -> float:
    """Mean over classes present in targets or predictions of F1 = 2TP / (2TP + FP + FN)."""
    tp = conf.diag().double()
    fp = conf.sum(0).double() - tp
    fn = conf.sum(1).double() - tp
    denom = 2 * tp + fp + fn
    seen = denom > 0
    if not bool(seen.any()):
        return math.nan
    return float((2 * tp[seen] / denom[seen]).mean())


def noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with the batch's mean and standard deviation (shape and dtype of ``x``)."""
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    return noise * x.float().std().to(x.dtype) + x.float().mean().to(x.dtype)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    noise_modality: int | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Evaluate ``model`` (in eval mode) on every batch of ``loader``.

    Args:
        noise_modality: replace this modality's input by Gaussian noise (the paper's Table 3 protocol).
        seed: seed of that noise.

    Returns:
        ``{"acc", "macro_f1", "probe_acc": [per modality], "mass": [class, mod1, ...] | None,
        "air": float | None, "count"}`` (mass and AIR from the fusion layer's class-row statistics).
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    probe_correct: torch.Tensor | None = None
    mass_sum, diff_sum, count = None, 0.0, 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        mods = [x.to(device) for x in batch["modalities"]]
        if noise_modality is not None:
            mods[noise_modality] = noise_like(mods[noise_modality], gen)
        labels = batch["label"].to(device)
        out = model(mods)
        conf += confusion_matrix(out.logits.argmax(1).cpu(), labels.cpu(), num_classes)
        correct = torch.stack([(p.argmax(1) == labels).sum() for p in out.probe_logits]).cpu()
        probe_correct = correct if probe_correct is None else probe_correct + correct
        if out.stats is not None:
            batch_mass = out.stats.mass.double().mean(1).sum(0).cpu()  # heads averaged, summed over samples
            mass_sum = batch_mass if mass_sum is None else mass_sum + batch_mass
            cos = out.stats.cos.double().cpu()
            diff_sum += float((cos[:, 0] - cos[:, 1]).sum())
        count += labels.shape[0]
    model.train(was_training)
    total = int(conf.sum())
    return {
        "acc": float(conf.diag().sum()) / max(total, 1),
        "macro_f1": macro_f1(conf),
        "probe_acc": [float(c) / max(count, 1) for c in (probe_correct if probe_correct is not None else [])],
        "mass": None if mass_sum is None else [float(v) / count for v in mass_sum],
        "air": None if mass_sum is None else diff_sum / count,
        "count": count,
    }
