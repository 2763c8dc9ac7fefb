"""The module and the controller against the official RollingQ fusion, written out independently.

Official semantics (the GeWu-Lab/RollingQ_ICML2025 repository, read for this project):
the sequence is [class token, audio tokens, visual tokens]; single-head
attention with d = 768 and scores scaled by 1/sqrt(d); the class query is
rotated as ``q_cls @ R^T``; AIR = mean over the batch of cos(q_cls, mean audio
key) − cos(q_cls, mean visual key); α = ½(1 + tanh(−ρ·AIR)); anchor =
α·unit(E[k_a]) + (1 − α)·unit(E[k_v]) rescaled to |E[q]|; the rotation is
U·Vᵀ from the SVD of the rank-one ŷx̂ᵀ with a determinant fix; R ← R_new @ R.
Everything below is plain float64 torch, independent of rollingq_kernels.
"""

from __future__ import annotations

import math

import torch
from official_reference import official_svd_rotation

from rollingq_kernels.accumulator import attention_imbalance_rate
from rollingq_kernels.controller import RollingQ
from rollingq_kernels.module import FusedRollingQAttention
from rollingq_kernels.rebalance import svd_rotation

F64 = torch.float64
LA, LV = 9, 6  # audio and visual tokens


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def official_fusion(x, layer, R):
    """The official AttnFusion, class row: returns (out (B, d), q_cls (B, d), k_a (B, d), k_v (B, d))."""
    d = x.shape[-1]
    qkv = x @ layer.qkv.weight.T + layer.qkv.bias
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    q_cls = q[:, 0] @ R.T
    attn = torch.softmax((q_cls[:, None, :] @ k.transpose(1, 2)) / math.sqrt(d), dim=-1)  # (B, 1, N)
    out = (attn @ v)[:, 0] @ layer.proj.weight.T + layer.proj.bias
    return out, q_cls, k[:, 1 : 1 + LA].mean(1), k[:, 1 + LA :].mean(1)


def official_air(q_cls, k_a, k_v) -> float:
    cos = torch.nn.functional.cosine_similarity
    return float((cos(q_cls, k_a, dim=-1) - cos(q_cls, k_v, dim=-1)).mean().detach())


def official_anchor(E_q, E_ka, E_kv, air, rho):
    alpha = 0.5 * (1 + math.tanh(-rho * air))
    q_b = (alpha * E_ka / E_ka.norm() + (1 - alpha) * E_kv / E_kv.norm()) * E_q.norm()
    return q_b, alpha


def _layer(d: int, seed: int) -> FusedRollingQAttention:
    torch.manual_seed(seed)
    layer = FusedRollingQAttention(d, num_heads=1, qkv_bias=True, class_query_only=True, backend="reference")
    return layer.to(F64)


def _batch(B: int, d: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(B, 1 + LA + LV, d, generator=g, dtype=F64)
    x[:, 1 : 1 + LA] += torch.randn(d, generator=g, dtype=F64)  # audio tokens share a direction: a biased modality
    return x


def _rotation_of(layer) -> torch.Tensor:
    return layer.rotation.double()


def test_svd_rotation_is_the_official_construction():
    g = _gen(0)
    for _ in range(3):
        x, y = torch.randn(96, generator=g, dtype=F64), torch.randn(96, generator=g, dtype=F64)
        torch.testing.assert_close(svd_rotation(x, y), official_svd_rotation(x, y), rtol=0, atol=1e-12)


def test_module_forward_and_air_equal_the_official_fusion_d768():
    d = 768
    layer = _layer(d, seed=1)
    g = _gen(2)
    u, w = (torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=F64), dim=0) for _ in range(2))
    eye = torch.eye(d, dtype=F64)
    R = (eye - 2 * torch.outer(u, u)) @ (eye - 2 * torch.outer(w, w))  # two reflections: a rotation
    layer.apply_rotation(R)
    x = _batch(4, d, seed=3)
    out = layer(x, [LA, LV])
    want, q_cls, k_a, k_v = official_fusion(x, layer, R)
    torch.testing.assert_close(out[:, 0], want, rtol=0, atol=1e-12)
    imb = attention_imbalance_rate(layer.last_stats.cos, layer.last_stats.valid)
    assert math.isclose(float(imb.air), official_air(q_cls, k_a, k_v), abs_tol=1e-6)  # float32 statistics


def _check_rotation_step(R_old, R_new, E_q, q_b):
    """R_new = R_b @ R_old with R_b ∈ SO(d) taking E[q] to the direction of q_b."""
    R_b = R_new @ R_old.T
    d = R_b.shape[0]
    torch.testing.assert_close(R_b @ R_b.T, torch.eye(d, dtype=F64), rtol=0, atol=1e-9)
    assert math.isclose(float(torch.linalg.det(R_b)), 1.0, abs_tol=1e-9)
    torch.testing.assert_close(R_b @ E_q, q_b / q_b.norm() * E_q.norm(), rtol=0, atol=1e-5)


def test_controller_svd_last_batch_window_equals_official_algorithm():
    """estimate='accumulate', window=1: AIR and the anchor from the last batch of each epoch (Algorithm 1)."""
    d, rho = 96, 2.0
    layer = _layer(d, seed=4)
    ctl = RollingQ(layer, mode="paper", rho=rho, beta=0.0, max_rotations=2, window=1, method="svd")
    for epoch in range(2):
        R_old = _rotation_of(layer).clone()
        batches = [_batch(5, d, seed=10 * epoch + j) for j in range(3)]
        for x in batches:
            layer(x, [LA, LV])
        _, q_cls, k_a, k_v = official_fusion(batches[-1], layer, R_old)
        air = official_air(q_cls, k_a, k_v)
        q_b, alpha = official_anchor(q_cls.mean(0), k_a.mean(0), k_v.mean(0), air, rho)
        (rec,) = ctl.step(epoch)
        assert rec.rotated and rec.count == 5 and rec.num_rotations == epoch + 1
        assert math.isclose(rec.air, air, abs_tol=1e-6)
        assert math.isclose(rec.alpha[0], alpha, abs_tol=1e-6)
        R_new = _rotation_of(layer)
        _check_rotation_step(R_old, R_new, q_cls.mean(0), q_b)
        # the SVD construction, not the minimal rotation: it moves vectors orthogonal to span(E[q], q_b)
        # (which of them, and how, is the SVD's arbitrary basis of that complement: a change of 1e-16 in
        # E[q] changes it by O(1), so the full matrix cannot be compared across two computations)
        w = torch.randn(d, generator=_gen(99), dtype=F64)
        basis = torch.linalg.qr(torch.stack([q_cls.mean(0), q_b], 1).detach())[0]
        w = w - basis @ (basis.T @ w)
        assert float(((R_new @ R_old.T) @ w - w).norm()) > 0.1 * float(w.norm())


def test_controller_pass_estimate_equals_official_code():
    """estimate='pass': AIR from the last training batch, E[k] and E[q] from a no-grad pass over the loader."""
    d, rho = 96, 1.0
    layer = _layer(d, seed=5)
    ctl = RollingQ(layer, mode="paper", rho=rho, beta=0.0, window=1, method="svd", estimate="pass")
    train = [_batch(4, d, seed=20 + j) for j in range(3)]
    loader = [_batch(6, d, seed=30 + j) for j in range(2)]
    for x in train:
        layer(x, [LA, LV])
    R_old = _rotation_of(layer).clone()
    air = official_air(*official_fusion(train[-1], layer, R_old)[1:])
    parts = [official_fusion(x, layer, R_old)[1:] for x in loader]
    E_q, E_ka, E_kv = (torch.cat([p[i] for p in parts]).mean(0) for i in range(3))
    q_b, alpha = official_anchor(E_q, E_ka, E_kv, air, rho)

    calls = []
    (rec,) = ctl.step(0, loader=loader, forward_fn=lambda x: calls.append(layer(x, [LA, LV])))
    assert len(calls) == len(loader) and rec.rotated and rec.count == 4
    assert math.isclose(rec.air, air, abs_tol=1e-6) and math.isclose(rec.alpha[0], alpha, abs_tol=1e-6)
    _check_rotation_step(R_old, _rotation_of(layer), E_q, q_b)
