"""Typed config: defaults in one place, unknown keys with suggestions, type and range errors naming the key."""

from __future__ import annotations

import logging
import os

import pytest
import yaml
from rollingq.config import Config, ConfigError, OgmConfig, load_config, read_config, save_config
from rollingq.schema import closest

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_v1")
"""``config.yaml`` files written by the hand-written schema, before the config moved to OmegaConf (then pydantic)."""


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=5", "optim.learning_rate: unknown key; did you mean optim.lr?"),
    ("trian.epochs=7", "trian.epochs: unknown key; did you mean train.epochs?"),
    ("train.epoch=1", "train.epoch: unknown key; did you mean train.epochs?"),
    ("model.rotaton_mode=per_head", "model.rotaton_mode: unknown key; did you mean model.rotation_mode?"),
    ("data.synthetic.sizes.trian=5",
     "data.synthetic.sizes.trian: unknown key; did you mean data.synthetic.sizes.train?"),
    ("data.task=7class", "data.task: a key of the mosei dataset, not of data.name='synthetic'"),
    ("data.zzz=1", "data.zzz: unknown key; expected one of name, modalities"),
])
def test_unknown_keys_name_the_closest_valid_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", [override])
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("config, override, message", [
    ("synthetic", "train.epochs=abc", "train.epochs: input should be a valid integer, got 'abc'"),
    ("synthetic", "train.epochs=2.5", "train.epochs: input should be a valid integer, got 2.5"),
    ("synthetic", "train.epochs=0", "train.epochs: input should be greater than or equal to 1, got 0"),
    ("synthetic", "model.dim=0", "model.dim: input should be greater than or equal to 1, got 0"),
    ("synthetic", "optim.lr=fast", "optim.lr: input should be a valid number, got 'fast'"),
    ("synthetic", "optim.lr=.nan", "optim.lr: input should be a finite number, got nan"),
    ("synthetic", "rollingq.enabled=1", "rollingq.enabled: input should be a valid boolean, got 1"),
    ("synthetic", "rollingq.window=0", "rollingq.window: expected 'epoch' or an integer >= 1"),
    ("synthetic", "rollingq.method=qr", "rollingq.method: expected one of plane, svd, got 'qr'"),
    ("synthetic", "train.grad_clip=-1", "train.grad_clip: input should be greater than 0, got -1"),
    ("synthetic", "data.modalities=audio", "data.modalities: input should be a valid list, got 'audio'"),
    ("synthetic", "data.synthetic.corrupt.test=1.5",
     "data.synthetic.corrupt.test: input should be less than or equal to 1, got 1.5"),
    ("synthetic", "train=5", "train: input should be a valid dictionary or instance of TrainConfig, got 5"),
    ("cremad_vanilla_mt", "data.num_frames=0", "data.num_frames: input should be greater than or equal to 1, got 0"),
    ("cremad_vanilla_mt", "data.image_size=0", "data.image_size: input should be greater than or equal to 16, got 0"),
    ("cremad_vanilla_mt", "data.modalities=[audio,text]", "data.modalities: cremad has audio and visual, got 'text'"),
    ("mosei_vanilla_mt", "data.task=3class", "data.task: input should be 'binary' or '7class', got '3class'"),
])
def test_bad_values_name_the_dotted_key(config, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(config, [override])
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("overrides, message", [
    (["model.dim=30"], "model.encoder_heads: 4 does not divide model.dim 30"),
    (["model.fusion_heads=3"], "model.fusion_heads: 3 does not divide model.dim 64"),
    (["model.fusion=unimodal"], "model.modality: the unimodal head needs one of ['audio', 'visual'], got None"),
    (["data.modalities=[audio]", "data.synthetic.tokens=8"],
     "data.modalities: attention fusion (model.fusion='vanilla_mt') needs >= 2"),
    (["rollingq.enabled=true", "model.fusion=sum"], "rollingq.enabled: RollingQ needs an attention fusion"),
    (["model.fusion=ogm_ge", "ogm.start_epoch=5", "ogm.end_epoch=4"], "ogm.start_epoch: 5 is after ogm.end_epoch 4"),
])
def test_rules_across_keys_are_checked_at_load_time(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", overrides)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("overrides, message", [
    (["rollingq.enabled=true", "rollingq.start_epoch=9", "train.epochs=8"], "RollingQ never rotates"),
    (["model.progressive_epochs=3"], "has no effect with model.fusion='vanilla_mt'"),
    (["data.skip_bad=true"], "data.skip_bad=True has no effect with data.name='synthetic'"),
    (["model.fusion=vanilla_mt_star", "model.progressive_epochs=8", "train.epochs=8"],
     "the second fusion block never trains"),
])
def test_settings_that_cannot_act_are_logged(overrides, message, caplog):
    with caplog.at_level(logging.WARNING, logger="rollingq.config"):
        cfg = load_config("synthetic", overrides)
        assert caplog.text == ""  # loading alone (eval, resume checks, other ranks) says nothing
        cfg.warn_inert_settings()
    assert message in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rollingq.config"):
        fine = load_config("synthetic", ["rollingq.enabled=true", "rollingq.start_epoch=2", "train.epochs=8"])
        fine.warn_inert_settings()
    assert caplog.text == ""


def test_ogm_epochs_are_checked_only_for_the_ogm_fusion():
    assert load_config("synthetic", ["ogm.start_epoch=5", "ogm.end_epoch=4"]).ogm.start_epoch == 5


def test_a_misspelled_key_in_a_file_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: " + str(tmp_path / "base.yaml") + "\ntrain: {epoch: 1}\n")
    (tmp_path / "base.yaml").write_text("model: {dim: 32}\n")
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key; did you mean train\.epochs\?"):
        load_config(str(path))
    path.write_text("base: base.yaml\ntrain: {epochs: 3}\n")
    cfg = load_config(str(path))
    assert (cfg.train.epochs, cfg.model.dim, cfg.model.encoder_depth) == (3, 32, 2)


def test_defaults_live_in_the_sections():
    cfg = Config()
    assert cfg.ogm.end_epoch == OgmConfig().end_epoch == 1000
    assert cfg.data.options.synthetic.sizes.train == 2048 and cfg["data"]["synthetic"].feature_dim == 16
    assert load_config(None, []).to_dict() == cfg.to_dict()
    assert load_config("cremad_vanilla_mt").data.options.train_list == "train.csv"
    assert load_config("kinetics_sounds_vanilla_mt", ["data.num_frames=2"])["data"]["num_frames"] == 2


def test_saved_config_round_trips_in_the_yaml_shape(tmp_path):
    cfg = load_config("kinetics_sounds_ogm_ge", ["data.classes=[a, b]", "train.grad_clip=1.5"])
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    with open(path) as f:
        raw = yaml.safe_load(f)
    assert raw["data"]["fbank_frames"] == 1024 and raw["data"]["classes"] == ["a", "b"] and "options" not in raw["data"]
    assert raw["ogm"]["end_epoch"] == 30 and raw["train"]["grad_clip"] == 1.5
    assert read_config(path) == cfg
    raw["model"]["dimm"] = 3
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    with pytest.raises(ConfigError, match=r"config\.yaml: model\.dimm: unknown key; did you mean model\.dim\?"):
        read_config(path)


def test_a_renamed_key_of_an_old_run_is_read_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="rollingq.config"):
        cfg = Config.from_dict({"model": {"rotation": "per_head"}})
    assert cfg.model.rotation_mode == "per_head" and "model.rotation is now model.rotation_mode" in caplog.text


def test_closest_key():
    keys = ["name", "lr", "momentum", "weight_decay", "warmup_epochs", "min_lr"]
    assert closest("learning_rate", keys) == "lr" and closest("wd", keys) == "weight_decay"
    assert closest("LR", keys) == "lr" and closest("momentun", keys) == "momentum"
    assert closest("trian", ["train", "data"]) == "train" and closest("zzz", keys) is None


# ---------------------------------------------------------------- hostile values (issue 25, items 7 and 9)
@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", ".", "", "a\\b", "x\0y"])
def test_a_run_name_is_one_plain_path_component(name):
    with pytest.raises(ConfigError, match=r"^name: expected one plain folder name"):
        Config.from_dict({"name": name})
    with pytest.raises(ConfigError, match=r"^name: expected one plain folder name"):
        load_config("synthetic", ["name=../../../x"])
    assert load_config("synthetic", ["name=vanilla_mt+rollingq x"]).name == "vanilla_mt+rollingq x"


@pytest.mark.parametrize("override, key", [
    ("seed=1e30", "seed"), ("seed=100000000000000000000", "seed"), ("train.batch_size=1e20", "train.batch_size"),
    ("train.epochs=-1e300", "train.epochs"), ("data.synthetic.sizes.train=1e19", "data.synthetic.sizes.train"),
])
def test_huge_integers_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected an integer between -9223372036854775808 and "):
        load_config("synthetic", [override])
    with pytest.raises(ConfigError, match=r"^seed: input should be less than or equal to 4294967295, got 4294967296"):
        load_config("synthetic", ["seed=4294967296"])
    assert load_config("synthetic", ["seed=4294967295"]).seed == 4294967295


def _bomb(levels: int, fan: int = 9) -> str:
    """A 'billion laughs' YAML value: ``fan ** levels`` strings through nested aliases."""
    lines = [f"lol0: &l0 [{', '.join(['lol'] * fan)}]"]
    lines += [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_nested_aliases_are_refused_quickly_and_errors_stay_short(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(7))  # 9**6 = 531441 strings behind unknown keys, echoed whole before
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert len(message) < 1000 and str(path) in message and "alias" in message, message[:300]
    with pytest.raises(ConfigError, match=r"^override 'data.x=.*alias") as err:
        load_config("synthetic", ["data.x=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                                  "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                                  "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]"])
    assert len(str(err.value)) < 1000
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("train: &t {epochs: 2, more: *t}\n")
    with pytest.raises(ConfigError, match="recursive"):
        load_config(str(recursive))
    fine = tmp_path / "fine.yaml"  # a few aliases are fine
    fine.write_text("train: {epochs: &e 3, batch_size: *e}\n")
    assert load_config(str(fine)).train.batch_size == 3


@pytest.mark.parametrize("override", ["optim.lr=" + "9" * 5000, "optim.lr=" + "9" * 4000,
                                      "optim.lr=[" + ",".join(["x"] * 5000) + "]", "x" * 5000 + "=1",
                                      "optim.lr=" + "{a: " * 200 + "1" + "}" * 200])
def test_an_error_echoes_a_bounded_part_of_what_it_got(override):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", [override])
    assert len(str(err.value)) < 600, len(str(err.value))


def test_deeply_nested_yaml_and_huge_files_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml.*nested"):
        load_config(str(deep))
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\nname: big\n")
    with pytest.raises(ConfigError, match=r"big.yaml: .*bytes"):
        load_config(str(big))


def test_a_base_that_is_not_a_file_name_is_one_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: [a.yaml, b.yaml]\ntrain: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base: expected a file name relative to it, got \['a\.yaml'"):
        load_config(str(path))
