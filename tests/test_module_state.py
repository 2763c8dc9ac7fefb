"""The layer's rotation buffer is the one source of truth; bad rotations, counts, controller states and
constructor arguments fail with an error that names them (issue 13, items 1, 3, 6 and 11)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_on_gloo_ranks
from torch import nn

from rollingq_kernels import HAS_CPP
from rollingq_kernels.controller import RollingQ
from rollingq_kernels.module import FusedRollingQAttention
from rollingq_kernels.ops import rollingq_attention
from rollingq_kernels.rebalance import plane_rotation

F64 = torch.float64
SEGS = (7, 5)
WORLD = 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(dim=30, heads=3, seed=0, **kw) -> FusedRollingQAttention:
    torch.manual_seed(seed)
    return FusedRollingQAttention(dim, num_heads=heads, qkv_bias=True, backend="reference", segments=SEGS,
                                  **kw).to(F64)


def _rotation(dim: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return plane_rotation(torch.randn(dim, generator=g, dtype=F64), torch.randn(dim, generator=g, dtype=F64))


def _x(seed: int, batch: int = 4, dim: int = 30) -> torch.Tensor:
    return torch.randn(batch, 1 + sum(SEGS), dim, generator=_gen(seed), dtype=F64)


def _unrotated_and_rotated(seed: int = 0) -> tuple[FusedRollingQAttention, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer, a rotation R, and its outputs with the identity and with R on a fixed input."""
    layer = _layer(seed=seed).eval()
    x = _x(seed + 1)
    plain = layer(x)
    r = _rotation(30, seed + 2)
    rotated_layer = copy.deepcopy(layer)
    rotated_layer.apply_rotation(r)
    return layer, r, plain, rotated_layer(x)


# ---------------------------------------------------------------------------------------------- item 1
def test_a_rotation_written_in_place_is_what_the_forward_uses():
    layer, r, plain, rotated = _unrotated_and_rotated()
    assert not torch.allclose(plain, rotated)
    with torch.no_grad():
        layer.rotation.copy_(r)
    torch.testing.assert_close(layer(_x(1)), rotated, rtol=0, atol=1e-12)
    assert not layer.rotation_is_identity
    with torch.no_grad():  # and back by hand
        layer.rotation.copy_(torch.eye(30, dtype=F64))
    torch.testing.assert_close(layer(_x(1)), plain, rtol=0, atol=1e-12)
    assert layer.rotation_is_identity


def test_ema_weights_use_their_own_rotation_buffer():
    from timm.utils import ModelEmaV3

    layer, r, plain, rotated = _unrotated_and_rotated()
    ema = ModelEmaV3(layer, decay=0.0)  # decay 0: the EMA copies the model at each update
    layer.apply_rotation(r)
    ema.update(layer)
    torch.testing.assert_close(ema.module(_x(1)), rotated, rtol=0, atol=1e-12)


def test_load_state_dict_with_assign_and_to_keep_the_rotation():
    layer, r, plain, rotated = _unrotated_and_rotated()
    source = copy.deepcopy(layer)
    source.apply_rotation(r)
    layer.load_state_dict(source.state_dict(), assign=True)
    torch.testing.assert_close(layer(_x(1)), rotated, rtol=0, atol=1e-12)
    moved = copy.deepcopy(layer).float().to(F64)  # casts replace the buffer object; the values stay
    torch.testing.assert_close(moved(_x(1)), rotated, rtol=0, atol=1e-6)
    fresh = _layer()  # a plain load (copy_ into the buffer) as well
    fresh.load_state_dict(source.state_dict())
    torch.testing.assert_close(fresh.eval()(_x(1)), rotated, rtol=0, atol=1e-12)


def _ddp_worker(rank: int) -> dict:
    layer = _layer(seed=0)
    if rank == 0:  # only rank 0 holds the rotation; DDP broadcasts rank 0's buffers at each forward
        layer.apply_rotation(_rotation(30, 2))
    model = nn.parallel.DistributedDataParallel(layer, broadcast_buffers=True)
    out = model(_x(1))
    return {"out": out.detach(), "rotation": layer.rotation}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_buffer_broadcast_reaches_the_forward(tmp_path):
    got = run_on_gloo_ranks(_ddp_worker, tmp_path, WORLD)
    _, _, plain, rotated = _unrotated_and_rotated()
    torch.testing.assert_close(got[1]["rotation"], got[0]["rotation"], rtol=0, atol=0)
    for rank in range(WORLD):
        torch.testing.assert_close(got[rank]["out"], rotated, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- item 3
@pytest.mark.skipif(not HAS_CPP, reason="needs the compiled C++ kernels")
def test_double_backward_through_the_fused_op_raises_a_clear_error():
    g = _gen(5)
    q, k, v = (torch.randn(2, 2, 13, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    out, _ = rollingq_attention(q, k, v, SEGS, backend="cpp")
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*not implemented.*backend='reference'"):
        torch.autograd.grad(dq.sum() + dk.sum() + dv.sum(), (q, k, v))
    # the reference implements it (a nonzero second derivative, as the issue measured)
    out, _ = rollingq_attention(q, k, v, SEGS, backend="reference")
    (dq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    (ddq,) = torch.autograd.grad(dq.square().sum(), (q,))
    assert float(ddq.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------- item 6
def test_apply_rotation_rejects_what_is_not_a_rotation():
    layer = _layer()
    with pytest.raises(ValueError, match=r"new: expected an orthogonal matrix .*got 3"):
        layer.apply_rotation(2 * torch.eye(30, dtype=F64))
    reflection = torch.eye(30, dtype=F64)
    reflection[0, 0] = -1
    with pytest.raises(ValueError, match="new: expected a rotation .*reflection"):
        layer.apply_rotation(reflection)
    with pytest.raises(ValueError, match=r"new: expected shape \(30, 30\)"):
        layer.apply_rotation(torch.eye(10, dtype=F64))
    assert layer.rotation_is_identity and int(layer.num_rotations) == 0
    layer.apply_rotation(_rotation(30, 1).float())  # a float32 rotation is within the tolerance
    assert int(layer.num_rotations) == 1


def test_state_dict_with_a_negative_count_or_a_non_rotation_is_rejected():
    layer = _layer()
    state = layer.state_dict()
    bad_count = dict(state, num_rotations=torch.tensor(-1))
    with pytest.raises(ValueError, match=r"state_dict\['num_rotations'\]: expected a count >= 0"):
        _layer().load_state_dict(bad_count)
    with pytest.raises(ValueError, match="num_rotations"):  # strict=False too: a bad value is never loaded
        _layer().load_state_dict(bad_count, strict=False)
    with pytest.raises(ValueError, match=r"state_dict\['rotation'\]: expected an orthogonal"):
        _layer().load_state_dict(dict(state, rotation=2 * torch.eye(30, dtype=F64)))


def test_restore_rotation_checks_the_count_before_anything_changes():
    layer = _layer()
    saved = _rotation(30, 2)
    with pytest.raises(ValueError, match=r"num_rotations: expected an integer >= 0, got -1"):
        layer.restore_rotation(saved, -1)
    assert layer.rotation_is_identity and int(layer.num_rotations) == 0  # neither the rotation nor the count
    layer.restore_rotation(saved, 2)
    assert torch.equal(layer.rotation, saved.to(layer.rotation.dtype)) and int(layer.num_rotations) == 2


def test_controller_state_of_another_model_size_is_rejected_at_load():
    small, big = _layer(dim=30, heads=3), _layer(dim=36, heads=3)
    small_ctl, big_ctl = RollingQ(small, beta=0.0), RollingQ(big, beta=0.0)
    small.train()(_x(3))  # an open window with sums of the small layer's shapes
    state = small_ctl.state_dict()
    with pytest.raises(ValueError, match=r"statistics'\]\['0'\]: saved for another layer size: .*key_sum"):
        big_ctl.load_state_dict(state)
    assert big.statistics.num_batches == 0  # nothing was loaded
    RollingQ(_layer(dim=30, heads=3), beta=0.0).load_state_dict(state)  # the right size loads
    old = copy.deepcopy(state)  # a state written before the `tokens` statistic existed
    for sums in [old["statistics"]["0"]["total"], *old["statistics"]["0"]["batches"]]:
        if sums is not None:
            sums.pop("tokens_sum")
    with pytest.raises(ValueError, match=r"missing \['tokens_sum'\] \(a state written by another version"):
        RollingQ(_layer(dim=30, heads=3), beta=0.0).load_state_dict(old)


# --------------------------------------------------------------------------------------------- item 11
def test_constructor_arguments_are_checked_by_name():
    with pytest.raises(TypeError, match=r"attn_drop: expected a float in \[0, 1\), got 'abc'"):
        FusedRollingQAttention(16, num_heads=2, attn_drop="abc")
    with pytest.raises(ValueError, match="proj_drop"):
        FusedRollingQAttention(16, num_heads=2, proj_drop=1.5)
    with pytest.raises(ValueError, match="backend: expected one of"):
        FusedRollingQAttention(16, num_heads=2, backend="cuda")
    with pytest.raises(ValueError, match="segments: expected num_modalities=3"):
        FusedRollingQAttention(16, num_heads=2, num_modalities=3, segments=(4, 4))


def test_controller_names_what_it_expected_for_a_wrong_module():
    with pytest.raises(TypeError, match="modules: expected a FusedRollingQAttention, a sequence .* got a Linear"):
        RollingQ(nn.Linear(2, 2))
    model = nn.Sequential(nn.Linear(30, 30))
    model.add_module("fusion", nn.ModuleDict({"attn": _layer()}))
    wrapper = nn.Module()
    wrapper.add_module("body", model)
    with pytest.raises(TypeError, match=r"holds FusedRollingQAttention layers \(body.fusion.attn\)"):
        RollingQ(wrapper)
    with pytest.raises(TypeError, match="modules: expected .* got int"):
        RollingQ(3)
