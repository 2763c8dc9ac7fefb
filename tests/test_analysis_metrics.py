"""Known-answer tests of the evaluation's metrics, corruptions and the evaluate_model pipeline."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from rollingq.analysis import metrics
from rollingq.analysis.noise import (
    RunningMoments,
    add_gaussian_noise,
    per_sample_moments,
    replace_with_noise,
    replaced_mask,
)
from rollingq.evaluate import collect_outputs, evaluate_model, summarize
from torch import nn

from rollingq_kernels import rollingq_attention

# ----------------------------------------------------------------------------- metrics


def test_accuracy_and_macro_f1_hand_built():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    assert metrics.accuracy(pred, target) == pytest.approx(5 / 7)
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2: tp 2 fp 1 fn 0 -> 4/5
    assert metrics.macro_f1(pred, target) == pytest.approx((0.8 + 0.5 + 0.8) / 3)
    logits = torch.nn.functional.one_hot(pred, 5).double() + 0.01 * torch.rand(7, 5, dtype=torch.float64)
    assert metrics.accuracy(logits, target) == pytest.approx(5 / 7)
    # a predicted class absent from the labels scores 0 and counts; classes never seen are left out
    assert metrics.macro_f1(torch.tensor([3, 0]), torch.tensor([0, 0])) == pytest.approx((2 / 3 + 0.0) / 2)


def test_macro_f1_matches_a_float64_definition_on_random_labels():
    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, 7, (211,), generator=gen)
    pred = torch.where(torch.rand(211, generator=gen) < 0.6, target, torch.randint(0, 7, (211,), generator=gen))
    f1s = []
    for c in range(7):
        tp = ((pred == c) & (target == c)).double().sum()
        precision = tp / (pred == c).double().sum()
        recall = tp / (target == c).double().sum()
        f1s.append(float(2 * precision * recall / (precision + recall)))
    assert metrics.macro_f1(pred, target) == pytest.approx(sum(f1s) / 7, abs=1e-12)


def test_metric_errors_name_the_problem():
    with pytest.raises(ValueError, match="same length"):
        metrics.accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="integer labels"):
        metrics.accuracy(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="probe logits"):
        metrics.probe_accuracies([torch.rand(3, 2)], torch.tensor([0, 1, 1]), ["audio", "visual"])


def test_probe_accuracies_per_modality():
    target = torch.tensor([0, 1, 2, 1, 0])
    good = torch.nn.functional.one_hot(target, 3).float() + 0.1 * torch.rand(5, 3)
    bad = torch.nn.functional.one_hot(torch.tensor([1, 1, 1, 1, 1]), 3).float()
    assert metrics.probe_accuracies([good, bad], target, ["audio", "visual"]) == {
        "audio": pytest.approx(1.0),
        "visual": pytest.approx(2 / 5),
    }


def test_modality_mass_key_norms_and_air():
    gen = torch.Generator().manual_seed(5)
    raw = torch.rand(7, 3, 4, generator=gen, dtype=torch.float64) + 0.1
    mass = raw / raw.sum(-1, keepdim=True)
    per_sample = metrics.modality_mass(mass)
    assert per_sample.shape == (7, 4)
    torch.testing.assert_close(per_sample, mass.mean(1))
    torch.testing.assert_close(per_sample.sum(1), torch.ones(7, dtype=torch.float64))
    means = metrics.mean_mass_by_modality(mass, ["a", "b", "c"])
    assert list(means) == ["class", "a", "b", "c"]
    assert means["b"] == pytest.approx(float(mass[:, :, 2].mean()))

    key_mean = torch.randn(5, 3, 2, 11, generator=gen, dtype=torch.float64)
    expected = torch.stack([key_mean[:, :, m, :].reshape(5, -1).norm(dim=1) for m in range(2)], dim=1)
    torch.testing.assert_close(metrics.key_norms(key_mean), expected)

    cos = torch.tensor([[0.9, 0.1], [0.5, 0.7], [0.3, -0.2]])
    assert metrics.air(cos) == pytest.approx(((0.8) + (-0.2) + 0.5) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="mass must have shape"):
        metrics.modality_mass(torch.rand(3, 2))


def _point_biserial(b: float, sigma: float, share: float) -> float:
    """r between a Bernoulli(share) indicator X and Y = c − b·X + sigma·ε."""
    var_x = share * (1 - share)
    return -b * math.sqrt(var_x) / math.sqrt(b * b * var_x + sigma * sigma)


@pytest.mark.parametrize("b, sigma", [(0.3, 0.1), (0.05, 0.2), (0.2, 0.0)])
def test_pearson_of_an_attention_that_drops_the_replaced_modality(b, sigma):
    n = 20011
    replaced = replaced_mask(n, seed=11)
    gen = torch.Generator().manual_seed(12)
    mass = 0.6 - b * replaced.double() + sigma * torch.randn(n, generator=gen, dtype=torch.float64)
    corr = metrics.quality_attention_correlation(replaced, mass)
    expected = _point_biserial(b, sigma, n // 2 / n)
    assert corr.r_replaced == pytest.approx(expected, abs=0.015)
    assert corr.r_quality == pytest.approx(-corr.r_replaced)
    assert corr.p_value < 1e-10
    assert (corr.num_samples, corr.num_replaced) == (n, n // 2)


def test_pearson_of_an_attention_that_ignores_the_noise_is_near_zero():
    n = 4001
    replaced = replaced_mask(n, seed=2)
    mass = 0.7 + 0.05 * torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    corr = metrics.quality_attention_correlation(replaced, mass)
    assert abs(corr.r_quality) < 4 / math.sqrt(n)
    assert corr.p_value > 1e-4
    constant = metrics.quality_attention_correlation(replaced, torch.full((n,), 0.5, dtype=torch.float64))
    assert constant.r_quality is None and constant.p_value is None
    with pytest.raises(ValueError, match="both replaced and clean"):
        metrics.quality_attention_correlation(torch.zeros(5, dtype=torch.bool), torch.rand(5))


def test_mean_std():
    mean, std, count = metrics.mean_std([0.5, None, 0.7, 0.9])
    assert (mean, count) == (pytest.approx(0.7), 3)
    assert std == pytest.approx(0.2)
    assert metrics.mean_std([0.3]) == (pytest.approx(0.3), 0.0, 1)
    assert metrics.mean_std([None]) == (None, None, 0)


# ----------------------------------------------------------------------------- noise


def test_replace_with_noise_keeps_each_samples_moments_and_drops_its_content():
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 2.0, 7.0]).reshape(3, 1, 1)
    offset = torch.tensor([-3.0, 0.2, 5.0]).reshape(3, 1, 1)
    x = torch.randn(3, 97, 53, generator=gen) * scale + offset
    y = replace_with_noise(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    mx, sx = per_sample_moments(x)
    my, sy = per_sample_moments(y)
    torch.testing.assert_close(my, mx, atol=0.05 * float(sx.max()), rtol=0)
    torch.testing.assert_close(sy, sx, rtol=0.03, atol=0)
    for b in range(3):  # the noise is independent of the input
        r = torch.corrcoef(torch.stack([x[b].flatten(), y[b].flatten()]).double())[0, 1]
        assert abs(float(r)) < 0.05
    again = replace_with_noise(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, y, rtol=0, atol=0)


def test_replace_with_noise_mask_leaves_other_samples_untouched():
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    mask = torch.tensor([True, False, False, True, False])
    y = replace_with_noise(x, torch.Generator().manual_seed(4), mask)
    torch.testing.assert_close(y[~mask], x[~mask], rtol=0, atol=0)
    assert not torch.isclose(y[mask], x[mask]).any()
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        replace_with_noise(x, torch.Generator(), mask[:3])


def test_add_gaussian_noise_has_the_requested_std():
    x = torch.randn(13, 101, 31, dtype=torch.float64) + 4.0
    for level in (0.25, 1.0):
        y = add_gaussian_noise(x, level, 3.0, torch.Generator().manual_seed(2))
        diff = y - x
        assert float(diff.mean()) == pytest.approx(0.0, abs=0.02 * level * 3.0)
        assert float(diff.std()) == pytest.approx(level * 3.0, rel=0.02)
    torch.testing.assert_close(add_gaussian_noise(x, 0.0, 3.0, torch.Generator()), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="split_std must be > 0"):
        add_gaussian_noise(x, 0.5, 0.0, torch.Generator())
    with pytest.raises(ValueError, match="level must be >= 0"):
        add_gaussian_noise(x, -0.5, 1.0, torch.Generator())


def test_replaced_mask_is_a_seeded_half():
    a = replaced_mask(101, seed=3)
    assert a.dtype == torch.bool and a.shape == (101,) and int(a.sum()) == 50
    assert torch.equal(a, replaced_mask(101, seed=3))
    assert not torch.equal(a, replaced_mask(101, seed=4))


def test_running_moments_match_float64_over_the_split():
    parts = [torch.randn(n, 3, 5, dtype=torch.float64) * 0.01 + 1e4 for n in (7, 1, 13)]
    moments = RunningMoments()
    for p in parts:
        moments.update(p.float())
    full = torch.cat([p.float().double() for p in parts])
    assert moments.mean == pytest.approx(float(full.mean()), rel=1e-12)
    assert moments.std == pytest.approx(float(full.std(unbiased=False)), rel=1e-6)


# ----------------------------------------------------------------------------- evaluate_model on a tiny model


class TinyFusion(nn.Module):
    """A one-layer class-query fusion over two token modalities, with detached probes.

    ``head_uses`` picks what the classifier reads: "fusion" (the attention output) or an int m
    (the mean token of modality m only: the model ignores the other modality).
    """

    def __init__(self, feat: int, dim: int, classes: int, head_uses: str | int = "fusion") -> None:
        super().__init__()
        self.enc = nn.ModuleList([nn.Linear(feat, dim) for _ in range(2)])
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, classes)
        self.probes = nn.ModuleList([nn.Linear(dim, classes) for _ in range(2)])
        self.head_uses = head_uses

    def forward(self, modalities: list[torch.Tensor]) -> SimpleNamespace:
        feats = [enc(x) for enc, x in zip(self.enc, modalities, strict=True)]
        tokens = torch.cat([self.cls.expand(feats[0].shape[0], -1, -1), *feats], dim=1)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, N, D) each
        out, stats = rollingq_attention(q[:, :, :1], k, v, [f.shape[1] for f in feats], backend="reference")
        pooled = out[:, 0, 0] if self.head_uses == "fusion" else feats[int(self.head_uses)].mean(1)
        probes = [p(f.mean(1).detach()) for p, f in zip(self.probes, feats, strict=True)]
        return SimpleNamespace(logits=self.head(pooled), probe_logits=probes, stats=stats)


def _toy_loader(n: int = 67, batch: int = 16, classes: int = 3, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    proto = torch.randn(classes, 5, generator=gen)
    audio = torch.randn(n, 3, 5, generator=gen) + 0.8 * proto[labels].unsqueeze(1)
    visual = torch.randn(n, 7, 5, generator=gen) + 0.3 * proto[labels].unsqueeze(1)
    return [
        {"modalities": [audio[i : i + batch], visual[i : i + batch]], "label": labels[i : i + batch],
         "index": torch.arange(i, min(i + batch, n))}
        for i in range(0, n, batch)
    ]


def _fit_head_on_audio(model: TinyFusion, loader: list[dict]) -> None:
    """Set the head to nearest-class-mean on the audio features, so the model is accurate and audio-driven."""
    with torch.no_grad():
        feats = torch.cat([model.enc[0](b["modalities"][0]).mean(1) for b in loader])
        labels = torch.cat([b["label"] for b in loader])
        means = torch.stack([feats[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
        model.head.weight.copy_(means)
        model.head.bias.copy_(-0.5 * means.square().sum(1))


def test_collect_outputs_shapes_and_mass():
    torch.manual_seed(0)
    loader = _toy_loader()
    out = collect_outputs(TinyFusion(5, 8, 3), loader)
    assert out.logits.shape == (67, 3) and out.labels.shape == (67,)
    assert torch.equal(out.index, torch.arange(67))
    assert out.mass.shape == (67, 3) and out.cos.shape == (67, 2) and out.key_norm.shape == (67, 2)
    torch.testing.assert_close(out.mass.sum(1), torch.ones(67, dtype=torch.float64), rtol=0, atol=1e-6)
    assert len(out.probe_logits) == 2


def test_a_model_that_ignores_visual_has_a_flat_visual_noise_curve():
    torch.manual_seed(1)
    loader = _toy_loader()
    model = TinyFusion(5, 8, 3, head_uses=0)
    _fit_head_on_audio(model, loader)
    flat = evaluate_model(model, loader, ["audio", "visual"], noise_modality="visual", seed=3)
    curve = flat["noise_robustness"]["accuracy"]
    assert flat["noise_robustness"]["levels"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve[0] > 0.8
    assert curve == [curve[0]] * 5
    assert flat["accuracy_noise_replaced"] == curve[0]
    # the same model degrades when its audio input is noised, and falls to chance when audio is replaced
    steep = evaluate_model(model, loader, ["audio", "visual"], noise_modality="audio", seed=3)
    audio_curve = steep["noise_robustness"]["accuracy"]
    assert audio_curve[0] == curve[0]
    assert audio_curve[-1] < audio_curve[0] - 0.1
    assert steep["accuracy_noise_replaced"] < 0.6


def test_evaluate_model_record_is_complete_and_seeded():
    torch.manual_seed(2)
    loader = _toy_loader()
    model = TinyFusion(5, 8, 3)
    result = evaluate_model(model, loader, ["audio", "visual"], seed=7, max_key_points=20)
    clean_mass = result["attention"]["clean"]
    biased = max(("audio", "visual"), key=clean_mass.__getitem__)
    assert result["noise_modality"] == biased
    assert result["noise_modality_reason"] == "largest clean attention mass"
    assert sum(clean_mass.values()) == pytest.approx(1.0)
    assert sum(result["attention"]["noise_replaced"].values()) == pytest.approx(1.0)
    pearson = result["pearson"]
    assert pearson["modality"] == biased and pearson["num_samples"] == 67 and pearson["num_replaced"] == 33
    assert -1.0 <= pearson["r_quality"] <= 1.0 and 0.0 <= pearson["p_value"] <= 1.0
    assert set(result["probe_accuracy"]) == {"audio", "visual"}
    keys = result["key_distribution"]
    assert len(keys["clean"]["audio"]["cos"]) == 20 and len(keys["noise_replaced"]["visual"]["norm"]) == 20
    assert result["air"] == pytest.approx(
        keys["summary"]["clean"]["audio"]["cos_mean"] - keys["summary"]["clean"]["visual"]["cos_mean"], abs=1e-6
    )
    again = evaluate_model(model, loader, ["audio", "visual"], seed=7, max_key_points=20)
    assert again == result
    short = summarize(result)
    assert "clean" not in short["key_distribution"] and short["key_distribution"]["summary"] == keys["summary"]
    assert short["pearson"] == pearson
    with pytest.raises(ValueError, match="noise_modality must be one of"):
        evaluate_model(model, loader, ["audio", "visual"], noise_modality="text")


class StaticFusion(TinyFusion):
    """TinyFusion reporting no attention statistics (as the static fusion heads do)."""

    def forward(self, modalities: list[torch.Tensor]) -> SimpleNamespace:
        out = super().forward(modalities)
        return SimpleNamespace(logits=out.logits, probe_logits=out.probe_logits, stats=None)


def test_static_fusion_picks_the_noise_modality_by_probe_and_skips_attention_analyses():
    torch.manual_seed(4)
    loader = _toy_loader()
    model = StaticFusion(5, 8, 3, head_uses=0)
    _fit_head_on_audio(model, loader)
    with torch.no_grad():  # make the audio probe the better one
        model.probes[0].weight.copy_(model.head.weight)
        model.probes[0].bias.copy_(model.head.bias)
    result = evaluate_model(model, loader, ["audio", "visual"], seed=1)
    assert result["probe_accuracy"]["audio"] > result["probe_accuracy"]["visual"]
    assert result["noise_modality"] == "audio"
    assert result["noise_modality_reason"].startswith("best probe accuracy")
    assert result["attention"] is None and result["pearson"] is None and result["key_distribution"] is None
    assert result["air"] is None
    assert len(result["noise_robustness"]["accuracy"]) == 5


def test_evaluate_model_on_a_two_sample_split_stores_a_null_pearson():
    """Two samples cannot give a correlation: ``pearson`` is null and the other analyses still run."""
    from rollingq.evaluate import evaluate_model

    torch.manual_seed(5)
    result = evaluate_model(TinyFusion(5, 8, 3), _toy_loader(n=2, seed=5), ["audio", "visual"], seed=5)
    assert result["pearson"] is None and result["num_samples"] == 2
    assert 0.0 <= result["accuracy"] <= 1.0 and result["attention"] is not None


def test_air_of_three_modalities_is_the_spread_of_the_mean_cosines():
    """M = 3: AIR is max − min of the per-modality mean cosines, so modality 3 counts."""
    gen = torch.Generator().manual_seed(11)
    cos = torch.rand(13, 3, generator=gen, dtype=torch.float64) * 0.2
    cos[:, 2] += 0.7  # the third modality draws the query
    means = cos.mean(0)
    assert metrics.air(cos) == pytest.approx(float(means.max() - means.min()), abs=1e-12)
    assert metrics.air(cos) > 0.5
    assert metrics.air(cos[:, :2]) == pytest.approx(float((cos[:, 0] - cos[:, 1]).mean()), abs=1e-12)
