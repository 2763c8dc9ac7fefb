"""Decoding raw clips with PyAV (its own FFmpeg inside the wheel; no system binary) and writing the layouts.

* :func:`sample_frames` — frames at 1 fps: the frame nearest to the middle of each second
  (``t = i + 0.5``, as the field's ``video2frame-1fps`` scripts pick ``round((i + 0.5)·fps)``).
* :func:`decode_audio` — the audio track (or a wav file) as mono float32 at a given rate:
  channels averaged, resampled by FFmpeg's resampler.
* :func:`write_wav`, :func:`write_frames`, :func:`write_npy` — atomic writes (a temporary name,
  then a rename), so an interrupted run leaves complete files only and can be run again.
"""

from __future__ import annotations

import math
import os
import shutil
import wave
from typing import Any

import numpy as np

from ..extras import require
from ..files import atomic_write_bytes

VIDEO_EXTENSIONS = (".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov", ".m4v")


def _av() -> Any:
    """PyAV, or :class:`~rollingq.extras.MissingExtra` naming the ``[prepare]`` extra (checked before any clip)."""
    return require("av", "prepare", "rollingq prepare (decoding video)")


require_decoder = _av


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def frame_times(duration: float, fps: float = 1.0, limit: int | None = None) -> list[float]:
    """The sampling times of a clip of ``duration`` seconds: ``(i + 0.5) / fps``, at least one, at most ``limit``."""
    count = max(1, math.floor(duration * fps + 1e-6))
    if limit is not None:
        count = min(count, limit)
    times = [(i + 0.5) / fps for i in range(count)]
    return [min(t, duration / 2) if count == 1 else t for t in times]


def sample_frames(path: str, fps: float = 1.0, limit: int | None = None) -> list[Any]:
    """``PIL.Image`` frames of the video at ``path`` at ``fps`` frames per second (see :func:`frame_times`).

    Raises:
        ValueError: the file has no video stream or no decodable frame.
    """
    av = _av()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        duration = _duration(container, stream)
        decoded = None
        if duration is None:  # unknown length: decode once to measure it
            decoded = [(f.time, f) for f in container.decode(stream)]
            if not decoded:
                raise ValueError("no decodable video frame")
            duration = decoded[-1][0] + 1.0 / float(stream.average_rate or 25)
        targets = frame_times(duration, fps, limit)
        chosen: list[Any] = []
        previous = None
        frames = iter(decoded) if decoded is not None else ((f.time, f) for f in container.decode(stream))
        for time, frame in frames:
            while len(chosen) < len(targets) and time is not None and time >= targets[len(chosen)]:
                target = targets[len(chosen)]
                best = frame if previous is None or abs(time - target) <= abs(previous[0] - target) else previous[1]
                chosen.append(best.to_image())
            if len(chosen) == len(targets):
                break
            previous = (time, frame)
        if previous is None and not chosen:
            raise ValueError("no decodable video frame")
        while len(chosen) < len(targets):  # the stream ended before the last target: its last frame
            chosen.append(previous[1].to_image())
    return chosen


def decode_audio(path: str, rate: int) -> np.ndarray | None:
    """Mono float32 samples of the first audio stream of ``path`` at ``rate`` Hz, or None without audio."""
    av = _av()
    with av.open(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name if stream.layout else None, rate=rate)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):  # flush
            chunks.append(out.to_ndarray())
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)  # channels averaged, as librosa's mono


def write_wav(path: str, samples: np.ndarray, rate: int) -> None:
    """16-bit PCM mono wav (the release's own format), written atomically."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    tmp = f"{path}.wav-tmp.{os.getpid()}"
    with wave.open(tmp, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def write_npy(path: str, array: np.ndarray) -> None:
    """A ``.npy`` file (no pickle), written atomically."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(buffer.getvalue(), path)


def write_frames(folder: str, images: list[Any], quality: int = 95) -> None:
    """``frame_00001.jpg``, … into ``folder``, which appears complete or not at all."""
    tmp = f"{folder}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for i, image in enumerate(images, start=1):
        image.convert("RGB").save(os.path.join(tmp, f"frame_{i:05d}.jpg"), quality=quality)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def find_videos(root: str) -> list[str]:
    """Video files under ``root`` (recursively), sorted."""
    found = []
    for folder, _dirs, files in os.walk(root):
        found.extend(os.path.join(folder, f) for f in files if f.lower().endswith(VIDEO_EXTENSIONS))
    return sorted(found)
