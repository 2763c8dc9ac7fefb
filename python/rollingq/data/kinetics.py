"""Kinetics-Sounds (31 classes): audio ``.npy`` features and 1-fps frames.

Two audio layouts (``data.audio_features``), both written by ``rollingq prepare kinetics-sounds``:
``spectrogram`` ``(257, T)``, frequency first, the paper's 257 x 1004 spectrograms (this reproduces the
paper; cropped or zero-padded to ``data.spectrogram_frames`` time frames), or ``fbank`` ``(T, 128)``,
time first, Kaldi log-mel filterbanks (AST style; cropped or zero-padded to ``data.fbank_frames``).

Layout under ``data.root``: ``<audio_dir>/<name>.npy`` (default ``audio``),
``<frame_dir>/<name>/*.jpg`` (default ``visual``), list files ``train.txt`` /
``test.txt`` (optional ``data.val_list``, else a seeded hold-out of train).
Both list formats of this field are read: space-separated ``name … label`` and
comma-separated ``name,…,label``; the label is the last field, an integer id or
a class name. Names map to ids through ``data.classes`` when given, else the
sorted class names of the training list; a name that the mapping lacks is an
error, never a guess. In the space-separated format the label is the last
whitespace-separated field, so a class name with spaces (``playing guitar``)
needs the comma format or ``data.classes``: a class count derived from the
training list that differs from ``data.num_classes`` is an error naming the list.
"""

from __future__ import annotations

import os
import re
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..inputs import InputSpec
from ..schema import Section
from .common import DataError, read_list_lines
from .listed import AudioVisualDataset, audio_visual_specs, check_duplicates, check_entry_name, read_lists, split_rows
from .media import ensure_finite


class KineticsOptions(Section):
    """The ``data.*`` keys of Kinetics-Sounds.

    Attributes:
        num_frames, image_size: frames per clip (1 fps) and their side after resizing.
        audio_features: ``"fbank"`` ``(T, bins)`` or ``"spectrogram"`` ``(bins, T)`` (the paper's).
        fbank_frames, fbank_bins: the fbank's shape; longer ones are cropped, shorter zero-padded.
        spectrogram_bins, spectrogram_frames: the spectrogram's shape (257 x 1004 in the paper); longer
            ones are cropped, shorter zero-padded along time.
        audio_dir, frame_dir: the ``<name>.npy`` and ``<name>/*.jpg`` folders under ``data.root``.
        train_list, test_list, val_list: list files under ``data.root`` (no ``val_list``: a seeded
            hold-out of the training list).
        classes: class names in id order; default the sorted names of the training list.
    """

    num_frames: int = Field(3, ge=1)
    image_size: int = Field(224, ge=16)
    audio_features: Literal["fbank", "spectrogram"] = "fbank"
    fbank_frames: int = Field(1024, ge=16)
    fbank_bins: int = Field(128, ge=16)
    spectrogram_bins: int = Field(257, ge=16)
    spectrogram_frames: int = Field(1004, ge=16)
    audio_dir: str = "audio"
    frame_dir: str = "visual"
    train_list: str = "train.txt"
    test_list: str = "test.txt"
    val_list: str | None = None
    classes: list[str] | None = None


def input_specs(modalities: list[str], options: KineticsOptions) -> list[InputSpec]:
    """The audio features (an fbank ``(fbank_frames, fbank_bins)`` or a spectrogram ``(spectrogram_bins,
    spectrogram_frames)``) and ``num_frames`` frames."""
    if options.audio_features == "spectrogram":
        audio = (options.spectrogram_bins, options.spectrogram_frames)
    else:
        audio = (options.fbank_frames, options.fbank_bins)
    return audio_visual_specs("kinetics_sounds", modalities, audio, options.num_frames, options.image_size)


def check_features(path: str, bins: int, time_first: bool) -> str | None:
    """None if ``path`` holds an audio feature array with ``bins`` bins and at least one time frame, else
    what is wrong. ``time_first``: an fbank ``(T, bins)``; otherwise a spectrogram ``(bins, T)``."""
    if not os.path.isfile(path):
        return "missing"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    time_axis = 0 if time_first else 1
    if arr.ndim != 2 or arr.shape[1 - time_axis] != bins or arr.shape[time_axis] < 1:
        if time_first:
            return f"expected an fbank array (frames, {bins}), got shape {arr.shape}"
        return (f"expected a spectrogram array ({bins}, frames) (data.audio_features=spectrogram), "
                f"got shape {arr.shape}")
    return None


def load_spectrogram(path: str, frames: int) -> torch.Tensor:
    """A ``(bins, T)`` spectrogram cropped or zero-padded along time to ``frames``: float32 ``(bins, frames)``."""
    try:
        arr = np.load(path, allow_pickle=False).astype(np.float32)
    except Exception as exc:
        raise DataError(f"cannot read spectrogram file {path!r}: {type(exc).__name__}: {exc}") from exc
    ensure_finite(arr, path, "spectrogram file")
    if arr.shape[1] >= frames:
        arr = arr[:, :frames]
    else:
        arr = np.concatenate([arr, np.zeros((arr.shape[0], frames - arr.shape[1]), np.float32)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def read_list(path: str) -> list[tuple[str, str, str]]:
    """``(name, raw label, "path:line")`` rows of a space- or comma-separated list file (UTF-8; missing, not
    UTF-8 or empty, a name that is not one plain name, or a clip listed twice with two labels is a
    DataError naming the file and line)."""
    rows = []
    for lineno, line in read_list_lines(path, "Kinetics-Sounds"):
        line = line.strip()
        fields = [x.strip() for x in line.split(",")] if "," in line else line.split()
        if len(fields) < 2 or not fields[0] or not fields[-1]:
            raise DataError(f"{path}:{lineno}: expected 'name ... label' or 'name,...,label', got {line!r}")
        rows.append((check_entry_name(fields[0], f"{path}:{lineno}"), fields[-1], f"{path}:{lineno}"))
    check_duplicates(rows)
    return rows


_INTEGER = re.compile(r"-?[0-9]+")
"""A class id: ASCII digits only (``str.isdigit`` also takes '²' and other digits ``int`` refuses)."""


def _is_id(raw: str) -> bool:
    return _INTEGER.fullmatch(raw) is not None


def label_ids(rows: list[tuple[str, str, str]], classes: list[str], path: str) -> list[tuple[str, int, str]]:
    """Map raw labels to ids: integers stay, names go through ``classes`` (an unknown one is a DataError
    naming the file and line)."""
    out = []
    for name, raw, where in rows:
        if _is_id(raw):
            out.append((name, int(raw), where))
        elif raw in classes:
            out.append((name, classes.index(raw), where))
        else:
            raise DataError(f"{where}: sample {name!r} has class {raw!r}, which is not among the {len(classes)} known "
                            "classes (data.classes or the training list)")
    return out


def class_names(
    classes: list[str] | None, num_classes: int, raw_train: list[tuple[str, str, str]], train_path: str
) -> list[str]:
    """``classes`` (``data.classes``), else the sorted class names of the training list (empty for ids).

    Raises:
        ValueError: ``data.classes`` does not have ``data.num_classes`` entries.
        DataError: the training list's names are not ``data.num_classes`` distinct classes (a name with
            spaces in a space-separated list keeps only its last word, merging classes).
    """
    if classes:
        classes = [str(c) for c in classes]
        if len(classes) != num_classes:
            raise ValueError(f"data.classes: expected data.num_classes={num_classes} names, got {len(classes)}")
        return classes
    classes = sorted({r for _, r, _ in raw_train if not _is_id(r)})
    if classes and len(classes) != num_classes:
        raise DataError(
            f"{train_path}: its labels name {len(classes)} distinct classes, but data.num_classes is {num_classes}; "
            "in a space-separated list only the last word is the label, so class names with spaces "
            "('playing guitar') need the comma-separated format or data.classes"
        )
    return classes


class KineticsSoundsDataset(AudioVisualDataset):
    """Kinetics-Sounds; samples ``([fbank (frames, bins), frames (T, 3, S, S)], label, index)``.

    Args: those of :class:`AudioVisualDataset`, and
        val_fraction, skip_bad, train_list, test_list, val_list: as in
            :class:`~rollingq.data.cremad.CremaDDataset`.
        fbank_frames, fbank_bins: the fbank's shape (longer ones are cropped, shorter zero-padded).
        audio_features, spectrogram_bins, spectrogram_frames: the audio layout (``"fbank"`` or the paper's
            ``"spectrogram"``) and the spectrogram's shape.
        audio_dir, frame_dir: the fbank and frame folders under ``root``.
        classes: class names in id order, or None (the sorted names of the training list).
    """

    dataset_name = "kinetics_sounds"

    def __init__(self, split: str, *, root: str | None, modalities: list[str], num_classes: int, seed: int,
                 num_frames: int, image_size: int, val_fraction: float, skip_bad: bool, fbank_frames: int,
                 fbank_bins: int, audio_dir: str, frame_dir: str, train_list: str, test_list: str,
                 val_list: str | None, classes: list[str] | None, audio_features: str = "fbank",
                 spectrogram_bins: int = 257, spectrogram_frames: int = 1004) -> None:
        super().__init__(split, root=root, modalities=modalities, num_classes=num_classes, seed=seed,
                         num_frames=num_frames, image_size=image_size)
        self.fbank_shape = (int(fbank_frames), int(fbank_bins))
        self.audio_features = audio_features
        self.spectrogram_shape = (int(spectrogram_bins), int(spectrogram_frames))
        self.audio_dir = os.path.join(self.root, audio_dir)
        self.frames_root = os.path.join(self.root, frame_dir)
        train_path = os.path.join(self.root, train_list)
        test_path = os.path.join(self.root, test_list)
        raw = read_lists(self.root, {"train": train_list, "test": test_list, "val": val_list}, read_list)
        raw_train, raw_test = raw["train"], raw["test"]
        self.classes = class_names(classes, self.num_classes, raw_train, train_path)
        train_rows = label_ids(raw_train, self.classes, train_path)
        test_rows = label_ids(raw_test, self.classes, test_path)
        val_rows = None
        if val_list:
            val_path = os.path.join(self.root, val_list)
            val_rows = label_ids(raw["val"], self.classes, val_path)
        self.finish(split_rows(split, train_rows, test_rows, val_rows, val_fraction, self.seed), skip_bad)

    def audio_path(self, name: str) -> str:
        return os.path.join(self.audio_dir, name + ".npy")

    def frame_dir(self, name: str) -> str:
        return os.path.join(self.frames_root, name)

    def check_audio(self, path: str) -> str | None:
        if self.audio_features == "spectrogram":
            return check_features(path, self.spectrogram_shape[0], time_first=False)
        return check_features(path, self.fbank_shape[1], time_first=True)

    def load_audio(self, path: str) -> torch.Tensor:
        """The fbank ``(fbank_frames, fbank_bins)`` or the spectrogram ``(spectrogram_bins, spectrogram_frames)``,
        cropped or zero-padded along time: float32."""
        if self.audio_features == "spectrogram":
            return load_spectrogram(path, self.spectrogram_shape[1])
        try:
            arr = np.load(path, allow_pickle=False).astype(np.float32)
        except Exception as exc:
            raise DataError(f"cannot read fbank file {path!r}: {type(exc).__name__}: {exc}") from exc
        ensure_finite(arr, path, "fbank file")
        frames = self.fbank_shape[0]
        if arr.shape[0] >= frames:
            arr = arr[:frames]
        else:
            arr = np.concatenate([arr, np.zeros((frames - arr.shape[0], arr.shape[1]), np.float32)])
        return torch.from_numpy(np.ascontiguousarray(arr))
