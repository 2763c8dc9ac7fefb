"""patch_timm and plain_state_dict (rollingq_kernels.integrations.timm): whole timm models patched in place, with
several prefix tokens, any input size and key-only masks, exported so that plain timm loads them strictly."""

from __future__ import annotations

import copy

import pytest
import torch
from dropin_reference import assert_stats_match, class_row_reference

timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from rollingq_kernels import EvenSplit, FusedRollingQAttention  # noqa: E402
from rollingq_kernels.integrations.timm import patch_timm, plain_state_dict  # noqa: E402
from rollingq_kernels.rebalance import plane_rotation  # noqa: E402


def _vit(seed=0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5, dynamic_img_size=True)
    return VisionTransformer(**(args | kw)).eval()


def _images(seed, size=32, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw, query_token", [({}, "class"), ({"reg_tokens": 2}, "class"),
                                             ({"class_token": False, "reg_tokens": 1, "global_pool": "avg"},
                                              "first_prefix")])
def test_patched_model_equals_timm_at_any_size_with_the_prefix_out_of_the_statistics(kw, query_token):
    plain = _vit(**kw)
    model = copy.deepcopy(plain)
    layers = patch_timm(model, segments=EvenSplit(2), query_token=query_token)
    assert list(layers) == ["blocks.0.attn", "blocks.1.attn"]
    prefix = plain.num_prefix_tokens
    assert all(layer.num_prefix_tokens == prefix for layer in layers.values())
    for size in (32, 48):  # the patch count changes: the segments follow it
        x = _images(size, size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
        tokens = plain.patch_embed(x)  # the last block's input, for the reference statistics
        with torch.no_grad():
            h = plain.blocks[0](plain.norm_pre(plain._pos_embed(tokens)))
            q, k, _ = plain.blocks[1].attn.qkv(plain.blocks[1].norm1(h)).reshape(2, h.shape[1], 3, 3, 8).permute(
                2, 0, 3, 1, 4)
        n = h.shape[1] - prefix
        assert_stats_match(layers["blocks.1.attn"].last_stats,
                           class_row_reference(q, k, EvenSplit(2)(n), prefix, scale=8**-0.5))


def test_chosen_layers_and_clear_refusals():
    model = _vit()
    layers = patch_timm(model, segments=(8, 8), layers=[-1])
    assert list(layers) == ["blocks.1.attn"] and not isinstance(model.blocks[0].attn, FusedRollingQAttention)
    with pytest.raises(ValueError, match="layers: index 5 out of range for 2"):
        patch_timm(_vit(), segments=(8, 8), layers=[5])
    with pytest.raises(ValueError, match=r"no class token; pass query_token='first_prefix'"):
        patch_timm(_vit(class_token=False, reg_tokens=1, global_pool="avg"), segments=(8, 8))
    with pytest.raises(ValueError, match=r"no class or register token \(num_prefix_tokens=0\)"):
        patch_timm(_vit(class_token=False, global_pool="avg"), segments=(8, 8), query_token="first_prefix")
    with pytest.raises(ValueError, match="class_query_only"):
        patch_timm(_vit(), segments=(8, 8), class_query_only=True)


def test_plain_state_dict_loads_strictly_into_plain_timm_and_refuses_a_rotation():
    model = _vit(seed=1)
    layers = patch_timm(model, segments=EvenSplit(2))
    fresh = _vit(seed=2)
    result = fresh.load_state_dict(plain_state_dict(model), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(4)
    layers["blocks.0.attn"].apply_rotation(plane_rotation(torch.randn(24, generator=g), torch.randn(24, generator=g)))
    with pytest.raises(ValueError, match=r"'blocks.0.attn' holds a rotation \(num_rotations=1\)"):
        plain_state_dict(model)


def test_naflexvit_padding_gives_the_plain_output():
    """NaFlexViT's (B, 1, N, N) float masks (finfo.min) with 4 register tokens as the prefix."""
    torch.manual_seed(5)
    plain = timm.create_model("naflexvit_base_patch16_gap", embed_dim=32, depth=2, num_heads=2).eval()
    model = copy.deepcopy(plain)
    patch_timm(model, segments=EvenSplit(2), query_token="first_prefix")
    patches = torch.randn(2, 12, 16 * 16 * 3, generator=torch.Generator().manual_seed(6))
    coord = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(1, 12, 2)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 7:] = False
    with torch.no_grad():
        want = plain(patches, patch_coord=coord.expand(2, 12, 2), patch_valid=valid)
        got = model(patches, patch_coord=coord.expand(2, 12, 2), patch_valid=valid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
