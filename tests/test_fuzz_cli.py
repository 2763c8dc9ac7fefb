"""Fuzzing the command line's overrides and config files, the loaders' list files and media files, and
checkpoints (issue 25): success, or one error line naming the key or file; never a traceback; bounded
time; files that existed before stay as they were. The harness is ``fuzz_cli.py``."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml
from fake_data import write_tiny_cremad, write_tiny_kinetics
from fuzz_cli import (
    assert_untouched,
    byte_edits,
    check_cli,
    check_loader,
    flat_keys,
    fuzz_settings,
    list_files,
    override_keys,
    run_cli,
    run_cli_process,
    snapshot,
    yaml_values,
)
from hypothesis import given
from hypothesis import strategies as st
from rollingq.build import build_dataset
from rollingq.config import Config, load_config
from rollingq.data.cremad import EMOTIONS

TINY = ["data.synthetic.sizes.train=24", "data.synthetic.sizes.val=8", "data.synthetic.sizes.test=8",
        "data.synthetic.tokens=[3,4]", "data.synthetic.feature_dim=5", "model.dim=8", "model.encoder_depth=1",
        "model.encoder_heads=2", "train.batch_size=8", "train.epochs=1"]
GUARDS = ("out_dir", "data.num_workers", "train.num_threads", "train.progress", "device")
"""Keys the harness sets itself (after the fuzzed one): where runs go, and no extra processes or threads."""
KEYS = [k for k in flat_keys(Config().to_dict()) if k not in GUARDS and not k.startswith("data.options")]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> str:
    """A folder with files that no input may touch; runs go to ``sandbox/runs``."""
    root = str(tmp_path_factory.mktemp("sandbox"))
    os.makedirs(os.path.join(root, "keep", "deeper"))
    for rel, text in (("keep/notes.txt", "mine"), ("keep/deeper/eval.json", "{}"), ("x", "decoy")):
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    return root


def _runs(sandbox: str) -> str:
    return os.path.join(sandbox, "runs")


@fuzz_settings(ci_examples=30)
@given(key=override_keys(KEYS), value=yaml_values())
def test_fuzz_config_overrides(sandbox, key, value):
    before = snapshot(sandbox, skip=["runs"])
    guards = [f"out_dir={_runs(sandbox)}", "data.num_workers=0", "train.num_threads=1", "train.progress=false",
              "device=cpu"]
    override = f"{key}={value}"
    outcome = run_cli(["train", "--config", "synthetic", *TINY, override, *guards])
    section = key.split(".")[0]
    check_cli(outcome, [key.strip(), repr(key.strip())[1:-1], f"{section}.", "override", "name:", "--out"],
              repr(override))
    assert_untouched(before, snapshot(sandbox, skip=["runs"]), repr(override))


@fuzz_settings(ci_examples=20)
@given(body=st.one_of(
    yaml_values(),
    st.dictionaries(override_keys(KEYS).map(lambda k: k.split(".")[0]), yaml_values(), max_size=3).map(
        lambda d: "\n".join(f"{k}: {v}" for k, v in d.items())),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
))
def test_fuzz_config_files(sandbox, tmp_path_factory, body):
    folder = str(tmp_path_factory.mktemp("cfg"))
    path = os.path.join(folder, "fuzzed.yaml")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(body)
    before = snapshot(sandbox, skip=["runs"])
    outcome = run_cli(["train", "--config", path, *TINY, "train.num_threads=1", "train.progress=false",
                       f"out_dir={_runs(sandbox)}", "data.num_workers=0", "device=cpu"])
    sections = [f"{key}{end}" for key in Config().to_dict() for end in (".", ":")]
    check_cli(outcome, [path, *sections], repr(body))
    assert_untouched(before, snapshot(sandbox, skip=["runs"]), repr(body))


# ------------------------------------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def cremad_root(tmp_path_factory) -> str:
    return write_tiny_cremad(str(tmp_path_factory.mktemp("cremad") / "root"), n_train=6, n_test=4)


@pytest.fixture(scope="module")
def kinetics_root(tmp_path_factory) -> str:
    return write_tiny_kinetics(str(tmp_path_factory.mktemp("ks") / "root"), n_train=6, n_test=3, fbank_frames=64)


def _clips(root: str) -> list[str]:
    return sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(root, "AudioWAV")))


_counter = iter(range(10**9))


@fuzz_settings(ci_examples=25)
@given(train=st.data(), test=st.data())
def test_fuzz_list_files(cremad_root, kinetics_root, train, test):
    for dataset, root in (("cremad", cremad_root), ("kinetics_sounds", kinetics_root)):
        if dataset == "cremad":
            names, labels, sep, ext = _clips(root), list(EMOTIONS), ",", ".csv"
        else:
            names = sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(root, "audio")))
            labels, sep, ext = ["0", "1", "2", "3", "30", "class_a"], " ", ".txt"
        before = snapshot(root)
        n = next(_counter)
        lists = {}
        for split, data in (("train", train), ("test", test)):
            lists[split] = os.path.join(root, f"fuzz_{n}_{split}{ext}")
            with open(lists[split], "w", encoding="utf-8") as f:
                f.write(data.draw(list_files(names, labels, sep), label=f"{dataset} {split}"))
        extra = ["data.audio_features=fbank", "data.fbank_frames=64", "data.num_classes=31"] if (
            dataset == "kinetics_sounds") else []
        cfg = load_config(f"{dataset}_vanilla_mt", [f"data.root={root}", "data.image_size=16", "data.val_fraction=0.3",
                                                    f"data.train_list={os.path.basename(lists['train'])}",
                                                    f"data.test_list={os.path.basename(lists['test'])}", *extra])
        for split in ("train", "test"):
            ds = check_loader(build_dataset, (cfg, split), [root, "data."], f"{dataset} {split}")
            if ds is not None and len(ds):
                check_loader(ds.__getitem__, (len(ds) - 1,), [root], f"{dataset} {split} sample")
        for path in lists.values():
            os.remove(path)
        assert_untouched(before, snapshot(root), dataset)


@fuzz_settings(ci_examples=20)
@given(kind=st.sampled_from(["wav", "jpg", "npy"]), edit=byte_edits(), skip_bad=st.booleans())
def test_fuzz_media_files(cremad_root, kinetics_root, tmp_path_factory, kind, edit, skip_bad):
    source = cremad_root if kind != "npy" else kinetics_root
    root = str(tmp_path_factory.mktemp("media") / "root")
    shutil.copytree(source, root)
    if kind == "wav":
        target = os.path.join(root, "AudioWAV", _clips(root)[0] + ".wav")
    elif kind == "jpg":
        folder = os.path.join(root, "Image-01-FPS", _clips(root)[0])
        target = os.path.join(folder, sorted(os.listdir(folder))[0])
    else:
        target = os.path.join(root, "audio", "train_000.npy")
    with open(target, "rb") as f:
        data = f.read()
    with open(target, "wb") as f:
        f.write(edit(data))
    before = snapshot(root)
    if kind == "npy":
        cfg = load_config("kinetics_sounds_vanilla_mt", [f"data.root={root}", "data.image_size=16",
                                                         "data.audio_features=fbank", "data.fbank_frames=64",
                                                         f"data.skip_bad={str(skip_bad).lower()}",
                                                         "data.num_classes=31", "data.val_fraction=0.3"])
    else:
        cfg = load_config("cremad_vanilla_mt", [f"data.root={root}", "data.image_size=16", "data.val_fraction=0.3",
                                                f"data.skip_bad={str(skip_bad).lower()}"])
    for split in ("train", "val"):
        ds = check_loader(build_dataset, (cfg, split), [target, root], f"{kind} {split}")
        for i in range(len(ds) if ds is not None else 0):
            sample = check_loader(ds.__getitem__, (i,), [target], f"{kind} {split} sample {i}")
            if sample is not None:
                assert all(torch.isfinite(x).all() for x in sample[0]), (kind, split, i)
    assert_untouched(before, snapshot(root), kind)


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("ckpt") / "run")
    assert run_cli(["train", "--config", "synthetic", *TINY, "train.num_threads=1", "train.progress=false",
                    "--out", run]).code == 0
    return run


def _hostile():
    return st.sampled_from([None, -5, 0, True, 1e308, "x", [], {}, torch.zeros(0), torch.full((2,), float("nan"))])


@fuzz_settings(ci_examples=15)
@given(data=st.data())
def test_fuzz_checkpoints(finished, tmp_path_factory, data):
    run = str(tmp_path_factory.mktemp("resume") / "run")
    shutil.copytree(finished, run)
    path = os.path.join(run, "checkpoints", "last.pt")
    state = torch.load(path, weights_only=True)
    key = data.draw(st.sampled_from(sorted(state) + ["rng.numpy", "optimizer.param_groups", "scheduler.last_epoch",
                                                     "history.0"]), label="key")
    action = data.draw(st.sampled_from(["drop", "replace"]), label="action")
    parent, leaf = (state, key) if "." not in key else (state[key.split(".")[0]], key.split(".")[1])
    if isinstance(parent, list):
        leaf = int(leaf)
    if action == "drop" and isinstance(parent, dict):
        parent.pop(leaf, None)
    else:
        parent[leaf] = data.draw(_hostile(), label="value")
    torch.save(state, path)
    with open(os.path.join(run, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["train"]["epochs"] = 2
    with open(os.path.join(run, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    outcome = run_cli(["train", "--resume", run, "--force"])
    check_cli(outcome, ["last.pt"], f"{action} {key}")


# ------------------------------------------------------------------------------------------- a few, for real
@pytest.mark.parametrize("args, code, names", [
    (["optim.warmup_epochs=1e308"], 0, []),  # was an OverflowError traceback
    (["name=../../../x", "data.x=[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
      "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], "
      "[*e,*e,*e,*e,*e,*e,*e,*e,*e]]"], 2, ["data.x"]),  # an alias bomb: 9**6 values, refused unexpanded
])
def test_hostile_inputs_in_a_fresh_process(sandbox, tmp_path, args, code, names):
    before = snapshot(sandbox, skip=["runs"])
    outcome = run_cli_process(["train", "--config", "synthetic", *TINY, "train.num_threads=1", "train.progress=false",
                               f"out_dir={_runs(sandbox)}", *args], cwd=str(tmp_path))
    assert outcome.code == code, outcome.stderr[-2000:]
    check_cli(outcome, names, " ".join(args), limit_s=60)
    assert_untouched(before, snapshot(sandbox, skip=["runs"]), " ".join(args))
    assert os.listdir(tmp_path) == []
