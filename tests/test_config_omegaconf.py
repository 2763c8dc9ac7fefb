"""The config on OmegaConf structured configs (issue 27, item 4): earlier runs' files, strict types, refused
interpolations, and every key's type and rules enforced."""

from __future__ import annotations

import logging
import os
import pickle
import re

import pytest
import yaml
from rollingq.config import ConfigError, load_config, read_config, save_config
from rollingq.data.synthetic import SplitSizes

from rollingq_kernels.settings import RollingQSettings

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_v1")


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
