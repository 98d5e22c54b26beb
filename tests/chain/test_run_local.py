"""run_local: the one executor over a folder store, without Prefect or MLflow. Changing nothing runs
nothing; changing a setting runs the stages that read it (and, through content digests, those after)."""

from __future__ import annotations

import functools
import json

import pytest

import pipeline.stages
from pipeline.chain import run_chain, run_local
from pipeline.config import to_plain
from pipeline.executor import work_root_for
from pipeline.stages.common import RUN_CONFIG
from pipeline.store import open_store

from tests.chain.test_cache_keys import KeyRecorder
from tests.stages.conftest import tiny_config


class SettingsRecorder(KeyRecorder):
    """Records each call's settings as plain values (what run_config.json holds), running nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.plain: dict[str, dict] = {}

    def __call__(self, call):
        self.plain[call.name] = to_plain(call.settings)
        return super().__call__(call)


def counting(monkeypatch, names):
    """Wraps stage functions to record their calls (the wrapper keeps their signature and code version)."""
    calls = []
    for name in names:
        real = getattr(pipeline.stages, name)

        @functools.wraps(real)
        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipeline.stages, name, counted)
    return calls


@pytest.fixture
def tiny(tmp_path):
    cfg = tiny_config()
    cfg.storage.uri, cfg.storage.cache_dir = str(tmp_path / "store"), str(tmp_path / "cache")
    return cfg


def test_rerun_skips_and_a_changed_setting_reruns_its_readers(tiny, tmp_path, monkeypatch):
    calls = counting(monkeypatch, ["run_teacher", "run_loo", "run_convert"])
    folders = run_local(tiny, until="convert")
    assert calls == ["run_teacher", "run_loo", "run_convert"]
    assert set(folders) == {"teacher", "loo", "H-2"}
    settings = SettingsRecorder()
    run_chain(tiny, settings, until="convert")
    for name in folders:
        manifest = json.loads((tmp_path / "store" / "test" / name / "manifest.json").read_text())
        assert manifest["metadata"]["code_version"] >= 1
        # run_config.json: the call's settings (what its key digests), in their order
        written = json.loads((folders[name] / RUN_CONFIG).read_text())
        assert written == settings.plain[name] and list(written) == list(settings.plain[name])
    work = work_root_for(tmp_path / "cache", open_store(tmp_path / "store" / "test"), "test")
    assert work.parent == tmp_path / "cache" / "work" and work.name.startswith("test-")
    assert work.is_dir() and not (work / "H-2").exists()  # work folders go once committed

    calls.clear()
    run_local(tiny, until="convert")
    assert calls == []  # nothing changed: nothing runs

    tiny.train.steps = 4  # read by the conversions only
    run_local(tiny, until="convert")
    assert calls == ["run_convert"]

    calls.clear()
    tiny.evaluate.max_new_tokens = 5  # read by the evaluation only
    run_local(tiny, until="convert")
    assert calls == []
