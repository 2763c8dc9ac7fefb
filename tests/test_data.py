"""Datasets: synthetic determinism and knobs, CREMA-D / Kinetics-Sounds / MOSEI loaders on tiny files, bad files."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from fake_data import write_tiny_cremad, write_tiny_kinetics, write_tiny_mosei
from rollingq.build import build_dataset, make_loader
from rollingq.config import load_config
from rollingq.data import DataError, collate
from rollingq.data.common import seeded_holdout
from rollingq.data.media import pick_frames, stft_magnitude
from rollingq.data.mosei import sentiment_to_class

SMALL_SYN = ["data.synthetic.sizes.train=97", "data.synthetic.sizes.val=31", "data.synthetic.sizes.test=29",
             "data.synthetic.tokens=[5,7]", "data.synthetic.feature_dim=11", "data.num_classes=3"]


def _av_cfg(name: str, root: str, *extra: str) -> dict:
    layout = ["data.audio_features=fbank"] if name == "kinetics_sounds" else []  # the fixture writes fbanks
    return load_config(f"{name}_vanilla_mt", [f"data.root={root}", "data.image_size=32", "data.val_fraction=0.3",
                                              "data.num_workers=0", *layout, *extra])


# ---------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_shaped():
    cfg = load_config("synthetic", SMALL_SYN + ["seed=5"])
    a, b = build_dataset(cfg, "train"), build_dataset(cfg, "train")
    assert len(a) == 97
    mods, label, index = a[13]
    assert [tuple(m.shape) for m in mods] == [(5, 11), (7, 11)] and index == 13 and 0 <= label < 3
    assert all(torch.equal(x, y) for x, y in zip(a.modalities, b.modalities))
    other = build_dataset(load_config("synthetic", SMALL_SYN + ["seed=6"]), "train")
    assert not torch.equal(a.modalities[0], other.modalities[0])
    test = build_dataset(cfg, "test")
    assert not torch.equal(a.modalities[0][:29], test.modalities[0])


def test_synthetic_strength_controls_class_signal():
    cfg = load_config("synthetic", SMALL_SYN + ["data.synthetic.sizes.train=601", "data.synthetic.strength=[3.0,0.0]"])
    ds = build_dataset(cfg, "train")
    # class means of the pooled tokens are far apart for the strong modality and ~equal for the zero-strength one
    spreads = []
    for x in ds.modalities:
        pooled = x.double().mean(1)
        means = torch.stack([pooled[ds.labels == c].mean(0) for c in range(3)])
        spreads.append(float(torch.cdist(means, means).max()))
    assert spreads[0] > 2.0 and spreads[1] < 0.5


def test_synthetic_corruption_replaces_the_strongest_modality():
    clean = build_dataset(load_config("synthetic", SMALL_SYN), "test")
    noisy = build_dataset(load_config("synthetic", SMALL_SYN + ["data.synthetic.corrupt.test=0.5"]), "test")
    assert noisy.strongest == 0 and 5 <= int(noisy.corrupted.sum()) <= 24
    changed = (noisy.modalities[0] != clean.modalities[0]).flatten(1).any(1)
    assert torch.equal(changed, noisy.corrupted)
    assert torch.equal(noisy.modalities[1], clean.modalities[1])


def test_synthetic_rejects_bad_knobs():
    with pytest.raises(ValueError, match="data.synthetic.strength"):
        build_dataset(load_config("synthetic", SMALL_SYN + ["data.synthetic.strength=[1,2,3]"]), "train")
    with pytest.raises(ValueError, match="data.synthetic.sizes"):
        build_dataset(load_config("synthetic", SMALL_SYN + ["data.synthetic.sizes.trian=5"]), "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset(load_config("synthetic", SMALL_SYN), "dev")


def test_collate_and_loader_order_depend_on_seed_and_epoch():
    cfg = load_config("synthetic", SMALL_SYN + ["train.batch_size=8"])
    ds = build_dataset(cfg, "train")
    batch = collate([ds[3], ds[7]])
    assert batch["modalities"][1].shape == (2, 7, 11) and batch["index"].tolist() == [3, 7]
    assert batch["label"].dtype == torch.long
    loader = make_loader(ds, cfg, train=True)

    def order(epoch: int) -> list[int]:
        loader.sampler.set_epoch(epoch)
        return [i for b in loader for i in b["index"].tolist()]

    assert order(1) == order(1) and order(1) != order(2) and sorted(order(1)) == list(range(97))


def test_seeded_holdout_is_disjoint_and_deterministic():
    keep, held = seeded_holdout(53, 0.2, seed=4)
    assert len(held) == 11 and len(keep) == 42 and not set(keep) & set(held)
    assert np.array_equal(held, seeded_holdout(53, 0.2, seed=4)[1])
    assert not np.array_equal(held, seeded_holdout(53, 0.2, seed=5)[1])


# ---------------------------------------------------------------- audio / frames helpers
def test_stft_matches_librosa():
    import librosa

    signal = np.random.default_rng(0).uniform(-1, 1, 66150).astype(np.float32)
    ref = np.abs(librosa.stft(signal, n_fft=512, hop_length=353)).astype(np.float64)
    ours = stft_magnitude(signal)
    assert ours.shape == ref.shape == (257, 188)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_pick_frames_random_and_centred():
    assert pick_frames(9, 3, None) == [3, 4, 5]
    assert pick_frames(2, 3, None) == [0, 0, 1]
    rng = np.random.default_rng(1)
    picked = pick_frames(11, 3, rng)
    assert picked == sorted(picked) and len(set(picked)) == 3


# ---------------------------------------------------------------- CREMA-D
def test_cremad_splits_shapes_and_labels(tmp_path):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=11, n_test=5)
    cfg = _av_cfg("cremad", root)
    train, val, test = (build_dataset(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (8, 3, 5)
    names = lambda ds: {r[0] for r in ds.rows}  # noqa: E731
    assert not names(train) & names(val) and not names(val) & names(test)
    (spec, frames), label, _ = val[0]
    assert spec.shape == (257, 188) and spec.dtype == torch.float32 and torch.isfinite(spec).all()
    assert frames.shape == (1, 3, 32, 32)
    with open(os.path.join(root, "train.csv"), encoding="utf-8-sig") as f:
        first = f.readline().strip().split(",")
    row = [r for r in train.rows + val.rows if r[0] == first[0]][0]
    assert row[1] == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"].index(first[1])
    assert torch.equal(val[1][0][1], val[1][0][1])  # evaluation frames are fixed


def test_cremad_training_augmentation_depends_on_epoch(tmp_path):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=7, n_test=3, frames=5)
    train = build_dataset(_av_cfg("cremad", root, "data.num_frames=2"), "train")
    train.set_epoch(1)
    a1, a2 = train[2][0][1], train[2][0][1]
    train.set_epoch(2)
    b = train[2][0][1]
    assert torch.equal(a1, a2) and not torch.equal(a1, b)


def test_cremad_header_and_unknown_emotion(tmp_path):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=7, n_test=3)
    path = os.path.join(root, "test.csv")
    with open(path, encoding="utf-8-sig") as f:
        body = f.read()
    with open(path, "w", encoding="utf-8-sig") as f:
        f.write("clip,label\n" + body)
    assert len(build_dataset(_av_cfg("cremad", root), "test")) == 3
    with open(path, "a", encoding="utf-8") as f:
        f.write("1099_X_Y_Z,BORED\n")
    with pytest.raises(DataError, match=r"test.csv:5: unknown emotion 'BORED'"):
        build_dataset(_av_cfg("cremad", root), "test")


def test_cremad_corrupt_wav_and_missing_frames(tmp_path, caplog):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=7, n_test=4)
    with open(os.path.join(root, "test.csv"), encoding="utf-8-sig") as f:
        clips = [line.split(",")[0] for line in f.read().split()]
    bad_wav = os.path.join(root, "AudioWAV", clips[1] + ".wav")
    with open(bad_wav, "wb") as f:
        f.write(b"RIFF....not a wav file at all")
    frames = os.path.join(root, "Image-01-FPS", clips[2])
    for name in os.listdir(frames):
        os.remove(os.path.join(frames, name))
    os.rmdir(frames)
    with pytest.raises(DataError) as err:
        build_dataset(_av_cfg("cremad", root), "test")
    assert bad_wav in str(err.value) and frames in str(err.value) and "data.skip_bad" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="rollingq.data"):
        ds = build_dataset(_av_cfg("cremad", root, "data.skip_bad=true"), "test")
    assert len(ds) == 2 and {r[0] for r in ds.rows} == {clips[0], clips[3]}
    assert "skipped 2 sample(s)" in caplog.text


# ---------------------------------------------------------------- Kinetics-Sounds
@pytest.mark.parametrize("comma,class_names", [(False, False), (True, True)])
def test_kinetics_list_formats(tmp_path, comma, class_names):
    root = write_tiny_kinetics(str(tmp_path / "ks"), n_train=9, n_test=4, fbank_frames=1000, comma=comma,
                               class_names=class_names)
    # 9 training lines name 9 classes; ids need no count (the model's head has data.num_classes outputs)
    cfg = _av_cfg("kinetics_sounds", root, "data.num_frames=2", *(["data.num_classes=9"] if class_names else []))
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) + len(build_dataset(cfg, "val")) == 9 and len(test) == 4
    (fbank, frames), label, _ = test[3]
    assert fbank.shape == (1024, 128) and torch.all(fbank[1000:] == 0) and frames.shape == (2, 3, 32, 32)
    # test line 4 carries class 3 of the training list (as an id or as the name class_03)
    assert label == 3


def test_kinetics_class_names_with_spaces(tmp_path):
    """Space-separated lines keep only the last word: the merged class count is an error naming the list;
    the comma format keeps the whole name."""
    root = write_tiny_kinetics(str(tmp_path / "ks"), n_train=4, n_test=2)
    names = ["playing guitar", "tuning guitar", "dog barking", "cat meowing"]
    for split, n in (("train", 4), ("test", 2)):
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.writelines(f"{split}_{i:03d} {i} {names[i]}\n" for i in range(n))
    train_list = os.path.join(root, "train.txt")
    with pytest.raises(DataError, match=f"{train_list}: its labels name 3 distinct classes.*comma-separated"):
        build_dataset(_av_cfg("kinetics_sounds", root, "data.num_classes=4"), "test")
    with pytest.raises(ValueError, match="data.classes: expected data.num_classes=4 names, got 3"):
        build_dataset(_av_cfg("kinetics_sounds", root, "data.num_classes=4", "data.classes=[a, b, c]"), "test")
    for split, n in (("train", 4), ("test", 2)):
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.writelines(f"{split}_{i:03d},{i},{names[i]}\n" for i in range(n))
    test = build_dataset(_av_cfg("kinetics_sounds", root, "data.num_classes=4"), "test")
    assert [label for _, label, _ in test] == [sorted(names).index(names[0]), sorted(names).index(names[1])]


def test_kinetics_unknown_class_name_and_bad_fbank(tmp_path):
    root = write_tiny_kinetics(str(tmp_path / "ks"), n_train=5, n_test=3, class_names=True)
    with open(os.path.join(root, "test.txt"), "a") as f:
        f.write("test_000 9 class_29\n")
    with pytest.raises(DataError, match="class_29"):
        build_dataset(_av_cfg("kinetics_sounds", root, "data.num_classes=5"), "test")
    root2 = write_tiny_kinetics(str(tmp_path / "ks2"), n_train=5, n_test=3)
    bad = os.path.join(root2, "audio", "test_001.npy")
    np.save(bad, np.random.default_rng(0).standard_normal((17, 40)).astype(np.float32))
    with pytest.raises(DataError, match="test_001.npy: expected an fbank array"):
        build_dataset(_av_cfg("kinetics_sounds", root2), "test")


# ---------------------------------------------------------------- MOSEI
def test_mosei_features_labels_and_splits(tmp_path):
    root = write_tiny_mosei(str(tmp_path / "mosei"), sizes=(13, 7, 5))
    cfg = load_config("mosei_vanilla_mt", [f"data.root={root}", "data.modalities=[vision,audio,text]"])
    train, val, test = (build_dataset(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (13, 7, 5)
    (vision, audio, text), label, _ = train[0]
    assert vision.shape == (50, 35) and audio.shape == (50, 74) and text.shape == (50, 300)
    assert torch.isfinite(audio).all() and torch.all(audio[:3, :5] == 0)
    with open(os.path.join(root, "mosei_senti_data.pkl"), "rb") as f:
        raw = pickle.load(f)
    scores = raw["train"]["labels"].reshape(-1)
    assert train.labels.tolist() == [int(s >= 0) for s in scores]
    seven = build_dataset(load_config("mosei_vanilla_mt", [f"data.root={root}", "data.task=7class",
                                                           "data.num_classes=7"]), "train")
    assert seven.labels.tolist() == [int(round(min(3, max(-3, s)))) + 3 for s in scores]


def test_sentiment_to_class_edges():
    s = np.array([-3.7, -2.5, -0.4, 0.0, 0.49, 2.6, 3.2])
    assert sentiment_to_class(s, "binary").tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert sentiment_to_class(s, "7class").tolist() == [0, 1, 3, 3, 3, 6, 6]


def test_mosei_refuses_pickle_outside_root(tmp_path):
    elsewhere = write_tiny_mosei(str(tmp_path / "elsewhere"))
    root = str(tmp_path / "root")
    os.makedirs(root)
    path = os.path.join(elsewhere, "mosei_senti_data.pkl")
    with pytest.raises(DataError, match="outside data.root"):
        build_dataset(load_config("mosei_vanilla_mt", [f"data.root={root}", f"data.path={path}",
                                                       "data.allow_pickle=true"]), "train")
    ds = build_dataset(load_config("mosei_vanilla_mt", [f"data.root={root}", f"data.path={path}",
                                                        "data.allow_pickle=true", "data.trust_pickle=true"]), "train")
    assert len(ds) == 13
    with pytest.raises(ValueError, match="data.num_classes"):
        build_dataset(load_config("mosei_vanilla_mt", [f"data.root={elsewhere}", "data.num_classes=7"]), "train")
