"""Base class of the file-backed audio-visual datasets (CREMA-D, Kinetics-Sounds).

A subclass reads its list files into ``(name, label)`` rows; this class checks
that no clip is in two lists (:func:`check_no_leak`: a train/test leak), splits
them (a seeded validation hold-out of the training list when the dataset has
no validation list), scans every sample's files once at start-up, and either
raises a :class:`DataError` naming the bad files or, with ``data.skip_bad=true``,
drops them and logs how many were skipped.

The start-up scan reads file headers (a readable wav with frames, an fbank of
the right shape, a frame folder with images). With ``data.skip_bad=true`` it
also loads every audio file, so that files with NaN or inf values are skipped
too; without it such a file is an error naming it when it is loaded (the
loaders check every value they return).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..inputs import InputSpec
from .common import DataError, EpochAware, Sample, check_split, sample_rng, seeded_holdout
from .media import CROP_SCALE, check_crop_scale, list_frames, load_frames

logger = logging.getLogger("rollingq.data")

MAX_LISTED = 5
AUDIO_VISUAL = ("audio", "visual")


def audio_visual_specs(
    dataset: str, modalities: list[str], audio_shape: tuple[int, int], num_frames: int, image_size: int
) -> list[InputSpec]:
    """Input specs of an audio-visual dataset: a spectrogram ``audio_shape`` and ``num_frames`` frames."""
    specs = []
    for m in modalities:
        if m == "audio":
            specs.append(InputSpec("spectrogram", audio_shape))
        elif m == "visual":
            specs.append(InputSpec("frames", (num_frames, 3, image_size, image_size)))
        else:
            raise ValueError(f"data.modalities: {dataset} has {' and '.join(AUDIO_VISUAL)}, got {m!r}")
    return specs


def check_no_leak(lists: dict[str, list]) -> None:
    """Refuse a clip listed in two list files (a train/test leak); ``lists`` maps each file to its rows,
    whose first field is the clip's name.

    Raises:
        DataError: naming both files and the shared clips.
    """
    seen: dict[str, str] = {}
    shared: dict[tuple[str, str], list[str]] = {}
    for path, rows in lists.items():
        for name in dict.fromkeys(row[0] for row in rows):
            if name in seen and seen[name] != path:
                shared.setdefault((seen[name], path), []).append(name)
            else:
                seen[name] = path
    if shared:
        parts = []
        for (first, second), names in shared.items():
            more = f", … {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
            parts.append(f"{len(names)} clip(s) of {first} are also in {second}: "
                         f"{', '.join(names[:MAX_LISTED])}{more}")
        raise DataError("train/test leak: " + "; ".join(parts) + " (a clip must be in one list only)")


def read_lists(root: str, names: dict[str, str | None], reader: Callable[[str], list]) -> dict[str, list]:
    """Read each split's list file ``root/names[split]`` (None: the split has no list) with ``reader``;
    refuse two splits naming one file and a clip in two lists (:func:`check_no_leak`)."""
    paths = {split: os.path.join(root, name) for split, name in names.items() if name}
    by_path: dict[str, list[str]] = {}
    for split, path in paths.items():
        by_path.setdefault(os.path.realpath(path), []).append(split)
    for splits in by_path.values():
        if len(splits) > 1:
            keys = " and ".join(f"data.{s}_list" for s in splits)
            raise DataError(f"{keys} name the same file {paths[splits[0]]!r} (a train/test leak)")
    rows = {split: reader(path) for split, path in paths.items()}
    check_no_leak({paths[split]: rows[split] for split in rows})
    return rows


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
        more = f"; … {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        listed = "; ".join(problems[:MAX_LISTED]) + more
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

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        root: the dataset folder.
        modalities: a selection of ``audio`` and ``visual``, in the model's order.
        num_classes: classes of the labels.
        seed: seeds the validation hold-out and the training augmentation.
        num_frames: frames per clip.
        image_size: the frames' side after resizing.
        crop_scale: the training crop's area fraction range ``[low, high]``, or None for no crop.
        flip: a random horizontal flip of training frames.
    """

    dataset_name = "audio-visual"

    def __init__(self, split: str, *, root: str | None, modalities: list[str], num_classes: int, seed: int,
                 num_frames: int, image_size: int, crop_scale: Sequence[float] | None = CROP_SCALE,
                 flip: bool = True) -> None:
        check_split(split)
        for name, value in (("num_frames", num_frames), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}: expected an integer >= 1, got {value!r}")
        problem = check_crop_scale(crop_scale)
        if problem:
            raise ValueError(f"data.crop_scale: {problem}, got {crop_scale!r}")
        if not isinstance(flip, bool):
            raise ValueError(f"data.flip: expected true or false, got {flip!r}")
        self.crop_scale = None if crop_scale is None else (float(crop_scale[0]), float(crop_scale[1]))
        self.flip = flip
        if not root:
            raise ValueError(f"data.root: expected the {self.dataset_name} dataset folder, got {root!r}")
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise DataError(f"data.root: {self.root!r} is not a folder")
        self.split, self.train = split, split == "train"
        self.seed = int(seed)
        self.modalities = list(modalities)
        self.num_frames = int(num_frames)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.rows: list[tuple[str, int]] = []
        self.scan_values = False  # the start-up scan also loads the audio (set by finish with skip_bad)

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
            elif self.scan_values:
                try:
                    self.load_audio(self.audio_path(name))
                except DataError as exc:
                    issues.append(str(exc))
        if "visual" in self.modalities:
            if not list_frames(self.frame_dir(name)):
                issues.append(f"{self.frame_dir(name)}: frame folder missing or empty")
        return issues

    def finish(self, rows: list[tuple[str, int]], skip_bad: bool) -> None:
        """Validate labels, scan files, keep the good rows."""
        for name, label in rows:
            if not 0 <= label < self.num_classes:
                raise DataError(f"{self.root}: sample {name!r} has label {label}, expected 0..{self.num_classes - 1} "
                                "(check data.num_classes)")
        self.scan_values = bool(skip_bad)
        self.rows = scan_rows(rows, self.check_row, skip_bad, f"{self.root} ({self.split})")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        name, label = self.rows[index]
        rng = sample_rng(self.seed, self.epoch, index) if self.train else None
        out = []
        for m in self.modalities:
            if m == "audio":
                out.append(self.load_audio(self.audio_path(name)))
            else:
                out.append(load_frames(self.frame_dir(name), self.num_frames, self.image_size, rng,
                                       self.crop_scale, self.flip))
        return out, label, index
