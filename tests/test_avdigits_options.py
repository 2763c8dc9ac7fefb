"""AV-digits options of the fair task: the pre-training split, the SNR range, the independent set (plucked
sounds, font scans), the loader's crop/flip options and the encoders' warm start (``model.init_encoders``)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
import yaml
from rollingq.build import build_dataset, build_model
from rollingq.cli import main
from rollingq.config import ConfigError, load_config
from rollingq.data.cremad import read_cremad_list
from rollingq.data.media import SAMPLE_RATE, load_image
from rollingq.models.warmstart import warm_start_encoders
from rollingq.prepare.avdigits import _split_indices, digit_frame, load_digit_scans, write_avdigits
from rollingq.prepare.avsources import PLUCKS, font_paths, font_scan, pluck_clip
from rollingq.records import read_metrics
from rollingq.train import resume, train

TINY = ["model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2", "train.num_threads=1",
        "train.progress=false", "data.image_size=32", "train.batch_size=4", "train.epochs=1"]


def _digest(root: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if not rel.startswith(skip):
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def with_pretrain(tmp_path_factory) -> str:
    return write_avdigits(str(tmp_path_factory.mktemp("av") / "av"), seed=5, train_per_class=3, test_per_class=2,
                          pretrain_per_class=2, snr_db=(-15.0, -5.0))


def test_pretrain_split_is_disjoint_and_leaves_the_other_splits_unchanged(with_pretrain, tmp_path):
    rows = {s: read_cremad_list(os.path.join(with_pretrain, f"{s}.csv")) for s in ("train", "test", "pretrain")}
    assert [len(rows[s]) for s in ("train", "test", "pretrain")] == [18, 12, 12]
    assert sorted(np.bincount([label for _, label in rows["pretrain"]]).tolist()) == [2] * 6
    names = [set(c for c, _ in r) for r in rows.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    without = write_avdigits(str(tmp_path / "without"), seed=5, train_per_class=3, test_per_class=2,
                             snr_db=(-15.0, -5.0))
    ours = _digest(with_pretrain, skip=("avdigits.json",))
    theirs = _digest(without, skip=("avdigits.json",))
    assert {k: v for k, v in ours.items() if "pretrain" not in k} == theirs  # train/test files byte-identical


def test_the_splits_use_each_scan_once():
    _, labels = load_digit_scans()
    picked = _split_indices(labels, {"test": 50, "train": 60, "pretrain": 60}, np.random.default_rng(7))
    every = np.concatenate(list(picked.values()))
    assert every.size == 6 * 170 and np.unique(every).size == every.size
    for split, count in (("test", 50), ("train", 60), ("pretrain", 60)):
        assert np.bincount(labels[picked[split]], minlength=6).tolist() == [count] * 6


def test_the_snr_range_changes_the_audio_and_is_recorded(with_pretrain, tmp_path):
    import json

    with open(os.path.join(with_pretrain, "avdigits.json")) as f:
        manifest = json.load(f)
    assert manifest["snr_db"] == [-15.0, -5.0] and manifest["pretrain"] == 12 and manifest["format_version"] == 2
    louder = write_avdigits(str(tmp_path / "loud"), seed=5, train_per_class=3, test_per_class=2, pretrain_per_class=2)
    a, b = _digest(with_pretrain), _digest(louder)
    assert all(a[k] != b[k] for k in a if k.endswith(".wav"))
    assert all(a[k] == b[k] for k in a if k.endswith(".jpg"))  # the frames do not depend on the audio's SNR


def test_options_are_checked_and_named(tmp_path):
    target = str(tmp_path / "x")
    for kwargs, name in (({"pretrain_per_class": -1}, "pretrain_per_class"),
                         ({"pretrain_per_class": True}, "pretrain_per_class"),
                         ({"train_per_class": 100, "test_per_class": 50, "pretrain_per_class": 50},
                          "train_per_class \\+ test_per_class \\+ pretrain_per_class"),
                         ({"sounds": "speech"}, "sounds"), ({"scans": "mnist"}, "scans"),
                         ({"snr_db": (0.0, float("nan"))}, "snr_db"), ({"snr_db": 3.0}, "snr_db"),
                         ({"seed": 1.5}, "seed"), ({"frames_per_clip": 0}, "frames_per_clip"),
                         ({"blank_frames": 1.0}, "blank_frames"), ({"blank_frames": -0.1}, "blank_frames")):
        with pytest.raises(ValueError, match=name):
            write_avdigits(target, **kwargs)
    assert not os.path.exists(target)
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["prepare", "avdigits", target, "--sounds", "speech"])


def test_frames_per_clip_and_blank_frames(tmp_path):
    args = {"seed": 6, "train_per_class": 3, "test_per_class": 1}
    one = write_avdigits(str(tmp_path / "one"), **args)
    three = write_avdigits(str(tmp_path / "three"), frames_per_clip=3, **args)
    blank = write_avdigits(str(tmp_path / "blank"), frames_per_clip=3, blank_frames=0.5, **args)
    a, b, c = _digest(one), _digest(three), _digest(blank)
    assert all(a[k] == b[k] for k in a if k.endswith(".wav") or k.endswith("frame_00000.jpg"))
    clips = sorted(os.listdir(os.path.join(three, "Image-01-FPS")))
    assert all(sorted(os.listdir(os.path.join(three, "Image-01-FPS", clip))) ==
               [f"frame_{f:05d}.jpg" for f in range(3)] for clip in clips)
    from PIL import Image

    blanked = 0
    for clip in clips:
        frames = [f"Image-01-FPS/{clip}/frame_{f:05d}.jpg" for f in range(3)]
        if all(b[f] == c[f] for f in frames):
            continue  # not blank: the same bytes as without blank frames
        blanked += 1
        for f in frames:  # blank: background and noise only, no digit strokes
            grey = np.asarray(Image.open(os.path.join(blank, f)), dtype=float)[:, :, 0] / 255.0
            assert grey.reshape(8, 4, 8, 4).mean(axis=(1, 3)).std() < 0.1
    assert 0 < blanked < len(clips)
    assert all(b[k] == c[k] for k in b if k.endswith(".wav"))


def test_independent_set_is_deterministic_and_shares_no_file(tmp_path):
    args = {"train_per_class": 2, "test_per_class": 1}
    one = write_avdigits(str(tmp_path / "one"), seed=4, sounds="plucks", scans="fonts", **args)
    again = write_avdigits(str(tmp_path / "again"), seed=4, sounds="plucks", scans="fonts", **args)
    other = write_avdigits(str(tmp_path / "other"), seed=5, sounds="plucks", scans="fonts", **args)
    default = write_avdigits(str(tmp_path / "default"), seed=4, **args)
    assert _digest(one) == _digest(again)
    assert _digest(one) != _digest(other)
    a, d = _digest(one), _digest(default)
    assert not {v for k, v in a.items() if k.endswith((".wav", ".jpg"))} & set(d.values())
    cfg = load_config("avdigits_vanilla_mt", [f"data.root={one}", "data.image_size=32", "data.num_frames=2"])
    (spec, frames), label, _ = build_dataset(cfg, "test")[0]
    assert tuple(spec.shape) == (257, 188) and tuple(frames.shape) == (2, 3, 32, 32) and 0 <= label < 6


def _centroid_accuracy(features: dict[int, list[np.ndarray]], train: int) -> float:
    centroids = np.stack([np.mean(v[:train], axis=0) for v in features.values()])
    held = [(label, x) for label, v in features.items() for x in v[train:]]
    return sum(int(np.argmin(((centroids - x) ** 2).sum(1)) == label) for label, x in held) / len(held)


def test_plucks_carry_the_class_in_their_pitches():
    rng = np.random.default_rng(2)
    bands = np.geomspace(100.0, 2000.0, 49)
    profiles = {label: [] for label in range(len(PLUCKS))}
    for trial in range(48):
        clip = pluck_clip(trial % 6, rng, snr_db=(0.0, 10.0))
        assert clip.dtype == np.float32 and clip.shape == (SAMPLE_RATE,) and np.abs(clip).max() <= 1.0
        spectrum = np.abs(np.fft.rfft(clip))
        freqs = np.fft.rfftfreq(clip.size, 1.0 / SAMPLE_RATE)
        p = np.log([spectrum[(freqs >= lo) & (freqs < hi)].mean() for lo, hi in zip(bands[:-1], bands[1:])])
        profiles[trial % 6].append((p - p.mean()) / p.std())
    assert _centroid_accuracy(profiles, 4) >= 0.7
    with pytest.raises(ValueError, match="label"):
        pluck_clip(6, rng)


def test_font_frames_show_their_digit():
    fonts = font_paths()
    rng = np.random.default_rng(3)
    pixels = {label: [] for label in range(6)}
    for trial in range(120):
        scan = font_scan(trial % 6, rng, fonts)
        assert scan.shape == (8, 8) and 0.0 <= scan.min() and scan.max() <= 16.0
        frame = digit_frame(scan, rng)
        small = frame[:, :, 0].astype(float).reshape(8, 4, 8, 4).mean(axis=(1, 3)).ravel()
        pixels[trial % 6].append((small - small.mean()) / (small.std() + 1e-9))
    assert _centroid_accuracy(pixels, 12) >= 0.5  # chance 1/6


def test_crop_and_flip_options_of_the_loader(with_pretrain):
    clip = read_cremad_list(os.path.join(with_pretrain, "train.csv"))[0][0]
    path = os.path.join(with_pretrain, "Image-01-FPS", clip, "frame_00000.jpg")
    plain = load_image(path, 32, None)
    for seed in range(4):
        same = load_image(path, 32, np.random.default_rng(seed), crop_scale=None, flip=False)
        np.testing.assert_array_equal(same, plain)
    cropped = [load_image(path, 32, np.random.default_rng(s)) for s in range(4)]
    assert any(not np.array_equal(c, plain) for c in cropped)
    with pytest.raises(ValueError, match="crop_scale"):
        load_image(path, 32, None, crop_scale=(0.9, 0.2))
    cfg = load_config("avdigits_vanilla_mt", [f"data.root={with_pretrain}", "data.image_size=32",
                                              "data.crop_scale=null", "data.flip=false"])
    train_set, test_like = build_dataset(cfg, "train"), build_dataset(cfg, "train")
    test_like.train = False  # the evaluation path of the same sample
    np.testing.assert_array_equal(train_set[0][0][1].numpy(), test_like[0][0][1].numpy())
    for override, key in (("data.crop_scale=[0.5,0.2]", "data.crop_scale"), ("data.crop_scale=0.5", "data.crop_scale"),
                          ("data.flip=3", "data.flip")):
        with pytest.raises(ConfigError, match=key):
            load_config("avdigits_vanilla_mt", [override])


def test_init_encoders_copies_a_unimodal_runs_encoder(with_pretrain, tmp_path):
    common = [f"data.root={with_pretrain}", *TINY]
    source = train(load_config("avdigits_visual_only", [*common, "data.modalities=[visual]",
                                                        "data.train_list=pretrain.csv"]), str(tmp_path / "pre"))
    saved = torch.load(os.path.join(source, "checkpoints", "last.pt"), weights_only=True)["model"]
    run = train(load_config("avdigits_vanilla_mt", [*common, "optim.lr=0.0", "optim.weight_decay=0.0",
                                                    f"model.init_encoders={{visual: {source}}}"]),
                str(tmp_path / "mt"))
    after = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)["model"]
    visual = {k: v for k, v in saved.items() if k.startswith("encoders.0.")}
    assert visual and all(torch.equal(after["encoders.1." + k[len("encoders.0."):]], v) for k, v in visual.items())
    config_path = os.path.join(run, "config.yaml")  # a resumed run reads its own checkpoint, not the source
    with open(config_path) as f:
        saved = yaml.safe_load(f)
    saved["train"]["epochs"] = 2
    with open(config_path, "w") as f:
        yaml.safe_dump(saved, f)
    moved = str(tmp_path / "pre_moved")
    os.rename(source, moved)
    resume(run, force=True)
    assert len(read_metrics(os.path.join(run, "metrics.jsonl"))) == 2
    source = moved
    fresh = build_model(load_config("avdigits_vanilla_mt", common))
    assert not torch.equal(fresh.encoders[1].embed.proj.weight, after["encoders.1.embed.proj.weight"])

    with pytest.raises(ValueError, match="model.init_encoders.audio: the run of .* not 'audio'"):
        warm_start_encoders(fresh, {"audio": source})
    with pytest.raises(ValueError, match="model.init_encoders.visual: no checkpoint"):
        warm_start_encoders(fresh, {"visual": str(tmp_path / "nowhere")})
    wider = build_model(load_config("avdigits_vanilla_mt", [*common, "model.dim=32"]))
    with pytest.raises(ValueError, match="model.init_encoders.visual: the encoder .* does not fit"):
        warm_start_encoders(wider, {"visual": source})
    for override in ("model.init_encoders=3", "model.init_encoders={text: x}", "model.init_encoders={audio: ''}"):
        with pytest.raises(ConfigError, match="model.init_encoders"):
            load_config("avdigits_vanilla_mt", [override])
