"""``rollingq prepare``: tiny mp4 clips written with PyAV become CREMA-D and Kinetics-Sounds datasets that train.

The clips encode what the checks need: frame ``i`` has brightness ``10·i`` (which frame was sampled),
the audio is a pure tone (decoding and resampling), each class has its own colour and pitch.
"""

from __future__ import annotations

import logging
import os
import wave

import numpy as np
import pytest
import yaml
from file_tree import read_tree
from PIL import Image

av = pytest.importorskip("av")

from rollingq.build import build_dataset  # noqa: E402
from rollingq.cli import main  # noqa: E402
from rollingq.config import load_config  # noqa: E402
from rollingq.data.cremad import EMOTIONS  # noqa: E402
from rollingq.prepare.audio import kaldi_fbank, mel_banks, paper_spectrogram  # noqa: E402
from rollingq.prepare.media import decode_audio, frame_times, sample_frames  # noqa: E402
from rollingq.records import read_metrics  # noqa: E402

FPS = 10
TINY = ["model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2", "model.fusion_heads=1",
        "model.mlp_ratio=2.0", "data.image_size=32", "data.num_workers=0", "train.batch_size=4", "train.epochs=1",
        "train.progress=false", "train.bf16=false", "model.pretrained=null"]  # the paper configs name ViT-B by id


def write_clip(path: str, seconds: float, *, color=(200, 30, 30), tone: float | None = 440.0, rate: int = 16000,
               size=(64, 48)) -> None:
    """An mp4 (MPEG-4 video at 10 fps, AAC audio): frame i has brightness 10·i, the audio a sine of ``tone`` Hz."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        video = container.add_stream("mpeg4", rate=FPS)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = container.add_stream("aac", rate=rate, layout="stereo") if tone else None
        for i in range(round(seconds * FPS)):
            pixels = np.zeros((size[1], size[0], 3), np.uint8)
            pixels[:] = np.clip(np.array(color) * 0.2 + 10 * i, 0, 255).astype(np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            t = np.arange(round(seconds * rate)) / rate
            samples = (0.5 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
            for start in range(0, samples.size, 1024):
                chunk = np.stack([samples[start:start + 1024]] * 2)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                frame.sample_rate = rate
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


# ------------------------------------------------------------------------------------------ decoding
def test_frames_at_one_fps_are_the_middles_of_the_seconds(tmp_path):
    path = str(tmp_path / "clip.mp4")
    write_clip(path, 3.4, color=(0, 0, 0), tone=None)
    assert frame_times(3.4) == [0.5, 1.5, 2.5] and frame_times(0.6) == [0.3] and frame_times(10, limit=4) == [
        0.5, 1.5, 2.5, 3.5]
    frames = sample_frames(path)
    brightness = [float(np.asarray(f.convert("L")).mean()) for f in frames]
    assert len(frames) == 3
    for got, index in zip(brightness, (5, 15, 25)):  # frames 5, 15, 25 at 10 fps: brightness 50, 150, 250
        assert abs(got - 10 * index) < 8, brightness


def test_audio_is_decoded_to_mono_at_the_asked_rate(tmp_path):
    path = str(tmp_path / "clip.mp4")
    write_clip(path, 2.0, tone=440.0, rate=16000)
    samples = decode_audio(path, 22050)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size - 2.0 * 22050) < 4096  # AAC adds its priming frames
    assert abs(_dominant_hz(samples, 22050) - 440.0) < 5.0
    silent = str(tmp_path / "silent.mp4")
    write_clip(silent, 1.0, tone=None)
    assert decode_audio(silent, 22050) is None


def test_the_paper_spectrogram_and_the_kaldi_fbank():
    scipy_signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(0)
    samples = (0.3 * rng.standard_normal(22050 * 3)).astype(np.float32)
    spec = paper_spectrogram(samples)
    assert spec.shape == (257, 1004) and spec.dtype == np.float32
    assert abs(float(spec.mean())) < 1e-4 and abs(float(spec.std()) - 1.0) < 1e-3
    clip = np.clip(np.tile(samples, 10)[:160000], -1, 1)  # the recipe, written out
    want = np.log(scipy_signal.spectrogram(clip, 22050, nperseg=512, noverlap=353)[2] + 1e-7)
    np.testing.assert_allclose(spec, (want - want.mean()) / (want.std() + 1e-9), rtol=1e-4, atol=1e-4)

    t = np.arange(16000 * 10) / 16000
    fbank = kaldi_fbank((0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32))
    assert fbank.shape == (998, 128)  # 1 + (160000 - 400) // 160 frames of 25 ms every 10 ms
    peak = mel_banks(128, 512, 16000)[fbank[500].argmax(), :-1]  # the bin carrying the most energy
    assert abs((peak * np.arange(256)).sum() / peak.sum() * 16000 / 512 - 1000.0) < 60  # is centred on the tone


# ------------------------------------------------------------------------------------------- CREMA-D
def _cremad_raw(root: str) -> list[str]:
    clips = []
    for actor in (1001, 1002):
        for e, emotion in enumerate(EMOTIONS):
            clip = f"{actor}_DFA_{emotion}_XX"
            color = tuple(int(c) for c in np.random.default_rng(e).integers(0, 255, 3))
            write_clip(os.path.join(root, "VideoFlash", clip + ".mp4"), 1.5 + 0.5 * (actor - 1001), color=color,
                       tone=220.0 * (1 + e))
            clips.append(clip)
    # the release's own 16 kHz wav of one clip takes precedence over the video's audio track
    os.makedirs(os.path.join(root, "AudioWAV"))
    with wave.open(os.path.join(root, "AudioWAV", clips[0] + ".wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        t = np.arange(16000 * 2) / 16000
        w.writeframes((0.4 * np.sin(2 * np.pi * 3000.0 * t) * 32767).astype("<i2").tobytes())
    return clips


def test_prepare_cremad_end_to_end_into_a_training_run(tmp_path, capsys):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "CREMA-D")
    clips = _cremad_raw(raw)
    assert main(["prepare", "cremad", raw, out, "--test-fraction", "0.25"]) == 0
    assert "prepared 12 CREMA-D clip(s)" in capsys.readouterr().out
    for clip in clips:
        with wave.open(os.path.join(out, "AudioWAV", clip + ".wav")) as w:
            assert (w.getframerate(), w.getnchannels()) == (22050, 1)
        frames = sorted(os.listdir(os.path.join(out, "Image-01-FPS", clip)))
        assert frames == (["frame_00001.jpg"] if clip.startswith("1001") else ["frame_00001.jpg", "frame_00002.jpg"])
    with wave.open(os.path.join(out, "AudioWAV", clips[0] + ".wav")) as w:  # from AudioWAV/: the 3 kHz tone
        assert abs(_dominant_hz(np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767.0, 22050) - 3000) < 10
    with wave.open(os.path.join(out, "AudioWAV", clips[1] + ".wav")) as w:  # from the video: 440 Hz (HAP)
        assert abs(_dominant_hz(np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767.0, 22050) - 440) < 10
    train = open(os.path.join(out, "train.csv")).read().split()
    test = open(os.path.join(out, "test.csv")).read().split()
    assert (len(train), len(test)) == (9, 3) and not set(train) & set(test)
    assert all(row.split(",")[1] == row.split("_")[2] for row in train + test)

    stamp = os.path.getmtime(os.path.join(out, "AudioWAV", clips[0] + ".wav"))
    assert main(["prepare", "cremad", raw, out, "--test-fraction", "0.25"]) == 0  # a rerun skips finished clips
    assert os.path.getmtime(os.path.join(out, "AudioWAV", clips[0] + ".wav")) == stamp

    run = str(tmp_path / "run")
    assert main(["train", "--config", "cremad_vanilla_mt_rollingq", f"data.root={out}", "data.val_fraction=0.3",
                 *TINY, "--out", run]) == 0
    (row,) = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert row["air"] is not None and np.isfinite(row["train_loss"])


def test_prepare_cremad_with_the_given_lists_and_a_broken_clip(tmp_path, capsys, caplog):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    clips = _cremad_raw(raw)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in clips[:8]))
    (lists / "test.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in clips[8:]) + "1003_DFA_ANG_XX,ANG\n")
    broken = os.path.join(raw, "VideoFlash", "1003_IEO_SAD_HI.mp4")
    with open(broken, "wb") as f:
        f.write(b"not a video")
    assert main(["prepare", "cremad", raw, out, "--lists", str(lists)]) == 2
    err = capsys.readouterr().err
    assert "1 clip(s) could not be prepared: " in err and "1003_IEO_SAD_HI.mp4" in err and "--skip-bad" in err
    with caplog.at_level(logging.WARNING, logger="rollingq.prepare"):
        assert main(["prepare", "cremad", raw, out, "--lists", str(lists), "--skip-bad"]) == 0
    assert "test.csv: 1 listed clip(s) were not prepared" in caplog.text and "1003_DFA_ANG_XX" in caplog.text
    assert open(os.path.join(out, "train.csv")).read().split() == [f"{c},{c.split('_')[2]}" for c in clips[:8]]
    assert open(os.path.join(out, "test.csv")).read().split() == [f"{c},{c.split('_')[2]}" for c in clips[8:]]


# ----------------------------------------------------------------------------------- Kinetics-Sounds
CLASSES = ("playing guitar", "dog barking", "ripping paper")


def _kinetics_raw(root: str) -> None:
    for c, name in enumerate(CLASSES):
        for split, count in (("train", 3), ("test", 1)):
            for i in range(count):
                write_clip(os.path.join(root, split, name, f"{split}{c}{i}_000010_000020.mp4"), 2.0,
                           color=(80 * c, 255 - 80 * c, 60), tone=300.0 * (c + 1))


def test_prepare_kinetics_sounds_both_layouts_and_train(tmp_path, capsys):
    raw = str(tmp_path / "raw")
    _kinetics_raw(raw)
    spec_out, fbank_out = str(tmp_path / "ks"), str(tmp_path / "ks_fbank")
    assert main(["prepare", "kinetics-sounds", raw, spec_out, "--jobs", "2"]) == 0
    assert main(["prepare", "kinetics-sounds", raw, fbank_out, "--audio", "fbank", "--max-frames", "1"]) == 0
    printed = capsys.readouterr().out
    assert "train.txt 9, test.txt 3" in printed and "data.audio_features=spectrogram" in printed
    assert open(os.path.join(spec_out, "classes.txt")).read().split("\n")[:3] == sorted(CLASSES)
    clip = "train00_000010_000020"
    assert np.load(os.path.join(spec_out, "audio", clip + ".npy")).shape == (257, 1004)
    fbank = np.load(os.path.join(fbank_out, "audio", clip + ".npy"))
    assert 196 <= fbank.shape[0] <= 216 and fbank.shape[1] == 128  # 2 s at 16 kHz (+ AAC's padding), 10 ms frames
    assert sorted(os.listdir(os.path.join(spec_out, "visual", clip))) == ["frame_00001.jpg", "frame_00002.jpg"]
    assert os.listdir(os.path.join(fbank_out, "visual", clip)) == ["frame_00001.jpg"]
    with Image.open(os.path.join(spec_out, "visual", clip, "frame_00002.jpg")) as image:
        assert abs(float(np.asarray(image.convert("L")).mean()) - 0.2 * 80 - 150) < 40  # frame 15 of class 0

    fbank_cfg = load_config("kinetics_sounds_vanilla_mt", [f"data.root={fbank_out}", "data.num_classes=3",
                                                           "data.audio_features=fbank", *TINY])
    audio, frames = build_dataset(fbank_cfg, "test")[0][0]
    assert tuple(audio.shape) == (1024, 128) and tuple(frames.shape) == (3, 3, 32, 32)  # padded to fbank_frames

    run = str(tmp_path / "run")
    assert main(["train", "--config", "kinetics_sounds_vanilla_mt_rollingq", f"data.root={spec_out}",
                 "data.num_classes=3", "data.spectrogram_frames=160", "data.val_fraction=0.3", *TINY,
                 "--out", run]) == 0
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["data"]["audio_features"] == "spectrogram"
    (row,) = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert row["air"] is not None and np.isfinite(row["train_loss"])


def test_prepare_needs_the_raw_layout(tmp_path, capsys):
    assert main(["prepare", "kinetics-sounds", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "RAW: expected" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "cremad", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no CREMA-D video" in capsys.readouterr().err


# ------------------------------------------------------------------------------- input and output folders


def test_prepare_cremad_into_its_own_input_folder_is_refused_before_touching_it(tmp_path, capsys):
    raw = str(tmp_path / "raw")
    _cremad_raw(raw)
    before = read_tree(raw)
    assert main(["prepare", "cremad", raw, raw]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OUT" in err[0] and "RAW" in err[0] and "the same folder" in err[0], err
    assert read_tree(raw) == before and sorted(os.listdir(raw)) == ["AudioWAV", "VideoFlash"]
    # through another spelling of the same folder, a symlink to it, or one inside the other
    os.symlink(raw, str(tmp_path / "link"))
    for out in (raw + "/./", str(tmp_path / "link"), os.path.join(raw, "prepared"), str(tmp_path)):
        assert main(["prepare", "cremad", raw, out]) == 2
        assert "RAW" in capsys.readouterr().err
    assert read_tree(raw) == before and not os.path.exists(os.path.join(raw, "prepared"))


@pytest.mark.parametrize("inside", ["same", "out_in_raw", "raw_in_out"])
def test_prepare_kinetics_sounds_refuses_nested_input_and_output(tmp_path, inside):
    from rollingq.prepare.kinetics import prepare_kinetics_sounds

    raw = tmp_path / "raw"
    for split in ("train", "test"):
        (raw / split / "a class").mkdir(parents=True)
        (raw / split / "a class" / f"{split}0.mp4").write_bytes(b"not a video")
    out = {"same": raw, "out_in_raw": raw / "train" / "out", "raw_in_out": tmp_path}[inside]
    before = read_tree(str(raw))
    with pytest.raises(ValueError, match=r"OUT: .* RAW"):
        prepare_kinetics_sounds(str(raw), str(out), skip_bad=True)
    assert read_tree(str(raw)) == before and not (raw / "train" / "out").exists() and not (raw / "audio").exists()


@pytest.mark.parametrize("dataset", ["kinetics-sounds", "cremad"])
def test_skip_bad_when_every_clip_failed_exits_non_zero(tmp_path, capsys, dataset):
    raw = tmp_path / "raw"
    if dataset == "cremad":
        names = [raw / "VideoFlash" / f"100{i}_DFA_ANG_XX.mp4" for i in range(3)]
    else:
        names = [raw / split / "a class" / f"{split}{i}.mp4" for split in ("train", "test") for i in range(2)]
    for path in names:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a video")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.csv").write_text("1000_DFA_ANG_XX,ANG\n1001_DFA_ANG_XX,ANG\n")
    (lists / "test.csv").write_text("1002_DFA_ANG_XX,ANG\n")
    extra = ["--lists", str(lists)] if dataset == "cremad" else []
    assert main(["prepare", dataset, str(raw), str(tmp_path / "out"), "--skip-bad", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"every clip ({len(names)}) failed" in err[0] and ".mp4" in err[0], err
