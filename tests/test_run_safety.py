"""Runs are never poisoned or lost (rollingq.trainer, records): non-finite samples, losses and weights stop the
run, metrics keep NaN/inf, a huge warm-up is clamped, Ctrl-C says how to resume. The run folder's safety:
``test_rundir.py``; --resume and --force: ``test_resume.py``."""

from __future__ import annotations

import json
import math
import os

import pytest
import rollingq.train as train_mod
import rollingq.trainer as trainer_mod
import torch
from rollingq.checkpoint import load_checkpoint
from rollingq.cli import main
from rollingq.records import jsonable, read_metrics, write_metrics
from tiny_run import TINY, tiny_config, training_process
from torch.utils.data import Dataset


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


# ---------------------------------------------------------------- non-finite data, loss and weights
class PoisonFromEpoch(Dataset):
    """The inner training set, with NaN in sample ``index``'s first modality from epoch ``epoch`` on."""

    def __init__(self, inner: Dataset, epoch: int, index: int) -> None:
        self.inner, self.poison_epoch, self.index, self.epoch = inner, epoch, index, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        mods, label, index = self.inner[i]
        if self.epoch >= self.poison_epoch and i == self.index:
            mods = [mods[0].clone().fill_(float("nan")), *mods[1:]]
        return mods, label, index


def _poison_training_set(monkeypatch, epoch: int, index: int) -> None:
    real = trainer_mod.build_dataset

    def build(cfg, split):
        ds = real(cfg, split)
        return PoisonFromEpoch(ds, epoch, index) if split == "train" else ds

    monkeypatch.setattr(trainer_mod, "build_dataset", build)


def test_a_nan_sample_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison_training_set(monkeypatch, epoch=2, index=41)
    run = str(tmp_path / "run")
    with pytest.raises(train_mod.NonFiniteError) as err:
        train_mod.train(tiny_config("train.epochs=3"), run)
    message = str(err.value)
    assert "epoch 2, step " in message and "/5: the loss is nan" in message
    assert "training samples" in message and " 41" in message and "last.pt (epoch 1" in message
    last = load_checkpoint(os.path.join(run, "checkpoints", "last.pt"))
    best = load_checkpoint(os.path.join(run, "checkpoints", "best.pt"))
    assert last["epoch"] == 1 and best["epoch"] == 1 and _all_finite(last) and _all_finite(best)
    assert [r["epoch"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1]
    assert not [f for d in (run, os.path.join(run, "checkpoints")) for f in os.listdir(d) if ".tmp." in f]


def test_a_nan_sample_in_the_first_epoch_writes_no_checkpoint_and_the_cli_exits_2(tmp_path, monkeypatch, capsys):
    _poison_training_set(monkeypatch, epoch=1, index=3)
    run = tmp_path / "run"
    assert main(["train", "--config", "synthetic", "--out", str(run), *TINY, "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rollingq train: error: epoch 1, step ")
    assert "no checkpoint was written" in err[0]
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "checkpoints" / "best.pt").exists()


def test_a_non_finite_weight_is_never_checkpointed(tmp_path, monkeypatch):
    real = train_mod.Trainer.train_epoch
    poisoned = []

    def train_epoch(self, epoch, board=None):
        row = real(self, epoch, board)
        if epoch == 2:  # e.g. an inf gradient in the epoch's last step
            name, param = list(self.model.named_parameters())[-1]
            with torch.no_grad():
                param.view(-1)[0] = float("inf")
            poisoned.append(name)
        return row

    monkeypatch.setattr(train_mod.Trainer, "train_epoch", train_epoch)
    run = str(tmp_path / "run")
    with pytest.raises(train_mod.NonFiniteError) as err:
        train_mod.train(tiny_config("train.epochs=3"), run)
    assert f"epoch 2: the model's {poisoned[0]!r} holds non-finite values" in str(err.value)
    for name in ("last", "best"):
        state = load_checkpoint(os.path.join(run, "checkpoints", f"{name}.pt"))
        assert state["epoch"] == 1 and _all_finite(state)


def test_metrics_write_non_finite_numbers_as_strings_and_read_them_back(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    rows = [{"epoch": 1, "train_loss": float("nan"), "air": None, "cos": [float("inf"), -float("inf"), 0.5],
             "rollingq": [{"air": float("nan"), "reason": "no_samples"}], "name": "nan-free"}]
    write_metrics(path, rows)
    with open(path) as f:
        raw = json.loads(f.read())
    assert raw["train_loss"] == "nan" and raw["cos"] == ["inf", "-inf", 0.5] and raw["air"] is None
    back = read_metrics(path)[0]
    assert math.isnan(back["train_loss"]) and back["cos"][:2] == [math.inf, -math.inf] and back["air"] is None
    assert math.isnan(back["rollingq"][0]["air"]) and back["name"] == "nan-free"
    assert jsonable(torch.tensor([float("nan"), 1.0])) == ["nan", 1.0]


def test_training_leaves_the_callers_thread_count_as_it_was_and_logs_inert_settings(tmp_path, caplog):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level("WARNING", logger="rollingq.config"):
            train_mod.train(tiny_config("train.epochs=1", "train.num_threads=1", "model.progressive_epochs=2"),
                            str(tmp_path / "run"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert caplog.text.count("model.progressive_epochs=2 has no effect") == 1


# ---------------------------------------------------------------- values that overflow (issue 25, item 6)
def test_a_huge_warmup_is_clamped_to_the_run_and_named_in_the_log(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="rollingq"):
        assert main(["train", "--config", "synthetic", "--out", str(run), *TINY, "train.epochs=2",
                     "optim.warmup_epochs=1e308"]) == 0
    assert "optim.warmup_epochs=1e+308 is longer than the run (train.epochs=2)" in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    rows = read_metrics(str(run / "metrics.jsonl"))
    # 5 steps per epoch, 10 in all: the warm-up takes 9 of them (the schedule's longest), so after epoch 1
    # the rate is 6/9 of optim.lr (0.05 in the synthetic config)
    assert rows[0]["lr"] == pytest.approx(0.05 * 6 / 9, rel=1e-12)


# ---------------------------------------------------------------- Ctrl-C (item 6)
def test_ctrl_c_says_where_the_last_checkpoint_is_and_how_to_resume(tmp_path):
    import signal

    run = str(tmp_path / "run")
    proc = training_process(run)
    try:
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1].decode()  # stderr read while waiting: a full pipe cannot block it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    code = proc.returncode
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = [line for line in err.strip().splitlines() if "rollingq train: interrupted" in line]
    epoch = load_checkpoint(os.path.join(run, "checkpoints", "last.pt"))["epoch"]
    assert len(last) == 1 and f"{os.path.join(run, 'checkpoints', 'last.pt')} (epoch {epoch} of 200)" in last[0]
    assert f"`rollingq train --resume {run}`" in last[0]
    assert not os.path.exists(os.path.join(run, "run.lock"))  # released: the resume command works at once
