"""``rollingq eval``: the paper's analyses of one trained run, written to ``RUN_DIR/eval.json``.

On one split (``test`` by default) it measures, with the run's best checkpoint:

* accuracy, macro-F1 and each modality's linear-probe accuracy (clean inputs);
* the class-row attention mass per modality on clean inputs and with the noise
  modality's input replaced by Gaussian noise of each sample's own mean and std
  (the paper's Figures 1c / 4d);
* the Pearson correlation between "the noise modality was replaced" and the mass it
  receives, over the split with a seeded half of the samples replaced (Table 2);
* accuracy with Gaussian noise of std ``level × the modality's std over the split``
  added to the noise modality, ``level`` in 0, 0.25, 0.5, 0.75, 1.0 (Table 3);
* the mean-key distribution: per sample, cos(class query, mean key) and the mean
  key's norm per modality, clean and noise-replaced (Figures 1d, 2, 5).

The noise modality defaults to the modality with the larger clean attention mass
(the biased one; for static fusion, the one with the better probe). The protocol
is documented in ``docs/evaluation.md``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .analysis import metrics
from .analysis.noise import NOISE_LEVELS, RunningMoments, add_gaussian_noise, replace_with_noise, replaced_mask
from .build import build_dataset, make_loader
from .data.common import SPLITS
from .files import atomic_write_bytes
from .records import eval_filename, record_written
from .train import load_run

logger = logging.getLogger(__name__)

MAX_KEY_POINTS = 2000
"""Samples kept per condition for the key-distribution scatter in eval.json."""

Transform = Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]]
"""Maps a batch's inputs (one ``(B, ...)`` tensor per modality) and its ``(B,)`` sample indices to new inputs."""


@dataclass
class Collected:
    """Outputs of a model over a split, concatenated in loader order (CPU).

    Attributes:
        logits: ``(N, C)`` float32.
        probe_logits: one ``(N, C)`` float32 tensor per modality (empty list if the model has none).
        labels: ``(N,)`` int64.
        index: ``(N,)`` int64 dataset indices.
        mass: ``(N, M+1)`` float64 head-averaged class-row mass, or None (static fusion).
        cos: ``(N, M)`` float32 cos(class query, mean key), or None.
        valid: ``(N, M)`` bool, the modality is present (its cosine counts), or None.
        key_norm: ``(N, M)`` float64 mean-key norms, or None.
    """

    logits: torch.Tensor
    probe_logits: list[torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor
    mass: torch.Tensor | None
    cos: torch.Tensor | None
    valid: torch.Tensor | None
    key_norm: torch.Tensor | None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _unpack(batch: dict) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    try:
        return list(batch["modalities"]), batch["label"], batch["index"]
    except (KeyError, TypeError) as exc:
        raise TypeError(
            "a batch must be a dict with keys 'modalities', 'label', 'index' (rollingq.data.collate), "
            f"got {type(batch).__name__}"
        ) from exc


@torch.no_grad()
def collect_outputs(
    model: nn.Module, loader: Iterable, transform: Transform | None = None, desc: str = "eval"
) -> Collected:
    """Run ``model`` over ``loader`` (optionally corrupting the inputs) and gather its outputs.

    Args:
        model: returns an object with ``logits (B, C)``, ``probe_logits`` (list of ``(B, C)``)
            and ``stats`` (``AttentionStats`` or None) from ``model(modalities)``.
        loader: yields batch dicts ``{"modalities": [...], "label": (B,), "index": (B,)}`` in a fixed order.
        transform: applied to the CPU inputs before they are moved to the model's device.
        desc: progress-bar label.
    """
    model.eval()
    device = _model_device(model)
    logits, labels, index, mass, cos, valid, norms = [], [], [], [], [], [], []
    probes: list[list[torch.Tensor]] = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        inputs, label, idx = _unpack(batch)
        if transform is not None:
            inputs = transform(inputs, idx)
        out = model([x.to(device) for x in inputs])
        logits.append(out.logits.detach().float().cpu())
        labels.append(label.cpu().long())
        index.append(idx.cpu().long())
        probe = list(getattr(out, "probe_logits", None) or [])
        if probe:
            while len(probes) < len(probe):
                probes.append([])
            for m, p in enumerate(probe):
                probes[m].append(p.detach().float().cpu())
        stats = getattr(out, "stats", None)
        if stats is not None:
            mass.append(metrics.modality_mass(stats.mass.detach().cpu()))
            cos.append(stats.cos.detach().float().cpu())
            valid.append(stats.valid.detach().cpu())
            norms.append(metrics.key_norms(stats.key_mean.detach().cpu()))
    if not logits:
        raise ValueError("the loader yielded no batch; expected a non-empty split")
    have_stats = len(mass) == len(logits)
    return Collected(
        logits=torch.cat(logits),
        probe_logits=[torch.cat(p) for p in probes],
        labels=torch.cat(labels),
        index=torch.cat(index),
        mass=torch.cat(mass) if have_stats else None,
        cos=torch.cat(cos) if have_stats else None,
        valid=torch.cat(valid) if have_stats else None,
        key_norm=torch.cat(norms) if have_stats else None,
    )


def modality_moments(loader: Iterable, modality: int) -> RunningMoments:
    """Mean and std of every input element of modality ``modality`` over the loader's split."""
    moments = RunningMoments()
    for batch in loader:
        inputs, _, _ = _unpack(batch)
        moments.update(inputs[modality])
    return moments


def _replace_transform(modality: int, seed: int, mask: torch.Tensor | None = None) -> Transform:
    generator = torch.Generator().manual_seed(seed)

    def transform(inputs: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
        out = list(inputs)
        out[modality] = replace_with_noise(inputs[modality], generator, None if mask is None else mask[idx.cpu()])
        return out

    return transform


def _additive_transform(modality: int, level: float, split_std: float, seed: int) -> Transform:
    generator = torch.Generator().manual_seed(seed)

    def transform(inputs: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
        out = list(inputs)
        out[modality] = add_gaussian_noise(inputs[modality], level, split_std, generator)
        return out

    return transform


def _key_points(c: Collected, modalities: Sequence[str], limit: int) -> dict[str, dict[str, list[float]]] | None:
    if c.cos is None or c.key_norm is None:
        return None
    return {
        name: {"cos": c.cos[:limit, m].double().tolist(), "norm": c.key_norm[:limit, m].tolist()}
        for m, name in enumerate(modalities)
    }


def _key_summary(c: Collected, modalities: Sequence[str]) -> dict[str, dict[str, float]] | None:
    if c.cos is None or c.key_norm is None:
        return None
    return {
        name: {"cos_mean": float(c.cos[:, m].double().mean()), "norm_mean": float(c.key_norm[:, m].mean())}
        for m, name in enumerate(modalities)
    }


def choose_noise_modality(clean: Collected, modalities: Sequence[str]) -> tuple[str, str]:
    """The biased modality: larger clean attention mass, or (static fusion) better probe.

    Returns:
        ``(name, reason)``.
    """
    if clean.mass is not None:
        per_modality = clean.mass[:, 1:].mean(dim=0)
        return modalities[int(per_modality.argmax())], "largest clean attention mass"
    if len(clean.probe_logits) == len(modalities):
        accs = [metrics.accuracy(p, clean.labels) for p in clean.probe_logits]
        return modalities[max(range(len(accs)), key=accs.__getitem__)], "best probe accuracy (no attention statistics)"
    return modalities[0], "first modality (no attention statistics and no probes)"


def evaluate_model(
    model: nn.Module,
    loader: Iterable,
    modalities: Sequence[str],
    noise_modality: str | None = None,
    seed: int = 0,
    levels: Sequence[float] = NOISE_LEVELS,
    max_key_points: int = MAX_KEY_POINTS,
) -> dict:
    """All analyses of one model on one split (see the module docstring); returns the eval.json body.

    Args:
        model: as in :func:`collect_outputs`.
        loader: a non-shuffling loader over the split (the same order on every pass).
        modalities: modality names, in the model's input order.
        noise_modality: the modality to corrupt; None picks it with :func:`choose_noise_modality`.
        seed: seeds every noise draw and the replaced half.
        levels: noise levels of the robustness curve.
        max_key_points: per-sample key points stored per condition.
    """
    modalities = list(modalities)
    if noise_modality is not None and noise_modality not in modalities:
        raise ValueError(f"noise_modality must be one of {modalities}, got {noise_modality!r}")
    clean = collect_outputs(model, loader, desc="clean")
    num_samples = int(clean.labels.numel())
    if clean.probe_logits and len(clean.probe_logits) != len(modalities):
        raise ValueError(f"the model returned {len(clean.probe_logits)} probe logits for modalities {modalities}")
    if noise_modality is None:
        noise_modality, reason = choose_noise_modality(clean, modalities)
    else:
        reason = "given"
    m = modalities.index(noise_modality)
    logger.info("noise modality: %s (%s)", noise_modality, reason)

    replaced = collect_outputs(model, loader, _replace_transform(m, seed + 1), desc=f"{noise_modality} replaced")

    max_index = int(clean.index.max()) + 1
    mask = replaced_mask(max(max_index, 2), seed + 2)
    half = collect_outputs(model, loader, _replace_transform(m, seed + 3, mask), desc="half replaced")
    pearson = None
    if half.mass is not None:
        try:
            corr = metrics.quality_attention_correlation(mask[half.index], half.mass[:, 1 + m])
        except ValueError as exc:  # too few samples, or none replaced / all replaced on a tiny split
            logger.warning("no quality-attention correlation on %d samples (%s); pearson is null", num_samples, exc)
        else:
            pearson = {"modality": noise_modality, **corr.to_dict()}

    moments = modality_moments(loader, m)
    curve = []
    for i, level in enumerate(levels):
        if level == 0.0:
            curve.append(metrics.accuracy(clean.logits, clean.labels))
            continue
        noisy = collect_outputs(
            model, loader, _additive_transform(m, level, moments.std, seed + 10 + i), desc=f"noise {level:g}"
        )
        curve.append(metrics.accuracy(noisy.logits, noisy.labels))

    attention = None
    if clean.mass is not None and replaced.mass is not None:
        attention = {
            "clean": metrics.mean_mass_by_modality(clean.mass, modalities),
            "noise_replaced": metrics.mean_mass_by_modality(replaced.mass, modalities),
        }
    return {
        "modalities": modalities,
        "num_samples": num_samples,
        "seed": seed,
        "noise_modality": noise_modality,
        "noise_modality_reason": reason,
        "accuracy": metrics.accuracy(clean.logits, clean.labels),
        "macro_f1": metrics.macro_f1(clean.logits, clean.labels),
        "probe_accuracy": metrics.probe_accuracies(clean.probe_logits, clean.labels, modalities)
        if clean.probe_logits
        else None,
        "accuracy_noise_replaced": metrics.accuracy(replaced.logits, replaced.labels),
        "air": metrics.air(clean.cos, clean.valid) if clean.cos is not None else None,
        "air_noise_replaced": metrics.air(replaced.cos, replaced.valid) if replaced.cos is not None else None,
        "attention": attention,
        "pearson": pearson,
        "noise_robustness": {
            "modality": noise_modality,
            "levels": [float(x) for x in levels],
            "accuracy": curve,
            "modality_std": moments.std,
        },
        "key_distribution": {
            "noise_modality": noise_modality,
            "summary": {"clean": _key_summary(clean, modalities), "noise_replaced": _key_summary(replaced, modalities)},
            "clean": _key_points(clean, modalities, max_key_points),
            "noise_replaced": _key_points(replaced, modalities, max_key_points),
        }
        if clean.cos is not None
        else None,
    }


def evaluate_run(
    run_dir: str, split: str = "test", noise_modality: str | None = None, seed: int = 0, checkpoint: str = "best"
) -> dict:
    """Evaluate a run directory written by ``rollingq train`` and write ``RUN_DIR/eval.json`` (test split)
    or ``RUN_DIR/eval_<split>.json`` (any other split), atomically.

    Args:
        run_dir: the run directory (``config.yaml``, ``checkpoints/``).
        split: ``"val"`` or ``"test"``.
        noise_modality: modality name to corrupt; None picks the biased one.
        seed: seed of every noise draw.
        checkpoint: ``"best"`` or ``"last"``.

    Returns:
        The dict written to the file.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run_dir {run_dir!r} is not a directory")
    model, cfg = load_run(run_dir, checkpoint=checkpoint)
    loader = make_loader(build_dataset(cfg, split), cfg, train=False)
    modalities = list(cfg.data.modalities)
    result = {
        "run_dir": os.path.abspath(run_dir),
        "name": cfg.name,
        "run_seed": cfg.seed,
        "fusion": cfg.model.fusion,
        "rollingq": cfg.rollingq.enabled,
        "split": split,
        "checkpoint": checkpoint,
        **evaluate_model(model, loader, modalities, noise_modality=noise_modality, seed=seed),
    }
    path = os.path.join(run_dir, eval_filename(split))
    record_written(run_dir, [eval_filename(split)])  # --overwrite removes it with the run
    atomic_write_bytes(json.dumps(result, indent=1).encode("utf-8"), path)
    logger.info("wrote %s (accuracy %.4f, noise modality %s)", path, result["accuracy"], result["noise_modality"])
    return result


def summarize(result: dict) -> dict:
    """The eval.json record without its per-sample key points (for printing on a terminal)."""
    summary = {k: v for k, v in result.items() if k != "key_distribution"}
    keys = result.get("key_distribution")
    if keys is not None:
        summary["key_distribution"] = {"noise_modality": keys["noise_modality"], "summary": keys["summary"]}
    return summary
