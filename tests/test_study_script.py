"""scripts/synthetic_study.py: the arms and grids resolve to configs, placeholders fail by name, the regime
phase runs end to end, and report seeds are refused outside the report phase."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
from rollingq.config import ConfigError, load_config
from rollingq.evaluate import evaluate_run
from rollingq.study import evaluate_replaced

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.dim=16", "model.encoder_depth=1", "model.encoder_heads=2", "train.epochs=1",
        "data.synthetic.sizes.train=67", "data.synthetic.sizes.val=23", "data.synthetic.sizes.test=19",
        "train.batch_size=16"]


@pytest.fixture(scope="module")
def study():
    path = os.path.join(REPO, "scripts", "synthetic_study.py")
    spec = importlib.util.spec_from_file_location("synthetic_study", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_study"] = module
    spec.loader.exec_module(module)
    return module


def test_arms_resolve_to_their_roles_configs(study):
    for arm, fusion in (("audio_only", "unimodal"), ("visual_only", "unimodal"), ("concat", "concat"),
                        ("vanilla_mt", "vanilla_mt")):
        cfg = study.arm_config("avdigits", arm, 101, "/data/x", {"audio": "/runs/a"}, [])
        assert cfg.name == arm and cfg.model.fusion == fusion and cfg.seed == 101 and not cfg.rollingq.enabled
        assert cfg.data.root == "/data/x" and cfg.model.init_encoders == {"audio": "/runs/a"}
    assert study.arm_config("synthetic", "rollingq", 3, None, {}, []).rollingq.enabled
    base = load_config("avdigits_vanilla_mt")
    assert study.arm_overrides("avdigits", "lr_x2", base) == [f"optim.lr={base.optim.lr * 2:g}"]
    assert study.arm_overrides("avdigits", "warmup_3", base) == ["optim.warmup_epochs=3"]
    with pytest.raises(ValueError, match="optim_only: no frozen optimiser-only change"):
        study.arm_overrides("avdigits", "optim_only", base)
    with pytest.raises(ValueError, match="arm: expected one of"):
        study.arm_overrides("avdigits", "adamw_please", base)


def test_an_arm_with_an_unknown_key_names_the_arm(study, monkeypatch):
    monkeypatch.setitem(study.ARMS, "future_arm", ("rollingq", ["rollingq.no_such_setting=1"]))
    with pytest.raises(ConfigError, match="arm 'future_arm' of 'synthetic'.*no_such_setting.*policy-science"):
        study.arm_config("synthetic", "future_arm", 100, None, {}, [])


def test_grids_are_the_registered_ones(study):
    assert len(study.RQ_GRID) == 12 and all(len(v) == 3 for v in study.RQ_GRID.values())
    caps = {int(v[0].split("=")[1]) for v in study.RQ_GRID.values()}
    assert caps == {30, 60, 90}
    assert study.TUNING_SEEDS == [100, 101, 102, 103, 104] and study.REPORT_SEEDS == list(range(10))
    assert set(study.default_arms("report")) == set(study.ARMS)
    assert "rollingq" not in study.default_arms("regime")


def test_regime_phase_end_to_end_and_report_seeds_refused(study, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["synthetic_study.py", "--task", "synthetic", "--phase", "regime", "--seeds", "100", "--jobs", "1",
            "--runs", str(tmp_path / "runs"), "--out", str(out), "--no-figures"]
    for o in TINY:
        argv += ["--set", o]
    monkeypatch.setattr(sys, "argv", argv)
    study.main()
    text = (out / "regime.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 100 |"))
    assert len(row.split("|")) == 13 and "n/a" not in row.split("|")[5]
    for arm in study.NO_ROTATION:
        assert os.path.isfile(tmp_path / "runs" / "synthetic" / f"{arm}_seed100" / "eval_replaced_val.json")
    # the tuning and report tables read the same runs (concat standing in for a tuned setting)
    import study_tables

    done = {arm: [str(tmp_path / "runs" / "synthetic" / f"{arm}_seed100")] for arm in study.NO_ROTATION}
    study_tables.write_tuning(str(tmp_path), "synthetic", done, "val", [100])
    ranking = (tmp_path / "tuning.md").read_text()
    assert "| concat |" in ranking and "| audio_only |" in ranking
    for arm in study.NO_ROTATION:
        evaluate_run(done[arm][0], split="test", noise_modality="audio", checkpoint="last")
        evaluate_replaced(done[arm][0], split="test")
    results = study_tables.write_results(str(tmp_path / "report"), "synthetic", done, False, study.NO_ROTATION[:3])
    text = open(results).read()
    assert "## Paired differences: concat − vanilla_mt" in text and "accuracy, visual replaced by noise" in text
    monkeypatch.setattr(sys, "argv", [*argv[:6], "3", *argv[7:]])
    with pytest.raises(SystemExit):
        study.main()
