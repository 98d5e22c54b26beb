"""An MLflow server that goes away in the middle of a run: the next call fails in one line that names
the server, within a bounded time (the retry budget is MLflow's MLFLOW_HTTP_REQUEST_* settings)."""

from __future__ import annotations

import sys
import time

import pytest

from fixtures_servers import free_port, start_server
from pipeline.tracking import Tracker


@pytest.fixture
def doomed_mlflow_server(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    server = start_server("mlflow server", command, url=f"http://127.0.0.1:{port}", ready_path="/health",
                          log_path=tmp_path / "mlflow.log", cwd=tmp_path, timeout_s=120,
                          env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_TRACKING_URI": None})
    try:
        yield server
    finally:
        server.stop()


def test_mlflow_server_going_away_mid_run_is_one_line(doomed_mlflow_server, monkeypatch):
    from mlflow.exceptions import MlflowException

    from flows.common import USER_ERRORS

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tracker = Tracker(doomed_mlflow_server.url, "outage", "run-1")
    with pytest.raises(MlflowException) as error:
        with tracker.child("convert", checkpoint="H-2") as run:
            run.log_metrics({"train/loss": 1.0}, step=0)  # the server is there
            doomed_mlflow_server.stop()  # ... and then it is not
            started = time.monotonic()
            run.log_metrics({"train/loss": 0.9}, step=1)
    assert time.monotonic() - started < 60
    message = str(error.value)
    assert "\n" not in message and doomed_mlflow_server.url.split("//")[1] in message, message
    assert isinstance(error.value, USER_ERRORS), "the command line prints it as one 'error:' line"
