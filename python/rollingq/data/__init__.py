"""Datasets of the training package; each returns ``(modalities, label, index)`` samples.

The registry :data:`~rollingq.data.registry.DATASETS` names them (``synthetic``, the default with no
files, ``cremad``, ``kinetics_sounds``, ``mosei``); :func:`rollingq.build.build_dataset` builds one
from a config.
"""

from .common import SPLITS, DataError, collate
from .registry import DATASETS, DatasetEntry

__all__ = ["DATASETS", "SPLITS", "DataError", "DatasetEntry", "collate"]
