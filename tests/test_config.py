"""Typed config: defaults in one place, unknown keys with suggestions, type and range errors naming the key."""

from __future__ import annotations

import logging
import os
import pickle
import re

import pytest
import yaml
from rollingq.config import Config, ConfigError, OgmConfig, load_config, read_config, save_config
from rollingq.data.synthetic import SplitSizes
from rollingq.schema import closest

from rollingq_kernels.settings import RollingQSettings

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_v1")
"""``config.yaml`` files written by the hand-written schema, before the config moved to OmegaConf."""


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
    ("synthetic", "train.epochs=abc", "train.epochs: expected an integer, got 'abc'"),
    ("synthetic", "train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
    ("synthetic", "train.epochs=0", "train.epochs: expected an integer >= 1, got 0"),
    ("synthetic", "model.dim=0", "model.dim: expected an integer >= 1, got 0"),
    ("synthetic", "optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("synthetic", "optim.lr=.nan", "optim.lr: expected a number, got nan"),
    ("synthetic", "rollingq.enabled=1", "rollingq.enabled: expected true or false, got 1"),
    ("synthetic", "rollingq.window=0", "rollingq.window: expected 'epoch' or an integer >= 1"),
    ("synthetic", "rollingq.method=qr", "rollingq.method: expected one of plane, svd, got 'qr'"),
    ("synthetic", "train.grad_clip=-1", "train.grad_clip: expected a number > 0.0, got -1.0"),
    ("synthetic", "data.modalities=audio", "data.modalities: expected a list of strings, got 'audio'"),
    ("synthetic", "data.synthetic.corrupt.test=1.5",
     "data.synthetic.corrupt.test: expected a number >= 0.0 and <= 1.0, got 1.5"),
    ("synthetic", "train=5", "train: expected a mapping of keys, got 5"),
    ("cremad_vanilla_mt", "data.num_frames=0", "data.num_frames: expected an integer >= 1, got 0"),
    ("cremad_vanilla_mt", "data.image_size=0", "data.image_size: expected an integer >= 16, got 0"),
    ("cremad_vanilla_mt", "data.modalities=[audio,text]", "data.modalities: cremad has audio and visual, got 'text'"),
    ("mosei_vanilla_mt", "data.task=3class", "data.task: expected one of binary, 7class, got '3class'"),
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
    ("seed=1e30", "seed"), ("seed=100000000000000000000", "seed"), ("seed=4294967296", "seed"),
    ("train.batch_size=1e20", "train.batch_size"), ("train.epochs=-1e300", "train.epochs"),
    ("data.synthetic.sizes.train=1e19", "data.synthetic.sizes.train"),
])
def test_huge_integers_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected an integer"):
        load_config("synthetic", [override])
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


# ---------------------------------------------------------------- OmegaConf structured configs (issue 27, item 4)
@pytest.mark.parametrize("name", sorted(os.listdir(V1)))
def test_config_yaml_of_earlier_runs_loads_and_saves_the_same_bytes(name, tmp_path):
    """Run folders written before the move to OmegaConf load, and saving their config again writes the same file."""
    path = os.path.join(V1, name)
    cfg = read_config(path)
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert (tmp_path / "config.yaml").read_bytes() == open(path, "rb").read()
    assert cfg == load_config(path) and cfg.data.name in name.replace("kinetics_sounds", "kinetics_sounds")


def test_values_of_earlier_runs_come_back_typed():
    official = read_config(os.path.join(V1, "synthetic_rollingq_official.yaml"))
    assert official.rollingq.settings() == RollingQSettings.preset("official") and official.rollingq.enabled
    assert (official.name, official.seed) == ("old_official", 7)
    cremad = read_config(os.path.join(V1, "cremad_vanilla_mt_rollingq.yaml"))
    assert cremad.data.options.crop_scale is None and cremad.model.init_encoders == {"audio": "runs/a"}
    assert type(cremad.data.options).__name__ == "CremaDOptions" and cremad["data"]["flip"] is True
    kinetics = read_config(os.path.join(V1, "kinetics_sounds_ogm_ge.yaml"))
    assert kinetics.data.options.classes == ["a", "b", "c"] and kinetics.train.grad_clip == 1.5
    assert read_config(os.path.join(V1, "mosei_vanilla_mt_star.yaml")).data.options.task == "7class"


def test_a_renamed_key_in_a_saved_config_is_read_with_a_warning(tmp_path, caplog):
    with open(os.path.join(V1, "cremad_vanilla_mt_rollingq.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["model"]["rotation"] = raw["model"].pop("rotation_mode")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="rollingq.config"):
        assert read_config(str(tmp_path / "config.yaml")).model.rotation_mode == "global"
    assert "model.rotation is now model.rotation_mode" in caplog.text


def test_files_and_overrides_merge_key_by_key(tmp_path):
    """``base:`` chains and overrides merge mappings key by key; lists and values are replaced whole."""
    (tmp_path / "a.yaml").write_text("data: {synthetic: {sizes: {train: 100, val: 30}, tokens: [3, 4]}}\n"
                                     "model: {dim: 32, encoder_depth: 3}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ndata: {synthetic: {sizes: {val: 40}, tokens: [5, 6]}}\n")
    cfg = load_config(str(tmp_path / "b.yaml"), ["data.synthetic.sizes.test=7", "model.dim=48",
                                                 "data.modalities=[visual, audio]"])
    assert cfg.data.options.synthetic.sizes == SplitSizes(train=100, val=40, test=7)
    assert cfg.data.options.synthetic.tokens == [5, 6] and cfg.data.modalities == ["visual", "audio"]
    assert (cfg.model.dim, cfg.model.encoder_depth, cfg.model.encoder_heads) == (48, 3, 4)


def test_the_data_section_is_the_chosen_datasets():
    """``data`` holds the common keys and those of ``data.name``'s options, flat; an override of the name
    switches the keys it accepts."""
    cfg = load_config("mosei_vanilla_mt", ["data.seq_len=20"])
    assert type(cfg.data).__name__ == "DataConfig_mosei" and cfg.data.options.seq_len == 20
    assert "seq_len" in cfg.to_dict()["data"] and "options" not in cfg.to_dict()["data"]
    with pytest.raises(ConfigError, match=r"^data\.synthetic: a key of the synthetic dataset, not of "
                                          r"data\.name='mosei'"):
        load_config("synthetic", ["data.name=mosei"])
    with pytest.raises(ConfigError, match=r"^data\.name: expected one of synthetic, cremad, kinetics_sounds, mosei, "
                                          r"got \['x'\]"):
        load_config("synthetic", ["data.name=[x]"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs='3'", "train.epochs: expected an integer, got '3'"),
    ("rollingq.enabled='yes'", "rollingq.enabled: expected true or false, got 'yes'"),
    ("train.bf16=0", "train.bf16: expected true or false, got 0"),
    ("name=5", "name: expected a string, got 5"),
    ("model.pretrained=1.5", "model.pretrained: expected a string or null, got 1.5"),
    ("optim.lr='0.5'", "optim.lr: expected a number, got '0.5'"),
    ("data.modalities=[audio, 1]", "data.modalities: expected a list of strings, got ['audio', 1]"),
    ("data.synthetic.tokens=[3, 4.5]", "data.synthetic.tokens: expected an integer or a list of integers, got"),
    ("data.synthetic.tokens=[3, 99999999999999999999]", "data.synthetic.tokens: expected an integer between"),
    ("data.synthetic.strength=[1, .inf]", "data.synthetic.strength: expected a number, got [1.0, inf]"),
    ("data.synthetic.sizes=5", "data.synthetic.sizes: expected a mapping of keys, got 5"),
    ("model.init_encoders={audio: [a]}", "model.init_encoders: expected null or a mapping"),
    ("rollingq.max_rotations=99999999999999999999", "rollingq.max_rotations: expected an integer between"),
])
def test_implicit_conversions_are_refused(override, message):
    """OmegaConf would turn '3' into 3, 0 into false and 5 into '5'; a config takes a value only as its own type."""
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", [override])
    assert str(err.value).startswith(message), str(err.value)


def test_numbers_take_the_type_of_their_key():
    """An integer where a number is expected, an integral number (``1e3``) where an integer is: as before."""
    cfg = load_config("synthetic", ["optim.lr=1", "train.epochs=2.0", "train.batch_size=1e3",
                                    "data.synthetic.strength=[2, 1]", "rollingq.window=3.0", "train.grad_clip=2"])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.train.batch_size, cfg.rollingq.window) == (1.0, 2, 1000, 3)
    assert [type(v) for v in (cfg.optim.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_clip)] == [
        float, int, int, float]
    assert cfg.data.options.synthetic.strength == [2.0, 1.0] and type(cfg.data.options.synthetic.strength[0]) is float


@pytest.mark.parametrize("override, key", [
    ("name=${oc.env:HOME}", "name"), ("optim.min_lr=${optim.lr}", "optim.min_lr"),
    ("data.modalities=[audio, '${x}']", "data.modalities"), ("model.init_encoders={audio: '${oc.env:HOME}'}",
                                                              "model.init_encoders"),
    ("data.root=???", "data.root"), ("rollingq.window='${oc.decode:1}'", "rollingq.window"),
])
def test_interpolations_and_missing_values_are_refused(override, key, monkeypatch):
    """OmegaConf would resolve ``${...}`` (other keys, environment variables) and read ``???`` as missing: a
    config states its values literally, and no environment variable reaches a config."""
    monkeypatch.setenv("HOME", "/secret/home")
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*OmegaConf interpolation or missing value") as err:
        load_config("synthetic", [override])
    assert "/secret" not in str(err.value)


def test_interpolations_in_a_file_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.1, min_lr: '${optim.lr}'}\n")
    with pytest.raises(ConfigError, match=r"^optim\.min_lr: '\$\{optim\.lr\}' would be an OmegaConf interpolation"):
        load_config(str(path))


def test_configs_pickle_for_process_pools():
    """The demo hands configs to spawned processes: every ``data`` section pickles by name."""
    for name in ("synthetic", "cremad_vanilla_mt", "kinetics_sounds_concat", "mosei_sum"):
        cfg = load_config(name)
        again = pickle.loads(pickle.dumps(cfg))
        assert again == cfg and again.data.options == cfg.data.options


def _leaves(section, prefix=""):
    """(dotted key, field type, option rules) of every key of a config section, recursively."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f.metadata


_DATASET_CONFIGS = ("synthetic", "cremad_vanilla_mt", "kinetics_sounds_vanilla_mt", "mosei_vanilla_mt")
_WRONG = {int: "'7'", float: "'0.5'", bool: "1", str: "5"}  # each a value OmegaConf would convert


def _violations():
    """(config, override, key) breaking each key's type and each of its rules once, over every dataset's keys."""
    out = {}
    for config in _DATASET_CONFIGS:
        for key, tp, rules in _leaves(load_config(config)):
            if tp in _WRONG:
                out[(key, "type")] = (config, f"{key}={_WRONG[tp]}", key)
            if "choices" in rules:
                out[(key, "choices")] = (config, f"{key}=not_a_choice", key)
            for rule, shift in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
                if rule in rules:
                    bad = rules[rule] + shift if tp is int or shift == 0 else rules[rule] + shift / 2
                    out[(key, rule)] = (config, f"{key}={bad!r}", key)
    return sorted(out.values())


@pytest.mark.parametrize("config, override, key", _violations())
def test_every_type_and_rule_of_every_key_is_enforced(config, override, key):
    """Each key refuses a value of another type (even one OmegaConf would convert) and each of its bounds and
    choices, naming the dotted key: no strictness is lost when the machinery changes."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected"):
        load_config(config, [override])


def test_the_violations_cover_every_key_of_every_section():
    covered = {override.split("=")[0] for _, override, _ in _violations()}
    assert len(_violations()) > 80 and {"seed", "train.epochs", "rollingq.beta", "data.synthetic.sizes.train",
                                         "data.num_frames", "data.task", "optim.momentum", "model.fusion"} <= covered


def test_an_unknown_rule_of_an_option_is_an_error():
    """``option(min=1)`` (a typo for ``ge``) would check nothing: it is refused when the section is defined."""
    from rollingq.schema import option

    with pytest.raises(TypeError, match=r"option: unknown rules \['min'\]"):
        option(1, min=1)
