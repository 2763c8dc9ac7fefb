"""Test fixtures: tiny on-disk datasets in the real layouts.

Each writer fills a folder with random but well-formed files (wav via
soundfile, JPEG frames via Pillow, ``.npy`` fbanks, a MultiBench-style pickle)
and returns the folder. Labels are random; nothing here is meant to be learnable.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
from rollingq.data.cremad import EMOTIONS
from rollingq.data.mosei import npz_arrays


def _frames(folder: str, count: int, rng: np.random.Generator, size: tuple[int, int] = (40, 30)) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"frame_{i:05d}.jpg"), quality=85)


def _write_lists(root: str, counts: dict[str, int], extension: str, encoding: str, sample) -> None:
    """Write the list file ``<split><extension>`` of each split: line ``i`` is ``sample(split, i)``,
    which also writes that sample's files."""
    for split, n in counts.items():
        lines = [sample(split, i) for i in range(n)]
        with open(os.path.join(root, f"{split}{extension}"), "w", encoding=encoding) as f:
            f.write("\n".join(lines) + "\n")


def write_tiny_cremad(root: str, n_train: int = 11, n_test: int = 5, seed: int = 0, frames: int = 2) -> str:
    """CREMA-D layout: ``AudioWAV/*.wav`` (0.7 s at 22,050 Hz), ``Image-01-FPS/<clip>/*.jpg``, csv lists (BOM)."""
    import soundfile

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "AudioWAV"), exist_ok=True)

    def sample(split: str, i: int) -> str:
        clip = f"10{i:02d}_{split.upper()}_{EMOTIONS[i % 6]}_XX"
        audio = (0.3 * rng.standard_normal(int(0.7 * 22050))).astype(np.float32)
        soundfile.write(os.path.join(root, "AudioWAV", clip + ".wav"), audio, 22050)
        _frames(os.path.join(root, "Image-01-FPS", clip), frames, rng)
        return f"{clip},{EMOTIONS[int(rng.integers(0, 6))]}"

    _write_lists(root, {"train": n_train, "test": n_test}, ".csv", "utf-8-sig", sample)
    return root


def write_tiny_kinetics(
    root: str, n_train: int = 9, n_test: int = 4, seed: int = 0, fbank_frames: int = 1024, frames: int = 3,
    comma: bool = False, class_names: bool = False,
) -> str:
    """Kinetics-Sounds layout: ``audio/*.npy`` fbanks ``(fbank_frames, 128)``, ``visual/<name>/*.jpg``, list files.

    Args:
        comma: write ``name,start,label`` lines instead of ``name start label``.
        class_names: labels as class names (``class_03``) instead of ids.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "audio"), exist_ok=True)

    def sample(split: str, i: int) -> str:
        name = f"{split}_{i:03d}"
        fbank = rng.standard_normal((fbank_frames, 128)).astype(np.float32)
        np.save(os.path.join(root, "audio", name + ".npy"), fbank)
        _frames(os.path.join(root, "visual", name), frames, rng)
        label = i % 31 if split == "train" else i % min(n_train, 31)
        raw = f"class_{label:02d}" if class_names else str(label)
        return f"{name},{i},{raw}" if comma else f"{name} {i} {raw}"

    _write_lists(root, {"train": n_train, "test": n_test}, ".txt", "utf-8", sample)
    return root


def write_tiny_mosei(root: str, sizes: tuple[int, int, int] = (13, 7, 5), seq_len: int = 50, seed: int = 0,
                     npz: bool = True) -> str:
    """A MultiBench-style ``mosei_senti_data.pkl`` with ``-inf`` entries in the audio features and, with
    ``npz``, its conversion ``mosei_senti_data.npz`` (``rollingq prepare mosei``), which the loader reads."""
    rng = np.random.default_rng(seed)
    content = {}
    for key, n in zip(("train", "valid", "test"), sizes):
        audio = rng.standard_normal((n, seq_len, 74)).astype(np.float32)
        audio[:, :3, :5] = -np.inf
        content[key] = {
            "vision": rng.standard_normal((n, seq_len, 35)).astype(np.float32),
            "audio": audio,
            "text": rng.standard_normal((n, seq_len, 300)).astype(np.float32),
            "labels": rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32),
        }
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "mosei_senti_data.pkl")
    with open(path, "wb") as f:
        pickle.dump(content, f)
    os.chmod(path, 0o644)
    if npz:  # what `rollingq prepare mosei` writes, made from the content in memory (no unpickling)
        np.savez(os.path.join(root, "mosei_senti_data.npz"), **npz_arrays(content, path))
    return root
