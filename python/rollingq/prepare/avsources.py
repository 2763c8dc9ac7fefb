"""The second, independent source of AV-digits files: other sounds (plucked strings) and other scans (digits
rendered from fonts, with scan-like distortions).

``rollingq prepare avdigits OUT --sounds plucks --scans fonts`` writes a set of the same layout and classes
whose files share nothing with the default one (synthetic vowels, scikit-learn's handwritten scans): a
check that a result on the default set is not a property of how its files were made. Both generators are
pure functions of the random generator they are given.

* :func:`pluck_clip` — class ``k`` is a short phrase of Karplus-Strong plucks (a two-note interval, then the
  upper note again), whose root and interval are specific to the class, jittered per clip, in white + brown
  background noise at a random SNR.
* :func:`font_scan` — the digit ``k`` drawn with one of the TrueType fonts matplotlib ships (DejaVu, STIX,
  Computer Modern), at a random height, width, position, rotation and stroke weight, blurred and downsampled to
  8 x 8 (the resolution of the scikit-learn scans); frames are made from it as from a scan (random contrast,
  background and pixel noise).
"""

from __future__ import annotations

import os

import numpy as np

from ..data.cremad import EMOTIONS
from ..data.media import SAMPLE_RATE
from ..extras import require

NUM_CLASSES = len(EMOTIONS)

#: Per class (digit 0..5): the root (Hz) and the interval (semitones) of the plucked phrase.
PLUCKS: tuple[tuple[float, int], ...] = (
    (196.0, 3),
    (247.0, 7),
    (165.0, 12),
    (294.0, 4),
    (220.0, 9),
    (131.0, 5),
)

FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
              "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf")
"""Fonts shipped in matplotlib's ``mpl-data/fonts/ttf`` (only those found are used)."""


def font_paths() -> list[str]:
    """The paths of the :data:`FONT_FILES` that the installed matplotlib ships (at least one).

    Raises:
        FileNotFoundError: none of them is there.
    """
    matplotlib = require("matplotlib", "analysis", "the fonts of the independent avdigits scans")
    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    found = [os.path.join(folder, name) for name in FONT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not found:
        raise FileNotFoundError(f"scans='fonts': none of {FONT_FILES} in {folder!r}")
    return found


def check_label(label: int) -> None:
    """Raise ValueError unless ``label`` is a class, 0..NUM_CLASSES-1."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label: expected 0..{NUM_CLASSES - 1}, got {label}")


def clip_samples(label: int, seconds: float) -> int:
    """The number of audio samples of a ``seconds`` long clip of class ``label`` (checked)."""
    check_label(label)
    return int(round(seconds * SAMPLE_RATE))


def background_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """White plus half as loud drift-free brown noise, float64 ``(n,)`` of unit RMS (both sources' clips)."""
    white = rng.standard_normal(n)
    brown = np.cumsum(rng.standard_normal(n))
    brown -= np.linspace(brown[0], brown[-1], n)
    noise = white / white.std() + 0.5 * brown / (brown.std() + 1e-12)
    return noise / np.sqrt(np.mean(noise**2))


def _pluck(freq: float, length: int, rng: np.random.Generator, decay: float) -> np.ndarray:
    """One Karplus-Strong pluck at ``freq`` Hz, ``length`` samples, normalised to unit RMS."""
    period = max(2, int(round(SAMPLE_RATE / freq)))
    buffer = rng.uniform(-1.0, 1.0, period)
    out = np.empty(length)
    for start in range(0, length, period):
        stop = min(length, start + period)
        out[start:stop] = buffer[: stop - start]
        buffer = decay * 0.5 * (buffer + np.roll(buffer, -1))
    return out / (np.sqrt(np.mean(out**2)) + 1e-12)


def pluck_clip(label: int, rng: np.random.Generator, seconds: float = 1.0,
               snr_db: tuple[float, float] = (-5.0, 10.0)) -> np.ndarray:
    """One clip of class ``label``: three plucks (root, root + interval, root + interval) in noise.

    Returns float32 ``(seconds * 22050,)`` in [-1, 1].
    """
    n = clip_samples(label, seconds)
    root, interval = PLUCKS[label]
    root *= rng.uniform(0.97, 1.03)
    upper = root * 2.0 ** (interval / 12.0)
    note = int(min(rng.uniform(0.12, 0.2), 0.3 * seconds) * SAMPLE_RATE)
    onset = int(rng.integers(0, n - 3 * note + 1))
    decay = rng.uniform(0.985, 0.996)
    signal = np.zeros(n)
    for k, freq in enumerate((root, upper, upper)):
        start = onset + k * note
        signal[start : start + note] += _pluck(freq, note, rng, decay)
    signal /= np.sqrt(np.mean(signal[onset : onset + 3 * note] ** 2)) + 1e-12
    snr = rng.uniform(*snr_db)
    mix = signal * 10.0 ** (snr / 20.0) + background_noise(n, rng)
    mix *= rng.uniform(0.2, 0.6) / np.max(np.abs(mix))
    return mix.astype(np.float32)


def font_scan(label: int, rng: np.random.Generator, fonts: list[str]) -> np.ndarray:
    """The digit ``label`` rendered from a random font of ``fonts`` with scan-like distortions, at the
    scikit-learn scans' resolution and scale: float64 ``(8, 8)`` grey levels 0..16 (frames:
    :func:`rollingq.prepare.avdigits.digit_frame`)."""
    check_label(label)
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    big = 128
    font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size=96)
    glyph = Image.new("L", (2 * big, 2 * big), 0)
    draw = ImageDraw.Draw(glyph)
    draw.text((big // 2, big // 2), str(label), fill=255, font=font, stroke_width=int(rng.integers(3, 9)),
              stroke_fill=255)
    glyph = glyph.crop(glyph.getbbox())
    height = int(big * rng.uniform(0.7, 0.92))
    width = max(8, min(big - 8, int(glyph.width * height / glyph.height * rng.uniform(0.85, 1.15))))
    glyph = glyph.resize((width, height), Image.BILINEAR)
    im = Image.new("L", (big, big), 0)
    x = int((big - width) / 2 + rng.uniform(-6, 6))
    y = int((big - height) / 2 + rng.uniform(-6, 6))
    im.paste(glyph, (x, y))
    im = im.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return np.asarray(im.resize((8, 8), Image.BOX), dtype=np.float64) * (16.0 / 255.0)
