"""`python -m flows.serve` registers deployments with a real Prefect server (started here); a flow run
created from a deployment through the Prefect API, with overrides, runs and completes."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import uuid

import pytest

from fixtures_servers import free_port, start_server
from flows.ablation import ablation
from flows.convert import convert
from flows.serve import DEPLOYMENTS, deployments
from tests.flows.helpers import PYTHON, subprocess_env, wait_for, wait_for_flow_run


def test_deployments_import_and_point_at_the_flow():
    built = deployments()
    assert [deployment.name for deployment in built] == list(DEPLOYMENTS)
    for deployment in built:
        flow, parameters, _ = DEPLOYMENTS[deployment.name]
        module, _, name = deployment.entrypoint.rpartition(".")
        assert getattr(importlib.import_module(module), name) is flow  # what a worker will import
        assert set(deployment.parameters) == set(parameters)
        assert deployment.enforce_parameter_schema  # the UI validates edited parameters
    assert {DEPLOYMENTS[d.name][0] for d in built} == {convert, ablation}


@pytest.mark.slow
def test_deployment_started_through_the_api_completes(tmp_path, mlflow_tracking_uri):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_env = subprocess_env(tmp_path, PREFECT_UI_ENABLED="false")
    server = start_server(
        "prefect server",
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        url=f"http://127.0.0.1:{port}", ready_path="/api/health", log_path=tmp_path / "prefect-server.log",
        env=server_env, cwd=tmp_path, timeout_s=180,
    )
    serve_log = tmp_path / "serve.log"
    with open(serve_log, "wb") as log:
        serving = subprocess.Popen(
            [PYTHON, "-m", "flows.serve"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=subprocess_env(tmp_path, PREFECT_API_URL=api_url, PREFECT_RUNNER_POLL_FREQUENCY="2"),
        )
    run_name = f"served-{uuid.uuid4().hex[:6]}"
    overrides = ["experiment=tiny", f"run_name={run_name}", f"storage.uri={tmp_path / 'artifacts'}",
                 f"storage.cache_dir={tmp_path / 'cache'}", f"tracking.uri={mlflow_tracking_uri}",
                 f"tracking.experiment={run_name}"]
    try:
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            def registered():
                if serving.poll() is not None:
                    raise AssertionError(f"flows.serve exited:\n{serve_log.read_text()[-3000:]}")
                try:  # every deployment (they are registered one after the other)
                    return {name: client.read_deployment_by_name(f"{flow.name}/{name}") for name, (flow, _, _) in DEPLOYMENTS.items()}
                except ObjectNotFound:
                    return None

            registered_deployments = wait_for(registered, 180, "the deployments", interval_s=1)
            assert registered_deployments["tiny"].parameters["overrides"] == ["experiment=tiny"]
            assert registered_deployments["ablation"].parameters == {"overrides": []}
            deployment = registered_deployments["convert"]
            flow_run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"overrides": overrides, "until": "loo"})

            state = wait_for_flow_run(client, flow_run.id, 300, interval_s=1)
            assert state.is_completed(), f"{state!r}\n{serve_log.read_text()[-3000:]}"
    finally:
        if serving.poll() is None:
            os.killpg(serving.pid, signal.SIGTERM)
            try:
                serving.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serving.pid, signal.SIGKILL)
                serving.wait(timeout=10)
        server.stop()
    store = tmp_path / "artifacts" / run_name
    assert (store / "teacher" / "manifest.json").is_file()
    assert (store / "loo" / "manifest.json").is_file()
    assert not (store / "H-2").exists()  # until=loo
