"""The statistics accumulator and the RollingQ controller (Algorithm 1)."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from rollingq_kernels.accumulator import StatisticsAccumulator, attention_imbalance_rate, batch_sums, reduce_sums
from rollingq_kernels.controller import RollingQ
from rollingq_kernels.module import FusedRollingQAttention
from rollingq_kernels.ops import rollingq_attention

F64 = torch.float64
SEGS = [7, 5]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _op_stats(B: int, seed: int, segs=SEGS, H=3, Dh=5, lengths=None):
    g = _gen(seed)
    N = 1 + sum(segs)
    q, k, v = (torch.randn(B, H, N, Dh, generator=g, dtype=F64) for _ in range(3))
    k[:, :, 1 : 1 + segs[0]] += 0.7  # a biased modality: nonzero mean keys
    return rollingq_attention(q, k, v, segs, lengths=lengths, backend="reference")[1]


def _batch(B: int, seed: int, dim=30, n=13, bias=1.5) -> torch.Tensor:
    x = torch.randn(B, n, dim, generator=_gen(seed), dtype=F64)
    x[:, 1 : 1 + SEGS[0]] += bias  # modality 0 tokens share a direction
    return x


def _layer(seed=0, dim=30, heads=3, **kw) -> FusedRollingQAttention:
    torch.manual_seed(seed)
    return FusedRollingQAttention(dim, num_heads=heads, qkv_bias=True, backend="reference", **kw).to(F64)


def _cat(stats_list, field):
    return torch.cat([getattr(s, field) for s in stats_list])


def _check_against_concatenation(st, stats_list):
    cos, valid = _cat(stats_list, "cos").double(), _cat(stats_list, "valid")
    imb = attention_imbalance_rate(cos, valid)
    assert st.air_count == imb.count and st.samples == cos.shape[0]
    assert math.isclose(st.air, float(imb.air), rel_tol=0, abs_tol=1e-12)
    assert math.isclose(st.spread, float(imb.spread), rel_tol=0, abs_tol=1e-12)
    torch.testing.assert_close(st.cos_mean, imb.cos_mean, rtol=0, atol=1e-12, equal_nan=True)
    for m in range(cos.shape[1]):
        c = cos[valid[:, m], m]
        assert math.isclose(float(st.cos_std[m]), float(c.std(unbiased=False)), rel_tol=0, abs_tol=1e-9)
        keys = _cat(stats_list, "key_mean").double()[valid[:, m], :, m]  # (n_m, H, Dh)
        torch.testing.assert_close(st.key_mean[:, m], keys.mean(0), rtol=0, atol=1e-12)
        per_head = _cat(stats_list, "cos_per_head").double()[valid[:, m], :, m]
        torch.testing.assert_close(st.cos_head_mean[:, m], per_head.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(st.query_mean, _cat(stats_list, "query").double().mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(st.mass_mean, _cat(stats_list, "mass").double().mean(0), rtol=0, atol=1e-12)


def test_epoch_window_equals_concatenated_batches():
    lengths = [torch.tensor([[7, 5], [0, 3], [2, 0], [7, 1], [5, 5]]), None, torch.tensor([[1, 1], [0, 5], [3, 0]])]
    stats = [_op_stats(len(ln) if ln is not None else 4, seed=i, lengths=ln) for i, ln in enumerate(lengths)]
    acc = StatisticsAccumulator("epoch")
    for s in stats:
        acc.add(s)
    assert acc.num_batches == 3
    _check_against_concatenation(acc.reduce(), stats)


def test_k_window_keeps_the_last_k_batches_and_round_trips():
    stats = [_op_stats(3 + i, seed=10 + i) for i in range(4)]
    acc = StatisticsAccumulator(2)
    for s in stats:
        acc.add(s)
    _check_against_concatenation(acc.reduce(), stats[-2:])
    other = StatisticsAccumulator("epoch")
    other.load_state_dict(acc.state_dict())
    assert other.window == 2
    for a, b in zip(other.sums().values(), acc.sums().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other.add(stats[0])
    _check_against_concatenation(other.reduce(), [stats[3], stats[0]])


def test_sums_are_device_tensors_without_python_numbers():
    sums = batch_sums(_op_stats(4, seed=20))
    assert all(isinstance(v, torch.Tensor) and v.dtype == F64 for v in sums.values())
    assert reduce_sums(sums).samples == 4


def _paper_anchor(cos_mean: torch.Tensor, air: float, keys: torch.Tensor, query: torch.Tensor, rho: float):
    """Eq. 10-11 for two modalities: keys (..., 2, D), query (..., D), air scalar or (...,)."""
    alpha = 0.5 * (1 + torch.tanh(-rho * torch.as_tensor(air, dtype=F64)))
    unit = keys / keys.norm(dim=-1, keepdim=True)
    direction = alpha[..., None] * unit[..., 0, :] + (1 - alpha[..., None]) * unit[..., 1, :]
    return direction * query.norm(dim=-1, keepdim=True), alpha


@pytest.mark.parametrize("mode", ["global", "per_head"])
@pytest.mark.parametrize("method", ["plane", "svd"])
def test_step_moves_the_mean_query_onto_the_paper_anchor(mode, method):
    layer = _layer(rotation_mode=mode)
    ctl = RollingQ(layer, mode="paper", rho=1.5, beta=0.0, method=method)
    batches = [_batch(6, seed=1), _batch(5, seed=2)]
    for x in batches:
        layer(x, SEGS)
    st = layer.window_statistics()
    if mode == "global":
        keys, query = st.global_key_mean(), st.global_query_mean()
        anchor, alpha = _paper_anchor(st.cos_mean, st.air, keys, query, 1.5)
    else:
        keys, query = st.key_mean, st.query_mean
        air_h = st.cos_head_mean[:, 0] - st.cos_head_mean[:, 1]
        anchor, alpha = _paper_anchor(st.cos_head_mean, air_h, keys, query, 1.5)
    (rec,) = ctl.step(epoch=3)
    assert rec.rotated and rec.reason == "rotated" and rec.epoch == 3 and rec.count == 11
    assert rec.mass == pytest.approx(st.mass_mean.mean(0).tolist(), abs=1e-12) and sum(rec.mass) == pytest.approx(1)
    assert int(layer.num_rotations) == 1 and layer.statistics.num_batches == 0
    alpha_rec = torch.tensor(rec.alpha, dtype=F64)
    torch.testing.assert_close(alpha_rec[..., 0], alpha, rtol=0, atol=1e-12)
    cos_angle = torch.nn.functional.cosine_similarity(query, anchor, dim=-1)
    assert math.isclose(rec.cos_before_after, float(cos_angle.mean()), abs_tol=1e-9)
    assert math.isclose(rec.angle_deg, float(torch.rad2deg(torch.arccos(cos_angle)).mean()), abs_tol=1e-6)

    layer.eval()  # the same batches again: the rotated mean query is the anchor (keys do not depend on R)
    queries = []
    with torch.no_grad():
        for x in batches:
            layer(x, SEGS)
            queries.append(layer.last_stats.query.double())
    new_query = torch.cat(queries).mean(0)
    new_query = new_query.reshape(-1) if mode == "global" else new_query
    # a rotation keeps |E[q]|: it lands on the anchor's direction (|q_b| < |E[q]| unless the keys are parallel)
    target = anchor / anchor.norm(dim=-1, keepdim=True) * query.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(new_query, target, rtol=1e-5, atol=1e-5)  # float32 statistics
    R = layer.rotation.double()
    eye = torch.eye(R.shape[-1], dtype=F64)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye.expand_as(R), rtol=0, atol=1e-12)
    if method == "plane" and mode == "global":  # the minimal rotation leaves the complement alone
        w = torch.randn(30, generator=_gen(5), dtype=F64)
        basis = torch.linalg.qr(torch.stack([query, anchor], 1))[0]
        w = w - basis @ (basis.T @ w)
        torch.testing.assert_close(R @ w, w, rtol=0, atol=1e-12)


def test_below_threshold_resets_epoch_window_but_not_a_k_window():
    layer = _layer()
    ctl = RollingQ(layer, mode="paper", beta=2.5)  # |AIR| <= 2 always
    layer(_batch(4, seed=3), SEGS)
    (rec,) = ctl.step(epoch=0)
    assert not rec.rotated and rec.reason == "below_threshold" and rec.alpha == []
    assert layer.statistics.num_batches == 0 and layer.rotation_is_identity
    ctl_k = RollingQ(layer, mode="paper", beta=2.5, window=3)
    layer(_batch(4, seed=3), SEGS)
    ctl_k.step()
    assert layer.statistics.num_batches == 1


def test_max_rotations_caps_the_schedule():
    layer = _layer()
    ctl = RollingQ(layer, mode="paper", beta=0.0, max_rotations=2)
    reasons = []
    for epoch in range(3):
        layer(_batch(5, seed=10 + epoch), SEGS)
        reasons.append(ctl.step(epoch)[0].reason)
    assert reasons == ["rotated", "rotated", "max_rotations"] and int(layer.num_rotations) == 2
    assert [r["num_rotations"] for r in ctl.state_dict()["records"]] == [1, 2, 2]


def test_no_samples_gives_nan_air_no_rotation_and_a_warning(caplog):
    layer = _layer()
    ctl = RollingQ(layer, mode="paper", beta=0.0)
    with caplog.at_level(logging.WARNING, logger="rollingq_kernels"):
        (rec,) = ctl.step(0)  # no batch at all
        assert math.isnan(rec.air) and rec.reason == "no_samples" and not rec.rotated
        layer(_batch(4, seed=4), SEGS, torch.tensor([[7, 0], [3, 0], [1, 0], [7, 0]]))  # modality 1 never present
        (rec,) = ctl.step(1)
    assert math.isnan(rec.air) and rec.reason == "no_samples" and rec.count == 4
    assert sum("no usable statistics" in r.message for r in caplog.records) == 2
    assert layer.rotation_is_identity and torch.isfinite(layer.rotation).all()


@pytest.mark.parametrize("rows", [slice(0, 30), slice(30, 60)], ids=["query", "keys"])
def test_zero_norm_mean_query_or_key_gives_no_rotation(caplog, rows):
    layer = _layer()
    with torch.no_grad():  # the class query (or every key) is exactly zero
        layer.qkv.weight[rows].zero_()
        layer.qkv.bias[rows].zero_()
    ctl = RollingQ(layer, mode="paper", beta=0.0)
    layer(_batch(4, seed=5), SEGS)
    with caplog.at_level(logging.WARNING, logger="rollingq_kernels"):
        (rec,) = ctl.step(0)
    assert rec.reason == "degenerate" and not rec.rotated
    assert any("not rotating" in r.message for r in caplog.records)
    assert torch.isfinite(layer.rotation).all() and int(layer.num_rotations) == 0


@pytest.mark.parametrize(
    "kwargs,name",
    [({"rho": -1.0}, "rho"), ({"rho": float("nan")}, "rho"), ({"beta": -0.1}, "beta"),
     ({"max_rotations": -1}, "max_rotations"), ({"method": "qr"}, "method"), ({"estimate": "full"}, "estimate"),
     ({"window": 0}, "window")],
)
def test_bad_settings_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        RollingQ(_layer(), **kwargs)


def test_pass_estimate_needs_a_loader_and_modules_must_be_layers():
    ctl = RollingQ(_layer(), estimate="pass")
    with pytest.raises(ValueError, match="loader, forward_fn"):
        ctl.step(0)
    with pytest.raises(TypeError, match="FusedRollingQAttention"):
        RollingQ([torch.nn.Linear(3, 3)])


def test_three_modalities_decide_on_the_spread():
    segs = [4, 5, 3]
    torch.manual_seed(6)
    layer = FusedRollingQAttention(20, num_heads=2, num_modalities=3, backend="reference").to(F64)
    x = torch.randn(6, 13, 20, generator=_gen(6), dtype=F64)
    x[:, 1:10] += 1.0  # modalities 0 and 1 alike (small AIR), modality 2 apart (large spread)
    x[:, 10:] -= 2.0
    layer(x, segs)
    st = layer.window_statistics()
    assert abs(abs(st.air) - st.spread) > 1e-3
    beta = (abs(st.air) + st.spread) / 2
    (rec,) = RollingQ(layer, mode="paper", beta=beta).step(0)
    assert rec.rotated == (st.spread >= beta), rec
    assert len(rec.cos_mean) == 3 and (not rec.rotated or math.isclose(sum(rec.alpha), 1.0))


class _Model(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Linear(30, 30)
        self.attn = FusedRollingQAttention(30, num_heads=3, class_query_only=True, backend="reference")
        self.head = torch.nn.Linear(30, 4)
        self.double()

    def forward(self, x):
        return self.head(self.attn(self.embed(x), SEGS)[:, 0])


def _train_epochs(model, ctl, opt, epochs):
    records = []
    for epoch in epochs:
        for j in range(3):
            x = _batch(5, seed=100 * epoch + j)
            y = torch.randint(0, 4, (5,), generator=_gen(100 * epoch + j))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        records += [r.to_dict() for r in ctl.step(epoch)]
    return records


def _fresh(seed=0):
    model = _Model(seed)
    ctl = RollingQ(model.attn, mode="paper", beta=0.0, max_rotations=2, window=4)
    return model, ctl, torch.optim.SGD(model.parameters(), 0.1)


def test_save_load_continue_gives_the_uninterrupted_records():
    model, ctl, opt = _fresh()
    full = _train_epochs(model, ctl, opt, range(4))
    assert [r["reason"] for r in full] == ["rotated", "rotated", "max_rotations", "max_rotations"]

    model, ctl, opt = _fresh()
    first = _train_epochs(model, ctl, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rollingq": ctl.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    model, ctl, opt = _fresh(seed=1)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    ctl.load_state_dict(state["rollingq"])
    rest = _train_epochs(model, ctl, opt, [3])
    assert first + rest == full
    assert [r.to_dict() for r in ctl.records] == full

    model, ctl_fresh, opt = _fresh(seed=1)  # without the controller state the open window is lost
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    assert _train_epochs(model, ctl_fresh, opt, [3])[0]["count"] != full[3]["count"]


def test_retarget_moves_to_the_next_layer_with_its_own_budget():
    first, second = _layer(seed=1), _layer(seed=2)
    ctl = RollingQ({"block0": first}, mode="paper", beta=0.0, window=2)
    first(_batch(4, seed=7), SEGS)
    assert ctl.step(0)[0].layer == "block0" and int(first.num_rotations) == 1
    ctl.retarget({"block1": second})
    assert second.statistics.window == 2
    before = first.rotation.clone()
    first(_batch(4, seed=8), SEGS)
    second(_batch(4, seed=8), SEGS)
    (rec,) = ctl.step(1)
    assert rec.layer == "block1" and rec.rotated and int(second.num_rotations) == 1
    assert torch.equal(first.rotation, before) and [r.layer for r in ctl.records] == ["block0", "block1"]


def test_absent_modalities_never_enter_the_sums_even_when_nan():
    """The accumulator's AIR and per-head cosines skip absent modalities, as attention_imbalance_rate does."""
    from rollingq_kernels.accumulator import imbalance

    stats = _op_stats(5, seed=31, lengths=torch.tensor([[7, 5], [3, 0], [0, 2], [6, 5], [1, 1]]))
    poisoned = stats._replace(cos=stats.cos.masked_fill(~stats.valid, float("nan")),
                              cos_per_head=stats.cos_per_head.masked_fill(~stats.valid[:, None], float("nan")))
    st = reduce_sums(batch_sums(poisoned))
    _check_against_concatenation(st, [stats])
    assert torch.isfinite(st.cos_head_mean).all() and imbalance(st) == st.air
    three = reduce_sums(batch_sums(_op_stats(6, seed=32, segs=[4, 3, 5])))
    assert imbalance(three) == three.spread
