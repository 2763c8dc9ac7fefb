"""Configuration: a run's :class:`Config`, YAML files with ``base:``, dotted overrides, strict validation.

Every default lives in a section's field (:mod:`rollingq.sections`); a YAML file states only what differs,
overrides (``optim.lr=0.01``) are bounded YAML set at the dotted path, and :meth:`Config.from_dict` validates
the merged dict (:mod:`rollingq.schema`). ``docs/training.md`` (Configs) lists the keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import resources
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SerializeAsAny

from .data.registry import DATASETS
from .distributed import DEVICES
from .files import atomic_write_bytes
from .models import ATTENTION_FUSIONS
from .schema import ConfigError, Section, build, checked, echo
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


def _plain_name(value: str) -> str | None:
    """None if ``value`` is one plain folder name (the run folder is ``<out_dir>/<dataset>_<name>_<time>``)."""
    if value not in ("", ".", "..") and len(value) <= 100 and value.isprintable() and not set(value) & {
            "/", "\\", os.sep, os.altsep or "/", "\0"}:
        return None
    return "expected one plain folder name (no '/', '\\', '.' or '..', printable, at most 100 characters)"


class Config(Section):
    """A whole run's configuration (``config.yaml``): its ``name``, ``seed``, ``device``, ``out_dir`` and the
    sections; ``cfg.train.epochs == cfg["train"]["epochs"]``."""

    name: Annotated[str, checked(_plain_name)] = "run"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    device: Literal[DEVICES] = "auto"
    out_dir: str = "runs"
    data: SerializeAsAny[DataConfig] = DATA_SECTIONS["synthetic"]()
    model: ModelConfig = ModelConfig()
    rollingq: RollingQConfig = RollingQConfig()
    ogm: OgmConfig = OgmConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Config:
        """The config of a YAML-shaped dict (missing keys take their defaults), validated.

        Raises:
            ConfigError: naming the dotted key of the first problem.
        """
        raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()} if isinstance(raw, Mapping) else raw
        part = {k: raw[k] if isinstance(raw, dict) and isinstance(raw.get(k), dict) else {}
                for k in {"data"} | {section for section, _ in RENAMED}}
        for (section, old), new in RENAMED.items():
            if old in part[section] and new not in part[section]:
                logger.warning("%s.%s is now %s.%s; reading it as such", section, old, section, new)
                part[section][new] = part[section][old]
            part[section].pop(old, None)
        name = part["data"].get("name", "synthetic")
        if not isinstance(name, str) or name not in DATASETS:
            raise ConfigError(f"data.name: expected one of {', '.join(DATASETS)}, got {echo(name)}")
        own = list(DATA_SECTIONS[name].model_fields)
        for key in part["data"]:
            if key not in own and (others := [n for n, e in DATASETS.items() if key in e.options.model_fields]):
                datasets = " and ".join(others) + (" datasets" if len(others) > 1 else " dataset")
                raise ConfigError(f"data.{key}: a key of the {datasets}, not of data.name={name!r} "
                                  f"(its keys: {', '.join(own)})")
        if isinstance(raw, dict):  # the data section of the dataset data.name
            raw["data"] = build(DATA_SECTIONS[name], raw.get("data"), "data.")
        cfg = build(cls, raw)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Rules across keys: the dataset has the modalities, heads divide ``model.dim``, RollingQ needs an
        attention fusion, the unimodal head names one of the modalities, OGM-GE's epochs are in order."""
        d, m, ogm = self.data, self.model, self.ogm
        try:
            DATASETS[d.name].input_specs(d.modalities, d.options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        attention, stray = m.fusion in ATTENTION_FUSIONS, sorted(set(m.init_encoders or ()) - set(d.modalities))
        for bad, message in (
                (m.dim % m.encoder_heads, f"model.encoder_heads: {m.encoder_heads} does not divide model.dim {m.dim}"),
                (attention and m.dim % m.fusion_heads,
                 f"model.fusion_heads: {m.fusion_heads} does not divide model.dim {m.dim}"),
                (attention and len(d.modalities) < 2, f"data.modalities: attention fusion (model.fusion={m.fusion!r}) "
                                                      f"needs >= 2 modalities, got {d.modalities}"),
                (m.fusion == "unimodal" and m.modality not in d.modalities,
                 f"model.modality: the unimodal head needs one of {d.modalities}, got {m.modality!r}"),
                (stray, f"model.init_encoders: {stray} not among data.modalities {d.modalities}"),
                (self.rollingq.enabled and not attention, f"rollingq.enabled: RollingQ needs an attention fusion "
                                                          f"{ATTENTION_FUSIONS}, got model.fusion={m.fusion!r}"),
                (m.fusion == "ogm_ge" and ogm.start_epoch > ogm.end_epoch,
                 f"ogm.start_epoch: {ogm.start_epoch} is after ogm.end_epoch {ogm.end_epoch}")):
            if bad:
                raise ConfigError(message)

    def warn_inert_settings(self) -> None:
        """Log settings that are valid but can have no effect in this run (called once, when a run starts)."""
        m, rq, epochs = self.model, self.rollingq, self.train.epochs
        for key in sorted({"root", "val_fraction", "skip_bad"} - set(DATASETS[self.data.name].common)):
            if getattr(self.data, key) != DataConfig.model_fields[key].default:
                logger.warning("data.%s=%r has no effect with data.name=%r (it does not read it)",
                               key, getattr(self.data, key), self.data.name)
        if rq.enabled and rq.start_epoch > epochs:
            logger.warning("rollingq.start_epoch %d is after the last epoch (train.epochs=%d): RollingQ never rotates",
                           rq.start_epoch, epochs)
        official_mode = rq.enabled and rq.mode == "official"
        for key, (value, official) in rq.settings().deviations().items() if official_mode else ():
            logger.warning("rollingq.%s=%r departs from the official semantics (rollingq.mode=official sets %r)",
                           key, value, official)
        if official_mode and (m.fusion_block != "official" or m.fusion_heads != 1):
            logger.warning("rollingq.mode=official with model.fusion_block=%r and model.fusion_heads=%d: the official "
                           "fusion is model.fusion_block=official with one head", m.fusion_block, m.fusion_heads)
        if m.progressive_epochs and m.fusion != "vanilla_mt_star":
            logger.warning("model.progressive_epochs=%d has no effect with model.fusion=%r (only vanilla_mt_star "
                           "trains progressively)", m.progressive_epochs, m.fusion)
        elif m.progressive_epochs >= epochs > 0 and m.fusion == "vanilla_mt_star":
            logger.warning("model.progressive_epochs=%d >= train.epochs=%d: the second fusion block never trains",
                           m.progressive_epochs, epochs)


def as_config(cfg: Config | Mapping[str, Any]) -> Config:
    """``cfg`` itself, or the validated :class:`Config` of a YAML-shaped dict."""
    return cfg if isinstance(cfg, Config) else Config.from_dict(cfg)


def packaged_config_dir() -> str:
    """Directory of the configs shipped with the package (``rollingq/configs``)."""
    return str(resources.files("rollingq") / "configs")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The defaults, the YAML file at ``path`` (a file or a packaged config's name, with its ``base:`` chain),
    then the dotted ``overrides``.

    Raises:
        ConfigError: a missing or malformed file, a malformed override, or an invalid config (naming the key).
    """
    raw: dict = {}
    if path is not None and os.path.isfile(path):
        raw = _read_with_bases(path, [])
    elif path is not None:
        name = os.path.basename(path if path.endswith(".yaml") else path + ".yaml")
        packaged = os.path.join(packaged_config_dir(), name)
        if not os.path.isfile(packaged):
            raise ConfigError(f"--config: no file {path!r} and no packaged config {name!r} in {packaged_config_dir()}")
        raw = _read_with_bases(packaged, [])
    for text in overrides or []:
        set_dotted(raw, *parse_override(text))
    return Config.from_dict(raw)


def _read_with_bases(path: str, chain: list[str]) -> dict:
    """A config file merged over its ``base:`` file (a path relative to it), recursively."""
    if path in chain:
        raise ConfigError(f"config {path}: circular 'base:' chain {chain + [path]}")
    loaded = read_yaml_file(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(loaded).__name__}")
    base = loaded.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"config {path}: base: expected a file name relative to it, got {echo(base)}")
    base_path = os.path.join(os.path.dirname(path), base or "")
    if base is not None and not os.path.isfile(base_path):
        raise ConfigError(f"config {path}: base file {base!r} not found (looked at {base_path})")
    return loaded if base is None else deep_merge(_read_with_bases(base_path, chain + [path]), loaded)


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
