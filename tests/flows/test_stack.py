"""`python -m flows.stack up` (make stack) starts a Prefect server, an MLflow server and an S3 server as
local processes; a run started through the Prefect API on a served deployment, with overrides, writes its
checkpoints to that S3 server and its runs to that MLflow server; `down` stops every process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
import uuid

import pytest

from fixtures_servers import free_port
from flows.stack import STATE_FILE, environment
from tests.flows.helpers import PYTHON, REPO, subprocess_env, wait_for, wait_for_flow_run

pytestmark = pytest.mark.slow


def _process_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def test_stack_runs_a_deployment_into_its_s3_and_mlflow(tmp_path):
    import boto3
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path / "stack"
    ports = {"--prefect-port": free_port(), "--mlflow-port": free_port(), "--s3-port": free_port()}
    command = [PYTHON, "-m", "flows.stack", "up", "--dir", str(root), *[str(x) for kv in ports.items() for x in kv]]
    started = subprocess.run(command, cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True,
                             timeout=400)
    state = json.loads((root / STATE_FILE).read_text()) if (root / STATE_FILE).is_file() else None
    serving = None
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        # Every address it prints answers, and is the page it says it is.
        printed = started.stdout
        for name, path, marker in (("prefect", "/api/health", "true"), ("mlflow", "/health", "OK"),
                                   ("s3", "/moto-api/", "moto")):
            assert state[name] in printed
            with urllib.request.urlopen(state[name] + path, timeout=10) as response:
                assert marker in response.read().decode(errors="replace"), name
        assert f"source {root / 'env'}" in printed and (root / "env").is_file()
        with urllib.request.urlopen(state["prefect"] + "/ui-settings", timeout=10) as response:
            assert json.loads(response.read())["api_url"] == state["prefect"] + "/api"  # where the UI's page calls
        for log in state["logs"].values():
            assert os.path.getsize(log) > 0

        client_env = environment(state)
        serve_log = tmp_path / "serve.log"
        with open(serve_log, "wb") as log:
            serving = subprocess.Popen(
                [PYTHON, "-m", "flows.serve"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=subprocess_env(tmp_path, **client_env, PREFECT_RUNNER_POLL_FREQUENCY="2"))
        run_name = f"stack-{uuid.uuid4().hex[:6]}"
        overrides = ["experiment=tiny", "storage=s3", "tracking=server", f"run_name={run_name}",
                     f"tracking.experiment={run_name}", f"storage.cache_dir={tmp_path / 'cache'}"]
        with temporary_settings({PREFECT_API_URL: client_env["PREFECT_API_URL"]}), \
                get_client(sync_client=True) as prefect:
            def registered():
                if serving.poll() is not None:
                    raise AssertionError(f"flows.serve exited:\n{serve_log.read_text()[-3000:]}")
                try:
                    return prefect.read_deployment_by_name("convert/tiny")
                except ObjectNotFound:
                    return None

            deployment = wait_for(registered, 180, "the deployments", interval_s=1)
            flow_run = prefect.create_flow_run_from_deployment(
                deployment.id, parameters={"overrides": overrides, "until": "convert"})

            final = wait_for_flow_run(prefect, flow_run.id, 420, interval_s=2)
            assert final.is_completed(), f"{final!r}\n{serve_log.read_text()[-3000:]}"

        # Its checkpoints, committed, in the stack's bucket (HYBRID_STORAGE_URI, read by storage=s3).
        s3 = boto3.client("s3", endpoint_url=state["s3"], region_name="us-east-1",
                          aws_access_key_id=client_env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=client_env["AWS_SECRET_ACCESS_KEY"])
        for name in ("teacher", "loo", "H-2"):
            manifest = json.loads(s3.get_object(Bucket=state["bucket"], Key=f"runs/{run_name}/{name}/manifest.json")
                                  ["Body"].read())
            assert manifest["files"], name
        # Its runs in the stack's MLflow, the conversion's training curve under train/loss.
        mlflow = MlflowClient(state["mlflow"])
        experiment = mlflow.get_experiment_by_name(run_name)
        runs = {run.info.run_name: run for run in mlflow.search_runs([experiment.experiment_id])}
        assert {run_name, "teacher/teacher", "loo/loo", "convert/H-2"} <= set(runs)
        assert runs[run_name].data.tags["storage.uri"] == f"s3://{state['bucket']}/runs/{run_name}"
        assert mlflow.get_metric_history(runs["convert/H-2"].info.run_id, "train/loss")
        assert runs["convert/H-2"].data.tags["checkpoint.uri"] == f"s3://{state['bucket']}/runs/{run_name}/H-2"
    finally:
        if serving is not None and serving.poll() is None:
            os.killpg(serving.pid, signal.SIGTERM)
            try:
                serving.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serving.pid, signal.SIGKILL)
        stopped = subprocess.run([PYTHON, "-m", "flows.stack", "down", "--dir", str(root)], cwd=REPO,
                                 env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "stopped: s3, mlflow, prefect" in stopped.stdout, stopped
    assert not (root / STATE_FILE).exists()
    assert not any(_process_alive(int(pid)) for pid in state["pids"].values())
