"""A tiny synthetic run for the training-package tests: its config (a few dozen samples, one thin encoder) and a
`rollingq train` child process of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from rollingq.config import Config, load_config
from rollingq.records import read_metrics
from subprocess_env import child_pythonpath

TINY = [
    "data.synthetic.sizes.train=67", "data.synthetic.sizes.val=23", "data.synthetic.sizes.test=19",
    "data.synthetic.tokens=[5,7]", "data.synthetic.feature_dim=11", "data.num_classes=3",
    "model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2",
    "train.batch_size=16", "train.num_threads=1", "train.progress=false",
]


def tiny_config(*extra: str, name: str = "synthetic") -> Config:
    """The packaged config ``name`` with :data:`TINY` and then ``extra`` overrides (``key=value`` strings)."""
    return load_config(name, TINY + list(extra))


def training_process(run: str, *extra: str) -> subprocess.Popen:
    """A `rollingq train` subprocess of the tiny run in ``run`` (800 samples, 200 epochs, ``extra`` overrides),
    returned once its first epoch is in metrics.jsonl (it keeps training; the caller stops it)."""
    cmd = [sys.executable, "-m", "rollingq", "train", "--config", "synthetic", "--out", run, *TINY,
           "data.synthetic.sizes.train=800", "train.epochs=200", *extra]
    env = {**os.environ, "PYTHONPATH": child_pythonpath(os.environ.get("PYTHONPATH", "")), "OMP_NUM_THREADS": "1"}
    # SIGINT as a terminal delivers it, even when the tests run as a background job (which ignores it)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and read_metrics(metrics):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the training process ended early: " + proc.stderr.read().decode()[-2000:])
