"""A stage's name is one of pipeline.config.STAGES, checked when the stage is defined."""

import importlib
import pkgutil

import pytest

import pipeline.stages
from pipeline.config import STAGES
from pipeline.stages.common import stage


def test_a_stage_name_not_in_stages_is_refused_with_one_line():
    with pytest.raises(ValueError, match="unknown stage name 'teachr'") as error:
        @stage("teachr", version=1)
        def teachr():
            pass
    assert "\n" not in str(error.value)


def test_every_registered_stage_is_in_stages_and_every_name_in_stages_is_registered():
    registered = set()
    for module in pkgutil.iter_modules(pipeline.stages.__path__):
        namespace = vars(importlib.import_module(f"pipeline.stages.{module.name}"))
        registered |= {value.stage_name for value in namespace.values() if hasattr(value, "stage_name")}
    assert registered == set(STAGES)
