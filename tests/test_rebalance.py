"""RollingQ's math: AIR, balance weights, anchor, plane and SVD rotations, composition."""

from __future__ import annotations

import math

import pytest
import torch

from rollingq_kernels.accumulator import attention_imbalance_rate
from rollingq_kernels.rebalance import (
    balance_weights,
    balanced_anchor,
    compose_rotations,
    plane_rotation,
    rotation_angle_degrees,
    svd_rotation,
)

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _assert_rotation(R):
    D = R.shape[-1]
    eye = torch.eye(D, dtype=F64).expand_as(R)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=F64), atol=1e-12, rtol=0)


def test_air_hand_computed_with_validity():
    cos = torch.tensor([[0.5, 0.1], [0.3, 0.4], [0.9, 0.0]])
    valid = torch.tensor([[True, True], [True, True], [True, False]])
    imb = attention_imbalance_rate(cos, valid)
    assert imb.count == 2
    assert float(imb.air) == pytest.approx(((0.5 - 0.1) + (0.3 - 0.4)) / 2)
    assert imb.cos_mean.tolist() == pytest.approx([(0.5 + 0.3 + 0.9) / 3, (0.1 + 0.4) / 2])
    assert float(imb.spread) == pytest.approx(abs(imb.cos_mean[0] - imb.cos_mean[1]))


def test_air_without_complete_samples_is_nan_not_error():
    imb = attention_imbalance_rate(torch.tensor([[0.2, 0.1]]), torch.tensor([[True, False]]))
    assert imb.count == 0 and math.isnan(float(imb.air))


def test_air_ignores_absent_modalities_even_when_nan():
    cos = torch.tensor([[0.5, float("nan")], [0.3, 0.1]])
    valid = torch.tensor([[True, False], [True, True]])
    imb = attention_imbalance_rate(cos, valid)
    assert float(imb.air) == pytest.approx(0.2)
    assert imb.cos_mean.tolist() == pytest.approx([0.4, 0.1])
    with pytest.raises(TypeError, match="valid: expected a bool tensor"):
        attention_imbalance_rate(cos, valid.float())


def test_air_three_modalities_spread():
    cos = torch.tensor([[0.1, 0.5, -0.2], [0.3, 0.1, 0.0]])
    imb = attention_imbalance_rate(cos)
    assert float(imb.spread) == pytest.approx(0.3 - (-0.1))


@pytest.mark.parametrize("air", [-1.3, -0.2, 0.0, 0.4, 1.7])
@pytest.mark.parametrize("rho", [0.5, 1.0, 3.0])
def test_alpha_matches_paper_for_two_modalities(air, rho):
    cos_means = torch.tensor([0.1 + air, 0.1], dtype=F64)
    alpha = balance_weights(cos_means, rho)
    assert float(alpha[0]) == pytest.approx(0.5 * (1 + math.tanh(-rho * air)), abs=1e-12)
    assert float(alpha.sum()) == pytest.approx(1.0)


def test_balance_weights_rejects_negative_rho_and_rho_zero_is_uniform():
    with pytest.raises(ValueError, match="rho"):
        balance_weights(torch.zeros(2), -0.5)
    # rho = 0 is the official default (sigma 0): alpha = 1/2 whatever the cosines
    assert balance_weights(torch.tensor([0.9, -0.4]), 0.0).tolist() == [0.5, 0.5]


def test_anchor_is_alpha_weighted_unit_keys_rescaled_to_query_norm():
    keys = _rand(2, 6, seed=1) * torch.tensor([[3.0], [0.5]], dtype=F64)
    mq = _rand(6, seed=2)
    cos_means = torch.tensor([0.6, 0.1], dtype=F64)
    anchor, alpha = balanced_anchor(keys, mq, cos_means, rho=2.0)
    a = 0.5 * (1 + math.tanh(-2.0 * 0.5))
    expect = (a * _unit(keys[0]) + (1 - a) * _unit(keys[1])) * mq.norm()
    torch.testing.assert_close(anchor, expect)
    assert float(alpha[0]) == pytest.approx(a)
    assert float(alpha[0]) < 0.5  # the biased modality (higher cosine) weighs less


@pytest.mark.parametrize("D", [2, 3, 17, 32])
def test_plane_rotation_maps_x_to_y_and_fixes_complement(D):
    x, y = _rand(D, seed=D), _rand(D, seed=D + 100)
    R = plane_rotation(x, y)
    _assert_rotation(R)
    torch.testing.assert_close(R @ _unit(x), _unit(y), atol=1e-12, rtol=0)
    if D > 2:
        # vectors orthogonal to span(x, y) do not move
        basis = torch.linalg.qr(torch.stack([x, y], 1), mode="complete")[0]
        for z in basis[:, 2:].T:
            torch.testing.assert_close(R @ z, z, atol=1e-12, rtol=0)
    assert float(rotation_angle_degrees(x, y)) == pytest.approx(
        math.degrees(math.acos(float(_unit(x) @ _unit(y)))), abs=1e-9
    )


def test_plane_rotation_degenerate_cases():
    x = _rand(5, seed=4)
    _assert_rotation(plane_rotation(x, 2.5 * x))
    torch.testing.assert_close(plane_rotation(x, 2.5 * x), torch.eye(5, dtype=F64), atol=1e-12, rtol=0)
    R = plane_rotation(x, -x)  # antiparallel: a rotation by pi
    _assert_rotation(R)
    torch.testing.assert_close(R @ _unit(x), -_unit(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(plane_rotation(torch.zeros(5), x), torch.eye(5, dtype=F64))


def test_plane_rotation_batched_per_head():
    x, y = _rand(4, 8, seed=1), _rand(4, 8, seed=2)
    R = plane_rotation(x, y)
    assert R.shape == (4, 8, 8)
    _assert_rotation(R)
    torch.testing.assert_close((R @ _unit(x).unsqueeze(-1)).squeeze(-1), _unit(y), atol=1e-12, rtol=0)


@pytest.mark.parametrize("D", [2, 7, 32])
def test_svd_rotation_maps_x_to_y(D):
    x, y = _rand(3, D, seed=D), _rand(3, D, seed=D + 1)
    R = svd_rotation(x, y)
    _assert_rotation(R)
    torch.testing.assert_close((R @ _unit(x).unsqueeze(-1)).squeeze(-1), _unit(y), atol=1e-10, rtol=0)


def test_svd_rotation_moves_the_complement_but_plane_does_not():
    D = 32
    x, y = _rand(D, seed=11), _rand(D, seed=12)
    z = torch.linalg.qr(torch.stack([x, y], 1), mode="complete")[0][:, 2:]
    moved_svd = (svd_rotation(x, y) @ z - z).norm(dim=0).max()
    moved_plane = (plane_rotation(x, y) @ z - z).norm(dim=0).max()
    assert moved_plane < 1e-10
    assert moved_svd > 1e-3


def test_composition_order():
    x, y, w = _rand(6, seed=1), _rand(6, seed=2), _rand(6, seed=3)
    R1 = plane_rotation(x, y)  # first x -> y
    R2 = plane_rotation(y, w)  # then y -> w
    R = compose_rotations(R2, R1)
    torch.testing.assert_close(R @ _unit(x), _unit(w), atol=1e-12, rtol=0)
    per_head = compose_rotations(plane_rotation(_rand(3, 4, seed=5), _rand(3, 4, seed=6)), torch.eye(4).expand(3, 4, 4))
    assert per_head.shape == (3, 4, 4) and per_head.dtype == torch.float32
    with pytest.raises(ValueError, match="new"):
        compose_rotations(torch.eye(3), torch.eye(4))
