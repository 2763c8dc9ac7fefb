"""``rollingq.mode: official`` and ``model.fusion_block: official`` against the official code's steps, written out.

The reference below is plain torch, written from the description of GeWu-Lab/RollingQ_ICML2025 in
``shared/notes.md`` (none of its code): at the end of each training epoch,

1. AIR = mean over the *last training batch* of cos(q_cls, mean audio key) − cos(q_cls, mean visual key);
2. if ``|AIR| > beta`` (strict; beta 0) and fewer than ``r_time`` rotations were made (no accuracy guard,
   from the first epoch on): an eval-mode, no-grad pass over the training loader; per batch the mean over
   samples of each sample's mean key per modality, and the mean class query; then the *unweighted* mean of
   those batch means;
3. α = (1 + tanh(−σ·AIR)) / 2 with σ = 0 (so α = ½); target = α·â + (1 − α)·v̂, rescaled to |E[q]|;
4. W = U Vᵀ from the SVD of Y Xᵀ (X = E[q], Y = target, both normalised), the last column of U negated
   when det < 0, all in float32;
5. R ← W @ R, and the class query is rotated as ``q_cls @ Rᵀ`` before the scores are scaled by 1/√d;
6. the fusion is attention (q, k, v with biases, one head of width d, dropout on the probabilities),
   ``fc``, a dropout, and the classifier on the class row: no LayerNorm, residual or MLP; the class
   token is ``trunc_normal_(std=0.02)``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from official_reference import official_svd_rotation
from rollingq.config import load_config, packaged_config_dir
from rollingq.models.fusion import AttentionFusion
from rollingq.records import read_metrics
from rollingq.train import train
from torch import nn

from rollingq_kernels.controller import RollingQ
from rollingq_kernels.module import FusedRollingQAttention
from rollingq_kernels.rebalance import plane_rotation, rescaled_anchor, svd_rotation
from rollingq_kernels.settings import RollingQSettings

D, LA, LV = 32, 7, 5
F32 = torch.float32


# ---------------------------------------------------------------------------- the official steps, written out
def ref_qkv(x: torch.Tensor, layer: FusedRollingQAttention, R: torch.Tensor):
    """q_cls (rotated as q_cls @ R^T), k, v of the official MultiHeadAttention (one head)."""
    qkv = x @ layer.qkv.weight.T + layer.qkv.bias
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    return q[:, 0] @ R.T, k, v


def ref_air(x, layer, R) -> torch.Tensor:
    q, k, _ = ref_qkv(x, layer, R)
    cos = torch.nn.functional.cosine_similarity
    return (cos(q, k[:, 1 : 1 + LA].mean(1)) - cos(q, k[:, 1 + LA :].mean(1))).mean()


def ref_estimate(loader, layer, R):
    """Per batch: mean over samples of the per-sample mean keys, mean query; then the mean over batches."""
    ka, kv, qs = [], [], []
    for x in loader:
        q, k, _ = ref_qkv(x, layer, R)
        ka.append(k[:, 1 : 1 + LA].mean(1).mean(0))
        kv.append(k[:, 1 + LA :].mean(1).mean(0))
        qs.append(q.mean(0))
    return torch.stack(ka).mean(0), torch.stack(kv).mean(0), torch.stack(qs).mean(0)


def ref_target(avg_a, avg_v, query, air, sigma=0.0):
    alpha = (1 + torch.tanh(-sigma * air)) / 2
    target = alpha * (avg_a / avg_a.norm()) + (1 - alpha) * (avg_v / avg_v.norm())
    return target * query.norm() / target.norm(), alpha


def ref_fusion_logits(tokens, fusion: AttentionFusion):
    """The official AttnFusion in eval mode: [cls, a, v] -> attention (class row) -> fc -> classifier."""
    layer = fusion.blocks[0].attn
    seq = torch.cat([fusion.cls.expand(tokens[0].shape[0], -1, -1), *tokens], dim=1)
    q, k, v = ref_qkv(seq, layer, layer.rotation.to(seq.dtype))
    attn = torch.softmax((q[:, None] @ k.transpose(1, 2)) / math.sqrt(D), dim=-1)
    out = (attn @ v)[:, 0] @ layer.proj.weight.T + layer.proj.bias
    return fusion.head(out)


# ---------------------------------------------------------------------------- inputs
def _layer(seed=1) -> FusedRollingQAttention:
    torch.manual_seed(seed)
    return FusedRollingQAttention(D, num_heads=1, qkv_bias=True, class_query_only=True, backend="reference").train()


def _batch(B: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1 + LA + LV, D, generator=g)
    x[:, 1 : 1 + LA] += torch.randn(D, generator=torch.Generator().manual_seed(99)) + shift  # a biased modality
    return x


def _epoch(layer, seeds):
    for s in seeds:
        layer(_batch(5, s), [LA, LV])
    return _batch(5, seeds[-1])


# ---------------------------------------------------------------------------- the controller
def test_official_mode_follows_the_official_steps_over_two_rotations():
    layer = _layer()
    ctl = RollingQ(layer, mode="official", max_rotations=2)
    loader = [_batch(b, 50 + i, shift=0.1 * i) for i, b in enumerate((4, 4, 3))]  # unequal batches
    forward = lambda x: layer(x, [LA, LV])  # noqa: E731
    for epoch, seeds in ((0, [1, 2, 3]), (1, [4, 5, 6])):
        R_old = layer.rotation.clone()
        last = _epoch(layer, seeds)
        with torch.no_grad():
            air = ref_air(last, layer, R_old)
            avg_a, avg_v, query = ref_estimate(loader, layer, R_old)
            target, alpha = ref_target(avg_a, avg_v, query, air)
            W = official_svd_rotation(query, target)
        layer.eval()
        # accuracy at chance: the official code has no guard
        (rec,) = ctl.step(epoch, loader, forward, accuracy=0.1, majority=0.5, loss=2.0)
        layer.train()
        assert rec.action == "rotate" and rec.num_rotations == epoch + 1
        assert rec.air == pytest.approx(float(air), abs=1e-6) and rec.alpha == [0.5, 0.5] and float(alpha) == 0.5
        R_b = layer.rotation.double() @ R_old.double().T  # R <- R_b @ R: what this step composed
        xh, yh = query.double() / query.double().norm(), target.double() / target.double().norm()
        torch.testing.assert_close(R_b @ xh, yh, rtol=0, atol=2e-5)  # E[q] onto the official target
        torch.testing.assert_close(R_b @ xh, W.double() @ xh, rtol=0, atol=2e-5)  # as the official W does
        torch.testing.assert_close(R_b @ R_b.T, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-5)
        x = _batch(3, 77)
        with torch.no_grad():
            q, k, v = ref_qkv(x, layer, layer.rotation)
            want = (torch.softmax(q[:, None] @ k.transpose(1, 2) / math.sqrt(D), -1) @ v)[:, 0]
            want = want @ layer.proj.weight.T + layer.proj.bias
            got = layer.eval()(x, [LA, LV])[:, 0]
        layer.train()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # q_cls @ R^T before the 1/sqrt(d) scaling


def test_the_svd_is_fed_the_official_x_and_y_in_float32():
    g = torch.Generator().manual_seed(3)
    avg_a, avg_v, query = (torch.randn(D, generator=g) for _ in range(3))
    target, _ = ref_target(avg_a, avg_v, query, torch.tensor(0.3))
    ours = rescaled_anchor(torch.stack([avg_a, avg_v]), query, torch.tensor([0.5, 0.5]), F32)
    assert ours.dtype == F32 and torch.equal(ours, target)  # the official Y, bit for bit
    assert float(ours.norm()) == pytest.approx(float(query.norm()), rel=1e-6)  # rescaled to |E[q]|
    W = svd_rotation(query, target, F32)
    assert W.dtype == F32 and torch.equal(W, official_svd_rotation(query, target))  # the official W, bit for bit
    assert RollingQSettings.preset("official").rotation_dtype(F32) == F32


def test_official_mode_rotates_only_when_air_exceeds_beta_strictly():
    """Identical modalities: AIR is exactly 0; official (|AIR| > 0) waits, the paper rule (|AIR| >= 0) rotates."""
    records = {}
    for mode in ("official", "paper"):
        layer = _layer()
        ctl = RollingQ(layer, mode=mode, beta=0.0)
        x = _batch(5, 1)
        x = torch.cat([x[:, :1], x[:, 1:6], x[:, 1:6]], dim=1)
        layer(x, [5, 5])
        layer.eval()
        (records[mode],) = ctl.step(0, [x], lambda b, layer=layer: layer(b, [5, 5]))
    assert records["official"].air == 0.0 and records["official"].reason == "below_threshold"
    assert records["paper"].rotated


def test_official_mode_has_no_safety_rule():
    """The avdigits case (cos -0.9 with both mean keys) is refused by default and rotated in official mode."""
    dim = 6
    layer = FusedRollingQAttention(dim, num_heads=1, qkv_bias=True, class_query_only=True, backend="reference")
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.cat([torch.eye(dim)] * 3))
        layer.qkv.bias.zero_()
    x = torch.zeros(4, 1 + 3 + 3, dim)
    x[:, 0, 0] = 1.0
    x[:, 1:4, 0], x[:, 1:4, 1] = -0.9, math.sqrt(0.19)
    x[:, 4:, 0], x[:, 4:, 2] = -0.9, math.sqrt(0.19)
    x[:, 1:, 3] = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * 0.1
    for mode, action in (("safe", "refuse"), ("official", "rotate")):
        layer.reset_rotation()
        ctl = RollingQ(layer, mode=mode, beta=0.0)
        layer.train()(x, [3, 3])
        layer.eval()
        (rec,) = ctl.step(1, [x], lambda b: layer(b, [3, 3]))
        assert rec.action == action, (mode, rec.reason)


# ---------------------------------------------------------------------------- the bare official fusion
def test_the_official_fusion_block_is_attention_fc_and_classifier():
    torch.manual_seed(7)
    expected_cls = nn.init.trunc_normal_(torch.zeros(1, 1, D), std=0.02)
    torch.manual_seed(7)
    fusion = AttentionFusion(D, 5, 2, layers=1, heads=1, mlp_ratio=2.0, attn_drop=0.2, drop=0.0,
                             rotation_mode="global", backend="reference", block="official")
    assert torch.equal(fusion.cls.detach(), expected_cls)  # trunc_normal_(std=0.02), drawn first
    assert not any(isinstance(m, (nn.LayerNorm, nn.Sequential)) for m in fusion.modules())  # no LayerNorm, no MLP
    attn = fusion.blocks[0].attn
    assert attn.attn_drop_p == 0.2 and attn.proj_drop.p == 0.2  # one dropout rate, probabilities and output
    g = torch.Generator().manual_seed(8)
    tokens = [torch.randn(3, LA, D, generator=g), torch.randn(3, LV, D, generator=g)]
    with torch.no_grad():
        attn.apply_rotation(plane_rotation(torch.randn(D, generator=g), torch.randn(D, generator=g)))
        fusion.eval()
        logits, _ = fusion(tokens)
        torch.testing.assert_close(logits, ref_fusion_logits(tokens, fusion), rtol=0, atol=1e-5)
    prenorm = AttentionFusion(D, 5, 2, layers=1, heads=1, mlp_ratio=2.0, attn_drop=0.2, drop=0.0,
                              rotation_mode="global", backend="reference")
    assert any(isinstance(m, nn.LayerNorm) for m in prenorm.modules())


# ---------------------------------------------------------------------------- configs and the trainer
def test_every_rollingq_dataset_config_has_an_official_sibling():
    names = sorted(f[:-5] for f in os.listdir(packaged_config_dir())
                   if f.endswith("_vanilla_mt_rollingq.yaml") or f == "synthetic_rollingq.yaml")
    assert len(names) == 5
    for name in names:
        cfg = load_config(name + "_official")
        deviations = cfg.rollingq.settings().deviations("official")
        assert cfg.rollingq.enabled and cfg.rollingq.mode == "official"
        assert deviations == ({"max_rotations": (3, 1)} if name.startswith("kinetics") else {}), name
        assert (cfg.model.fusion_block, cfg.model.fusion_heads, cfg.model.attn_drop) == ("official", 1, 0.2), name
        assert cfg.data.name == load_config(name).data.name


def test_the_trainer_runs_the_official_mode(tmp_path):
    cfg = load_config("synthetic_rollingq_official", [
        "data.synthetic.sizes.train=67", "data.synthetic.sizes.val=23", "data.synthetic.sizes.test=19",
        "data.num_classes=3", "model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2",
        "train.batch_size=16", "train.num_threads=1", "train.progress=false", "train.epochs=2"])
    rows = read_metrics(os.path.join(train(cfg, str(tmp_path / "run")), "metrics.jsonl"))
    (first,), (second,) = rows[0]["rollingq"], rows[1]["rollingq"]
    assert first["action"] == "rotate" and first["alpha"] == [0.5, 0.5] and first["count"] == 3  # the last batch
    assert (second["action"], second["reason"]) == ("wait", "max_rotations")
