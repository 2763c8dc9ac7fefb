"""``rollingq prepare kinetics-sounds RAW OUT``: Kinetics-Sounds clips to the layout
:mod:`rollingq.data.kinetics` reads.

Input (``RAW``): the downloaded clips by split and class, as Kinetics download tools write them:
``RAW/train/<class name>/<clip>.mp4`` and ``RAW/test/<class name>/<clip>.mp4`` (the paper's split;
an optional ``RAW/val/…`` becomes ``val.txt``). The class list is the set of class folders of
``train`` (31 for Kinetics-Sounds), written to ``classes.txt``.

Output (``OUT``, the loader's ``data.root``):

* ``visual/<clip>/frame_00001.jpg …`` — frames at 1 fps (10 for a 10 s clip; the loader samples 3);
* ``audio/<clip>.npy`` — ``--audio spectrogram`` (default): the paper's ``(257, 1004)`` spectrogram
  (:func:`~rollingq.prepare.audio.paper_spectrogram`; the loader's ``data.audio_features=spectrogram``,
  which reproduces the paper); ``--audio fbank``: ``(frames, 128)`` Kaldi log-mel filterbanks at 16 kHz
  (:func:`~rollingq.prepare.audio.kaldi_fbank`; ``data.audio_features=fbank``, the AST-style layout);
* ``train.txt``, ``test.txt`` (``val.txt``) — ``clip,class name`` rows; ``classes.txt``.

A clip whose outputs exist is skipped (a rerun continues an interrupted one; ``--overwrite`` redoes it).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from ..data.common import DataError
from .audio import FBANK_RATE, SPECTROGRAM_RATE, kaldi_fbank, paper_spectrogram
from .common import check_problems, check_separate_folders, clip_error, run_jobs, write_lines
from .media import VIDEO_EXTENSIONS, decode_audio, require_decoder, sample_frames, write_frames, write_npy

HELP = "Kinetics-Sounds clips (RAW/<split>/<class>/) -> 1-fps frames, spectrograms or fbanks, lists"
AUDIO_FEATURES = ("spectrogram", "fbank")
SPLITS = ("train", "test", "val")


@dataclass(frozen=True)
class ClipJob:
    clip: str
    video: str
    audio: str
    out_audio: str
    out_frames: str
    max_frames: int
    overwrite: bool


def prepare_clip(job: ClipJob) -> str | None:
    """Write one clip's audio features and frames; None when done, else the problem."""
    if not job.overwrite and os.path.isfile(job.out_audio) and os.path.isdir(job.out_frames):
        return None
    try:
        rate = SPECTROGRAM_RATE if job.audio == "spectrogram" else FBANK_RATE
        samples = decode_audio(job.video, rate)
        if samples is None or samples.size == 0:
            return f"{job.video}: no audio"
        features = paper_spectrogram(samples) if job.audio == "spectrogram" else kaldi_fbank(samples, rate)
        frames = sample_frames(job.video, fps=1.0, limit=job.max_frames)
        write_npy(job.out_audio, features)
        write_frames(job.out_frames, frames)
    except Exception as exc:  # a corrupt or unreadable clip: reported with its path, the others go on
        return clip_error(job.video, exc)
    return None


def _clips(raw: str, split: str) -> list[tuple[str, str, str]]:
    """``(clip, class name, video path)`` of ``RAW/<split>/<class>/<clip>.<ext>``."""
    root = os.path.join(raw, split)
    found = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(VIDEO_EXTENSIONS):
                found.append((os.path.splitext(file)[0], name, os.path.join(folder, file)))
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raw", metavar="RAW", help="clips as RAW/train/<class>/<clip>.mp4 and RAW/test/...")
    parser.add_argument("out", metavar="OUT", help="the dataset folder to write (data.root)")
    parser.add_argument("--audio", choices=AUDIO_FEATURES, default="spectrogram",
                        help="spectrogram: the paper's 257 x 1004 (default); fbank: 128 log-mel bins at 16 kHz")
    parser.add_argument("--max-frames", type=int, default=10, help="frames per clip at 1 fps (default 10)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="redo clips whose outputs exist")
    parser.add_argument("--skip-bad", action="store_true", help="leave clips that fail out of the lists")


def run(args: argparse.Namespace) -> str:
    """Prepare ``args.raw`` into ``args.out``; return a one-line summary."""
    return prepare_kinetics_sounds(args.raw, args.out, audio=args.audio, max_frames=args.max_frames,
                                   jobs=args.jobs, overwrite=args.overwrite, skip_bad=args.skip_bad)


def prepare_kinetics_sounds(raw: str, out: str, *, audio: str = "spectrogram", max_frames: int = 10, jobs: int = 1,
                            overwrite: bool = False, skip_bad: bool = False) -> str:
    """Write the Kinetics-Sounds layout of the clips at ``raw`` into ``out`` (see the module docstring)."""
    if audio not in AUDIO_FEATURES:
        raise ValueError(f"--audio: expected one of {AUDIO_FEATURES}, got {audio!r}")
    if max_frames < 1 or jobs < 1:
        raise ValueError(f"--max-frames, --jobs: expected ints >= 1, got {max_frames}, {jobs}")
    require_decoder()
    check_separate_folders(raw, out)  # before anything is read or written
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(raw, split)):
            raise FileNotFoundError(f"RAW: expected {os.path.join(raw, split)!r} with one folder per class")
    splits = {s: _clips(raw, s) for s in SPLITS if os.path.isdir(os.path.join(raw, s))}
    classes = sorted({name for _, name, _ in splits["train"]})
    if not classes:
        raise DataError(f"{raw}/train: no clip found (expected <class name>/<clip>.mp4)")
    seen: dict[str, str] = {}
    for rows in splits.values():
        for clip, name, path in rows:
            if clip in seen:
                raise DataError(f"{raw}: clip {clip!r} twice ({seen[clip]} and {path}); clip names must be unique")
            seen[clip] = path
            if name not in classes:
                raise DataError(f"{path}: class {name!r} is not a class of the training split")
            if "," in clip:
                raise DataError(f"{path}: a clip name with a comma cannot be listed")
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    os.makedirs(os.path.join(out, "visual"), exist_ok=True)
    jobs_list = [ClipJob(clip, path, audio, os.path.join(out, "audio", clip + ".npy"),
                         os.path.join(out, "visual", clip), max_frames, overwrite)
                 for rows in splits.values() for clip, _name, path in rows]
    problems = run_jobs(jobs_list, prepare_clip, jobs, "Kinetics-Sounds clips")
    check_problems(problems, skip_bad, f"prepare kinetics-sounds {raw}", total=len(jobs_list))
    counts = []
    for split, rows in splits.items():
        done = [(clip, name) for clip, name, _ in rows
                if os.path.isfile(os.path.join(out, "audio", clip + ".npy"))
                and os.path.isdir(os.path.join(out, "visual", clip))]
        write_lines(os.path.join(out, f"{split}.txt"), [f"{clip},{name}" for clip, name in done])
        counts.append(f"{split}.txt {len(done)}")
    write_lines(os.path.join(out, "classes.txt"), classes)
    return (f"prepared Kinetics-Sounds ({len(classes)} classes, audio: {audio}) into {out}: {', '.join(counts)}; "
            f"train with data.audio_features={audio}")
