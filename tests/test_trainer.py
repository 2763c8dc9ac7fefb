"""Trainer: metrics and run layout, exact resume after SIGKILL, atomic/truncated checkpoints, load_run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from rollingq.checkpoint import CheckpointError, atomic_save, load_checkpoint
from rollingq.config import load_config
from rollingq.records import read_metrics
from rollingq.train import load_run, resume, train
from subprocess_env import child_pythonpath

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "data.synthetic.sizes.train=211",
    "data.synthetic.sizes.val=67",
    "data.synthetic.sizes.test=53",
    "data.synthetic.tokens=[5,7]",
    "data.synthetic.feature_dim=11",
    "data.num_classes=3",
    "model.dim=16",
    "model.encoder_depth=1",
    "model.encoder_heads=2",
    "train.batch_size=16",
    "train.num_threads=1",
    "train.progress=false",
    "rollingq.mode=paper",  # the paper's rule without the safety rule: these tests check the trainer's plumbing
]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = child_pythonpath(env.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def test_train_writes_run_layout_and_metrics(tmp_path):
    cfg = load_config("synthetic_rollingq",
                      TINY + ["train.epochs=2", "rollingq.beta=0.0", "rollingq.start_epoch=1", "seed=3",
                             "rollingq.min_accuracy_gain=-1"])  # guard off: rotate after epoch 1 whatever the accuracy
    run = train(cfg, str(tmp_path / "run"))
    for rel in ("config.yaml", "metrics.jsonl", "train.log", "checkpoints/last.pt", "checkpoints/best.pt",
                "tensorboard"):
        assert os.path.exists(os.path.join(run, rel)), rel
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2]
    with open(os.path.join(run, "train.log")) as f:
        log = f.read()
    assert "epoch 2:" in log and "RollingQ: layer 0 rotated" in log
    for r in rows:
        for key in ("train_loss", "train_acc", "val_acc", "val_macro_f1", "lr", "air", "mass", "cos", "rollingq",
                    "rotated", "time_s"):
            assert key in r, key
        assert len(r["mass"]) == 3 and abs(sum(r["mass"]) - 1.0) < 1e-5
        assert len(r["cos"]) == 2 and -2.0 <= r["air"] <= 2.0
        assert 0.0 <= r["val_acc"] <= 1.0
    # beta = 0 and one rotation allowed: the controller rotates at the end of epoch 1, then stops
    assert rows[0]["rotated"] and not rows[1]["rotated"] and rows[1]["num_rotations"] == 1
    model, cfg2 = load_run(run, "last")
    assert not model.training and int(model.fusion_attention.num_rotations) == 1
    assert not torch.equal(model.fusion_attention.rotation, torch.eye(16))
    assert cfg2["name"] == "vanilla_mt+rollingq" and cfg2["seed"] == 3


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = load_config("synthetic", TINY + ["train.epochs=1"])
    run = train(cfg, str(tmp_path / "run"))
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, run)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    overrides = TINY + [
        "data.synthetic.sizes.train=1601", "train.epochs=3", "model.attn_drop=0.1", "model.drop=0.1",
        "rollingq.enabled=true", "rollingq.beta=0.0", "rollingq.max_rotations=2", "seed=11",
    ]
    reference = train(load_config("synthetic", overrides), str(tmp_path / "reference"))
    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "rollingq", "train", "--config", "synthetic", "--out", killed, *overrides]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and len(read_metrics(metrics)) >= 1:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # into epoch 2
        assert proc.poll() is None, (
            "the training process ended before it could be killed: " + proc.stderr.read().decode()
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(read_metrics(metrics))
    assert 1 <= done_before < 3
    state = load_checkpoint(os.path.join(killed, "checkpoints", "last.pt"))
    assert state["epoch"] == done_before
    resume(killed)
    assert _comparable(read_metrics(metrics)) == _comparable(read_metrics(os.path.join(reference, "metrics.jsonl")))
    a = load_checkpoint(os.path.join(killed, "checkpoints", "last.pt"))["model"]
    b = load_checkpoint(os.path.join(reference, "checkpoints", "last.pt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_checkpoint_gives_clear_error_and_previous_survives(tmp_path):
    cfg = load_config("synthetic", TINY + ["train.epochs=3"])
    run = train(cfg, str(tmp_path / "run"))
    ckpt = os.path.join(run, "checkpoints")
    last, previous = os.path.join(ckpt, "last.pt"), os.path.join(ckpt, "previous.pt")
    assert load_checkpoint(previous)["epoch"] == 2
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        resume(run)
    assert "last.pt" in str(err.value) and "previous.pt" in str(err.value)
    assert load_checkpoint(previous)["epoch"] == 2


def test_atomic_save_leaves_no_temporary_and_keeps_previous(tmp_path):
    path = str(tmp_path / "c.pt")
    first = {"epoch": 1, "model": {"w": torch.randn(5, 3)}}
    second = {"epoch": 2, "model": {"w": torch.randn(5, 3)}}
    atomic_save(first, path, keep_previous=str(tmp_path / "p.pt"))
    atomic_save(second, path, keep_previous=str(tmp_path / "p.pt"))
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "p.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], second["model"]["w"])
    assert torch.equal(load_checkpoint(str(tmp_path / "p.pt"))["model"]["w"], first["model"]["w"])


def test_rotation_keeps_the_target_present_if_interrupted(tmp_path, monkeypatch):
    """A crash right after previous.pt is rotated (before the new file lands) leaves c.pt in place."""
    import rollingq.checkpoint as checkpoint_mod

    path, prev = str(tmp_path / "c.pt"), str(tmp_path / "p.pt")
    first = {"epoch": 1, "model": {"w": torch.randn(5, 3)}}
    atomic_save(first, path, keep_previous=prev)
    real_replace = os.replace

    def crash_on_final_rename(src, dst):
        if dst == path:
            raise KeyboardInterrupt("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_mod.os, "replace", crash_on_final_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2, "model": {"w": torch.randn(5, 3)}}, path, keep_previous=prev)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], first["model"]["w"])
    assert torch.equal(load_checkpoint(prev)["model"]["w"], first["model"]["w"])


def test_best_is_written_before_last(tmp_path, monkeypatch):
    """An improved epoch writes best.pt first, so a crash between the two writes keeps a best checkpoint."""
    import rollingq.trainer as trainer_mod

    written = []
    real_save = trainer_mod.atomic_save

    def recording_save(obj, path, keep_previous=None):
        written.append((obj["epoch"], os.path.basename(path)))
        real_save(obj, path, keep_previous=keep_previous)

    monkeypatch.setattr(trainer_mod, "atomic_save", recording_save)
    train(load_config("synthetic", TINY + ["train.epochs=1"]), str(tmp_path / "run"))
    assert written == [(1, "best.pt"), (1, "last.pt")]


def test_resume_leaves_config_yaml_alone(tmp_path):
    """Resuming reads config.yaml and does not rewrite it (same inode and bytes)."""
    import shutil

    run = train(load_config("synthetic", TINY + ["train.epochs=2"]), str(tmp_path / "run"))
    ckpt = os.path.join(run, "checkpoints")
    shutil.copyfile(os.path.join(ckpt, "previous.pt"), os.path.join(ckpt, "last.pt"))  # back to epoch 1
    cfg_path = os.path.join(run, "config.yaml")
    before = (os.stat(cfg_path).st_ino, os.stat(cfg_path).st_mtime_ns, open(cfg_path, "rb").read())
    resume(run)
    assert [r["epoch"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    assert (os.stat(cfg_path).st_ino, os.stat(cfg_path).st_mtime_ns, open(cfg_path, "rb").read()) == before


def test_load_checkpoint_rejects_non_checkpoints(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({"weights": torch.randn(3)}, path)
    with pytest.raises(CheckpointError, match="'model' and 'epoch'"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_metrics_are_json_lines(tmp_path):
    cfg = load_config("synthetic", TINY + ["train.epochs=1", "model.fusion=concat"])
    run = train(cfg, str(tmp_path / "run"))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    assert row["air"] is None and row["mass"] is None and row["rollingq"] == [] and row["rotated"] is False


def test_estimation_pass_before_a_rotation(tmp_path):
    cfg = load_config("synthetic_rollingq", TINY + ["train.epochs=1", "rollingq.beta=0.0", "rollingq.start_epoch=1",
                                                 "rollingq.estimate=pass", "rollingq.min_accuracy_gain=-1",
                                                 "rollingq.max_angle_deg=180"])  # uncapped: the full rotation
    rows = read_metrics(os.path.join(train(cfg, str(tmp_path / "run")), "metrics.jsonl"))
    assert rows[0]["rotated"] and rows[0]["rollingq"][0]["reason"] == "rotated"


def test_controller_waits_for_its_start_epoch(tmp_path):
    cfg = load_config("synthetic_rollingq", TINY + ["train.epochs=2", "rollingq.beta=0.0", "rollingq.start_epoch=2"])
    rows = read_metrics(os.path.join(train(cfg, str(tmp_path / "run")), "metrics.jsonl"))
    assert [(r["action"], r["reason"]) for r in rows[0]["rollingq"]] == [("wait", "before_start_epoch")]
    assert not rows[0]["rotated"]
    assert rows[1]["rotated"] and rows[1]["rollingq"][0]["count"] == 211  # epoch 2's window only


def test_the_epoch_log_reads_the_layers_statistics_and_only_a_controlled_layer_keeps_a_window(tmp_path):
    """air/mass/cos of a training epoch are the fusion layer's statistics of that epoch (one route);
    without a controller the layer keeps no window nobody reads, and no run folder is made by building."""
    from rollingq import distributed
    from rollingq.train import Trainer

    from rollingq_kernels.accumulator import StatisticsAccumulator, imbalance

    for overrides, controlled in ((["rollingq.enabled=false"], False), (["rollingq.enabled=true"], True)):
        cfg = load_config("synthetic_rollingq", TINY + overrides)
        trainer = Trainer(cfg, str(tmp_path / "never"), distributed.setup("cpu"))
        assert not (tmp_path / "never").exists()
        layer = trainer.model.fusion_attention
        seen = StatisticsAccumulator()
        with layer.collecting(seen):
            row = trainer.train_epoch(1)
        window = seen.reduce()
        assert seen.num_batches == 14 and layer.statistics.num_batches == (14 if controlled else 0)
        assert row["air"] == pytest.approx(imbalance(window), abs=1e-12)
        assert row["mass"] == pytest.approx(window.mass_mean.mean(0).tolist(), abs=1e-12)


# ---------------------------------------------------------------- damaged checkpoints: one line naming the key
def _edited_checkpoint(run: str, edit) -> None:
    path = os.path.join(run, "checkpoints", "last.pt")
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> str:
    return train(load_config("synthetic", TINY + ["train.epochs=1"]), str(tmp_path_factory.mktemp("f") / "run"))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("rng"), "has no 'rng'"),
    (lambda s: s.pop("optimizer"), "has no 'optimizer'"),
    (lambda s: s.pop("history"), "has no 'history'"),
    (lambda s: s.pop("scheduler"), "has no 'scheduler'"),
    (lambda s: s.pop("best_val"), "has no 'best_val'"),
    (lambda s: s["rng"].pop("numpy"), "'rng' lacks the numpy"),
    (lambda s: s.update(epoch=-5), "'epoch' must be the number of finished epochs (an integer >= 1), got -5"),
    (lambda s: s.update(epoch=True), "'epoch' must be the number"),
    (lambda s: s.update(history=[]), "'history' holds 0 row(s) for 'epoch' 1"),
    (lambda s: s.update(optimizer={"x": 1}), "'optimizer' is not an optimizer's state dict"),
    (lambda s: s.update(stage=7), "'stage' must be 1 or 2, got 7"),
    (lambda s: s["model"].pop(next(iter(s["model"]))), "its model does not fit the model of config.yaml"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_key(finished_run, tmp_path, capsys, edit, message):
    import shutil

    from rollingq.cli import main

    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    save_config_path = os.path.join(run, "config.yaml")
    with open(save_config_path) as f:
        text = f.read()
    with open(save_config_path, "w") as f:
        f.write(text.replace("epochs: 1\n", "epochs: 2\n"))
    _edited_checkpoint(run, edit)
    assert main(["train", "--resume", run, "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "last.pt" in err[0], err
