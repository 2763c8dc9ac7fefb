"""Configuration: typed sections, YAML files with ``base:``, dotted overrides, strict validation.

A :class:`Config` has one dataclass per section (:class:`DataConfig`, :class:`ModelConfig`,
:class:`RollingQConfig`, :class:`OgmConfig`, :class:`OptimConfig`, :class:`TrainConfig`); every
default lives in its field and nowhere else. A YAML file only states what differs; overrides such as
``optim.lr=0.01`` or ``data.modalities=[audio,visual]`` are read as bounded YAML and set at the dotted
path. :meth:`Config.from_dict` validates the merged dict as an OmegaConf structured config
(:mod:`rollingq.schema`): unknown keys (with the closest valid one suggested), values of the wrong type
or out of range and inconsistent settings are errors naming the dotted key.
Sections read like the YAML they come from: ``cfg.train.epochs == cfg["train"]["epochs"]``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from rollingq_kernels.checks import BACKENDS
from rollingq_kernels.module import ROTATION_MODES
from rollingq_kernels.settings import PRESETS, RollingQSettings
from rollingq_kernels.settings import field_names as settings_fields

from .data.registry import DATASETS
from .distributed import DEVICES
from .files import atomic_write_bytes
from .models import ATTENTION_FUSIONS, FUSIONS
from .models.encoders import BACKBONES
from .models.fusion import FUSION_BLOCKS
from .models.warmstart import check_init_encoders
from .schema import ConfigError, Section, build, echo, field_names, option
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


def _distinct_names(names: list[str]) -> str | None:
    if not names or len(set(names)) != len(names):
        return "expected a non-empty list of distinct modality names"
    return None


def _plain_name(value: Any) -> str | None:
    """A run's ``name`` becomes part of a folder name: one plain path component, at most 100 characters."""
    separators = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    if (isinstance(value, str) and value not in ("", ".", "..") and len(value) <= 100
            and not any(c in value for c in separators) and value.isprintable()):
        return None
    return ("expected one plain folder name (no '/', '\\', '.' or '..', printable, at most 100 characters; "
            "the run folder is <out_dir>/<dataset>_<name>_<time>)")


@dataclass
class DataConfig(Section):
    """``data``: the dataset, and the options of that dataset (flat beside the common keys, as in YAML).

    The common keys are fields here; a config's ``data`` is the subclass of the chosen dataset
    (:data:`DATA_SECTIONS`), which adds that dataset's own keys (``data.num_frames`` for CREMA-D,
    ``data.task`` for MOSEI, ``data.synthetic.*`` for the synthetic task, …): the fields of its
    options dataclass, named by the registry :data:`~rollingq.data.registry.DATASETS`.

    Attributes:
        name: the dataset, a key of the registry.
        modalities: modality names in the model's input order; AIR is ``cos(first) − cos(second)``.
        num_classes: classes of the labels (the head's outputs).
        root: the dataset folder (file datasets).
        val_fraction: the seeded hold-out of the training list used as validation when the dataset
            has no validation list.
        skip_bad: skip samples with missing or corrupt files (their count is logged) instead of failing.
        num_workers: DataLoader worker processes.
    """

    name: str = option("synthetic", choices=tuple(DATASETS))
    modalities: list[str] = option(factory=lambda: ["audio", "visual"], check=_distinct_names)
    num_classes: int = option(2, ge=2)
    root: str | None = None
    val_fraction: float = option(0.1, gt=0.0, lt=1.0)
    skip_bad: bool = False
    num_workers: int = option(0, ge=0)

    @property
    def options(self) -> Section:
        """The dataset's own keys as its options dataclass."""
        options = DATASETS[self.name].options
        return options(**{k: getattr(self, k) for k in field_names(options)})


def _data_section(name: str, options: type[Section]) -> type[DataConfig]:
    """:class:`DataConfig` with the fields of ``options`` added (flat, as in YAML)."""
    hints = typing.get_type_hints(options)
    own = [(f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                     metadata=f.metadata)) for f in dataclasses.fields(options)]
    return dataclasses.make_dataclass(f"DataConfig_{name}", own, bases=(DataConfig,),
                                      namespace={"__module__": __name__})


DATA_SECTIONS: dict[str, type[DataConfig]] = {name: _data_section(name, e.options) for name, e in DATASETS.items()}
"""The ``data`` section of each dataset of the registry (module attributes, so that configs pickle)."""
globals().update({cls.__name__: cls for cls in DATA_SECTIONS.values()})


@dataclass
class ModelConfig(Section):
    """``model``: encoders, the fusion head and its attention.

    Attributes:
        fusion: ``unimodal`` (with ``modality``), ``concat``, ``sum``, ``ogm_ge``, ``vanilla_mt``,
            ``vanilla_mt_star``.
        dim: token width of the encoders and the fusion.
        encoder_depth, encoder_heads, mlp_ratio: each encoder's timm ViT blocks.
        fusion_heads: heads of the fusion attention.
        attn_drop, drop: attention-probability dropout (fusion) and dropout after projections.
        backbone: ``vit`` (patch embeddings) or ``resnet18`` (the paper's Table 7 tokenizer).
        pretrained: a timm ViT model id (resolved through the Hugging Face cache; only the cache under
            HF_HUB_OFFLINE=1) or a local checkpoint file for the encoders.
        rotation_mode: ``global`` (one ``(D, D)`` rotation) or ``per_head``.
        backend: the op's backend (``auto``, ``cpp``, ``triton``, ``reference``).
        progressive_epochs: ``vanilla_mt_star``: epochs trained with the first fusion block only.
        modality: the modality the ``unimodal`` head reads.
        fusion_block: ``prenorm`` (LayerNorm, attention, residual, MLP) or ``official`` (the official
            ``AttnFusion``: a raw class token, attention alone with ``attn_drop`` on its probabilities
            and its output, no LayerNorm, residual or MLP).
        init_encoders: ``{modality: run folder or checkpoint}``: warm-start those encoders from an earlier
            run's (:mod:`rollingq.models.warmstart`; fresh runs only).
    """

    fusion: str = option("vanilla_mt", choices=FUSIONS)
    dim: int = option(64, ge=1)
    encoder_depth: int = option(2, ge=0)
    encoder_heads: int = option(4, ge=1)
    mlp_ratio: float = option(2.0, gt=0.0)
    fusion_heads: int = option(1, ge=1)
    attn_drop: float = option(0.0, ge=0.0, lt=1.0)
    drop: float = option(0.0, ge=0.0, lt=1.0)
    backbone: str = option("vit", choices=BACKBONES)
    pretrained: str | None = None
    rotation_mode: str = option("global", choices=ROTATION_MODES)
    backend: str = option("auto", choices=BACKENDS)
    progressive_epochs: int = option(0, ge=0)
    modality: str | None = None
    fusion_block: str = option("prenorm", choices=FUSION_BLOCKS)
    init_encoders: Any = option(None, check=check_init_encoders)

    def arguments(self) -> dict[str, Any]:
        """The model's constructor arguments (``progressive_epochs`` and ``init_encoders`` are the trainer's)."""
        out = self.to_dict()
        del out["progressive_epochs"], out["init_encoders"]
        return out


@dataclass(frozen=True)
class RollingQConfig(Section, RollingQSettings):
    """``rollingq``: ``enabled`` and the controller's settings (:class:`rollingq_kernels.settings.RollingQSettings`).

    Every other key is a field of the settings, with its default and its check stated there once
    (``docs/controller.md`` lists them). ``mode`` picks a preset (``safe``, the default; ``paper``;
    ``official``) whose values the other keys given in the file or the overrides replace.

    Attributes:
        enabled: control the model's last active fusion attention.
    """

    enabled: bool = False

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:  # the settings' own check ("beta: expected ..."), named as the config's key
            raise ConfigError(f"rollingq.{exc}") from exc

    def settings(self) -> RollingQSettings:
        """The controller's settings of this section."""
        return RollingQSettings.from_dict({k: getattr(self, k) for k in settings_fields()})

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, **self.settings().to_dict()}


@dataclass
class OgmConfig(Section):
    """``ogm``: OGM-GE gradient modulation (``model.fusion: ogm_ge``).

    Attributes:
        alpha: the modulation strength (coefficient ``1 − tanh(alpha · ratio)``).
        start_epoch, end_epoch: the epochs (inclusive) in which it modulates.
    """

    alpha: float = option(0.1, ge=0.0)
    start_epoch: int = option(1, ge=1)
    end_epoch: int = option(1000, ge=1)


@dataclass
class OptimConfig(Section):
    """``optim``: the optimizer and the warm-up + cosine schedule (per step).

    Attributes:
        name: ``sgd`` (with ``momentum``) or ``adamw``.
        lr, weight_decay: learning rate and weight decay.
        momentum: SGD's momentum.
        warmup_epochs: linear warm-up length, in epochs (fractions allowed).
        min_lr: the learning rate at the end of the cosine.
    """

    name: str = option("sgd", choices=("sgd", "adamw"))
    lr: float = option(1e-3, ge=0.0)
    momentum: float = option(0.9, ge=0.0, le=1.0)
    weight_decay: float = option(1e-4, ge=0.0)
    warmup_epochs: float = option(1.0, ge=0.0)
    min_lr: float = option(0.0, ge=0.0)


@dataclass
class TrainConfig(Section):
    """``train``: the loop.

    Attributes:
        epochs: epochs to train.
        batch_size: samples per step (over all processes); eval_batch_size: per validation batch.
        probe_loss_weight: weight of the detached linear probes' loss.
        bf16: bf16 autocast on GPU (never on CPU).
        grad_clip: clip the gradient norm to this, or None.
        progress: progress bars on a terminal.
        num_threads: torch CPU threads, or None for torch's default.
    """

    epochs: int = option(30, ge=1)
    batch_size: int = option(64, ge=1)
    eval_batch_size: int = option(128, ge=1)
    probe_loss_weight: float = option(1.0, ge=0.0)
    bf16: bool = True
    grad_clip: float | None = option(None, gt=0.0)
    progress: bool = True
    num_threads: int | None = option(None, ge=1)


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
