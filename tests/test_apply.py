"""apply_rollingq (rollingq_kernels.apply): one call patches chosen layers of a small random timm or transformers
model in place; outputs equal the original's, statistics equal the float64 reference, the controller rotates
(issue 26 item 4)."""

from __future__ import annotations

import copy

import pytest
import torch
from dropin_reference import assert_stats_match, class_row_reference

from rollingq_kernels import EvenSplit, FusedRollingQAttention, RollingQ, apply_rollingq

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from transformers import AutoModel, BertConfig  # noqa: E402

PAPER_RULE = {"mode": "paper", "beta": 0.0, "window": 1}  # the bare rule: these tests check the wiring


def _train_a_step(model, forward, params):
    optimizer = torch.optim.SGD(params, lr=1e-2)
    model.train()
    forward(model).square().mean().backward()
    optimizer.step()
    model.eval()


def test_timm_model_in_one_call():
    torch.manual_seed(0)
    plain = timm.create_model("test_vit", pretrained=False, num_classes=4).eval()
    model = copy.deepcopy(plain)
    handle = apply_rollingq(model, segments=EvenSplit(2), layers=[-1], controller=PAPER_RULE)
    assert handle.library == "timm" and list(handle.layers) == ["blocks.5.attn"]
    assert isinstance(model.blocks[5].attn, FusedRollingQAttention) and isinstance(handle.controller, RollingQ)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    hidden = {}
    model.blocks[5].register_forward_pre_hook(lambda m, args: hidden.setdefault("h", args[0]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
        attn = model.blocks[5].attn
        q, k, _ = attn.qkv(model.blocks[5].norm1(hidden["h"])).reshape(2, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)
    assert_stats_match(handle.last_stats()["blocks.5.attn"], class_row_reference(q, k, (8, 8), scale=32**-0.5))
    _train_a_step(model, lambda m: m(x), list(model.parameters()))
    assert handle.statistics()["blocks.5.attn"].samples == 2
    (record,) = handle.controller.step(epoch=0)
    assert record.rotated and int(attn.num_rotations) == 1


def test_transformers_model_in_one_call():
    torch.manual_seed(2)
    config = BertConfig(vocab_size=53, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=37)
    plain = AutoModel.from_config(config, attn_implementation="sdpa").eval()
    model = copy.deepcopy(plain)
    handle = apply_rollingq(model, segments=EvenSplit(2), layers=[1], controller=PAPER_RULE)
    assert handle.library == "transformers" and list(handle.layers) == ["encoder.layer.1.attention.self"]
    attention = model.encoder.layer[1].attention.self
    assert attention.rollingq is handle.layers["encoder.layer.1.attention.self"]
    assert model.encoder.layer[0].attention.self.config._attn_implementation == "sdpa"  # unchosen: as before
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(3))
    hidden = {}
    attention.register_forward_pre_hook(lambda m, args: hidden.setdefault("h", args[0]))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, plain(input_ids=ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        q, k = (t.double().reshape(2, 9, 3, 8).transpose(1, 2) for t in (attention.query(hidden["h"]),
                                                                         attention.key(hidden["h"])))
    assert_stats_match(handle.last_stats()["encoder.layer.1.attention.self"],
                       class_row_reference(q, k, (4, 4), scale=8**-0.5))
    _train_a_step(model, lambda m: m(input_ids=ids).last_hidden_state, list(model.parameters()))
    (record,) = handle.controller.step(epoch=0)
    assert record.rotated and int(attention.rollingq.num_rotations) == 1
    with torch.no_grad():  # the rotation changes the patched layer's output
        assert not torch.allclose(model(input_ids=ids).last_hidden_state, plain(input_ids=ids).last_hidden_state,
                                  atol=1e-6)


def test_other_models_are_refused():
    with pytest.raises(TypeError, match="model: expected a timm or transformers model, got Linear"):
        apply_rollingq(torch.nn.Linear(2, 2), segments=(1, 1))
    with pytest.raises(ValueError, match="num_prefix_tokens: a timm model states its own"):
        apply_rollingq(timm.create_model("test_vit", pretrained=False), segments=EvenSplit(2), num_prefix_tokens=2)
