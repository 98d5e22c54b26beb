"""conf/ presets composed without Hydra, for machines that have only `pipeline`'s own dependencies (a GPU
job: torch, transformers, pyyaml) and for benchmarks that run the chain bare.

`preset_config("smollm2")` gives the RunConfig that `python -m flows.convert experiment=smollm2` composes
through Hydra (tests/conf/test_presets.py compares the two for every experiment option), following the
parts of Hydra's composition that conf/ uses: the primary defaults list's group order, `override /group:
option` lines in an option's defaults list (an experiment's own overrides win over those of the options
it selects), another option of the same group as a base (`- smollm2` in an experiment; `_self_` last), `# @package
_global_` options, and `${oc.env:NAME,default}` values. Anything else in a YAML file is an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# conf/config.yaml's defaults list, in order (the experiment last, after the primary config itself)
GROUP_ORDER = ("start", "data", "schedule", "train", "mmr", "sft", "teacher", "evaluate", "storage", "tracking",
               "hardware")
_ENV = re.compile(r"^\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)(?:,(.*))?\}$")
_REQUIRED = "${required:}"  # a value the overrides must give (flows.config's `required` resolver)


def _load(group: str, option: str, conf_dir: Path) -> tuple[bool, list, dict]:
    """(global package?, defaults list, body) of conf/<group>/<option>.yaml."""
    import yaml

    path = conf_dir / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(f"{group}={option}: no such option ({path} does not exist)")
    text = path.read_text()
    body = yaml.safe_load(text) or {}
    defaults = body.pop("defaults", [])
    return text.lstrip().startswith("# @package _global_"), defaults, body


def _choices(group: str, option: str, conf_dir: Path, choices: dict[str, str]) -> list[tuple[bool, str, dict]]:
    """Records the group choices `group=option` implies in `choices` (its own overrides last, so they win
    over those of the options it selects) and returns its bodies in merge order (a same-group base first)."""
    package_global, defaults, body = _load(group, option, conf_dir)
    bodies: list[tuple[bool, str, dict]] = []
    direct: list[tuple[str, str]] = []
    for entry in defaults:
        if entry == "_self_":  # the body's place: only last (the default) is read here
            if entry is not defaults[-1]:
                raise ConfigError(f"conf/{group}/{option}.yaml: _self_ before other defaults is not read without Hydra")
            continue
        if isinstance(entry, str):  # another option of the same group, as a base
            bodies += _choices(group, entry, conf_dir, choices)
            continue
        (key, value), = entry.items()
        if not key.startswith("override /"):
            raise ConfigError(f"conf/{group}/{option}.yaml: defaults entry {entry!r} is not read without Hydra")
        direct.append((key.removeprefix("override /"), value))
    for other, value in direct:
        _choices(other, value, conf_dir, choices)  # the chosen option's own overrides come first...
    for other, value in direct:
        choices[other] = value  # ...and this option's win
    bodies.append((package_global, group, body))
    return bodies


def _resolve(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _resolve(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item) for item in value]
    if isinstance(value, str) and "${" in value and value != _REQUIRED:
        found = _ENV.match(value)
        if found is None:
            raise ConfigError(f"interpolation {value!r} is not read without Hydra (only ${{oc.env:NAME,default}})")
        return os.environ.get(found.group(1), found.group(2) if found.group(2) is not None else "")
    return value


def merge(obj: Any, changes: dict) -> Any:
    """A copy of dataclass `obj` with nested `changes` applied (each level re-validated by __post_init__)."""
    updates = {}
    for key, value in changes.items():
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, key):
            raise ConfigError(f"{type(obj).__name__} has no field {key!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            updates[key] = merge(current, value)
        elif isinstance(current, tuple) and isinstance(value, list):
            updates[key] = tuple(value)
        else:
            updates[key] = value
    return dataclasses.replace(obj, **updates)


def preset_config(experiment: str | None, conf_dir: Path = CONF_DIR) -> RunConfig:
    """The RunConfig of `experiment=<name>` (None: the defaults), as Hydra composes it from conf/."""
    choices = {group: "default" for group in GROUP_ORDER}
    experiment_bodies = _choices("experiment", experiment, conf_dir, choices) if experiment else []
    cfg = RunConfig()
    for group in GROUP_ORDER:
        group_choices = dict(choices)
        for package_global, where, body in _choices(group, choices[group], conf_dir, group_choices):
            cfg = merge(cfg, _resolve(body if package_global else {where: body}))
    for package_global, where, body in experiment_bodies:
        cfg = merge(cfg, _resolve(body if package_global else {where: body}))
    missing = _required_keys(cfg)
    if missing:
        raise ConfigError(f"missing required value {missing[0]}: give it as an override, e.g. {missing[0]}=...")
    return cfg


def _required_keys(obj: Any, prefix: str = "") -> list[str]:
    if not dataclasses.is_dataclass(obj):
        return [prefix.rstrip(".")] if obj == _REQUIRED else []
    return [key for f in dataclasses.fields(obj) for key in _required_keys(getattr(obj, f.name), f"{prefix}{f.name}.")]


__all__ = ["CONF_DIR", "GROUP_ORDER", "merge", "preset_config"]
