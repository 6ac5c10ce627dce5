"""Configs round-trip through JSON, and unknown keys or bad values are refused in one line naming the source."""

import json

import pytest

from igengine.config import (Family, GuidanceConfig, ModelConfig, Precision, SamplerConfig, SamplerSettings, Solver)
from igengine.errors import ConfigError
from igengine.models import preset
from igengine.sampling import paper_sampler, resolve_sampler


@pytest.mark.parametrize("cfg", [
    SamplerConfig(solver=Solver.SDE, steps=250, guidance=GuidanceConfig(1.4, (0.0, 1.0), 1.35, (0.0, 0.7))),
    SamplerConfig(solver=Solver.HEUN2, steps=125, timestep_shift=0.3, precision=Precision.BF16,
                  guidance=GuidanceConfig(ig_scale=1.7)),
])
def test_sampler_config_round_trips_through_json(cfg):
    assert SamplerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("name", ["SiT-XL/2", "LightningDiT-XL/1", "SiT-S/8"])
def test_model_config_round_trips_through_json(name):
    cfg = preset(name, num_classes=10)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("cls, d, expect", [
    (SamplerConfig, {"solver": "sde", "steps": 5, "sde_steps": 3}, "unknown SamplerConfig key(s) ['sde_steps']"),
    (SamplerConfig, {"solver": "rk4", "steps": 5}, "solver 'rk4' is not one of"),
    (SamplerConfig, {"solver": "sde", "steps": 1}, "needs `steps` >= 2"),
    (GuidanceConfig, {"cfg_scale": -1}, "`cfg_scale` must be a finite number >= 0"),
    (GuidanceConfig, {"ig_interval": [0.9, 0.1]}, "`ig_interval` must be LOW,HIGH"),
    (GuidanceConfig, {"ig_interval": "abc"}, "must be two numbers"),
    (ModelConfig, {**preset("SiT-B/2").to_dict(), "depht": 3}, "unknown ModelConfig key(s) ['depht']"),
    (ModelConfig, {**preset("SiT-B/2").to_dict(), "family": "dit"}, "family 'dit' is not one of"),
    (SamplerSettings, {"steps": "many"}, "has the wrong type"),
    (SamplerSettings, {"steps": 2.5}, "has the wrong type"),
    (SamplerSettings, [1, 2], "must be a JSON object"),
])
def test_from_dict_refuses_bad_input_naming_the_source(cls, d, expect):
    with pytest.raises(ConfigError) as e:
        cls.from_dict(d, "run.json")
    assert str(e.value).startswith("run.json: ") and expect in str(e.value) and "\n" not in str(e.value)


def test_settings_lay_over_the_paper_settings_field_by_field():
    ckpt = SamplerSettings.from_dict({"steps": 50, "cfg_interval": [0, 0.5]})
    user = SamplerSettings(cfg_scale=2.0)
    cfg = resolve_sampler(Family.SIT, Precision.FP32, ckpt, user)
    paper = paper_sampler(Family.SIT)
    assert cfg.steps == 50 and cfg.guidance.cfg_interval == (0.0, 0.5) and cfg.guidance.cfg_scale == 2.0
    assert cfg.guidance.ig_scale == paper.guidance.ig_scale and cfg.solver == paper.solver
    assert cfg.precision == Precision.FP32
    assert SamplerSettings.from_dict(ckpt.to_dict()) == ckpt
