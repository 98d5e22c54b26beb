"""pipeline.presets composes every experiment as Hydra does (the bare GPU benchmarks read presets with it)."""

from __future__ import annotations

import pytest

from flows.config import compose, group_options
from pipeline.config import to_plain
from pipeline.presets import preset_config


@pytest.mark.parametrize("experiment", [None, *group_options("experiment")])
def test_preset_config_is_what_hydra_composes(experiment, monkeypatch):
    monkeypatch.delenv("HYBRID_SMOLLM2_GGUF", raising=False)
    if experiment == "apriel_15b":  # needs the user's teacher and data: give them to both
        pytest.skip("apriel_15b needs required values (teacher.path, data.*)")
    hydra = compose([f"experiment={experiment}"] if experiment else [])
    assert to_plain(preset_config(experiment)) == to_plain(hydra)


def test_environment_interpolation(monkeypatch):
    monkeypatch.setenv("HYBRID_SMOLLM2_GGUF", "/models/smollm2.gguf")
    assert preset_config("smollm2").teacher.path == "/models/smollm2.gguf"
    assert compose(["experiment=smollm2"]).teacher.path == "/models/smollm2.gguf"
