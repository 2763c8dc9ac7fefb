"""From a :class:`~rollingq.config.Config` to the objects it describes.

Datasets (through the registry :data:`~rollingq.data.registry.DATASETS`), loaders, the model, the
optimizer and the RollingQ controller, each constructed with explicit arguments. Every function also
takes a YAML-shaped dict, validated as a config file would be.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rollingq_kernels.controller import RollingQ

from .config import Config, as_config
from .data.common import collate
from .data.registry import DATASETS
from .inputs import InputSpec
from .models import MultimodalModel

ConfigLike = Config | Mapping[str, Any]


def input_specs(cfg: ConfigLike) -> list[InputSpec]:
    """One :class:`~rollingq.inputs.InputSpec` per modality of ``cfg.data``."""
    data = as_config(cfg).data
    return DATASETS[data.name].input_specs(data.modalities, data.options)


def build_dataset(cfg: ConfigLike, split: str) -> Dataset:
    """The ``split`` (``"train"``, ``"val"`` or ``"test"``) of the dataset ``cfg.data.name``."""
    cfg = as_config(cfg)
    data = cfg.data
    entry = DATASETS[data.name]
    available = {
        "root": data.root, "modalities": list(data.modalities), "num_classes": data.num_classes, "seed": cfg.seed,
        "val_fraction": data.val_fraction, "skip_bad": data.skip_bad,
    }
    return entry.dataset(split, **{name: available[name] for name in entry.common}, **data.options.arguments())


def make_loader(dataset: Dataset, cfg: ConfigLike, train: bool, world_size: int = 1, rank: int = 0) -> DataLoader:
    """A DataLoader whose order is a pure function of (``cfg.seed``, epoch).

    Training: a :class:`~torch.utils.data.DistributedSampler` (also with one
    process) shuffles with ``seed`` and the epoch set by ``loader.sampler.set_epoch``;
    each of ``world_size`` ranks gets ``batch_size // world_size`` samples per step,
    so the ranks' batches together are the single-process batch. Evaluation:
    sequential, every rank sees the whole split.
    """
    cfg = as_config(cfg)
    workers = cfg.data.num_workers
    if not train:
        return DataLoader(dataset, batch_size=cfg.train.eval_batch_size, shuffle=False, num_workers=workers,
                          collate_fn=collate)
    batch = cfg.train.batch_size
    if batch % world_size:
        raise ValueError(f"train.batch_size: expected a multiple of the world size {world_size}, got {batch}")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=False)
    return DataLoader(dataset, batch_size=batch // world_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, persistent_workers=False)


def build_model(cfg: ConfigLike) -> MultimodalModel:
    """The model ``cfg.model`` for the dataset ``cfg.data``."""
    cfg = as_config(cfg)
    return MultimodalModel(input_specs(cfg), modalities=cfg.data.modalities, num_classes=cfg.data.num_classes,
                           **cfg.model.arguments())


def build_optimizer(cfg: ConfigLike, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (the paper: lr 1e-3, momentum 0.9, weight decay 1e-4) or AdamW, from ``cfg.optim``."""
    o = as_config(cfg).optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def build_controller(cfg: ConfigLike, model: MultimodalModel) -> RollingQ | None:
    """The RollingQ controller on the model's last active fusion attention, or None when disabled."""
    rq = as_config(cfg).rollingq
    if not rq.enabled:
        return None
    return RollingQ([model.fusion_attention], settings=rq.settings(), seed=as_config(cfg).seed)
