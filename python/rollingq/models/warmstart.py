"""Warm-starting encoders from earlier runs: ``model.init_encoders``.

``model.init_encoders: {audio: RUN_OR_CHECKPOINT, visual: RUN_OR_CHECKPOINT}`` copies each named modality's
encoder (embedding, blocks, norm) from a run written by ``rollingq train`` (its ``checkpoints/last.pt``) or
from a checkpoint file, e.g. a unimodal run pre-trained on a disjoint split (``prepare avdigits
--pretrain-per-class``). It is the paper's regime of encoders that start from useful features, with
checkpoints of this project's own runs; ``model.pretrained`` (timm ViT weights) is separate. Applied to
fresh runs only (a resumed run reads its own checkpoint), before the first step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_checkpoint

logger = logging.getLogger("rollingq.models")


def check_init_encoders(value: Any) -> str | None:
    """None if ``value`` is null or a mapping of modality names to non-empty path strings, else what was expected."""
    if value is None:
        return None
    if (not isinstance(value, Mapping) or not value
            or not all(isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in value.items())):
        return "expected null or a mapping {modality: run folder or checkpoint file}"
    return None


def checkpoint_file(path: str) -> str:
    """``path`` itself (a checkpoint file) or ``path/checkpoints/last.pt`` (a run folder)."""
    return os.path.join(path, "checkpoints", "last.pt") if os.path.isdir(path) else path


def encoder_state(path: str, modality: str) -> dict[str, torch.Tensor]:
    """The encoder tensors of ``modality`` in the run or checkpoint ``path`` (names relative to the encoder).

    Raises:
        ValueError: naming ``model.init_encoders.<modality>``: no checkpoint there, the run has no such
            modality, or its checkpoint stores no config.
    """
    key = f"model.init_encoders.{modality}"
    file = checkpoint_file(path)
    if not os.path.isfile(file):
        raise ValueError(f"{key}: no checkpoint at {file!r} (expected a run folder with checkpoints/last.pt or a "
                         "checkpoint file written by rollingq train)")
    state = load_checkpoint(file)
    config = state.get("config")
    modalities = (config or {}).get("data", {}).get("modalities") if isinstance(config, Mapping) else None
    if not isinstance(modalities, list):
        raise ValueError(f"{key}: {file!r} stores no config with data.modalities; expected a rollingq checkpoint")
    if modality not in modalities:
        raise ValueError(f"{key}: the run of {file!r} has modalities {modalities}, not {modality!r}")
    prefix = f"encoders.{modalities.index(modality)}."
    return {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}


def warm_start_encoders(model: nn.Module, sources: Mapping[str, str]) -> dict[str, str]:
    """Copy each ``sources[modality]`` encoder into ``model.encoders`` (a :class:`MultimodalModel`);
    returns ``{modality: checkpoint file}``.

    Raises:
        ValueError: naming ``model.init_encoders.<modality>``: a modality the model does not have, or an
            encoder whose tensors differ in names or shapes (another ``model.dim``, depth, input size).
    """
    names = list(model.modality_names)
    done = {}
    for modality, path in sources.items():
        key = f"model.init_encoders.{modality}"
        if modality not in names:
            raise ValueError(f"{key}: the model has modalities {names}, not {modality!r}")
        encoder = model.encoders[names.index(modality)]
        state = encoder_state(path, modality)
        own = encoder.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
                 if k in state and state[k].shape != own[k].shape]
        if missing or extra or wrong:
            raise ValueError(f"{key}: the encoder in {checkpoint_file(path)!r} does not fit this model's "
                             f"(missing {missing[:4]}, unexpected {extra[:4]}, shapes {wrong[:4]}); model.dim, "
                             "encoder_depth, encoder_heads, mlp_ratio and the input size must match")
        encoder.load_state_dict(state)
        done[modality] = checkpoint_file(path)
        logger.info("%s: %d tensors from %s", key, len(state), done[modality])
    return done
