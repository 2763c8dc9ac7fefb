"""Base class of the file-backed audio-visual datasets (CREMA-D, Kinetics-Sounds).

A subclass reads its list files into ``(name, label)`` rows; this class checks
that no clip is in two lists (:func:`check_no_leak`: a train/test leak), splits
them (a seeded validation hold-out of the training list when the dataset has
no validation list), scans every sample's files once at start-up, and either
raises a :class:`DataError` naming the bad files or, with ``data.skip_bad=true``,
drops them and logs how many were skipped.

The start-up scan reads file headers (a readable, complete wav with frames, an
fbank of the right shape, a frame folder with images) and refuses files that
resolve (through symlinks) outside ``data.root``. With ``data.skip_bad=true`` it
also loads every audio file and decodes every frame, so that files with NaN or
inf values and corrupt images are skipped too; without it such a file is an
error naming it when it is loaded (the loaders check every value they return).

List rows are ``(name, label, where)`` with ``where`` the ``list file:line`` they
come from: a name must be one plain file name (:func:`check_entry_name`), and a
clip listed twice with two labels is an error naming both lines
(:func:`check_duplicates`).
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
from .media import CROP_SCALE, check_crop_scale, list_frames, load_frames, load_image

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


def check_entry_name(name: str, where: str) -> str:
    """``name`` if it is one plain file name (a list entry names a clip under ``data.root``), else a
    :class:`DataError` naming ``where`` (``list file:line``)."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name
           or (os.altsep is not None and os.altsep in name) or "\0" in name)
    if bad:
        raise DataError(f"{where}: {name!r} is not one plain name (no '/', '\\', '.' or '..'): a list entry names "
                        "a clip inside data.root")
    return name


def check_duplicates(rows: list[tuple[str, object, str]]) -> None:
    """Refuse a clip listed twice in one list file with two labels (naming both lines); the same row twice
    is logged (it is kept, and weighs twice)."""
    first: dict[str, tuple[object, str]] = {}
    repeated = []
    for name, label, where in rows:
        if name not in first:
            first[name] = (label, where)
            continue
        label0, where0 = first[name]
        if label != label0:
            line0 = where0.rsplit(":", 1)[-1]
            raise DataError(f"{where}: {name} is listed again with another label {label!r} (line {line0} says "
                            f"{label0!r}); a clip has one label")
        repeated.append(f"{name} ({where0}, {where})")
    if repeated:
        more = f", … {len(repeated) - MAX_LISTED} more" if len(repeated) > MAX_LISTED else ""
        logger.warning("%d clip(s) listed twice with the same label (each copy is a sample): %s%s", len(repeated),
                       ", ".join(repeated[:MAX_LISTED]), more)


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
        self.real_root = os.path.realpath(self.root)
        self.split, self.train = split, split == "train"
        self.seed = int(seed)
        self.modalities = list(modalities)
        self.num_frames = int(num_frames)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.rows: list[tuple[str, int]] = []
        self.origins: dict[str, str] = {}
        self.scan_values = False  # the start-up scan also loads audio and frames (set by finish with skip_bad)

    def audio_path(self, name: str) -> str:
        raise NotImplementedError

    def frame_dir(self, name: str) -> str:
        raise NotImplementedError

    def check_audio(self, path: str) -> str | None:
        raise NotImplementedError

    def load_audio(self, path: str) -> torch.Tensor:
        raise NotImplementedError

    def _outside_root(self, path: str) -> str | None:
        """None if ``path`` (symlinks resolved) lies inside ``data.root``, else where it leads."""
        real = os.path.realpath(path)
        return None if os.path.commonpath([self.real_root, real]) == self.real_root else real

    def check_row(self, row: tuple) -> list[str]:
        """Problems of one sample's files, as 'path: reason' strings."""
        name = row[0]
        where = f" (listed at {row[2]})" if len(row) > 2 else ""  # after the reason: 'path: reason (listed at …)'
        issues = []
        if "audio" in self.modalities:
            audio = self.audio_path(name)
            outside = self._outside_root(audio)
            reason = (f"resolves to {outside}, outside data.root {self.real_root}" if outside
                      else self.check_audio(audio))
            if reason:
                issues.append(f"{audio}: {reason}{where}")
            elif self.scan_values:
                try:
                    self.load_audio(audio)
                except DataError as exc:
                    issues.append(str(exc))
        if "visual" in self.modalities:
            folder = self.frame_dir(name)
            frames = list_frames(folder)
            if not frames:
                issues.append(f"{folder}: frame folder missing or empty{where}")
            for path in [folder, *frames]:
                outside = self._outside_root(path)
                if outside:
                    issues.append(f"{path}: resolves to {outside}, outside data.root {self.real_root}{where}")
                    break
            else:
                if self.scan_values:
                    for path in frames:
                        try:
                            load_image(path, 16, None)
                        except DataError as exc:
                            issues.append(str(exc))
                            break
        return issues

    def finish(self, rows: list[tuple], skip_bad: bool) -> None:
        """Validate labels, scan files, keep the good rows (``(name, label)``; where each came from in
        ``self.origins``)."""
        for row in rows:
            name, label = row[0], row[1]
            if not 0 <= label < self.num_classes:
                where = f"{row[2]}: " if len(row) > 2 else f"{self.root}: "
                raise DataError(f"{where}sample {name!r} has label {label}, expected 0..{self.num_classes - 1} "
                                "(check data.num_classes)")
        self.scan_values = bool(skip_bad)
        kept = scan_rows(rows, self.check_row, skip_bad, f"{self.root} ({self.split})")
        self.rows = [(row[0], row[1]) for row in kept]
        self.origins = {row[0]: row[2] for row in kept if len(row) > 2}

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
