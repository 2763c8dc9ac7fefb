"""The one dataset registry: every dataset's class, its options and its input specs, by ``data.name``.

An entry names the dataset class (explicit keyword arguments), the dataclass of the ``data.*`` keys it
adds to the common ones (:class:`rollingq.config.DataConfig`), which common arguments it takes, and the
function giving its :class:`~rollingq.inputs.InputSpec` per modality. Adding a dataset is one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from ..inputs import InputSpec
from ..schema import Section
from . import cremad, kinetics, mosei, synthetic


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset.

    Attributes:
        dataset: the class, called as ``dataset(split, **common, **options.arguments())``.
        options: the :class:`~rollingq.schema.Section` of the dataset's own ``data.*`` keys.
        common: the common arguments it takes, of ``root``, ``modalities``, ``num_classes``, ``seed``,
            ``val_fraction``, ``skip_bad``.
        input_specs: ``input_specs(modalities, options)``, one spec per modality; raises ``ValueError``
            naming ``data.modalities`` for a modality the dataset does not have.
    """

    dataset: type[Dataset]
    options: type[Section]
    common: tuple[str, ...]
    input_specs: Callable[[list[str], Section], list[InputSpec]]


_FILES = ("root", "modalities", "num_classes", "seed", "val_fraction", "skip_bad")

DATASETS: dict[str, DatasetEntry] = {
    "synthetic": DatasetEntry(synthetic.SyntheticDataset, synthetic.SyntheticData,
                              ("modalities", "num_classes", "seed"), synthetic.input_specs),
    "cremad": DatasetEntry(cremad.CremaDDataset, cremad.CremaDOptions, _FILES, cremad.input_specs),
    "kinetics_sounds": DatasetEntry(kinetics.KineticsSoundsDataset, kinetics.KineticsOptions, _FILES,
                                    kinetics.input_specs),
    "mosei": DatasetEntry(mosei.MoseiDataset, mosei.MoseiOptions, ("root", "modalities", "num_classes"),
                          mosei.input_specs),
}
