"""``model.pretrained`` offline: .pth, .safetensors and the JAX .npz release, position embeddings resampled,
a report of what was loaded, no unpickling, and a warning when the paper's ViT-B trains from scratch."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from rollingq.build import build_model
from rollingq.config import load_config
from rollingq.models.pretrained import PretrainedError, load_vit_weights, read_vit_checkpoint
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, _load_weights

DIM, HEADS, DEPTH = 16, 2, 3


def _vit(seed: int = 0, qkv_bias: bool = True) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0,
                            num_classes=7, qkv_bias=qkv_bias)
    with torch.no_grad():  # timm initializes biases and the position embedding to zero-ish: make them informative
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit


def _jax_npz(path, seed: int = 1) -> None:
    """A random checkpoint in the JAX ViT release's layout (names and axes of ViT-B_16.npz), for a 4x4 grid."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    dh = DIM // HEADS
    w = {"embedding/kernel": r(16, 16, 3, DIM), "embedding/bias": r(DIM), "cls": r(1, 1, DIM),
         "Transformer/posembed_input/pos_embedding": r(1, 17, DIM),
         "Transformer/encoder_norm/scale": r(DIM), "Transformer/encoder_norm/bias": r(DIM),
         "head/kernel": r(DIM, 7), "head/bias": r(7)}
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        mha = b + "MultiHeadDotProductAttention_1/"
        w |= {b + "LayerNorm_0/scale": r(DIM), b + "LayerNorm_0/bias": r(DIM),
              b + "LayerNorm_2/scale": r(DIM), b + "LayerNorm_2/bias": r(DIM),
              mha + "out/kernel": r(HEADS, dh, DIM), mha + "out/bias": r(DIM),
              b + "MlpBlock_3/Dense_0/kernel": r(DIM, 2 * DIM), b + "MlpBlock_3/Dense_0/bias": r(2 * DIM),
              b + "MlpBlock_3/Dense_1/kernel": r(2 * DIM, DIM), b + "MlpBlock_3/Dense_1/bias": r(DIM)}
        for n in ("query", "key", "value"):
            w |= {mha + f"{n}/kernel": r(DIM, HEADS, dh), mha + f"{n}/bias": r(HEADS, dh)}
    np.savez(path, **w)


def _model(path, image_size: int = 64, depth: int = 2):
    cfg = load_config("cremad_vanilla_mt", [f"model.dim={DIM}", f"model.encoder_depth={depth}",
                                            f"model.encoder_heads={HEADS}", "model.mlp_ratio=2.0",
                                            f"data.image_size={image_size}", f"model.pretrained={path}"])
    return build_model(cfg)


def test_npz_release_is_converted_as_timm_converts_it(tmp_path):
    path = tmp_path / "ViT-tiny.npz"
    _jax_npz(path)
    ours = read_vit_checkpoint(str(path))
    vit = _vit()
    _load_weights(vit, str(path))  # timm's own converter: the oracle
    theirs = vit.state_dict()
    assert {k for k in ours if not k.startswith("head")} <= set(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("fmt", [".pth", ".safetensors", ".npz"])
def test_every_format_loads_blocks_patches_and_resampled_positions(tmp_path, fmt, caplog):
    path = tmp_path / f"vit{fmt}"
    if fmt == ".npz":
        _jax_npz(path)
        vit = _vit()
        _load_weights(vit, str(path))
    else:
        vit = _vit()
        if fmt == ".pth":
            torch.save({"model": vit.state_dict()}, path)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    with caplog.at_level(logging.INFO, logger="rollingq.models"):
        model = _model(path, image_size=80)  # a 5x5 frame grid from the checkpoint's 4x4
    audio, visual = model.encoders
    for enc in (audio, visual):
        for i in range(2):
            torch.testing.assert_close(enc.blocks[i].attn.qkv.weight, vit.blocks[i].attn.qkv.weight, rtol=0, atol=0)
            torch.testing.assert_close(enc.blocks[i].mlp.fc2.bias, vit.blocks[i].mlp.fc2.bias, rtol=0, atol=0)
    torch.testing.assert_close(visual.embed.proj.weight, vit.patch_embed.proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(audio.embed.proj.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    grid = vit.pos_embed[:, 1:]  # the class position dropped
    want_frames = resample_abs_pos_embed(grid, new_size=[5, 5], old_size=[4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(visual.embed.pos.reshape(1, 25, DIM), want_frames)
    freq, time = audio.embed.freq // 16, audio.embed.time // 16  # CREMA-D (257, 188): a 16 x 11 grid
    want_audio = resample_abs_pos_embed(grid, new_size=[freq, time], old_size=[4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(audio.embed.pos, want_audio)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "audio encoder" in text and "visual encoder" in text
    assert text.count("loaded 29 tensor(s): blocks.0-1.*") == 2  # 2 blocks x 12, patch weight and bias, norm x 2, pos
    assert "patch_embed.proj.weight (summed over RGB for the 1-channel spectrogram)" in text
    assert "pos_embed (resampled 4x4 -> 5x5)" in text and "pos_embed (resampled 4x4 -> 16x11)" in text
    assert "not loaded (the encoder has 2 block(s)): blocks.2.*" in text
    assert "not loaded (the encoders have no class token" in text and "cls_token" in text


def test_a_checkpoint_without_qkv_bias_loads_as_zero_bias(tmp_path):
    vit = _vit(qkv_bias=False)  # like MIIL's ImageNet-21k ViT-B/16 (Ridnik et al., the paper's citation)
    path = tmp_path / "miil.pth"
    torch.save(vit.state_dict(), path)
    model = _model(path)
    qkv = model.encoders[1].blocks[0].attn.qkv
    assert torch.equal(qkv.bias, torch.zeros_like(qkv.bias))
    tokens = torch.randn(2, 5, DIM)
    torch.testing.assert_close(qkv(tokens), vit.blocks[0].attn.qkv(tokens))


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "weights.pth"
    with open(path, "wb") as f:
        pickle.dump({"blocks.0.attn.qkv.weight": _Payload(str(marker))}, f)
    with pytest.raises(PretrainedError, match=r"weights.pth' is not a plain tensor checkpoint and is not unpickled"):
        read_vit_checkpoint(str(path))
    assert not marker.exists()
    (tmp_path / "weights.pkl").write_bytes(path.read_bytes())
    with pytest.raises(PretrainedError, match="expected a .pth, .pt, .bin, .safetensors, .npz file, got .pkl"):
        read_vit_checkpoint(str(tmp_path / "weights.pkl"))
    assert not marker.exists()
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PretrainedError, match=r"cannot read .*garbage.safetensors"):
        read_vit_checkpoint(str(tmp_path / "garbage.safetensors"))


def test_a_wrong_width_names_the_tensor_and_the_settings(tmp_path):
    vit = _vit()
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    encoder = _model(path).encoders[0]
    with pytest.raises(PretrainedError, match=r"blocks.0.norm1.weight has shape \(32,\), the encoder expects \(16,\)"):
        load_vit_weights(encoder, {k: torch.cat([v, v]) for k, v in vit.state_dict().items()})


def test_the_paper_configs_warn_when_vit_b_trains_from_scratch(caplog):
    with caplog.at_level(logging.WARNING, logger="rollingq.models"):
        build_model(load_config("cremad_vanilla_mt", ["model.encoder_depth=1", "data.image_size=32",
                                                        "model.pretrained=null"]))
    assert any("ViT-B/16 encoders (model.dim=768, encoder_heads=12) train from scratch" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rollingq.models"):
        build_model(load_config("synthetic"))
    assert not [r for r in caplog.records if "from scratch" in r.getMessage()]
