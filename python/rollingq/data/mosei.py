"""CMU-MOSEI features in the MultiBench layout (``train`` / ``valid`` / ``test``).

Each split holds ``vision`` ``(N, L, 35)``, ``audio`` ``(N, L, 74)``, ``text``
``(N, L, 300)`` and ``labels`` (sentiment in [-3, 3], any shape with N entries).
Non-finite feature values (MultiBench's ``-inf`` padding) become 0.
``data.task``: ``binary`` (sentiment >= 0 is class 1; ``num_classes: 2``) or
``7class`` (round(clip(sentiment, -3, 3)) + 3; ``num_classes: 7``).

Files. MultiBench ships a pickle (``mosei_senti_data.pkl``), and loading a
pickle runs code. The loader reads by default ``data.root/mosei_senti_data.npz``,
the same arrays in NumPy's ``.npz`` format (read with ``allow_pickle=False``: no
code runs), which ``rollingq prepare mosei --trust PICKLE OUT`` writes once from
the pickle (:mod:`rollingq.prepare.mosei`). A pickle is read only with
``data.allow_pickle: true``, and only if :func:`check_pickle_safety` passes (or
``data.trust_pickle: true`` skips it):

* the file lies inside ``data.root`` (symlinks resolved);
* the file is owned by the current user or root and is not writable by group or others;
* every folder on its path, as given and with symlinks resolved, from ``/`` down,
  is owned by the current user or root and is not writable by group or others
  unless it is sticky (as ``/tmp``: others cannot replace entries they do not own).

The checks read the opened file's own status (``fstat``), so the file that was
checked is the file that is read.
"""

from __future__ import annotations

import logging
import os
import pickle
import stat
from collections.abc import Iterable
from typing import IO, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from ..inputs import InputSpec
from ..schema import Section
from .common import DataError, Sample, check_split

logger = logging.getLogger("rollingq.data")

SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}
TASKS = {"binary": 2, "7class": 7}
FEATURES = {"vision": 35, "audio": 74, "text": 300}
PICKLE_NAME = "mosei_senti_data.pkl"
NPZ_NAME = "mosei_senti_data.npz"
_CACHE: dict[str, dict] = {}


class MoseiOptions(Section):
    """The ``data.*`` keys of CMU-MOSEI.

    Attributes:
        task: ``binary`` (sentiment >= 0) or ``7class``.
        seq_len: the features' sequence length.
        path, file: the data file (default ``data.root/file``): an ``.npz`` written by
            ``rollingq prepare mosei``, or with ``allow_pickle`` the MultiBench pickle.
        allow_pickle: read a pickle (it runs code when loaded), if its location and ownership pass the checks.
        trust_pickle: with ``allow_pickle``, skip those checks (a pickle outside ``data.root``, or writable
            by others).
    """

    task: Literal[tuple(TASKS)] = "binary"
    seq_len: int = Field(50, ge=1)
    path: str | None = None
    file: str = NPZ_NAME
    allow_pickle: bool = False
    trust_pickle: bool = False


def input_specs(modalities: list[str], options: MoseiOptions) -> list[InputSpec]:
    """``(seq_len, F_m)`` features per modality (vision 35, audio 74, text 300)."""
    specs = []
    for m in modalities:
        if m not in FEATURES:
            raise ValueError(f"data.modalities: MOSEI has {sorted(FEATURES)}, got {m!r}")
        specs.append(InputSpec("features", (options.seq_len, FEATURES[m])))
    return specs


# ---------------------------------------------------------------- pickle safety
def _folders(path: str) -> Iterable[str]:
    """The folders from ``/`` down to the one holding ``path`` (absolute, ``..`` resolved, links kept)."""
    folder = os.path.dirname(os.path.abspath(path))
    chain = []
    while True:
        chain.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return reversed(chain)


def _owner_ok(uid: int) -> bool:
    return uid in (0, os.geteuid())


def ownership_problems(path: str, status: os.stat_result | None = None) -> list[str]:
    """What makes ``path`` unsafe to unpickle: its owner and mode, and those of every folder above it
    (as given and with symlinks resolved). ``status``: the file's ``fstat``, if it is already open."""
    problems = []
    st = status if status is not None else os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        problems.append(f"{path!r} is not a regular file")
    if not _owner_ok(st.st_uid):
        problems.append(f"{path!r} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}) or root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"{path!r} is writable by group or others (mode {stat.filemode(st.st_mode)})")
    seen = set()
    for folder in [*_folders(path), *_folders(os.path.realpath(path))]:
        if folder in seen:
            continue
        seen.add(folder)
        try:
            fst = os.stat(folder)
        except OSError as exc:
            problems.append(f"folder {folder!r} cannot be checked ({exc})")
            continue
        if not _owner_ok(fst.st_uid):
            problems.append(f"folder {folder!r} is owned by uid {fst.st_uid}, not by you or root")
        if fst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not fst.st_mode & stat.S_ISVTX:
            problems.append(f"folder {folder!r} is writable by group or others and not sticky "
                            f"(mode {stat.filemode(fst.st_mode)}): another user can replace the file")
    return problems


def check_pickle_safety(path: str, root: str | None, trusted: bool, status: os.stat_result | None = None) -> None:
    """Refuse a pickle outside ``root`` (when given) or with an unsafe owner or mode (see the module
    docstring), unless ``trusted``.

    Raises:
        DataError: naming every problem found.
    """
    if trusted:
        return
    problems = []
    if root is not None:
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            problems.append(f"it lies outside data.root {real_root!r}")
    problems += ownership_problems(path, status)
    if problems:
        raise DataError(
            f"refusing to load the pickle {path!r}: {'; '.join(problems)}. Loading a pickle runs code; fix the "
            "ownership and permissions or move it into data.root, or, if you trust it, set data.trust_pickle=true"
        )


def read_pickle(path: str, root: str | None, trusted: bool) -> Any:
    """Unpickle ``path`` after :func:`check_pickle_safety` on the opened file (what is checked is what is read)."""
    try:
        f: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DataError(f"cannot open the MOSEI pickle {path!r}: {exc}") from exc
    with f:
        check_pickle_safety(path, root, trusted, os.fstat(f.fileno()))
        try:
            return pickle.load(f)  # noqa: S301 - checked above; an explicit opt-in (data.allow_pickle)
        except Exception as exc:
            raise DataError(f"cannot read the MOSEI pickle {path!r}: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- arrays
def as_array(value: Any, path: str, where: str) -> np.ndarray:
    """``value`` as a numeric array; a ragged sequence is a DataError naming the first odd sample."""
    arr = np.asarray(value) if not isinstance(value, (list, tuple)) else None
    if arr is not None and arr.dtype != object:
        return arr
    items = list(value)
    shapes = [np.shape(item) for item in items]
    for index, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise DataError(f"{path}: {where}: sample {index} has shape {shape}, but sample 0 has {shapes[0]} "
                            "(the samples of a modality must have one shape)")
    try:
        return np.stack([np.asarray(item) for item in items]) if items else np.zeros((0,))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {where}: not a numeric array ({exc})") from exc


def npz_arrays(content: Any, path: str) -> dict[str, np.ndarray]:
    """The MultiBench content (``{split: {key: array}}``) as flat ``{"split/key": array}`` for an ``.npz``.

    Numeric arrays are kept as they are; an ``id`` entry of strings becomes a unicode array; anything
    else that is not numeric is a DataError naming it.
    """
    if not isinstance(content, dict) or not all(k in content for k in SPLIT_KEYS.values()):
        raise DataError(f"{path}: expected a dict with the splits {sorted(SPLIT_KEYS.values())}, got "
                        f"{sorted(content) if isinstance(content, dict) else type(content).__name__}")
    out = {}
    for split in SPLIT_KEYS.values():
        part = content[split]
        if not isinstance(part, dict):
            raise DataError(f"{path}: split {split!r} is a {type(part).__name__}, expected a dict of arrays")
        for key, value in part.items():
            if key == "id":
                try:
                    out[f"{split}/id"] = np.asarray([x.decode() if isinstance(x, bytes) else str(x)
                                                     for x in np.asarray(value, dtype=object).reshape(-1)])
                except Exception as exc:  # the ids are informative only
                    logger.warning("%s: %s/id skipped (%s)", path, split, exc)
                continue
            arr = as_array(value, path, f"{split}/{key}")
            if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
                raise DataError(f"{path}: {split}/{key} has dtype {arr.dtype}, expected numbers")
            out[f"{split}/{key}"] = arr
    return out


def _split_dict(flat: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    nested: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in flat.items():
        split, _, key = name.partition("/")
        nested.setdefault(split, {})[key] = arr
    return nested


def load_mosei(path: str, root: str, allow_pickle: bool, trust_pickle: bool) -> dict:
    """``{split: {key: array}}`` of the MOSEI file at ``path`` (cached): an ``.npz`` (no code runs),
    or a pickle when ``allow_pickle`` (checked by :func:`check_pickle_safety` unless ``trust_pickle``)."""
    if os.path.isfile(path):
        st = os.stat(path)
        # a rewritten file is read again; a pickle's checks depend on the root and the flags
        key = f"{os.path.realpath(path)}:{st.st_mtime_ns}:{st.st_size}:{root}:{allow_pickle}:{trust_pickle}"
        if key in _CACHE:
            return _CACHE[key]
    else:
        pickled = os.path.join(root, PICKLE_NAME)
        hint = (f"; MultiBench's pickle {pickled!r} is there: convert it once with "
                f"`rollingq prepare mosei --trust {pickled} {root}`" if os.path.isfile(pickled) else "")
        raise DataError(f"MOSEI file {path!r} does not exist{hint}")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                content = _split_dict({name: npz[name] for name in npz.files})
        except Exception as exc:
            raise DataError(f"cannot read the MOSEI file {path!r} as an .npz without pickles: "
                            f"{type(exc).__name__}: {exc}") from exc
    else:
        if not allow_pickle:
            npz = os.path.join(root, NPZ_NAME)
            raise DataError(
                f"MOSEI file {path!r} is not an .npz: a pickle runs code when it is loaded. Convert it once with "
                f"`rollingq prepare mosei --trust {path} {root}` (writes {npz!r}, the default data.file), or, "
                "if you must, set data.allow_pickle=true"
            )
        content = read_pickle(path, root, trust_pickle)
        content = _split_dict(npz_arrays(content, path))
    _CACHE[key] = content
    return content


def sentiment_to_class(scores: np.ndarray, task: str) -> np.ndarray:
    """Class ids from sentiment scores: binary (>= 0) or 7 classes (rounded, clipped to [-3, 3], shifted)."""
    if task == "binary":
        return (scores >= 0).astype(np.int64)
    return (np.round(np.clip(scores, -3.0, 3.0)) + 3).astype(np.int64)


def check_sample_counts(counts: dict[str, int], path: str, split: str) -> None:
    """Every modality and the labels hold the same number of samples; else a DataError naming the file,
    the split, the counts and the first sample that some modality lacks."""
    if len(set(counts.values())) > 1:
        short = min(counts.values())
        lacking = [name for name, n in counts.items() if n == short]
        listed = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise DataError(f"MOSEI file {path!r}: split {split!r} has modalities of unequal length ({listed}): "
                        f"sample {short} has no {' and '.join(lacking)}")


class MoseiDataset(Dataset):
    """MOSEI; samples ``([features (L, F_m) per modality], label, index)``, float32 features.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (the file's ``train``, ``valid``, ``test``).
        root: the folder holding the file.
        modalities: a selection of ``vision``, ``audio``, ``text``, in the model's order.
        num_classes: 2 for ``task="binary"``, 7 for ``"7class"``.
        task: ``"binary"`` or ``"7class"``.
        seq_len: the features' sequence length ``L``.
        path: the file (default ``root/file``).
        file: the file's name under ``root``: an ``.npz`` (default), or a pickle with ``allow_pickle``.
        allow_pickle: read a pickle (runs code) after the safety checks.
        trust_pickle: skip those checks.
    """

    def __init__(self, split: str, *, root: str | None, modalities: list[str], num_classes: int, task: str,
                 seq_len: int, path: str | None, file: str, allow_pickle: bool = False,
                 trust_pickle: bool = False) -> None:
        check_split(split)
        if not root:
            raise ValueError(f"data.root: expected the MOSEI folder, got {root!r}")
        if task not in TASKS:
            raise ValueError(f"data.task: expected one of {sorted(TASKS)}, got {task!r}")
        if int(num_classes) != TASKS[task]:
            raise ValueError(f"data.num_classes: task {task!r} has {TASKS[task]} classes, got {num_classes}")
        path = path or os.path.join(root, file)
        content = load_mosei(path, root, allow_pickle, trust_pickle)
        key = SPLIT_KEYS[split]
        if key not in content:
            raise DataError(f"MOSEI file {path!r}: expected a {key!r} split, found {sorted(content)}")
        part = content[key]
        if "labels" not in part:
            raise DataError(f"MOSEI file {path!r}: split {key!r} has no 'labels' (has {sorted(part)})")
        arrays = []
        for m in modalities:
            if m not in part:
                raise DataError(f"MOSEI file {path!r}: split {key!r} has no {m!r} features (has {sorted(part)})")
            arr = as_array(part[m], path, f"{key}/{m}")
            if arr.ndim != 3 or arr.shape[1] != seq_len:
                raise DataError(f"MOSEI file {path!r}: {key}/{m} has shape {arr.shape}, expected (N, {seq_len}, F) "
                                "(data.seq_len)")
            if arr.shape[2] != FEATURES[m]:
                raise DataError(f"MOSEI file {path!r}: {key}/{m} has {arr.shape[2]} features per step, expected "
                                f"{FEATURES[m]} (MultiBench's {m} features)")
            arrays.append(arr)
        labels = np.asarray(part["labels"], dtype=np.float64)
        check_sample_counts({**{m: len(a) for m, a in zip(modalities, arrays)}, "labels": len(labels)}, path, key)
        self.features = []
        for m, arr in zip(modalities, arrays):
            arr = arr.astype(np.float32)
            bad = int((~np.isfinite(arr)).sum())
            if bad:
                logger.info("MOSEI %s/%s: %d non-finite values set to 0", key, m, bad)
            self.features.append(torch.from_numpy(np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)))
        scores = labels.reshape(len(labels), -1)[:, 0]
        if not np.isfinite(scores).all():
            raise DataError(f"MOSEI file {path!r}: {key}/labels holds non-finite sentiment scores")
        self.labels = torch.from_numpy(sentiment_to_class(scores, task))
        self.scores = torch.from_numpy(scores)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> Sample:
        return [f[index] for f in self.features], int(self.labels[index]), int(index)
