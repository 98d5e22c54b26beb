"""docs/configuration.md is what docs/gen_config.py writes, and names every config key and conf/ option."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config", ROOT / "docs" / "gen_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_the_page_is_up_to_date():
    gen = _generator()
    assert gen.PAGE.read_text() == gen.render(), "docs/configuration.md is out of date: run python docs/gen_config.py"


def test_every_key_is_on_the_page_with_a_meaning():
    gen = _generator()
    page = gen.PAGE.read_text()
    train_fields = {f"`{name}`" for name in _train_fields()}
    missing = []
    for key in gen.leaf_keys():
        parts = key.split(".")
        if "train" in parts and parts.index("train") == len(parts) - 2:  # a TrainConfig field: the matrix
            if f"| `{parts[-1]}` |" not in page or f"`{parts[-1]}`" not in train_fields:
                missing.append(key)
        elif f"| `{key}` |" not in page:
            missing.append(key)
    assert not missing, f"keys missing from docs/configuration.md: {missing}"
    docs = gen.all_class_docs()
    from pipeline.config import RunConfig

    sections: list = []
    gen._sections(RunConfig, RunConfig(), "", docs, sections)
    classes = {cls.__name__ for _, cls, _ in sections} | {"TrainConfig"}
    undocumented = [f"{name}.{field.name}" for name in classes for field in docs[name][1]
                    if not gen.meaning(name, field)]
    assert not undocumented, f"no comment in the source and no entry in docs/gen_config.py NOTES: {undocumented}"


def test_every_conf_option_is_on_the_page():
    gen = _generator()
    page = gen.PAGE.read_text()
    missing = [f"{group}={path.stem}" for group, paths in gen.conf_groups() for path in paths
               if f"| `{group}={path.stem}` |" not in page]
    assert not missing, f"conf/ options missing from docs/configuration.md: {missing}"


def _train_fields() -> list[str]:
    import dataclasses

    from pipeline.config.train import TrainConfig

    return [field.name for field in dataclasses.fields(TrainConfig)]
