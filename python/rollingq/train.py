"""The trainer: plain PyTorch, one process or many (``torchrun`` + DistributedDataParallel).

``train(cfg, run_dir)`` runs ``cfg["train"]["epochs"]`` epochs; ``resume(run_dir)``
continues a run from ``checkpoints/last.pt`` exactly where it stopped (model with
rotation buffers, optimizer, scheduler, RollingQ controller, RNG states, epoch,
metric history). Every epoch appends to ``metrics.jsonl`` and TensorBoard and
writes ``checkpoints/last.pt`` atomically (plus ``best.pt`` when the validation
accuracy improves; model selection never looks at the test split).

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
from contextlib import nullcontext
from datetime import datetime

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .config import read_config, save_config, validate_config
from .data import build_dataset, make_loader
from .metrics import evaluate_model
from .models import MultimodalModel, build_model
from .ogm import modulate_gradients, ogm_coefficients
from .records import jsonable, write_metrics
from .schedule import warmup_cosine
from .seeding import rng_state, seed_everything, set_rng_state

logger = logging.getLogger("rollingq.train")

CHECKPOINT_VERSION = 1
LOGGERS = ("rollingq", "rollingq_kernels")


def remove_file_logging(handler: logging.Handler) -> None:
    """Detach and close a handler made by :func:`add_file_logging`."""
    for name in LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def make_run_dir(cfg: dict, run_dir: str | None) -> str:
    """``run_dir`` if given, else ``<out_dir>/<name>_<timestamp>``; refuses a folder that already holds a run."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        label = f"{cfg['data']['name']}_{cfg['name']}".replace("+", "_")
        run_dir = os.path.join(cfg.get("out_dir", "runs"), f"{label}_{stamp}")
    if os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt")):
        raise FileExistsError(
            f"--out: {run_dir!r} already holds a run (checkpoints/last.pt); continue it with "
            f"`rollingq train --resume {run_dir}` or choose another folder"
        )
    return run_dir


def add_file_logging(run_dir: str) -> logging.Handler:
    """Also log the ``rollingq`` and ``rollingq_kernels`` loggers (the controller's rotations) to
    ``run_dir/train.log``; returns the handler (remove it with :func:`remove_file_logging`)."""
    handler = logging.FileHandler(os.path.join(run_dir, "train.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LOGGERS:
        log = logging.getLogger(name)
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
    return handler


def build_controller(cfg: dict, model: MultimodalModel):
    """The RollingQ controller on the model's last active fusion attention, or None when disabled."""
    rq = cfg["rollingq"]
    if not rq["enabled"]:
        return None
    from rollingq_kernels.controller import RollingQ

    return RollingQ(
        [model.fusion_attention],
        rho=float(rq["rho"]),
        beta=float(rq["beta"]),
        max_rotations=int(rq["max_rotations"]),
        window=rq.get("window", "epoch"),
        method=rq.get("method", "plane"),
        estimate=rq.get("estimate", "accumulate"),
        indicator=rq.get("indicator", "cos"),
    )


def stage_for_epoch(cfg: dict, epoch: int) -> int:
    """Progressive training (``vanilla_mt_star``): stage 1 (first block only) for ``progressive_epochs``, then 2."""
    if cfg["model"]["fusion"] != "vanilla_mt_star":
        return 1
    return 1 if epoch <= int(cfg["model"].get("progressive_epochs", 0)) else 2


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (the paper: lr 1e-3, momentum 0.9, weight decay 1e-4) or AdamW, from ``cfg["optim"]``."""
    o = cfg["optim"]
    params = [p for p in model.parameters() if p.requires_grad]
    if o["name"] == "sgd":
        return torch.optim.SGD(params, lr=float(o["lr"]), momentum=float(o["momentum"]),
                               weight_decay=float(o["weight_decay"]))
    return torch.optim.AdamW(params, lr=float(o["lr"]), weight_decay=float(o["weight_decay"]))


class Trainer:
    """Owns the model, optimizer, scheduler, controller and loaders of one run.

    Args:
        cfg: the resolved config.
        run_dir: the run directory (created by the main process).
        info: this process's place in the process group.
        state: a checkpoint to resume from, or None for a fresh run.
    """

    def __init__(self, cfg: dict, run_dir: str, info: distributed.DistInfo, state: dict | None = None) -> None:
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        self.device = info.device
        seed_everything(int(cfg["seed"]))
        self.train_set = build_dataset(cfg, "train")
        self.val_set = build_dataset(cfg, "val")
        self.train_loader = make_loader(self.train_set, cfg, True, info.world_size, info.rank)
        self.val_loader = make_loader(self.val_set, cfg, False)
        if len(self.train_loader) == 0:
            raise ValueError("train.batch_size: the training loader yields no batch")
        self.model = build_model(cfg).to(self.device)
        self.epochs = int(cfg["train"]["epochs"])
        self.start_epoch = 1
        self.history: list[dict] = []
        self.best_val = -1.0
        self.stage = stage_for_epoch(cfg, int(state["epoch"]) if state else 1)
        self.model.set_stage(self.stage)
        self.optimizer = build_optimizer(cfg, self.model)
        steps = len(self.train_loader)
        o = cfg["optim"]
        self.scheduler = warmup_cosine(
            self.optimizer, self.epochs * steps, int(float(o.get("warmup_epochs", 0)) * steps),
            float(o.get("min_lr", 0.0)) / float(o["lr"]) if float(o["lr"]) > 0 else 0.0,
        )
        self.controller = build_controller(cfg, self.model)
        if state is not None:
            self._load_state(state)
        find_unused = cfg["model"]["fusion"] in ("unimodal", "vanilla_mt_star")
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp: nn.Module = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=find_unused)
        else:
            self.ddp = self.model
        self.autocast_enabled = self.device.type == "cuda" and bool(cfg["train"].get("bf16", True))
        self.progress = bool(cfg["train"].get("progress", True)) and info.is_main and sys.stderr.isatty()
        self.writer = None
        if info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=self.start_epoch)

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
            "config": jsonable(self.cfg),
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

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training split; returns the epoch's training metrics (all ranks reduced)."""
        from rollingq_kernels.accumulator import add_sums, all_reduce_sums, batch_sums, reduce_sums

        cfg = self.cfg
        self.train_loader.sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        self.ddp.train()
        num_mod = len(cfg["data"]["modalities"])
        # loss sum, correct, count, probe correct: kept on the device (no host sync per step)
        totals = torch.zeros(3 + num_mod, dtype=torch.float64, device=self.device)
        label_counts = torch.zeros(int(cfg["data"]["num_classes"]), dtype=torch.float64, device=self.device)
        stat_sums = None
        probe_w = float(cfg["train"].get("probe_loss_weight", 1.0))
        clip = cfg["train"].get("grad_clip")
        ogm = cfg["model"]["fusion"] == "ogm_ge"
        ogm_cfg = cfg.get("ogm", {})
        ogm_on = ogm and int(ogm_cfg.get("start_epoch", 1)) <= epoch <= int(ogm_cfg.get("end_epoch", 10**9))
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=not self.progress)
        for batch in bar:
            mods = [x.to(self.device, non_blocking=True) for x in batch["modalities"]]
            labels = batch["label"].to(self.device)
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast_enabled else nullcontext()
            with ctx:
                out = self.ddp(mods)
            loss_main = F.cross_entropy(out.logits.float(), labels)
            loss = loss_main + probe_w * sum(F.cross_entropy(p.float(), labels) for p in out.probe_logits)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if ogm_on and out.unimodal_logits is not None:
                modulate_gradients(self.model.encoders, ogm_coefficients(out.unimodal_logits, labels,
                                                                         float(ogm_cfg.get("alpha", 0.1))))
            if clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
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
                if out.stats is not None:
                    sums = batch_sums(out.stats)
                    stat_sums = sums if stat_sums is None else add_sums(stat_sums, sums)
            if self.progress:
                bar.set_postfix(loss=f"{float(loss_main):.3f}")
        totals = distributed.all_reduce_sum(totals).cpu()
        label_counts = distributed.all_reduce_sum(label_counts).cpu()
        result = {
            "train_loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]),
            "train_probe_acc": [float(totals[3 + m] / totals[2]) for m in range(num_mod)],
            "train_majority": float(label_counts.max() / totals[2]),
            "air": None, "mass": None, "cos": None,
        }
        has_stats = self.model.fusion_attention is not None
        if has_stats and stat_sums is not None:
            window = reduce_sums(all_reduce_sums(stat_sums))
            result["air"] = window.air if num_mod == 2 else window.spread  # M > 2: the controller's spread
            result["mass"] = window.mass_mean.mean(0).tolist()
            result["cos"] = window.cos_mean.tolist()
        return result

    def _estimation_forward(self, batch: dict) -> None:
        mods = [x.to(self.device, non_blocking=True) for x in batch["modalities"]]
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast_enabled else nullcontext()
        with ctx:
            self.model(mods)

    def _controller_step(self, epoch: int, row: dict | None = None) -> list:
        """Step the controller from epoch ``rollingq.start_epoch`` on and once the epoch's training accuracy
        clears the first-rotation guard (``rollingq.min_accuracy_gain``, see
        :func:`rollingq_kernels.controller.accuracy_guard`); earlier windows are discarded. With
        ``rollingq.estimate=pass`` it re-reads this rank's training shard (eval mode, no grad) to estimate
        the anchor, as the official code does before a rotation."""
        if epoch < int(self.cfg["rollingq"].get("start_epoch", 1)):
            self.controller.reset_statistics()  # too early to rotate: start the next window afresh
            return []
        if row is not None and "train_majority" in row:
            from rollingq_kernels.controller import accuracy_guard

            held = accuracy_guard(row["train_acc"], row["train_majority"],
                                  float(self.cfg["rollingq"].get("min_accuracy_gain", 0.05)))
            row["rollingq_guard"] = held
            if held is not None:
                logger.info("epoch %d: RollingQ does not rotate: %s", epoch, held)
                self.controller.reset_statistics()
                return []
        if self.cfg["rollingq"].get("estimate", "accumulate") != "pass":
            return self.controller.step(epoch=epoch)
        self.model.eval()
        try:
            return self.controller.step(epoch=epoch, loader=self.train_loader, forward_fn=self._estimation_forward)
        finally:
            self.model.train()

    # ----------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Train from ``start_epoch`` to ``epochs``; returns the metric history."""
        cfg = self.cfg
        num_classes = int(cfg["data"]["num_classes"])
        ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        for epoch in range(self.start_epoch, self.epochs + 1):
            t0 = time.time()
            self._set_stage(epoch)
            row: dict = {"epoch": epoch}
            row.update(self.train_epoch(epoch))
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            records, rotated = [], False
            if self.controller is not None:
                before = int(self.model.fusion_attention.num_rotations)
                records = [jsonable(r) for r in self._controller_step(epoch, row)]
                rotated = int(self.model.fusion_attention.num_rotations) > before
            row["rollingq"], row["rotated"] = records, rotated
            row["num_rotations"] = (None if self.model.fusion_attention is None
                                    else int(self.model.fusion_attention.num_rotations))
            row["stage"] = self.stage
            val = evaluate_model(self.model, self.val_loader, self.device, num_classes,
                                 progress=self.progress, desc="val")
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
                    atomic_save(state, os.path.join(ckpt_dir, "best.pt"))
                atomic_save(state, os.path.join(ckpt_dir, "last.pt"), keep_previous=os.path.join(ckpt_dir, "previous.pt"))
                write_metrics(os.path.join(self.run_dir, "metrics.jsonl"), self.history)
                self._log_epoch(row)
            distributed.barrier()
        if self.writer is not None:
            self.writer.close()
        return self.history

    def _log_epoch(self, row: dict) -> None:
        air = "n/a" if row["air"] is None else f"{row['air']:+.3f}"
        mass = "n/a" if row["mass"] is None else "[" + ", ".join(f"{m:.2f}" for m in row["mass"]) + "]"
        logger.info(
            "epoch %d: loss %.4f train_acc %.4f val_acc %.4f val_f1 %.4f lr %.2e AIR %s mass %s%s (%.1fs)",
            row["epoch"], row["train_loss"], row["train_acc"], row["val_acc"], row["val_macro_f1"], row["lr"],
            air, mass, " ROTATED" if row["rotated"] else "", row["time_s"],
        )
        for rec in row["rollingq"]:
            logger.info("rollingq: %s", rec)
        if self.writer is None:
            return
        e = row["epoch"]
        for key in ("train_loss", "train_acc", "val_acc", "val_macro_f1", "lr", "air"):
            if row.get(key) is not None:
                self.writer.add_scalar(key, row[key], e)
        names = ["class"] + list(self.cfg["data"]["modalities"])
        for name, value in zip(names, row["mass"] or []):
            self.writer.add_scalar(f"mass/{name}", value, e)
        for name, value in zip(self.cfg["data"]["modalities"], row["cos"] or []):
            if value is not None:
                self.writer.add_scalar(f"cos/{name}", value, e)
        self.writer.flush()


def _run(cfg: dict, run_dir: str, state: dict | None) -> str:
    info = distributed.setup(cfg.get("device", "auto"))
    if cfg["train"].get("num_threads"):
        torch.set_num_threads(int(cfg["train"]["num_threads"]))
    handler = None
    try:
        if info.is_main:
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            if state is None:  # a resumed run keeps the config.yaml it was read from
                save_config(cfg, os.path.join(run_dir, "config.yaml"))
            handler = add_file_logging(run_dir)
            if state is not None:  # drop rows of an epoch that was cut short
                write_metrics(os.path.join(run_dir, "metrics.jsonl"), state["history"])
        distributed.barrier()
        if state is not None:
            logger.info("resuming %s after epoch %d", run_dir, state["epoch"])
        else:
            logger.info("training %s into %s on %s (world size %d)", cfg["name"], run_dir, info.device, info.world_size)
        Trainer(cfg, run_dir, info, state).fit()
    finally:
        if handler is not None:
            remove_file_logging(handler)
        distributed.cleanup()
    return run_dir


def train(cfg: dict, run_dir: str | None = None) -> str:
    """Train a fresh run described by ``cfg``; returns the run directory."""
    validate_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if run_dir is None and world > 1:
        raise ValueError("--out: a multi-process run needs an explicit run directory (all ranks must agree on it)")
    run_dir = make_run_dir(cfg, run_dir)
    return _run(cfg, run_dir, None)


def resume(run_dir: str, checkpoint: str = "last") -> str:
    """Continue the run in ``run_dir`` from ``checkpoints/<checkpoint>.pt`` (default ``last``)."""
    path = os.path.join(run_dir, "checkpoints", f"{checkpoint}.pt")
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        previous = os.path.join(run_dir, "checkpoints", "previous.pt")
        hint = (f"; the previous checkpoint {previous} is intact: continue from it with "
                f"`rollingq train --resume {run_dir} --checkpoint previous`"
                if checkpoint != "previous" and os.path.isfile(previous) else "")
        raise CheckpointError(f"{exc}{hint}") from exc
    cfg = read_config(os.path.join(run_dir, "config.yaml"))
    validate_config(cfg)
    if state["epoch"] >= int(cfg["train"]["epochs"]):
        logger.info("%s already finished %d epochs; nothing to do", run_dir, state["epoch"])
        return run_dir
    return _run(cfg, run_dir, state)


def load_run(run_dir: str, checkpoint: str = "best") -> tuple[MultimodalModel, dict]:
    """The model of a finished run (eval mode; on CPU unless the config says ``device: cuda``) and its config.

    Args:
        run_dir: a run directory written by :func:`train`.
        checkpoint: ``best`` (best validation accuracy), ``last`` or ``previous``.
    """
    cfg = read_config(os.path.join(run_dir, "config.yaml"))
    state = load_checkpoint(os.path.join(run_dir, "checkpoints", f"{checkpoint}.pt"))
    model = build_model(cfg)
    model.set_stage(int(state.get("stage", 1)))
    model.load_state_dict(state["model"])
    device = torch.device("cuda") if cfg.get("device") == "cuda" and torch.cuda.is_available() else torch.device("cpu")
    return model.to(device).eval(), cfg
