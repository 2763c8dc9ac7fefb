"""RollingQ's first-rotation guard, the AIR-vs-mass assumption check and the Eq. 3 ('score') indicator."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from identity_layer import identity_layer
from rollingq.config import load_config, packaged_config_dir
from rollingq.records import read_metrics
from rollingq.train import train

import rollingq_kernels
from rollingq_kernels.controller import RollingQ, accuracy_guard
from rollingq_kernels.indicators import indicator_cosines, indicator_value, mass_disagreement, score_weights
from rollingq_kernels.stats import token_counts

F64 = torch.float64
DIM = 4



def _tokens(count: int, cos: float, axis: int, batch: int, gen: torch.Generator, norm: float = 1.0) -> torch.Tensor:
    """``count`` keys per sample whose mean has cosine ``cos`` with e_0 (the class query), spread along ``axis``."""
    base = torch.zeros(DIM, dtype=F64)
    base[0], base[axis] = cos, math.sqrt(1.0 - cos * cos)
    jitter = 0.01 * torch.randn(batch, count, DIM, generator=gen, dtype=F64)
    jitter -= jitter.mean(1, keepdim=True)  # keep every sample's mean key exactly ``norm * base``
    return norm * base + jitter


def _inputs(counts, cosines, batch=6, seed=0, norms=(1.0, 1.0)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cls = torch.zeros(batch, 1, DIM, dtype=F64)
    cls[..., 0] = 1.0
    parts = [_tokens(n, c, 1 + m, batch, gen, s) for m, (n, c, s) in enumerate(zip(counts, cosines, norms))]
    return torch.cat([cls, *parts], dim=1)


def _step(indicator: str, counts, cosines, max_rotations=0, norms=(1.0, 1.0), lengths=None):
    layer = identity_layer(DIM)
    controller = RollingQ(layer, mode="paper", beta=0.0, max_rotations=max_rotations, indicator=indicator)
    for seed in range(3):
        layer(_inputs(counts, cosines, seed=seed, norms=norms), list(counts), lengths)
    return controller.step(epoch=1)[0], layer


# ---------------------------------------------------------------------------- the indicator math
def test_score_weights_have_mean_one_and_equal_air_when_counts_and_norms_are_equal():
    gen = torch.Generator().manual_seed(3)
    cos = torch.rand(2, generator=gen, dtype=F64) - 0.5
    norm = torch.rand(2, generator=gen, dtype=F64) + 0.5
    w = score_weights(norm, torch.tensor([17.0, 5.0], dtype=F64))
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-12)
    assert float(w[0] / w[1]) == pytest.approx(float(17 * norm[0] / (5 * norm[1])), rel=1e-12)
    same = indicator_cosines(cos, torch.full((2,), 1.3, dtype=F64), torch.tensor([9.0, 9.0]), "score")
    assert indicator_value(same) == pytest.approx(float(cos[0] - cos[1]), abs=1e-12)
    assert torch.equal(indicator_cosines(cos, norm, None, "cos"), cos)
    with pytest.raises(ValueError, match="indicator"):
        indicator_cosines(cos, norm, None, "mass")
    with pytest.raises(ValueError, match="tokens"):
        indicator_cosines(cos, norm, None, "score")
    with pytest.raises(ValueError, match="indicator"):
        RollingQ(identity_layer(DIM), indicator="sum")


def test_mass_disagreement_needs_a_clear_mass_lead():
    assert mass_disagreement(torch.tensor([-0.2, 0.1]), torch.tensor([0.8, 0.15]))
    assert not mass_disagreement(torch.tensor([0.3, 0.1]), torch.tensor([0.8, 0.15]))
    assert not mass_disagreement(torch.tensor([-0.2, 0.1]), torch.tensor([0.5, 0.45]))  # lead below the margin
    assert mass_disagreement(torch.tensor([0.1, 0.5, 0.2]), torch.tensor([0.2, 0.1, 0.65]))


# ---------------------------------------------------------------------------- the controller
def test_unequal_token_counts_flip_air_against_the_mass_and_the_controller_warns(caplog):
    """30 keys at cos 0.2 vs 2 keys at cos 0.4: the 30 take ~0.9 of the mass, AIR (−0.2) points the other way."""
    with caplog.at_level(logging.WARNING, logger="rollingq_kernels"):
        rec, _ = _step("cos", (30, 2), (0.2, 0.4))
    assert rec.mass[1] > 0.8 > 0.1 > rec.mass[2]
    assert rec.air == pytest.approx(-0.2, abs=1e-6) and rec.value == rec.air
    assert rec.tokens == [30.0, 2.0] and rec.key_norm == pytest.approx([1.0, 1.0], abs=1e-6)
    assert rec.assumption_warning
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "token counts [30.0, 2.0]" in message and "mean-key norms [1.000, 1.000]" in message


def test_score_indicator_follows_the_mass_when_keys_point_towards_the_query(caplog):
    with caplog.at_level(logging.WARNING, logger="rollingq_kernels"):
        rec, _ = _step("score", (30, 2), (0.2, 0.4))
    # weights 30/16 and 2/16: 1.875 * 0.2 - 0.125 * 0.4
    assert rec.value == pytest.approx(1.875 * 0.2 - 0.125 * 0.4, abs=1e-6) and rec.value > 0 > rec.air
    assert not rec.assumption_warning and not caplog.records


def test_score_indicator_fails_too_when_the_mean_keys_point_away_from_the_query():
    """Eq. 3 sums the scores: with negative cosines more tokens make the sum *smaller*, yet take more mass."""
    rec, _ = _step("score", (30, 2), (-0.2, 0.1))
    assert rec.mass[1] > 0.8 and rec.value < 0 and rec.assumption_warning
    rec_cos, _ = _step("cos", (30, 2), (-0.2, 0.1))
    assert rec_cos.air < 0 and rec_cos.assumption_warning


def test_key_norms_enter_the_score_indicator():
    rec, _ = _step("score", (5, 5), (0.3, 0.2), norms=(0.5, 2.0))
    assert rec.key_norm == pytest.approx([0.5, 2.0], abs=1e-6)
    assert rec.value == pytest.approx(0.4 * 0.3 - 1.6 * 0.2, abs=1e-6)  # weights 2.5/6.25 and 10/6.25
    rec_cos, _ = _step("cos", (5, 5), (0.3, 0.2), norms=(0.5, 2.0))
    assert rec_cos.value == pytest.approx(0.1, abs=1e-6)


def test_equal_counts_and_norms_make_both_indicators_agree_and_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="rollingq_kernels"):
        rec_cos, _ = _step("cos", (9, 9), (0.5, 0.1))
        rec_score, _ = _step("score", (9, 9), (0.5, 0.1))
    assert rec_cos.value == pytest.approx(rec_score.value, abs=1e-6) and rec_cos.value == pytest.approx(0.4, abs=1e-6)
    assert not rec_cos.assumption_warning and not caplog.records


def test_the_indicator_decides_the_anchor_side():
    """With the score indicator the anchor leans to the modality that has less mass; with AIR, the other way."""
    rec_score, layer_s = _step("score", (30, 2), (0.2, 0.4), max_rotations=1)
    rec_cos, layer_c = _step("cos", (30, 2), (0.2, 0.4), max_rotations=1)
    assert rec_score.rotated and rec_cos.rotated
    assert rec_score.alpha[0] < 0.5 < rec_cos.alpha[0]
    x = _inputs((30, 2), (0.2, 0.4), seed=11)
    with torch.no_grad():
        layer_s.eval()(x, [30, 2])
        mass_s = layer_s.last_stats.mass.mean(0)[0]
        layer_c.eval()(x, [30, 2])
        mass_c = layer_c.last_stats.mass.mean(0)[0]
    assert mass_s[2] > mass_c[2]  # after the score rotation the minority modality gets more attention


def test_token_counts_come_from_the_valid_lengths():
    lengths = torch.tensor([[30, 2], [20, 2], [10, 1], [30, 2], [25, 2], [15, 1]])
    rec, _ = _step("cos", (30, 2), (0.2, 0.4), lengths=lengths)
    assert rec.tokens == pytest.approx([130 / 6, 10 / 6], abs=1e-12)


class _HostDataFactories(torch.overrides.TorchFunctionMode):
    """Records every tensor built from host data (a host-to-device copy on CUDA)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.tensor, torch.as_tensor, torch.from_numpy):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_token_counts_without_lengths_copy_nothing_from_the_host():
    # the CPU stand-in for test_triton_cuda's sync and graph-capture tests: no tensor from a Python list
    with _HostDataFactories() as seen:
        counts = token_counts(None, 3, (5, 7), torch.device("meta"))
    assert seen.calls == [] and counts.shape == (3, 2) and counts.dtype == torch.float32
    assert token_counts(None, 3, (5, 7), torch.device("cpu")).tolist() == [[5.0, 7.0]] * 3


def test_indicator_is_saved_and_old_states_load_as_cos():
    layer = identity_layer(DIM)
    controller = RollingQ(layer, indicator="score")
    state = controller.state_dict()
    assert state["indicator"] == "score"
    other = RollingQ(layer)
    other.load_state_dict(state)
    assert other.indicator == "score"
    del state["indicator"]
    other.load_state_dict(state)
    assert other.indicator == "cos"


# ---------------------------------------------------------------------------- the guard
def test_accuracy_guard():
    assert accuracy_guard(0.40, 0.25, 0.05) is None
    held = accuracy_guard(0.27, 0.25, 0.05)
    assert held is not None and "0.270" in held and "0.250" in held
    assert accuracy_guard(0.10, 0.25, -1.0) is None  # switched off
    with pytest.raises(ValueError, match="accuracy"):
        accuracy_guard(float("nan"), 0.25, 0.05)
    assert rollingq_kernels.accuracy_guard is accuracy_guard  # public, next to RollingQ


TINY = ["data.synthetic.sizes.train=240", "data.synthetic.sizes.val=40", "data.synthetic.sizes.test=30",
        "data.num_classes=3", "model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2",
        "train.batch_size=16", "train.num_threads=1", "train.progress=false", "train.epochs=1",
        "rollingq.beta=0.0", "rollingq.start_epoch=1", "rollingq.mode=paper"]  # the guard alone, no safety rule


def test_the_guard_blocks_a_rotation_while_the_model_is_at_chance(tmp_path):
    """No class signal at all: training accuracy stays at chance, so no rotation, whatever AIR says."""
    cfg = load_config("synthetic_rollingq", TINY + ["data.synthetic.strength=[0.0,0.0]", "seed=5"])
    rows = read_metrics(os.path.join(train(cfg, str(tmp_path / "chance")), "metrics.jsonl"))
    assert rows[0]["train_acc"] < rows[0]["train_majority"] + 0.05
    assert not rows[0]["rotated"] and "majority-class" in rows[0]["rollingq_guard"]
    assert [(r["action"], r["reason"]) for r in rows[0]["rollingq"]] == [("wait", "accuracy_guard")]
    off = load_config("synthetic_rollingq", TINY + ["data.synthetic.strength=[0.0,0.0]", "seed=5",
                                                    "rollingq.min_accuracy_gain=-1"])
    rows_off = read_metrics(os.path.join(train(off, str(tmp_path / "off")), "metrics.jsonl"))
    assert rows_off[0]["rotated"] and rows_off[0]["rollingq_guard"] is None


def test_the_guard_lets_a_learning_model_rotate(tmp_path):
    cfg = load_config("synthetic_rollingq", TINY + ["data.synthetic.strength=[3.0,3.0]", "seed=5"])
    rows = read_metrics(os.path.join(train(cfg, str(tmp_path / "run")), "metrics.jsonl"))
    assert rows[0]["train_acc"] >= rows[0]["train_majority"] + 0.05 and rows[0]["rotated"]


def test_every_shipped_rollingq_config_guards_its_first_rotation():
    names = sorted(f[:-5] for f in os.listdir(packaged_config_dir()) if f.endswith("rollingq.yaml"))
    assert len(names) == 8
    for name in names:
        rq = load_config(name)["rollingq"]
        assert rq["enabled"] and rq["min_accuracy_gain"] >= 0.05, name
        assert rq["indicator"] == "cos", name
