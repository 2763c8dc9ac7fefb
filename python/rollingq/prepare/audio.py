"""Audio features of the Kinetics-Sounds layouts, from mono float32 samples.

* :func:`paper_spectrogram` — the paper's ``257 × 1004`` spectrogram ("librosa, window 512, overlap
  353"): the recipe of the field's Kinetics-Sounds preprocessing (OGM-GE's
  ``obtain_audio_spectrogram.py``, which the RollingQ authors' group published): audio loaded at
  librosa's default 22,050 Hz, tiled to 160,000 samples (7.26 s), clipped to [-1, 1],
  ``scipy.signal.spectrogram(nperseg=512, noverlap=353)`` (Tukey window, hop 159, power spectral
  density), ``log(S + 1e-7)``, standardized per clip. Layout ``(freq 257, time 1004)``.
* :func:`kaldi_fbank` — 128 log-mel filterbanks in the AST recipe (Kaldi's ``compute-fbank-feats`` as
  ``torchaudio.compliance.kaldi.fbank(htk_compat=True, window_type="hanning", num_mel_bins=128,
  dither=0)`` computes them) at 16 kHz: 25 ms frames every 10 ms. Layout ``(time, 128)``, about 998
  frames for 10 s; not normalized.
"""

from __future__ import annotations

import math

import numpy as np

from ..extras import require

SPECTROGRAM_RATE = 22050
SPECTROGRAM_SAMPLES = 160_000
FBANK_RATE = 16000
FBANK_BINS = 128


def paper_spectrogram(samples: np.ndarray) -> np.ndarray:
    """The paper's Kinetics-Sounds spectrogram of 22,050 Hz mono samples: float32 ``(257, 1004)``.

    Clips shorter than 16,000 samples are tiled more than the recipe's 10 times, so that every clip
    fills the 160,000 samples (the recipe itself would give fewer time frames for them).
    """
    signal = require("scipy.signal", "prepare", "the Kinetics-Sounds spectrogram")
    if samples.size == 0:
        raise ValueError("no audio samples")
    reps = max(10, math.ceil(SPECTROGRAM_SAMPLES / samples.size))
    clip = np.clip(np.tile(samples.astype(np.float32), reps)[:SPECTROGRAM_SAMPLES], -1.0, 1.0)
    _freqs, _times, spec = signal.spectrogram(clip, SPECTROGRAM_RATE, nperseg=512, noverlap=353)
    spec = np.log(spec + 1e-7)
    spec = (spec - spec.mean()) / (spec.std() + 1e-9)
    return spec.astype(np.float32)


def _mel(freq: np.ndarray | float) -> np.ndarray | float:
    return 1127.0 * np.log(1.0 + np.asarray(freq) / 700.0)


def mel_banks(num_bins: int, padded_window: int, rate: float, low: float = 20.0, high: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters ``(num_bins, padded_window // 2 + 1)`` (the Nyquist column zero)."""
    nyquist = 0.5 * rate
    high = high + nyquist if high <= 0.0 else high
    mel_low, mel_high = float(_mel(low)), float(_mel(high))
    delta = (mel_high - mel_low) / (num_bins + 1)
    bins = np.arange(num_bins, dtype=np.float64)[:, None]
    left, center, right = mel_low + bins * delta, mel_low + (bins + 1) * delta, mel_low + (bins + 2) * delta
    mel = _mel(rate / padded_window * np.arange(padded_window // 2, dtype=np.float64))[None, :]
    weights = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
    return np.pad(weights, ((0, 0), (0, 1)))


def kaldi_fbank(samples: np.ndarray, rate: int = FBANK_RATE, num_bins: int = FBANK_BINS) -> np.ndarray:
    """Log-mel filterbanks of mono samples at ``rate`` Hz: float32 ``(frames, num_bins)``.

    Kaldi's defaults where AST keeps them (25 ms frames, 10 ms shift, ``snip_edges``, DC offset
    removed per frame, pre-emphasis 0.97, power spectrum of the frame zero-padded to a power of 2,
    mel filters from 20 Hz to Nyquist, ``log(max(E, float32 eps))``) with AST's choices (the
    waveform's mean removed first, a symmetric Hann window, no dither).
    """
    window = int(rate * 0.025)
    shift = int(rate * 0.010)
    if samples.size < window:
        raise ValueError(f"audio of {samples.size} samples is shorter than one {window}-sample frame")
    wave = samples.astype(np.float64) - samples.mean()
    count = 1 + (wave.size - window) // shift
    frames = np.lib.stride_tricks.sliding_window_view(wave, window)[::shift][:count].copy()
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= 0.97 * frames[:, :-1].copy()
    frames[:, 0] -= 0.97 * frames[:, 0]
    frames *= np.hanning(window)[None, :]
    padded = 1 << (window - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=padded, axis=1)) ** 2
    energies = power @ mel_banks(num_bins, padded, rate).T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)
