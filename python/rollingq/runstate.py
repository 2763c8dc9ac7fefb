"""What a resumed run checks against its checkpoint, and what it takes from ``config.yaml``.

:func:`check_same_run`: the checkpoint's stored config equals ``config.yaml`` (``--force`` continues
anyway). :func:`restore_optimization`: the optimizer's and scheduler's state come from the checkpoint
(momentum buffers, step count), their settings from ``config.yaml`` (learning rate, momentum, weight
decay, the schedule), so an edit made before ``--resume --force`` acts from the next step on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from .checkpoint import CheckpointError
from .config import Config, ConfigError
from .rundir import short_list
from .schema import clip, echo

logger = logging.getLogger("rollingq.train")


class RunMismatchError(ValueError):
    """A checkpoint's stored config differs from the run's ``config.yaml`` (the message names the keys)."""



def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two YAML-shaped config dicts, as 'key (a != b)' strings."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_differences(a, b, dotted + "."))
        elif a != b:
            out.append(f"{dotted} (checkpoint: {echo(a)}, config.yaml: {echo(b)})")
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
    listed = short_list(differences)
    if not force:
        raise RunMismatchError(
            f"--resume: {checkpoint} was written by a run with another config than {config_path}: {listed}. "
            "Refusing to mix two runs; continue anyway with --resume --force (config.yaml wins)"
        )
    logger.warning("--resume --force: %s was written with another config than %s (%s); continuing with %s",
                   checkpoint, config_path, listed, config_path)



RESTORE_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError)
"""What loading a malformed state into a torch object raises (reported as a :class:`CheckpointError`)."""


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (everything but its parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def restore_optimization(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         state: dict, cfg: Config, source: str, step: int) -> None:
    """Load the optimizer's and scheduler's state from a checkpoint, keeping ``cfg``'s settings.

    ``optimizer`` and ``scheduler`` are freshly built from ``cfg``; their settings (``lr``, ``momentum``,
    ``weight_decay``, …, and the schedule's base rate) are put back over the restored ones, and the rate
    of the next step is recomputed with ``cfg``'s schedule at the restored step. Without a config edit
    this changes nothing (the same numbers come back). A change is logged; so is the resumed rate. An
    optimizer of another kind (``optim.name`` edited) starts afresh, with a warning. The schedule
    continues at ``step`` (the finished epochs times this config's steps per epoch), which is the saved
    step unless ``train.batch_size`` or the data changed.

    Raises:
        CheckpointError: the saved state does not fit this model's parameters (naming ``source``).
    """
    fresh = optimizer_settings(optimizer)
    saved_optim = state["config"].get("optim") if isinstance(state.get("config"), Mapping) else None
    saved_name = saved_optim.get("name", cfg.optim.name) if isinstance(saved_optim, Mapping) else cfg.optim.name
    if saved_name != cfg.optim.name:
        logger.warning("--resume: optim.name is %r in config.yaml but %r in %s: the %s optimizer starts afresh",
                       cfg.optim.name, saved_name, source, cfg.optim.name)
    else:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except RESTORE_ERRORS as exc:
            raise CheckpointError(f"{source}: its optimizer state does not fit the model of config.yaml "
                                  f"({type(exc).__name__}: {clip(str(exc), 200)})") from exc
    try:
        scheduler.load_state_dict(state["scheduler"])
    except RESTORE_ERRORS as exc:
        raise CheckpointError(f"{source}: its scheduler state cannot be read ({type(exc).__name__}: "
                              f"{clip(str(exc), 200)})") from exc
    changes: dict[str, str] = {}
    for i, (group, settings) in enumerate(zip(optimizer.param_groups, fresh, strict=True)):
        base = settings["initial_lr"]
        if scheduler.base_lrs[i] != base:
            changes.setdefault("lr", f"lr {scheduler.base_lrs[i]:g} -> {base:g}")
        scheduler.base_lrs[i] = base
        for key, value in settings.items():
            if key not in ("lr", "initial_lr") and group.get(key) != value:
                changes.setdefault(key, f"{key} {echo(group.get(key))} -> {echo(value)}")
            group[key] = value
    if scheduler.last_epoch != step:
        logger.warning("--resume: %s's schedule is at step %s; config.yaml's run is at step %d after %s epoch(s): "
                       "continuing from step %d", source, echo(scheduler.last_epoch), step, state["epoch"], step)
        scheduler.last_epoch = step
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = list(rates)  # what get_last_lr() reports
    if changes:
        logger.warning("--resume: optimizer settings from config.yaml, not from %s: %s", source,
                       ", ".join(changes.values()))
    o = cfg.optim
    logger.info("--resume: step %d continues with learning rate %.4g (optim.lr=%g, warmup_epochs=%g, min_lr=%g "
                "over train.epochs=%d)", step, rates[0], o.lr, o.warmup_epochs, o.min_lr, cfg.train.epochs)
