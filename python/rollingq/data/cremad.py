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

import torch

from .common import DataError
from .listed import AudioVisualDataset, split_rows
from .media import check_audio_file, cremad_spectrogram

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
HEADER_LABELS = {"label", "emotion", "class"}


def read_cremad_list(path: str) -> list[tuple[str, int]]:
    """``(clip, label)`` rows of a CREMA-D csv; a DataError names the file and line of a bad row."""
    if not os.path.isfile(path):
        raise DataError(f"CREMA-D list file {path!r} does not exist")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, fields in enumerate(csv.reader(f), start=1):
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) < 2:
                raise DataError(f"{path}:{lineno}: expected 'clip,EMOTION', got {','.join(fields)!r}")
            clip, emotion = fields[0].strip(), fields[1].strip()
            if lineno == 1 and emotion.lower() in HEADER_LABELS:
                continue
            if emotion.upper() not in EMOTIONS:
                raise DataError(f"{path}:{lineno}: unknown emotion {emotion!r}, expected one of {EMOTIONS}")
            rows.append((clip, EMOTIONS.index(emotion.upper())))
    return rows


class CremaDDataset(AudioVisualDataset):
    """CREMA-D (6 emotions); samples ``([spectrogram (257, 188), frames (T, 3, S, S)], label, index)``."""

    def __init__(self, cfg: dict, split: str) -> None:
        super().__init__(cfg, split)
        data = cfg["data"]
        if self.num_classes != len(EMOTIONS):
            raise ValueError(f"data.num_classes: CREMA-D has {len(EMOTIONS)} classes, got {self.num_classes}")
        train_rows = read_cremad_list(os.path.join(self.root, data.get("train_list", "train.csv")))
        test_rows = read_cremad_list(os.path.join(self.root, data.get("test_list", "test.csv")))
        val_list = data.get("val_list")
        val_rows = read_cremad_list(os.path.join(self.root, val_list)) if val_list else None
        rows = split_rows(split, train_rows, test_rows, val_rows, float(data.get("val_fraction", 0.1)), self.seed)
        self.finish(rows, bool(data.get("skip_bad", False)))

    def audio_path(self, name: str) -> str:
        return os.path.join(self.root, "AudioWAV", name + ".wav")

    def frame_dir(self, name: str) -> str:
        return os.path.join(self.root, "Image-01-FPS", name)

    def check_audio(self, path: str) -> str | None:
        return check_audio_file(path)

    def load_audio(self, path: str) -> torch.Tensor:
        return cremad_spectrogram(path)
