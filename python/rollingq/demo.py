"""``rollingq demo``: vanilla MT vs vanilla MT + RollingQ on the synthetic default.

Trains both runs (configs ``synthetic`` and ``synthetic_rollingq``), evaluates
each best-on-validation checkpoint on the clean test split and with the easier
modality's input replaced by Gaussian noise (the paper's Table 3 protocol), and
returns a side-by-side table; then it runs the analyses
(:func:`rollingq.evaluate.evaluate_run`, :func:`rollingq.analysis.report.write_report`)
on both runs and returns the report's path.
"""

from __future__ import annotations

import logging
import os

import torch

from .config import load_config
from .data import build_dataset, make_loader
from .metrics import evaluate_model
from .records import read_metrics
from .train import load_run, train

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


def summarize_run(run_dir: str) -> dict:
    """Test metrics of a run's best checkpoint: clean, and with its strongest modality replaced by noise."""
    model, cfg = load_run(run_dir, "best")
    test = build_dataset(cfg, "test")
    loader = make_loader(test, cfg, train=False)
    device = next(model.parameters()).device
    num_classes = int(cfg["data"]["num_classes"])
    strongest = int(getattr(test, "strongest", 0))
    clean = evaluate_model(model, loader, device, num_classes)
    noisy = evaluate_model(model, loader, device, num_classes, noise_modality=strongest, seed=int(cfg["seed"]))
    history = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return {
        "run_dir": run_dir,
        "name": cfg["name"],
        "modalities": list(cfg["data"]["modalities"]),
        "strongest": cfg["data"]["modalities"][strongest],
        "clean": clean,
        "noisy": noisy,
        "air": [row["air"] for row in history],
        "rotations": sum(1 for row in history if row.get("rotated")),
        "train_mass": history[-1]["mass"],
    }


def format_table(summaries: list[dict]) -> str:
    """A plain-text side-by-side table of :func:`summarize_run` results."""
    mods = summaries[0]["modalities"]
    noisy_name = summaries[0]["strongest"]
    rows = [
        ("run", [s["name"] for s in summaries]),
        ("test accuracy (clean)", [f"{s['clean']['acc']:.4f}" for s in summaries]),
        ("test macro-F1 (clean)", [f"{s['clean']['macro_f1']:.4f}" for s in summaries]),
        (f"test accuracy ({noisy_name} = noise)", [f"{s['noisy']['acc']:.4f}" for s in summaries]),
        ("probe accuracy " + "/".join(mods), [_fmt(s["clean"]["probe_acc"], "{:.3f}") for s in summaries]),
        ("attention mass cls/" + "/".join(mods) + " (test)", [_fmt(s["clean"]["mass"]) for s in summaries]),
        (f"attention mass ({noisy_name} = noise)", [_fmt(s["noisy"]["mass"]) for s in summaries]),
        ("attention mass (last train epoch)", [_fmt(s["train_mass"]) for s in summaries]),
        ("rotations made", [str(s["rotations"]) for s in summaries]),
    ]
    for e in range(max(len(s["air"]) for s in summaries)):
        rows.append((f"AIR epoch {e + 1}", [_fmt([s["air"][e]], "{:+.3f}") if e < len(s["air"]) else "" for s in summaries]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[1][i]) for r in rows) for i in range(len(summaries))]
    lines = []
    for k, (label, cells) in enumerate(rows):
        lines.append(f"{label:<{width}} | " + " | ".join(f"{c:>{cols[i]}}" for i, c in enumerate(cells)))
        if k == 0:
            lines.append("-" * width + "-+-" + "-+-".join("-" * c for c in cols))
    return "\n".join(lines)


def _analyses(run_dirs: list[str], out: str, noise_modality: str) -> str:
    """Evaluate both runs (clean and with ``noise_modality`` corrupted) and write the report; return its path."""
    from .analysis.report import write_report
    from .evaluate import evaluate_run

    for run_dir in run_dirs:
        evaluate_run(run_dir, split="test", noise_modality=noise_modality)
    return write_report(run_dirs, os.path.join(out, "report"))


def run_demo(out: str = "runs/demo", epochs: int | None = None, overrides: list[str] | None = None) -> tuple[str, str]:
    """Train both demo runs under ``out``, evaluate them; return (the side-by-side table, the report path)."""
    os.makedirs(out, exist_ok=True)
    run_dirs = []
    extra = list(overrides or []) + ([f"train.epochs={int(epochs)}"] if epochs is not None else [])
    for name in DEMO_CONFIGS:
        cfg = load_config(name, extra)
        run_dir = _free_dir(os.path.join(out, cfg["name"].replace("+", "_")))
        logger.info("demo: training %s into %s", cfg["name"], run_dir)
        run_dirs.append(train(cfg, run_dir))
    threads = load_config(DEMO_CONFIGS[0], extra)["train"].get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    summaries = [summarize_run(r) for r in run_dirs]
    table = format_table(summaries)
    report = _analyses(run_dirs, out, summaries[0]["strongest"])
    return table, report
