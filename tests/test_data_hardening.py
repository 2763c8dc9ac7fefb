"""Bad data ends in an error naming the file (or a skip with data.skip_bad): non-finite audio values,
train/test leaks, undecodable or empty list files, frame options, MOSEI files of unequal or odd shapes,
and no pickle runs from data.root unless asked for explicitly."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from fake_data import write_tiny_cremad, write_tiny_kinetics, write_tiny_mosei
from rollingq.build import build_dataset
from rollingq.cli import main
from rollingq.config import load_config
from rollingq.data import DataError
from rollingq.data.cremad import CremaDDataset
from rollingq.data.mosei import npz_arrays


def _av_cfg(name: str, root: str, *extra: str):
    layout = ["data.audio_features=fbank"] if name == "kinetics_sounds" else []  # the fixture writes fbanks
    return load_config(f"{name}_vanilla_mt", [f"data.root={root}", "data.image_size=32", "data.val_fraction=0.3",
                                              "data.num_workers=0", *layout, *extra])


def _clips(root: str, split: str) -> list[str]:
    with open(os.path.join(root, f"{split}.csv"), encoding="utf-8-sig") as f:
        return [line.split(",")[0] for line in f.read().split()]


# ---------------------------------------------------------------- non-finite values (item 2)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_float_wav_with_nan_or_inf_names_the_file_or_is_skipped(tmp_path, bad, caplog):
    import soundfile

    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=7, n_test=4)
    clip = _clips(root, "test")[2]
    wav = os.path.join(root, "AudioWAV", clip + ".wav")
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, 15000).astype(np.float32)
    audio[777] = bad  # an inf would be clipped to 1.0 and pass unseen
    soundfile.write(wav, audio, 22050, subtype="FLOAT")
    ds = build_dataset(_av_cfg("cremad", root), "test")  # the start-up scan reads headers only
    index = [r[0] for r in ds.rows].index(clip)
    with pytest.raises(DataError, match=rf"audio file '{wav}' holds 1 non-finite value\(s\).*index \(777,\)"):
        ds[index]
    for i in range(len(ds)):
        if i != index:
            assert torch.isfinite(ds[i][0][0]).all()
    with caplog.at_level(logging.WARNING, logger="rollingq.data"):
        skipping = build_dataset(_av_cfg("cremad", root, "data.skip_bad=true"), "test")
    assert clip not in [r[0] for r in skipping.rows] and len(skipping) == 3
    assert "skipped 1 sample(s)" in caplog.text and wav in caplog.text


@pytest.mark.parametrize("bad", [np.nan, -np.inf, 1e300])
def test_an_fbank_with_non_finite_values_names_the_file_or_is_skipped(tmp_path, bad):
    root = write_tiny_kinetics(str(tmp_path / "ks"), n_train=5, n_test=3)
    path = os.path.join(root, "audio", "test_001.npy")
    fbank = np.random.default_rng(0).standard_normal((1024, 128))
    fbank[3, 4] = bad  # 1e300 is finite in float64 and becomes inf in the loader's float32
    np.save(path, fbank)
    ds = build_dataset(_av_cfg("kinetics_sounds", root), "test")
    with pytest.raises(DataError, match=rf"fbank file '{path}' holds 1 non-finite value\(s\).*index \(3, 4\)"):
        ds[1]
    skipping = build_dataset(_av_cfg("kinetics_sounds", root, "data.skip_bad=true"), "test")
    assert [r[0] for r in skipping.rows] == ["test_000", "test_002"]


def test_a_spectrogram_with_non_finite_values_names_the_file_or_is_skipped(tmp_path):
    root = write_tiny_kinetics(str(tmp_path / "ks"), n_train=5, n_test=3)
    rng = np.random.default_rng(1)
    for name in os.listdir(os.path.join(root, "audio")):  # the paper's layout: (bins, frames) spectrograms
        np.save(os.path.join(root, "audio", name), rng.standard_normal((32, 50)).astype(np.float32))
    path = os.path.join(root, "audio", "test_002.npy")
    spectrogram = rng.standard_normal((32, 50)).astype(np.float32)
    spectrogram[5, 7] = np.nan
    np.save(path, spectrogram)
    layout = ("data.audio_features=spectrogram", "data.spectrogram_bins=32", "data.spectrogram_frames=40")
    ds = build_dataset(_av_cfg("kinetics_sounds", root, *layout), "test")
    assert torch.isfinite(ds[0][0][0]).all()
    with pytest.raises(DataError, match=rf"spectrogram file '{path}' holds 1 non-finite value\(s\).*index \(5, 7\)"):
        ds[2]
    skipping = build_dataset(_av_cfg("kinetics_sounds", root, *layout, "data.skip_bad=true"), "test")
    assert [r[0] for r in skipping.rows] == ["test_000", "test_001"]


# ---------------------------------------------------------------- train/test leaks (item 7)
def test_a_cremad_clip_in_train_and_test_is_a_leak_naming_files_and_clip(tmp_path):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=7, n_test=4)
    leaked = _clips(root, "train")[5]
    with open(os.path.join(root, "test.csv"), "a", encoding="utf-8") as f:
        f.write(f"{leaked},HAP\n")
    train_csv, test_csv = os.path.join(root, "train.csv"), os.path.join(root, "test.csv")
    for split in ("train", "test"):
        with pytest.raises(DataError, match=rf"1 clip\(s\) of {train_csv} are also in {test_csv}: {leaked}"):
            build_dataset(_av_cfg("cremad", root), split)
    with pytest.raises(DataError, match=r"data.train_list and data.test_list name the same file"):
        build_dataset(_av_cfg("cremad", root, "data.test_list=train.csv"), "test")


def test_a_kinetics_clip_in_train_and_val_lists_is_a_leak(tmp_path):
    root = write_tiny_kinetics(str(tmp_path / "ks"), n_train=6, n_test=3)
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.write("train_002 0 2\ntrain_004 0 4\ntest_001 0 1\n")
    with pytest.raises(DataError) as err:
        build_dataset(_av_cfg("kinetics_sounds", root, "data.val_list=val.txt"), "val")
    message = str(err.value)
    assert "train.txt are also in" in message and "val.txt: train_002, train_004" in message
    assert "test.txt are also in" in message and "test_001" in message


# ---------------------------------------------------------------- list files (item 11)
@pytest.mark.parametrize("dataset, name", [("cremad", "train.csv"), ("kinetics_sounds", "train.txt")])
def test_latin1_and_empty_list_files_name_the_file(tmp_path, dataset, name):
    writer = write_tiny_cremad if dataset == "cremad" else write_tiny_kinetics
    root = writer(str(tmp_path / "d"), n_train=6, n_test=3)
    path = os.path.join(root, name)
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    with open(path, "w", encoding="latin-1") as f:
        f.write("\n".join(lines[:2] + [lines[2].replace(lines[2][:2], "é_", 1)] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: not UTF-8 \(byte 0xe9"):
        build_dataset(_av_cfg(dataset, root), "test")
    with open(path, "w") as f:
        f.write("\n  \n")
    with pytest.raises(DataError, match=rf"{path}: the .* list file is empty"):
        build_dataset(_av_cfg(dataset, root), "test")


def test_a_header_only_cremad_list_names_the_file(tmp_path):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=6, n_test=3)
    path = os.path.join(root, "train.csv")
    with open(path, "w") as f:
        f.write("clip,label\n")
    with pytest.raises(DataError, match=rf"{path}: the CREMA-D list file holds a header but no sample"):
        build_dataset(_av_cfg("cremad", root), "val")


@pytest.mark.parametrize("key", ["num_frames", "image_size"])
def test_frame_options_are_checked_by_the_dataset_not_blamed_on_a_good_jpeg(tmp_path, key):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=6, n_test=3)
    args = dict(root=root, modalities=["audio", "visual"], num_classes=6, seed=0, num_frames=1, image_size=32,
                val_fraction=0.3, skip_bad=False, train_list="train.csv", test_list="test.csv", val_list=None)
    args[key] = 0
    with pytest.raises(ValueError, match=rf"data.{key}: expected an integer >= 1, got 0") as err:
        CremaDDataset("test", **args)
    assert ".jpg" not in str(err.value)
    with pytest.raises(Exception, match=rf"data.{key}"):  # and the config refuses it first
        _av_cfg("cremad", root, f"data.{key}=0")


# ---------------------------------------------------------------- MOSEI shapes (item 11)
def _mosei_with(root: str, edit) -> str:
    """The tiny MOSEI content edited by ``edit(content)``, written as the .npz the loader reads."""
    write_tiny_mosei(root, npz=False)
    path = os.path.join(root, "mosei_senti_data.pkl")
    with open(path, "rb") as f:
        content = pickle.load(f)
    edit(content)
    npz = os.path.join(root, "mosei_senti_data.npz")
    np.savez(npz, **npz_arrays(content, path))
    return npz


def _mosei_cfg(root: str, *extra: str):
    return load_config("mosei_vanilla_mt", [f"data.root={root}", "data.modalities=[vision,audio,text]", *extra])


def test_mosei_modalities_of_unequal_length_fail_at_load_naming_sample_and_file(tmp_path):
    def drop_last_text(content):
        content["train"]["text"] = content["train"]["text"][:-1]

    npz = _mosei_with(str(tmp_path / "m"), drop_last_text)
    with pytest.raises(DataError, match=rf"MOSEI file '{npz}': split 'train' has modalities of unequal length "
                                        r"\(vision 13, audio 13, text 12, labels 13\): sample 12 has no text"):
        build_dataset(_mosei_cfg(str(tmp_path / "m")), "train")


def test_mosei_ragged_samples_name_the_sample_and_file(tmp_path):
    def ragged(content):
        audio = list(content["valid"]["audio"])
        audio[4] = audio[4][:30]
        content["valid"]["audio"] = audio

    with pytest.raises(DataError, match=r"mosei_senti_data.pkl: valid/audio: sample 4 has shape \(30, 74\), but "
                                        r"sample 0 has \(50, 74\)"):
        _mosei_with(str(tmp_path / "m"), ragged)


def test_mosei_feature_dimension_mismatch_names_the_file(tmp_path):
    def narrow_vision(content):
        for split in ("train", "valid", "test"):
            content[split]["vision"] = content[split]["vision"][:, :, :20]

    npz = _mosei_with(str(tmp_path / "m"), narrow_vision)
    with pytest.raises(DataError, match=rf"MOSEI file '{npz}': train/vision has 20 features per step, expected 35"):
        build_dataset(_mosei_cfg(str(tmp_path / "m")), "train")


# ---------------------------------------------------------------- no pickle runs from data.root (item 10)
class Payload:
    """Unpickling this creates the marker file: proof that the pickle's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_root(tmp_path, name: str = "mosei_senti_data.pkl") -> tuple[str, str, str]:
    root = str(tmp_path / "root")
    os.makedirs(root, exist_ok=True)
    marker = str(tmp_path / "marker")
    path = os.path.join(root, name)
    with open(path, "wb") as f:
        pickle.dump(Payload(marker), f)
    os.chmod(path, 0o644)
    return root, path, marker


def test_by_default_no_pickle_is_loaded_from_data_root(tmp_path):
    root, path, marker = _evil_root(tmp_path)
    with pytest.raises(DataError, match=r"mosei_senti_data.npz' does not exist; MultiBench's pickle .* convert it "
                                        r"once with `rollingq prepare mosei --trust"):
        build_dataset(_mosei_cfg(root), "train")
    with pytest.raises(DataError, match=r"is not an .npz: a pickle runs code .* data.allow_pickle=true"):
        build_dataset(_mosei_cfg(root, "data.file=mosei_senti_data.pkl"), "train")
    renamed = os.path.join(root, "mosei_senti_data.npz")  # a pickle named .npz is not unpickled either
    os.link(path, renamed)
    with pytest.raises(DataError, match=r"as an .npz without pickles"):
        build_dataset(_mosei_cfg(root), "train")
    assert not os.path.exists(marker)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_allowed_pickles_still_need_a_safe_owner(tmp_path):
    root, path, marker = _evil_root(tmp_path)
    os.chown(path, 65534, 65534)  # owned by another user, mode 0644: the case
    cfg = _mosei_cfg(root, "data.file=mosei_senti_data.pkl", "data.allow_pickle=true")
    with pytest.raises(DataError, match=rf"'{path}' is owned by uid 65534, not by you \(uid 0\) or root"):
        build_dataset(cfg, "train")
    assert not os.path.exists(marker)


def test_allowed_pickles_still_need_safe_folders_and_mode(tmp_path):
    root, path, marker = _evil_root(tmp_path)
    cfg = _mosei_cfg(root, "data.file=mosei_senti_data.pkl", "data.allow_pickle=true")
    os.chmod(root, 0o777)  # a world-writable data.root: anyone could have replaced the file
    with pytest.raises(DataError, match=rf"folder '{root}' is writable by group or others and not sticky"):
        build_dataset(cfg, "train")
    os.chmod(root, 0o1777)  # sticky, as /tmp: accepted for the folder; the file's own mode still counts
    os.chmod(path, 0o664)
    with pytest.raises(DataError, match=rf"'{path}' is writable by group or others"):
        build_dataset(cfg, "train")
    assert not os.path.exists(marker)
    os.chmod(path, 0o644)
    with pytest.raises(DataError):  # everything safe and allowed: the pickle is loaded (and here runs)
        build_dataset(cfg, "train")
    assert os.path.exists(marker)


def test_prepare_needs_trust_and_checks_ownership(tmp_path, capsys):
    root, path, marker = _evil_root(tmp_path)
    assert main(["prepare", "mosei", path, root]) == 2
    assert "--trust: converting" in capsys.readouterr().err
    os.chmod(os.path.dirname(path), 0o777)
    assert main(["prepare", "mosei", "--trust", path, root]) == 2
    assert "writable by group or others and not sticky" in capsys.readouterr().err
    assert not os.path.exists(marker)


def test_prepare_converts_the_pickle_and_the_loader_reads_the_npz_by_default(tmp_path, capsys):
    root = write_tiny_mosei(str(tmp_path / "m"), npz=False)
    pkl = os.path.join(root, "mosei_senti_data.pkl")
    assert main(["prepare", "mosei", "--trust", pkl, root]) == 0
    npz = capsys.readouterr().out.strip()
    assert npz == os.path.join(root, "mosei_senti_data.npz")
    with np.load(npz, allow_pickle=False) as f:
        assert {"train/vision", "valid/audio", "test/labels"} <= set(f.files)
    from_npz = build_dataset(_mosei_cfg(root), "val")
    from_pickle = build_dataset(_mosei_cfg(root, "data.file=mosei_senti_data.pkl", "data.allow_pickle=true"), "val")
    assert len(from_npz) == 7 and torch.equal(from_npz.labels, from_pickle.labels)
    assert all(torch.equal(a, b) for a, b in zip(from_npz.features, from_pickle.features))


# ---------------------------------------------------------------- issue 25, item 8: bad data is named or counted
def test_a_truncated_wav_names_the_file_or_is_a_counted_skip(tmp_path, caplog):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=7, n_test=4)
    clip = _clips(root, "test")[1]
    wav = os.path.join(root, "AudioWAV", clip + ".wav")
    with open(wav, "rb") as f:
        head = f.read(60)  # the header and 8 samples of a 0.7 s file: cut short by a failed copy
    with open(wav, "wb") as f:
        f.write(head)
    with pytest.raises(DataError, match=rf"{wav}: truncated: the header announces \d+ bytes of audio, the file "
                                        r"holds 16"):
        build_dataset(_av_cfg("cremad", root), "test")
    with caplog.at_level(logging.WARNING, logger="rollingq.data"):
        skipping = build_dataset(_av_cfg("cremad", root, "data.skip_bad=true"), "test")
    assert clip not in [r[0] for r in skipping.rows] and len(skipping) == 3
    assert "skipped 1 sample(s)" in caplog.text and wav in caplog.text


@pytest.mark.parametrize("dataset", ["cremad", "kinetics_sounds"])
def test_a_clip_listed_twice_with_conflicting_labels_names_the_file_and_lines(tmp_path, dataset):
    writer = write_tiny_cremad if dataset == "cremad" else write_tiny_kinetics
    root = writer(str(tmp_path / "d"), n_train=6, n_test=3)
    name = "train.csv" if dataset == "cremad" else "train.txt"
    path = os.path.join(root, name)
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    first = lines[1]
    if dataset == "cremad":
        clip, label = first.split(",")
        other = next(e for e in ("NEU", "HAP", "SAD") if e != label)
        again = f"{clip},{other}"
    else:
        clip, start, label = first.split()
        again = f"{clip} {start} {(int(label) + 1) % 31}"
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines + [again, first]) + "\n")  # the same label again is fine; another is not
    with pytest.raises(DataError, match=rf"{path}:{len(lines) + 1}: {clip} is listed again with another label "
                                        rf".* \(line 2 says"):
        build_dataset(_av_cfg(dataset, root), "test")


@pytest.mark.parametrize("dataset", ["cremad", "kinetics_sounds"])
def test_list_entries_and_symlinks_pointing_outside_data_root_are_refused(tmp_path, dataset):
    writer = write_tiny_cremad if dataset == "cremad" else write_tiny_kinetics
    root = writer(str(tmp_path / "d"), n_train=6, n_test=3)
    name, sep = ("test.csv", ",") if dataset == "cremad" else ("test.txt", " ")
    path = os.path.join(root, name)
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    original = lines[1]
    for entry in ("../outside", "sub/../../outside", "/etc/passwd"):
        lines[1] = entry + sep + original.split(sep, 1)[1]
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=rf"{path}:2: .*{entry}.* one plain name"):
            build_dataset(_av_cfg(dataset, root), "test")
    lines[1] = original
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    clip = original.split(sep)[0]
    audio = os.path.join(root, "AudioWAV", clip + ".wav") if dataset == "cremad" else os.path.join(
        root, "audio", clip + ".npy")
    outside = str(tmp_path / ("outside" + os.path.splitext(audio)[1]))
    os.replace(audio, outside)
    os.symlink(outside, audio)  # a symlink out of data.root
    with pytest.raises(DataError, match=rf"{audio}: resolves to {outside}, outside data.root .*\(listed at {path}:2"):
        build_dataset(_av_cfg(dataset, root), "test")
    skipping = build_dataset(_av_cfg(dataset, root, "data.skip_bad=true"), "test")
    assert clip not in [r[0] for r in skipping.rows]
    os.remove(audio)
    os.replace(outside, audio)
    assert len(build_dataset(_av_cfg(dataset, root), "test")) == 3


def test_skip_bad_skips_a_corrupt_jpeg_and_without_it_the_file_is_named(tmp_path, caplog):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=7, n_test=4, frames=3)
    clip = _clips(root, "test")[2]
    frame = os.path.join(root, "Image-01-FPS", clip, "frame_00001.jpg")
    with open(frame, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data[: len(data) // 3])  # a JPEG cut short
        f.truncate()
    with caplog.at_level(logging.WARNING, logger="rollingq.data"):
        skipping = build_dataset(_av_cfg("cremad", root, "data.skip_bad=true"), "test")
    assert clip not in [r[0] for r in skipping.rows] and len(skipping) == 3
    assert "skipped 1 sample(s)" in caplog.text and frame in caplog.text
    ds = build_dataset(_av_cfg("cremad", root, "data.num_frames=3"), "test")
    index = [r[0] for r in ds.rows].index(clip)
    with pytest.raises(DataError, match=rf"cannot decode image file '{frame}'"):
        ds[index]


def test_a_kinetics_label_with_a_non_ascii_digit_names_the_file(tmp_path):
    root = write_tiny_kinetics(str(tmp_path / "ks"), n_train=6, n_test=3)
    path = os.path.join(root, "test.txt")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " ²"
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: sample 'test_002' has class '²', which is not among"):
        build_dataset(_av_cfg("kinetics_sounds", root), "test")
