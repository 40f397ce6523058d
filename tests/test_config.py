"""YAML configs with dotted overrides, validated into dataclasses."""
from pathlib import Path

import pytest

from lctrain.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_and_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("parallel:\n  tp: 2\ntrain:\n  steps: 7\n")
    cfg = load_config(p, ["parallel.cp=2", "parallel.cp_layout=contiguous", "parallel.timeout_s=30"])
    assert (cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.cp_layout, cfg.train.steps) == (2, 2, "contiguous", 7)
    assert isinstance(cfg.parallel.timeout_s, float)


@pytest.mark.parametrize("override,match", [
    ("parallel.cpx=2", "unknown config key 'parallel.cpx'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("parallel.cp=two", "parallel.cp: expected an integer"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("parallel=3", "parallel: expected a mapping"),
    ("parallel.cp", "not of the form dotted.key=value"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_file_is_clear():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)
