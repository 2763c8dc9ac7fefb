"""A drop-in for timm (issue 15 item 1): one block of ``vit_tiny_patch16_224`` swapped, a plain timm state dict
loaded with ``strict=True``, the same numbers as timm, a few training steps and a rotation by the controller.

No download: the model is randomly initialized, its state dict saved and reloaded.
"""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from rollingq_kernels import FusedRollingQAttention, RollingQ  # noqa: E402

SEGMENTS = (98, 98)  # the 196 patches of a 224 image as two "modalities" (top and bottom half) after the class token


def _vit(seed: int):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5)


def _swapped(seed: int, **kw):
    vit = _vit(seed)
    block = vit.blocks[-1]
    block.attn = FusedRollingQAttention.from_timm(block.attn, segments=SEGMENTS, **kw)
    return vit


def test_a_swapped_timm_vit_loads_a_plain_timm_state_dict_strictly_and_computes_the_same(tmp_path):
    reference = _vit(seed=0).eval()
    path = tmp_path / "vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    vit = _swapped(seed=1)  # other random weights until the checkpoint is loaded
    result = vit.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    attn = vit.blocks[-1].attn
    assert isinstance(attn, FusedRollingQAttention) and attn.rotation_is_identity
    vit.eval()
    with torch.no_grad():
        torch.testing.assert_close(vit(images), reference(images), rtol=1e-4, atol=1e-5)
        # the layer alone against timm's Attention with the same weights
        tokens = reference.blocks[-1].norm1(torch.randn(2, 197, 192, generator=torch.Generator().manual_seed(2)))
        torch.testing.assert_close(attn(tokens), reference.blocks[-1].attn(tokens), rtol=1e-4, atol=1e-5)


def test_a_swapped_timm_vit_trains_and_the_controller_rotates(tmp_path):
    vit = _swapped(seed=3, window="epoch").train()
    attn = vit.blocks[-1].attn
    controller = RollingQ({"blocks.11.attn": attn}, mode="paper", beta=0.0, max_rotations=1)
    trained = [*vit.blocks[-1].parameters(), *vit.norm.parameters(), *vit.head.parameters()]
    vit.requires_grad_(False)  # fine-tune the swapped block and the head: the backward stops there (fast on CPU)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(trained, lr=1e-2)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 224, 224, generator=g)
    labels = torch.randint(0, 5, (2,), generator=g)
    first = vit.blocks[-1].attn.qkv.weight.detach().clone()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(vit(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert attn.qkv.weight.grad is not None and not torch.equal(attn.qkv.weight.detach(), first)
    assert attn.statistics.num_batches == 3
    (record,) = controller.step(epoch=0)
    assert record.rotated and record.count == 6 and int(attn.num_rotations) == 1
    assert not attn.rotation_is_identity

    # the rotation travels in the swapped model's state dict and changes the output
    vit.eval()
    path = tmp_path / "swapped.pth"
    torch.save(vit.state_dict(), path)
    again = _swapped(seed=5).eval()
    again.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again(images), vit(images), rtol=0, atol=1e-6)
        attn.reset_rotation()
        assert not torch.allclose(again(images), vit(images), atol=1e-6)


def test_timm_block_passes_a_key_padding_mask_as_lengths():
    """timm's Block hands ``attn_mask`` to the attention; a key-padding mask becomes the op's lengths."""
    vit = _swapped(seed=6).eval()
    block = vit.blocks[-1]
    tokens = torch.randn(3, 197, 192, generator=torch.Generator().manual_seed(7))
    lengths = torch.tensor([[98, 98], [40, 98], [0, 13]])
    keep = torch.ones(3, 197, dtype=torch.bool)
    for b, (a, c) in enumerate(lengths.tolist()):
        keep[b, 1 + a : 1 + 98] = False
        keep[b, 1 + 98 + c :] = False
    with torch.no_grad():
        by_mask = block(tokens, attn_mask=keep[:, None, None, :])
        with block.attn.using_lengths(lengths):
            by_context = block(tokens)
        additive = torch.zeros(3, 1, 1, 197).masked_fill(~keep[:, None, None, :], float("-inf"))
        by_float_mask = block(tokens, attn_mask=additive)
    torch.testing.assert_close(by_mask, by_context, rtol=0, atol=0)
    torch.testing.assert_close(by_float_mask, by_context, rtol=0, atol=0)
    not_a_suffix = keep.clone()
    not_a_suffix[1, 1] = False  # a hole at the start of modality 0
    with pytest.raises(ValueError, match="attn_mask: the masked keys of modality 0 are not the end"):
        block(tokens, attn_mask=not_a_suffix)
    causal = torch.ones(197, 197, dtype=torch.bool).tril().expand(3, 1, 197, 197)  # truly query-dependent
    with pytest.raises(ValueError, match="key-padding masks only"):
        block(tokens, attn_mask=causal)
    with pytest.raises(ValueError, match="is_causal"):
        block(tokens, is_causal=True)


def test_without_segments_the_error_says_how_to_set_them():
    layer = FusedRollingQAttention(16, num_heads=2)
    with pytest.raises(ValueError, match=r"segments: not set; .*set_segments\(\)"):
        layer(torch.randn(2, 9, 16))
    layer.set_segments((5, 3))
    assert layer(torch.randn(2, 9, 16)).shape == (2, 9, 16)
    assert layer(torch.randn(2, 7, 16), segments=(3, 3)).shape == (2, 7, 16)  # a call's own segments win
