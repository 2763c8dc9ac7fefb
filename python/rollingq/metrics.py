"""The trainer's validation pass: accuracy, macro-F1, probe accuracy and attention statistics on clean inputs.

The metric definitions are :mod:`rollingq.analysis.metrics` (one definition per quantity); noise
protocols live in :mod:`rollingq.analysis.noise` and :mod:`rollingq.evaluate`.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .analysis.metrics import air, macro_f1


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Evaluate ``model`` (in eval mode) on every batch of ``loader`` (clean inputs).

    Args:
        num_classes: C, the number of classes (checked against the logits).

    Returns:
        ``{"acc", "macro_f1", "probe_acc": [per modality], "mass": [class, mod1, ...] | None,
        "air": float | None, "count"}`` (mass and AIR from the fusion layer's class-row statistics;
        AIR as :func:`rollingq.analysis.metrics.air`, the spread of the mean cosines for M > 2).
    """
    was_training = model.training
    model.eval()
    preds: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    probe_correct: torch.Tensor | None = None
    mass_sum, cos_rows, count = None, [], 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        mods = [x.to(device) for x in batch["modalities"]]
        labels = batch["label"].to(device)
        out = model(mods)
        if out.logits.shape[-1] != num_classes:
            raise ValueError(f"num_classes: the model returned {out.logits.shape[-1]} logits, expected {num_classes}")
        preds.append(out.logits.argmax(1).cpu())
        targets.append(labels.cpu())
        correct = torch.stack([(p.argmax(1) == labels).sum() for p in out.probe_logits]).cpu()
        probe_correct = correct if probe_correct is None else probe_correct + correct
        if out.stats is not None:
            batch_mass = out.stats.mass.double().mean(1).sum(0).cpu()  # heads averaged, summed over samples
            mass_sum = batch_mass if mass_sum is None else mass_sum + batch_mass
            cos_rows.append(out.stats.cos.double().cpu())
        count += labels.shape[0]
    model.train(was_training)
    pred, target = torch.cat(preds), torch.cat(targets)
    return {
        "acc": float((pred == target).double().mean()),
        "macro_f1": macro_f1(pred, target),
        "probe_acc": [float(c) / max(count, 1) for c in (probe_correct if probe_correct is not None else [])],
        "mass": None if mass_sum is None else [float(v) / count for v in mass_sum],
        "air": air(torch.cat(cos_rows)) if cos_rows else None,
        "count": count,
    }
