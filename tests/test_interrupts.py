"""Ctrl-C during training (:mod:`rollingq.interrupts`): SIGINT delivered at chosen points of an epoch (a training
step, the checkpoint writes, the metrics row, the log line, TensorBoard) stops the run at a safe point with files
that agree with each other and a resume hint naming the epoch that ``last.pt`` holds; a second SIGINT stops at once.

The run is in-process (the tiny synthetic config), and ``signal.raise_signal`` delivers SIGINT at an exact point,
so every case is deterministic."""

from __future__ import annotations

import functools
import glob
import inspect
import os
import signal
import sys
import threading
import time

import pytest
import rollingq.logs
import rollingq.trainer
from rollingq.checkpoint import load_checkpoint
from rollingq.interrupts import DeferredInterrupt
from rollingq.records import read_metrics
from rollingq.train import TrainingInterrupted, train
from tiny_run import tiny_config

EPOCHS = 3
AT = 2  # the epoch during which SIGINT arrives


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler (a test process started as a background job inherits SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _python_call() -> None:
    """A Python-level call: pending signal handlers run on entering it."""


def _sigint(times: int) -> None:
    for _ in range(times):
        signal.raise_signal(signal.SIGINT)
        _python_call()


def _patch(monkeypatch, owner, name: str, epoch_of, times: int = 1, after: bool = False) -> None:
    """Deliver SIGINT ``times`` times when ``owner.name`` is called with arguments for which ``epoch_of`` gives
    :data:`AT` (before the call, or after it returns with ``after``)."""
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        hit = epoch_of(*args, **kwargs) == AT
        if hit and not after:
            _sigint(times)
        result = real(*args, **kwargs)
        if hit and after:
            _sigint(times)
        return result

    monkeypatch.setattr(owner, name, wrapped)


def _last(state: dict, target: str, **kwargs) -> int | None:
    """The epoch of a ``last.pt`` write (None for ``best.pt``)."""
    return state["epoch"] if os.path.basename(target) == "last.pt" else None


POINTS = {  # where SIGINT arrives -> the epoch last.pt holds afterwards
    "training step": (lambda mp: _patch(mp, rollingq.trainer.Trainer, "_check_loss",
                                        lambda self, loss, epoch, step, batch: epoch if step == 2 else None),
                      AT - 1),
    "writing last.pt": (lambda mp: _patch(mp, rollingq.trainer, "atomic_save", _last), AT),
    "just after last.pt": (lambda mp: _patch(mp, rollingq.trainer, "atomic_save", _last, after=True),
                           AT),
    "writing metrics.jsonl": (lambda mp: _patch(mp, rollingq.trainer, "write_metrics",
                                                lambda path, history: history[-1]["epoch"]), AT),
    "logging the epoch": (lambda mp: _patch(mp, rollingq.trainer, "log_epoch", lambda row, *a: row["epoch"]), AT),
    "tensorboard": (lambda mp: _patch(mp, rollingq.logs.RunBoard, "log_epoch", lambda self, row, *a: row["epoch"]),
                    AT),
    "twice while writing last.pt": (lambda mp: _patch(mp, rollingq.trainer, "atomic_save", _last,
                                                      times=2), AT - 1),
}


def _interrupted_run(tmp_path) -> tuple[str, str]:
    run = str(tmp_path / "run")
    with pytest.raises(TrainingInterrupted) as caught:
        train(tiny_config(f"train.epochs={EPOCHS}"), run)
    return run, str(caught.value)


@pytest.mark.parametrize("point", list(POINTS))
def test_sigint_anywhere_in_an_epoch_stops_with_files_that_agree(tmp_path, monkeypatch, point):
    arrange, saved = POINTS[point]
    arrange(monkeypatch)
    run, hint = _interrupted_run(tmp_path)
    last = os.path.join(run, "checkpoints", "last.pt")
    state = load_checkpoint(last)
    assert state["epoch"] == saved, (point, state["epoch"])
    assert f"{last} (epoch {saved} of {EPOCHS})" in hint and f"`rollingq train --resume {run}`" in hint, hint
    # the metrics rows and the log's epoch lines are exactly the epochs in last.pt (a second SIGINT stops at once)
    rows = [row["epoch"] for row in read_metrics(os.path.join(run, "metrics.jsonl"))]
    assert rows == list(range(1, saved + 1)), (point, rows)
    if "twice" not in point:
        with open(os.path.join(run, "train.log"), encoding="utf-8") as f:
            logged = [line for line in f if "rollingq.train: epoch " in line]
        assert [f"epoch {e}:" in line for e, line in zip(range(1, saved + 1), logged)] == [True] * saved, logged
        assert len(logged) == saved, logged
    assert not glob.glob(os.path.join(run, "**", "*.tmp.*"), recursive=True)
    assert not os.path.exists(os.path.join(run, "run.lock"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back


def test_sigint_before_the_first_checkpoint_says_none_was_written(tmp_path, monkeypatch):
    _patch(monkeypatch, rollingq.trainer.Trainer, "_check_loss",
           lambda self, loss, epoch, step, batch: AT if (epoch, step) == (1, 3) else None)
    run, hint = _interrupted_run(tmp_path)
    assert "no checkpoint was written" in hint, hint
    assert not os.path.exists(os.path.join(run, "checkpoints", "last.pt"))
    assert not os.path.exists(os.path.join(run, "run.lock"))


def test_an_ignored_or_custom_sigint_handler_is_left_alone():
    def custom(signum, frame):
        pass

    for handler in (signal.SIG_IGN, custom):
        signal.signal(signal.SIGINT, handler)
        with DeferredInterrupt():
            assert signal.getsignal(signal.SIGINT) is handler
        assert signal.getsignal(signal.SIGINT) is handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with DeferredInterrupt(enabled=False):
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_request_left_by_a_finished_run_is_not_carried_into_the_next():
    # a Ctrl-C during a run's last writes lets it finish; the same guard (one Trainer's) must not stop the
    # next run at its first safe point
    guard = DeferredInterrupt()
    with guard:
        signal.raise_signal(signal.SIGINT)
        assert guard.requested
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with guard:
        try:
            guard.check()
        except KeyboardInterrupt:  # not raised on: pytest would take it for the user's Ctrl-C and stop
            pytest.fail("the finished run's request stopped the next run")
    assert not guard.requested


def test_sigint_during_the_last_epochs_writes_lets_the_run_finish(tmp_path, monkeypatch):
    _patch(monkeypatch, rollingq.trainer, "write_metrics", lambda path, history: AT if len(history) == EPOCHS else None)
    try:
        run = train(tiny_config(f"train.epochs={EPOCHS}"), str(tmp_path / "run"))
    except KeyboardInterrupt as exc:  # not raised on: pytest would take it for the user's Ctrl-C and stop
        pytest.fail(f"the run was stopped instead of finishing: {exc}")
    assert load_checkpoint(os.path.join(run, "checkpoints", "last.pt"))["epoch"] == EPOCHS
    assert [row["epoch"] for row in read_metrics(os.path.join(run, "metrics.jsonl"))] == list(range(1, EPOCHS + 1))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_inside_tensorboards_queue_does_not_stall_the_exit(tmp_path, monkeypatch):
    """The hang seen under load: SIGINT right after ``Condition.notify`` released the TensorBoard writer thread's
    waiter (while the epoch's scalars are queued) left that waiter in the list, so the next notify (the writer's
    close) woke nobody and the exit waited for the writer's flush timer. The Ctrl-C must not be raised there."""
    source, first = inspect.getsourcelines(threading.Condition.notify)
    lines = [first + i for i, text in enumerate(source) if text.strip() == "n -= 1"]
    if len(lines) != 1:
        pytest.skip("this Python's threading.Condition.notify has another shape")
    monkeypatch.setattr(rollingq.logs, "SummaryWriter", functools.partial(rollingq.logs.SummaryWriter, flush_secs=60))
    armed, sent = [], []

    def in_notify(frame, event, arg):
        if armed and event == "line" and frame.f_lineno == lines[0]:  # the waiter is released, not yet removed
            armed.clear()
            sent.append(time.monotonic())
            _sigint(1)
        return in_notify

    def tracer(frame, event, arg):
        return in_notify if frame.f_code is threading.Condition.notify.__code__ else None

    real = rollingq.logs.RunBoard.log_epoch

    def log_epoch(self, row, *args):
        if row["epoch"] != AT:
            return real(self, row, *args)
        armed.append(True)
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            return real(self, row, *args)
        finally:
            sys.settrace(previous)

    monkeypatch.setattr(rollingq.logs.RunBoard, "log_epoch", log_epoch)
    run, hint = _interrupted_run(tmp_path)
    assert sent, "no notify released a waiter while the epoch was logged"
    assert time.monotonic() - sent[0] < 20, "the exit waited for TensorBoard's flush timer"
    assert f"(epoch {AT} of {EPOCHS})" in hint, hint
    assert load_checkpoint(os.path.join(run, "checkpoints", "last.pt"))["epoch"] == AT
