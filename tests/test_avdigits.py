"""AV-digits: the writer (layout, determinism, atomic refusal to overwrite), the loader reading it, one epoch."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from file_tree import read_tree
from rollingq.build import build_dataset
from rollingq.cli import main
from rollingq.config import load_config
from rollingq.data.cremad import EMOTIONS, read_cremad_list
from rollingq.data.media import SAMPLE_RATE, cremad_spectrogram
from rollingq.prepare.avdigits import VOICES, digit_frame, load_digit_scans, vowel_clip, write_avdigits
from rollingq.records import read_metrics

TINY_MODEL = ["model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2", "train.num_threads=1",
              "train.progress=false", "data.image_size=32", "train.batch_size=4"]


def _digest(root: str) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in read_tree(root).items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return write_avdigits(str(tmp_path_factory.mktemp("av") / "avdigits"), seed=3, train_per_class=3, test_per_class=2)


def test_layout_is_the_cremad_one(tiny):
    assert sorted(os.listdir(tiny)) == ["AudioWAV", "Image-01-FPS", "avdigits.json", "test.csv", "train.csv"]
    train_rows = read_cremad_list(os.path.join(tiny, "train.csv"))
    test_rows = read_cremad_list(os.path.join(tiny, "test.csv"))
    assert len(train_rows) == 18 and len(test_rows) == 12
    assert sorted(np.bincount([label for _, label in train_rows]).tolist()) == [3] * 6
    for clip, label in train_rows + test_rows:
        assert f"_D{label}_{EMOTIONS[label]}" in clip
        assert os.path.isfile(os.path.join(tiny, "AudioWAV", clip + ".wav"))
        assert os.listdir(os.path.join(tiny, "Image-01-FPS", clip)) == ["frame_00000.jpg"]
    assert not set(c for c, _ in train_rows) & set(c for c, _ in test_rows)
    leftovers = [d for d in os.listdir(os.path.dirname(tiny)) if d.endswith(".tmp")]
    assert leftovers == []


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tiny, tmp_path):
    again = write_avdigits(str(tmp_path / "again"), seed=3, train_per_class=3, test_per_class=2)
    other = write_avdigits(str(tmp_path / "other"), seed=4, train_per_class=3, test_per_class=2)
    assert _digest(again) == _digest(tiny)
    differ = _digest(other)
    assert differ.keys() != _digest(tiny).keys() or differ != _digest(tiny)


def test_refuses_a_non_empty_folder_unless_asked(tmp_path):
    root = tmp_path / "busy"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_avdigits(str(root), train_per_class=1, test_per_class=1)
    assert os.listdir(root) == ["keep.txt"] and not [d for d in os.listdir(tmp_path) if d.endswith(".tmp")]
    write_avdigits(str(root), train_per_class=1, test_per_class=1, overwrite=True)
    assert "keep.txt" not in os.listdir(root) and "train.csv" in os.listdir(root)
    assert sorted(os.listdir(tmp_path)) == ["busy"]  # the old folder is gone, no temporary one is left
    empty = tmp_path / "empty"
    empty.mkdir()
    write_avdigits(str(empty), train_per_class=1, test_per_class=1)  # an empty folder is fine


def test_bad_arguments_name_themselves(tmp_path):
    with pytest.raises(ValueError, match="train_per_class"):
        write_avdigits(str(tmp_path / "a"), train_per_class=0)
    with pytest.raises(ValueError, match="train_per_class \\+ test_per_class"):
        write_avdigits(str(tmp_path / "a"), train_per_class=150, test_per_class=50)
    with pytest.raises(ValueError, match="snr_db"):
        write_avdigits(str(tmp_path / "a"), snr_db=(10.0, 0.0))
    with pytest.raises(ValueError, match="label"):
        vowel_clip(6, np.random.default_rng(0))
    assert not os.path.exists(tmp_path / "a")


def test_frames_are_the_scikit_learn_scans():
    scans, labels = load_digit_scans()
    assert set(labels.tolist()) == set(range(6)) and scans.shape[1:] == (8, 8)
    rng = np.random.default_rng(0)
    for i in (0, 100, 500):
        frame = digit_frame(scans[i], rng)
        assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
        small = frame[:, :, 0].astype(float).reshape(8, 4, 8, 4).mean(axis=(1, 3))
        assert np.corrcoef(small.ravel(), scans[i].ravel())[0, 1] > 0.8


def _band_profile(clip: np.ndarray) -> np.ndarray:
    spectrum = np.abs(np.fft.rfft(clip))
    freqs = np.fft.rfftfreq(clip.size, 1.0 / SAMPLE_RATE)
    edges = np.geomspace(80.0, 5000.0, 41)
    profile = np.log([spectrum[(freqs >= lo) & (freqs < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])])
    return (profile - profile.mean()) / profile.std()


def test_audio_carries_the_class_in_its_pitch_and_formants():
    """Nearest class centroid of the clips' log band spectra: far above chance (1/6), and every clip is valid."""
    rng = np.random.default_rng(1)
    profiles = {label: [] for label in range(len(VOICES))}
    for trial in range(60):
        label = trial % 6
        clip = vowel_clip(label, rng)
        assert clip.dtype == np.float32 and clip.shape == (SAMPLE_RATE,) and np.abs(clip).max() <= 1.0
        profiles[label].append(_band_profile(clip))
    centroids = np.stack([np.mean(p[:6], axis=0) for p in profiles.values()])
    held = [(label, x) for label, p in profiles.items() for x in p[6:]]
    correct = sum(int(np.argmin(((centroids - x) ** 2).sum(1)) == label) for label, x in held)
    assert correct / len(held) >= 0.7


def test_the_cremad_loader_reads_it(tiny):
    cfg = load_config("avdigits_vanilla_mt", [f"data.root={tiny}", "data.image_size=32", "data.num_frames=1"])
    for split, size in (("train", 16), ("val", 2), ("test", 12)):
        assert len(build_dataset(cfg, split)) == size
    (spec, frames), label, _ = build_dataset(cfg, "test")[0]
    assert tuple(spec.shape) == (257, 188) and tuple(frames.shape) == (1, 3, 32, 32) and 0 <= label < 6
    wav = os.path.join(tiny, "AudioWAV", os.listdir(os.path.join(tiny, "AudioWAV"))[0])
    assert np.isfinite(cremad_spectrogram(wav).numpy()).all()


def test_prepare_command_and_one_epoch_of_both_configs(tmp_path, capsys):
    root = str(tmp_path / "data")
    assert main(["prepare", "avdigits", root, "--seed", "2", "--train-per-class", "4", "--test-per-class", "2"]) == 0
    assert capsys.readouterr().out.strip() == os.path.abspath(root)
    assert main(["prepare", "avdigits", root]) == 2  # a user's mistake: one line, exit code 2
    assert "not empty" in capsys.readouterr().err
    for config in ("avdigits_vanilla_mt", "avdigits_vanilla_mt_rollingq"):
        out = str(tmp_path / config)
        assert main(["train", "--config", config, "--out", out, "train.epochs=1", f"data.root={root}",
                     *TINY_MODEL]) == 0
        rows = read_metrics(os.path.join(out, "metrics.jsonl"))
        assert len(rows) == 1 and len(rows[0]["mass"]) == 3 and rows[0]["air"] is not None
