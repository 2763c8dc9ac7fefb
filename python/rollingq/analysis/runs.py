"""Reading run directories written by ``rollingq train`` (and ``rollingq eval``) for the report."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import yaml

from ..records import CONFIG_FILENAME, EVAL_FILENAME, METRICS_FILENAME, read_metrics

__all__ = ["RunRecord", "group_runs", "load_run_record", "read_metrics"]

logger = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """What the report needs from one run directory.

    Attributes:
        run_dir: the directory.
        name: the run label ``cfg["name"]`` (runs with one dataset and one name form a group, e.g. several seeds).
        seed: ``cfg["seed"]`` (None if absent).
        cfg: the resolved config.
        epochs: the ``metrics.jsonl`` records, one dict per epoch, in order.
        eval: the ``eval.json`` record, or None when the run was not evaluated.
    """

    run_dir: str
    name: str
    seed: int | None
    cfg: dict
    epochs: list[dict] = field(default_factory=list)
    eval: dict | None = None

    @property
    def label(self) -> str:
        """``name (seed s)``, or ``name (dir)`` when the seed is unknown."""
        if self.seed is not None:
            return f"{self.name} (seed {self.seed})"
        return f"{self.name} ({os.path.basename(os.path.normpath(self.run_dir))})"

    @property
    def dataset(self) -> str:
        """``cfg["data"]["name"]`` (empty when the config has none)."""
        return str((self.cfg.get("data") or {}).get("name") or "")

    @property
    def modalities(self) -> list[str]:
        mods = (self.cfg.get("data") or {}).get("modalities")
        if mods:
            return list(mods)
        if self.eval and self.eval.get("modalities"):
            return list(self.eval["modalities"])
        return []

    @property
    def rotation_epochs(self) -> list[int]:
        """Epochs (1-based) at whose end the query was rotated."""
        return [int(e["epoch"]) for e in self.epochs if e.get("rotated")]


def load_run_record(run_dir: str) -> RunRecord:
    """Read ``config.yaml``, ``metrics.jsonl`` and (if present) ``eval.json`` (the test split) of a run directory."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    cfg_path = os.path.join(run_dir, CONFIG_FILENAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{run_dir!r} is not a run directory: no config.yaml (expected one written by rollingq train)"
        )
    with open(cfg_path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    metrics_path = os.path.join(run_dir, METRICS_FILENAME)
    epochs = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    if not epochs:
        logger.warning("%s has no metrics.jsonl records; its training curves are left out", run_dir)
    eval_path = os.path.join(run_dir, EVAL_FILENAME)  # the test split's evaluation
    evaluation = None
    if os.path.isfile(eval_path):
        with open(eval_path, encoding="utf-8") as f:
            evaluation = json.load(f)
    else:
        logger.warning(
            "%s has no eval.json (run `rollingq eval --run %s`); its evaluation is left out", run_dir, run_dir
        )
    seed = cfg.get("seed")
    return RunRecord(
        run_dir=run_dir,
        name=str(cfg.get("name") or os.path.basename(os.path.normpath(run_dir))),
        seed=None if seed is None else int(seed),
        cfg=cfg,
        epochs=epochs,
        eval=evaluation,
    )


def group_runs(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by (dataset, name): every dataset's vanilla MT config is named ``vanilla_mt``.

    A group's key is its ``name`` when all runs share one dataset, else ``dataset/name``. Groups come in
    order of first appearance, runs within a group sorted by seed; a seed that occurs twice in one group
    is logged as a warning (its mean ± std would count one seed twice).
    """
    by_key: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        by_key.setdefault((run.dataset, run.name), []).append(run)
    several_datasets = len({dataset for dataset, _ in by_key}) > 1
    groups: dict[str, list[RunRecord]] = {}
    for (dataset, name), members in by_key.items():
        members.sort(key=lambda r: (r.seed is None, r.seed or 0))
        label = f"{dataset}/{name}" if several_datasets else name
        seeds = [r.seed for r in members if r.seed is not None]
        for seed in sorted({s for s in seeds if seeds.count(s) > 1}):
            logger.warning(
                "group %s has seed %d more than once (%s); its cells count that seed twice", label, seed,
                ", ".join(r.run_dir for r in members if r.seed == seed),
            )
        groups[label] = members
    return groups
