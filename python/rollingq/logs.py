"""What a run writes while it trains, besides checkpoints: ``train.log``, the epoch line and TensorBoard scalars.

The ``rollingq`` and ``rollingq_kernels`` loggers (the controller's rotations included) go to
``RUN_DIR/train.log``. Records logged before the run folder exists (while the datasets and the model
are built) are held by :func:`hold_records` and written to the file when it opens.
"""

from __future__ import annotations

import logging
import os
from logging.handlers import MemoryHandler

from torch.utils.tensorboard import SummaryWriter

from .records import LOG_FILENAME, TENSORBOARD_DIR

LOGGERS = ("rollingq", "rollingq_kernels")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _attach(handler: logging.Handler) -> logging.Handler:
    for name in LOGGERS:
        log = logging.getLogger(name)
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
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


def open_tensorboard(run_dir: str, first_epoch: int) -> SummaryWriter:
    """The run's TensorBoard writer; events of epochs ``>= first_epoch`` from an earlier attempt are dropped."""
    return SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=first_epoch)


def log_epoch(row: dict, modalities: list[str], writer: SummaryWriter | None, logger: logging.Logger) -> None:
    """The epoch's line (and the controller's records) on ``logger``, its scalars in TensorBoard."""
    air = "n/a" if row["air"] is None else f"{row['air']:+.3f}"
    mass = "n/a" if row["mass"] is None else "[" + ", ".join(f"{m:.2f}" for m in row["mass"]) + "]"
    logger.info(
        "epoch %d: loss %.4f train_acc %.4f val_acc %.4f val_f1 %.4f lr %.2e AIR %s mass %s%s (%.1fs)",
        row["epoch"], row["train_loss"], row["train_acc"], row["val_acc"], row["val_macro_f1"], row["lr"],
        air, mass, " ROTATED" if row["rotated"] else "", row["time_s"],
    )
    for rec in row["rollingq"]:
        logger.info("rollingq: %s", rec)
    if writer is None:
        return
    e = row["epoch"]
    for key in ("train_loss", "train_acc", "val_acc", "val_macro_f1", "lr", "air"):
        if row.get(key) is not None:
            writer.add_scalar(key, row[key], e)
    for name, value in zip(["class", *modalities], row["mass"] or []):
        writer.add_scalar(f"mass/{name}", value, e)
    for name, value in zip(modalities, row["cos"] or []):
        if value is not None:
            writer.add_scalar(f"cos/{name}", value, e)
    writer.flush()
