"""--resume and --force (rollingq.runstate): a run never resumes another run's checkpoint or an edited config
unless forced, and a forced resume takes the edited settings (controller, learning rate, schedule)."""

from __future__ import annotations

import os
import shutil

import pytest
import rollingq.train as train_mod
import rollingq.trainer as trainer_mod
import torch
from rollingq.cli import main
from rollingq.config import save_config
from rollingq.records import read_metrics
from tiny_run import tiny_config


# ---------------------------------------------------------------- --resume and --force
def test_resume_refuses_a_checkpoint_of_another_config_and_force_overrides(tmp_path, capsys):
    run_a = train_mod.train(tiny_config("train.epochs=2", "seed=1"), str(tmp_path / "a"))
    run_b = train_mod.train(tiny_config("train.epochs=2", "seed=2", "optim.lr=0.02"), str(tmp_path / "b"))
    shutil.copyfile(os.path.join(run_b, "checkpoints", "previous.pt"), os.path.join(run_a, "checkpoints", "last.pt"))
    metrics = os.path.join(run_a, "metrics.jsonl")
    before = open(metrics, "rb").read()
    with pytest.raises(train_mod.RunMismatchError) as err:
        train_mod.resume(run_a)
    message = str(err.value)
    assert "optim.lr (checkpoint: 0.02, config.yaml: 0.05)" in message
    assert "seed (checkpoint: 2, config.yaml: 1)" in message
    assert "--resume --force" in message and "train.epochs" not in message
    assert open(metrics, "rb").read() == before  # the folder's history is untouched
    assert main(["train", "--resume", run_a]) == 2
    assert "another config than" in capsys.readouterr().err
    assert main(["train", "--resume", run_a, "--force"]) == 0
    assert [r["epoch"] for r in read_metrics(metrics)] == [1, 2]


def test_resume_refuses_an_edited_config_yaml_naming_the_key(tmp_path):
    run = train_mod.train(tiny_config("train.epochs=1"), str(tmp_path / "run"))
    save_config(tiny_config("train.epochs=2"), os.path.join(run, "config.yaml"))
    with pytest.raises(train_mod.RunMismatchError, match=r"train.epochs \(checkpoint: 1, config.yaml: 2\)"):
        train_mod.resume(run)
    train_mod.resume(run, force=True)
    assert [r["epoch"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1, 2]


def test_force_resume_runs_the_controller_with_the_edited_config(tmp_path, monkeypatch, caplog):
    """--resume --force: config.yaml wins for RollingQ's settings too, and each changed one is logged."""
    first = tiny_config("train.epochs=1", "rollingq.enabled=true", "rollingq.beta=0.1")
    run = train_mod.train(first, str(tmp_path / "run"))
    edited = tiny_config("train.epochs=2", "rollingq.enabled=true", "rollingq.beta=0.7")
    save_config(edited, os.path.join(run, "config.yaml"))
    used = []
    real = train_mod.Trainer.train_epoch

    def train_epoch(self, epoch, board=None):
        used.append(self.controller.beta)
        return real(self, epoch, board)

    monkeypatch.setattr(train_mod.Trainer, "train_epoch", train_epoch)
    with caplog.at_level("WARNING", logger="rollingq_kernels"):
        train_mod.resume(run, force=True)
    assert used == [0.7]
    assert "keeping beta=0.7; the loaded state was saved with 0.1" in caplog.text


def test_force_without_resume_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit, match="--force goes with --resume"):
        main(["train", "--config", "synthetic", "--out", str(tmp_path / "r"), "--force"])


# ---------------------------------------------------------------- --resume --force and the optimizer (item 3)
def test_force_resume_takes_the_learning_rate_and_schedule_from_the_edited_config(tmp_path, monkeypatch, caplog):
    from rollingq.schedule import warmup_cosine

    run = train_mod.train(tiny_config("train.epochs=1"), str(tmp_path / "run"))  # lr 0.05, momentum 0.9, warm-up 1
    edited = tiny_config("train.epochs=3", "optim.lr=0.4", "optim.momentum=0.5", "optim.warmup_epochs=0",
                  "optim.min_lr=0.01")
    save_config(edited, os.path.join(run, "config.yaml"))
    seen = []
    real = trainer_mod.Trainer.train_epoch

    def train_epoch(self, epoch, board=None):
        group = self.optimizer.param_groups[0]
        seen.append((epoch, group["lr"], group["momentum"]))
        return real(self, epoch, board)

    monkeypatch.setattr(trainer_mod.Trainer, "train_epoch", train_epoch)
    with caplog.at_level("INFO", logger="rollingq"):
        train_mod.resume(run, force=True)
    reference = warmup_cosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4), 15, 0, 0.01 / 0.4)
    expected = []
    for _ in range(15):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    expected.append(reference.get_last_lr()[0])
    assert seen[0] == (2, pytest.approx(expected[5], rel=1e-12), 0.5)  # the first update after the resume
    assert seen[1] == (3, pytest.approx(expected[10], rel=1e-12), 0.5)
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["lr"] for r in rows[1:]] == pytest.approx([expected[10], expected[15]], rel=1e-12)
    assert "optimizer settings from" in caplog.text and "lr 0.05 -> 0.4" in caplog.text
    assert "momentum 0.9 -> 0.5" in caplog.text and f"learning rate {expected[5]:.4g}" in caplog.text
