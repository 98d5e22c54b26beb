"""The team's services as local processes, without docker: a Prefect server, an MLflow tracking server on
SQLite and an S3 server (moto's), on localhost.

    python -m flows.stack up      # = make stack: starts them, waits until each answers, prints addresses
    source .cache/stack/env       # PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, HYBRID_STORAGE_URI, keys
    make serve                    # the deployments, run against the stack (overrides storage=s3 tracking=server)
    python -m flows.stack down    # = make stack-down

Everything lives under `<dir>` (default .cache/stack/): logs, the Prefect database (its own PREFECT_HOME),
mlflow.db and MLflow's artifacts, and `stack.json` with the processes' ids. moto's S3 server keeps its
buckets in memory: they are gone after `down` (the MLflow runs stay, in mlflow.db). For servers that
keep everything, use infra/docker-compose.yml.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path(".cache/stack")
STATE_FILE = "stack.json"
ENV_FILE = "env"
BUCKET = "hybrid-distill"
# moto checks no signature, but boto3 needs some keys; these are not secrets.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "stack-access-key", "AWS_SECRET_ACCESS_KEY": "stack-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1"}


class StackError(RuntimeError):
    """A service did not start (its log's tail is in the message), or a port is taken."""


@dataclass
class Service:
    name: str
    port: int
    command: list[str]
    ready_path: str
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def services(root: Path, prefect_port: int, mlflow_port: int, s3_port: int) -> list[Service]:
    python = sys.executable
    return [
        Service("s3", s3_port, [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                "/moto-api/", {}),
        Service("mlflow", mlflow_port,
                [python, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--artifacts-destination", str(root / "mlflow-artifacts"), "--workers", "1"],
                "/health", {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
        Service("prefect", prefect_port,
                [python, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                # The UI asks the server where its API is: the server's settings, not --port, decide that.
                "/api/health", {"PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                "PREFECT_API_URL": "", "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api"}),
    ]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_group(pid: int, wait_s: float = 15.0) -> None:
    """SIGTERM to the process group the service leads, SIGKILL if it is still there after wait_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            try:  # reap it if it is our child (up and down in one process: the tests)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)


def environment(state: dict) -> dict[str, str]:
    """What a client of the stack sets: the flows' overrides storage=s3 tracking=server read these."""
    return {
        "PREFECT_API_URL": f"{state['prefect']}/api",
        "MLFLOW_TRACKING_URI": state["mlflow"],
        "AWS_ENDPOINT_URL": state["s3"],
        "HYBRID_STORAGE_URI": f"s3://{state['bucket']}/runs",
        **S3_KEYS,
    }


def up(root: Path = DEFAULT_DIR, prefect_port: int = 4200, mlflow_port: int = 5000, s3_port: int = 9000,
       timeout_s: float = 180.0) -> dict:
    """Starts the services (each in its own process group, detached), waits until each answers, creates
    the checkpoint bucket; returns the state written to `<root>/stack.json`. Stops what it started if one fails."""
    root = root.resolve()
    if (root / STATE_FILE).is_file():
        raise StackError(f"a stack is already running from {root} (stop it: python -m flows.stack down --dir {root})")
    root.mkdir(parents=True, exist_ok=True)
    planned = services(root, prefect_port, mlflow_port, s3_port)
    taken = [f"{service.name} port {service.port}" for service in planned if not _port_free(service.port)]
    if taken:
        raise StackError(f"ports in use: {', '.join(taken)} (choose others: --prefect-port/--mlflow-port/--s3-port)")
    started: dict[str, int] = {}
    try:
        for service in planned:
            env = {**os.environ, **service.env}
            env = {key: value for key, value in env.items() if value != ""}
            log = root / f"{service.name}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(service.command, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, cwd=root, start_new_session=True)
            started[service.name] = process.pid
            deadline = time.monotonic() + timeout_s
            while not _answers(service.url + service.ready_path):
                if process.poll() is not None:
                    raise StackError(f"{service.name} exited with code {process.returncode}; {log}:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise StackError(f"{service.name} did not answer {service.url}{service.ready_path} within "
                                     f"{timeout_s:.0f}s; {log}:\n{_tail(log)}")
                time.sleep(0.3)
        _create_bucket(f"http://127.0.0.1:{s3_port}", BUCKET)
    except BaseException:
        for pid in started.values():
            _stop_group(pid)
        raise
    state = {**{service.name: service.url for service in planned}, "bucket": BUCKET, "pids": started,
             "logs": {service.name: str(root / f"{service.name}.log") for service in planned}}
    (root / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    (root / ENV_FILE).write_text("".join(f"export {key}={value}\n" for key, value in environment(state).items()))
    return state


def _create_bucket(endpoint_url: str, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=S3_KEYS["AWS_DEFAULT_REGION"],
                          aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=bucket)


def down(root: Path = DEFAULT_DIR) -> list[str]:
    """Stops the services `up` started from `root` (by their recorded process groups); returns their names."""
    state_file = root.resolve() / STATE_FILE
    if not state_file.is_file():
        return []
    state = json.loads(state_file.read_text())
    for pid in reversed(list(state["pids"].values())):
        _stop_group(int(pid))
    state_file.unlink()
    return list(state["pids"])


def describe(state: dict, root: Path) -> str:
    env_file = root / ENV_FILE
    return "\n".join([
        f"Prefect UI:  {state['prefect']}   (API {state['prefect']}/api)",
        f"MLflow UI:   {state['mlflow']}",
        f"S3 (moto):   {state['s3']}   bucket s3://{state['bucket']} (in memory: gone after stack-down)",
        f"Logs:        {', '.join(state['logs'].values())}",
        f"Clients:     source {env_file}   (then: make serve, and runs with overrides storage=s3 tracking=server)",
        "Stop:        make stack-down",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state, logs and databases (default .cache/stack)")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--s3-port", type=int, default=9000)
    args = parser.parse_args(argv)
    if args.action == "down":
        stopped = down(args.dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else f"no stack running from {args.dir}")
        return 0
    try:
        state = up(args.dir, args.prefect_port, args.mlflow_port, args.s3_port)
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(describe(state, args.dir.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
