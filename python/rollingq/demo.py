"""``rollingq demo``: vanilla MT vs vanilla MT + RollingQ on the synthetic default.

Trains both runs (configs ``synthetic`` and ``synthetic_rollingq``), evaluates
each best-on-validation checkpoint once with :func:`rollingq.evaluate.evaluate_run`
(clean test split, and the easier modality's input replaced by Gaussian noise of
each sample's own mean and std: the paper's Figure 1c protocol; the additive-noise
curve of Table 3 is in ``eval.json`` too), returns a side-by-side table read from
those ``eval.json`` results, and writes the report
(:func:`rollingq.analysis.report.write_report`) on both runs.
"""

from __future__ import annotations

import logging
import os

import torch

from .analysis.report import write_report
from .build import build_dataset
from .config import load_config
from .evaluate import evaluate_run
from .records import read_metrics
from .train import train

logger = logging.getLogger("rollingq.demo")

DEMO_CONFIGS = ("synthetic", "synthetic_rollingq")


def _free_dir(path: str) -> str:
    """``path``, or ``path_2``, ``path_3``, … if it already exists."""
    candidate, k = path, 2
    while os.path.exists(candidate):
        candidate, k = f"{path}_{k}", k + 1
    return candidate


def _fmt(values, fmt: str = "{:.2f}") -> str:
    if values is None:
        return "n/a"
    return " ".join("n/a" if v is None else fmt.format(v) for v in values)


def summarize_run(run_dir: str, noise_modality: str) -> dict:
    """Evaluate a run's best checkpoint on the test split with :func:`rollingq.evaluate.evaluate_run`
    (writes ``eval.json``; ``noise_modality``'s input replaced by noise of each sample's own statistics,
    the paper's Figure 1c protocol) and gather what the demo table shows."""
    result = evaluate_run(run_dir, split="test", noise_modality=noise_modality)
    history = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    modalities = list(result["modalities"])
    attention = result.get("attention") or {}

    def masses(key: str) -> list[float] | None:
        node = attention.get(key)
        return None if node is None else [node[k] for k in ("class", *modalities)]

    probes = result.get("probe_accuracy")
    return {
        "run_dir": run_dir,
        "name": result["name"],
        "modalities": modalities,
        "noise_modality": result["noise_modality"],
        "accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "accuracy_noise_replaced": result["accuracy_noise_replaced"],
        "probe_acc": None if probes is None else [probes[m] for m in modalities],
        "mass": masses("clean"),
        "mass_noise_replaced": masses("noise_replaced"),
        "air": [row["air"] for row in history],
        "rotations": sum(1 for row in history if row.get("rotated")),
        "train_mass": history[-1]["mass"],
    }


def format_table(summaries: list[dict]) -> str:
    """A plain-text side-by-side table of :func:`summarize_run` results."""
    mods = summaries[0]["modalities"]
    noisy_name = summaries[0]["noise_modality"]
    rows = [
        ("run", [s["name"] for s in summaries]),
        ("test accuracy (clean)", [f"{s['accuracy']:.4f}" for s in summaries]),
        ("test macro-F1 (clean)", [f"{s['macro_f1']:.4f}" for s in summaries]),
        (f"test accuracy ({noisy_name} = noise)", [f"{s['accuracy_noise_replaced']:.4f}" for s in summaries]),
        ("probe accuracy " + "/".join(mods), [_fmt(s["probe_acc"], "{:.3f}") for s in summaries]),
        ("attention mass cls/" + "/".join(mods) + " (test)", [_fmt(s["mass"]) for s in summaries]),
        (f"attention mass ({noisy_name} = noise)", [_fmt(s["mass_noise_replaced"]) for s in summaries]),
        ("attention mass (last train epoch)", [_fmt(s["train_mass"]) for s in summaries]),
        ("rotations made", [str(s["rotations"]) for s in summaries]),
    ]
    for e in range(max(len(s["air"]) for s in summaries)):
        cells = [_fmt([s["air"][e]], "{:+.3f}") if e < len(s["air"]) else "" for s in summaries]
        rows.append((f"AIR epoch {e + 1}", cells))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[1][i]) for r in rows) for i in range(len(summaries))]
    lines = []
    for k, (label, cells) in enumerate(rows):
        lines.append(f"{label:<{width}} | " + " | ".join(f"{c:>{cols[i]}}" for i, c in enumerate(cells)))
        if k == 0:
            lines.append("-" * width + "-+-" + "-+-".join("-" * c for c in cols))
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", epochs: int | None = None, overrides: list[str] | None = None) -> tuple[str, str]:
    """Train both demo runs under ``out``, evaluate them; return (the side-by-side table, the report path)."""
    extra = list(overrides or []) + ([f"train.epochs={int(epochs)}"] if epochs is not None else [])
    configs = [load_config(name, extra) for name in DEMO_CONFIGS]  # every config valid before a folder is made
    os.makedirs(out, exist_ok=True)
    run_dirs = []
    for cfg in configs:
        run_dir = _free_dir(os.path.join(out, cfg.name.replace("+", "_")))
        logger.info("demo: training %s into %s", cfg.name, run_dir)
        run_dirs.append(train(cfg, run_dir))
    cfg = configs[0]
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    strongest = cfg.data.modalities[int(getattr(build_dataset(cfg, "test"), "strongest", 0))]
    summaries = [summarize_run(r, strongest) for r in run_dirs]
    return format_table(summaries), write_report(run_dirs, os.path.join(out, "report"))
