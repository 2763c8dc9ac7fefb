"""Configuration: YAML files, defaults, dotted command-line overrides.

A config is a plain nested ``dict``. Every config file is merged over
:data:`DEFAULTS`, so a file only states what differs. Overrides such as
``optim.lr=0.01`` or ``data.modalities=[audio,visual]`` are parsed with
``yaml.safe_load`` and set at the dotted path.
"""

from __future__ import annotations

import copy
import os
import re
from importlib import resources
from typing import Any

import yaml

from .checkpoint import atomic_write_bytes

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda
    "out_dir": "runs",
    "data": {
        "name": "synthetic",
        "modalities": ["audio", "visual"],
        "num_classes": 2,
        "root": None,
        "val_fraction": 0.1,
        "skip_bad": False,
        "num_workers": 0,
    },
    "model": {
        "fusion": "vanilla_mt",
        "dim": 64,
        "encoder_depth": 2,
        "encoder_heads": 4,
        "mlp_ratio": 2.0,
        "fusion_heads": 1,
        "attn_drop": 0.0,
        "drop": 0.0,
        "backbone": "vit",  # vit | resnet18 (image/spectrogram modalities)
        "pretrained": None,
        "rotation": "global",
        "backend": "auto",
        "progressive_epochs": 0,
    },
    "rollingq": {
        "enabled": False,
        "rho": 1.0,
        "beta": 0.1,
        "max_rotations": 1,
        "window": "epoch",
        "method": "plane",
        "estimate": "accumulate",
        "start_epoch": 1,
        # first-rotation guard: rotate only after an epoch whose training accuracy beats the
        # majority-class share by this much (docs/training.md; negative: off)
        "min_accuracy_gain": 0.05,
        "indicator": "cos",  # cos: the paper's AIR | score: Eq. 3 weighted (token counts, key norms)
    },
    "ogm": {"alpha": 0.1, "start_epoch": 1, "end_epoch": 1000},
    "optim": {
        "name": "sgd",
        "lr": 1e-3,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup_epochs": 1,
        "min_lr": 0.0,
    },
    "train": {
        "epochs": 30,
        "batch_size": 64,
        "eval_batch_size": 128,
        "probe_loss_weight": 1.0,
        "bf16": True,
        "grad_clip": None,
        "progress": True,
        "num_threads": None,
    },
}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


class ConfigError(ValueError):
    """A config file or override is malformed."""


def deep_merge(base: dict, update: dict) -> dict:
    """Return a copy of ``base`` with ``update`` merged in recursively (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``cfg[a][b][c] = value`` for ``dotted == "a.b.c"``, creating intermediate dicts."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override key: expected a dotted path like 'optim.lr', got {dotted!r}")
    node = cfg
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} holds {child!r}, expected a mapping")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read with ``yaml.safe_load`` (so ``1e-3``, ``true``, ``[a,b]`` work)."""
    if "=" not in text:
        raise ConfigError(f"override: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    return key.strip(), value


def packaged_config_dir() -> str:
    """Directory of the configs shipped with the package (``rollingq/configs``)."""
    return str(resources.files("rollingq") / "configs")


def resolve_config_path(path: str) -> str:
    """Find a config: an existing path, or a name (with or without ``.yaml``) among the packaged configs."""
    if os.path.isfile(path):
        return path
    name = path if path.endswith(".yaml") else path + ".yaml"
    candidate = os.path.join(packaged_config_dir(), os.path.basename(name))
    if os.path.isfile(candidate):
        return candidate
    raise ConfigError(f"--config: no file {path!r} and no packaged config {os.path.basename(name)!r} in {packaged_config_dir()}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults, merged with the YAML file at ``path`` (if any), then the dotted ``overrides``."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        resolved = resolve_config_path(path)
        cfg = deep_merge(cfg, _read_with_bases(resolved, []))
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(cfg, key, value)
    validate_config(cfg)
    return cfg


def _read_with_bases(path: str, chain: list[str]) -> dict:
    """A config file merged over its ``base:`` file (a path relative to it), recursively."""
    if path in chain:
        raise ConfigError(f"config {path}: circular 'base:' chain {chain + [path]}")
    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(loaded).__name__}")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
        raise ConfigError(f"config {path}: base file {base!r} not found (looked at {base_path})")
    return deep_merge(_read_with_bases(base_path, chain + [path]), loaded)


def validate_config(cfg: dict) -> None:
    """Check the values the trainer relies on; raise :class:`ConfigError` naming the key."""
    mods = cfg["data"]["modalities"]
    if not isinstance(mods, list) or len(mods) < 1 or not all(isinstance(m, str) for m in mods):
        raise ConfigError(f"data.modalities: expected a list of modality names, got {mods!r}")
    for key in ("epochs", "batch_size"):
        value = cfg["train"][key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{key}: expected a positive integer, got {value!r}")
    if not isinstance(cfg["seed"], int):
        raise ConfigError(f"seed: expected an integer, got {cfg['seed']!r}")
    if cfg["optim"]["name"] not in ("sgd", "adamw"):
        raise ConfigError(f"optim.name: expected 'sgd' or 'adamw', got {cfg['optim']['name']!r}")


def save_config(cfg: dict, path: str) -> None:
    """Write the resolved config as YAML, atomically (temporary file, fsync, rename)."""
    atomic_write_bytes(yaml.safe_dump(cfg, sort_keys=False).encode("utf-8"), path)


def read_config(path: str) -> dict:
    """Read a resolved config written by :func:`save_config` (no defaults merged)."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)
