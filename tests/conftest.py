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
