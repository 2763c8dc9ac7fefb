"""What a run writes while it trains, besides checkpoints: ``train.log``, the epoch line and TensorBoard.

The ``rollingq`` and ``rollingq_kernels`` loggers (the controller's rotations included) go to
``RUN_DIR/train.log``. Records logged before the run folder exists (while the datasets and the model
are built) are held by :func:`hold_records` and written to the file when it opens.
"""

from __future__ import annotations

import logging
import os
from logging.handlers import MemoryHandler
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from .records import LOG_FILENAME, TENSORBOARD_DIR

STEPS_DIR = "steps"
"""Per-step scalars go to ``tensorboard/steps`` (a second TensorBoard run beside the epoch scalars)."""

LOGGERS = ("rollingq", "rollingq_kernels")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _attach(handler: logging.Handler) -> logging.Handler:
    for name in LOGGERS:
        log = logging.getLogger(name)
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:  # INFO at least; DEBUG stays (-v)
            log.setLevel(min(logging.INFO, log.getEffectiveLevel()))
    return handler


def detach(handler: logging.Handler) -> None:
    """Detach and close a handler made by :func:`hold_records` or :func:`add_file_logging`."""
    for name in LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def hold_records() -> MemoryHandler:
    """Keep the package's log records in memory until :func:`add_file_logging` writes them out."""
    return _attach(MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))


def add_file_logging(run_dir: str, held: MemoryHandler | None = None) -> logging.Handler:
    """Log the package's loggers to ``run_dir/train.log`` from now on (after the ``held`` records).

    Returns the handler (remove it with :func:`detach`); ``held`` is flushed into the file and detached.
    """
    handler = logging.FileHandler(os.path.join(run_dir, LOG_FILENAME), encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    if held is not None:
        held.setTarget(handler)
        held.flush()
        detach(held)
    return _attach(handler)


def _hparam_value(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def flat_hparams(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config dict as TensorBoard hparams: dotted keys, lists and None as strings."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        else:
            out[name] = _hparam_value(value)
    return out


HPARAM_METRICS = ("val_acc", "val_macro_f1", "train_loss", "best_val_acc")
"""The epoch scalars TensorBoard's HParams tab shows next to a run's config."""


class RunBoard:
    """The run's TensorBoard: epoch scalars, rotation events and hparams in ``tensorboard/``, per-step
    scalars (``step/loss``, ``step/lr``) in ``tensorboard/steps`` (a second run in TensorBoard, so each
    axis can drop the events of an interrupted attempt on its own).

    Args:
        run_dir: the run folder.
        first_epoch: epochs ``>= first_epoch`` from an earlier attempt are dropped.
        first_step: steps ``>= first_step`` (global, 1-based) from an earlier attempt are dropped.
    """

    def __init__(self, run_dir: str, first_epoch: int, first_step: int) -> None:
        root = os.path.join(run_dir, TENSORBOARD_DIR)
        self.epochs = SummaryWriter(root, purge_step=first_epoch)
        self.steps = SummaryWriter(os.path.join(root, STEPS_DIR), purge_step=first_step)

    def log_hparams(self, config: dict) -> None:
        """The run's config as hparams (shown with :data:`HPARAM_METRICS` in the HParams tab)."""
        exp, ssi, sei = hparams(flat_hparams(config), {m: 0.0 for m in HPARAM_METRICS})
        for summary in (exp, ssi, sei):
            self.epochs.file_writer.add_summary(summary)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """One training step's loss and learning rate (``step``: global, 1-based)."""
        self.steps.add_scalar("step/loss", loss, step)
        self.steps.add_scalar("step/lr", lr, step)

    def log_epoch(self, row: dict, modalities: list[str], best_val: float) -> None:
        """The epoch's scalars, probe accuracies, attention statistics and the controller's records."""
        w, e = self.epochs, row["epoch"]
        for key in ("train_loss", "train_acc", "val_acc", "val_macro_f1", "lr", "air", "num_rotations"):
            if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool):
                w.add_scalar(key, row[key], e)
        w.add_scalar("best_val_acc", best_val, e)
        for split in ("train", "val"):
            for name, value in zip(modalities, row.get(f"{split}_probe_acc") or []):
                w.add_scalar(f"{split}_probe_acc/{name}", value, e)
        for name, value in zip(["class", *modalities], row["mass"] or []):
            w.add_scalar(f"mass/{name}", value, e)
        for name, value in zip(modalities, row["cos"] or []):
            if isinstance(value, (int, float)):
                w.add_scalar(f"cos/{name}", value, e)
        if row.get("rollingq"):
            w.add_scalar("rollingq/rotated", float(bool(row["rotated"])), e)
            w.add_text("rollingq/records", "\n\n".join(record_summary(r) for r in row["rollingq"]), e)
        w.flush()
        self.steps.flush()

    def close(self) -> None:
        self.epochs.close()
        self.steps.close()


def _number(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def record_summary(record: dict) -> str:
    """One line of a controller record (``RotationRecord`` as a dict): what it decided and why."""
    what = "rotated" if record.get("rotated") else f"not rotated ({record.get('reason') or 'no reason'})"
    if record.get("action") in ("cap", "rollback"):
        what = "rotated (capped)" if record["action"] == "cap" else f"rolled back ({record.get('reason')})"
    parts = [f"AIR {_number(record.get('air'), '{:+.4f}')}"]
    if record.get("indicator", "cos") != "cos":
        parts.append(f"{record['indicator']} {_number(record.get('value'), '{:+.4f}')}")
    parts.append(f"samples {record.get('count')}")
    if record.get("rotated"):
        applied = record.get("applied_angle_deg", record.get("angle_deg"))
        proposed = "" if applied == record.get("angle_deg") else f" of {_number(record.get('angle_deg'), '{:.2f}')}"
        parts.append(f"angle {_number(applied, '{:.2f}')}{proposed} deg")
    parts.append(f"rotations {record.get('num_rotations')}")
    if record.get("assumption_warning"):
        parts.append("the indicator and the attention mass favour different modalities")
    return f"layer {record.get('layer')} {what}: " + ", ".join(parts)


def log_epoch(row: dict, board: RunBoard | None, logger: logging.Logger, modalities: list[str],
              best_val: float) -> None:
    """The epoch's line and one line per controller record at INFO (the full records at DEBUG); the
    scalars in TensorBoard when ``board`` is given."""
    air = "n/a" if row["air"] is None else _number(row["air"], "{:+.3f}")
    mass = "n/a" if row["mass"] is None else "[" + ", ".join(f"{m:.2f}" for m in row["mass"]) + "]"
    logger.info(
        "epoch %d: loss %s train_acc %.4f val_acc %.4f val_f1 %.4f lr %.2e AIR %s mass %s%s (%.1fs)",
        row["epoch"], _number(row["train_loss"], "{:.4f}"), row["train_acc"], row["val_acc"],
        row["val_macro_f1"], row["lr"], air, mass, " ROTATED" if row["rotated"] else "", row["time_s"],
    )
    for rec in row["rollingq"]:
        logger.info("rollingq: %s", record_summary(rec))
        logger.debug("rollingq record: %s", rec)
    if board is not None:
        board.log_epoch(row, modalities, best_val)
