"""CMU-MOSEI features in the MultiBench pickle layout (``train`` / ``valid`` / ``test``).

Each split is a dict with ``vision`` ``(N, L, 35)``, ``audio`` ``(N, L, 74)``,
``text`` ``(N, L, 300)`` and ``labels`` (sentiment in [-3, 3], any shape with N
entries). Non-finite feature values (MultiBench's ``-inf`` padding) become 0.
``data.task``: ``binary`` (sentiment >= 0 is class 1; ``num_classes: 2``) or
``7class`` (round(clip(sentiment, -3, 3)) + 3; ``num_classes: 7``).

Security: a pickle runs code when loaded. It is trusted input only: the file
must lie inside ``data.root`` (symlinks resolved), must not be writable by
other users, and anything else needs ``data.trust_pickle: true``.
"""

from __future__ import annotations

import logging
import os
import pickle
import stat
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..inputs import InputSpec
from ..schema import Section, option
from .common import DataError, Sample, check_split

logger = logging.getLogger("rollingq.data")

SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}
TASKS = {"binary": 2, "7class": 7}
FEATURES = {"vision": 35, "audio": 74, "text": 300}
_CACHE: dict[str, dict] = {}


@dataclass
class MoseiOptions(Section):
    """The ``data.*`` keys of CMU-MOSEI.

    Attributes:
        task: ``binary`` (sentiment >= 0) or ``7class``.
        seq_len: the features' sequence length.
        path, file: the pickle (default ``data.root/file``).
        trust_pickle: load a pickle outside ``data.root`` or writable by others.
    """

    task: str = option("binary", choices=tuple(TASKS))
    seq_len: int = option(50, ge=1)
    path: str | None = None
    file: str = "mosei_senti_data.pkl"
    trust_pickle: bool = False


def input_specs(modalities: list[str], options: MoseiOptions) -> list[InputSpec]:
    """``(seq_len, F_m)`` features per modality (vision 35, audio 74, text 300)."""
    specs = []
    for m in modalities:
        if m not in FEATURES:
            raise ValueError(f"data.modalities: MOSEI has {sorted(FEATURES)}, got {m!r}")
        specs.append(InputSpec("features", (options.seq_len, FEATURES[m])))
    return specs


def check_pickle_location(path: str, root: str, trusted: bool) -> None:
    """Refuse a pickle outside ``root`` or writable by others unless ``trusted``."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    problems = []
    if os.path.commonpath([real, real_root]) != real_root:
        problems.append(f"it lies outside data.root {real_root!r}")
    if os.path.exists(real) and os.stat(real).st_mode & (stat.S_IWOTH | stat.S_IWGRP):
        problems.append("it is writable by other users")
    if problems and not trusted:
        raise DataError(
            f"refusing to load the pickle {path!r}: {' and '.join(problems)}. Loading a pickle runs code; "
            "move it into data.root or, if you trust it, set data.trust_pickle=true"
        )


def load_mosei_pickle(path: str) -> dict:
    """The pickle's content (cached per path)."""
    if path not in _CACHE:
        if not os.path.isfile(path):
            raise DataError(f"MOSEI pickle {path!r} does not exist")
        try:
            with open(path, "rb") as f:
                _CACHE[path] = pickle.load(f)  # noqa: S301 - trusted input, location checked above
        except Exception as exc:
            raise DataError(f"cannot read the MOSEI pickle {path!r}: {type(exc).__name__}: {exc}") from exc
    return _CACHE[path]


def sentiment_to_class(scores: np.ndarray, task: str) -> np.ndarray:
    """Class ids from sentiment scores: binary (>= 0) or 7 classes (rounded, clipped to [-3, 3], shifted)."""
    if task == "binary":
        return (scores >= 0).astype(np.int64)
    return (np.round(np.clip(scores, -3.0, 3.0)) + 3).astype(np.int64)


class MoseiDataset(Dataset):
    """MOSEI; samples ``([features (L, F_m) per modality], label, index)``, float32 features.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (the pickle's ``train``, ``valid``, ``test``).
        root: the folder holding the pickle.
        modalities: a selection of ``vision``, ``audio``, ``text``, in the model's order.
        num_classes: 2 for ``task="binary"``, 7 for ``"7class"``.
        task: ``"binary"`` or ``"7class"``.
        seq_len: the features' sequence length ``L``.
        path: the pickle (default ``root/file``).
        file: the pickle's name under ``root``.
        trust_pickle: load a pickle outside ``root`` or writable by others.
    """

    def __init__(self, split: str, *, root: str | None, modalities: list[str], num_classes: int, task: str,
                 seq_len: int, path: str | None, file: str, trust_pickle: bool) -> None:
        check_split(split)
        if not root:
            raise ValueError(f"data.root: expected the MOSEI folder, got {root!r}")
        if task not in TASKS:
            raise ValueError(f"data.task: expected one of {sorted(TASKS)}, got {task!r}")
        if int(num_classes) != TASKS[task]:
            raise ValueError(f"data.num_classes: task {task!r} has {TASKS[task]} classes, got {num_classes}")
        path = path or os.path.join(root, file)
        check_pickle_location(path, root, trust_pickle)
        content = load_mosei_pickle(path)
        key = SPLIT_KEYS[split]
        if not isinstance(content, dict) or key not in content:
            raise DataError(f"MOSEI pickle {path!r}: expected a dict with a {key!r} split")
        part = content[key]
        self.features = []
        for m in modalities:
            if m not in part:
                raise DataError(f"MOSEI pickle {path!r}: split {key!r} has no {m!r} features (has {sorted(part)})")
            arr = np.asarray(part[m], dtype=np.float32)
            if arr.ndim != 3 or arr.shape[1] != seq_len:
                raise DataError(f"MOSEI pickle {path!r}: {key}/{m} has shape {arr.shape}, expected (N, {seq_len}, F)")
            bad = int((~np.isfinite(arr)).sum())
            if bad:
                logger.info("MOSEI %s/%s: %d non-finite values set to 0", key, m, bad)
            self.features.append(torch.from_numpy(np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)))
        scores = np.asarray(part["labels"], dtype=np.float64).reshape(len(self.features[0]), -1)[:, 0]
        if not np.isfinite(scores).all():
            raise DataError(f"MOSEI pickle {path!r}: {key}/labels holds non-finite sentiment scores")
        self.labels = torch.from_numpy(sentiment_to_class(scores, task))
        self.scores = torch.from_numpy(scores)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> Sample:
        return [f[index] for f in self.features], int(self.labels[index]), int(index)
