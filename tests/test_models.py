"""Models: every fusion head trains a step, probes stay detached, progressive stages, backbones, pretrained, OGM-GE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rollingq.build import build_model
from rollingq.config import load_config
from rollingq.models import FUSIONS, ModelOutput
from rollingq.ogm import modulate_gradients, ogm_coefficients
from timm.models.vision_transformer import VisionTransformer

TINY = ["data.synthetic.tokens=[5,7]", "data.synthetic.feature_dim=11", "data.num_classes=3", "model.dim=16",
        "model.encoder_depth=1", "model.encoder_heads=2", "model.modality=visual"]


def _inputs(batch: int = 6, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mods = [torch.randn(batch, 5, 11, generator=g), torch.randn(batch, 7, 11, generator=g)]
    return mods, torch.randint(0, 3, (batch,), generator=g)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_head_trains_one_step(fusion):
    torch.manual_seed(0)
    model = build_model(load_config("synthetic", TINY + [f"model.fusion={fusion}"]))
    mods, labels = _inputs()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(mods)
    assert isinstance(out, ModelOutput) and out.logits.shape == (6, 3) and len(out.probe_logits) == 2
    loss = F.cross_entropy(out.logits, labels) + sum(F.cross_entropy(p, labels) for p in out.probe_logits)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("head.") for k in changed)
    used = [1] if fusion == "unimodal" else [0, 1]
    for m in used:
        assert any(k.startswith(f"encoders.{m}.") for k in changed), (fusion, m)
    if fusion == "unimodal":  # the audio encoder only feeds its (detached) probe
        assert not any(k.startswith("encoders.0.") for k in changed)
    attention = fusion in ("vanilla_mt", "vanilla_mt_star")
    assert (out.stats is not None) == attention and (model.fusion_attention is not None) == attention
    if attention:
        assert out.stats.mass.shape == (6, 1, 3)


def test_probes_are_detached_from_the_encoders():
    model = build_model(load_config("synthetic", TINY))
    mods, labels = _inputs()
    out = model(mods)
    sum(F.cross_entropy(p, labels) for p in out.probe_logits).backward()
    assert all(p.grad is None for p in model.encoders.parameters())
    assert all(p.grad is not None for p in model.probes.parameters())


def test_encode_gives_tokens_per_modality():
    model = build_model(load_config("synthetic", TINY + ["model.fusion=concat"]))
    tokens = model.encode(_inputs()[0])
    assert [tuple(t.shape) for t in tokens] == [(6, 5, 16), (6, 7, 16)]
    with pytest.raises(ValueError, match="expected 2 tensors"):
        model.encode(_inputs()[0][:1])
    with pytest.raises(ValueError, match="FeatureEmbed"):
        model([torch.randn(2, 4, 11), torch.randn(2, 7, 11)])


def test_progressive_stages_of_vanilla_mt_star():
    model = build_model(load_config("synthetic", TINY + ["model.fusion=vanilla_mt_star"]))
    mods, labels = _inputs()
    first, second = model.fusion_attentions()
    model.set_stage(1)
    assert model.fusion_attention is first and not first.class_query_only
    F.cross_entropy(model(mods).logits, labels).backward()
    assert all(p.grad is None for p in model.head.blocks[1].parameters())
    model.zero_grad(set_to_none=True)
    model.set_stage(2)
    assert model.fusion_attention is second and second.class_query_only
    F.cross_entropy(model(mods).logits, labels).backward()
    assert all(p.grad is not None for p in model.head.blocks[1].parameters())
    with pytest.raises(ValueError, match="stage"):
        model.set_stage(3)


def test_rotation_buffers_are_in_the_state_dict():
    model = build_model(load_config("synthetic_rollingq", TINY))
    state = model.state_dict()
    assert "head.blocks.0.attn.rotation" in state and "head.blocks.0.attn.num_rotations" in state


def test_rollingq_needs_an_attention_fusion():
    with pytest.raises(ValueError, match="rollingq.enabled"):
        build_model(load_config("synthetic_rollingq", TINY + ["model.fusion=concat"]))
    with pytest.raises(ValueError, match="model.fusion"):
        build_model(load_config("synthetic", TINY + ["model.fusion=lstm"]))


@pytest.mark.parametrize("backbone", ["vit", "resnet18"])
def test_audio_visual_backbones(backbone, tmp_path):
    cfg = load_config("cremad_vanilla_mt", ["model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2",
                                            f"model.backbone={backbone}", "data.image_size=64", "data.num_frames=2",
                                            "model.pretrained=null"])
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    spec, frames = torch.randn(2, 257, 188, generator=g), torch.randn(2, 2, 3, 64, 64, generator=g)
    tokens = model.encode([spec, frames])
    expected_audio = 16 * 11 if backbone == "vit" else 9 * 6
    expected_visual = 2 * 16 if backbone == "vit" else 2 * 4
    assert [tuple(t.shape) for t in tokens] == [(2, expected_audio, 16), (2, expected_visual, 16)]
    assert model([spec, frames]).logits.shape == (2, 6)


@pytest.mark.parametrize("kind,shape", [("spectrogram", (37, 29)), ("frames", (2, 3, 41, 41))])
def test_resnet_shape_probe_leaves_batchnorm_statistics_alone(kind, shape):
    """Building ResNetEmbed probes the token count without touching BatchNorm's running statistics."""
    from rollingq.models.embeddings import ResNetEmbed

    embed = ResNetEmbed(kind, 16, shape)
    norms = [m for m in embed.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and embed.backbone.training
    for bn in norms:
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_pretrained_vit_weights_from_a_local_file(tmp_path):
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
    path = str(tmp_path / "vit.pt")
    torch.save(vit.state_dict(), path)
    cfg = load_config("cremad_vanilla_mt", ["model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2",
                                            "model.mlp_ratio=2.0", "data.image_size=32", f"model.pretrained={path}"])
    model = build_model(cfg)
    audio, visual = model.encoders
    assert torch.equal(visual.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert torch.equal(visual.embed.proj.weight, vit.patch_embed.proj.weight)
    assert torch.allclose(audio.embed.proj.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    bad = load_config("cremad_vanilla_mt", ["model.dim=32", "model.encoder_depth=1", "model.encoder_heads=2",
                                            "data.image_size=32", f"model.pretrained={path}"])
    with pytest.raises(ValueError, match="shape"):
        build_model(bad)
    missing = load_config("cremad_vanilla_mt", ["model.dim=16", "model.encoder_heads=2", "model.encoder_depth=1",
                                                "data.image_size=32", f"model.pretrained={tmp_path / 'nope.pt'}"])
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_model(missing)


def test_ogm_coefficients_slow_down_the_dominant_modality():
    labels = torch.tensor([0, 2, 1, 2, 0])
    strong = F.one_hot(labels, 3).double() * 9.0
    weak = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1
    coeffs = ogm_coefficients([strong, weak], labels, alpha=0.5)
    scores = [float(torch.softmax(x, 1).gather(1, labels[:, None]).sum()) for x in (strong, weak)]
    assert coeffs[1] == 1.0
    assert coeffs[0] == pytest.approx(1.0 - torch.tanh(torch.tensor(0.5 * scores[0] / scores[1])).item())
    encoders = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])
    for p in encoders.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    before = [p.grad.clone() for p in encoders[1].parameters()]
    modulate_gradients(encoders, [0.0, 1.0])
    assert all(torch.equal(p.grad, b) for p, b in zip(encoders[1].parameters(), before))
