"""CREMA-D: ``AudioWAV/<clip>.wav``, frames ``Image-01-FPS/<clip>/*.jpg``, ``train.csv`` / ``test.csv``.

List rows are ``clip,EMOTION`` (UTF-8, a BOM is accepted, an optional header
row ``clip,label``); emotions NEU HAP SAD FEA DIS ANG map to 0…5. The
validation split is a seeded hold-out (``data.val_fraction``) of ``train.csv``.
Audio follows the paper (:func:`~rollingq.data.media.cremad_spectrogram`,
``(257, 188)``); ``data.num_frames`` frames per clip (1 in the paper).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from ..inputs import InputSpec
from ..schema import Section, checked
from .common import DataError, read_list_lines
from .listed import AudioVisualDataset, audio_visual_specs, check_duplicates, check_entry_name, read_lists, split_rows
from .media import CROP_SCALE, check_audio_file, check_crop_scale, cremad_spectrogram

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
HEADER_LABELS = {"label", "emotion", "class"}
SPECTROGRAM = (257, 188)


class CremaDOptions(Section):
    """The ``data.*`` keys of CREMA-D.

    Attributes:
        num_frames, image_size: frames per clip (1 in the paper) and their side after resizing.
        crop_scale: the training frames' random resized crop keeps this fraction of the area,
            ``[low, high]`` (the paper's pipeline: ``[0.08, 1.0]``); null: no crop.
        flip: a random horizontal flip of training frames (the paper's pipeline: true).
        train_list, test_list, val_list: list files under ``data.root`` (no ``val_list``: a seeded
            hold-out of the training list).
    """

    num_frames: int = Field(1, ge=1)
    image_size: int = Field(224, ge=16)
    crop_scale: Annotated[list[float] | None, checked(check_crop_scale)] = list(CROP_SCALE)
    flip: bool = True
    train_list: str = "train.csv"
    test_list: str = "test.csv"
    val_list: str | None = None


def input_specs(modalities: list[str], options: CremaDOptions) -> list[InputSpec]:
    """The paper's spectrogram ``(257, 188)`` and ``num_frames`` frames."""
    return audio_visual_specs("cremad", modalities, SPECTROGRAM, options.num_frames, options.image_size)


def read_cremad_rows(path: str) -> list[tuple[str, int, str]]:
    """``(clip, label, "path:line")`` rows of a CREMA-D csv; a DataError names the file (and the line of a bad
    row): missing, not UTF-8, empty, a bad row, a clip that is not one plain name, or a clip listed twice
    with two labels."""
    rows = []
    for lineno, line in read_list_lines(path, "CREMA-D"):
        fields = next(csv.reader([line]))
        if not fields or not "".join(fields).strip():
            continue
        if len(fields) < 2:
            raise DataError(f"{path}:{lineno}: expected 'clip,EMOTION', got {','.join(fields)!r}")
        clip, emotion = fields[0].strip(), fields[1].strip()
        if lineno == 1 and emotion.lower() in HEADER_LABELS:
            continue
        if emotion.upper() not in EMOTIONS:
            raise DataError(f"{path}:{lineno}: unknown emotion {emotion!r}, expected one of {EMOTIONS}")
        rows.append((check_entry_name(clip, f"{path}:{lineno}"), EMOTIONS.index(emotion.upper()), f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: the CREMA-D list file holds a header but no sample")
    check_duplicates(rows)
    return rows


def read_cremad_list(path: str) -> list[tuple[str, int]]:
    """``(clip, label)`` rows of a CREMA-D csv (:func:`read_cremad_rows` without the line)."""
    return [(clip, label) for clip, label, _ in read_cremad_rows(path)]


class CremaDDataset(AudioVisualDataset):
    """CREMA-D (6 emotions); samples ``([spectrogram (257, 188), frames (T, 3, S, S)], label, index)``.

    Args: those of :class:`AudioVisualDataset`, and
        val_fraction: the seeded hold-out of ``train_list`` used as validation without ``val_list``.
        skip_bad: skip samples with missing or corrupt files instead of failing.
        crop_scale, flip: the training frames' augmentation (:class:`CremaDOptions`).
        train_list, test_list, val_list: list files under ``root``.
    """

    dataset_name = "cremad"

    def __init__(self, split: str, *, root: str | None, modalities: list[str], num_classes: int, seed: int,
                 num_frames: int, image_size: int, val_fraction: float, skip_bad: bool, train_list: str,
                 test_list: str, val_list: str | None, crop_scale: Sequence[float] | None = CROP_SCALE,
                 flip: bool = True) -> None:
        super().__init__(split, root=root, modalities=modalities, num_classes=num_classes, seed=seed,
                         num_frames=num_frames, image_size=image_size, crop_scale=crop_scale, flip=flip)
        if self.num_classes != len(EMOTIONS):
            raise ValueError(f"data.num_classes: CREMA-D has {len(EMOTIONS)} classes, got {self.num_classes}")
        lists = read_lists(self.root, {"train": train_list, "test": test_list, "val": val_list}, read_cremad_rows)
        train_rows, test_rows, val_rows = lists["train"], lists["test"], lists.get("val")
        self.finish(split_rows(split, train_rows, test_rows, val_rows, val_fraction, self.seed), skip_bad)

    def audio_path(self, name: str) -> str:
        return os.path.join(self.root, "AudioWAV", name + ".wav")

    def frame_dir(self, name: str) -> str:
        return os.path.join(self.root, "Image-01-FPS", name)

    def check_audio(self, path: str) -> str | None:
        return check_audio_file(path)

    def load_audio(self, path: str) -> torch.Tensor:
        return cremad_spectrogram(path)
