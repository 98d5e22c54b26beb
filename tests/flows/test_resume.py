"""A run killed (SIGKILL) in the middle of a conversion, then restarted: no completed stage is computed
again, and the interrupted conversion continues from its last saved training state."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import uuid

import pytest

import pipeline.stages
from flows.convert import convert
from pipeline.executor import work_root_for
from pipeline.store import open_store
from tests.flows.helpers import PYTHON, subprocess_env, wait_for

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 60, 4
_STATE = re.compile(r"^step-(\d+)$")


def saved_steps(state_dir) -> list[int]:
    if not state_dir.is_dir():
        return []
    return sorted(int(match.group(1)) for path in state_dir.iterdir() if (match := _STATE.match(path.name)))


def test_killed_conversion_resumes_from_its_last_save(prefect_api, mlflow_tracking_uri, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    overrides = [
        "experiment=tiny", "run_name=killed", f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}",
        f"storage.uri={tmp_path / 'artifacts'}", f"storage.cache_dir={tmp_path / 'cache'}",
        f"tracking.uri={mlflow_tracking_uri}", f"tracking.experiment={experiment}",
    ]
    store_dir = tmp_path / "artifacts" / "killed"
    state_dir = work_root_for(tmp_path / "cache", open_store(store_dir), "killed") / "H-2" / "train_state"
    log_path = tmp_path / "first-run.log"

    # 1. The command line, killed without warning once the first conversion has saved a state.
    with open(log_path, "wb") as log:
        process = subprocess.Popen([PYTHON, "-m", "flows.convert", *overrides], cwd=tmp_path, stdout=log,
                                   stderr=subprocess.STDOUT, env=subprocess_env(tmp_path), start_new_session=True)
    try:
        def saved_mid_conversion():
            if process.poll() is not None:
                raise AssertionError(f"the run ended before it was killed:\n{log_path.read_text()[-3000:]}")
            steps = saved_steps(state_dir)
            return steps and SAVE_EVERY <= steps[-1] < STEPS

        wait_for(saved_mid_conversion, 300, "a saved training state of H-2", interval_s=0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the flow and the Prefect server it started
        process.wait(timeout=30)
    saved = saved_steps(state_dir)[-1]
    assert (store_dir / "teacher" / "manifest.json").is_file() and (store_dir / "loo" / "manifest.json").is_file()
    assert not (store_dir / "H-2" / "manifest.json").exists()
    committed = {name: (store_dir / name / "manifest.json").read_text() for name in ("teacher", "loo")}

    # 2. Restarted: teacher and LOO must not run again; H-2 continues after step `saved`.
    for name in ("run_teacher", "run_loo"):
        @functools.wraps(getattr(pipeline.stages, name))
        def forbidden(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} ran again although its output was complete")
        monkeypatch.setattr(pipeline.stages, name, forbidden)
    result = convert(overrides=overrides)
    assert result["skipped"] == ["teacher", "loo"]
    assert result["ran"] == ["H-2", "mmr-H-2", "H-3", "H-3-SFT", "evaluate"]
    assert {name: (store_dir / name / "manifest.json").read_text() for name in ("teacher", "loo")} == committed
    meta = json.loads((store_dir / "H-2" / "stage.json").read_text())
    assert meta["steps"] == STEPS

    client = MlflowClient(mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string="tags.checkpoint = 'H-2' and tags.stage = 'convert'")
    by_status = {run.info.status: run for run in runs}
    assert set(by_status) == {"KILLED", "FINISHED"}  # the killed attempt's run, ended by the restart
    killed_steps = [m.step for m in client.get_metric_history(by_status["KILLED"].info.run_id, "train/loss")]
    resumed_steps = [m.step for m in client.get_metric_history(by_status["FINISHED"].info.run_id, "train/loss")]
    assert min(killed_steps) == 1
    assert min(resumed_steps) == saved + 1 > 1  # the resumed training started from the last save
    assert max(resumed_steps) == STEPS
    assert not state_dir.exists()  # the work folder goes once the checkpoint is committed
