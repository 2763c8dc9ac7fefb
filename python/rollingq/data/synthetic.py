"""The synthetic default: token sequences with a per-modality class signal.

Everything is generated from ``cfg["seed"]`` (no files). Each modality ``m``
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
from torch.utils.data import Dataset

from .common import Sample, check_split

logger = logging.getLogger("rollingq.data")

SPLIT_IDS = {"train": 1, "val": 2, "test": 3}

SYNTHETIC_DEFAULTS: dict = {
    "sizes": {"train": 2048, "val": 512, "test": 1024},
    "tokens": [8, 8],
    "feature_dim": 16,
    "strength": [1.5, 0.6],
    "informative": [1.0, 1.0],
    "corrupt": {"train": 0.0, "val": 0.0, "test": 0.0},
}


def _per_modality(value, num: int, key: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * num
    if not isinstance(value, list) or len(value) != num:
        raise ValueError(f"data.synthetic.{key}: expected a number or a list of {num} numbers, got {value!r}")
    return [float(v) for v in value]


class SyntheticDataset(Dataset):
    """Deterministic multimodal token sequences; sample tensors are float32 ``(tokens[m], feature_dim)``."""

    def __init__(self, cfg: dict, split: str) -> None:
        check_split(split)
        opts = {**SYNTHETIC_DEFAULTS, **(cfg["data"].get("synthetic") or {})}
        mods = cfg["data"]["modalities"]
        num_mod = len(mods)
        num_classes = int(cfg["data"]["num_classes"])
        if num_classes < 2:
            raise ValueError(f"data.num_classes: expected >= 2, got {num_classes}")
        sizes = {**SYNTHETIC_DEFAULTS["sizes"], **(opts.get("sizes") or {})}
        corrupt = {**SYNTHETIC_DEFAULTS["corrupt"], **(opts.get("corrupt") or {})}
        for key, table in (("sizes", sizes), ("corrupt", corrupt)):
            unknown = sorted(set(table) - set(SYNTHETIC_DEFAULTS[key]))
            if unknown:
                raise ValueError(f"data.synthetic.{key}: expected keys train/val/test, got {unknown}")
        tokens = [int(t) for t in _per_modality(opts["tokens"], num_mod, "tokens")]
        strength = _per_modality(opts["strength"], num_mod, "strength")
        informative = _per_modality(opts["informative"], num_mod, "informative")
        dim = int(opts["feature_dim"])
        n = int(sizes[split])
        if n < 1:
            raise ValueError(f"data.synthetic.sizes.{split}: expected >= 1, got {n}")
        frac = float(corrupt[split])
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"data.synthetic.corrupt.{split}: expected a fraction in [0, 1], got {frac}")

        seed = int(cfg["seed"])
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
