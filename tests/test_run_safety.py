"""Runs are never mixed, lost or poisoned: non-finite losses and weights stop the run, metrics keep NaN/inf,
--resume refuses another run's checkpoint, a new run refuses another run's folder, stale temporaries go,
a full disk names the path and the bytes."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import rollingq.train as train_mod
import rollingq.trainer as trainer_mod
import torch
from rollingq.checkpoint import atomic_save, load_checkpoint
from rollingq.cli import main
from rollingq.config import load_config, save_config
from rollingq.files import DiskFullError, atomic_write_bytes, remove_stale_temporaries
from rollingq.records import jsonable, read_metrics, write_metrics
from torch.utils.data import Dataset

TINY = [
    "data.synthetic.sizes.train=67", "data.synthetic.sizes.val=23", "data.synthetic.sizes.test=19",
    "data.synthetic.tokens=[5,7]", "data.synthetic.feature_dim=11", "data.num_classes=3",
    "model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2",
    "train.batch_size=16", "train.num_threads=1", "train.progress=false",
]


def _cfg(*extra: str, name: str = "synthetic"):
    return load_config(name, TINY + list(extra))


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
        train_mod.train(_cfg("train.epochs=3"), run)
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
        train_mod.train(_cfg("train.epochs=3"), run)
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


# ---------------------------------------------------------------- --resume and --force
def test_resume_refuses_a_checkpoint_of_another_config_and_force_overrides(tmp_path, capsys):
    run_a = train_mod.train(_cfg("train.epochs=2", "seed=1"), str(tmp_path / "a"))
    run_b = train_mod.train(_cfg("train.epochs=2", "seed=2", "optim.lr=0.02"), str(tmp_path / "b"))
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
    run = train_mod.train(_cfg("train.epochs=1"), str(tmp_path / "run"))
    save_config(_cfg("train.epochs=2"), os.path.join(run, "config.yaml"))
    with pytest.raises(train_mod.RunMismatchError, match=r"train.epochs \(checkpoint: 1, config.yaml: 2\)"):
        train_mod.resume(run)
    train_mod.resume(run, force=True)
    assert [r["epoch"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1, 2]


def test_force_resume_runs_the_controller_with_the_edited_config(tmp_path, monkeypatch, caplog):
    """--resume --force: config.yaml wins for RollingQ's settings too, and each changed one is logged."""
    run = train_mod.train(_cfg("train.epochs=1", "rollingq.enabled=true", "rollingq.beta=0.1"), str(tmp_path / "run"))
    save_config(_cfg("train.epochs=2", "rollingq.enabled=true", "rollingq.beta=0.7"), os.path.join(run, "config.yaml"))
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


def test_training_leaves_the_callers_thread_count_as_it_was_and_logs_inert_settings(tmp_path, caplog):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level("WARNING", logger="rollingq.config"):
            train_mod.train(_cfg("train.epochs=1", "train.num_threads=1", "model.progressive_epochs=2"),
                            str(tmp_path / "run"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert caplog.text.count("model.progressive_epochs=2 has no effect") == 1


def test_force_without_resume_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit, match="--force goes with --resume"):
        main(["train", "--config", "synthetic", "--out", str(tmp_path / "r"), "--force"])


# ---------------------------------------------------------------- --overwrite
def test_a_new_run_refuses_a_folder_with_another_runs_files_and_overwrite_replaces_them(tmp_path, capsys):
    run = str(tmp_path / "run")
    train_mod.train(_cfg("train.epochs=3", "seed=1"), run)
    os.remove(os.path.join(run, "checkpoints", "last.pt"))  # a run whose last.pt is gone still has files
    with open(os.path.join(run, "notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(FileExistsError, match=r"holds another run's files \(config.yaml, .*--overwrite"):
        train_mod.train(_cfg("train.epochs=1"), run)
    assert main(["train", "--config", "synthetic", "--out", run, *TINY, "train.epochs=1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a replacement that cannot start (bad data) leaves the old run as it was
    with pytest.raises(ValueError):
        train_mod.train(_cfg("train.epochs=1", "data.synthetic.strength=[1,2,3]"), run, overwrite=True)
    assert os.path.exists(os.path.join(run, "checkpoints", "previous.pt"))
    assert main(["train", "--config", "synthetic", "--out", run, *TINY, "train.epochs=1", "seed=5",
                 "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(run, "checkpoints", "previous.pt"))  # nothing of the old run is left
    assert [r["epoch"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1]
    assert load_checkpoint(os.path.join(run, "checkpoints", "best.pt"))["config"]["seed"] == 5
    assert open(os.path.join(run, "notes.txt")).read() == "mine"  # not a run's file


def test_overwrite_with_resume_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit, match="--resume takes the saved config"):
        main(["train", "--resume", str(tmp_path), "--overwrite"])


# ---------------------------------------------------------------- stale temporaries and a full disk
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_when_a_run_resumes(tmp_path):
    run = train_mod.train(_cfg("train.epochs=2"), str(tmp_path / "run"))
    ckpt = os.path.join(run, "checkpoints")
    shutil.copyfile(os.path.join(ckpt, "previous.pt"), os.path.join(ckpt, "last.pt"))  # back to epoch 1
    dead = _dead_pid()
    stale = [os.path.join(ckpt, f"last.pt.tmp.{dead}"), os.path.join(run, f"metrics.jsonl.tmp.{dead}"),
             os.path.join(ckpt, f"previous.pt.tmp.{os.getpid()}")]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = os.path.join(ckpt, f"best.pt.tmp.{sleeper.pid}")  # a live writer of this user: kept
        for path in [*stale, live]:
            with open(path, "wb") as f:
                f.write(b"torn")
        train_mod.resume(run)
        assert not any(os.path.exists(p) for p in stale) and os.path.exists(live)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(ckpt) == [live]


def test_a_full_disk_names_the_path_and_the_bytes_and_leaves_no_temporary(tmp_path, monkeypatch):
    import rollingq.files as files_mod

    path = str(tmp_path / "c.pt")
    atomic_save({"epoch": 1, "model": {"w": torch.randn(5)}}, path)
    before = open(path, "rb").read()
    real_write = files_mod.os.write
    calls = []

    def write(fd, data):
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:100])  # a partial write first, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod.os, "write", write)
    state = {"epoch": 2, "model": {"w": torch.randn(1000)}}
    with pytest.raises(DiskFullError) as err:
        atomic_save(state, path, keep_previous=str(tmp_path / "p.pt"))
    assert err.value.errno == errno.ENOSPC and err.value.filename == path
    assert str(err.value).startswith(f"{path}: no space left on the device to write ")
    assert " bytes free in " in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["c.pt"] and open(path, "rb").read() == before
    with pytest.raises(DiskFullError, match=r"x.bin: no space left on the device to write 12345 bytes"):
        atomic_write_bytes(b"\0" * 12345, str(tmp_path / "x.bin"))


def test_a_full_disk_during_training_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import rollingq.files as files_mod

    def write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod.os, "write", write)
    run = tmp_path / "run"
    assert main(["train", "--config", "synthetic", "--out", str(run), *TINY, "train.epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run / 'manifest.txt'}: no space left on the device to write" in err[0]
    assert not [f for f in os.listdir(run) if ".tmp." in f]


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


# ---------------------------------------------------------------- one process per run folder (issue 25, item 2)
def _env() -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(repo, "python"), repo, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _training_process(run: str, *extra: str) -> subprocess.Popen:
    """A `rollingq train` subprocess, returned once its first epoch is in metrics.jsonl (it keeps training)."""
    import time

    cmd = [sys.executable, "-m", "rollingq", "train", "--config", "synthetic", "--out", run, *TINY,
           "data.synthetic.sizes.train=800", "train.epochs=200", *extra]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and read_metrics(metrics):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the training process ended early: " + proc.stderr.read().decode()[-2000:])


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(tmp_path, capsys, caplog):
    run = str(tmp_path / "run")
    proc = _training_process(run)
    try:
        notes = os.path.join(run, "eval_notes.json")
        with open(notes, "w") as f:
            f.write("{}")
        for argv in (["train", "--config", "synthetic", "--out", run, *TINY, "train.epochs=1"],
                     ["train", "--config", "synthetic", "--out", run, *TINY, "train.epochs=1", "--overwrite"],
                     ["train", "--resume", run], ["train", "--resume", run, "--force"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"in use by another rollingq process (pid {proc.pid}" in err[0], (argv, err)
        assert proc.poll() is None and os.path.exists(os.path.join(run, "checkpoints", "last.pt"))
        assert os.path.exists(notes)
    finally:
        proc.kill()  # SIGKILL: the lock file stays behind, naming a process that is gone
        proc.wait()
    done = load_checkpoint(os.path.join(run, "checkpoints", "last.pt"))["epoch"]
    save_config(_cfg(f"train.epochs={done + 1}", "data.synthetic.sizes.train=800"), os.path.join(run, "config.yaml"))
    with caplog.at_level("WARNING", logger="rollingq"):
        train_mod.resume(run, force=True)  # the stale lock is taken over, with a log line
    assert f"taking over the lock of pid {proc.pid}" in caplog.text and "no longer running" in caplog.text
    assert not os.path.exists(os.path.join(run, "run.lock"))  # released when the run ended


# ---------------------------------------------------------------- --overwrite removes what rollingq wrote (item 5)
def test_overwrite_removes_only_the_files_rollingq_wrote(tmp_path):
    run = str(tmp_path / "run")
    train_mod.train(_cfg("train.epochs=1", "seed=1"), run)
    assert main(["eval", "--run", run, "--split", "val"]) == 0
    mine = {"eval_notes.json": "{\"mine\": 1}", "evaluation.json": "{}", "checkpoints/notes.txt": "mine",
            "tensorboard.md": "mine"}
    for rel, text in mine.items():
        with open(os.path.join(run, rel), "w") as f:
            f.write(text)
    train_mod.train(_cfg("train.epochs=1", "seed=2"), run, overwrite=True)
    for rel, text in mine.items():
        with open(os.path.join(run, rel)) as f:
            assert f.read() == text, rel
    assert not os.path.exists(os.path.join(run, "eval_val.json"))  # written by rollingq eval: removed
    assert load_checkpoint(os.path.join(run, "checkpoints", "last.pt"))["config"]["seed"] == 2


# ---------------------------------------------------------------- --resume --force and the optimizer (item 3)
def test_force_resume_takes_the_learning_rate_and_schedule_from_the_edited_config(tmp_path, monkeypatch, caplog):
    from rollingq.schedule import warmup_cosine

    run = train_mod.train(_cfg("train.epochs=1"), str(tmp_path / "run"))  # lr 0.05, momentum 0.9, warm-up 1
    edited = _cfg("train.epochs=3", "optim.lr=0.4", "optim.momentum=0.5", "optim.warmup_epochs=0",
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


# ---------------------------------------------------------------- Ctrl-C (item 6)
def test_ctrl_c_says_where_the_last_checkpoint_is_and_how_to_resume(tmp_path):
    import signal

    run = str(tmp_path / "run")
    proc = _training_process(run)
    try:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = [line for line in err.strip().splitlines() if "rollingq train: interrupted" in line]
    epoch = load_checkpoint(os.path.join(run, "checkpoints", "last.pt"))["epoch"]
    assert len(last) == 1 and f"{os.path.join(run, 'checkpoints', 'last.pt')} (epoch {epoch} of 200)" in last[0]
    assert f"`rollingq train --resume {run}`" in last[0]
    assert not os.path.exists(os.path.join(run, "run.lock"))  # released: the resume command works at once
