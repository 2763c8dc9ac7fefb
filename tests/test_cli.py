"""CLI: config resolution and overrides, a 1-epoch `rollingq train` per dataset config on tiny files,
eval/report, demo, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from fake_data import write_tiny_cremad, write_tiny_kinetics, write_tiny_mosei
from rollingq.cli import main
from rollingq.config import ConfigError, load_config, packaged_config_dir, parse_override
from rollingq.demo import run_demo
from rollingq.records import read_metrics
from subprocess_env import child_pythonpath

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2", "train.num_threads=1",
              "train.progress=false", "model.pretrained=null"]  # the paper configs name ViT-B weights by id
TINY_SYN = TINY_MODEL + ["data.synthetic.sizes.train=67", "data.synthetic.sizes.val=23",
                         "data.synthetic.sizes.test=19", "train.batch_size=16"]


def test_override_parsing():
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 1e-3)
    assert parse_override("data.modalities=[audio, visual]") == ("data.modalities", ["audio", "visual"])
    assert parse_override("rollingq.enabled=true") == ("rollingq.enabled", True)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config("synthetic", ["train.epochs=0"])
    with pytest.raises(ConfigError, match="no file"):
        load_config("no_such_config")


def test_every_packaged_config_loads():
    names = sorted(f[:-5] for f in os.listdir(packaged_config_dir()) if f.endswith(".yaml") and not f.startswith("_"))
    assert len(names) == 44
    assert {"avdigits_vanilla_mt", "avdigits_vanilla_mt_rollingq", "avdigits_vanilla_mt_rollingq_official",
            "synthetic_rollingq_official", "avdigits_audio_only", "avdigits_visual_only",
            "avdigits_concat", "avdigits_pretrain_audio", "avdigits_pretrain_visual", "synthetic_audio_only",
            "synthetic_visual_only", "synthetic_concat"} <= set(names)
    for dataset in ("cremad", "kinetics_sounds", "mosei"):
        for method in ("concat", "sum", "ogm_ge", "vanilla_mt", "vanilla_mt_rollingq", "vanilla_mt_star",
                       "vanilla_mt_star_rollingq", "vanilla_mt_rollingq_official"):
            assert f"{dataset}_{method}" in names
    cfg = load_config(os.path.join(REPO, "configs", "kinetics_sounds_vanilla_mt_rollingq.yaml"))
    assert cfg["rollingq"]["enabled"] and cfg["rollingq"]["max_rotations"] == 3 and cfg["data"]["num_classes"] == 31
    assert cfg["optim"]["lr"] == 1e-3 and cfg["train"]["batch_size"] == 64 and cfg["train"]["epochs"] == 30


def _train_one_epoch(config: str, out: str, *extra: str) -> list[dict]:
    assert main(["train", "--config", config, "--out", out, "train.epochs=1", *TINY_MODEL, *extra]) == 0
    with open(os.path.join(out, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["train"]["epochs"] == 1 and saved["model"]["dim"] == 16
    return read_metrics(os.path.join(out, "metrics.jsonl"))


def test_train_cremad_config_on_tiny_files(tmp_path):
    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=11, n_test=5)
    rows = _train_one_epoch("cremad_vanilla_mt_rollingq", str(tmp_path / "run"), f"data.root={root}",
                            "data.image_size=32", "train.batch_size=4", "data.num_workers=0")
    assert len(rows) == 1 and rows[0]["air"] is not None


def test_train_kinetics_config_on_tiny_files(tmp_path):
    root = write_tiny_kinetics(str(tmp_path / "ks"), n_train=9, n_test=4, comma=True)
    rows = _train_one_epoch("kinetics_sounds_ogm_ge", str(tmp_path / "run"), f"data.root={root}",
                            "data.image_size=32", "data.num_frames=2", "train.batch_size=4", "data.num_workers=0",
                            "data.val_fraction=0.3", "data.audio_features=fbank")
    assert len(rows) == 1 and rows[0]["air"] is None


def test_train_mosei_config_on_tiny_files(tmp_path):
    root = write_tiny_mosei(str(tmp_path / "mosei"), sizes=(13, 7, 5))
    rows = _train_one_epoch("mosei_vanilla_mt_star_rollingq", str(tmp_path / "run"), f"data.root={root}",
                            "train.batch_size=4", "model.progressive_epochs=0")
    assert rows[0]["stage"] == 2 and rows[0]["mass"] is not None


def test_eval_and_report_delegate_to_the_analyses(tmp_path, capsys):
    pytest.importorskip("rollingq.evaluate")
    run = str(tmp_path / "run")
    _train_one_epoch("synthetic", run, *TINY_SYN)
    assert main(["eval", "--run", run, "--split", "test"]) == 0
    assert os.path.isfile(os.path.join(run, "eval.json"))
    pytest.importorskip("rollingq.analysis.report")
    assert main(["report", run, "--out", str(tmp_path / "report")]) == 0
    assert os.path.isfile(capsys.readouterr().out.strip().splitlines()[-1])


def test_resume_refuses_extra_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--resume takes the saved config"):
        main(["train", "--resume", str(tmp_path), "--config", "synthetic"])


def test_demo_prints_every_arm_side_by_side(tmp_path):
    table, _ = run_demo(str(tmp_path / "demo"), epochs=1, overrides=TINY_SYN, dataset="synthetic")
    header = next(line for line in table.splitlines() if "vanilla MT" in line and "|" in line)
    assert [c.strip() for c in header.split("|")[1:]] == ["audio only", "visual only", "concat", "vanilla MT",
                                                          "MT + RollingQ"]
    assert "test accuracy (visual = noise)" in table and "AIR epoch 1" in table
    assert sorted(d for d in os.listdir(tmp_path / "demo") if not d.startswith("report")) == [
        "audio_only", "concat", "vanilla_mt", "vanilla_mt_rollingq", "visual_only"]
    # the table's numbers are the evaluations' (one definition of "accuracy with audio replaced by noise")
    noisy_row = next(line for line in table.splitlines() if line.startswith("test accuracy (audio = noise)"))
    visual_row = next(line for line in table.splitlines() if line.startswith("test accuracy (visual = noise)"))
    for run in ("audio_only", "visual_only", "concat", "vanilla_mt", "vanilla_mt_rollingq"):
        with open(tmp_path / "demo" / run / "eval.json") as f:
            result = json.load(f)
        with open(tmp_path / "demo" / run / "eval_replaced_test.json") as f:
            replaced = json.load(f)
        assert result["noise_modality"] == "audio" and f"{result['accuracy_noise_replaced']:.3f}" in noisy_row
        assert replaced["audio"]["accuracy"] == pytest.approx(result["accuracy_noise_replaced"])  # same noise
        assert f"{replaced['visual']['accuracy']:.3f}" in visual_row
    assert "Vanilla MT's collapse" in table and "the audio-only model" in table
    # RollingQ beside vanilla at a glance: the paired numbers and what the controller did
    assert "MT + RollingQ (the shipped safe default) beside vanilla MT:" in table
    verdict = table[table.index("beside vanilla MT:"):].splitlines()
    assert verdict[1].strip().startswith("seed 0: clean") and "RollingQ " in verdict[2]
    assert "RollingQ decisions (epoch ends)" in table


def test_demo_prints_the_phenomenon_and_paired_differences_over_seeds(tmp_path):
    text, report = run_demo(str(tmp_path / "demo"), epochs=1, overrides=TINY_SYN, seeds=[3, 4], dataset="synthetic")
    assert text.count("Collapse criteria met") == 2
    assert "MT + RollingQ - vanilla MT, paired over 2 seeds" in text and "accuracy, audio replaced by noise" in text
    assert "accuracy, visual replaced by noise" in text
    assert sorted(d for d in os.listdir(tmp_path / "demo") if d.startswith("vanilla")) == [
        "vanilla_mt_rollingq_seed3", "vanilla_mt_rollingq_seed4", "vanilla_mt_seed3", "vanilla_mt_seed4"]
    assert os.path.isfile(report)
    with pytest.raises(ValueError, match="dataset"):
        run_demo(str(tmp_path / "x"), dataset="cifar")


def test_demo_in_two_processes_gives_the_same_numbers(tmp_path):
    one, _ = run_demo(str(tmp_path / "one"), epochs=1, overrides=TINY_SYN, dataset="synthetic")
    two, _ = run_demo(str(tmp_path / "two"), epochs=1, overrides=TINY_SYN, dataset="synthetic", jobs=2)
    assert one == two.replace(str(tmp_path / "two"), str(tmp_path / "one"))
    with pytest.raises(ValueError, match="jobs"):
        run_demo(str(tmp_path / "x"), jobs=0)


def test_demo_on_avdigits_pretrains_the_encoders_and_warm_starts_every_arm(tmp_path):
    from rollingq.prepare.avdigits import write_avdigits

    root = write_avdigits(str(tmp_path / "data"), train_per_class=3, test_per_class=2, pretrain_per_class=2)
    text, _ = run_demo(str(tmp_path / "demo"), epochs=1, dataset="avdigits",
                       overrides=TINY_MODEL + [f"data.root={root}", "data.image_size=32", "data.num_frames=1",
                                               "train.batch_size=4"])
    assert "test accuracy (audio = noise)" in text
    pre = tmp_path / "demo" / "pretrain"
    assert sorted(os.listdir(pre)) == ["pretrain_audio", "pretrain_visual"]
    for arm in ("audio_only", "visual_only", "concat", "vanilla_mt", "vanilla_mt_rollingq"):
        with open(tmp_path / "demo" / arm / "config.yaml") as f:
            cfg = yaml.safe_load(f)
        assert cfg["data"]["name"] == "cremad" and cfg["data"]["root"] == root
        assert cfg["model"]["init_encoders"] == {"audio": str(pre / "pretrain_audio"),
                                                 "visual": str(pre / "pretrain_visual")}
    with open(pre / "pretrain_visual" / "config.yaml") as f:
        cfg = yaml.safe_load(f)
    assert cfg["data"]["train_list"] == "pretrain.csv" and cfg["data"]["modalities"] == ["visual"]


def test_demo_default_runs_the_token_task_then_avdigits_files(tmp_path, monkeypatch):
    import rollingq.demo

    small = {**rollingq.demo.AVDIGITS_DATA, "train_per_class": 3, "test_per_class": 2, "pretrain_per_class": 2,
             "frames_per_clip": 1}
    monkeypatch.setitem(rollingq.demo.DEMO_TASKS, "avdigits",
                        rollingq.demo.DemoTask(rollingq.demo.DEMO_TASKS["avdigits"].heading,
                                               rollingq.demo.DEMO_TASKS["avdigits"].arms,
                                               rollingq.demo.DEMO_TASKS["avdigits"].pretrain, small))
    text, report = run_demo(str(tmp_path / "demo"), epochs=1, overrides=TINY_MODEL + ["train.batch_size=8"],
                            task_overrides={"avdigits": ["data.image_size=32", "data.num_frames=1"],
                                            "synthetic": ["data.synthetic.sizes.train=67",
                                                          "data.synthetic.sizes.val=23",
                                                          "data.synthetic.sizes.test=19"]})
    assert text.index("=== synthetic token task") < text.index("=== avdigits: real files")
    assert text.count("Collapse criteria met") == 2 and report.startswith(str(tmp_path / "demo" / "synthetic"))
    assert os.path.isfile(tmp_path / "demo" / "avdigits" / "data" / "avdigits" / "pretrain.csv")
    assert os.path.isfile(tmp_path / "demo" / "avdigits" / "report" / "report.md")


def test_python_dash_m_entry_point():
    env = dict(os.environ, PYTHONPATH=child_pythonpath())
    out = subprocess.run([sys.executable, "-m", "rollingq", "demo", "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--epochs" in out.stdout


def test_train_help_names_a_real_config_and_checkpoint_has_choices(capsys):
    """The --config example in the help is a packaged config; --checkpoint accepts only best/last/previous."""
    import re

    from rollingq.cli import _parser
    from rollingq.config import load_config

    train_parser = _parser()._subparsers._group_actions[0].choices["train"]
    help_text = train_parser.format_help()
    example = re.search(r"\(e\.g\.\s+(\w+)\)", help_text).group(1)
    assert load_config(example, [])["name"]
    with pytest.raises(SystemExit):
        main(["train", "--resume", "somewhere", "--checkpoint", "lastt"])
    assert "invalid choice: 'lastt'" in capsys.readouterr().err


def test_user_mistakes_end_in_one_line_with_exit_code_2_and_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "synthetic", "--out", str(out), "optim.learning_rate=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rollingq train: error: optim.learning_rate: unknown key; did you mean optim.lr? "
                   "(--debug shows the traceback)"]
    assert main(["train", "--config", "cremad_vanilla_mt", "--out", str(out), f"data.root={tmp_path / 'none'}",
                 *TINY_MODEL]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not out.exists()  # the run folder is made only after the config, the data and the model are built
    if not torch.cuda.is_available():  # a device this machine lacks is a user mistake too
        assert main(["train", "--config", "synthetic", "--out", str(out), "device=cuda"]) == 2
        assert "device: 'cuda' was requested" in capsys.readouterr().err
        assert not out.exists()
    assert main(["eval", "--run", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    for argv in (["--debug", "train", "--config", "synthetic", "train.epochs=abc"],
                 ["train", "--config", "synthetic", "train.epochs=abc", "--debug"]):
        with pytest.raises(ConfigError, match="train.epochs: input should be a valid integer, got 'abc'"):
            main(argv)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", "synthetic", "--out", str(out), "--bogus"])
    assert exc.value.code == 2


def test_overrides_before_and_after_out(tmp_path):
    out = str(tmp_path / "run")
    half = len(TINY_SYN) // 2
    rows = _train_one_epoch("synthetic", out, *TINY_SYN[:half], "--out", out, *TINY_SYN[half:], "seed=4")
    with open(os.path.join(out, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["seed"] == 4 and saved["data"]["synthetic"]["sizes"]["train"] == 67 and len(rows) == 1


def test_the_process_exits_2_with_one_line_on_a_bad_config():
    env = dict(os.environ, PYTHONPATH=child_pythonpath())
    out = subprocess.run([sys.executable, "-m", "rollingq", "train", "--config", "synthetic", "model.dim=0"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        "rollingq train: error: model.dim: input should be greater than or equal to 1, got 0")


def test_a_dataloader_worker_error_is_the_workers_own_line(tmp_path, capsys):
    """An error in a DataLoader worker reaches the command as the worker's message, not its traceback."""
    import numpy as np
    import soundfile

    root = write_tiny_cremad(str(tmp_path / "cremad"), n_train=7, n_test=4)
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, 15000).astype(np.float32)
    audio[5] = np.nan  # the start-up scan reads headers only: found by the worker that loads it
    for name in os.listdir(os.path.join(root, "AudioWAV")):
        soundfile.write(os.path.join(root, "AudioWAV", name), audio, 22050, subtype="FLOAT")
    assert main(["train", "--config", "cremad_vanilla_mt", "--out", str(tmp_path / "run"), f"data.root={root}",
                 "data.image_size=32", "data.num_workers=1", "data.val_fraction=0.3", "train.batch_size=4",
                 "train.epochs=1", *TINY_MODEL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < 600, err
    assert "holds 1 non-finite value(s)" in err[0] and "AudioWAV" in err[0] and ".wav" in err[0]
    assert "(in DataLoader worker process 0)" in err[0] and "Traceback" not in err[0] and "File " not in err[0]


def test_a_pretrained_file_of_other_shapes_is_one_line(tmp_path, capsys):
    """Issue 25 item 6: ``model.pretrained`` weights whose shapes do not fit end in one line naming the key
    (this already held at 0549676: a regression guard, not a new fix)."""
    path = str(tmp_path / "vit.pth")
    torch.save({"blocks.0.norm1.weight": torch.randn(32), "blocks.0.mlp.fc1.weight": torch.randn(64, 32),
                "patch_embed.proj.weight": torch.randn(32, 3, 16, 16)}, path)
    assert main(["train", "--config", "synthetic", "--out", str(tmp_path / "run"), *TINY_SYN, "train.epochs=1",
                 f"model.pretrained={path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.pretrained: blocks.0.norm1.weight has shape (32,)" in err[0], err
    assert not (tmp_path / "run").exists()
