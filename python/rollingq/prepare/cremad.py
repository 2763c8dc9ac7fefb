"""``rollingq prepare cremad RAW OUT``: the CREMA-D release to the layout :mod:`rollingq.data.cremad` reads.

Input (``RAW``, the release as published): the videos (``VideoFlash/<clip>.flv``, or any
``<clip>.mp4`` / ``.flv`` / … below ``RAW``) and, when present, ``AudioWAV/<clip>.wav`` (the release's
16 kHz audio; otherwise the video's audio track is used). Clip names are ``Actor_Sentence_EMOTION_Level``
(``1001_DFA_ANG_XX``); the emotion is the label.

Output (``OUT``, the loader's ``data.root``):

* ``AudioWAV/<clip>.wav`` — mono 16-bit PCM at 22,050 Hz (the loader's rate: no resampling at load);
* ``Image-01-FPS/<clip>/frame_00001.jpg …`` — frames at 1 fps, the frame nearest the middle of each second;
* ``train.csv``, ``test.csv`` — ``clip,EMOTION`` rows: the lists given with ``--lists DIR`` (the paper used
  OGM-GE's ``train.csv`` / ``test.csv``: 6,698 / 744 clips), else a seeded clip-level hold-out of
  ``--test-fraction`` (not the paper's split).

A clip whose outputs exist is skipped (a rerun continues an interrupted one; ``--overwrite`` redoes it).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import numpy as np

from ..data.common import DataError
from ..data.cremad import EMOTIONS, read_cremad_list
from ..data.media import SAMPLE_RATE
from .common import check_problems, check_separate_folders, clip_error, run_jobs, write_lines
from .media import decode_audio, find_videos, require_decoder, sample_frames, write_frames, write_wav

logger = logging.getLogger("rollingq.prepare")

HELP = "CREMA-D videos (+ AudioWAV) -> 22,050 Hz wav, 1-fps frames, train.csv / test.csv"


@dataclass(frozen=True)
class ClipJob:
    """One clip: its video, its release wav (or None) and the output paths."""

    clip: str
    video: str
    wav: str | None
    out_wav: str
    out_frames: str
    overwrite: bool


def emotion_of(clip: str) -> str | None:
    """The emotion code of a CREMA-D clip name (``1001_DFA_ANG_XX`` -> ``ANG``), or None."""
    parts = clip.split("_")
    return parts[2].upper() if len(parts) >= 3 and parts[2].upper() in EMOTIONS else None


def prepare_clip(job: ClipJob) -> str | None:
    """Write one clip's wav and frames; None when done, else the problem."""
    if not job.overwrite and os.path.isfile(job.out_wav) and os.path.isdir(job.out_frames):
        return None
    try:
        samples = decode_audio(job.wav or job.video, SAMPLE_RATE)
        if samples is None or samples.size == 0:
            return f"{job.wav or job.video}: no audio"
        frames = sample_frames(job.video, fps=1.0)
        write_wav(job.out_wav, samples, SAMPLE_RATE)
        write_frames(job.out_frames, frames)
    except Exception as exc:  # a corrupt or unreadable clip: reported with its path, the others go on
        return clip_error(job.video, exc)
    return None


def split_clips(clips: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded clip-level split ``(train, test)`` of sorted clip names."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction: expected a value in (0, 1), got {test_fraction!r}")
    if len(clips) < 2:
        raise DataError(f"cannot split {len(clips)} clip(s) into train and test; need at least 2")
    order = np.random.default_rng(seed).permutation(len(clips))
    n_test = min(len(clips) - 1, max(1, round(test_fraction * len(clips))))
    test = sorted(clips[i] for i in order[:n_test])
    return sorted(set(clips) - set(test)), test


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raw", metavar="RAW", help="the CREMA-D release (VideoFlash/, AudioWAV/)")
    parser.add_argument("out", metavar="OUT", help="the dataset folder to write (data.root)")
    parser.add_argument("--lists", metavar="DIR", help="take train.csv / test.csv from DIR (the paper's split)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="without --lists: the test share")
    parser.add_argument("--seed", type=int, default=0, help="without --lists: the split's seed")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="redo clips whose outputs exist")
    parser.add_argument("--skip-bad", action="store_true", help="leave clips that fail out of the lists")


def run(args: argparse.Namespace) -> str:
    """Prepare ``args.raw`` into ``args.out``; return a one-line summary."""
    return prepare_cremad(args.raw, args.out, lists=args.lists, test_fraction=args.test_fraction, seed=args.seed,
                          jobs=args.jobs, overwrite=args.overwrite, skip_bad=args.skip_bad)


def prepare_cremad(raw: str, out: str, *, lists: str | None = None, test_fraction: float = 0.1, seed: int = 0,
                   jobs: int = 1, overwrite: bool = False, skip_bad: bool = False) -> str:
    """Write the CREMA-D layout of the release at ``raw`` into ``out`` (see the module docstring)."""
    if not os.path.isdir(raw):
        raise FileNotFoundError(f"RAW: no folder at {raw!r}")
    if jobs < 1:
        raise ValueError(f"--jobs: expected an int >= 1, got {jobs}")
    require_decoder()
    check_separate_folders(raw, out)  # before anything is read or written
    videos: dict[str, str] = {}
    unnamed = []
    for path in find_videos(raw):
        clip = os.path.splitext(os.path.basename(path))[0]
        if emotion_of(clip) is None:
            unnamed.append(path)
        elif clip in videos:
            raise DataError(f"{raw}: clip {clip!r} twice ({videos[clip]} and {path})")
        else:
            videos[clip] = path
    if unnamed:
        logger.warning("%d video(s) without a CREMA-D name (Actor_Sentence_EMOTION_Level) ignored, e.g. %s",
                       len(unnamed), unnamed[0])
    if not videos:
        raise DataError(f"{raw}: no CREMA-D video (e.g. VideoFlash/1001_DFA_ANG_XX.flv) found")
    for folder in ("AudioWAV", "Image-01-FPS"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    wav_dir = os.path.join(raw, "AudioWAV")
    job_list = [
        ClipJob(clip, video, wav if os.path.isfile(wav := os.path.join(wav_dir, clip + ".wav")) else None,
                os.path.join(out, "AudioWAV", clip + ".wav"), os.path.join(out, "Image-01-FPS", clip), overwrite)
        for clip, video in sorted(videos.items())
    ]
    problems = run_jobs(job_list, prepare_clip, jobs, "CREMA-D clips")
    check_problems(problems, skip_bad, f"prepare cremad {raw}", total=len(job_list))
    done = [j.clip for j in job_list if os.path.isfile(j.out_wav) and os.path.isdir(j.out_frames)]
    if lists:
        prepared = set(done)
        train, test = [], []
        for name, kept in (("train.csv", train), ("test.csv", test)):
            listed = [clip for clip, _ in read_cremad_list(os.path.join(lists, name))]
            kept.extend(clip for clip in listed if clip in prepared)
            missing = [clip for clip in listed if clip not in prepared]
            if missing:
                logger.warning("%s: %d listed clip(s) were not prepared (no video in %s, or skipped) and are left "
                               "out, e.g. %s", os.path.join(lists, name), len(missing), raw, ", ".join(missing[:3]))
    else:
        train, test = split_clips(done, test_fraction, seed)
    for name, clips in (("train.csv", train), ("test.csv", test)):
        write_lines(os.path.join(out, name), [f"{clip},{emotion_of(clip)}" for clip in clips])
    return (f"prepared {len(done)} CREMA-D clip(s) into {out}: train.csv {len(train)}, test.csv {len(test)}"
            + (f" (split from {lists})" if lists else f" (seeded split, test fraction {test_fraction})"))
