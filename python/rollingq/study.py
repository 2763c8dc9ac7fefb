"""Per-run numbers of a vanilla-vs-RollingQ comparison, the collapse criteria and paired differences.

Used by ``rollingq demo`` and ``scripts/synthetic_study.py``. A run is summarised from its
``eval.json`` (or ``eval_<split>.json``, written by :func:`rollingq.evaluate.evaluate_run`) and its
``metrics.jsonl``; runs of two methods with the same seed are paired, and each difference
(RollingQ − vanilla) gets a 95 % t-interval over the seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .analysis.metrics import accuracy, mean_mass_by_modality
from .analysis.noise import replace_with_noise
from .build import build_dataset, make_loader
from .evaluate import collect_outputs
from .extras import require
from .files import atomic_write_bytes
from .records import eval_filename, read_metrics
from .train import load_run

#: The collapse criteria of issue 12 (vanilla MT, equal token counts).
MIN_DOMINANT_MASS = 0.70
MAX_MASS_SHIFT = 0.05
MIN_PROBE_GAP = 0.10


@dataclass
class RunSummary:
    """The numbers of one trained and evaluated run.

    Attributes:
        name, seed, run_dir: the run.
        dominant, weak: the modality replaced by noise (the dominant one) and the other one.
        accuracy, accuracy_replaced: clean test accuracy; with ``dominant`` replaced by noise.
        noise_curve: accuracy at the additive noise levels ``noise_levels``.
        pearson: ``r_quality`` (None when undefined, e.g. a constant attention mass).
        probe_weak, probe_dominant: the linear probes' accuracies.
        mass_clean, mass_replaced: the class-row attention mass on ``dominant`` (test).
        air_epochs, mass_epochs: AIR and the mass on ``dominant`` per training epoch (training batches).
        val_epochs: validation accuracy per epoch.
        rotations: epochs at whose end the query was rotated.
        accuracy_weak_replaced: accuracy with the weak modality replaced by noise (None unless
            :func:`evaluate_replaced` ran): for attention fusion, the dominant modality alone, attention-pooled.
        air_sign: +1 when a growing AIR means a growing lean toward ``dominant`` (it is the first of two
            modalities), -1 when it is the second of two; +1 with more than two modalities, where the
            value is the spread max − min, which has no direction: ``air_grows`` then means "the
            imbalance grows".
    """

    name: str
    seed: int
    run_dir: str
    dominant: str
    weak: str
    accuracy: float
    accuracy_replaced: float
    noise_levels: list[float]
    noise_curve: list[float]
    pearson: float | None
    probe_weak: float | None
    probe_dominant: float | None
    mass_clean: float | None
    mass_replaced: float | None
    air_epochs: list[float | None]
    mass_epochs: list[float | None]
    val_epochs: list[float]
    rotations: list[int]
    air_sign: int = 1
    accuracy_weak_replaced: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_run(run_dir: str, split: str = "test") -> RunSummary:
    """Read ``run_dir``'s ``eval(_<split>).json`` and ``metrics.jsonl`` into a :class:`RunSummary`."""
    path = os.path.join(run_dir, eval_filename(split))
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    history = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    mods = list(result["modalities"])
    dominant = result["noise_modality"]
    m = mods.index(dominant)
    weak = mods[1 - m] if len(mods) == 2 else ",".join(x for x in mods if x != dominant)
    probes = result.get("probe_accuracy") or {}
    attention = result.get("attention") or {}
    pearson = result.get("pearson") or {}
    curve = result["noise_robustness"]
    replaced_path = os.path.join(run_dir, replaced_filename(split))
    weak_replaced = None
    if os.path.isfile(replaced_path) and len(mods) == 2:
        with open(replaced_path, encoding="utf-8") as f:
            weak_replaced = json.load(f).get(weak, {}).get("accuracy")
    return RunSummary(
        name=str(result["name"]),
        seed=int(result["run_seed"]),
        run_dir=run_dir,
        dominant=dominant,
        weak=weak,
        accuracy=float(result["accuracy"]),
        accuracy_replaced=float(result["accuracy_noise_replaced"]),
        noise_levels=[float(x) for x in curve["levels"]],
        noise_curve=[float(x) for x in curve["accuracy"]],
        pearson=pearson.get("r_quality"),
        probe_weak=probes.get(weak),
        probe_dominant=probes.get(dominant),
        mass_clean=(attention.get("clean") or {}).get(dominant),
        mass_replaced=(attention.get("noise_replaced") or {}).get(dominant),
        air_epochs=[row.get("air") for row in history],
        mass_epochs=[None if row.get("mass") is None else row["mass"][1 + m] for row in history],
        val_epochs=[float(row["val_acc"]) for row in history],
        rotations=[int(row["epoch"]) for row in history if row.get("rotated")],
        air_sign=-1 if len(mods) == 2 and m == 1 else 1,
        accuracy_weak_replaced=weak_replaced,
    )


# ---------------------------------------------------------------------------- each modality replaced
def replaced_filename(split: str) -> str:
    """``eval_replaced_<split>.json``: accuracy and mass with each modality replaced by noise."""
    return f"eval_replaced_{split}.json"


def evaluate_replaced(run_dir: str, split: str = "test", seed: int = 0, checkpoint: str = "last") -> dict:
    """Accuracy (and, for attention fusion, the class-row mass) with each modality in turn replaced by
    Gaussian noise of each sample's own mean and std (the protocol of ``eval.json``'s ``noise_replaced``).

    With the weak modality replaced, an attention model shows what it does with the dominant modality
    alone, pooled by its own attention: the like-with-like counterpart of a unimodal model. Writes
    ``RUN_DIR/eval_replaced_<split>.json``: ``{modality: {"accuracy": float, "mass": {name: float} | None}}``.
    """
    model, cfg = load_run(run_dir, checkpoint=checkpoint)
    loader = make_loader(build_dataset(cfg, split), cfg, train=False)
    mods = list(cfg.data.modalities)
    out = {}
    for m, name in enumerate(mods):
        generator = torch.Generator().manual_seed(seed + 1)

        def transform(inputs, idx, m=m, generator=generator):
            return [replace_with_noise(x, generator) if i == m else x for i, x in enumerate(inputs)]

        c = collect_outputs(model, loader, transform, desc=f"{name} replaced")
        out[name] = {"accuracy": accuracy(c.logits, c.labels),
                     "mass": None if c.mass is None else mean_mass_by_modality(c.mass, mods)}
    atomic_write_bytes(json.dumps(out, indent=1).encode("utf-8"), os.path.join(run_dir, replaced_filename(split)))
    return out


# ---------------------------------------------------------------------------- the collapse criteria
def collapse_checks(run: RunSummary) -> dict[str, bool | None]:
    """Issue 12's four criteria for one vanilla run (None where a number is missing).

    * ``mass``: the class token gives ≥ 0.70 of its attention to the dominant modality (clean test);
    * ``static``: that mass moves by ≤ 0.05 when the dominant modality is replaced by noise;
    * ``air_grows``: AIR of the last training epoch exceeds AIR of the first, AIR taken toward the
      dominant modality (``run.air_sign``: AIR = cos(q, k̄_0) − cos(q, k̄_1) falls as modality 1 takes over);
    * ``probe_gap``: accuracy with the dominant modality replaced is ≥ 0.10 below the weak modality's probe.
    """
    air = [a for a in run.air_epochs if a is not None]
    return {
        "mass": None if run.mass_clean is None else run.mass_clean >= MIN_DOMINANT_MASS,
        "static": None if run.mass_clean is None or run.mass_replaced is None
        else abs(run.mass_replaced - run.mass_clean) <= MAX_MASS_SHIFT,
        "air_grows": None if len(air) < 2 else run.air_sign * air[-1] > run.air_sign * air[0],
        "probe_gap": None if run.probe_weak is None else run.accuracy_replaced <= run.probe_weak - MIN_PROBE_GAP,
    }


# ---------------------------------------------------------------------------- paired differences
@dataclass
class Paired:
    """Mean of paired differences with a 95 % t-interval (``n`` seeds; None when ``n < 2``)."""

    n: int
    mean: float | None
    low: float | None
    high: float | None
    sd: float | None

    def text(self, digits: int = 3) -> str:
        if self.mean is None:
            return "n/a"
        if self.low is None:
            return f"{self.mean:+.{digits}f} (n={self.n})"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_interval(differences: Sequence[float | None], level: float = 0.95) -> Paired:
    """Mean and ``level`` t-interval (Student's t, ``n − 1`` degrees of freedom) of the non-None differences."""
    values = [float(d) for d in differences if d is not None and math.isfinite(float(d))]
    n = len(values)
    if n == 0:
        return Paired(0, None, None, None, None)
    mean = sum(values) / n
    if n < 2:
        return Paired(n, mean, None, None, None)
    stats = require("scipy.stats", "analysis", "the paired t-intervals")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half, sd)


def pair_by_seed(baseline: Sequence[RunSummary], treated: Sequence[RunSummary]) -> list[tuple[RunSummary, RunSummary]]:
    """``(baseline, treated)`` runs with the same seed, in seed order (seeds present in both)."""
    base = {r.seed: r for r in baseline}
    treat = {r.seed: r for r in treated}
    return [(base[s], treat[s]) for s in sorted(set(base) & set(treat))]


def _at(values: Sequence, i: int):
    return values[i] if i < len(values) else None


def _diff(a, b):
    return None if a is None or b is None else b - a


def paired_rows(pairs: Sequence[tuple[RunSummary, RunSummary]]) -> list[tuple[str, Paired]]:
    """The paired-difference table (treated − baseline): accuracy, replaced accuracy, noise curve, Pearson r,
    weak probe, test mass (clean / replaced), and AIR and mass at every training epoch."""
    rows: list[tuple[str, Paired]] = []

    def add(label: str, get) -> None:
        rows.append((label, paired_interval([_diff(get(a), get(b)) for a, b in pairs])))

    if not pairs:
        return rows
    first = pairs[0][0]
    add("accuracy, clean", lambda r: r.accuracy)
    add(f"accuracy, {first.dominant} replaced by noise", lambda r: r.accuracy_replaced)
    add(f"accuracy, {first.weak} replaced by noise", lambda r: r.accuracy_weak_replaced)
    for i, level in enumerate(first.noise_levels):
        if level > 0:
            add(f"accuracy, noise level {level:g} on {first.dominant}", lambda r, i=i: _at(r.noise_curve, i))
    add("Pearson r (quality vs attention)", lambda r: r.pearson)
    add(f"probe accuracy, {first.weak} (weak)", lambda r: r.probe_weak)
    add(f"attention mass on {first.dominant}, clean test", lambda r: r.mass_clean)
    add(f"attention mass on {first.dominant}, {first.dominant} replaced", lambda r: r.mass_replaced)
    epochs = max(len(r.air_epochs) for pair in pairs for r in pair)
    for e in range(epochs):
        add(f"AIR, epoch {e + 1}", lambda r, e=e: _at(r.air_epochs, e))
    for e in range(epochs):
        add(f"mass on {first.dominant}, epoch {e + 1}", lambda r, e=e: _at(r.mass_epochs, e))
    return rows


# ---------------------------------------------------------------------------- markdown
def _f(value, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def per_seed_table(runs: Sequence[RunSummary], checks: bool = False) -> list[str]:
    """One markdown row per run: accuracies, probes, mass clean -> replaced, Pearson r, AIR first -> last, rotations."""
    if not runs:
        return []
    r0 = runs[0]
    header = ["run", "seed", "acc", f"acc {r0.dominant}=noise", f"probe {r0.weak}", f"probe {r0.dominant}",
              f"mass {r0.dominant} clean -> noise", "Pearson r", "AIR ep 1 -> last", "rotations"]
    if checks:
        header.append("criteria mass/static/AIR/gap")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(runs, key=lambda x: (x.name, x.seed)):
        air = [a for a in r.air_epochs if a is not None]
        cells = [r.name, str(r.seed), _f(r.accuracy), _f(r.accuracy_replaced), _f(r.probe_weak), _f(r.probe_dominant),
                 f"{_f(r.mass_clean)} -> {_f(r.mass_replaced)}", _f(r.pearson),
                 f"{_f(air[0] if air else None, signed=True)} -> {_f(air[-1] if air else None, signed=True)}",
                 ",".join(str(e) for e in r.rotations) or "none"]
        if checks:
            cells.append("/".join({True: "yes", False: "NO", None: "n/a"}[v] for v in collapse_checks(r).values()))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired_table(pairs: Sequence[tuple[RunSummary, RunSummary]], baseline: str, treated: str) -> list[str]:
    """Markdown: mean per method and the paired difference with its 95 % t-interval, per quantity."""
    if not pairs:
        return []
    lines = [f"| quantity | {baseline} (mean) | {treated} (mean) | {treated} − {baseline}, mean [95 % CI] | n |",
             "|---|---|---|---|---|"]
    for label, stat in paired_rows(pairs):
        means = f"{_mean_of(pairs, label, 0)} | {_mean_of(pairs, label, 1)}"
        lines.append(f"| {label} | {means} | {stat.text()} | {stat.n} |")
    return lines


def _value(run: RunSummary, label: str):
    """The value behind a :func:`paired_rows` label (same definitions)."""
    if label == "accuracy, clean":
        return run.accuracy
    if label.startswith("accuracy, noise level"):
        level = float(label.split()[3])
        return _at(run.noise_curve, run.noise_levels.index(level)) if level in run.noise_levels else None
    if label.startswith("accuracy, ") and label.endswith("replaced by noise"):
        return run.accuracy_replaced if label == f"accuracy, {run.dominant} replaced by noise" \
            else run.accuracy_weak_replaced
    if label.startswith("Pearson"):
        return run.pearson
    if label.startswith("probe accuracy"):
        return run.probe_weak
    if label.endswith("clean test"):
        return run.mass_clean
    if label.startswith("attention mass") and label.endswith("replaced"):
        return run.mass_replaced
    if label.startswith("AIR, epoch"):
        return _at(run.air_epochs, int(label.split()[-1]) - 1)
    if label.startswith("mass on") and ", epoch" in label:
        return _at(run.mass_epochs, int(label.split()[-1]) - 1)
    return None


def _mean_of(pairs: Sequence[tuple[RunSummary, RunSummary]], label: str, side: int) -> str:
    values = [v for v in (_value(p[side], label) for p in pairs) if v is not None]
    return "n/a" if not values else f"{sum(values) / len(values):.3f}"
