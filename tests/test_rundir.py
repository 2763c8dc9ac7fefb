"""The run folder (rollingq.rundir, runlock, files): a new run refuses another run's folder, --overwrite removes
only what rollingq wrote, one process per folder, stale temporaries go, a full disk names the path and the bytes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest
import rollingq.train as train_mod
import torch
from rollingq.checkpoint import atomic_save, load_checkpoint
from rollingq.cli import main
from rollingq.config import save_config
from rollingq.files import DiskFullError, atomic_write_bytes, remove_stale_temporaries
from rollingq.records import read_metrics
from tiny_run import TINY, tiny_config, training_process


# ---------------------------------------------------------------- --overwrite
def test_a_new_run_refuses_a_folder_with_another_runs_files_and_overwrite_replaces_them(tmp_path, capsys):
    run = str(tmp_path / "run")
    train_mod.train(tiny_config("train.epochs=3", "seed=1"), run)
    os.remove(os.path.join(run, "checkpoints", "last.pt"))  # a run whose last.pt is gone still has files
    with open(os.path.join(run, "notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(FileExistsError, match=r"holds another run's files \(config.yaml, .*--overwrite"):
        train_mod.train(tiny_config("train.epochs=1"), run)
    assert main(["train", "--config", "synthetic", "--out", run, *TINY, "train.epochs=1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a replacement that cannot start (bad data) leaves the old run as it was
    with pytest.raises(ValueError):
        train_mod.train(tiny_config("train.epochs=1", "data.synthetic.strength=[1,2,3]"), run, overwrite=True)
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
    run = train_mod.train(tiny_config("train.epochs=2"), str(tmp_path / "run"))
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


# ---------------------------------------------------------------- one process per run folder (issue 25, item 2)
def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(tmp_path, capsys, caplog):
    run = str(tmp_path / "run")
    proc = training_process(run)
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
    edited = tiny_config(f"train.epochs={done + 1}", "data.synthetic.sizes.train=800")
    save_config(edited, os.path.join(run, "config.yaml"))
    with caplog.at_level("WARNING", logger="rollingq"):
        train_mod.resume(run, force=True)  # the stale lock is taken over, with a log line
    assert f"taking over the lock of pid {proc.pid}" in caplog.text and "no longer running" in caplog.text
    assert not os.path.exists(os.path.join(run, "run.lock"))  # released when the run ended


# ---------------------------------------------------------------- --overwrite removes what rollingq wrote (item 5)
def test_overwrite_removes_only_the_files_rollingq_wrote(tmp_path):
    run = str(tmp_path / "run")
    train_mod.train(tiny_config("train.epochs=1", "seed=1"), run)
    assert main(["eval", "--run", run, "--split", "val"]) == 0
    mine = {"eval_notes.json": "{\"mine\": 1}", "evaluation.json": "{}", "checkpoints/notes.txt": "mine",
            "tensorboard.md": "mine"}
    for rel, text in mine.items():
        with open(os.path.join(run, rel), "w") as f:
            f.write(text)
    train_mod.train(tiny_config("train.epochs=1", "seed=2"), run, overwrite=True)
    for rel, text in mine.items():
        with open(os.path.join(run, rel)) as f:
            assert f.read() == text, rel
    assert not os.path.exists(os.path.join(run, "eval_val.json"))  # written by rollingq eval: removed
    assert load_checkpoint(os.path.join(run, "checkpoints", "last.pt"))["config"]["seed"] == 2
