"""Compose the run configuration with Hydra, once per flow, from a list of override strings.

`conf/config.yaml` is the primary config; its first default is `pipeline.config.RunConfig` registered in
Hydra's ConfigStore as `hybrid_distill_schema`, so every group option and every override is merged into
the typed schema (a wrong type or an unknown key fails at composition) and `OmegaConf.to_object` builds
the RunConfig, whose `__post_init__` validates the values.

Every failure becomes one `ConfigCompositionError` line: Hydra's message, plus the valid options of the
group for a bad option, or the closest keys for an unknown key.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PRIMARY_CONFIG = "config"
SCHEMA_NAME = "hybrid_distill_schema"
GROUPS = ("teacher", "start", "data", "schedule", "train", "mmr", "sft", "evaluate", "storage", "tracking",
          "hardware", "experiment")

REQUIRED_MARK = "missing required value"
_lock = threading.Lock()  # Hydra's GlobalHydra is process-wide: one composition at a time


class ConfigCompositionError(ValueError):
    """An override or config option that does not compose into a valid RunConfig (one line)."""


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group: the yaml files in `conf/<group>/`, sorted."""
    return sorted(path.stem for path in (conf_dir / group).glob("*.yaml"))


def _schema_node() -> Any:
    """RunConfig as an OmegaConf node (every section a structured, type-checked config)."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(RunConfig)


def _required(*, _node_: Any) -> Any:
    """`${required:}` in a config option: the value must come from an override.

    (OmegaConf's `???` cannot do this here: merged over a schema default it is ignored.)
    """
    key = _node_._get_full_key(None)
    raise ValueError(f"{REQUIRED_MARK} {key}: give it as an override, e.g. {key}=...")


def register_configs() -> None:
    """Registers the schema in Hydra's ConfigStore and the `required` resolver (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=SCHEMA_NAME, node=_schema_node())
    OmegaConf.register_new_resolver("required", _required, replace=True)


def _one_line(text: str) -> str:
    """Hydra's message without its search-path listing and full-key trailers, on one line."""
    lines = []
    for line in str(text).splitlines():
        stripped = line.strip()
        if stripped.startswith(("Config search path", "provider=", "full_key:", "reference_type=", "object_type=")):
            continue
        if stripped.startswith("Available options in"):
            break  # we list the options ourselves, on the same line
        if stripped:
            lines.append(stripped)
    return " ".join(lines)


def _bad_group_option(overrides: Sequence[str], message: str) -> str | None:
    """For `group=option` with an unknown option: the hint listing the group's options."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in GROUPS and f"{key}/{value}" in message:
            return f"valid choices for {key}: {', '.join(group_options(key))}"
    return None


def _schema_keys(path: list[str]) -> list[str]:
    """Keys of the schema at a dotted path prefix (empty if the prefix is not a section)."""
    from omegaconf import DictConfig, OmegaConf

    node: Any = OmegaConf.structured(RunConfig)
    for part in path:
        if not isinstance(node, DictConfig) or part not in node:
            return []
        node = node[part]
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _bad_key_hint(overrides: Sequence[str], message: str) -> str | None:
    """For an override of a key the schema lacks: the closest keys (and groups, at the top level)."""
    unknown = re.search(r"Key '([^']+)' not in", message)
    if unknown is None:
        return None
    for override in overrides:
        parts = override.lstrip("+~").partition("=")[0].split(".")
        if unknown.group(1) not in parts or f"'{'.'.join(parts)}'" not in message:
            continue
        parent = parts[: parts.index(unknown.group(1))]
        candidates = sorted(set(_schema_keys(parent)) | (set(GROUPS) if not parent else set()))
        close = difflib.get_close_matches(unknown.group(1), candidates, n=3)
        prefix = ".".join(parent) + "." if parent else ""
        if close:
            return "did you mean " + " or ".join(f"{prefix}{name}" for name in close) + "?"
        if candidates:
            return f"valid keys here: {', '.join(prefix + name for name in candidates)}"
    return None


def with_teacher_group(overrides: Sequence[str]) -> list[str]:
    """`teacher.path=X` without a `teacher=` choice means `teacher=local teacher.path=X`: a user's teacher
    gets the settings made for pretrained models (conf/teacher/local.yaml), never the demo's silently."""
    overrides = [str(item) for item in overrides]
    keys = {item.lstrip("+~").partition("=")[0] for item in overrides}
    path = next((item.partition("=")[2] for item in overrides if item.lstrip("+").startswith("teacher.path=")), None)
    if path not in (None, "", "null", "None") and "teacher" not in keys:
        return ["teacher=local", *overrides]
    return overrides


def compose(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> RunConfig:
    """The RunConfig for these Hydra overrides (e.g. ["experiment=tiny", "schedule.counts=[2,3]"]); a
    `teacher.path=...` without a teacher group choice selects `teacher=local` (`with_teacher_group`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    overrides = with_teacher_group(overrides)
    register_configs()
    with _lock:
        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="hybrid-distill"):
                composed = hydra_compose(config_name=PRIMARY_CONFIG, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as error:
            message = _one_line(error if not error.__cause__ else f"{error} {error.__cause__}")
            hint = _bad_group_option(overrides, message) or _bad_key_hint(overrides, message)
            raise ConfigCompositionError(message + (f"; {hint}" if hint else "")) from None
    try:
        config = OmegaConf.to_object(composed)
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", None) or "a value"
        raise ConfigCompositionError(f"{REQUIRED_MARK} {key}: give it as an override, e.g. {key}=...") from None
    except (OmegaConfBaseException, ValueError) as error:  # RunConfig validation, interpolation errors
        message = _one_line(error)
        if REQUIRED_MARK in message:
            message = message[message.index(REQUIRED_MARK):]
        raise ConfigCompositionError(message) from None
    if not isinstance(config, RunConfig):  # the schema default was dropped from the defaults list
        raise ConfigCompositionError(f"{conf_dir / PRIMARY_CONFIG}.yaml must start from {SCHEMA_NAME}")
    return config


__all__ = ["CONF_DIR", "ConfigCompositionError", "GROUPS", "compose", "group_options", "register_configs",
           "with_teacher_group"]
