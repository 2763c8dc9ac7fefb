"""RollingQ under torch.distributed: 2 CPU processes on gloo compute the rotation of the union of their data."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_on_gloo_ranks

from rollingq_kernels.controller import RollingQ
from rollingq_kernels.module import FusedRollingQAttention

F64 = torch.float64
SEGS = [6, 4]
WORLD = 2


def _layer() -> FusedRollingQAttention:
    torch.manual_seed(0)  # identical initial weights on every rank
    return FusedRollingQAttention(24, num_heads=3, qkv_bias=True, backend="reference").to(F64)


def _batches(rank: int, epoch: int) -> list[torch.Tensor]:
    """Rank-specific data of different batch sizes; in epoch 1 rank 1 has no batch at all."""
    if epoch == 1 and rank == 1:
        return []
    out = []
    for j in range(2):
        g = torch.Generator().manual_seed(1000 * epoch + 100 * rank + j)
        x = torch.randn(3 + 2 * rank + j, 1 + sum(SEGS), 24, generator=g, dtype=F64)
        x[:, 1 : 1 + SEGS[0]] += 1.0 + rank  # the ranks see differently biased data
        out.append(x)
    return out


def _run(layer: FusedRollingQAttention, ctl: RollingQ, ranks: list[int]) -> list[dict]:
    records = []
    for epoch in range(2):
        for rank in ranks:
            for x in _batches(rank, epoch):
                layer(x, SEGS)
        records.append(ctl.step(epoch)[0].to_dict())
    return records


def _worker(rank: int) -> dict:
    layer = _layer()
    ctl = RollingQ(layer, mode="paper", beta=0.0, max_rotations=2, method="plane")
    records = _run(layer, ctl, [rank])
    return {"rotation": layer.rotation, "records": records}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_rotate_identically_as_the_union_of_their_data(tmp_path):
    got = run_on_gloo_ranks(_worker, tmp_path, WORLD)
    assert torch.equal(got[0]["rotation"], got[1]["rotation"])
    assert got[0]["records"] == got[1]["records"]

    layer = _layer()  # one process seeing every rank's batches
    want = _run(layer, RollingQ(layer, mode="paper", beta=0.0, max_rotations=2, method="plane"), list(range(WORLD)))
    torch.testing.assert_close(got[0]["rotation"], layer.rotation, rtol=0, atol=1e-10)
    assert [r["rotated"] for r in want] == [True, True]
    for a, b in zip(got[0]["records"], want):
        assert a["count"] == b["count"] and a["num_rotations"] == b["num_rotations"]
        assert a["air"] == pytest.approx(b["air"], abs=1e-12) and a["alpha"] == pytest.approx(b["alpha"], abs=1e-12)


def _probed_worker(rank: int) -> dict:
    layer = _layer()
    ctl = RollingQ(layer, beta=0.0, max_rotations=2, anchor_limit_deg=180.0, max_angle_deg=180.0, mass_margin=1.0)
    records = []
    for epoch in range(2):
        batches = _batches(rank, epoch) or _batches(0, epoch)[:1]
        for x in batches:
            layer(x, SEGS)
        records.append(ctl.step(epoch, batches, lambda x: layer(x, SEGS))[0].to_dict())
    return {"rotation": layer.rotation, "records": records}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_the_probe_decides_alike_on_every_rank(tmp_path):
    """Each rank probes its own batch; the number the safety rule reads is averaged over ranks."""
    got = run_on_gloo_ranks(_probed_worker, tmp_path, WORLD)
    assert torch.equal(got[0]["rotation"], got[1]["rotation"])
    for a, b in zip(got[0]["records"], got[1]["records"]):
        assert a["action"] == b["action"] and a["anchor_within_rank_correlation"] is not None
        assert a["anchor_within_rank_correlation"] == b["anchor_within_rank_correlation"]
    assert any(a["within_rank_correlation"] != b["within_rank_correlation"]  # the ranks' own probes differ
               for a, b in zip(got[0]["records"], got[1]["records"]))
