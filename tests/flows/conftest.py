"""Fixtures for the flow tests: a temporary Prefect API and a tiny teacher in S3.

The flows run on the `experiment=tiny` preset (a 4-layer, 32-wide model, a few steps per stage), against
the session's real moto S3 server and `mlflow server` (tests/fixtures_servers.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[None]:
    """Flows in this process report to a temporary Prefect server (own database and PREFECT_HOME)."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=None):
            yield


@pytest.fixture(scope="session")
def tiny_teacher_uri(moto_server, tmp_path_factory) -> str:
    """s3://<bucket>/teachers/tiny: a random 4-layer Llama (GQA) with the demo tokenizer, as plain files."""
    from tests.teachers import save_tiny_teacher

    folder = save_tiny_teacher(tmp_path_factory.mktemp("teacher"))
    bucket = moto_server.create_bucket("models")
    client = moto_server.client()
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"teachers/tiny/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/teachers/tiny"


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads() -> Iterator[None]:
    """Stages set torch's thread count from hardware.threads (the tiny preset: 1); later tests get it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
