"""The config sections on pydantic (``rollingq.schema``; issue 27, item 4): earlier runs' files, strict types,
YAML numbers, values taken literally, and every key's type and rules enforced."""

from __future__ import annotations

import logging
import os
import pickle
import re
import typing

import pytest
import yaml
from rollingq.config import Config, ConfigError, RollingQConfig, TrainConfig, load_config, read_config, save_config
from rollingq.data.synthetic import SplitFractions, SplitSizes
from rollingq.schema import Section
from rollingq.sections import DATA_SECTIONS

from rollingq_kernels.settings import RollingQSettings

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_v1")


@pytest.mark.parametrize("name", sorted(os.listdir(V1)))
def test_config_yaml_of_earlier_runs_loads_and_saves_the_same_bytes(name, tmp_path):
    """Run folders written before the move to OmegaConf (and pydantic) load, and saving their config again writes
    the same file."""
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
    ("train.epochs='3'", "train.epochs: input should be a valid integer, got '3'"),
    ("rollingq.enabled='yes'", "rollingq.enabled: input should be a valid boolean, got 'yes'"),
    ("train.bf16=0", "train.bf16: input should be a valid boolean, got 0"),
    ("name=5", "name: input should be a valid string, got 5"),
    ("model.pretrained=1.5", "model.pretrained: input should be a valid string, got 1.5"),
    ("optim.lr='0.5'", "optim.lr: input should be a valid number, got '0.5'"),
    ("data.modalities=[audio, 1]", "data.modalities: input should be a valid string, got 1"),
    ("data.synthetic.tokens=[3, 4.5]", "data.synthetic.tokens: input should be a valid integer, got 4.5"),
    ("data.synthetic.tokens=[3, 99999999999999999999]", "data.synthetic.tokens: expected an integer between"),
    ("data.synthetic.strength=[1, .inf]", "data.synthetic.strength: input should be a finite number, got inf"),
    ("data.synthetic.sizes=5", "data.synthetic.sizes: input should be a valid dictionary or instance of SplitSizes"),
    ("data=[1]", "data: input should be a valid dictionary or instance of DataConfig_synthetic, got [1]"),
    ("model.init_encoders={audio: [a]}", "model.init_encoders: expected null or a mapping"),
    ("rollingq.max_rotations=99999999999999999999", "rollingq.max_rotations: expected an integer between"),
    ("rollingq.window=2.5", "rollingq.window: input should be a valid string or a valid integer, got 2.5"),
    ("data.synthetic.tokens=abc", "data.synthetic.tokens: input should be a valid integer or a valid list, got 'abc'"),
])
def test_implicit_conversions_are_refused(override, message):
    """Lax pydantic (and OmegaConf before) would turn '3' into 3, 0 into false or 5 into '5'; a config takes a
    value only as its own type."""
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
    assert type(cfg.rollingq.window) is int and load_config("synthetic", ["data.synthetic.tokens=[3.0, 4]"]).data[
        "synthetic"].tokens == [3, 4]


def test_values_are_taken_literally(monkeypatch):
    """Nothing resolves ``${...}`` or ``???`` (OmegaConf would have): they are plain strings."""
    monkeypatch.setenv("HOME", "/secret/home")
    cfg = load_config("synthetic", ["name=${oc.env:HOME}", "data.root=???"])
    assert (cfg.name, cfg.data.root) == ("${oc.env:HOME}", "???")


def test_an_empty_section_takes_its_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\ndata:\nmodel: {dim: 32}\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert cfg.train == TrainConfig() and cfg.data.to_dict() == Config().data.to_dict() and cfg.model.dim == 32


def test_configs_pickle_for_process_pools():
    """The demo hands configs to spawned processes: every ``data`` section pickles by name."""
    for name in ("synthetic", "cremad_vanilla_mt", "kinetics_sounds_concat", "mosei_sum"):
        cfg = load_config(name)
        again = pickle.loads(pickle.dumps(cfg))
        assert again == cfg and again.data.options == cfg.data.options


def _leaves(section, prefix=""):
    """(dotted key, field type, rules) of every key of a config section, recursively: ``choices`` (a ``Literal``)
    and the bounds ``ge``, ``gt``, ``le``, ``lt``."""
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, Section):
            yield from _leaves(value, f"{prefix}{name}.")
            continue
        bounds = [(rule, m) for m in field.metadata for rule in ("ge", "gt", "le", "lt") if hasattr(m, rule)]
        rules = {rule: getattr(m, rule) for rule, m in bounds}
        if typing.get_origin(field.annotation) is typing.Literal:
            rules["choices"] = typing.get_args(field.annotation)
        yield f"{prefix}{name}", field.annotation, rules


_DATASET_CONFIGS = ("synthetic", "cremad_vanilla_mt", "kinetics_sounds_vanilla_mt", "mosei_vanilla_mt")
_WRONG = {int: "'7'", float: "'0.5'", bool: "1", str: "5"}  # each a value lax pydantic or OmegaConf would convert


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
    """Each key refuses a value of another type (even one lax pydantic or OmegaConf would convert) and each of its
    bounds and choices, naming the dotted key: no strictness is lost when the machinery changes."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: (input should be|expected) "):
        load_config(config, [override])


def test_the_violations_cover_every_key_of_every_section():
    covered = {override.split("=")[0] for _, override, _ in _violations()}
    assert len(_violations()) > 80 and {"seed", "train.epochs", "rollingq.beta", "data.synthetic.sizes.train",
                                         "data.num_frames", "data.task", "optim.momentum", "model.fusion",
                                         "device", "data.audio_features", "train.grad_clip"} <= covered


def _sections(section: type[Section]):
    yield section
    for field in section.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            yield from _sections(field.annotation)


def test_no_field_has_an_unknown_rule():
    """``Field(1, min=1)`` (a typo for ``ge``) checks nothing: pydantic keeps an unknown argument as JSON schema
    text, with only a deprecation warning. No section has one."""
    sections = {s for data in DATA_SECTIONS.values() for s in (*_sections(Config), *_sections(data))}
    assert len(sections) > 10 and RollingQConfig in sections and SplitFractions in sections
    assert [(s.__name__, name) for s in sections for name, f in s.model_fields.items() if f.json_schema_extra] == []
