"""Configuration: a run's :class:`Config`, YAML files with ``base:``, dotted overrides, strict validation.

A :class:`Config` has one dataclass per section (:class:`DataConfig`, :class:`ModelConfig`,
:class:`RollingQConfig`, :class:`OgmConfig`, :class:`OptimConfig`, :class:`TrainConfig`, in
:mod:`rollingq.sections`); every default lives in its field and nowhere else. A YAML file only states
what differs; overrides such as ``optim.lr=0.01`` or ``data.modalities=[audio,visual]`` are read as
bounded YAML and set at the dotted path. :meth:`Config.from_dict` validates the merged dict as an
OmegaConf structured config (:mod:`rollingq.schema`): unknown keys (with the closest valid one
suggested), values of the wrong type or out of range and inconsistent settings are errors naming the
dotted key. Sections read like the YAML they come from: ``cfg.train.epochs == cfg["train"]["epochs"]``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from rollingq_kernels.settings import PRESETS

from .data.registry import DATASETS
from .distributed import DEVICES
from .files import atomic_write_bytes
from .models import ATTENTION_FUSIONS
from .schema import ConfigError, Section, build, echo, field_names, option
from .sections import DATA_SECTIONS, DataConfig, ModelConfig, OgmConfig, OptimConfig, RollingQConfig, TrainConfig
from .yaml_input import deep_merge, parse_override, read_yaml_file, set_dotted

__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "OgmConfig", "OptimConfig", "RollingQConfig",
    "TrainConfig", "as_config", "load_config", "packaged_config_dir", "parse_override", "read_config",
    "save_config",
]

logger = logging.getLogger("rollingq.config")

SEED_MAX = 2**32 - 1
"""The largest ``seed``: NumPy's legacy seeds are 32-bit, and the seed enters torch generators in sums."""

RENAMED = {("model", "rotation"): "rotation_mode"}
"""Keys renamed since runs were saved with them: (section, old) -> new (read with a warning)."""


def _plain_name(value: Any) -> str | None:
    """A run's ``name`` becomes part of a folder name: one plain path component, at most 100 characters."""
    separators = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    if (isinstance(value, str) and value not in ("", ".", "..") and len(value) <= 100
            and not any(c in value for c in separators) and value.isprintable()):
        return None
    return ("expected one plain folder name (no '/', '\\', '.' or '..', printable, at most 100 characters; "
            "the run folder is <out_dir>/<dataset>_<name>_<time>)")


@dataclass
class Config(Section):
    """A whole run's configuration (``config.yaml``).

    Attributes:
        name: the run's label (runs of one dataset and name form a group in reports); one plain folder name.
        seed: seeds everything: data order, augmentation, initialization, the synthetic task
            (0 to :data:`SEED_MAX`).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        out_dir: where a run without ``--out`` goes.
        data, model, rollingq, ogm, optim, train: the sections.
    """

    name: str = option("run", check=_plain_name)
    seed: int = option(0, ge=0, le=SEED_MAX)
    device: str = option("auto", choices=DEVICES)
    out_dir: str = "runs"
    data: DataConfig = option(factory=lambda: DATA_SECTIONS["synthetic"]())
    model: ModelConfig = option(factory=ModelConfig)
    rollingq: RollingQConfig = option(factory=RollingQConfig)
    ogm: OgmConfig = option(factory=OgmConfig)
    optim: OptimConfig = option(factory=OptimConfig)
    train: TrainConfig = option(factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Config:
        """The config of a YAML-shaped dict (missing keys take their defaults), validated.

        Raises:
            ConfigError: naming the dotted key of the first problem.
        """
        raw = _apply_renames(raw)
        data = raw.get("data") if isinstance(raw, Mapping) else None
        name = data.get("name", "synthetic") if isinstance(data, Mapping) else "synthetic"
        if not isinstance(name, str) or name not in DATASETS:
            raise ConfigError(f"data.name: expected one of {', '.join(DATASETS)}, got {echo(name)}")
        own = field_names(DATA_SECTIONS[name])
        for key in data if isinstance(data, Mapping) else ():
            others = [n for n, e in DATASETS.items() if key not in own and key in field_names(e.options)]
            if others:
                datasets = " and ".join(others) + (" datasets" if len(others) > 1 else " dataset")
                raise ConfigError(f"data.{key}: a key of the {datasets}, not of data.name={name!r} "
                                  f"(its keys: {', '.join(own)})")
        rq = raw.get("rollingq") if isinstance(raw, Mapping) else None
        mode = rq.get("mode") if isinstance(rq, Mapping) else None
        if isinstance(mode, str) and mode in PRESETS:  # the preset's values, replaced by the keys given
            raw = {**raw, "rollingq": {**PRESETS[mode], **rq}}
        cfg = build(_schema(name), raw)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Rules across keys: the dataset has the modalities, heads divide ``model.dim``, RollingQ
        needs an attention fusion, the unimodal head names one of the modalities."""
        d, m = self.data, self.model
        try:
            DATASETS[d.name].input_specs(d.modalities, d.options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if m.dim % m.encoder_heads:
            raise ConfigError(f"model.encoder_heads: {m.encoder_heads} does not divide model.dim {m.dim}")
        attention = m.fusion in ATTENTION_FUSIONS
        if attention and m.dim % m.fusion_heads:
            raise ConfigError(f"model.fusion_heads: {m.fusion_heads} does not divide model.dim {m.dim}")
        if attention and len(d.modalities) < 2:
            raise ConfigError(f"data.modalities: attention fusion (model.fusion={m.fusion!r}) needs >= 2 "
                              f"modalities, got {d.modalities}")
        if m.fusion == "unimodal" and m.modality not in d.modalities:
            raise ConfigError(f"model.modality: the unimodal head needs one of {d.modalities}, got {m.modality!r}")
        if m.init_encoders and set(m.init_encoders) - set(d.modalities):
            raise ConfigError(f"model.init_encoders: {sorted(set(m.init_encoders) - set(d.modalities))} not among "
                              f"data.modalities {d.modalities}")
        if self.rollingq.enabled and not attention:
            raise ConfigError(f"rollingq.enabled: RollingQ needs an attention fusion {ATTENTION_FUSIONS}, "
                              f"got model.fusion={m.fusion!r}")
        if m.fusion == "ogm_ge" and self.ogm.start_epoch > self.ogm.end_epoch:
            raise ConfigError(f"ogm.start_epoch: {self.ogm.start_epoch} is after ogm.end_epoch {self.ogm.end_epoch}")

    def warn_inert_settings(self) -> None:
        """Log settings that are valid but can have no effect in this run (e.g. after an override).

        Called once by the trainer (rank 0) when a run starts, not on every load of a config."""
        m, epochs = self.model, self.train.epochs
        taken = DATASETS[self.data.name].common
        defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
        for key in ("root", "val_fraction", "skip_bad"):
            if key not in taken and getattr(self.data, key) != defaults[key]:
                logger.warning("data.%s=%r has no effect with data.name=%r (it does not read it)",
                               key, getattr(self.data, key), self.data.name)
        if self.rollingq.enabled and self.rollingq.start_epoch > epochs:
            logger.warning("rollingq.start_epoch %d is after the last epoch (train.epochs=%d): RollingQ never rotates",
                           self.rollingq.start_epoch, epochs)
        if self.rollingq.enabled and self.rollingq.mode == "official":
            for key, (value, official) in self.rollingq.settings().deviations().items():
                logger.warning("rollingq.%s=%r departs from the official semantics (rollingq.mode=official sets %r)",
                               key, value, official)
            if m.fusion_block != "official" or m.fusion_heads != 1:
                logger.warning("rollingq.mode=official with model.fusion_block=%r and model.fusion_heads=%d: the "
                               "official fusion is model.fusion_block=official with one head", m.fusion_block,
                               m.fusion_heads)
        if m.progressive_epochs and m.fusion != "vanilla_mt_star":
            logger.warning("model.progressive_epochs=%d has no effect with model.fusion=%r (only vanilla_mt_star "
                           "trains progressively)", m.progressive_epochs, m.fusion)
        elif m.progressive_epochs >= epochs > 0 and m.fusion == "vanilla_mt_star":
            logger.warning("model.progressive_epochs=%d >= train.epochs=%d: the second fusion block never trains",
                           m.progressive_epochs, epochs)


@functools.cache
def _schema(dataset: str) -> DictConfig:
    """The structured config of :class:`Config` with the ``data`` section of ``dataset`` (its defaults)."""
    return OmegaConf.structured(Config(data=DATA_SECTIONS[dataset]()))


def _apply_renames(raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        return raw
    raw = dict(raw)
    for (section, old), new in RENAMED.items():
        part = raw.get(section)
        if isinstance(part, Mapping) and old in part:
            part = dict(part)
            if new not in part:
                logger.warning("%s.%s is now %s.%s; reading it as such", section, old, section, new)
                part[new] = part[old]
            del part[old]
            raw[section] = part
    return raw


def as_config(cfg: Config | Mapping[str, Any]) -> Config:
    """``cfg`` itself, or the validated :class:`Config` of a YAML-shaped dict."""
    return cfg if isinstance(cfg, Config) else Config.from_dict(cfg)


def packaged_config_dir() -> str:
    """Directory of the configs shipped with the package (``rollingq/configs``)."""
    return str(resources.files("rollingq") / "configs")


def resolve_config_path(path: str) -> str:
    """Find a config: an existing path, or a name (with or without ``.yaml``) among the packaged configs."""
    if os.path.isfile(path):
        return path
    name = os.path.basename(path if path.endswith(".yaml") else path + ".yaml")
    candidate = os.path.join(packaged_config_dir(), name)
    if os.path.isfile(candidate):
        return candidate
    raise ConfigError(f"--config: no file {path!r} and no packaged config {name!r} in {packaged_config_dir()}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The defaults, the YAML file at ``path`` (if any, with its ``base:`` chain), then the dotted ``overrides``.

    Raises:
        ConfigError: a missing or malformed file, a malformed override, or an invalid config (naming the key).
    """
    raw: dict = {}
    if path is not None:
        raw = _read_with_bases(resolve_config_path(path), [])
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return Config.from_dict(raw)


def _read_with_bases(path: str, chain: list[str]) -> dict:
    """A config file merged over its ``base:`` file (a path relative to it), recursively."""
    if path in chain:
        raise ConfigError(f"config {path}: circular 'base:' chain {chain + [path]}")
    loaded = read_yaml_file(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(loaded).__name__}")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: base: expected a file name relative to it, got {echo(base)}")
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
        raise ConfigError(f"config {path}: base file {base!r} not found (looked at {base_path})")
    return deep_merge(_read_with_bases(base_path, chain + [path]), loaded)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML, atomically (temporary file, fsync, rename)."""
    atomic_write_bytes(yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode("utf-8"), path)


def read_config(path: str) -> Config:
    """Read a config written by :func:`save_config` (``RUN_DIR/config.yaml``), validated.

    Raises:
        ConfigError: the file is missing, not YAML or not a valid config (the message names the file).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file (expected a run folder written by rollingq train)")
    try:
        return Config.from_dict(read_yaml_file(path) or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
