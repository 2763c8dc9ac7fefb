"""The sections of a run's configuration, one pydantic model each: every key's type, default and allowed values.

What each key means is in ``docs/training.md`` (Configs, the key table); the whole
:class:`~rollingq.config.Config` and its loading are in :mod:`rollingq.config`, the validation in
:mod:`rollingq.schema`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

from pydantic import Field, create_model, model_validator

from rollingq_kernels.checks import BACKENDS
from rollingq_kernels.module import ROTATION_MODES
from rollingq_kernels.settings import PRESETS, RollingQSettings

from .data.registry import DATASETS
from .models import FUSIONS
from .models.encoders import BACKBONES
from .models.fusion import FUSION_BLOCKS
from .models.warmstart import check_init_encoders
from .schema import ConfigError, Section, checked

__all__ = ["DATA_SECTIONS", "DataConfig", "ModelConfig", "OgmConfig", "OptimConfig", "RollingQConfig", "TrainConfig"]


def _distinct_names(names: list[str]) -> str | None:
    return "expected a non-empty list of distinct modality names" if not names or len(set(names)) < len(names) else None


class DataConfig(Section):
    """``data``: the common keys; a config's ``data`` is the subclass of its dataset (:data:`DATA_SECTIONS`),
    which adds that dataset's own keys, the fields of its options section, flat as in YAML."""

    name: Literal[tuple(DATASETS)] = "synthetic"
    modalities: Annotated[list[str], checked(_distinct_names)] = ["audio", "visual"]
    num_classes: int = Field(2, ge=2)
    root: str | None = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    skip_bad: bool = False
    num_workers: int = Field(0, ge=0)

    @property
    def options(self) -> Section:
        """The dataset's own keys as its options section."""
        options = DATASETS[self.name].options
        return options.model_construct(**{k: getattr(self, k) for k in options.model_fields})


DATA_SECTIONS: dict[str, type[DataConfig]] = {
    name: create_model(f"DataConfig_{name}", __base__=DataConfig, __module__=__name__,
                       **{key: (f.annotation, f) for key, f in entry.options.model_fields.items()})
    for name, entry in DATASETS.items()}
"""The ``data`` section of each dataset of the registry (module attributes, so that configs pickle)."""
globals().update({cls.__name__: cls for cls in DATA_SECTIONS.values()})


class ModelConfig(Section):
    """``model``: encoders, the fusion head and its attention."""

    fusion: Literal[FUSIONS] = "vanilla_mt"
    dim: int = Field(64, ge=1)
    encoder_depth: int = Field(2, ge=0)
    encoder_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(2.0, gt=0.0)
    fusion_heads: int = Field(1, ge=1)
    attn_drop: float = Field(0.0, ge=0.0, lt=1.0)
    drop: float = Field(0.0, ge=0.0, lt=1.0)
    backbone: Literal[BACKBONES] = "vit"
    pretrained: str | None = None
    rotation_mode: Literal[ROTATION_MODES] = "global"
    backend: Literal[BACKENDS] = "auto"
    progressive_epochs: int = Field(0, ge=0)
    modality: str | None = None
    fusion_block: Literal[FUSION_BLOCKS] = "prenorm"
    init_encoders: Annotated[Any, checked(check_init_encoders)] = None

    def arguments(self) -> dict[str, Any]:
        """The model's constructor arguments (``progressive_epochs`` and ``init_encoders`` are the trainer's)."""
        return self.model_dump(exclude={"progressive_epochs", "init_encoders"})


class RollingQSection(Section):
    """``rollingq``: ``enabled``; :data:`RollingQConfig` adds the controller's settings, whose defaults and checks
    are stated once in :class:`rollingq_kernels.settings.RollingQSettings`."""

    model_config = {"frozen": True}  # as the settings
    enabled: bool = False

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, raw: Any) -> Any:
        """``mode`` names a preset (:data:`rollingq_kernels.settings.PRESETS`): its values, replaced by the keys
        given, however the section is built."""
        if isinstance(raw, dict) and isinstance(mode := raw.get("mode"), str) and mode in PRESETS:
            return {**PRESETS[mode], **raw}
        return raw

    @model_validator(mode="after")
    def _settings_check(self) -> RollingQSection:
        try:
            self.settings()
        except ValueError as exc:  # the settings' own check ("beta: expected ..."), named as the config's key
            raise ConfigError(f"rollingq.{exc}") from exc
        return self

    def settings(self) -> RollingQSettings:
        """The controller's settings of this section."""
        return RollingQSettings.from_dict(self.model_dump(exclude={"enabled"}))


_HINTS = typing.get_type_hints(RollingQSettings)
RollingQConfig = create_model(
    "RollingQConfig", __base__=RollingQSection, __module__=__name__, __doc__=RollingQSection.__doc__,
    **{f.name: (_HINTS[f.name], f.default) for f in dataclasses.fields(RollingQSettings)})


class OgmConfig(Section):
    """``ogm``: OGM-GE gradient modulation (``model.fusion: ogm_ge``)."""

    alpha: float = Field(0.1, ge=0.0)
    start_epoch: int = Field(1, ge=1)
    end_epoch: int = Field(1000, ge=1)


class OptimConfig(Section):
    """``optim``: the optimizer and the warm-up + cosine schedule (per step)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(1e-3, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    min_lr: float = Field(0.0, ge=0.0)


class TrainConfig(Section):
    """``train``: the loop."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    probe_loss_weight: float = Field(1.0, ge=0.0)
    bf16: bool = True
    grad_clip: float | None = Field(None, gt=0.0)
    progress: bool = True
    num_threads: int | None = Field(None, ge=1)
