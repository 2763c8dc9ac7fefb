"""rollingq.study: paired t-intervals, the collapse criteria, run summaries from eval.json + metrics.jsonl."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
from rollingq.study import RunSummary, collapse_checks, pair_by_seed, paired_interval, paired_rows, summarize_run
from scipy import stats


def _run(seed: int, acc: float, repl: float, mass=0.98, mass_repl=0.99, air=(0.3, 0.9), probe=0.7, name="v"):
    return RunSummary(name=name, seed=seed, run_dir="", dominant="audio", weak="visual", accuracy=acc,
                      accuracy_replaced=repl, noise_levels=[0.0, 0.5], noise_curve=[acc, acc - 0.1], pearson=None,
                      probe_weak=probe, probe_dominant=0.99, mass_clean=mass, mass_replaced=mass_repl,
                      air_epochs=list(air), mass_epochs=[0.7, mass], val_epochs=[0.9, 0.95], rotations=[])


def test_paired_interval_is_students_t():
    diffs = [0.013, -0.004, 0.021, 0.007, -0.011, 0.002, 0.016]
    got = paired_interval(diffs + [None])
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / len(diffs), scale=stats.sem(diffs))
    assert got.n == 7 and got.low == pytest.approx(low, abs=1e-12) and got.high == pytest.approx(high, abs=1e-12)
    assert paired_interval([0.5]).low is None and paired_interval([]).mean is None
    assert "[" in got.text() and paired_interval([]).text() == "n/a"


def test_collapse_checks():
    assert collapse_checks(_run(0, 0.98, 0.3)) == {"mass": True, "static": True, "air_grows": True, "probe_gap": True}
    bad = collapse_checks(_run(0, 0.98, 0.65, mass=0.6, mass_repl=0.3, air=(0.5, 0.2), probe=0.7))
    assert bad == {"mass": False, "static": False, "air_grows": False, "probe_gap": False}
    # the dominant modality second of two: AIR = cos_0 - cos_1 falls as the collapse grows
    second = dataclasses.replace(_run(0, 0.98, 0.3, air=(-0.3, -0.9)), dominant="visual", weak="audio", air_sign=-1)
    assert collapse_checks(second)["air_grows"] is True
    assert collapse_checks(dataclasses.replace(second, air_sign=1))["air_grows"] is False


def test_pairs_match_seeds_and_rows_are_differences():
    base = [_run(s, 0.90 + 0.01 * s, 0.3) for s in (0, 1, 2)]
    treated = [_run(s, 0.92 + 0.01 * s, 0.3 + 0.02 * s, name="t") for s in (1, 2, 3)]
    pairs = pair_by_seed(base, treated)
    assert [(a.seed, b.seed) for a, b in pairs] == [(1, 1), (2, 2)]
    rows = dict(paired_rows(pairs))
    assert rows["accuracy, clean"].mean == pytest.approx(0.02) and rows["accuracy, clean"].sd == pytest.approx(0.0)
    assert rows["accuracy, audio replaced by noise"].mean == pytest.approx(0.03)
    assert "AIR, epoch 2" in rows and "accuracy, noise level 0.5 on audio" in rows


def test_summarize_run_reads_eval_and_metrics(tmp_path):
    result = {"modalities": ["audio", "visual"], "noise_modality": "audio", "name": "vanilla_mt", "run_seed": 4,
              "accuracy": 0.97, "accuracy_noise_replaced": 0.31, "probe_accuracy": {"audio": 0.96, "visual": 0.7},
              "attention": {"clean": {"class": 0.0, "audio": 0.99, "visual": 0.01},
                            "noise_replaced": {"class": 0.0, "audio": 0.98, "visual": 0.02}},
              "pearson": {"r_quality": 0.05}, "noise_robustness": {"levels": [0.0, 1.0], "accuracy": [0.97, 0.8]}}
    (tmp_path / "eval.json").write_text(json.dumps(result))
    rows = [{"epoch": e, "air": 0.1 * e, "mass": [0.0, 0.6 + 0.1 * e, 0.4 - 0.1 * e], "val_acc": 0.9,
             "rotated": e == 2} for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = summarize_run(str(tmp_path))
    got = (r.seed, r.dominant, r.weak, r.probe_weak, r.mass_clean, r.mass_replaced)
    assert got == (4, "audio", "visual", 0.7, 0.99, 0.98)
    assert r.rotations == [2] and r.mass_epochs == pytest.approx([0.7, 0.8, 0.9])
    assert math.isclose(r.air_epochs[-1], 0.3) and r.air_sign == 1
    result["noise_modality"] = "visual"  # dominant second of two: AIR points the other way
    (tmp_path / "eval.json").write_text(json.dumps(result))
    assert summarize_run(str(tmp_path)).air_sign == -1
    assert os.path.basename(r.run_dir) == os.path.basename(str(tmp_path))
