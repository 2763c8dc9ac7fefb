"""The sections of a run's configuration, one dataclass each: every key's type, default and allowed values.

What each key means is in ``docs/training.md`` (Configs, the key table); the whole
:class:`~rollingq.config.Config` and its loading are in :mod:`rollingq.config`, the validation in
:mod:`rollingq.schema`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from rollingq_kernels.checks import BACKENDS
from rollingq_kernels.module import ROTATION_MODES
from rollingq_kernels.settings import RollingQSettings
from rollingq_kernels.settings import field_names as settings_fields

from .data.registry import DATASETS
from .models import FUSIONS
from .models.encoders import BACKBONES
from .models.fusion import FUSION_BLOCKS
from .models.warmstart import check_init_encoders
from .schema import ConfigError, Section, field_names, option

__all__ = ["DATA_SECTIONS", "DataConfig", "ModelConfig", "OgmConfig", "OptimConfig", "RollingQConfig", "TrainConfig"]


def _distinct_names(names: list[str]) -> str | None:
    return "expected a non-empty list of distinct modality names" if not names or len(set(names)) < len(names) else None


@dataclass
class DataConfig(Section):
    """``data``: the common keys; a config's ``data`` is the subclass of its dataset (:data:`DATA_SECTIONS`),
    which adds that dataset's own keys, the fields of its options dataclass, flat as in YAML."""

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
    """``model``: encoders, the fusion head and its attention."""

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
    """``rollingq``: ``enabled`` and the controller's settings, whose defaults and checks are stated once in
    :class:`rollingq_kernels.settings.RollingQSettings`."""

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
    """``ogm``: OGM-GE gradient modulation (``model.fusion: ogm_ge``)."""

    alpha: float = option(0.1, ge=0.0)
    start_epoch: int = option(1, ge=1)
    end_epoch: int = option(1000, ge=1)


@dataclass
class OptimConfig(Section):
    """``optim``: the optimizer and the warm-up + cosine schedule (per step)."""

    name: str = option("sgd", choices=("sgd", "adamw"))
    lr: float = option(1e-3, ge=0.0)
    momentum: float = option(0.9, ge=0.0, le=1.0)
    weight_decay: float = option(1e-4, ge=0.0)
    warmup_epochs: float = option(1.0, ge=0.0)
    min_lr: float = option(0.0, ge=0.0)


@dataclass
class TrainConfig(Section):
    """``train``: the loop."""

    epochs: int = option(30, ge=1)
    batch_size: int = option(64, ge=1)
    eval_batch_size: int = option(128, ge=1)
    probe_loss_weight: float = option(1.0, ge=0.0)
    bf16: bool = True
    grad_clip: float | None = option(None, gt=0.0)
    progress: bool = True
    num_threads: int | None = option(None, ge=1)
