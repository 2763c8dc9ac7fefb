"""The trainer: one run's model, optimizer, scheduler, controller and loaders, and its epoch loop.

:class:`Trainer` trains from ``start_epoch`` to ``epochs`` (:meth:`Trainer.fit`): every epoch trains,
steps the RollingQ controller, validates, checks the weights and writes ``checkpoints/last.pt``
(``best.pt`` first when the validation accuracy improved) and ``metrics.jsonl`` (main process).
A non-finite loss stops the run at that step (:class:`NonFiniteError`), before the update, and no
checkpoint is written from a model with a non-finite weight. Building a trainer touches no file.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rollingq_kernels.accumulator import StatisticsAccumulator, imbalance, synced_statistics

from . import distributed
from .build import build_controller, build_dataset, build_model, build_optimizer, make_loader
from .checkpoint import CheckpointError, atomic_save
from .config import Config
from .interrupts import DeferredInterrupt
from .logs import RunBoard, log_epoch
from .models.warmstart import warm_start_encoders
from .ogm import modulate_gradients, ogm_coefficients
from .records import METRICS_FILENAME, checkpoint_path, jsonable, write_metrics
from .runstate import RESTORE_ERRORS, restore_optimization
from .schedule import warmup_cosine, warmup_steps
from .schema import clip
from .seeding import rng_state, seed_everything, set_rng_state
from .validate import validate

logger = logging.getLogger("rollingq.train")

CHECKPOINT_VERSION = 1


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C, SIGINT); the message says where the last checkpoint is and the
    command that continues the run."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weight; the message names the epoch, the step and the last
    good checkpoint (nothing was written from the non-finite state)."""



def stage_for_epoch(cfg: Config, epoch: int) -> int:
    """Progressive training (``vanilla_mt_star``): stage 1 (first block only) for ``progressive_epochs``, then 2."""
    if cfg.model.fusion != "vanilla_mt_star":
        return 1
    return 1 if epoch <= cfg.model.progressive_epochs else 2


@contextmanager
def _named(source: str, key: str) -> Iterator[None]:
    """Restoring ``key`` of a checkpoint: a malformed value is a :class:`CheckpointError` naming file and key."""
    try:
        yield
    except RESTORE_ERRORS as exc:
        raise CheckpointError(f"{source}: its {key!r} state cannot be restored ({type(exc).__name__}: "
                              f"{clip(str(exc), 200)})") from exc


class Trainer:
    """Owns the model, optimizer, scheduler, controller and loaders of one run.

    Building it touches no file: :meth:`fit` writes into ``run_dir``, which the main process
    creates once the trainer is built.

    Args:
        cfg: the resolved config.
        run_dir: the run directory.
        info: this process's place in the process group.
        state: a checkpoint to resume from, or None for a fresh run.
        source: the checkpoint's file, named in errors.
    """

    def __init__(self, cfg: Config, run_dir: str, info: distributed.DistInfo, state: dict | None = None,
                 source: str = "the checkpoint") -> None:
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        self.source = source
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
        self.saved_epoch: int | None = None  # the epoch of checkpoints/last.pt
        self.stage = stage_for_epoch(cfg, int(state["epoch"]) if state else 1)
        self.model.set_stage(self.stage)
        self.optimizer = build_optimizer(cfg, self.model)
        steps = len(self.train_loader)
        o = cfg.optim
        if o.warmup_epochs > self.epochs and info.is_main:
            logger.warning("optim.warmup_epochs=%g is longer than the run (train.epochs=%d): the learning rate "
                           "rises for the whole run and never reaches optim.lr", o.warmup_epochs, self.epochs)
        self.scheduler = warmup_cosine(self.optimizer, self.epochs * steps, warmup_steps(o.warmup_epochs, steps,
                                       self.epochs), o.min_lr / o.lr if o.lr > 0 else 0.0)
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
        # Ctrl-C stops at a safe point (rollingq.interrupts); a multi-process run keeps Python's handler
        self.interrupt = DeferredInterrupt(enabled=not info.distributed)

    # ----------------------------------------------------------------- state
    def _load_state(self, state: dict) -> None:
        """Continue from a checkpoint (checked by :func:`rollingq.checkpoint.check_resume_state`); the
        optimizer's and scheduler's settings stay those of the config (:func:`restore_optimization`)."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # another model (--resume --force after editing model.*)
            raise CheckpointError(f"{self.source}: its model does not fit the model of config.yaml "
                                  f"({clip(str(exc), 300)})") from exc
        restore_optimization(self.optimizer, self.scheduler, state, self.cfg, self.source,
                             int(state["epoch"]) * len(self.train_loader))
        if self.controller is not None:
            if state.get("controller") is None:
                raise CheckpointError(f"{self.source} has no RollingQ controller state but rollingq.enabled is true")
            # config.yaml's settings win (they equal the saved ones unless --resume --force)
            with _named(self.source, "controller"):
                self.controller.load_state_dict(state["controller"], settings=False)
        self.start_epoch = int(state["epoch"]) + 1
        self.saved_epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_val = float(state["best_val"])
        with _named(self.source, "rng"):
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

    def resume_hint(self) -> str:
        """Where the run stands after an interruption: its last checkpoint and how to continue from it."""
        last = checkpoint_path(self.run_dir, "last")
        if self.saved_epoch is None:
            return f"no checkpoint was written in {self.run_dir} (interrupted before the end of the first epoch)"
        return (f"the last checkpoint is {last} (epoch {self.saved_epoch} of {self.epochs}); continue with "
                f"`rollingq train --resume {self.run_dir}`")

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
                self.interrupt.check()  # Ctrl-C: drop this epoch, last.pt stays the previous one
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
        """The controller decides from the epoch's training results (``rollingq_kernels.policy``: start epoch,
        first-rotation guard, threshold, safety rule, angle cap, rollback); it may re-read this rank's training
        shard in eval mode, no grad (the estimation pass of ``rollingq.estimate=pass``, the attention probe)."""
        self.model.eval()
        try:
            records = self.controller.step(epoch, self.train_loader, self._estimation_forward, loss=row["train_loss"],
                                           accuracy=row["train_acc"], majority=row["train_majority"])
        finally:
            self.model.train()
        row["rollingq_guard"] = next((r.detail for r in records if r.reason == "accuracy_guard"), None)
        return records

    # ----------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Train from ``start_epoch`` to ``epochs``; returns the metric history.

        Ctrl-C (SIGINT) raises :class:`KeyboardInterrupt` at the next safe point: before a training step
        (the epoch is dropped), or, once an epoch's training steps are done, after its checkpoint, metrics
        row and log line are written (after the last epoch, the run finishes); a second Ctrl-C raises at
        once (:mod:`rollingq.interrupts`).
        """
        with self.interrupt:
            board = None
            try:
                if self.info.is_main:
                    board = RunBoard(self.run_dir, self.start_epoch,
                                     (self.start_epoch - 1) * len(self.train_loader) + 1)
                    if self.start_epoch == 1:
                        board.log_hparams(self.cfg.to_dict())
                for epoch in range(self.start_epoch, self.epochs + 1):
                    self.interrupt.check()
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
            self.saved_epoch = epoch
            write_metrics(os.path.join(self.run_dir, METRICS_FILENAME), self.history)
            log_epoch(row, board, logger, self.cfg.data.modalities, self.best_val)
        distributed.barrier()

