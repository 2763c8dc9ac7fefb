"""The synthetic default: token sequences with a per-modality class signal.

Everything is generated from the seed (no files). Each modality ``m``
has ``tokens[m]`` tokens of ``feature_dim`` features; a token is Gaussian
noise, and a fraction ``informative[m]`` of the tokens (random positions per
sample) additionally carries ``strength[m] * prototype[m][label]``, a fixed
random unit direction per (modality, class). A larger ``strength`` makes the
modality easier: the model learns it first and, greedily, attends to it
(see ``docs/synthetic_data.md``). ``corrupt[split]`` is the fraction of that
split's samples whose strongest modality is replaced by pure noise
(per-sample quality); ``dataset.corrupted`` (bool tensor ``(N,)``) records which.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from torch.utils.data import Dataset

from ..inputs import InputSpec
from ..schema import Section
from .common import SPLITS, Sample, check_split

logger = logging.getLogger("rollingq.data")

SPLIT_IDS = {"train": 1, "val": 2, "test": 3}



class SplitSizes(Section):
    """``data.synthetic.sizes``: samples per split."""

    train: int = Field(2048, ge=1)
    val: int = Field(512, ge=1)
    test: int = Field(1024, ge=1)


class SplitFractions(Section):
    """``data.synthetic.corrupt``: the fraction of each split's samples whose strongest modality is noise."""

    train: float = Field(0.0, ge=0.0, le=1.0)
    val: float = Field(0.0, ge=0.0, le=1.0)
    test: float = Field(0.0, ge=0.0, le=1.0)


class SyntheticOptions(Section):
    """``data.synthetic``: the task's knobs (``docs/synthetic_data.md``); a number applies to every modality."""

    sizes: SplitSizes = SplitSizes()
    tokens: int | list[int] = [8, 8]
    feature_dim: int = Field(16, ge=1)
    strength: float | list[float] = [1.5, 0.6]
    informative: float | list[float] = [1.0, 1.0]
    corrupt: SplitFractions = SplitFractions()


class SyntheticData(Section):
    """The ``data.*`` keys of the synthetic dataset."""

    synthetic: SyntheticOptions = SyntheticOptions()

    def arguments(self) -> dict:
        return self.synthetic.to_dict()


def _per_modality(value, num: int, key: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * num
    if not isinstance(value, list) or len(value) != num:
        raise ValueError(f"data.synthetic.{key}: expected a number or a list of {num} numbers, got {value!r}")
    return [float(v) for v in value]


def input_specs(modalities: list[str], options: SyntheticData) -> list[InputSpec]:
    """``(tokens[m], feature_dim)`` features per modality."""
    tokens = _per_modality(options.synthetic.tokens, len(modalities), "tokens")
    return [InputSpec("features", (int(t), options.synthetic.feature_dim)) for t in tokens]


class SyntheticDataset(Dataset):
    """Deterministic multimodal token sequences; sample tensors are float32 ``(tokens[m], feature_dim)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        modalities: the modality names (their number is what matters).
        num_classes: classes, ``>= 2``.
        seed: everything is generated from it.
        sizes, tokens, feature_dim, strength, informative, corrupt: the knobs of
            :class:`SyntheticOptions` (``sizes`` and ``corrupt`` as ``{split: value}``).
    """

    def __init__(self, split: str, *, modalities: list[str], num_classes: int, seed: int, sizes: dict,
                 tokens: int | list[int], feature_dim: int, strength: float | list[float],
                 informative: float | list[float], corrupt: dict) -> None:
        check_split(split)
        mods = list(modalities)
        num_mod = len(mods)
        if num_classes < 2:
            raise ValueError(f"data.num_classes: expected >= 2, got {num_classes}")
        for key, table in (("sizes", sizes), ("corrupt", corrupt)):
            unknown = sorted(set(table) - set(SPLITS))
            if unknown:
                raise ValueError(f"data.synthetic.{key}: expected keys train/val/test, got {unknown}")
        tokens = [int(t) for t in _per_modality(tokens, num_mod, "tokens")]
        strength = _per_modality(strength, num_mod, "strength")
        informative = _per_modality(informative, num_mod, "informative")
        dim = int(feature_dim)
        n = int(sizes[split])
        if n < 1:
            raise ValueError(f"data.synthetic.sizes.{split}: expected >= 1, got {n}")
        frac = float(corrupt[split])
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"data.synthetic.corrupt.{split}: expected a fraction in [0, 1], got {frac}")

        seed = int(seed)
        proto_gen = torch.Generator().manual_seed(seed * 7919 + 17)
        gen = torch.Generator().manual_seed(seed * 7919 + 1000 * SPLIT_IDS[split])
        self.labels = torch.randint(0, num_classes, (n,), generator=gen)
        self.modalities: list[torch.Tensor] = []
        for m in range(num_mod):
            proto = torch.randn(num_classes, dim, generator=proto_gen, dtype=torch.float64)
            proto = proto / proto.norm(dim=1, keepdim=True)
            x = torch.randn(n, tokens[m], dim, generator=gen, dtype=torch.float64)
            carrier = torch.rand(n, tokens[m], generator=gen) < informative[m]
            x = x + strength[m] * carrier.unsqueeze(-1) * proto[self.labels].unsqueeze(1)
            self.modalities.append(x.float())
        strongest = max(range(num_mod), key=lambda i: strength[i])
        self.corrupted = torch.rand(n, generator=gen) < frac
        if frac > 0:
            noise = torch.randn(n, tokens[strongest], dim, generator=gen)
            self.modalities[strongest] = torch.where(
                self.corrupted[:, None, None], noise, self.modalities[strongest]
            )
        self.strongest = strongest
        self.num_classes = num_classes
        logger.info(
            "synthetic %s: %d samples, %d corrupted (modality %s replaced by noise)",
            split, n, int(self.corrupted.sum()), mods[strongest],
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> Sample:
        return [x[index] for x in self.modalities], int(self.labels[index]), int(index)
