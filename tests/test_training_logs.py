"""What a run tells its user: TensorBoard (per-step scalars, rotation events, probe accuracy, hparams),
one INFO line per controller record (the full record at DEBUG), no tqdm/autograd warning, the run folder
printed by rank 0 only."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import rollingq.cli as cli
from rollingq import distributed
from rollingq.config import load_config
from rollingq.train import Trainer, resume, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY as TINY_RUN

TINY = [
    *TINY_RUN,
    "rollingq.beta=0.0", "rollingq.start_epoch=1", "rollingq.min_accuracy_gain=-1",  # rotate after epoch 1
    "rollingq.mode=paper",  # without the safety rule
]
STEPS = 5  # ceil(67 / 16)


def _events(folder: str) -> EventAccumulator:
    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_steps_rotations_probes_and_hparams(tmp_path):
    run = train(load_config("synthetic_rollingq", TINY + ["train.epochs=2"]), str(tmp_path / "run"))
    epochs = _events(os.path.join(run, "tensorboard"))
    scalars = set(epochs.Tags()["scalars"])
    for tag in ("train_loss", "val_acc", "best_val_acc", "num_rotations", "rollingq/rotated",
                "train_probe_acc/audio", "train_probe_acc/visual", "val_probe_acc/audio", "val_probe_acc/visual"):
        assert tag in scalars, tag
    assert [e.value for e in epochs.Scalars("rollingq/rotated")] == [1.0, 0.0]  # beta 0, one rotation allowed
    texts = epochs.Tensors("rollingq/records/text_summary")
    assert [t.step for t in texts] == [1, 2]
    first = texts[0].tensor_proto.string_val[0].decode()
    assert first.startswith("layer 0 rotated (capped): AIR ") and "angle 30.00 of" in first  # the frozen 30 deg cap
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = epochs.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optim.lr"].number_value == 0.05 and hparams["model.fusion"].string_value == "vanilla_mt"
    steps = _events(os.path.join(run, "tensorboard", "steps"))
    loss = steps.Scalars("step/loss")
    assert [e.step for e in loss] == list(range(1, 2 * STEPS + 1))
    assert [e.step for e in steps.Scalars("step/lr")] == list(range(1, 2 * STEPS + 1))


def test_resume_keeps_step_scalars_of_finished_epochs_only(tmp_path):
    import shutil

    run = train(load_config("synthetic_rollingq", TINY + ["train.epochs=2"]), str(tmp_path / "run"))
    ckpt = os.path.join(run, "checkpoints")
    shutil.copyfile(os.path.join(ckpt, "previous.pt"), os.path.join(ckpt, "last.pt"))  # epoch 2 is redone
    resume(run)
    steps = _events(os.path.join(run, "tensorboard", "steps"))
    assert [e.step for e in steps.Scalars("step/loss")] == list(range(1, 2 * STEPS + 1))


def test_controller_records_are_one_info_line_and_the_full_record_is_debug(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="rollingq"):
        run = train(load_config("synthetic_rollingq", TINY + ["train.epochs=1"]), str(tmp_path / "run"))
    info = [r.getMessage() for r in caplog.records if r.name == "rollingq.train" and r.levelno == logging.INFO]
    summaries = [m for m in info if m.startswith("rollingq: ")]
    assert len(summaries) == 1 and summaries[0].startswith("rollingq: layer 0 rotated (capped): AIR ")
    assert not any("cos_before_after" in m or "'alpha'" in m for m in info)
    with open(os.path.join(run, "train.log")) as f:
        assert "cos_before_after" not in f.read()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="rollingq"):
        train(load_config("synthetic_rollingq", TINY + ["train.epochs=1"]), str(tmp_path / "run2"))
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(m.startswith("rollingq record: {") and "cos_before_after" in m for m in debug)


def test_progress_bar_updates_give_no_requires_grad_warning(tmp_path):
    cfg = load_config("synthetic_rollingq", TINY)
    trainer = Trainer(cfg, str(tmp_path / "never"), distributed.setup("cpu"))
    trainer.progress = True  # as on a terminal
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train_epoch(1)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "requires_grad=True to a scalar" in m], messages


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_only_rank_0_prints_the_run_folder(monkeypatch, capsys, tmp_path, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli, "train", lambda cfg, out, overwrite=False: out)
    assert cli.main(["train", "--config", "synthetic", "--out", str(tmp_path / "r")]) == 0
    assert (str(tmp_path / "r") in capsys.readouterr().out) is printed
