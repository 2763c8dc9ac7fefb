"""Base class of the file-backed audio-visual datasets (CREMA-D, Kinetics-Sounds).

A subclass reads its list files into ``(name, label)`` rows; this class splits
them (a seeded validation hold-out of the training list when the dataset has
no validation list), scans every sample's files once at start-up, and either
raises a :class:`DataError` naming the bad files or, with ``data.skip_bad=true``,
drops them and logs how many were skipped.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .common import DataError, EpochAware, Sample, check_split, sample_rng, seeded_holdout

logger = logging.getLogger("rollingq.data")

MAX_LISTED = 5


def split_rows(
    split: str, train_rows: list, test_rows: list, val_rows: list | None, fraction: float, seed: int
) -> list:
    """The rows of ``split``: the test list, the validation list, or the seeded hold-out of the training list."""
    if split == "test":
        return test_rows
    if val_rows is not None:
        return val_rows if split == "val" else train_rows
    keep, held = seeded_holdout(len(train_rows), fraction, seed)
    return [train_rows[i] for i in (held if split == "val" else keep)]


def scan_rows(rows: list, check: Callable[[object], list[str]], skip_bad: bool, what: str) -> list:
    """Keep the rows whose files pass ``check`` (which returns problems as 'path: reason' strings)."""
    good, problems, bad_rows = [], [], 0
    show = len(rows) >= 1000 and sys.stderr.isatty()
    for row in tqdm(rows, desc=f"scanning {what}", leave=False, disable=not show):
        issues = check(row)
        if issues:
            bad_rows += 1
            problems.extend(issues)
        else:
            good.append(row)
    if bad_rows:
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; … {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")
        if not skip_bad:
            raise DataError(f"{what}: {bad_rows} sample(s) with missing or corrupt files: {listed} "
                            "(fix them, or set data.skip_bad=true to skip such samples)")
        logger.warning("%s: skipped %d sample(s) with missing or corrupt files (data.skip_bad=true): %s",
                       what, bad_rows, listed)
    if not good:
        raise DataError(f"{what}: no usable sample left")
    return good


class AudioVisualDataset(Dataset, EpochAware):
    """Rows ``(name, label)`` with an audio loader and a frame folder per name.

    Subclasses set ``self.rows`` and implement :meth:`audio_path`, :meth:`load_audio`,
    :meth:`frame_dir` and :meth:`check_audio`. Samples: ``([audio, frames][selected], label, index)``
    with ``frames`` float32 ``(num_frames, 3, size, size)``.
    """

    def __init__(self, cfg: dict, split: str) -> None:
        check_split(split)
        data = cfg["data"]
        if not data.get("root"):
            raise ValueError(f"data.root: expected the {data['name']} dataset folder, got {data.get('root')!r}")
        self.root = str(data["root"])
        if not os.path.isdir(self.root):
            raise DataError(f"data.root: {self.root!r} is not a folder")
        self.split, self.train = split, split == "train"
        self.seed = int(cfg["seed"])
        self.modalities = list(data["modalities"])
        self.num_frames = int(data.get("num_frames", 1))
        self.image_size = int(data.get("image_size", 224))
        self.num_classes = int(data["num_classes"])
        self.rows: list[tuple[str, int]] = []

    def audio_path(self, name: str) -> str:
        raise NotImplementedError

    def frame_dir(self, name: str) -> str:
        raise NotImplementedError

    def check_audio(self, path: str) -> str | None:
        raise NotImplementedError

    def load_audio(self, path: str) -> torch.Tensor:
        raise NotImplementedError

    def check_row(self, row: tuple[str, int]) -> list[str]:
        """Problems of one sample's files, as 'path: reason' strings."""
        name, _ = row
        issues = []
        if "audio" in self.modalities:
            reason = self.check_audio(self.audio_path(name))
            if reason:
                issues.append(f"{self.audio_path(name)}: {reason}")
        if "visual" in self.modalities:
            from .media import list_frames

            if not list_frames(self.frame_dir(name)):
                issues.append(f"{self.frame_dir(name)}: frame folder missing or empty")
        return issues

    def finish(self, rows: list[tuple[str, int]], skip_bad: bool) -> None:
        """Validate labels, scan files, keep the good rows."""
        for name, label in rows:
            if not 0 <= label < self.num_classes:
                raise DataError(f"{self.root}: sample {name!r} has label {label}, expected 0..{self.num_classes - 1} "
                                "(check data.num_classes)")
        self.rows = scan_rows(rows, self.check_row, skip_bad, f"{self.root} ({self.split})")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        from .media import load_frames

        name, label = self.rows[index]
        rng = sample_rng(self.seed, self.epoch, index) if self.train else None
        out = []
        for m in self.modalities:
            if m == "audio":
                out.append(self.load_audio(self.audio_path(name)))
            else:
                out.append(load_frames(self.frame_dir(name), self.num_frames, self.image_size, rng))
        return out, label, index
