"""The rotation policy: the safety rule, the angle cap, the random-direction control, the rollback, the probe.

The layer projects q = k = v = its input (one head), so the class query and the keys are what each test
writes: the class token is e_0, and each modality's tokens have a mean key at a chosen cosine with it.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from identity_layer import identity_layer

from rollingq_kernels.controller import RollingQ
from rollingq_kernels.module import FusedRollingQAttention
from rollingq_kernels.policy import EpochResult, RotationPolicy
from rollingq_kernels.probe import ProbeInputs, capture_inputs, class_row, compare, rank_correlation
from rollingq_kernels.rebalance import plane_rotation, rotation_angle_degrees
from rollingq_kernels.reference import modality_index
from rollingq_kernels.settings import DEFAULT_MAX_ANGLE_DEG, RollingQSettings

F64 = torch.float64
DIM = 6
COUNTS = (9, 7)



def _inputs(cosines, batch=8, seed=0, jitter=0.05) -> torch.Tensor:
    """Class token e_0; modality m's tokens around a unit mean key at cosine ``cosines[m]`` with e_0 (axis 1 + m)."""
    gen = torch.Generator().manual_seed(seed)
    cls = torch.zeros(batch, 1, DIM, dtype=F64)
    cls[..., 0] = 1.0
    parts = []
    for m, (count, c) in enumerate(zip(COUNTS, cosines)):
        base = torch.zeros(DIM, dtype=F64)
        base[0], base[1 + m] = c, math.sqrt(1.0 - c * c)
        noise = jitter * torch.randn(batch, count, DIM, generator=gen, dtype=F64)
        parts.append(base + noise - noise.mean(1, keepdim=True))  # every sample's mean key is exactly ``base``
    return torch.cat([cls, *parts], dim=1)


def _trained(cosines, batches=3, **settings):
    layer = identity_layer(DIM)
    ctl = RollingQ(layer, **{"beta": 0.0, **settings})
    for seed in range(batches):
        layer(_inputs(cosines, seed=seed), list(COUNTS))
    return layer, ctl


def _moved_angle(layer) -> float:
    """The angle by which the layer's rotation moves the class query e_0."""
    e0 = torch.zeros(DIM, dtype=F64)
    e0[0] = 1.0
    return float(rotation_angle_degrees(e0, layer.rotation.double() @ e0))


# ---------------------------------------------------------------------------- the safety rule
def test_a_query_opposing_both_mean_keys_is_refused_by_default_and_rotated_by_the_paper_rule():
    """The avdigits case: cos(q, k̄_m) = −0.9 for both modalities; the anchor lies ~160 deg away."""
    layer, ctl = _trained((-0.9, -0.9))
    (rec,) = ctl.step(epoch=1)
    assert (rec.action, rec.reason) == ("refuse", "query_opposes_keys") and not rec.rotated
    assert rec.cos_query_keys == pytest.approx([-0.9, -0.9], abs=1e-6) and rec.angle_deg > 150
    assert "-0.900" in rec.detail and layer.rotation_is_identity and int(layer.num_rotations) == 0
    paper_layer, paper = _trained((-0.9, -0.9), mode="paper")
    (old,) = paper.step(epoch=1)
    assert old.rotated and _moved_angle(paper_layer) == pytest.approx(old.angle_deg, abs=1e-4) and old.angle_deg > 150


def _far_anchor(**settings):
    """cos 0.1 and −0.9: not both negative, but α leans to the opposing modality: the anchor is ~153 deg away."""
    return _trained((0.1, -0.9), rho=1.0, **settings)


def test_an_anchor_beyond_90_degrees_is_refused():
    layer, ctl = _far_anchor()
    (rec,) = ctl.step(epoch=1)
    assert rec.angle_deg == pytest.approx(152.8, abs=0.5)
    assert (rec.action, rec.reason) == ("refuse", "anchor_too_far") and "152." in rec.detail
    assert layer.rotation_is_identity


def test_an_anchor_beyond_the_limit_is_capped_when_the_limit_allows_it():
    layer, ctl = _far_anchor(anchor_limit_deg=180.0)
    (rec,) = ctl.step(epoch=1)
    assert (rec.action, rec.reason) == ("cap", "capped") and rec.rotated
    assert rec.applied_angle_deg == pytest.approx(DEFAULT_MAX_ANGLE_DEG, abs=1e-9) and rec.angle_deg > 150
    assert _moved_angle(layer) == pytest.approx(DEFAULT_MAX_ANGLE_DEG, abs=1e-4)
    assert rec.cos_before_after == pytest.approx(math.cos(math.radians(DEFAULT_MAX_ANGLE_DEG)), abs=1e-9)


@pytest.mark.parametrize("cap", [12.5, 45.0])
def test_the_cap_is_a_setting_and_a_small_rotation_is_not_capped(cap):
    layer, ctl = _trained((0.6, 0.2), max_angle_deg=cap)
    (rec,) = ctl.step(epoch=1)
    assert rec.rotated and rec.angle_deg < 90
    applied = min(cap, rec.angle_deg)
    assert rec.action == ("cap" if rec.angle_deg > cap else "rotate")
    assert rec.applied_angle_deg == pytest.approx(applied, abs=1e-9)
    assert _moved_angle(layer) == pytest.approx(applied, abs=1e-4)


def test_mass_disagreement_is_a_reason_to_refuse():
    """Equal cosines would balance; here AIR points to modality 1 while the mass sits on modality 0 (more tokens)."""
    layer = identity_layer(DIM)
    ctl = RollingQ(layer, beta=0.0)
    for seed in range(3):
        x = _inputs((0.3, 0.5), seed=seed)
        layer(torch.cat([x[:, :10], x[:, 1:10], x[:, 10:]], dim=1), [18, 7])  # modality 0: 18 tokens at cos 0.3
    (rec,) = ctl.step(epoch=1)
    assert rec.assumption_warning and (rec.action, rec.reason) == ("refuse", "mass_disagrees")
    assert layer.rotation_is_identity


def test_the_rules_are_off_with_safety_false():
    _, ctl = _trained((-0.9, -0.9), safety=False, max_angle_deg=180.0)
    (rec,) = ctl.step(epoch=1)
    assert rec.action == "rotate" and rec.angle_deg > 150


# ---------------------------------------------------------------------------- the probe
def test_probe_rank_correlation_is_minus_one_for_a_reversed_query_and_one_for_none():
    layer = identity_layer(DIM)
    inputs = ProbeInputs(_inputs((0.4, 0.1), seed=3), COUNTS, None)
    eye = torch.eye(DIM, dtype=F64)
    e0 = eye[0]
    flip = plane_rotation(e0, -e0)  # the class query e_0 -> -e_0: every logit changes sign
    same = compare(layer, inputs, eye, eye, top_k=3)
    reversed_ = compare(layer, inputs, eye, flip, top_k=3)
    assert same.rank_correlation == pytest.approx(1.0, abs=1e-12)
    assert same.within_rank_correlation == pytest.approx(1.0, abs=1e-12)
    assert reversed_.rank_correlation == pytest.approx(-1.0, abs=1e-12)
    assert reversed_.within_rank_correlation == pytest.approx(-1.0, abs=1e-12)
    assert reversed_.logit_spread[0] == pytest.approx(reversed_.logit_spread[1], abs=1e-9)
    assert 0 < same.max_prob[0] <= same.topk_share[0] <= 1 and sum(same.mass[0]) == pytest.approx(1.0)
    valid = torch.ones(2, 5, dtype=torch.bool)
    p = torch.rand(2, 1, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert rank_correlation(p, -p, valid) == pytest.approx(-1.0)


def _loader(cosines, n=2):
    return [_inputs(cosines, seed=10 + i) for i in range(n)]


def test_the_probe_fills_the_record_and_its_reversal_check_refuses():
    layer, ctl = _trained((0.6, 0.2), max_angle_deg=180.0, anchor_limit_deg=180.0)
    loader = _loader((0.6, 0.2))
    (rec,) = ctl.step(1, loader, lambda x: layer(x, list(COUNTS)))
    assert rec.rotated and rec.probe_samples == 8 and len(rec.logit_spread) == len(rec.topk_share) == 2
    assert rec.within_rank_correlation == rec.anchor_within_rank_correlation and rec.within_rank_correlation > 0
    assert rec.rank_correlation < rec.within_rank_correlation  # attention moved from modality 0 to 1
    assert len(rec.probe_mass) == 2 and len(rec.probe_mass[1]) == 3
    strict, ctl_strict = _trained((0.6, 0.2), max_angle_deg=180.0, min_rank_correlation=1.0)
    (held,) = ctl_strict.step(1, loader, lambda x: strict(x, list(COUNTS)))
    assert (held.action, held.reason) == ("refuse", "reverses_attention") and strict.rotation_is_identity
    assert held.within_rank_correlation < 1.0 and "rank correlation" in held.detail


def test_the_probe_sees_the_paper_rule_reverse_the_opposing_query():
    layer, ctl = _trained((-0.9, -0.9), mode="paper", probe_batches=1)
    (rec,) = ctl.step(1, _loader((-0.9, -0.9)), lambda x: layer(x, list(COUNTS)))
    assert rec.rotated and rec.within_rank_correlation < -0.5  # what the safety rule's statistics refuse up front


def test_the_probe_forward_leaves_the_decision_window_alone():
    """The layer is in training mode; the probe's forward must not enter its K-window (kept: no rotation)."""
    layer, ctl = _trained((0.6, 0.2), window=3, min_rank_correlation=1.0)
    (rec,) = ctl.step(1, _loader((0.6, 0.2)), lambda x: layer(x, list(COUNTS)))
    assert rec.probe_samples and rec.reason == "reverses_attention" and layer.training
    assert layer.statistics.num_batches == 3


# ---------------------------------------------------------------------------- the random-direction control
def _rotated_query(layer) -> torch.Tensor:
    return layer.rotation.double()[:, 0]  # R e_0


def test_random_direction_rotates_by_the_same_angle_in_another_direction():
    anchor_layer, anchor = _trained((0.6, 0.2))
    (a,) = anchor.step(epoch=1)
    rand_layer, rand = _trained((0.6, 0.2), direction="random")
    (r,) = rand.step(epoch=1)
    assert a.action == r.action and a.applied_angle_deg == pytest.approx(r.applied_angle_deg, abs=1e-12)
    assert r.direction == "random" and a.direction == "anchor"
    assert _moved_angle(rand_layer) == pytest.approx(_moved_angle(anchor_layer), abs=1e-6)
    cos_between = torch.nn.functional.cosine_similarity(_rotated_query(anchor_layer), _rotated_query(rand_layer), 0)
    assert float(cos_between) < 0.99
    again_layer, again = _trained((0.6, 0.2), direction="random")
    again.step(epoch=1)
    assert torch.equal(again_layer.rotation, rand_layer.rotation)  # deterministic for a seed
    other_layer = identity_layer(DIM)
    other = RollingQ(other_layer, beta=0.0, direction="random", seed=7)
    for seed in range(3):
        other_layer(_inputs((0.6, 0.2), seed=seed), list(COUNTS))
    other.step(epoch=1)
    assert not torch.equal(other_layer.rotation, rand_layer.rotation)
    assert _moved_angle(other_layer) == pytest.approx(_moved_angle(anchor_layer), abs=1e-6)


# ---------------------------------------------------------------------------- the rollback
def _rotate_then(result: tuple[float, float], resume: bool = False):
    layer, ctl = _trained((0.6, 0.2))
    (rec,) = ctl.step(1, accuracy=0.80, majority=0.25, loss=0.50)
    assert rec.rotated and not layer.rotation_is_identity
    if resume:
        buf = io.BytesIO()
        torch.save({"model": layer.state_dict(), "ctl": ctl.state_dict()}, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        layer = identity_layer(DIM)
        layer.load_state_dict(state["model"])
        ctl = RollingQ(layer)
        ctl.load_state_dict(state["ctl"])
    for seed in range(3):
        layer(_inputs((0.6, 0.2), seed=20 + seed), list(COUNTS))
    accuracy, loss = result
    (after,) = ctl.step(2, accuracy=accuracy, majority=0.25, loss=loss)
    return layer, ctl, after


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("result", [(0.30, 0.55), (0.79, 0.90)], ids=["accuracy", "loss"])
def test_a_rotation_after_which_training_collapses_is_rolled_back(result, resume):
    layer, ctl, rec = _rotate_then(result, resume)
    assert (rec.action, rec.reason) == ("rollback", "collapsed") and rec.rolled_back_epoch == 1
    assert layer.rotation_is_identity and int(layer.num_rotations) == 0 and rec.num_rotations == 0
    assert ctl.rollbacks == {"0": 1} and layer.statistics.num_batches == 0
    for seed in range(3):
        layer(_inputs((0.6, 0.2), seed=30 + seed), list(COUNTS))
    (later,) = ctl.step(3, accuracy=0.8, majority=0.25, loss=0.4)
    assert (later.action, later.reason) == ("refuse", "after_rollback") and layer.rotation_is_identity


def test_a_rotation_that_training_survives_is_kept():
    layer, ctl, rec = _rotate_then((0.82, 0.45))
    assert rec.action != "rollback" and not layer.rotation_is_identity and not ctl.pending
    rules = RotationPolicy(RollingQSettings(rollback=False))
    assert rules.rollback(EpochResult(1, 0.5, 0.8), EpochResult(2, 5.0, 0.1)) is None


# ---------------------------------------------------------------------------- the gate lives in the policy
def test_start_epoch_and_the_accuracy_guard_wait_and_reset_the_window():
    layer, ctl = _trained((0.6, 0.2), start_epoch=2, window=4)
    (early,) = ctl.step(1, accuracy=0.9, majority=0.25)
    assert (early.action, early.reason) == ("wait", "before_start_epoch") and layer.statistics.num_batches == 0
    for seed in range(3):
        layer(_inputs((0.6, 0.2), seed=seed), list(COUNTS))
    (held,) = ctl.step(2, accuracy=0.27, majority=0.25)
    assert (held.action, held.reason) == ("wait", "accuracy_guard") and "majority-class" in held.detail
    assert layer.rotation_is_identity and layer.statistics.num_batches == 0


def test_strict_beta_is_the_official_comparison():
    loose = RotationPolicy(RollingQSettings(beta=0.2))
    strict = RotationPolicy(RollingQSettings(beta=0.2, beta_strict=True))
    assert loose.threshold(0.2, 0, 0) is None and strict.threshold(0.2, 0, 0)[0] == "below_threshold"
    assert strict.threshold(-0.21, 0, 0) is None and strict.threshold(0.0, 0, 0)[0] == "below_threshold"


@pytest.mark.parametrize("mode", ["global", "per_head"])
def test_the_probe_rebuilds_the_class_row_the_op_computed(mode):
    """Captured by a hook from a padded call, the probe's class row has the op's mass under the layer's rotation."""
    torch.manual_seed(3)
    layer = FusedRollingQAttention(12, num_heads=3, qkv_bias=True, class_query_only=True, rotation_mode=mode,
                                   backend="reference").to(F64)
    gen = torch.Generator().manual_seed(4)
    shape = layer.rotation_shape()
    layer.apply_rotation(plane_rotation(torch.randn(shape[:-1], generator=gen, dtype=F64),
                                        torch.randn(shape[:-1], generator=gen, dtype=F64)))
    x = torch.randn(5, 1 + 6 + 4, 12, generator=gen, dtype=F64)
    lengths = torch.tensor([[6, 4], [2, 4], [6, 1], [3, 3], [1, 2]])
    captured = capture_inputs({"0": layer}, lambda: layer(x, segments=[6, 4], lengths=lengths))["0"]
    assert captured.segments == (6, 4) and torch.equal(captured.lengths, lengths)
    _, probs = class_row(layer, captured, layer.rotation)
    onehot = torch.nn.functional.one_hot(modality_index((6, 4), x.device), 3).double()
    torch.testing.assert_close(probs @ onehot, layer.last_stats.mass.double(), rtol=0, atol=1e-6)
    assert float(probs[:, :, 1 + 2 : 1 + 6][1].abs().max()) == 0.0  # padded keys get no attention
