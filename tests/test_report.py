"""``write_report`` draws every figure from tiny run directories and tabulates groups of seeds."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import yaml
from PIL import Image
from rollingq.analysis.report import FIGURES, fmt, write_report
from rollingq.analysis.runs import load_run_record, read_metrics
from rollingq.evaluate import evaluate_model
from test_analysis_metrics import TinyFusion, _toy_loader


@functools.cache
def _tiny_eval(seed: int) -> dict:
    """evaluate_model of a tiny random fusion model (cached: the report test reuses it per seed)."""
    torch.manual_seed(seed)
    return evaluate_model(TinyFusion(5, 8, 3), _toy_loader(seed=seed), ["audio", "visual"], seed=seed)


def _fake_run(root: str, name: str, seed: int, rotations: list[int], epochs: int = 5, evaluate: bool = True) -> str:
    """A run directory as ``rollingq train`` + ``rollingq eval`` write it, from a tiny real model."""
    run_dir = os.path.join(root, f"{name}-s{seed}")
    os.makedirs(run_dir)
    cfg = {"name": name, "seed": seed, "data": {"name": "synthetic", "modalities": ["audio", "visual"]},
           "model": {"fusion": "vanilla_mt"}, "rollingq": {"enabled": bool(rotations), "beta": 0.1}}
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    gen = torch.Generator().manual_seed(seed)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for epoch in range(1, epochs + 1):
            mass = torch.rand(3, generator=gen)
            mass = (mass / mass.sum()).tolist()
            record = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.4 + 0.05 * epoch,
                      "val_acc": 0.3 + 0.07 * epoch + 0.01 * seed, "val_macro_f1": 0.3, "lr": 0.01,
                      "air": float(torch.rand(1, generator=gen)) - 0.3, "mass": mass, "cos": [0.4, 0.1],
                      "rollingq": [], "rotated": epoch in rotations, "time_s": 0.1}
            f.write(json.dumps(record) + "\n" + "\n" * (epoch == 2))  # a blank line is tolerated
    if evaluate:
        result = _tiny_eval(seed)
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump({"run_dir": run_dir, "name": name, "split": "test", **result}, f)
    return run_dir


def _check_png(path: str) -> None:
    assert os.path.getsize(path) > 1000
    with Image.open(path) as img:
        img.load()
        assert img.width > 100 and img.height > 100
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 10, "the figure is blank"


def test_report_draws_every_figure_and_tabulates_groups(tmp_path):
    runs = [
        _fake_run(str(tmp_path), "vanilla_mt", 0, []),
        _fake_run(str(tmp_path), "vanilla_mt", 1, []),
        _fake_run(str(tmp_path), "vanilla_mt+rollingq", 0, [2]),
        _fake_run(str(tmp_path), "vanilla_mt+rollingq", 1, [2, 4]),
    ]
    out = tmp_path / "report"
    path = write_report(runs, str(out))
    assert path == str(out / "report.md")
    for filename in FIGURES:
        _check_png(str(out / filename))
    text = (out / "report.md").read_text()
    for filename in FIGURES:
        assert f"]({filename})" in text
    assert "| vanilla_mt | 2 |" in text and "| vanilla_mt+rollingq | 2 |" in text
    assert "level 0.25" in text and "level 1" in text
    # the summary's accuracy cell is the mean ± sample std of the two seeds' eval.json accuracies
    accs = [json.load(open(os.path.join(r, "eval.json")))["accuracy"] for r in runs[:2]]
    assert fmt(accs) in text.split("| vanilla_mt | 2 |")[1].splitlines()[0]
    assert "2, 4" in text  # rotation epochs of the second rollingq seed


def test_report_without_eval_keeps_the_training_figures(tmp_path):
    run = _fake_run(str(tmp_path), "vanilla_mt", 3, [3], evaluate=False)
    out = tmp_path / "out"
    write_report([run], str(out))
    _check_png(str(out / "training_dynamics.png"))
    _check_png(str(out / "val_accuracy.png"))
    for filename in ("attention_noise.png", "key_distribution.png", "noise_robustness.png"):
        assert not (out / filename).exists()
    assert "No run has a noise-robustness curve" in (out / "report.md").read_text()


def test_fmt_and_run_reading(tmp_path):
    assert fmt([0.5, 0.7]) == "0.600 ± 0.141"
    assert fmt([0.25]) == "0.250"
    assert fmt([None]) == "–"
    run = _fake_run(str(tmp_path), "x", 2, [1, 4], evaluate=False)
    record = load_run_record(run)
    assert (record.name, record.seed, record.rotation_epochs, len(record.epochs)) == ("x", 2, [1, 4], 5)
    assert record.modalities == ["audio", "visual"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_metrics(str(bad))
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_run_record(str(tmp_path))
    with pytest.raises(ValueError, match="run_dirs is empty"):
        write_report([], str(tmp_path / "r"))


def test_eval_and_report_on_a_real_one_epoch_run(tmp_path):
    """``rollingq train`` → ``evaluate_run`` → ``write_report`` on a tiny synthetic run (the real interfaces)."""
    train_mod = pytest.importorskip("rollingq.train", reason="the training package is not installed")
    from rollingq.config import load_config
    from rollingq.evaluate import evaluate_run

    overrides = ["train.epochs=1", "train.progress=false", "train.bf16=false", "model.dim=16", "model.encoder_depth=1",
                 "data.synthetic.sizes={train: 97, val: 31, test: 53}", "train.batch_size=32"]
    run_dirs = []
    for name, enabled in (("vanilla_mt", "false"), ("vanilla_mt+rollingq", "true")):
        cfg = load_config("synthetic", [*overrides, f"name={name}", f"rollingq.enabled={enabled}"])
        run_dirs.append(train_mod.train(cfg, str(tmp_path / name.replace("+", "_"))))
    for run_dir in run_dirs:
        result = evaluate_run(run_dir, split="test", seed=1)
        assert result["num_samples"] == 53
        assert result["noise_modality"] in ("audio", "visual")
        assert sum(result["attention"]["clean"].values()) == pytest.approx(1.0, abs=1e-5)
        assert len(result["noise_robustness"]["accuracy"]) == 5
        with open(os.path.join(run_dir, "eval.json")) as f:
            assert json.load(f)["accuracy"] == result["accuracy"]
    # another split goes to its own file: eval.json (the test split, read by the report) is untouched
    val = evaluate_run(run_dirs[0], split="val", seed=1)
    assert val["split"] == "val" and val["num_samples"] == 31
    with open(os.path.join(run_dirs[0], "eval_val.json")) as f:
        assert json.load(f)["num_samples"] == 31
    with open(os.path.join(run_dirs[0], "eval.json")) as f:
        assert json.load(f)["split"] == "test"
    assert not [n for n in os.listdir(run_dirs[0]) if ".tmp." in n]
    out = tmp_path / "report"
    write_report(run_dirs, str(out))
    for filename in FIGURES:
        _check_png(str(out / filename))


def test_report_with_a_static_fusion_run(tmp_path):
    """A run without attention statistics keeps its accuracy rows and noise curve; attention cells stay empty."""
    from test_analysis_metrics import StaticFusion

    attn_run = _fake_run(str(tmp_path), "vanilla_mt", 0, [])
    static_run = _fake_run(str(tmp_path), "concat", 0, [], evaluate=False)
    torch.manual_seed(0)
    result = evaluate_model(StaticFusion(5, 8, 3), _toy_loader(), ["audio", "visual"], seed=0)
    with open(os.path.join(static_run, "eval.json"), "w") as f:
        json.dump({"name": "concat", "split": "test", **result}, f)
    out = tmp_path / "out"
    write_report([attn_run, static_run], str(out))
    text = (out / "report.md").read_text()
    concat_rows = [line for line in text.splitlines() if line.startswith("| concat | 1 |")]
    assert len(concat_rows) == 2  # accuracy and attention-dynamics tables
    assert fmt([result["accuracy"]]) in concat_rows[0]
    assert concat_rows[1].count("| – |") >= 3
    for filename in FIGURES:
        _check_png(str(out / filename))


def _retag(run_dir: str, dataset: str) -> None:
    """Rewrite a fake run's config.yaml with another ``data.name``."""
    path = os.path.join(run_dir, "config.yaml")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["data"]["name"] = dataset
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)


def test_groups_are_per_dataset_and_a_repeated_seed_is_warned(tmp_path, caplog):
    """Two datasets' ``vanilla_mt`` runs form two groups; one seed twice in a group is logged."""
    from rollingq.analysis.runs import group_runs

    synth = _fake_run(str(tmp_path / "a"), "vanilla_mt", 0, [], evaluate=False)
    cremad = _fake_run(str(tmp_path / "b"), "vanilla_mt", 0, [], evaluate=False)
    _retag(cremad, "cremad")
    groups = group_runs([load_run_record(synth), load_run_record(cremad)])
    assert {k: [r.run_dir for r in v] for k, v in groups.items()} == {
        "synthetic/vanilla_mt": [synth], "cremad/vanilla_mt": [cremad]}
    assert not [r for r in caplog.records if "more than once" in r.getMessage()]

    twin = _fake_run(str(tmp_path / "c"), "vanilla_mt", 0, [], evaluate=False)
    with caplog.at_level("WARNING", logger="rollingq.analysis.runs"):
        groups = group_runs([load_run_record(synth), load_run_record(twin)])
    assert list(groups) == ["vanilla_mt"] and len(groups["vanilla_mt"]) == 2
    assert any("seed 0 more than once" in r.getMessage() for r in caplog.records)


def test_report_across_two_datasets(tmp_path):
    """Runs of two datasets with the same names: every figure and table is drawn per ``dataset/name``."""
    runs = []
    for dataset in ("synthetic", "cremad"):
        for name, rotations in (("vanilla_mt", []), ("vanilla_mt+rollingq", [2])):
            run = _fake_run(str(tmp_path / dataset), name, 0, rotations)
            _retag(run, dataset)
            runs.append(run)
    out = tmp_path / "report"
    write_report(runs, str(out))
    for filename in FIGURES:
        _check_png(str(out / filename))
    text = (out / "report.md").read_text()
    for group in ("synthetic/vanilla_mt", "cremad/vanilla_mt", "cremad/vanilla_mt+rollingq"):
        assert f"| {group} | 1 |" in text  # the accuracy table
        assert f"| {group} | 0 |" in text  # the runs table (seed 0)


def test_a_failed_report_leaves_no_partial_folder_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from rollingq.analysis import report as report_module

    run = _fake_run(str(tmp_path), "vanilla_mt", 0, [2])
    out = tmp_path / "report"

    def broken(runs, path):
        raise RuntimeError("drawing failed")

    figures = dict(FIGURES, **{"noise_robustness.png": ("broken", broken)})
    monkeypatch.setattr(report_module, "FIGURES", figures)
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_report([run], str(out))
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if "partial" in n]

    monkeypatch.setattr(report_module, "FIGURES", FIGURES)
    write_report([run], str(out))
    (out / "notes.txt").write_text("mine")  # a file of the user's: never touched
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    monkeypatch.setattr(report_module, "FIGURES", figures)
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_report([run], str(out))
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]
