"""Shared pieces of the datasets: the sample layout, batching, splits, per-sample RNGs.

Every dataset returns samples ``(modalities, label, index)``: ``modalities`` is
a list of tensors (one per modality, in ``data.modalities`` order),
``label`` an int class id and ``index`` the sample's position in its split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("rollingq.data")

SPLITS = ("train", "val", "test")

Sample = tuple[list[torch.Tensor], int, int]


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or inconsistent (the message names the file)."""


def read_list_lines(path: str, what: str) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 list file (a BOM is accepted) as ``(line number, text)``.

    Raises:
        DataError: the file is missing, not UTF-8 (naming the line and byte), or holds no line.
    """
    if not os.path.isfile(path):
        raise DataError(f"{what} list file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the list file "
            "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from exc
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: the {what} list file is empty (no sample lines)")
    return lines


def non_finite_reason(values: np.ndarray) -> str | None:
    """None if ``values`` holds only finite numbers, else what is wrong (counts and the first index)."""
    finite = np.isfinite(values)
    if finite.all():
        return None
    bad = int(finite.size - np.count_nonzero(finite))
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    return f"holds {bad} non-finite value(s) (NaN or inf; the first at index {first})"


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def collate(batch: Sequence[Sample]) -> dict[str, Any]:
    """Stack samples into ``{"modalities": [Tensor (B, ...)], "label": LongTensor (B,), "index": LongTensor (B,)}``."""
    if not batch:
        raise ValueError("collate: got an empty batch")
    num_mod = len(batch[0][0])
    modalities = [torch.stack([sample[0][m] for sample in batch]) for m in range(num_mod)]
    labels = torch.tensor([int(sample[1]) for sample in batch], dtype=torch.long)
    index = torch.tensor([int(sample[2]) for sample in batch], dtype=torch.long)
    return {"modalities": modalities, "label": labels, "index": index}


def seeded_holdout(num: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(num)`` into (keep, held_out) index arrays, deterministically from ``seed``.

    The held-out part has ``max(1, round(fraction * num))`` samples (when ``num >= 2``);
    both arrays are sorted so the dataset's order is preserved.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction: expected a value in (0, 1), got {fraction!r}")
    if num < 2:
        raise DataError(f"cannot hold out a validation split from {num} training sample(s); need at least 2")
    n_val = min(num - 1, max(1, int(round(fraction * num))))
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED])).permutation(num)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Per-sample augmentation RNG: a pure function of (seed, epoch, index), the same in any worker or rank."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


class EpochAware:
    """Mixin for datasets whose training augmentation depends on the epoch (set by the trainer)."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to seed per-sample augmentation."""
        self.epoch = int(epoch)
