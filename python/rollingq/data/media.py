"""Decoding audio and frames the way the paper's pipelines do (numpy + librosa + Pillow, no torchvision).

* :func:`cremad_spectrogram` — audio at 22,050 Hz (librosa resampling when needed), tiled x3 and cut to 3 s,
  clipped to [-1, 1], STFT n_fft 512 hop 353, ``log(|S| + 1e-7)``: float32 ``(257, 188)``.
* :func:`load_frames` — ``num_frames`` JPEG frames of a clip folder (random in training, centred in
  evaluation), resized to ``size`` with ImageNet normalization: float32 ``(T, 3, size, size)``.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import torch

from ..extras import require
from .common import DataError, non_finite_reason

SAMPLE_RATE = 22050
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


def ensure_finite(values: np.ndarray, path: str, what: str) -> None:
    """Raise a :class:`DataError` naming ``path`` if ``values`` holds NaN or inf."""
    reason = non_finite_reason(values)
    if reason:
        raise DataError(f"{what} {path!r} {reason}; fix or remove it (with data.skip_bad=true such files are "
                        "found and skipped at start-up)")


def wav_truncation(path: str) -> str | None:
    """For a RIFF/WAVE file: None if its ``data`` chunk holds as many bytes as its header announces, else
    ``"truncated: …"`` (a copy cut short still decodes, to fewer samples than the clip had). Other
    formats: None (their decoder judges them)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return None
            while True:
                header = f.read(8)
                if len(header) < 8:
                    return "truncated: no 'data' chunk (the file ends inside its header)"
                chunk, length = header[:4], struct.unpack("<I", header[4:])[0]
                if chunk == b"data":
                    if length == 0xFFFFFFFF:  # RF64 / streamed: the size lives elsewhere
                        return None
                    held = size - f.tell()
                    if held < length:
                        return f"truncated: the header announces {length} bytes of audio, the file holds {held}"
                    return None
                f.seek(length + (length & 1), os.SEEK_CUR)
    except OSError as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"


def check_audio_file(path: str) -> str | None:
    """None if ``path`` is a readable, complete sound file, else the reason it is not."""
    if not os.path.isfile(path):
        return "missing"
    truncated = wav_truncation(path)
    if truncated:
        return truncated
    soundfile = require("soundfile", "audio", "reading wav files")
    try:
        info = soundfile.info(path)
    except Exception as exc:  # soundfile raises RuntimeError/LibsndfileError for garbage
        return f"unreadable ({type(exc).__name__}: {exc})"
    if info.frames <= 0:
        return "empty (0 frames)"
    return None


def stft_magnitude(signal: np.ndarray, n_fft: int = 512, hop: int = 353) -> np.ndarray:
    """``|librosa.stft(signal, n_fft, hop_length=hop)|`` with librosa's defaults, in plain numpy.

    Periodic Hann window, centred frames with ``n_fft // 2`` zeros of padding on
    each side (librosa's ``pad_mode="constant"``): float32 ``(n_fft // 2 + 1, 1 + len // hop)``.
    """
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    padded = np.pad(signal.astype(np.float32), n_fft // 2)
    count = 1 + (padded.size - n_fft) // hop
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:count]
    return np.abs(np.fft.rfft(frames * window, axis=1)).T.astype(np.float32)


def cremad_spectrogram(path: str) -> torch.Tensor:
    """The paper's CREMA-D log-magnitude spectrogram of the wav at ``path``: float32 ``(257, 188)``."""
    soundfile = require("soundfile", "audio", "reading wav files")
    truncated = wav_truncation(path)
    if truncated:
        raise DataError(f"audio file {path!r}: {truncated}; restore it (with data.skip_bad=true such files are "
                        "found and skipped at start-up)")
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
        samples = data.mean(axis=1)  # mono, as librosa.load(mono=True)
    except Exception as exc:
        raise DataError(f"cannot decode audio file {path!r}: {type(exc).__name__}: {exc}") from exc
    if rate != SAMPLE_RATE:  # librosa.load's resampling (slow to import; only when needed)
        librosa = require("librosa", "audio", f"resampling {rate} Hz audio to {SAMPLE_RATE} Hz")
        try:
            samples, _ = librosa.load(path, sr=SAMPLE_RATE)
        except Exception as exc:
            raise DataError(f"cannot decode audio file {path!r}: {type(exc).__name__}: {exc}") from exc
    if samples.size == 0:
        raise DataError(f"audio file {path!r} holds no samples")
    ensure_finite(samples, path, "audio file")  # float wavs can hold NaN/inf (clipping would hide an inf)
    reps = max(3, int(np.ceil(3 * SAMPLE_RATE / samples.size)))  # x3 as the paper; more only for clips < 1 s
    clip = np.clip(np.tile(samples, reps)[: SAMPLE_RATE * 3], -1.0, 1.0)
    return torch.from_numpy(np.log(stft_magnitude(clip) + 1e-7))


def list_frames(folder: str) -> list[str]:
    """Sorted image files of a clip's frame folder (empty list if the folder is missing)."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTENSIONS))


def pick_frames(count: int, num: int, rng: np.random.Generator | None) -> list[int]:
    """Indices of ``num`` frames out of ``count``: sorted random ones with ``rng``, else the centred run."""
    if count < 1:
        raise ValueError(f"count: expected >= 1 frame, got {count}")
    if rng is not None:
        if count >= num:
            return sorted(rng.choice(count, size=num, replace=False).tolist())
        return sorted(rng.integers(0, count, size=num).tolist())
    if count >= num:
        start = (count - num) // 2
        return list(range(start, start + num))
    return [min(count - 1, int(i * count / num)) for i in range(num)]


CROP_SCALE = (0.08, 1.0)
"""The training crop's area fraction range (torchvision's ``RandomResizedCrop`` default, the paper's pipelines)."""


def check_crop_scale(value) -> str | None:
    """None if ``value`` is null (no crop) or ``[low, high]`` with ``0 < low <= high <= 1``, else what was expected."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not 0.0 < value[0] <= value[1] <= 1.0):
        return "expected null (no crop) or [low, high] area fractions with 0 < low <= high <= 1"
    return None


def _random_resized_crop(width: int, height: int, rng: np.random.Generator,
                         scale: tuple[float, float] = CROP_SCALE) -> tuple[int, int, int, int]:
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    return 0, 0, width, height


def load_image(path: str, size: int, rng: np.random.Generator | None,
               crop_scale: tuple[float, float] | None = CROP_SCALE, flip: bool = True) -> np.ndarray:
    """One frame as float32 ``(3, size, size)``: training (``rng``): a random resized crop keeping a
    ``crop_scale`` fraction of the area (None: no crop) and, with ``flip``, a random horizontal flip;
    then a resize. Evaluation (no ``rng``): the resize only."""
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected an integer >= 1, got {size!r}")
    problem = check_crop_scale(crop_scale)
    if problem:
        raise ValueError(f"crop_scale: {problem}, got {crop_scale!r}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # decodes: 8-bit channels, so the values below are always finite
    except Exception as exc:
        raise DataError(f"cannot decode image file {path!r}: {type(exc).__name__}: {exc}") from exc
    if rng is not None and crop_scale is not None:
        im = im.crop(_random_resized_crop(im.width, im.height, rng, (float(crop_scale[0]), float(crop_scale[1]))))
    im = im.resize((size, size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    if rng is not None and flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_frames(folder: str, num: int, size: int, rng: np.random.Generator | None,
                crop_scale: tuple[float, float] | None = CROP_SCALE, flip: bool = True) -> torch.Tensor:
    """``num`` frames of ``folder`` as float32 ``(num, 3, size, size)`` (training augmentation: :func:`load_image`)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected an integer >= 1 frames, got {num!r}")
    files = list_frames(folder)
    if not files:
        raise DataError(f"frame folder {folder!r} is missing or holds no image")
    picked = pick_frames(len(files), num, rng)
    return torch.from_numpy(np.stack([load_image(files[i], size, rng, crop_scale, flip) for i in picked]))
