"""The controller's settings: one frozen dataclass, validated once, round-tripped through the config and the
controller's state; the estimation pass's two averages."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from rollingq.config import Config, ConfigError, RollingQConfig, load_config, read_config, save_config

from rollingq_kernels.controller import RollingQ
from rollingq_kernels.estimation import estimation_pass
from rollingq_kernels.module import FusedRollingQAttention
from rollingq_kernels.settings import DEFAULT_MAX_ANGLE_DEG, PRESETS, RollingQSettings, field_names

F64 = torch.float64


def _layer(dim=12, heads=2) -> FusedRollingQAttention:
    torch.manual_seed(0)
    return FusedRollingQAttention(dim, num_heads=heads, qkv_bias=True, class_query_only=True,
                                  backend="reference").to(F64)


@pytest.mark.parametrize("field, value, message", [
    ("rho", -0.5, "rho: expected a finite number >= 0, got -0.5"),
    ("beta", float("inf"), "beta: expected a finite number >= 0, got inf"),
    ("max_angle_deg", 0.0, "max_angle_deg: expected a finite number > 0 and <= 180, got 0.0"),
    ("anchor_limit_deg", 200, "anchor_limit_deg: expected a finite number > 0 and <= 180, got 200"),
    ("min_rank_correlation", 1.5, "min_rank_correlation: expected a finite number >= -1 and <= 1, got 1.5"),
    ("rollback_acc_drop", -0.1, "rollback_acc_drop: expected a finite number >= 0 and <= 1, got -0.1"),
    ("max_rotations", 1.5, "max_rotations: expected an integer >= 0, got 1.5"),
    ("start_epoch", -1, "start_epoch: expected an integer >= 0, got -1"),
    ("probe_top_k", 0, "probe_top_k: expected an integer >= 1, got 0"),
    ("window", 0, "window: expected 'epoch' or an integer >= 1 (the last K batches), got 0"),
    ("method", "qr", "method: expected one of plane, svd, got 'qr'"),
    ("direction", "up", "direction: expected one of anchor, random, got 'up'"),
    ("pass_mean", "token", "pass_mean: expected one of sample, batch, got 'token'"),
    ("mode", "fast", "mode: expected one of safe, paper, official, got 'fast'"),
    ("safety", 1, "safety: expected true or false, got 1"),
])
def test_each_setting_is_checked_once_naming_it(field, value, message):
    with pytest.raises(ValueError) as err:
        RollingQSettings(**{field: value})
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:  # the controller's constructor goes through the same check
        RollingQ(_layer(), **{field: value})
    assert str(err.value) == message
    with pytest.raises(ConfigError) as err:  # and so does the config, naming the dotted key
        load_config("synthetic_rollingq", [f"rollingq.{field}={value!r}" if isinstance(value, str) else
                                           f"rollingq.{field}={value}"])
    assert str(err.value).startswith(f"rollingq.{field}: ")


def test_settings_are_frozen_and_numbers_are_floats():
    s = RollingQSettings(rho=2, beta=0)
    assert isinstance(s.rho, float) and s.rho == 2.0 and isinstance(s.beta, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.beta = 0.5
    assert s.replace(beta=0.5).beta == 0.5 and s.beta == 0.0
    with pytest.raises(ValueError, match=r"settings: unknown \['bta'\]"):
        RollingQSettings.from_dict({"bta": 0.1})


def test_presets():
    safe, paper, official = (RollingQSettings.preset(m) for m in ("safe", "paper", "official"))
    assert safe == RollingQSettings() and safe.safety and safe.max_angle_deg == DEFAULT_MAX_ANGLE_DEG and safe.rollback
    assert not paper.safety and paper.max_angle_deg == 180.0 and not paper.rollback and paper.rho == safe.rho
    assert (official.rho, official.beta, official.beta_strict, official.window, official.method) == (
        0.0, 0.0, True, 1, "svd")
    assert (official.estimate, official.pass_mean, official.min_accuracy_gain, official.safety) == (
        "pass", "batch", -1.0, False)
    assert official.rotation_precision == "model" and official.deviations() == {}
    assert RollingQSettings.preset("official", beta=0.2).deviations() == {"beta": (0.2, 0.0)}
    assert set(PRESETS) == {"safe", "paper", "official"}


def test_the_config_section_is_the_settings_with_enabled():
    """Defaults stated once: the section's fields and defaults are the settings' (plus ``enabled``)."""
    section = RollingQConfig()
    assert list(RollingQConfig.model_fields) == ["enabled"] + field_names()
    assert section.settings() == RollingQSettings() and section.beta == RollingQSettings().beta
    assert Config().to_dict()["rollingq"] == {"enabled": False, **RollingQSettings().to_dict()}


def test_config_mode_is_a_preset_that_explicit_keys_override(tmp_path):
    cfg = load_config("synthetic_rollingq", ["rollingq.mode=official", "rollingq.max_rotations=3"])
    want = RollingQSettings.preset("official", max_rotations=3, rho=1.0, beta=0.1, start_epoch=1,
                                   min_accuracy_gain=0.05, window="epoch", indicator="cos",
                                   anchor_limit_deg=180.0, max_angle_deg=30.0)
    assert cfg.rollingq.settings() == want  # synthetic_rollingq.yaml states rho, beta, ... explicitly
    official = load_config("synthetic_rollingq_official")
    assert official.rollingq.settings() == RollingQSettings.preset("official") and official.rollingq.enabled
    path = str(tmp_path / "config.yaml")
    save_config(official, path)
    assert read_config(path).rollingq == official.rollingq and read_config(path).to_dict() == official.to_dict()


def test_the_section_applies_its_mode_preset_however_it_is_built():
    """Not only through Config.from_dict: a section built directly from a dict or by keywords takes the preset."""
    for section in (RollingQConfig.model_validate({"mode": "paper", "max_angle_deg": 45.0}),
                    RollingQConfig(mode="paper", max_angle_deg=45.0)):
        assert section.settings() == RollingQSettings.preset("paper", max_angle_deg=45.0)
        assert not section.safety  # the preset's value, not the default's


def test_config_rejects_an_unknown_rollingq_key_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"rollingq\.max_angle: unknown key; did you mean rollingq\.max_angle_deg"):
        load_config("synthetic", ["rollingq.max_angle=20"])


def test_official_mode_departures_are_logged_when_a_run_starts(caplog):
    cfg = load_config("synthetic_rollingq_official", ["rollingq.beta=0.3"])
    with caplog.at_level(logging.WARNING, logger="rollingq.config"):
        cfg.warn_inert_settings()
    assert "rollingq.beta=0.3 departs from the official semantics" in caplog.text


def test_the_controller_is_built_from_the_config_settings():
    from rollingq.build import build_controller, build_model

    cfg = load_config("synthetic_rollingq", ["rollingq.max_angle_deg=12.5", "rollingq.direction=random", "seed=4",
                                             "model.dim=16", "model.encoder_heads=2"])
    ctl = build_controller(cfg, build_model(cfg))
    assert ctl.settings == cfg.rollingq.settings() and ctl.max_angle_deg == 12.5 and ctl.seed == 4


def test_state_dict_round_trips_the_settings_and_old_states_load():
    layer = _layer()
    ctl = RollingQ(layer, mode="official", max_angle_deg=45.0)
    state = ctl.state_dict()
    other = RollingQ(layer)
    other.load_state_dict(state)
    assert other.settings == ctl.settings and other.settings.mode == "official"
    kept = RollingQ(layer, beta=0.3)
    kept.load_state_dict(state, settings=False)
    assert kept.beta == 0.3 and kept.settings.mode == "safe"
    old = {k: state[k] for k in ("rho", "beta", "max_rotations", "window", "method", "estimate", "records",
                                 "layers", "num_rotations", "statistics")}  # a state saved before the settings
    old.update(rho=2.0, beta=0.05, window="epoch", method="plane", estimate="accumulate")
    other.load_state_dict(old)
    assert other.settings == RollingQSettings.preset("paper", rho=2.0, beta=0.05, max_rotations=1)
    with pytest.raises(ValueError, match="^beta: expected a finite number >= 0, got -1"):
        other.load_state_dict({**state, "beta": -1})
    with pytest.raises(ValueError, match=r"state: missing key 'rho'"):
        other.load_state_dict({k: v for k, v in state.items() if k != "rho"})


def test_the_pass_averages_per_sample_or_per_batch():
    """Batches of 4, 4 and 3 samples: the official code takes the unweighted mean of the three batch means."""
    layer = _layer().eval()
    gen = torch.Generator().manual_seed(5)
    loader = [torch.randn(b, 1 + 5 + 4, 12, generator=gen, dtype=F64) + 0.3 * i for i, b in enumerate((4, 4, 3))]
    means = {"key": [], "query": []}

    def forward(x):
        layer(x, [5, 4])
        means["key"].append(layer.last_stats.key_mean.double())
        means["query"].append(layer.last_stats.query.double())

    stats = {m: estimation_pass({"0": layer}, loader, forward, m)["0"] for m in ("sample", "batch")}
    per_sample_keys = torch.cat(means["key"][:3]).mean(0)
    per_batch_keys = torch.stack([k.mean(0) for k in means["key"][3:]]).mean(0)
    torch.testing.assert_close(stats["sample"].key_mean, per_sample_keys, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats["batch"].key_mean, per_batch_keys, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats["batch"].query_mean, torch.stack([q.mean(0) for q in means["query"][3:]]).mean(0),
                               rtol=0, atol=1e-12)
    assert float((stats["sample"].key_mean - stats["batch"].key_mean).abs().max()) > 1e-3
    assert layer.statistics.num_batches == 0
