"""Helpers of the flow tests: subprocess environments, polling."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def subprocess_env(tmp_path: Path, **extra: str | None) -> dict[str, str]:
    """The environment of a `python -m flows.*` subprocess: this repo importable, its own PREFECT_HOME,
    no Prefect server configured (an ephemeral one) unless PREFECT_API_URL is given."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update({
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def wait_for_flow_run(client, flow_run_id, timeout_s: float, interval_s: float = 1.0):
    """The final state of a Prefect flow run (polled through `client`), or AssertionError after timeout_s."""
    def finished():
        state = client.read_flow_run(flow_run_id).state
        return state if state is not None and state.is_final() else None

    return wait_for(finished, timeout_s, "the flow run to finish", interval_s=interval_s)
