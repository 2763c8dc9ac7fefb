"""What a resumed run checks against its checkpoint: the stored config equals ``config.yaml``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .config import Config, ConfigError
from .rundir import short_list
from .schema import echo

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

