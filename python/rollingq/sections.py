"""The sections of a run's configuration, one dataclass each: every key's type, default and allowed values.

:class:`DataConfig` (with the subclass of each dataset, :data:`DATA_SECTIONS`), :class:`ModelConfig`,
:class:`RollingQConfig`, :class:`OgmConfig`, :class:`OptimConfig`, :class:`TrainConfig`; the whole
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
    if not names or len(set(names)) != len(names):
        return "expected a non-empty list of distinct modality names"
    return None



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
