"""The trainer: plain PyTorch, one process or many (``torchrun`` + DistributedDataParallel).

``train(cfg, run_dir)`` runs ``cfg.train.epochs`` epochs; ``resume(run_dir)``
continues a run from ``checkpoints/last.pt`` exactly where it stopped (model with
rotation buffers, optimizer, scheduler, RollingQ controller, RNG states, epoch,
metric history). Every epoch appends to ``metrics.jsonl`` and TensorBoard and
writes ``checkpoints/last.pt`` atomically (plus ``best.pt`` when the validation
accuracy improves; model selection never looks at the test split). The run
folder is created only once the datasets and the model are built, so a run that
cannot start leaves nothing behind.

Determinism: the data order is a pure function of ``(seed, epoch)`` (a
``DistributedSampler``), augmentation of ``(seed, epoch, index)``, and the global
RNG states are saved at every epoch end, so a run killed mid-epoch and resumed
produces the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
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
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rollingq_kernels.accumulator import StatisticsAccumulator, imbalance, synced_statistics

from . import distributed
from .build import build_controller, build_dataset, build_model, build_optimizer, make_loader
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .config import Config, as_config, read_config, save_config
from .logs import add_file_logging, detach, hold_records, log_epoch, open_tensorboard
from .models import MultimodalModel
from .ogm import modulate_gradients, ogm_coefficients
from .records import CHECKPOINT_DIR, CONFIG_FILENAME, METRICS_FILENAME, checkpoint_path, jsonable, write_metrics
from .schedule import warmup_cosine
from .seeding import rng_state, seed_everything, set_rng_state
from .validate import validate

logger = logging.getLogger("rollingq.train")

CHECKPOINT_VERSION = 1


def make_run_dir(cfg: Config, run_dir: str | None) -> str:
    """``run_dir`` if given, else ``<out_dir>/<dataset>_<name>_<timestamp>``; refuses a folder holding a run."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        label = f"{cfg.data.name}_{cfg.name}".replace("+", "_")
        run_dir = os.path.join(cfg.out_dir, f"{label}_{stamp}")
    if os.path.exists(checkpoint_path(run_dir, "last")):
        raise FileExistsError(
            f"--out: {run_dir!r} already holds a run (checkpoints/last.pt); continue it with "
            f"`rollingq train --resume {run_dir}` or choose another folder"
        )
    return run_dir


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
        self.model = build_model(cfg).to(self.device)
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
            self.controller.load_state_dict(state["controller"])
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

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training split; returns the epoch's training metrics (all ranks reduced).

        ``air``, ``mass`` and ``cos`` come from the fusion layer's statistics of the epoch's training
        forwards, gathered by an accumulator the layer feeds (``collecting``).
        """
        cfg = self.cfg
        self.train_loader.sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        self.ddp.train()
        num_mod = len(cfg.data.modalities)
        # loss sum, correct, count, probe correct: kept on the device (no host sync per step)
        totals = torch.zeros(3 + num_mod, dtype=torch.float64, device=self.device)
        ogm_on = cfg.model.fusion == "ogm_ge" and cfg.ogm.start_epoch <= epoch <= cfg.ogm.end_epoch
        layer = self.model.fusion_attention
        epoch_statistics = StatisticsAccumulator("epoch")
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=not self.progress)
        with layer.collecting(epoch_statistics) if layer is not None else nullcontext():
            for batch in bar:
                mods = [x.to(self.device, non_blocking=True) for x in batch["modalities"]]
                labels = batch["label"].to(self.device)
                with self._autocast():
                    out = self.ddp(mods)
                loss_main = F.cross_entropy(out.logits.float(), labels)
                probe_loss = sum(F.cross_entropy(p.float(), labels) for p in out.probe_logits)
                loss = loss_main + cfg.train.probe_loss_weight * probe_loss
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
                    for m, p in enumerate(out.probe_logits):
                        totals[3 + m] += (p.argmax(1) == labels).sum()
                if self.progress:
                    bar.set_postfix(loss=f"{float(loss_main):.3f}")
        totals = distributed.all_reduce_sum(totals).cpu()
        result = {
            "train_loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]),
            "train_probe_acc": [float(totals[3 + m] / totals[2]) for m in range(num_mod)],
            "air": None, "mass": None, "cos": None,
        }
        window = None if layer is None else synced_statistics(epoch_statistics.sums(), layer.zero_sums)
        if window is not None:
            result["air"] = imbalance(window)  # AIR, or the spread for M > 2: what the controller decides on
            result["mass"] = window.mass_mean.mean(0).tolist()
            result["cos"] = window.cos_mean.tolist()
        return result

    def _estimation_forward(self, batch: dict) -> None:
        mods = [x.to(self.device, non_blocking=True) for x in batch["modalities"]]
        with self._autocast():
            self.model(mods)

    def _controller_step(self, epoch: int) -> list:
        """Step the controller from epoch ``rollingq.start_epoch`` on (earlier windows are discarded);
        with ``rollingq.estimate=pass`` it re-reads this rank's training shard (eval mode, no grad) to
        estimate the anchor, as the official code does before a rotation."""
        if epoch < self.cfg.rollingq.start_epoch:
            self.controller.reset_statistics()  # too early to rotate: start the next window afresh
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
        writer = open_tensorboard(self.run_dir, self.start_epoch) if self.info.is_main else None
        try:
            for epoch in range(self.start_epoch, self.epochs + 1):
                self._fit_epoch(epoch, writer)
        finally:
            if writer is not None:
                writer.close()
        return self.history

    def _fit_epoch(self, epoch: int, writer: SummaryWriter | None) -> None:
        """Train one epoch, step the controller, validate, checkpoint and log."""
        t0 = time.time()
        self._set_stage(epoch)
        layer = self.model.fusion_attention
        row: dict = {"epoch": epoch}
        row.update(self.train_epoch(epoch))
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        records, rotated = [], False
        if self.controller is not None:
            before = int(layer.num_rotations)
            records = [jsonable(r) for r in self._controller_step(epoch)]
            rotated = int(layer.num_rotations) > before
        row["rollingq"], row["rotated"] = records, rotated
        row["num_rotations"] = None if layer is None else int(layer.num_rotations)
        row["stage"] = self.stage
        val = validate(self.model, self.val_loader, self.device, self.cfg.data.num_classes, progress=self.progress)
        row["val_acc"], row["val_macro_f1"], row["val_probe_acc"] = val["acc"], val["macro_f1"], val["probe_acc"]
        row["val_mass"] = val["mass"]
        row["time_s"] = time.time() - t0
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
            log_epoch(row, self.cfg.data.modalities, writer, logger)
        distributed.barrier()


def _run(cfg: Config, run_dir: str, state: dict | None) -> str:
    info = distributed.setup(cfg.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    held = hold_records() if info.is_main else None  # until train.log exists
    handler = None
    try:
        trainer = Trainer(cfg, run_dir, info, state)  # datasets and model first: a bad start leaves no folder
        if info.is_main:
            os.makedirs(os.path.join(run_dir, CHECKPOINT_DIR), exist_ok=True)
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
        for h in (held, handler):
            if h is not None:
                detach(h)
        distributed.cleanup()
    return run_dir


def train(cfg: Config | Mapping[str, Any], run_dir: str | None = None) -> str:
    """Train a fresh run described by ``cfg`` (a config, or its YAML-shaped dict); returns the run directory."""
    cfg = as_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if run_dir is None and world > 1:
        raise ValueError("--out: a multi-process run needs an explicit run directory (all ranks must agree on it)")
    run_dir = make_run_dir(cfg, run_dir)
    return _run(cfg, run_dir, None)


def resume(run_dir: str, checkpoint: str = "last") -> str:
    """Continue the run in ``run_dir`` from ``checkpoints/<checkpoint>.pt`` (default ``last``)."""
    path = checkpoint_path(run_dir, checkpoint)
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        previous = checkpoint_path(run_dir, "previous")
        hint = (f"; the previous checkpoint {previous} is intact: continue from it with "
                f"`rollingq train --resume {run_dir} --checkpoint previous`"
                if checkpoint != "previous" and os.path.isfile(previous) else "")
        raise CheckpointError(f"{exc}{hint}") from exc
    cfg = read_config(os.path.join(run_dir, CONFIG_FILENAME))
    if state["epoch"] >= cfg.train.epochs:
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
