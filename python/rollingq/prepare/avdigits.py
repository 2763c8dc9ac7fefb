"""AV-digits: a small audio-visual dataset written as files in the CREMA-D layout.

``write_avdigits(root)`` (the command ``rollingq prepare avdigits ROOT``) writes::

    ROOT/AudioWAV/<clip>.wav            1 s, 22,050 Hz, 16-bit mono
    ROOT/Image-01-FPS/<clip>/frame_00000.jpg
    ROOT/train.csv, ROOT/test.csv       rows "clip,EMOTION" (CREMA-D's six labels)
    ROOT/avdigits.json                  what was written and from which settings

so that the unmodified CREMA-D loader (:class:`~rollingq.data.cremad.CremaDDataset`:
WAV -> STFT -> ViT patches, JPEG -> ViT patches) reads it. It uses only what the
installed packages ship, nothing is downloaded:

* **Frames (the weak modality)**: real scans, scikit-learn's bundled handwritten
  digits (``sklearn.datasets.load_digits``: 8x8 grey levels 0..16, UCI
  Optical Recognition of Handwritten Digits). Digits 0..5 are the six classes;
  each clip gets its own scan, enlarged x4 to 32x32 pixels, with random
  contrast, background level and Gaussian pixel noise. The training
  loader's random resized crop (as for CREMA-D) often cuts part of the digit away.
* **Audio (the dominant, easy modality)**: one synthetic "spoken vowel" per
  clip: a harmonic tone whose pitch (f0) and two formants (F1, F2) are specific
  to the class (jittered per clip), 0.25-0.6 s long at a random onset, in
  white + brown background noise at a random SNR (-5 to 10 dB by default).

Label ``k`` (digit ``k``) is written as ``EMOTIONS[k]`` (NEU, HAP, SAD, FEA, DIS, ANG).
Everything is a pure function of ``seed``: the same seed writes byte-identical
files. The folder is written into a temporary sibling and renamed into place;
a non-empty ``root`` is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile

import numpy as np

from ..data.cremad import EMOTIONS
from ..data.media import SAMPLE_RATE
from ..extras import require
from . import avsources

logger = logging.getLogger("rollingq.data")

FORMAT_VERSION = 2
SOUNDS = ("vowels", "plucks")
"""Audio sources: synthetic vowels (the default) or plucked strings (:mod:`rollingq.prepare.avsources`)."""
SCANS = ("digits", "fonts")
"""Frame sources: scikit-learn's handwritten scans (the default) or digits rendered from fonts."""
SPLIT_IDS = {"train": 1, "test": 2, "pretrain": 3}
"""Each split's own stream of per-clip random numbers (a clip's files depend on (seed, split, position))."""
NUM_CLASSES = len(EMOTIONS)
CANVAS = 32
"""Side of the written frames (pixels); the loader resizes them to ``data.image_size``."""

#: Per class (digit 0..5): fundamental frequency f0 and the two formants F1, F2 (Hz), roughly the
#: vowels /a/, /i/, /u/, /e/, /o/, /ae/ at different pitches.
VOICES: tuple[tuple[float, float, float], ...] = (
    (110.0, 730.0, 1090.0),
    (140.0, 270.0, 2290.0),
    (175.0, 300.0, 870.0),
    (220.0, 530.0, 1840.0),
    (275.0, 570.0, 840.0),
    (345.0, 660.0, 1720.0),
)


def _check_count(value: int, name: str, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if value > most:
        raise ValueError(f"{name}: expected at most {most} (scans per digit in scikit-learn's digits), got {value}")
    return value


def load_digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digit scans 0..5: float64 ``(N, 8, 8)`` grey levels 0..16 and int ``(N,)`` labels."""
    datasets = require("sklearn.datasets", "prepare", "the avdigits frames (scikit-learn's bundled digit scans)")
    digits = datasets.load_digits()
    keep = digits.target < NUM_CLASSES
    return digits.images[keep].astype(np.float64), digits.target[keep].astype(np.int64)


def digit_frame(scan: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One frame: ``scan`` (8x8, 0..16) enlarged x4 to 32x32, random contrast, background and pixel noise;
    uint8 RGB ``(32, 32, 3)``."""
    big = np.kron(scan / 16.0, np.ones((CANVAS // 8, CANVAS // 8)))  # (32, 32) in [0, 1]
    contrast = rng.uniform(0.5, 1.0)
    background = rng.uniform(0.0, 0.3)
    grey = background + contrast * big + rng.normal(0.0, rng.uniform(0.05, 0.15), size=big.shape)
    grey = np.clip(np.round(grey * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def vowel_clip(label: int, rng: np.random.Generator, seconds: float = 1.0,
               snr_db: tuple[float, float] = (-5.0, 10.0)) -> np.ndarray:
    """One clip of class ``label``: a class-specific vowel in background noise.

    Returns float32 ``(seconds * 22050,)`` in [-1, 1].
    """
    n = avsources.clip_samples(label, seconds)
    f0, f1, f2 = VOICES[label]
    f0 *= rng.uniform(0.97, 1.03)
    f1 *= rng.uniform(0.95, 1.05)
    f2 *= rng.uniform(0.95, 1.05)
    duration = min(rng.uniform(0.25, 0.6), 0.9 * seconds)
    length = int(duration * SAMPLE_RATE)
    onset = int(rng.integers(0, n - length + 1))
    t = np.arange(length) / SAMPLE_RATE
    glide = 1.0 + rng.uniform(-0.08, 0.08) * t / duration  # a slight pitch glide
    phase = 2.0 * np.pi * f0 * np.cumsum(glide) / SAMPLE_RATE
    voice = np.zeros(length)
    for h in range(1, int(5000 // f0) + 1):
        freq = h * f0
        gain = np.exp(-0.5 * ((freq - f1) / 90.0) ** 2) + 0.7 * np.exp(-0.5 * ((freq - f2) / 120.0) ** 2) + 0.02
        voice += gain * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    ramp = min(length // 4, int(0.03 * SAMPLE_RATE))
    envelope = np.ones(length)
    envelope[:ramp] = np.linspace(0.0, 1.0, ramp)
    envelope[length - ramp :] = np.linspace(1.0, 0.0, ramp)
    voice *= envelope
    voice /= np.sqrt(np.mean(voice**2)) + 1e-12
    noise = avsources.background_noise(n, rng)
    snr = rng.uniform(*snr_db)
    signal = np.zeros(n)
    signal[onset : onset + length] = voice * 10.0 ** (snr / 20.0)
    mix = signal + noise
    mix *= rng.uniform(0.2, 0.6) / np.max(np.abs(mix))
    return mix.astype(np.float32)


def _split_indices(labels: np.ndarray, counts: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Disjoint scan indices per split, ``counts[split]`` per class (test first, then train, then pretrain)."""
    out: dict[str, list[int]] = {split: [] for split in counts}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for split, count in counts.items():
            out[split].extend(idx[start : start + count].tolist())
            start += count
    order = [split for split in ("train", "test", "pretrain") if split in out]  # the order of format 1
    return {split: rng.permutation(np.array(out[split], dtype=np.int64)) for split in order}


def _prepare_target(root: str, overwrite: bool) -> None:
    if os.path.lexists(root) and not os.path.isdir(root):
        raise FileExistsError(f"root: {root!r} exists and is not a folder")
    if os.path.isdir(root) and os.listdir(root) and not overwrite:
        raise FileExistsError(f"root: {root!r} is not empty; choose another folder or pass overwrite=True "
                              "(--overwrite)")


def _check_options(seed, counts: dict[str, int], clip_seconds, snr_db, sounds: str, scans: str
                   ) -> tuple[float, float]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    if sounds not in SOUNDS:
        raise ValueError(f"sounds: expected one of {SOUNDS}, got {sounds!r}")
    if scans not in SCANS:
        raise ValueError(f"scans: expected one of {SCANS}, got {scans!r}")
    most = 10**6
    if scans == "digits":
        _, labels = load_digit_scans()
        most = int(np.bincount(labels, minlength=NUM_CLASSES).min())
    for split, count in counts.items():
        if split == "pretrain" and count == 0:
            continue
        _check_count(count, f"{split}_per_class", most)
    if sum(counts.values()) > most:
        order = [split for split in ("train", "test", "pretrain") if split in counts]
        names = " + ".join(f"{split}_per_class" for split in order)
        values = " + ".join(str(counts[split]) for split in order)
        raise ValueError(f"{names}: expected at most {most} (scans per digit in scikit-learn's digits, "
                         f"each used once), got {values}")
    if not 0.3 <= float(clip_seconds) <= 3.0:
        raise ValueError(f"clip_seconds: expected 0.3..3.0, got {clip_seconds!r}")
    try:
        lo, hi = (float(v) for v in snr_db)
    except (TypeError, ValueError):
        raise ValueError(f"snr_db: expected (low, high) in dB, got {snr_db!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise ValueError(f"snr_db: expected (low, high) with low <= high, got {snr_db!r}")
    return lo, hi


def write_avdigits(
    root: str,
    seed: int = 0,
    train_per_class: int = 120,
    test_per_class: int = 50,
    clip_seconds: float = 1.0,
    snr_db: tuple[float, float] = (-5.0, 10.0),
    overwrite: bool = False,
    pretrain_per_class: int = 0,
    sounds: str = "vowels",
    scans: str = "digits",
    frames_per_clip: int = 1,
    blank_frames: float = 0.0,
) -> str:
    """Write the AV-digits dataset into ``root`` (CREMA-D layout, see the module docstring); returns ``root``.

    Args:
        root: the dataset folder (created; must be missing or empty unless ``overwrite``).
        seed: every random choice (split, frame placement, audio) derives from it.
        train_per_class, test_per_class: clips per class in ``train.csv`` / ``test.csv``.
        clip_seconds: audio length (the loader tiles clips shorter than 3 s).
        snr_db: the range of the background-noise SNR of the audio, in dB.
        overwrite: replace a non-empty ``root``.
        pretrain_per_class: clips per class in ``pretrain.csv`` (0: none), a split disjoint from the other
            two (other scans, other sounds) for unimodal pre-training of the encoders
            (``model.init_encoders``). With ``scans="digits"`` the three counts together are at most 177
            per class (the scans of the rarest digit; each scan is used once).
        sounds: ``vowels`` (default) or ``plucks`` (:func:`rollingq.prepare.avsources.pluck_clip`).
        scans: ``digits`` (scikit-learn's handwritten scans, default) or ``fonts``
            (:func:`rollingq.prepare.avsources.font_scan`).
        frames_per_clip: frames written per clip (``frame_00000.jpg`` …), each the clip's scan with its own
            contrast, background and pixel noise; the loader reads ``data.num_frames`` of them (4 ViT
            tokens per 32 px frame).
        blank_frames: the fraction of clips (drawn per clip) whose frames show no digit, only background
            and noise: the frames carry the label on the other clips only, as the audio does on the clips
            whose SNR leaves the vowel audible (the two modalities fail on different clips).
    """
    counts = {"test": test_per_class, "train": train_per_class, "pretrain": pretrain_per_class}
    lo, hi = _check_options(seed, counts, clip_seconds, snr_db, sounds, scans)
    if isinstance(frames_per_clip, bool) or not isinstance(frames_per_clip, int) or not 1 <= frames_per_clip <= 64:
        raise ValueError(f"frames_per_clip: expected an integer 1..64, got {frames_per_clip!r}")
    if isinstance(blank_frames, bool) or not isinstance(blank_frames, (int, float)) or not 0 <= blank_frames < 1:
        raise ValueError(f"blank_frames: expected a fraction in [0, 1), got {blank_frames!r}")
    root = os.path.abspath(root)
    _prepare_target(root, overwrite)

    soundfile = require("soundfile", "audio", "writing the avdigits WAV files")
    image = require("PIL.Image", "train", "writing the avdigits JPEG frames")
    if scans == "digits":
        scan_images, labels = load_digit_scans()
    else:  # no scans: labels cycle through the classes, each frame is rendered
        fonts = avsources.font_paths()
        labels = np.tile(np.arange(NUM_CLASSES), sum(counts.values()))
    sound = vowel_clip if sounds == "vowels" else avsources.pluck_clip

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.", suffix=".tmp", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "AudioWAV"))
        split_rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD161]))
        indices = _split_indices(labels, {k: v for k, v in counts.items() if v > 0}, split_rng)
        for split, picked in indices.items():
            lines = []
            for i, scan_index in enumerate(picked.tolist()):
                label = int(labels[scan_index])
                clip = f"{split}{i:04d}_D{label}_{EMOTIONS[label]}"
                rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], i]))
                audio = sound(label, rng, float(clip_seconds), (lo, hi))
                soundfile.write(os.path.join(tmp, "AudioWAV", clip + ".wav"), audio, SAMPLE_RATE, subtype="PCM_16")
                folder = os.path.join(tmp, "Image-01-FPS", clip)
                os.makedirs(folder)
                scan = scan_images[scan_index] if scans == "digits" else avsources.font_scan(label, rng, fonts)
                blank = np.random.default_rng(np.random.SeedSequence([seed, 0xB1A4, SPLIT_IDS[split], i]))
                if blank_frames and blank.random() < blank_frames:  # its own stream: other clips are unchanged
                    scan = np.zeros_like(scan)
                for f in range(frames_per_clip):  # one scan, filmed: each frame its own contrast and noise
                    image.fromarray(digit_frame(scan, rng)).save(os.path.join(folder, f"frame_{f:05d}.jpg"),
                                                                 quality=95)
                lines.append(f"{clip},{EMOTIONS[label]}")
            with open(os.path.join(tmp, f"{split}.csv"), "w", encoding="utf-8", newline="\n") as f:
                f.write("clip,label\n" + "\n".join(lines) + "\n")
        manifest = {
            "dataset": "avdigits", "format_version": FORMAT_VERSION, "seed": seed,
            **{split: int(picked.size) for split, picked in indices.items()}, "classes": list(EMOTIONS),
            "digits": list(range(NUM_CLASSES)), "clip_seconds": float(clip_seconds), "snr_db": [lo, hi],
            "sample_rate": SAMPLE_RATE, "frame_size": CANVAS, "sounds": sounds, "scans": scans,
            "frames_per_clip": frames_per_clip, "blank_frames": float(blank_frames),
            "frames": ("scikit-learn load_digits (UCI Optical Recognition of Handwritten Digits), digits 0-5"
                       if scans == "digits" else "digits 0-5 rendered from matplotlib's fonts, scan-like distortions"),
        }
        with open(os.path.join(tmp, "avdigits.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        _install(tmp, root, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("avdigits: wrote %s clips into %s", ", ".join(f"{p.size} {s}" for s, p in indices.items()), root)
    return root


def _install(tmp: str, root: str, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``root`` (rename; an old ``root`` is removed only after)."""
    _prepare_target(root, overwrite)  # again: something may have appeared meanwhile
    old = None
    if os.path.isdir(root):
        old = root + ".old-" + os.path.basename(tmp)
        os.rename(root, old)
    os.rename(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


HELP = "write the AV-digits set (generated audio + scikit-learn's digit scans) in the CREMA-D layout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``rollingq prepare avdigits``."""
    parser.add_argument("out", metavar="OUT", help="the dataset folder to write (missing or empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=120, metavar="N")
    parser.add_argument("--test-per-class", type=int, default=50, metavar="N")
    parser.add_argument("--pretrain-per-class", type=int, default=0, metavar="N",
                        help="also write pretrain.csv: N clips per class with scans of their own, for unimodal "
                             "pre-training (model.init_encoders); default 0 (none)")
    parser.add_argument("--snr-db", type=float, nargs=2, default=(-5.0, 10.0), metavar=("LOW", "HIGH"),
                        help="the audio's background-noise SNR range in dB (default -5 10)")
    parser.add_argument("--sounds", choices=SOUNDS, default="vowels",
                        help="vowels (default) or plucks (plucked strings: the independent set)")
    parser.add_argument("--scans", choices=SCANS, default="digits",
                        help="digits (scikit-learn's handwritten scans, default) or fonts (digits rendered from "
                             "fonts: the independent set)")
    parser.add_argument("--frames-per-clip", type=int, default=1, metavar="F",
                        help="frames written per clip (default 1), each with its own contrast and noise; read "
                             "data.num_frames of them")
    parser.add_argument("--blank-frames", type=float, default=0.0, metavar="P",
                        help="the fraction of clips whose frames show no digit (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def run(args: argparse.Namespace) -> str:
    """``rollingq prepare avdigits``: write the set; returns its folder."""
    return write_avdigits(args.out, seed=args.seed, train_per_class=args.train_per_class,
                          test_per_class=args.test_per_class, pretrain_per_class=args.pretrain_per_class,
                          snr_db=tuple(args.snr_db), sounds=args.sounds, scans=args.scans,
                          frames_per_clip=args.frames_per_clip, blank_frames=args.blank_frames,
                          overwrite=args.overwrite)
