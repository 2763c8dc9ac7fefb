"""The trainer's validation pass: accuracy, macro-F1, probe accuracy and attention statistics on clean inputs.

The metric definitions are :mod:`rollingq.analysis.metrics`; the attention statistics come the one
way they always do, from the fusion layer into an accumulator
(:meth:`~rollingq_kernels.module.FusedRollingQAttention.collecting`), and the imbalance is
:func:`rollingq_kernels.accumulator.imbalance`. Noise protocols live in :mod:`rollingq.evaluate`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rollingq_kernels.accumulator import StatisticsAccumulator, imbalance

from .analysis.metrics import macro_f1
from .models import MultimodalModel


@torch.no_grad()
def validate(
    model: MultimodalModel,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    progress: bool = False,
    desc: str = "val",
) -> dict:
    """Evaluate ``model`` (in eval mode) on every batch of ``loader`` (clean inputs).

    Args:
        model: the model; its ``fusion_attention`` (None for static heads) gives the statistics.
        loader: batches ``{"modalities": [...], "label": (B,)}``.
        device: where the model lives.
        num_classes: C, the number of classes (checked against the logits).
        progress: show a progress bar.
        desc: its label.

    Returns:
        ``{"acc", "macro_f1", "probe_acc": [per modality], "mass": [class, mod1, ...] | None,
        "air": float | None, "count"}``; ``mass`` is the class-row attention mass averaged over
        samples and heads, ``air`` the fusion layer's imbalance (AIR, or the spread for M > 2).
    """
    was_training = model.training
    model.eval()
    layer = model.fusion_attention
    statistics = StatisticsAccumulator("epoch")
    preds: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    probe_correct: torch.Tensor | None = None
    count = 0
    with layer.collecting(statistics) if layer is not None else nullcontext():
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            mods = [x.to(device) for x in batch["modalities"]]
            labels = batch["label"].to(device)
            out = model(mods)
            if out.logits.shape[-1] != num_classes:
                raise ValueError(
                    f"num_classes: the model returned {out.logits.shape[-1]} logits, expected {num_classes}"
                )
            preds.append(out.logits.argmax(1).cpu())
            targets.append(labels.cpu())
            correct = torch.stack([(p.argmax(1) == labels).sum() for p in out.probe_logits]).cpu()
            probe_correct = correct if probe_correct is None else probe_correct + correct
            count += labels.shape[0]
    model.train(was_training)
    pred, target = torch.cat(preds), torch.cat(targets)
    window = statistics.reduce()
    return {
        "acc": float((pred == target).double().mean()),
        "macro_f1": macro_f1(pred, target),
        "probe_acc": [float(c) / max(count, 1) for c in (probe_correct if probe_correct is not None else [])],
        "mass": None if window is None else window.mass_mean.mean(0).tolist(),
        "air": None if window is None else imbalance(window),
        "count": count,
    }
