#!/usr/bin/env python
"""The synthetic study: vanilla MT vs vanilla MT + RollingQ over several seeds, evaluated and reported.

Trains both variants on the packaged synthetic default (``rollingq/configs/synthetic.yaml`` and
``synthetic_rollingq.yaml``, the configs ``rollingq demo`` trains) for each seed — the seed changes
the generated data and the initialisation; nothing else changes per seed — then runs
``evaluate_run`` on every run and ``write_report`` over all of them. Every config is resolved
before the first run starts, so the study is one consistent setting.

    PYTHONPATH=python:. python scripts/synthetic_study.py \
        --runs runs/synthetic_study --out docs/figures/synthetic_study --seeds 0 1 2

Runs whose ``checkpoints/best.pt`` and full ``metrics.jsonl`` already exist are not retrained, so an
interrupted study continues where it stopped. ``--set key=value`` applies the same dotted override
to every run (the study's task knobs; recorded in each run's config.yaml).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from rollingq.analysis.report import write_report
from rollingq.analysis.runs import read_metrics
from rollingq.config import load_config
from rollingq.evaluate import evaluate_run, summarize
from rollingq.train import resume, train

logger = logging.getLogger("synthetic_study")

VARIANTS: dict[str, str] = {"vanilla_mt": "synthetic", "vanilla_mt+rollingq": "synthetic_rollingq"}
"""Run label -> packaged config."""


def _finished(run_dir: str, epochs: int) -> bool:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    best = os.path.join(run_dir, "checkpoints", "best.pt")
    return os.path.isfile(best) and os.path.isfile(metrics) and len(read_metrics(metrics)) >= epochs


def run_study(
    runs_root: str,
    out_dir: str | None,
    seeds: list[int],
    overrides: list[str],
    variants: list[str],
    noise_modality: str | None = "audio",
) -> str | None:
    """Train and evaluate every (variant, seed), then report (unless ``out_dir`` is None).

    ``noise_modality`` is the modality every run's evaluation corrupts (None: each run's own
    biased modality, which can differ between runs and makes their noise numbers incomparable).

    Returns:
        The report path, or None without a report.
    """
    plan = []
    for variant in variants:
        for seed in seeds:
            cfg = load_config(VARIANTS[variant], [*overrides, f"seed={seed}", "train.progress=false"])
            if cfg["name"] != variant:
                raise ValueError(f"config {VARIANTS[variant]!r} is named {cfg['name']!r}, expected {variant!r}")
            plan.append((cfg, os.path.join(runs_root, f"{variant}_seed{seed}")))
    run_dirs = []
    for cfg, run_dir in plan:
        epochs = int(cfg["train"]["epochs"])
        if _finished(run_dir, epochs):
            logger.info("%s already trained; reusing it", run_dir)
        else:
            start = time.time()
            if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")):
                resume(run_dir)
            else:
                train(cfg, run_dir, overwrite=True)  # no last.pt: at most a run cut short in epoch 1
            logger.info("trained %s in %.0f s", run_dir, time.time() - start)
        result = evaluate_run(run_dir, split="test", noise_modality=noise_modality, seed=0)
        logger.info("%s: %s", run_dir, json.dumps(summarize(result)))
        run_dirs.append(run_dir)
    return write_report(run_dirs, out_dir) if out_dir is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/synthetic_study", help="where the run directories go")
    parser.add_argument("--out", default="docs/figures/synthetic_study", help="where report.md and the figures go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which variants to run (e.g. one per process)")
    parser.add_argument("--no-report", action="store_true", help="train and evaluate only")
    parser.add_argument("--noise-modality", default="audio",
                        help="modality corrupted in every evaluation (default audio, the synthetic task's strong "
                        "modality); 'auto' lets each run pick its own biased modality")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                        help="dotted override applied to every run (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    noise_modality = None if args.noise_modality == "auto" else args.noise_modality
    out = None if args.no_report else args.out
    path = run_study(args.runs, out, args.seeds, args.overrides, args.variants, noise_modality)
    if path is not None:
        logger.info("report: %s", path)


if __name__ == "__main__":
    main()
