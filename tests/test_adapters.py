"""from_timm (rollingq_kernels.adapters): the footgun refused, the projections kept, any prefix and any size, a leaf
of timm's FX tracer, TorchScript (issue 26 items 1 and 2)."""

from __future__ import annotations

import pytest
import torch
from dropin_reference import assert_stats_match, class_row_reference

timm = pytest.importorskip("timm")

from timm.layers import Attention  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

from rollingq_kernels import EvenSplit, FusedRollingQAttention  # noqa: E402

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _attention(dim=24, heads=3, seed=0, dtype=torch.float32) -> Attention:
    torch.manual_seed(seed)
    return Attention(dim, num_heads=heads, qkv_bias=True).to(dtype).eval()


def test_class_query_only_is_refused_because_a_block_reads_every_token():
    with pytest.raises(ValueError, match=r"class_query_only: .*Block adds the output to every token"):
        FusedRollingQAttention.from_timm(_attention(), segments=(4, 4), class_query_only=True)


def test_from_timm_keeps_the_projection_modules_and_their_parameters():
    attn = _attention()
    attn.qkv.weight.requires_grad_(False)
    layer = FusedRollingQAttention.from_timm(attn, segments=EvenSplit(2))
    assert layer.qkv is attn.qkv and layer.proj is attn.proj
    assert not layer.qkv.weight.requires_grad  # a frozen weight stays frozen
    optimizer = torch.optim.SGD(attn.parameters(), lr=0.1)  # built before the swap: it still trains the layer
    before = layer.proj.weight.detach().clone()
    layer(torch.randn(2, 9, 24, generator=_gen(1))).square().sum().backward()
    optimizer.step()
    assert not torch.equal(layer.proj.weight, before)


@pytest.mark.parametrize("prefix", [1, 2, 4])
def test_any_prefix_and_any_size_equals_timm_with_statistics_of_the_modalities_only(prefix):
    attn = _attention(dtype=F64)
    layer = FusedRollingQAttention.from_timm(attn, segments=EvenSplit(2), num_prefix_tokens=prefix,
                                             backend="reference")
    for n in (7, 12):  # another input size: the segments follow it
        x = torch.randn(3, prefix + n, 24, generator=_gen(n), dtype=F64)
        torch.testing.assert_close(layer(x), attn(x), rtol=0, atol=1e-12)
        q, k, _ = attn.qkv(x).reshape(3, prefix + n, 3, 3, 8).permute(2, 0, 3, 1, 4)
        assert_stats_match(layer.last_stats, class_row_reference(q, k, EvenSplit(2)(n), prefix, scale=attn.scale))


def test_a_naflex_style_mask_gives_timms_output_on_the_valid_tokens():
    """timm's NaFlexViT passes a (B, 1, N, N) float mask holding finfo.min, whose padded rows mask everything."""
    attn = _attention()
    layer = FusedRollingQAttention.from_timm(attn, segments=EvenSplit(2), num_prefix_tokens=2)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, 9:] = False
    pair = valid[:, :, None] & valid[:, None, :]
    mask = torch.zeros(2, 1, 12, 12).masked_fill(~pair[:, None], torch.finfo(torch.float32).min)
    x = torch.randn(2, 12, 24, generator=_gen(3))
    with torch.no_grad():
        got, want = layer(x, attn_mask=mask), attn(x, attn_mask=mask)
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-6)
        assert torch.equal(got, layer(x, attn_mask=mask > -1))  # the same mask as a bool: the same output
    assert layer.last_stats.tokens.tolist() == [[5.0, 2.0], [5.0, 5.0]]


def test_timm_fx_traces_a_block_with_the_layer_as_a_leaf():
    from timm.models._features_fx import create_feature_extractor, get_notrace_modules

    torch.manual_seed(4)
    block = Block(24, num_heads=3, qkv_bias=True).eval()
    block.attn = FusedRollingQAttention.from_timm(block.attn, segments=EvenSplit(2))
    assert FusedRollingQAttention in get_notrace_modules()
    traced = create_feature_extractor(block, return_nodes=["add_1"])
    x = torch.randn(2, 11, 24, generator=_gen(5))
    with torch.no_grad():
        torch.testing.assert_close(traced(x)["add_1"], block(x), rtol=0, atol=0)


def test_torchscript_scripts_a_block_and_runs_the_layer():
    torch.manual_seed(6)
    block = Block(24, num_heads=3, qkv_bias=True)
    attn = block.attn = FusedRollingQAttention.from_timm(block.attn, segments=EvenSplit(2))
    scripted = torch.jit.script(block)
    scripted.eval()  # after scripting: the layer runs in the scripted module's mode
    x = torch.randn(2, 11, 24, generator=_gen(7))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), block.eval()(x), rtol=0, atol=0)
    assert attn.statistics.num_batches == 0 and attn.last_stats is not None  # eval calls: no window
    scripted.train()
    y = scripted(x)
    y.square().sum().backward()
    assert attn.statistics.num_batches == 1 and attn.qkv.weight.grad is not None


def test_a_layer_on_the_meta_device_runs_like_timms():
    """timm's config tests build models on the meta device and run them: no value check may read a meta tensor."""
    with torch.device("meta"):
        attn = Attention(24, num_heads=3, qkv_bias=True)
    layer = FusedRollingQAttention.from_timm(attn, segments=EvenSplit(2))
    assert layer.rotation.device.type == "meta"
    out = layer(torch.randn(2, 9, 24, device="meta"))
    assert out.shape == (2, 9, 24) and out.device.type == "meta"
