"""Run configuration: YAML files plus dotted `key=value` overrides, validated into dataclasses.

    cfg = load_config("configs/tiny.yaml", ["parallel.cp=2", "train.steps=10"])

Every key must name a dataclass field (an unknown key is an error that names it and lists the valid
ones) and every value must have the field's type (ints are accepted for floats, nothing else is coerced).
Each section's dataclass lives with the code it configures; this module only assembles and validates.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from lctrain.checkpoint.config import CheckpointConfig
from lctrain.data.config import DataConfig
from lctrain.launch.config import LaunchConfig
from lctrain.models.config import ModelConfig
from lctrain.parallel.mesh import MeshConfig
from lctrain.train.config import TrainConfig


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or fails validation."""


@dataclass
class RunConfig:
    """Where a run writes (metrics.jsonl, checkpoints/, TensorBoard logs, the resolved config)."""

    out_dir: str = "runs/default"
    """Run directory; re-running with the same directory resumes from its latest complete checkpoint."""
    name: str = ""
    """Free-form run name shown in logs."""


@dataclass
class Config:
    """The whole run: model, parallel layout, training, data, checkpoints and output."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (recursing into dataclasses, lists, dicts, unions)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return _convert(value, arm, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a {' or '.join(_type_name(a) for a in get_args(tp))}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arm, *_) = get_args(tp) or (Any,)
        return type(value)(_convert(v, arm, f"{key}[{i}]") for i, v in enumerate(value)) if origin is list \
            else tuple(_convert(v, arm, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, varm = get_args(tp) or (Any, Any)
        return {k: _convert(v, varm, f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) mapping, rejecting unknown keys and wrong types."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML, checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`"a.b=3"` -> (["a", "b"], 3); the value is parsed as YAML (numbers, true/false, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested mapping (in place; intermediate sections are created)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = Config) -> Any:
    """Read YAML `path` (or start from defaults), apply `overrides`, validate into `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["Config", "ConfigError", "RunConfig", "apply_overrides", "from_dict", "load_config",
           "parse_override", "save_config", "to_dict"]
