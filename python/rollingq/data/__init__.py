"""Datasets of the training package; each returns ``(modalities, label, index)`` samples.

:func:`build_dataset` picks the loader from ``cfg["data"]["name"]``:
``synthetic`` (default, no files), ``cremad``, ``kinetics_sounds``, ``mosei``.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from .common import SPLITS, DataError, collate, make_loader

__all__ = ["SPLITS", "DataError", "build_dataset", "collate", "make_loader"]

DATASETS = ("synthetic", "cremad", "kinetics_sounds", "mosei")


def build_dataset(cfg: dict, split: str) -> Dataset:
    """The ``split`` ("train" | "val" | "test") of the dataset named by ``cfg["data"]["name"]``."""
    name = cfg["data"]["name"]
    if name == "synthetic":
        from .synthetic import SyntheticDataset

        return SyntheticDataset(cfg, split)
    if name == "cremad":
        from .cremad import CremaDDataset

        return CremaDDataset(cfg, split)
    if name == "kinetics_sounds":
        from .kinetics import KineticsSoundsDataset

        return KineticsSoundsDataset(cfg, split)
    if name == "mosei":
        from .mosei import MoseiDataset

        return MoseiDataset(cfg, split)
    raise ValueError(f"data.name: expected one of {DATASETS}, got {name!r}")
