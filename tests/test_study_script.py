"""scripts/synthetic_study.py: the arms and grids resolve to configs, an unknown key fails by the arm's name, the
regime phase runs end to end, report seeds are refused outside the report phase, and the frozen choice follows
the protocol's rule."""

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


def test_arms_resolve_to_their_roles_configs(study, monkeypatch):
    for arm, fusion in (("audio_only", "unimodal"), ("visual_only", "unimodal"), ("concat", "concat"),
                        ("vanilla_mt", "vanilla_mt")):
        cfg = study.arm_config("avdigits", arm, 101, "/data/x", {"audio": "/runs/a"}, [])
        assert cfg.name == arm and cfg.model.fusion == fusion and cfg.seed == 101 and not cfg.rollingq.enabled
        assert cfg.data.root == "/data/x" and cfg.model.init_encoders == {"audio": "/runs/a"}
    assert study.arm_config("synthetic", "rollingq", 3, None, {}, []).rollingq.enabled
    for task in ("synthetic", "avdigits"):  # the frozen safe default is the chosen tuning setting
        frozen, tuned = (study.arm_config(task, a, 3, None, {}, [])
                         for a in ("rollingq", "rq_lim180_cap30_start1_rot1"))
        assert frozen.rollingq == tuned.rollingq
    base = load_config("avdigits_vanilla_mt")
    assert study.arm_overrides("avdigits", "lr_x2", base) == [f"optim.lr={base.optim.lr * 2:g}"]
    assert study.arm_overrides("avdigits", "warmup_3", base) == ["optim.warmup_epochs=3"]
    # frozen after tuning: lr x 0.5 on both tuned tasks, the independent set takes avdigits'
    assert study.arm_overrides("avdigits", "optim_only", base) == [f"optim.lr={base.optim.lr * 0.5:g}"]
    assert study.OPTIM_ONLY["avdigits_independent"] == study.OPTIM_ONLY["avdigits"]
    monkeypatch.setitem(study.OPTIM_ONLY, "avdigits", None)
    with pytest.raises(ValueError, match="optim_only: no frozen optimiser-only change"):
        study.arm_overrides("avdigits", "optim_only", base)
    with pytest.raises(ValueError, match="arm: expected one of"):
        study.arm_overrides("avdigits", "adamw_please", base)


def test_an_arm_with_an_unknown_key_names_the_arm(study, monkeypatch):
    monkeypatch.setitem(study.ARMS, "future_arm", ("rollingq", ["rollingq.no_such_setting=1"]))
    with pytest.raises(ConfigError, match="arm 'future_arm' of 'synthetic'.*no_such_setting"):
        study.arm_config("synthetic", "future_arm", 100, None, {}, [])


def test_grids_are_the_registered_ones(study):
    # protocol amendment 1: anchor limit x cap x start x rotations, the same candidates on both tuned tasks
    common = {"rq_lim90_cap30_start1_rot1", "rq_lim90_cap30_start3_rot1", "rq_lim180_cap15_start3_rot1",
              "rq_lim180_cap30_start3_rot1", "rq_lim180_cap60_start3_rot1", "rq_lim180_cap30_start1_rot1"}
    assert set(study.RQ_GRID["avdigits"]) == common
    assert set(study.RQ_GRID["synthetic"]) == common | {"rq_lim180_cap15_start1_rot1", "rq_lim180_cap60_start1_rot1",
                                                        "rq_lim180_cap30_start1_rot3"}
    assert study.rq_settings("avdigits_independent") == study.rq_settings("avdigits")
    cfg = study.arm_config("synthetic", "rq_lim180_cap15_start3_rot1", 100, None, {}, [])
    r = cfg.rollingq
    assert (r.enabled, r.safety, r.anchor_limit_deg, r.max_angle_deg, r.start_epoch, r.max_rotations) == \
        (True, True, 180.0, 15.0, 3, 1)
    measured = study.arm_config("avdigits", "nosafe_cap30_start3_rot1", 100, "/d", {}, []).rollingq
    assert not measured.safety and measured.rollback and measured.max_angle_deg == 30.0
    assert study.TUNING_SEEDS == [100, 101, 102, 103, 104] and study.REPORT_SEEDS == list(range(10))
    assert set(study.default_arms("report", "synthetic")) == set(study.ARMS)
    assert "rollingq" not in study.default_arms("regime", "synthetic")
    assert "nosafe_cap30_start3_rot1" in study.default_arms("tune", "avdigits")


def test_official_arm_is_the_official_preset_on_vanilla_mts_model(study):
    from rollingq_kernels.settings import RollingQSettings

    for task in ("synthetic", "avdigits"):
        official = study.arm_config(task, "rollingq_official", 100, "/d" if task != "synthetic" else None, {}, [])
        vanilla = study.arm_config(task, "vanilla_mt", 100, "/d" if task != "synthetic" else None, {}, [])
        assert official.rollingq.enabled and official.rollingq.settings() == RollingQSettings.preset("official")
        assert official.model.to_dict() == vanilla.model.to_dict() and official.optim == vanilla.optim
    # the task's RollingQ config states keys (start epoch, guard) that would override the preset
    assert study.arm_config("avdigits", "rollingq", 100, "/d", {}, []).rollingq.min_accuracy_gain == 0.05


def _table(settings: dict) -> dict:
    def stat(mean):
        return {"n": 5, "mean": mean, "low": None if mean is None else mean - 0.01,
                "high": None if mean is None else mean + 0.01, "sd": 0.01}

    return {"ranking": list(settings), "settings": {
        name: {"objective": stat(o), "clean": stat(c), "probe": stat(p), "replaced": stat(0.0), "safe": safe}
        for name, (o, c, p, safe) in settings.items()}}


def test_choice_follows_the_protocol_rule():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import study_tables as t

    a, b, c = "rq_lim90_cap30_start3_rot1", "rq_lim180_cap15_start3_rot1", "rq_lim180_cap30_start1_rot1"
    # the best objective wins when safe on both tasks; unsafe on one task disqualifies
    tables = {"synthetic": _table({a: (0.0, 0.0, 0.0, True), b: (0.03, 0.0, 0.0, True), c: (0.2, 0.0, 0.0, True)}),
              "avdigits": _table({a: (0.0, 0.0, 0.0, True), b: (0.02, 0.0, 0.0, True), c: (0.2, -0.3, 0.0, False)})}
    assert t.choose_default(tables, [a, b, c])[0] == b
    # ties within 0.005 go to the weak probe, then to the more conservative setting (limit 90, smaller cap, ...)
    tables = {k: _table({a: (0.001, 0.0, 0.0, True), b: (0.003, 0.0, 0.0, True), c: (0.0, 0.0, 0.0, True)})
              for k in ("synthetic", "avdigits")}
    assert t.choose_default(tables, [a, b, c])[0] == a
    tables["avdigits"]["settings"][c]["probe"]["mean"] = 0.05
    assert t.choose_default(tables, [a, b, c])[0] == c
    assert t._conservative("rq_lim90_cap30_start3_rot1") < t._conservative("rq_lim90_cap30_start1_rot1")
    assert t._conservative("rq_lim180_cap15_start3_rot1") < t._conservative("rq_lim180_cap30_start3_rot1")
    # nothing safe: the fallback
    none_safe = {k: _table({b: (0.1, -0.2, 0.0, False)}) for k in ("synthetic", "avdigits")}
    assert t.choose_default(none_safe, [b])[0] == t.FALLBACK
    # the optimiser winner: safe first, then the objective, ties to the probe
    opt = _table({"lr_x2": (0.04, -0.05, 0.0, False), "warmup_3": (0.01, 0.0, 0.0, True),
                  "lr_x0.5": (0.012, 0.0, 0.02, True)})
    opt["ranking"] = ["warmup_3", "lr_x0.5", "lr_x2"]
    assert t.choose_optimiser(opt, ["lr_x0.5", "lr_x2", "warmup_3"]) == "lr_x0.5"


def test_safe_needs_the_interval_too():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import study_tables as t
    from rollingq.study import RunSummary

    def run(seed, acc):
        return RunSummary("x", seed, "", "audio", "visual", acc, 0.2, [0.0], [acc], None, 0.5, 0.9, None, None,
                          [], [], [], [])

    vanilla = [run(s, 0.9) for s in range(5)]
    # mean -0.008 (>= -0.01) but one seed lost 0.06: the interval's low end is below -0.02
    treated = [run(0, 0.84), *[run(s, 0.9 + 0.0055) for s in range(1, 5)]]
    out = t.tuning_objective(vanilla, treated)
    assert -0.01 <= out["clean"]["mean"] < 0 and out["clean"]["low"] < -0.02 and not out["safe"]
    assert t.tuning_objective(vanilla, [run(s, 0.9) for s in range(5)])["safe"]


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
