"""Pretrained ViT weights for ``model.pretrained``: a local file or a timm model id.

:func:`read_pretrained` takes either. A timm model id with its pretrained tag
(``vit_base_patch16_224.augreg_in21k``) is resolved by :func:`read_timm_pretrained` through timm's
pretrained config, as ``timm.create_model(id, pretrained=True)`` resolves it: a local ``file`` of the
config first, then the Hugging Face Hub (``hf_hub_id``) through huggingface_hub's cache, which honours
``HF_HUB_OFFLINE=1`` (only the cache is read), ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), then
the config's ``url`` through torch.hub's cache (``TORCH_HOME``). Offline and not cached is an error that
says where the file was looked for.

:func:`read_vit_checkpoint` reads a timm ViT checkpoint file in any of three formats, with nothing
executed from the file:

* ``.pth`` / ``.pt`` / ``.bin``: a torch state dict (or ``{"model": …}`` / ``{"state_dict": …}``),
  loaded with ``torch.load(weights_only=True)``: a pickle holding anything but tensors and plain
  containers is refused (:class:`PretrainedError`), never unpickled;
* ``.safetensors``: timm's and the Hugging Face Hub's format;
* ``.npz``: the original JAX/Flax ViT release (Google's ``ViT-B_16.npz``, ImageNet-21k), converted
  to timm's names as ``timm.models.vision_transformer._load_weights`` does.

:func:`load_vit_weights` maps what fits into a :class:`~rollingq.models.encoders.ModalityEncoder`:
``blocks.{i}`` for the encoder's first ``depth`` blocks, ``norm``, the patch projection (summed over
RGB for a one-channel spectrogram) and the position embedding (its class position dropped, the
grid resampled bicubically to the encoder's patch grid as timm's ``resample_abs_pos_embed`` does).
It logs which tensors were loaded and which were not, and why.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

logger = logging.getLogger("rollingq.models")

FORMATS = (".pth", ".pt", ".bin", ".safetensors", ".npz")


class PretrainedError(ValueError):
    """``model.pretrained`` names a file that is not a usable ViT checkpoint (the message says why)."""


# ------------------------------------------------------------------------------------------- reading
def _looks_like_path(spec: str) -> bool:
    return (os.path.exists(spec) or os.sep in spec or (os.altsep or os.sep) in spec
            or spec.startswith(("~", ".")) or spec.lower().endswith(FORMATS))


def read_pretrained(spec: str) -> dict[str, torch.Tensor]:
    """The timm-named ViT state dict ``model.pretrained`` names: a checkpoint file or a timm model id.

    A string that exists as a file, holds a path separator, starts with ``~`` or ``.`` or ends with a
    checkpoint extension is a file (:func:`read_vit_checkpoint`); anything else is a timm model id
    (:func:`read_timm_pretrained`).
    """
    if _looks_like_path(spec):
        return read_vit_checkpoint(os.path.expanduser(spec))
    return read_timm_pretrained(spec)


def _weights_source(cfg) -> str:
    """Where timm will look for the weights of a pretrained config, in its order (for messages)."""
    places = [f"file {cfg.file!r}"] if cfg.file else []
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        places.append(f"the Hugging Face Hub repository {cfg.hf_hub_id!r} (cache: {constants.HF_HUB_CACHE}"
                      f"{', offline: HF_HUB_OFFLINE=1' if constants.HF_HUB_OFFLINE else ''})")
    if cfg.url:
        places.append(f"{cfg.url} (cache: {os.path.join(torch.hub.get_dir(), 'checkpoints')})")
    return "; then ".join(places) or "nowhere (the config names no weights)"


def read_timm_pretrained(model_id: str, overlay: dict | None = None) -> dict[str, torch.Tensor]:
    """The ViT state dict (float32, timm names, no classifier) of a timm model id with pretrained weights.

    ``model_id`` is ``architecture.tag`` as ``timm.list_models(pretrained=True)`` lists it (the
    architecture alone takes timm's default tag). ``overlay`` updates the model's pretrained config
    (``pretrained_cfg_overlay`` of ``timm.create_model``), e.g. ``dict(file=path)`` for a local copy.

    Raises:
        PretrainedError: not a timm model, no pretrained config for the tag, or weights that cannot
            be had (offline and not in the cache, no network, a corrupt file), naming where timm looked.
    """
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    architecture, _ = split_model_name_tag(model_id)
    if not timm.is_model(architecture):
        raise PretrainedError(f"model.pretrained: {model_id!r} is neither a checkpoint file nor a timm model id "
                              "(e.g. vit_base_patch16_224.augreg_in21k; timm.list_models('vit_*', pretrained=True) "
                              "lists them)")
    try:
        cfg = get_pretrained_cfg(model_id)
    except RuntimeError:  # "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{architecture}.*")[:8]
        raise PretrainedError(f"model.pretrained: timm has no pretrained config {model_id!r}; "
                              f"{architecture} has {tags or 'none'}")
    if overlay:
        cfg = cfg.__class__(**{**cfg.to_dict(), **overlay})
    try:
        model = timm.create_model(model_id, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # huggingface_hub's offline/missing-entry errors, URLError, a corrupt file
        raise PretrainedError(
            f"model.pretrained: timm could not load the weights of {model_id!r} from {_weights_source(cfg)}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. Offline, the "
            "weights must already be in that cache (download them once with network, e.g. "
            f"`python -c \"import timm; timm.create_model('{model_id}', pretrained=True)\"`), or set "
            "model.pretrained to a local checkpoint file"
        ) from exc
    logger.info("model.pretrained: %s resolved by timm (%s)", model_id, _weights_source(cfg))
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}


def read_vit_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A timm-named ViT state dict (float32 CPU tensors) from a ``.pth``, ``.safetensors`` or ``.npz`` file.

    Raises:
        FileNotFoundError: no file at ``path``.
        PretrainedError: an unknown extension, an unreadable file, a pickle that is not a plain
            state dict, or no ViT tensors in it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.pretrained: no checkpoint file at {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise PretrainedError(f"model.pretrained: {path!r}: expected a {', '.join(FORMATS)} file, got {ext or 'none'}")
    try:
        if ext == ".safetensors":
            from safetensors.torch import load_file  # installed with timm

            state = load_file(path, device="cpu")
        elif ext == ".npz":
            state = _npz_state(path)
        else:
            state = _torch_state(path)
    except (PretrainedError, FileNotFoundError):
        raise
    except Exception as exc:  # a corrupt file, wrong format: name it
        raise PretrainedError(f"model.pretrained: cannot read {path!r} as {ext}: {type(exc).__name__}: {exc}") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith(("blocks.", "patch_embed.")) for k in state):
        raise PretrainedError(f"model.pretrained: no ViT tensors (blocks.*, patch_embed.*) in {path!r}; "
                              f"its first keys: {sorted(state)[:5]}")
    return state


def _torch_state(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainedError(
            f"model.pretrained: {path!r} is not a plain tensor checkpoint and is not unpickled (only tensors and "
            f"plain containers are read, weights_only=True): {first}. Save the weights with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from exc
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise PretrainedError(f"model.pretrained: {path!r} does not hold a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


_JAX_TO_TORCH_AXES = {4: (3, 2, 0, 1), 3: (2, 0, 1), 2: (1, 0)}  # e.g. HWIO -> OIHW, (in, out) -> (out, in)


def _n2p(w: np.ndarray, transpose: bool = True) -> torch.Tensor:
    """A JAX array as a torch tensor, with timm's layout (``_n2p`` in timm's ``_load_weights``)."""
    if w.ndim == 4 and w.shape[0] == w.shape[1] == w.shape[2] == 1:
        w = w.flatten()
    if transpose and w.ndim in _JAX_TO_TORCH_AXES:
        w = w.transpose(_JAX_TO_TORCH_AXES[w.ndim])
    return torch.from_numpy(np.ascontiguousarray(w))


def _npz_state(path: str) -> dict[str, torch.Tensor]:
    """timm names for the JAX ViT layout (``Transformer/encoderblock_{i}/…``, optional ``opt/target/`` prefix)."""
    with np.load(path, allow_pickle=False) as archive:
        w = {k: archive[k] for k in archive.files}
    prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise PretrainedError(f"model.pretrained: {path!r} is an .npz without 'embedding/kernel': expected the JAX "
                              "ViT release (e.g. ViT-B_16.npz)")
    state = {"patch_embed.proj.weight": _n2p(w[f"{prefix}embedding/kernel"]),
             "patch_embed.proj.bias": _n2p(w[f"{prefix}embedding/bias"])}
    if f"{prefix}cls" in w:
        state["cls_token"] = _n2p(w[f"{prefix}cls"], transpose=False)
    pos = f"{prefix}Transformer/posembed_input/pos_embedding"
    if pos in w:
        state["pos_embed"] = _n2p(w[pos], transpose=False)
    if f"{prefix}Transformer/encoder_norm/scale" in w:
        state["norm.weight"] = _n2p(w[f"{prefix}Transformer/encoder_norm/scale"])
        state["norm.bias"] = _n2p(w[f"{prefix}Transformer/encoder_norm/bias"])
    depth = len({m.group(1) for k in w if (m := re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k))})
    for i in range(depth):
        block, out = f"{prefix}Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = f"{block}MultiHeadDotProductAttention_1/"
        state[out + "norm1.weight"] = _n2p(w[f"{block}LayerNorm_0/scale"])
        state[out + "norm1.bias"] = _n2p(w[f"{block}LayerNorm_0/bias"])
        state[out + "attn.qkv.weight"] = torch.cat(
            [_n2p(w[f"{mha}{n}/kernel"], transpose=False).flatten(1).T for n in ("query", "key", "value")])
        state[out + "attn.qkv.bias"] = torch.cat(
            [_n2p(w[f"{mha}{n}/bias"], transpose=False).reshape(-1) for n in ("query", "key", "value")])
        state[out + "attn.proj.weight"] = _n2p(w[f"{mha}out/kernel"]).flatten(1)
        state[out + "attn.proj.bias"] = _n2p(w[f"{mha}out/bias"])
        state[out + "norm2.weight"] = _n2p(w[f"{block}LayerNorm_2/scale"])
        state[out + "norm2.bias"] = _n2p(w[f"{block}LayerNorm_2/bias"])
        for j in (0, 1):
            state[out + f"mlp.fc{j + 1}.weight"] = _n2p(w[f"{block}MlpBlock_3/Dense_{j}/kernel"])
            state[out + f"mlp.fc{j + 1}.bias"] = _n2p(w[f"{block}MlpBlock_3/Dense_{j}/bias"])
    return state


# ------------------------------------------------------------------------------------------- mapping
@dataclass
class LoadReport:
    """What :func:`load_vit_weights` did for one encoder.

    Attributes:
        loaded: encoder tensor names that now hold checkpoint values (with a note where converted).
        not_loaded: checkpoint tensor names left out, by reason.
        kept: encoder tensors the checkpoint does not provide (they keep their initialization).
    """

    loaded: list[str] = field(default_factory=list)
    not_loaded: dict[str, list[str]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def skip(self, key: str, reason: str) -> None:
        self.not_loaded.setdefault(reason, []).append(key)

    def summary(self) -> str:
        """One paragraph: loaded, not loaded (by reason), kept."""
        parts = [f"loaded {len(self.loaded)} tensor(s): {_compact(self.loaded)}"]
        parts += [f"not loaded ({reason}): {_compact(keys)}" for reason, keys in self.not_loaded.items()]
        if self.kept:
            parts.append(f"kept their initialization (not in the checkpoint): {_compact(self.kept)}")
        return "; ".join(parts)


def _compact(keys: list[str]) -> str:
    """``blocks.0-3.*`` style summary of block keys, other names as they are."""
    blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))})
    others = [k for k in keys if not re.match(r"blocks\.\d+\.", k)]
    out = []
    if blocks:
        out.append(f"blocks.{blocks[0]}-{blocks[-1]}.*" if len(blocks) > 1 else f"blocks.{blocks[0]}.*")
    return ", ".join(out + others) or "none"


def _grid(tokens: int) -> int:
    side = math.isqrt(tokens)
    return side if side * side == tokens else 0


def _position_embedding(pos: torch.Tensor, encoder: nn.Module, report: LoadReport) -> tuple[str, torch.Tensor] | None:
    """The checkpoint's ``pos_embed`` resampled to the encoder's patch grid, or None (reason in ``report``)."""
    embed = encoder.embed
    target = getattr(embed, "pos", None)
    if target is None or type(embed).__name__ not in ("FramePatchEmbed", "SpectrogramPatchEmbed"):
        report.skip("pos_embed", f"the {type(embed).__name__} has no ViT patch grid")
        return None
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[-1] != target.shape[-1]:
        report.skip("pos_embed", f"shape {tuple(pos.shape)} does not fit the width {target.shape[-1]}")
        return None
    prefix = 1 if _grid(pos.shape[1] - 1) else 0  # the class position, which the encoders do not have
    old = _grid(pos.shape[1] - prefix)
    if not old:
        report.skip("pos_embed", f"{pos.shape[1]} positions are not a square grid")
        return None
    if type(embed).__name__ == "FramePatchEmbed":
        side = _grid(embed.per_frame)
        new_size, shape = (side, side), target.shape  # (1, 1, P, D)
    else:
        new_size, shape = (embed.freq // 16, embed.time // 16), target.shape  # (1, L, D), row-major (freq, time)
    resampled = resample_abs_pos_embed(pos[:, prefix:], new_size=list(new_size), old_size=[old, old],
                                       num_prefix_tokens=0, interpolation="bicubic", antialias=True, verbose=False)
    return f"pos_embed (resampled {old}x{old} -> {new_size[0]}x{new_size[1]})", resampled.reshape(shape)


def load_vit_weights(encoder: nn.Module, state: dict[str, torch.Tensor], source: str = "model.pretrained"
                     ) -> LoadReport:
    """Copy the tensors of a timm ViT state dict that fit into ``encoder``; return what was done.

    Raises:
        PretrainedError: a block or norm tensor has another shape than the encoder's (e.g. ViT-B
            weights for ``model.dim != 768``), or nothing fits.
    """
    own = encoder.state_dict()
    report = LoadReport()
    mapped: dict[str, torch.Tensor] = {}
    depth = len(encoder.blocks)
    for key, value in state.items():
        block = re.match(r"blocks\.(\d+)\.", key)
        if block and int(block.group(1)) >= depth:
            report.skip(key, f"the encoder has {depth} block(s)")
        elif (block or key.startswith("norm.")) and key in own:
            if own[key].shape != value.shape:
                raise PretrainedError(
                    f"{source}: {key} has shape {tuple(value.shape)}, the encoder expects {tuple(own[key].shape)} "
                    "(model.dim and model.encoder_heads must match the checkpoint, e.g. 768 and 12 for ViT-B/16)")
            mapped[key] = value
            report.loaded.append(key)
        elif key in ("patch_embed.proj.weight", "patch_embed.proj.bias") and "embed." + key[12:] in own:
            target = "embed." + key[12:]
            note = ""
            if value.dim() == 4 and own[target].shape[1] == 1 and value.shape[1] == 3:
                value, note = value.sum(1, keepdim=True), " (summed over RGB for the 1-channel spectrogram)"
            if own[target].shape != value.shape:
                report.skip(key, f"shape {tuple(value.shape)} does not fit {tuple(own[target].shape)}")
                continue
            mapped[target] = value
            report.loaded.append(key + note)
        elif key == "pos_embed":
            found = _position_embedding(value, encoder, report)
            if found is not None:
                mapped["embed.pos"] = found[1]
                report.loaded.append(found[0])
        elif key == "cls_token":
            report.skip(key, "the encoders have no class token (the fusion's is trained from scratch)")
        elif key.startswith(("head", "pre_logits", "fc_norm")):
            report.skip(key, "the classifier")
        else:
            report.skip(key, "no counterpart in the encoder")
    for key in own:
        qkv_bias = re.fullmatch(r"(blocks\.\d+\.attn\.qkv)\.bias", key)
        if key not in mapped and qkv_bias and qkv_bias.group(1) + ".weight" in mapped:
            mapped[key] = torch.zeros_like(own[key])  # a checkpoint without qkv bias (e.g. MIIL's): exactly no bias
            report.loaded.append(key + " (zero: the checkpoint has no qkv bias)")
        elif key not in mapped and (key.startswith(("blocks.", "norm.")) or key in ("embed.proj.weight", "embed.pos")):
            report.kept.append(key)
    if not mapped:
        raise PretrainedError(f"{source}: no tensor fits the encoder: {report.summary()}")
    encoder.load_state_dict(mapped, strict=False)
    return report
