"""The trainer: plain PyTorch, one process or many (``torchrun`` + DistributedDataParallel).

``train(cfg, run_dir)`` runs ``cfg.train.epochs`` epochs; ``resume(run_dir)``
continues a run from ``checkpoints/last.pt`` exactly where it stopped (model with
rotation buffers, optimizer, scheduler, RollingQ controller, RNG states, epoch,
metric history). Every epoch appends to ``metrics.jsonl`` and TensorBoard and
writes ``checkpoints/last.pt`` atomically (plus ``best.pt`` when the validation
accuracy improves; model selection never looks at the test split). The run
folder is created only once the datasets and the model are built, so a run that
cannot start leaves nothing behind.

Nothing is mixed or lost silently: a new run refuses a folder that holds another
run's files (``overwrite=True`` removes them first); ``resume`` refuses a
checkpoint whose stored config differs from ``config.yaml`` (``force=True``
continues anyway); a non-finite loss stops the run at that step with a
:class:`NonFiniteError` naming the epoch and step, before the update, and no
checkpoint is written from a model with a non-finite weight, so ``last.pt`` and
``best.pt`` stay those of the last good epoch. Stale temporaries of interrupted
writes are removed when a run starts.

Determinism: the data order is a pure function of ``(seed, epoch)`` (a
``DistributedSampler``), augmentation of ``(seed, epoch, index)``, and the global
RNG states are saved at every epoch end, so a run killed mid-epoch and resumed
produces the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from datetime import datetime
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rollingq_kernels.accumulator import StatisticsAccumulator, imbalance, synced_statistics
from rollingq_kernels.controller import accuracy_guard

from . import distributed
from .build import build_controller, build_dataset, build_model, build_optimizer, make_loader
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .config import Config, ConfigError, as_config, read_config, save_config
from .files import remove_stale_temporaries
from .logs import RunBoard, add_file_logging, detach, hold_records, log_epoch
from .models import MultimodalModel
from .models.warmstart import warm_start_encoders
from .ogm import modulate_gradients, ogm_coefficients
from .records import (
    CHECKPOINT_DIR,
    CONFIG_FILENAME,
    METRICS_FILENAME,
    checkpoint_path,
    jsonable,
    run_files,
    write_metrics,
)
from .schedule import warmup_cosine
from .seeding import rng_state, seed_everything, set_rng_state
from .validate import validate

logger = logging.getLogger("rollingq.train")

CHECKPOINT_VERSION = 1
MAX_LISTED = 8


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weight; the message names the epoch, the step and the last
    good checkpoint (nothing was written from the non-finite state)."""


class RunMismatchError(ValueError):
    """A checkpoint's stored config differs from the run's ``config.yaml`` (the message names the keys)."""


def make_run_dir(cfg: Config, run_dir: str | None) -> str:
    """``run_dir`` if given, else ``<out_dir>/<dataset>_<name>_<timestamp>``."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        label = f"{cfg.data.name}_{cfg.name}".replace("+", "_")
        run_dir = os.path.join(cfg.out_dir, f"{label}_{stamp}")
    return run_dir


def _listed(items: list[str]) -> str:
    more = f", … {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def check_run_dir_free(run_dir: str, overwrite: bool) -> list[str]:
    """Refuse ``run_dir`` if it holds a run's files, unless ``overwrite``; returns those files.

    Raises:
        FileExistsError: naming the files, and ``--resume`` when the folder holds a checkpoint.
    """
    existing = run_files(run_dir)
    if existing and not overwrite:
        names = _listed([os.path.relpath(p, run_dir) for p in existing])
        if os.path.exists(checkpoint_path(run_dir, "last")):
            raise FileExistsError(
                f"--out: {run_dir!r} already holds a run (checkpoints/last.pt; {names}); continue it with "
                f"`rollingq train --resume {run_dir}`, choose another folder, or replace it with --overwrite"
            )
        raise FileExistsError(
            f"--out: {run_dir!r} holds another run's files ({names}); choose another folder, or replace "
            "that run with --overwrite (its files are removed first)"
        )
    return existing


def remove_run_files(run_dir: str) -> list[str]:
    """Remove the files of the run in ``run_dir`` (:func:`rollingq.records.run_files`); returns them."""
    removed = run_files(run_dir)
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if removed:
        logger.warning("--overwrite: removed the previous run's files in %s: %s", run_dir,
                       _listed([os.path.relpath(p, run_dir) for p in removed]))
    return removed


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two YAML-shaped config dicts, as 'key (a != b)' strings."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_differences(a, b, dotted + "."))
        elif a != b:
            out.append(f"{dotted} (checkpoint: {a!r}, config.yaml: {b!r})")
    return out


def check_same_run(state: dict, cfg: Config, checkpoint: str, config_path: str, force: bool) -> None:
    """Refuse a checkpoint whose stored config differs from ``cfg`` (``config.yaml``) unless ``force``.

    Raises:
        RunMismatchError: naming the differing dotted keys.
    """
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        differences = ["(the checkpoint stores no config)"]
    else:
        try:  # through the same validation, so renamed keys and new defaults compare equal
            saved = Config.from_dict(saved).to_dict()
        except ConfigError as exc:
            logger.warning("%s: its stored config is not valid today (%s); comparing it as stored", checkpoint, exc)
        differences = config_differences(saved, cfg.to_dict())
    if not differences:
        return
    listed = _listed(differences)
    if not force:
        raise RunMismatchError(
            f"--resume: {checkpoint} was written by a run with another config than {config_path}: {listed}. "
            "Refusing to mix two runs; continue anyway with --resume --force (config.yaml wins)"
        )
    logger.warning("--resume --force: %s was written with another config than %s (%s); continuing with %s",
                   checkpoint, config_path, listed, config_path)


def stage_for_epoch(cfg: Config, epoch: int) -> int:
    """Progressive training (``vanilla_mt_star``): stage 1 (first block only) for ``progressive_epochs``, then 2."""
    if cfg.model.fusion != "vanilla_mt_star":
        return 1
    return 1 if epoch <= cfg.model.progressive_epochs else 2


class Trainer:
    """Owns the model, optimizer, scheduler, controller and loaders of one run.

    Building it touches no file: :meth:`fit` writes into ``run_dir``, which the main process
    creates once the trainer is built.

    Args:
        cfg: the resolved config.
        run_dir: the run directory.
        info: this process's place in the process group.
        state: a checkpoint to resume from, or None for a fresh run.
    """

    def __init__(self, cfg: Config, run_dir: str, info: distributed.DistInfo, state: dict | None = None) -> None:
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        self.device = info.device
        seed_everything(cfg.seed)
        self.train_set = build_dataset(cfg, "train")
        self.val_set = build_dataset(cfg, "val")
        self.train_loader = make_loader(self.train_set, cfg, True, info.world_size, info.rank)
        self.val_loader = make_loader(self.val_set, cfg, False)
        if len(self.train_loader) == 0:
            raise ValueError("train.batch_size: the training loader yields no batch")
        self.model = build_model(cfg)
        if state is None and cfg.model.init_encoders:
            warm_start_encoders(self.model, cfg.model.init_encoders)
        self.model = self.model.to(self.device)
        self.epochs = cfg.train.epochs
        self.start_epoch = 1
        self.history: list[dict] = []
        self.best_val = -1.0
        self.stage = stage_for_epoch(cfg, int(state["epoch"]) if state else 1)
        self.model.set_stage(self.stage)
        self.optimizer = build_optimizer(cfg, self.model)
        steps = len(self.train_loader)
        o = cfg.optim
        self.scheduler = warmup_cosine(
            self.optimizer, self.epochs * steps, int(o.warmup_epochs * steps), o.min_lr / o.lr if o.lr > 0 else 0.0
        )
        self.controller = build_controller(cfg, self.model)
        self._feed_windows()
        if state is not None:
            self._load_state(state)
        find_unused = cfg.model.fusion in ("unimodal", "vanilla_mt_star")
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp: nn.Module = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=find_unused
            )
        else:
            self.ddp = self.model
        self.autocast_enabled = self.device.type == "cuda" and cfg.train.bf16
        self.progress = cfg.train.progress and info.is_main and sys.stderr.isatty()

    # ----------------------------------------------------------------- state
    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.controller is not None:
            if state.get("controller") is None:
                raise CheckpointError("checkpoint has no RollingQ controller state but rollingq.enabled is true")
            # config.yaml's settings win (they equal the saved ones unless --resume --force)
            self.controller.load_state_dict(state["controller"], settings=False)
        self.start_epoch = int(state["epoch"]) + 1
        self.history = list(state["history"])
        self.best_val = float(state["best_val"])
        set_rng_state(state["rng"])

    def state_dict(self, epoch: int) -> dict:
        """Everything needed to resume after ``epoch`` (loadable with ``weights_only=True``)."""
        return {
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "stage": self.stage,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "rng": rng_state(),
            "history": jsonable(self.history),
            "best_val": self.best_val,
            "config": self.cfg.to_dict(),
        }

    # ----------------------------------------------------------------- one epoch
    def _set_stage(self, epoch: int) -> None:
        stage = stage_for_epoch(self.cfg, epoch)
        if stage != self.stage:
            logger.info("epoch %d: progressive training enters stage %d (second fusion block on)", epoch, stage)
            self.stage = stage
            self.model.set_stage(stage)
            if self.controller is not None:
                self.controller.retarget([self.model.fusion_attention])
            self._feed_windows()

    def _feed_windows(self) -> None:
        """Only the controlled layer keeps a statistics window (the epoch log has its own accumulator)."""
        for layer in self.model.fusion_attentions():
            layer.collect_statistics = self.controller is not None and layer is self.model.fusion_attention

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast_enabled else nullcontext()

    def _last_good(self) -> str:
        last = checkpoint_path(self.run_dir, "last")
        if self.start_epoch > 1 or self.history:
            epoch = self.history[-1]["epoch"] if self.history else self.start_epoch - 1
            return f"the last good checkpoint is {last} (epoch {epoch}; best.pt is untouched)"
        return "no checkpoint was written (this was the first epoch)"

    def _check_loss(self, loss: torch.Tensor, epoch: int, step: int, batch: dict) -> None:
        """Stop at the first non-finite loss, before its update (every rank agrees: one all-reduce in DDP)."""
        bad = (~torch.isfinite(loss.detach())).to(torch.float64)
        if self.info.distributed:
            bad = distributed.all_reduce_sum(bad)
        if not bool(bad):
            return
        local = float(loss.detach())
        where = (f"the loss is {local}" if not math.isfinite(local)
                 else "another process's loss is non-finite (this one's is finite)")
        indices = batch["index"].tolist()
        shown = ", ".join(str(i) for i in indices[:16]) + (", …" if len(indices) > 16 else "")
        raise NonFiniteError(
            f"epoch {epoch}, step {step}/{len(self.train_loader)}: {where}; training stopped before this "
            f"update, and {self._last_good()}. The batch held training samples {shown} "
            "(check the data for NaN/inf, or lower optim.lr)"
        )

    def _check_weights(self, epoch: int) -> None:
        """Refuse to checkpoint a model with a non-finite weight or buffer (every rank checks its own copy)."""
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(
                    f"epoch {epoch}: the model's {name!r} holds non-finite values after training; nothing was "
                    f"written from it, and {self._last_good()} (check the data for NaN/inf, or lower optim.lr)"
                )

    def train_epoch(self, epoch: int, board: RunBoard | None = None) -> dict:
        """One pass over the training split; returns the epoch's training metrics (all ranks reduced).

        ``air``, ``mass`` and ``cos`` come from the fusion layer's statistics of the epoch's training
        forwards, gathered by an accumulator the layer feeds (``collecting``). Every step's loss is
        checked (one host sync per step): a non-finite one raises :class:`NonFiniteError` before the
        update. ``board`` gets every step's loss and learning rate.
        """
        cfg = self.cfg
        self.train_loader.sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        self.ddp.train()
        num_mod = len(cfg.data.modalities)
        # loss sum, correct, count, probe correct: kept on the device (no host sync per step)
        totals = torch.zeros(3 + num_mod, dtype=torch.float64, device=self.device)
        label_counts = torch.zeros(cfg.data.num_classes, dtype=torch.float64, device=self.device)
        ogm_on = cfg.model.fusion == "ogm_ge" and cfg.ogm.start_epoch <= epoch <= cfg.ogm.end_epoch
        layer = self.model.fusion_attention
        epoch_statistics = StatisticsAccumulator("epoch")
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=not self.progress)
        steps = len(self.train_loader)
        with layer.collecting(epoch_statistics) if layer is not None else nullcontext():
            for step, batch in enumerate(bar, start=1):
                mods = [x.to(self.device, non_blocking=True) for x in batch["modalities"]]
                labels = batch["label"].to(self.device)
                with self._autocast():
                    out = self.ddp(mods)
                loss_main = F.cross_entropy(out.logits.float(), labels)
                probe_loss = sum(F.cross_entropy(p.float(), labels) for p in out.probe_logits)
                loss = loss_main + cfg.train.probe_loss_weight * probe_loss
                self._check_loss(loss, epoch, step, batch)
                lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step's update
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if ogm_on and out.unimodal_logits is not None:
                    coeffs = ogm_coefficients(out.unimodal_logits, labels, cfg.ogm.alpha)
                    modulate_gradients(self.model.encoders, coeffs)
                if cfg.train.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                with torch.no_grad():
                    n = labels.shape[0]
                    totals[0] += loss_main.detach().double() * n
                    totals[1] += (out.logits.argmax(1) == labels).sum()
                    totals[2] += n
                    label_counts += torch.bincount(labels, minlength=label_counts.numel())[: label_counts.numel()]
                    for m, p in enumerate(out.probe_logits):
                        totals[3 + m] += (p.argmax(1) == labels).sum()
                if self.progress or board is not None:
                    value = float(loss_main.detach())
                    if self.progress:
                        bar.set_postfix(loss=f"{value:.3f}")
                    if board is not None:
                        board.log_step((epoch - 1) * steps + step, value, lr)
        totals = distributed.all_reduce_sum(totals).cpu()
        label_counts = distributed.all_reduce_sum(label_counts).cpu()
        result = {
            "train_loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]),
            "train_probe_acc": [float(totals[3 + m] / totals[2]) for m in range(num_mod)],
            "train_majority": float(label_counts.max() / totals[2]),
            "air": None, "mass": None, "cos": None,
        }
        window = None if layer is None else synced_statistics(epoch_statistics.sums(), layer.zero_sums)
        if window is not None:
            # AIR, or the spread for M > 2 (the controller decides on another value with indicator=score)
            result["air"] = imbalance(window)
            result["mass"] = window.mass_mean.mean(0).tolist()
            result["cos"] = window.cos_mean.tolist()
        return result

    def _estimation_forward(self, batch: dict) -> None:
        mods = [x.to(self.device, non_blocking=True) for x in batch["modalities"]]
        with self._autocast():
            self.model(mods)

    def _controller_step(self, epoch: int, row: dict) -> list:
        """Step the controller from epoch ``rollingq.start_epoch`` on and once the epoch's training accuracy
        clears the first-rotation guard (``rollingq.min_accuracy_gain``, see
        :func:`rollingq_kernels.controller.accuracy_guard`); earlier windows are discarded. With
        ``rollingq.estimate=pass`` it re-reads this rank's training shard (eval mode, no grad) to estimate
        the anchor, as the official code does before a rotation."""
        if epoch < self.cfg.rollingq.start_epoch:
            self.controller.reset_statistics()  # too early to rotate: start the next window afresh
            return []
        held = accuracy_guard(row["train_acc"], row["train_majority"], self.cfg.rollingq.min_accuracy_gain)
        row["rollingq_guard"] = held
        if held is not None:
            logger.info("epoch %d: RollingQ does not rotate: %s", epoch, held)
            self.controller.reset_statistics()
            return []
        if self.cfg.rollingq.estimate != "pass":
            return self.controller.step(epoch=epoch)
        self.model.eval()
        try:
            return self.controller.step(epoch=epoch, loader=self.train_loader, forward_fn=self._estimation_forward)
        finally:
            self.model.train()

    # ----------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Train from ``start_epoch`` to ``epochs``; returns the metric history."""
        board = None
        if self.info.is_main:
            board = RunBoard(self.run_dir, self.start_epoch, (self.start_epoch - 1) * len(self.train_loader) + 1)
            if self.start_epoch == 1:
                board.log_hparams(self.cfg.to_dict())
        try:
            for epoch in range(self.start_epoch, self.epochs + 1):
                self._fit_epoch(epoch, board)
        finally:
            if board is not None:
                board.close()
        return self.history

    def _fit_epoch(self, epoch: int, board: RunBoard | None) -> None:
        """Train one epoch, step the controller, validate, checkpoint and log."""
        t0 = time.time()
        self._set_stage(epoch)
        layer = self.model.fusion_attention
        row: dict = {"epoch": epoch}
        row.update(self.train_epoch(epoch, board))
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        records, rotated = [], False
        if self.controller is not None:
            before = int(layer.num_rotations)
            records = [jsonable(r) for r in self._controller_step(epoch, row)]
            rotated = int(layer.num_rotations) > before
        row["rollingq"], row["rotated"] = records, rotated
        row["num_rotations"] = None if layer is None else int(layer.num_rotations)
        row["stage"] = self.stage
        val = validate(self.model, self.val_loader, self.device, self.cfg.data.num_classes, progress=self.progress)
        row["val_acc"], row["val_macro_f1"], row["val_probe_acc"] = val["acc"], val["macro_f1"], val["probe_acc"]
        row["val_mass"] = val["mass"]
        row["time_s"] = time.time() - t0
        self._check_weights(epoch)
        self.history.append(jsonable(row))
        improved = val["acc"] > self.best_val
        if improved:
            self.best_val = val["acc"]
        if self.info.is_main:
            state = self.state_dict(epoch)
            if improved:  # best first: a crash before last.pt is written loses no best checkpoint
                atomic_save(state, checkpoint_path(self.run_dir, "best"))
            atomic_save(state, checkpoint_path(self.run_dir, "last"),
                        keep_previous=checkpoint_path(self.run_dir, "previous"))
            write_metrics(os.path.join(self.run_dir, METRICS_FILENAME), self.history)
            log_epoch(row, board, logger, self.cfg.data.modalities, self.best_val)
        distributed.barrier()


def _run(cfg: Config, run_dir: str, state: dict | None, overwrite: bool = False) -> str:
    info = distributed.setup(cfg.device)
    threads = torch.get_num_threads()  # restored afterwards: a library caller's process keeps its setting
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    held = hold_records() if info.is_main else None  # until train.log exists
    if info.is_main:
        cfg.warn_inert_settings()
    handler = None
    try:
        if state is None:  # every rank looks before any rank writes
            check_run_dir_free(run_dir, overwrite)
            distributed.barrier()
        trainer = Trainer(cfg, run_dir, info, state)  # datasets and model first: a bad start leaves no folder
        if info.is_main:
            if state is None and overwrite:
                remove_run_files(run_dir)
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
            logger.info("training %s into %s on %s (world size %d)", cfg.name, run_dir, info.device, info.world_size)
        trainer.fit()
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
    return _run(cfg, run_dir, state)


def load_run(run_dir: str, checkpoint: str = "best") -> tuple[MultimodalModel, Config]:
    """The model of a finished run (eval mode; on CPU unless the config says ``device: cuda``) and its config.

    Args:
        run_dir: a run directory written by :func:`train`.
        checkpoint: ``best`` (best validation accuracy), ``last`` or ``previous``.
    """
    cfg = read_config(os.path.join(run_dir, CONFIG_FILENAME))
    state = load_checkpoint(checkpoint_path(run_dir, checkpoint))
    model = build_model(cfg)
    model.set_stage(int(state.get("stage", 1)))
    model.load_state_dict(state["model"])
    device = torch.device("cuda") if cfg.device == "cuda" and torch.cuda.is_available() else torch.device("cpu")
    return model.to(device).eval(), cfg
