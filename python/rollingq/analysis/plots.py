"""The report's figures (matplotlib's object API on the Agg canvas; no pyplot global state).

Each function draws one PNG from :class:`~rollingq.analysis.runs.RunRecord` objects and
returns its path, or None when no run has the data it needs. matplotlib (the ``[analysis]``
extra) is imported when a figure is drawn, so the rest of the package works without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..extras import require
from .metrics import mean_std
from .runs import RunRecord, group_runs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

DPI = 110
MODALITY_COLORS = ("tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:olive")
GROUP_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
NOISE_COLOR = "red"


def _figure(**kwargs) -> Figure:
    """A matplotlib ``Figure`` (Agg canvas), or :class:`~rollingq.extras.MissingExtra` naming ``[analysis]``."""
    return require("matplotlib.figure", "analysis", "rollingq report's figures").Figure(**kwargs)


def _colored_groups(runs: Sequence[RunRecord]) -> Iterator[tuple[str, str, list[RunRecord]]]:
    """``(colour, group label, member runs)`` of each group of :func:`group_runs`, colours from GROUP_COLORS."""
    for g, (group, members) in enumerate(group_runs(runs).items()):
        yield GROUP_COLORS[g % len(GROUP_COLORS)], group, members


def _integer_ticks(ax: Axes) -> None:
    ax.xaxis.set_major_locator(require("matplotlib.ticker", "analysis", "rollingq report's figures").MaxNLocator(
        integer=True))


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    logger.info("wrote %s", path)
    return path


SEED_STYLES = ("-", "--", ":", "-.")
SEED_MARKERS = ("o", "s", "^", "D", "v", "x")


def _mark_rotations(ax: Axes, run: RunRecord, color: str, labelled: bool) -> bool:
    """Dashed lines half an epoch after each rotation epoch (the rotation acts from the next epoch on)."""
    for epoch in run.rotation_epochs:
        ax.axvline(epoch + 0.5, color=color, linestyle="--", linewidth=1.0, alpha=0.6,
                   label=None if labelled else "rotation")
        labelled = True
    return labelled


def plot_training_dynamics(runs: Sequence[RunRecord], path: str) -> str | None:
    """AIR (left) and class-row attention mass per modality (right) per epoch, one row per run group.

    The seeds of a group share a panel (line style per seed). AIR and mass are the epoch's
    training-batch statistics from metrics.jsonl; a rotation made at the end of epoch e is a dashed
    red line at e + 0.5, as in the paper's Figure 4c.
    """
    runs = [r for r in runs if any(e.get("air") is not None or e.get("mass") for e in r.epochs)]
    if not runs:
        return None
    groups = group_runs(runs)
    fig = _figure(figsize=(11, 3.0 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for row, (group, members) in enumerate(groups.items()):
        ax_air, ax_mass = axes[row]
        rotation_labelled = [False, False]
        for i, run in enumerate(members):
            style = SEED_STYLES[i % len(SEED_STYLES)]
            marker = SEED_MARKERS[i % len(SEED_MARKERS)]
            seed = f"seed {run.seed}" if run.seed is not None else run.label
            epochs = [int(e["epoch"]) for e in run.epochs]
            air = [np.nan if e.get("air") is None else float(e["air"]) for e in run.epochs]
            ax_air.plot(epochs, air, linestyle=style, marker=marker, markersize=3, color="black", label=seed)
            rotation_labelled[0] = _mark_rotations(ax_air, run, "red", rotation_labelled[0])
            names = ["class", *run.modalities]
            masses = [e.get("mass") for e in run.epochs]
            width = max((len(m) for m in masses if m), default=0)
            for j in range(width):
                series = [np.nan if not m or j >= len(m) else float(m[j]) for m in masses]
                color = "gray" if j == 0 else MODALITY_COLORS[(j - 1) % len(MODALITY_COLORS)]
                label = (names[j] if j < len(names) else f"modality {j}") if i == 0 else None
                ax_mass.plot(epochs, series, linestyle=style, marker=marker, markersize=2.5, color=color, label=label)
            rotation_labelled[1] = _mark_rotations(ax_mass, run, "red", rotation_labelled[1])
        first = members[0]
        ax_air.axhline(0.0, color="gray", linewidth=0.6)
        rq = first.cfg.get("rollingq") or {}
        if rq.get("enabled") and rq.get("beta") is not None:
            beta = float(rq["beta"])
            ax_air.axhspan(-beta, beta, color="gray", alpha=0.12, label=f"|AIR| < β = {beta:g}")
        mods = first.modalities
        ax_air.set_ylabel(f"AIR = E[cos {mods[0]} − cos {mods[1]}]" if len(mods) >= 2 else "AIR")
        ax_air.set_title(f"{group}: AIR over training (training batches)", fontsize=9)
        ax_mass.set_title(f"{group}: class-row attention mass (training batches)", fontsize=9)
        ax_mass.set_ylim(0.0, 1.0)
        ax_mass.set_ylabel("attention mass")
        for ax in (ax_air, ax_mass):
            ax.set_xlabel("epoch")
            _integer_ticks(ax)
            ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _attention_by_condition(members: Sequence[RunRecord], key: str, names: Sequence[str]) -> tuple[list, list]:
    means, stds = [], []
    for name in names:
        values = [r.eval["attention"][key].get(name) for r in members]
        mean, std, _ = mean_std(values)
        means.append(np.nan if mean is None else mean)
        stds.append(0.0 if std is None else std)
    return means, stds


def _group_panels(
    runs: Sequence[RunRecord], eval_key: str, height: float
) -> tuple[Figure, Sequence[Axes], dict[str, list[RunRecord]]] | None:
    """A figure with one panel per run group among the runs whose ``eval.json`` has ``eval_key``.

    Returns ``(figure, axes, groups)``, or None when no run has that evaluation.
    """
    evaluated = [r for r in runs if r.eval and r.eval.get(eval_key)]
    if not evaluated:
        return None
    groups = group_runs(evaluated)
    fig = _figure(figsize=(4.6 * len(groups), height), layout="constrained")
    return fig, fig.subplots(1, len(groups), squeeze=False)[0], groups


def plot_attention_noise(runs: Sequence[RunRecord], path: str) -> str | None:
    """Mean class-row attention mass per modality, clean vs noise-replaced (the paper's Figures 1c / 4d).

    One panel per run group (mean over seeds, error bars: std over seeds).
    """
    panels = _group_panels(runs, "attention", height=3.6)
    if panels is None:
        return None
    fig, axes, groups = panels
    for ax, (group, members) in zip(axes, groups.items(), strict=True):
        modalities = members[0].eval["modalities"]
        names = ["class", *modalities]
        x = np.arange(len(names))
        clean, clean_std = _attention_by_condition(members, "clean", names)
        noisy, noisy_std = _attention_by_condition(members, "noise_replaced", names)
        ax.bar(x - 0.2, clean, 0.4, yerr=clean_std, color="tab:blue", capsize=3, label="clean")
        ax.bar(x + 0.2, noisy, 0.4, yerr=noisy_std, color=NOISE_COLOR, alpha=0.75, capsize=3,
               label=f"{members[0].eval['noise_modality']} replaced by noise")
        ax.set_xticks(x, names)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("attention mass")
        ax.set_title(f"{group} (n={len(members)})", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_key_distribution(runs: Sequence[RunRecord], path: str) -> str | None:
    """Per-sample cos(class query, mean key) vs mean-key norm, per modality (the paper's Figures 1d / 5).

    One panel per run group, drawn from the group's first evaluated run (lowest seed); the noise
    modality's keys with its input replaced by noise are red crosses.
    """
    panels = _group_panels(runs, "key_distribution", height=4.0)
    if panels is None:
        return None
    fig, axes, groups = panels
    for ax, (group, members) in zip(axes, groups.items(), strict=True):
        run = members[0]
        keys = run.eval["key_distribution"]
        noise_mod = keys["noise_modality"]
        for m, name in enumerate(run.eval["modalities"]):
            points = keys["clean"][name]
            ax.scatter(points["cos"], points["norm"], s=6, alpha=0.5, color=MODALITY_COLORS[m % len(MODALITY_COLORS)],
                       label=f"{name} (clean)")
        noisy = keys["noise_replaced"][noise_mod]
        ax.scatter(noisy["cos"], noisy["norm"], s=8, alpha=0.6, marker="x", color=NOISE_COLOR,
                   label=f"{noise_mod} replaced by noise")
        ax.axvline(0.0, color="gray", linewidth=0.6)
        ax.set_xlabel("cos(class query, mean key)")
        ax.set_ylabel("mean-key norm")
        ax.set_title(group if run.seed is None else f"{group} (seed {run.seed})", fontsize=9)
        ax.legend(fontsize=7, markerscale=2)
    return _save(fig, path)


def plot_noise_robustness(runs: Sequence[RunRecord], path: str) -> str | None:
    """Accuracy vs Gaussian-noise level on the noise modality, every run group on one axis.

    Thin lines: individual seeds; thick line and band: mean ± std over seeds (the paper's Table 3).
    """
    evaluated = [r for r in runs if r.eval and r.eval.get("noise_robustness")]
    if not evaluated:
        return None
    fig = _figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for color, group, members in _colored_groups(evaluated):
        levels = members[0].eval["noise_robustness"]["levels"]
        curves = np.array([m.eval["noise_robustness"]["accuracy"] for m in members], dtype=float)
        for curve in curves:
            ax.plot(levels, curve, color=color, alpha=0.3, linewidth=0.8)
        mean = curves.mean(axis=0)
        std = curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        modality = members[0].eval["noise_robustness"]["modality"]
        label = f"{group} (n={len(members)}, noise on {modality})"
        ax.plot(levels, mean, color=color, marker="o", linewidth=2.0, label=label)
        ax.fill_between(levels, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xlabel("noise level (noise std / modality std over the split)")
    ax.set_ylabel("accuracy")
    ax.set_title("Noise robustness", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy_over_training(runs: Sequence[RunRecord], path: str) -> str | None:
    """Validation accuracy per epoch of every run, coloured by group, rotations marked with dots."""
    runs = [r for r in runs if any(e.get("val_acc") is not None for e in r.epochs)]
    if not runs:
        return None
    fig = _figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    # colour by group (the label is dataset/name when the runs span several datasets), never by bare run name
    for color, group, members in _colored_groups(runs):
        for i, run in enumerate(members):
            epochs = [int(e["epoch"]) for e in run.epochs]
            acc = [np.nan if e.get("val_acc") is None else float(e["val_acc"]) for e in run.epochs]
            ax.plot(epochs, acc, color=color, alpha=0.8, label=group if i == 0 else None)
            rot = [(ep, a) for ep, a in zip(epochs, acc, strict=True)
                   if ep in run.rotation_epochs and not math.isnan(a)]
            if rot:  # the validation accuracy of the epoch at whose end the query was rotated
                ax.scatter(*zip(*rot, strict=True), color="red", s=18, zorder=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    _integer_ticks(ax)
    ax.set_title("Validation accuracy (red dots: rotation epochs)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
