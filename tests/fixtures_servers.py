"""Real S3 (moto's standalone server) and MLflow tracking servers for tests, started once per session.

Both listen on 127.0.0.1 on a free port, run in their own process group and are stopped (the whole
group) when the session ends. tests/conftest.py imports the fixtures, so any test can ask for them:

    def test_something(s3_store_uri):            # s3://<fresh bucket>/store, AWS_ENDPOINT_URL set
        store = open_store(s3_store_uri)

    def test_other(moto_server, s3_bucket):       # endpoint_url + a fresh bucket name
        store = open_store(f"s3://{s3_bucket}/x", endpoint_url=moto_server.endpoint_url)

    def test_tracking(mlflow_tracking_uri, mlflow_experiment):   # http://127.0.0.1:<port>, unique name
        tracker = Tracker(mlflow_tracking_uri, mlflow_experiment, "run-1")

AWS credentials are dummies set in the environment for the session (`aws_test_credentials`); real
credentials and profiles from the machine are hidden from the tests.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "MlflowServer",
    "MotoServer",
    "ServerProcess",
    "aws_test_credentials",
    "free_port",
    "mlflow_experiment",
    "mlflow_server",
    "mlflow_tracking_uri",
    "moto_server",
    "s3_bucket",
    "s3_store_uri",
    "start_moto_server",
    "start_server",
]

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
AWS_HIDDEN_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class ServerProcess:
    """A server subprocess in its own process group, with its log file."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the server's process group (it was started as a session leader), SIGKILL if needed."""
        if self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def start_server(
    name: str,
    command: Sequence[str],
    *,
    url: str,
    ready_path: str,
    log_path: Path,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 120.0,
) -> ServerProcess:
    """Starts ``command`` (``env`` added to os.environ; None removes a variable) and waits until GET
    ``url + ready_path`` answers 200."""
    full_env = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    log_file = open(log_path, "wb")  # noqa: SIM115 (the child keeps writing to it)
    process = subprocess.Popen(
        list(command),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    log_file.close()
    server = ServerProcess(name, url, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} while starting:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(url + ready_path, timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{name} did not answer {url + ready_path} within {timeout_s:.0f}s:\n{server.log_tail()}")


# ----------------------------------------------------------------------------------------------------
# S3


@pytest.fixture(scope="session")
def aws_test_credentials() -> Iterator[dict[str, str]]:
    """Dummy AWS credentials in os.environ for the whole session; real ones hidden."""
    with pytest.MonkeyPatch.context() as patch:
        for name in AWS_HIDDEN_ENV:
            patch.delenv(name, raising=False)
        for name, value in AWS_TEST_ENV.items():
            patch.setenv(name, value)
        yield dict(AWS_TEST_ENV)


@dataclasses.dataclass
class MotoServer:
    endpoint_url: str
    server: ServerProcess

    def client(self, **config: Any) -> Any:
        """A raw boto3 S3 client on this server (for test set-up and inspection)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def create_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def start_moto_server(log_path: Path, env: Mapping[str, str] | None = None) -> MotoServer:
    port = free_port()
    server = start_server(
        "moto_server",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        url=f"http://127.0.0.1:{port}",
        ready_path="/moto-api/",
        log_path=log_path,
        env=env,
        timeout_s=60,
    )
    return MotoServer(server.url, server)


@pytest.fixture(scope="session")
def moto_server(aws_test_credentials, tmp_path_factory) -> Iterator[MotoServer]:
    """moto's S3 server on 127.0.0.1 (no auth checks); ``.endpoint_url``, ``.client()``, ``.create_bucket()``."""
    moto = start_moto_server(tmp_path_factory.mktemp("moto") / "moto_server.log")
    try:
        yield moto
    finally:
        moto.server.stop()


@pytest.fixture
def s3_bucket(moto_server) -> str:
    """A fresh, empty bucket on the moto server."""
    return moto_server.create_bucket()


@pytest.fixture
def s3_store_uri(moto_server, s3_bucket, monkeypatch) -> str:
    """``s3://<fresh bucket>/store`` with AWS_ENDPOINT_URL pointing at the moto server for this test."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    return f"s3://{s3_bucket}/store"


# ----------------------------------------------------------------------------------------------------
# MLflow


@dataclasses.dataclass
class MlflowServer:
    tracking_uri: str
    backend_store_uri: str
    artifacts_dir: Path
    server: ServerProcess


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """``mlflow server`` with a SQLite backend and proxied artifacts in a temp folder (10-20 s to start)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    backend = f"sqlite:///{root / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job workers (CPU on small machines)
        "MLFLOW_TRACKING_URI": None,
    }
    server = start_server(
        "mlflow server",
        command,
        url=f"http://127.0.0.1:{port}",
        ready_path="/health",
        log_path=root / "mlflow_server.log",
        env=env,
        cwd=root,
        timeout_s=120,
    )
    try:
        yield MlflowServer(server.url, backend, root / "artifacts", server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_tracking_uri(mlflow_server) -> str:
    """``http://127.0.0.1:<port>`` of the session's MLflow server."""
    return mlflow_server.tracking_uri


@pytest.fixture
def mlflow_experiment(request) -> str:
    """An experiment name no other test uses (the server is shared by the session)."""
    return f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"
