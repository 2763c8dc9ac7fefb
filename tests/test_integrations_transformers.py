"""attn_implementation="rollingq" (rollingq_kernels.integrations.transformers): tiny random ViT and BERT built from
configs (no download) equal their SDPA twins, and the statistics read after a forward equal the float64 reference
(issue 26 item 3)."""

from __future__ import annotations

import pytest
import torch
from dropin_reference import assert_stats_match, class_row_reference

transformers = pytest.importorskip("transformers")

from transformers import AutoModel, BertConfig, ViTConfig  # noqa: E402

from rollingq_kernels import EvenSplit  # noqa: E402
from rollingq_kernels.integrations.transformers import rollingq_layout  # noqa: E402


def _vit_config():
    return ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37, image_size=24,
                     patch_size=8)


def _bert_config(**kw):
    return BertConfig(vocab_size=53, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                      intermediate_size=37, **kw)


def _twins(config_fn, seed=0):
    torch.manual_seed(seed)
    sdpa = AutoModel.from_config(config_fn(), attn_implementation="sdpa").eval()
    ours = AutoModel.from_config(config_fn(), attn_implementation="rollingq").eval()
    ours.load_state_dict(sdpa.state_dict())
    return sdpa, ours


def _qk(attention, hidden):
    """The float64 q, k of a transformers attention module for its input ``hidden``."""
    q_proj = getattr(attention, "q_proj", None) or attention.query
    k_proj = getattr(attention, "k_proj", None) or attention.key
    B, N, _ = hidden.shape
    q, k = (t.double().reshape(B, N, 3, 8).transpose(1, 2) for t in (q_proj(hidden), k_proj(hidden)))
    return q, k


def test_vit_with_rollingq_attention_equals_sdpa_and_its_statistics_the_reference():
    sdpa, ours = _twins(_vit_config)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    inputs = {}
    ours.layers[1].attention.register_forward_pre_hook(lambda m, args: inputs.setdefault("h", args[0]))
    with torch.no_grad():
        want = sdpa(x).last_hidden_state
        with rollingq_layout(segments=EvenSplit(2)) as run:  # segments through a context
            got = ours(x).last_hidden_state
        by_kwargs = ours(x, rollingq_segments=(5, 4)).last_hidden_state  # or through the model's kwargs
        q, k = _qk(ours.layers[1].attention, inputs["h"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_kwargs, want, rtol=1e-5, atol=1e-5)
    assert len(run.stats) == 2 and run.modules[1] is ours.layers[1].attention
    assert_stats_match(run.stats[1], class_row_reference(q, k, (5, 4), scale=8**-0.5))


def test_bert_padding_mask_becomes_lengths():
    sdpa, ours = _twins(_bert_config, seed=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 53, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        want = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
        with rollingq_layout(segments=EvenSplit(2)) as run:
            got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert run.stats[0].tokens.tolist() == [[5.0, 5.0], [5.0, 1.0], [3.0, 0.0]]


def test_without_segments_or_for_a_decoder_the_error_says_what_to_do():
    _, ours = _twins(_vit_config)
    with pytest.raises(ValueError, match="segments: not set for the 'rollingq' attention; use .*rollingq_layout"):
        ours(torch.randn(1, 3, 24, 24))
    torch.manual_seed(4)
    decoder = AutoModel.from_config(_bert_config(is_decoder=True), attn_implementation="rollingq").eval()
    with pytest.raises(ValueError, match="causal attention is not supported"):
        decoder(input_ids=torch.randint(0, 53, (1, 5)), rollingq_segments=(2, 2))


def test_from_pretrained_with_attn_implementation_rollingq(tmp_path):
    """A checkpoint saved locally (no download) loads with attn_implementation="rollingq" and computes the same."""
    sdpa, _ = _twins(_vit_config, seed=5)
    sdpa.save_pretrained(tmp_path)
    ours = AutoModel.from_pretrained(tmp_path, attn_implementation="rollingq").eval()
    assert ours.config._attn_implementation == "rollingq"
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, rollingq_segments=EvenSplit(2)).last_hidden_state,
                                   sdpa(x).last_hidden_state, rtol=1e-5, atol=1e-5)
