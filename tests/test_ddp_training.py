"""DistributedDataParallel with 2 gloo processes (torchrun) equals the single-process run up to float tolerance."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch
from rollingq.checkpoint import load_checkpoint
from rollingq.config import load_config
from rollingq.records import read_metrics
from rollingq.train import train
from subprocess_env import child_pythonpath

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OVERRIDES = [
    "data.synthetic.sizes.train=192", "data.synthetic.sizes.val=61", "data.synthetic.sizes.test=17",
    "data.synthetic.tokens=[5,7]", "data.synthetic.feature_dim=11", "data.num_classes=3",
    "model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2",
    "train.batch_size=32", "train.epochs=2", "train.num_threads=1", "train.progress=false",
    "rollingq.beta=0.0", "rollingq.start_epoch=1", "seed=7", "rollingq.mode=paper",
]


def _close(a, b, tol: float = 1e-4) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)
    return a == b


def test_two_gloo_processes_equal_one_process(tmp_path):
    single = train(load_config("synthetic_rollingq", OVERRIDES), str(tmp_path / "single"))
    ddp_dir = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=child_pythonpath(os.environ.get("PYTHONPATH", "")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rollingq", "train", "--config", "synthetic_rollingq", "--out", ddp_dir, *OVERRIDES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.splitlines().count(ddp_dir) == 1  # the run folder is printed by rank 0 only
    rows_1 = read_metrics(os.path.join(single, "metrics.jsonl"))
    rows_2 = read_metrics(os.path.join(ddp_dir, "metrics.jsonl"))
    assert len(rows_1) == len(rows_2) == 2
    assert rows_1[0]["rotated"] and rows_2[0]["rotated"]  # the controller decided the same on all-reduced statistics
    for r1, r2 in zip(rows_1, rows_2):
        r1 = {k: v for k, v in r1.items() if k != "time_s"}
        r2 = {k: v for k, v in r2.items() if k != "time_s"}
        assert _close(r1, r2), (r1, r2)
    m1 = load_checkpoint(os.path.join(single, "checkpoints", "last.pt"))["model"]
    m2 = load_checkpoint(os.path.join(ddp_dir, "checkpoints", "last.pt"))["model"]
    for key in m1:
        assert torch.allclose(m1[key].double(), m2[key].double(), rtol=1e-4, atol=1e-5), key
