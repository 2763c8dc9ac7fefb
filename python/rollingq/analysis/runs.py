"""Reading run directories written by ``rollingq train`` (and ``rollingq eval``) for the report."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import yaml

logger = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """What the report needs from one run directory.

    Attributes:
        run_dir: the directory.
        name: the run label ``cfg["name"]`` (runs with one name form a group, e.g. several seeds).
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


def read_metrics(path: str) -> list[dict]:
    """Parse a ``metrics.jsonl`` file (blank lines skipped); raises ``ValueError`` naming the bad line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({exc})") from exc
    return records


def load_run_record(run_dir: str) -> RunRecord:
    """Read ``config.yaml``, ``metrics.jsonl`` and (if present) ``eval.json`` of a run directory."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{run_dir!r} is not a run directory: no config.yaml (expected one written by rollingq train)"
        )
    with open(cfg_path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    epochs = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    if not epochs:
        logger.warning("%s has no metrics.jsonl records; its training curves are left out", run_dir)
    eval_path = os.path.join(run_dir, "eval.json")
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
    """Runs grouped by name, groups in order of first appearance, runs within a group by seed."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.name, []).append(run)
    for members in groups.values():
        members.sort(key=lambda r: (r.seed is None, r.seed or 0))
    return groups
