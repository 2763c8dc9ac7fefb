"""The trainer's entry points: ``train``, ``resume`` and ``load_run`` (one process or many: ``torchrun``
+ DistributedDataParallel).

``train(cfg, run_dir)`` runs ``cfg.train.epochs`` epochs; ``resume(run_dir)``
continues a run from ``checkpoints/last.pt`` exactly where it stopped (model with
rotation buffers, optimizer, scheduler, RollingQ controller, RNG states, epoch,
metric history). Every epoch appends to ``metrics.jsonl`` and TensorBoard and
writes ``checkpoints/last.pt`` atomically (plus ``best.pt`` when the validation
accuracy improves; model selection never looks at the test split). A run holds
its folder's lock for its whole length (:class:`~rollingq.runlock.RunLock`: a
second process on the folder gets a :class:`RunLockedError` naming the holder);
it creates the folder to lock it and removes it again when the datasets or the
model cannot be built, so a run that cannot start leaves nothing behind.

Nothing is mixed or lost silently: a new run refuses a folder that holds another
run's files (``overwrite=True`` removes them first: exactly the paths of the
folder's ``manifest.txt``); ``resume`` refuses a damaged checkpoint and one
whose stored config differs from ``config.yaml`` (``force=True`` continues
anyway, with ``config.yaml``'s optimizer settings and schedule); Ctrl-C ends
with :class:`TrainingInterrupted` saying where the last checkpoint is and how to
continue; a non-finite loss stops the run at that step with a
:class:`NonFiniteError` naming the epoch and step, before the update, and no
checkpoint is written from a model with a non-finite weight, so ``last.pt`` and
``best.pt`` stay those of the last good epoch. Stale temporaries of interrupted
writes are removed when a run starts.

Determinism: the data order is a pure function of ``(seed, epoch)`` (a
``DistributedSampler``), augmentation of ``(seed, epoch, index)``, and the global
RNG states are saved at every epoch end, so a run killed mid-epoch and resumed
produces the same metrics as an uninterrupted one.

The pieces: :mod:`rollingq.trainer` (the epoch loop), :mod:`rollingq.rundir` (the run folder),
:mod:`rollingq.runstate` (the checks of a resumed run).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from . import distributed
from .build import build_model
from .checkpoint import CheckpointError, check_resume_state, load_checkpoint
from .config import Config, as_config, read_config, save_config
from .files import remove_stale_temporaries
from .logs import add_file_logging, detach, hold_records
from .models import MultimodalModel
from .records import (
    CHECKPOINT_DIR,
    CONFIG_FILENAME,
    METRICS_FILENAME,
    checkpoint_path,
    record_written,
    write_metrics,
)
from .rundir import TRAINING_FILES, check_run_dir_free, claimed, make_run_dir, remove_run_files
from .runlock import RunLockedError
from .runstate import RunMismatchError, check_same_run
from .schema import clip
from .trainer import NonFiniteError, Trainer, TrainingInterrupted

__all__ = ["NonFiniteError", "RunLockedError", "RunMismatchError", "Trainer", "TrainingInterrupted", "load_run",
           "resume", "train"]

logger = logging.getLogger("rollingq.train")


def _run(cfg: Config, run_dir: str, state: dict | None, overwrite: bool = False, source: str = "") -> str:
    info = distributed.setup(cfg.device)
    threads = torch.get_num_threads()  # restored afterwards: a library caller's process keeps its setting
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    held = hold_records() if info.is_main else None  # until train.log exists
    if info.is_main:
        cfg.warn_inert_settings()
    handler, trainer = None, None
    try:
        with claimed(run_dir, "--out" if state is None else "--resume", info):
            if state is None:  # every rank looks (under the lock) before any rank writes
                check_run_dir_free(run_dir, overwrite)
            distributed.barrier()
            trainer = Trainer(cfg, run_dir, info, state, source)  # datasets and model first: a bad start writes nothing
            if info.is_main:
                if state is None and overwrite:
                    remove_run_files(run_dir)
                record_written(run_dir, TRAINING_FILES)  # before the first write: --overwrite removes them
                os.makedirs(os.path.join(run_dir, CHECKPOINT_DIR), exist_ok=True)
                for folder in (run_dir, os.path.join(run_dir, CHECKPOINT_DIR)):
                    remove_stale_temporaries(folder)
                if state is None:  # a resumed run keeps the config.yaml it was read from
                    save_config(cfg, os.path.join(run_dir, CONFIG_FILENAME))
                handler, held = add_file_logging(run_dir, held), None
                if state is not None:  # drop rows of an epoch that was cut short
                    write_metrics(os.path.join(run_dir, METRICS_FILENAME), state["history"])
            distributed.barrier()
            if state is not None:
                logger.info("resuming %s after epoch %d", run_dir, state["epoch"])
            else:
                logger.info("training %s into %s on %s (world size %d)", cfg.name, run_dir, info.device,
                            info.world_size)
            trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C: say where the run stands and how to continue it
        hint = trainer.resume_hint() if trainer is not None else "no epoch was trained"
        logger.warning("interrupted: %s", hint)
        raise TrainingInterrupted(hint) from None
    finally:
        torch.set_num_threads(threads)
        for h in (held, handler):
            if h is not None:
                detach(h)
        distributed.cleanup()
    return run_dir


def train(cfg: Config | Mapping[str, Any], run_dir: str | None = None, overwrite: bool = False) -> str:
    """Train a fresh run described by ``cfg`` (a config, or its YAML-shaped dict); returns the run directory.

    Args:
        cfg: the config.
        run_dir: the run folder (default ``<out_dir>/<dataset>_<name>_<time>``).
        overwrite: a folder holding another run's files is refused unless this is set; then those files
            are removed (once the datasets and the model are built) before the new run writes any.
    """
    cfg = as_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if run_dir is None and world > 1:
        raise ValueError("--out: a multi-process run needs an explicit run directory (all ranks must agree on it)")
    run_dir = make_run_dir(cfg, run_dir)
    return _run(cfg, run_dir, None, overwrite)


def resume(run_dir: str, checkpoint: str = "last", force: bool = False) -> str:
    """Continue the run in ``run_dir`` from ``checkpoints/<checkpoint>.pt`` (default ``last``).

    The checkpoint's stored config must equal ``config.yaml`` (:class:`RunMismatchError` names the
    differing keys) unless ``force`` is set, which continues with ``config.yaml``.
    """
    path = checkpoint_path(run_dir, checkpoint)
    try:
        state = load_checkpoint(path)
        check_resume_state(state, path)
    except CheckpointError as exc:
        previous = checkpoint_path(run_dir, "previous")
        hint = (f"; the previous checkpoint {previous} is intact: continue from it with "
                f"`rollingq train --resume {run_dir} --checkpoint previous`"
                if checkpoint != "previous" and os.path.isfile(previous) else "")
        raise CheckpointError(f"{exc}{hint}") from exc
    config_path = os.path.join(run_dir, CONFIG_FILENAME)
    cfg = read_config(config_path)
    check_same_run(state, cfg, path, config_path, force)
    if state["epoch"] >= cfg.train.epochs:
        if os.environ.get("RANK", "0") == "0":
            for folder in (run_dir, os.path.join(run_dir, CHECKPOINT_DIR)):
                remove_stale_temporaries(folder)
        logger.info("%s already finished %d epochs; nothing to do", run_dir, state["epoch"])
        return run_dir
    return _run(cfg, run_dir, state, source=path)


def load_run(run_dir: str, checkpoint: str = "best") -> tuple[MultimodalModel, Config]:
    """The model of a finished run (eval mode; on CPU unless the config says ``device: cuda``) and its config.

    Args:
        run_dir: a run directory written by :func:`train`.
        checkpoint: ``best`` (best validation accuracy), ``last`` or ``previous``.
    """
    cfg = read_config(os.path.join(run_dir, CONFIG_FILENAME))
    path = checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(path)
    model = build_model(cfg)
    model.set_stage(int(state.get("stage", 1)))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # config.yaml edited after training, or the checkpoint of another run
        raise CheckpointError(f"{path}: its model does not fit the model of {run_dir}/{CONFIG_FILENAME} "
                              f"({clip(str(exc), 300)})") from exc
    device = torch.device("cuda") if cfg.device == "cuda" and torch.cuda.is_available() else torch.device("cpu")
    return model.to(device).eval(), cfg
