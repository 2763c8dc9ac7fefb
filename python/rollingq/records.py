"""The run folder: its file names, JSON-ready values and the ``metrics.jsonl`` file.

A run folder written by ``rollingq train`` (and ``rollingq eval``) holds::

    config.yaml               CONFIG_FILENAME: the resolved config
    metrics.jsonl             METRICS_FILENAME: one JSON object per epoch
    train.log                 LOG_FILENAME
    tensorboard/              TENSORBOARD_DIR
    checkpoints/{best,last,previous}.pt   checkpoint_path(run_dir, name)
    eval.json                 EVAL_FILENAME: the test split's evaluation (eval_<split>.json otherwise)
    manifest.txt              MANIFEST_FILENAME: every path above that rollingq wrote (record_written)
    run.lock                  while a process runs in the folder (rollingq.runlock)

``--overwrite`` removes exactly the paths of ``manifest.txt`` (any other file in the folder is the
user's and stays); a folder written before the manifest existed falls back to the fixed names above.

JSON has no NaN or infinity: :func:`jsonable` writes a non-finite float as the string ``"nan"``,
``"inf"`` or ``"-inf"`` (never ``null``, which means "not applicable" here), and :func:`read_metrics`
reads those strings back as floats.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from .files import TEMPORARY, append_bytes, atomic_write_bytes

CONFIG_FILENAME = "config.yaml"
METRICS_FILENAME = "metrics.jsonl"
LOG_FILENAME = "train.log"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAMES = ("best", "last", "previous")
"""``best``: best validation accuracy; ``last``: end of the last finished epoch; ``previous``: the one before."""
EVAL_FILENAME = "eval.json"
"""The test split's evaluation; any other split ``s`` goes to ``eval_<s>.json`` (:func:`eval_filename`)."""
EVAL_SPLITS = ("train", "val", "test")
MANIFEST_FILENAME = "manifest.txt"
"""The paths (relative to the run folder, one per line) that rollingq wrote there: what ``--overwrite`` removes."""


NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
"""How :func:`jsonable` writes non-finite floats, and what :func:`read_metrics` reads back."""


def _is_run_file(name: str) -> bool:
    match = TEMPORARY.match(name)
    name = match["target"] if match else name
    return name in (CONFIG_FILENAME, METRICS_FILENAME, LOG_FILENAME, TENSORBOARD_DIR, MANIFEST_FILENAME) or (
        name in {eval_filename(split) for split in EVAL_SPLITS})


def run_files(run_dir: str) -> list[str]:
    """The files and folders of a run that exist in ``run_dir``: config, metrics, log, TensorBoard,
    evaluations, checkpoints, the manifest, and the temporaries of their atomic writes, by their fixed
    names. Other files are not a run's."""
    found = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        if _is_run_file(name):
            found.append(os.path.join(run_dir, name))
    checkpoints = os.path.join(run_dir, CHECKPOINT_DIR)
    if os.path.isdir(checkpoints):
        for name in sorted(os.listdir(checkpoints)):
            match = TEMPORARY.match(name)
            if (match["target"] if match else name) in {f"{c}.pt" for c in CHECKPOINT_NAMES}:
                found.append(os.path.join(checkpoints, name))
    return found


def _plain_relative(entry: str) -> bool:
    """A path inside the run folder: relative, without ``..``, ``.`` or empty parts."""
    parts = entry.split("/")
    return bool(entry) and not os.path.isabs(entry) and "\\" not in entry and all(
        p not in ("", ".", "..") for p in parts)


def record_written(run_dir: str, entries: list[str]) -> None:
    """Add ``entries`` (paths relative to ``run_dir``, ``/``-separated) to ``manifest.txt`` before they are
    written (write-ahead: a crash never leaves a file of ours unrecorded). Appends one line per new entry
    (``O_APPEND``: a concurrent ``rollingq eval`` adds its lines whole)."""
    for entry in entries:
        if not _plain_relative(entry):
            raise ValueError(f"manifest entry: expected a relative path inside the run folder, got {entry!r}")
    known = set(recorded_files(run_dir))
    new = [e for e in dict.fromkeys(entries) if e not in known]
    if not new:
        return
    append_bytes("".join(e + "\n" for e in new).encode("utf-8"), os.path.join(run_dir, MANIFEST_FILENAME))


def recorded_files(run_dir: str) -> list[str]:
    """The entries of ``manifest.txt`` (relative paths, in order, each once); ``[]`` without a manifest.
    Lines that are not a plain relative path inside the folder are ignored (a manifest never removes
    anything outside its run folder)."""
    path = os.path.join(run_dir, MANIFEST_FILENAME)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.rstrip("\n") for line in f]
    return list(dict.fromkeys(line for line in lines if _plain_relative(line)))


def checkpoint_path(run_dir: str, name: str) -> str:
    """``RUN_DIR/checkpoints/<name>.pt`` for ``name`` in :data:`CHECKPOINT_NAMES`."""
    if name not in CHECKPOINT_NAMES:
        raise ValueError(f"checkpoint: expected one of {CHECKPOINT_NAMES}, got {name!r}")
    return os.path.join(run_dir, CHECKPOINT_DIR, f"{name}.pt")


def eval_filename(split: str) -> str:
    """``eval.json`` for the test split (the one the report reads), ``eval_<split>.json`` otherwise."""
    return EVAL_FILENAME if split == "test" else f"eval_{split}.json"


def jsonable(value: Any) -> Any:
    """Recursively convert tensors, tuples, dataclass-like records and NaN/inf floats into JSON values."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return jsonable(value.to_dict())
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if hasattr(value, "_asdict"):
        return jsonable(value._asdict())
    if hasattr(value, "__dict__"):
        return jsonable(vars(value))
    return str(value)


def write_metrics(path: str, history: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` (one JSON object per epoch) atomically from ``history``."""
    text = "".join(json.dumps(jsonable(row)) + "\n" for row in history)
    atomic_write_bytes(text.encode("utf-8"), path)


def restore_non_finite(value: Any) -> Any:
    """Inverse of :func:`jsonable` for non-finite floats: ``"nan"``, ``"inf"``, ``"-inf"`` become floats."""
    if isinstance(value, str):
        return NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: restore_non_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_non_finite(v) for v in value]
    return value


def read_metrics(path: str) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (blank lines skipped; ``"nan"``, ``"inf"``, ``"-inf"`` read as
    floats); raises ``ValueError`` naming a bad line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(restore_non_finite(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({exc})") from exc
    return records
