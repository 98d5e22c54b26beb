"""Every known secret shape through every output: the redaction itself, the plan's one-line errors, and a
flow run whose settings and environment hold them, scanned afterwards in the console and logs, MLflow
(params, tags, every artifact), Prefect (logs, artifacts, flow and task run states) and every object the
store wrote (manifests, run_config.json, stage.json)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from pathlib import Path

import pytest

from pipeline.redaction import REDACTED, redact, redact_text, redacted_exception

# secret value -> how it appears in a text (each appears in one shape; the value alone must never survive)
TOKEN = "ghp_" + "Zq8" * 12  # a GitHub token used as the user name of a URL
SHAPES = {
    "pw-with/slash": "https://reader:pw-with/slash@data.example.com/generic.jsonl",
    "encoded%2Fpw": "https://reader:encoded%2Fpw@data.example.com/x.jsonl",
    TOKEN: f"https://{TOKEN}@raw.example.com/o/r/train.jsonl",
    "tok-user-only-77": "git+https://tok-user-only-77@host.example.com/repo",
    "oauth-x-token-5": "https://oauth-x-token-5:x-oauth-basic@github.example.com/r",
    "Sig0123456789abcdef": ("https://b.s3.amazonaws.com/k.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                            "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
                            "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=Sig0123456789abcdef"),
    "FQoGZXIvYXdzSessTok": "https://b.s3.amazonaws.com/k?X-Amz-Security-Token=FQoGZXIvYXdzSessTok&X-Amz-Expires=9",
    "AKIAIOSFODNN7EXAMPLE": "access key AKIAIOSFODNN7EXAMPLE in a message",
    "qs-token-4242": "http://host/data.jsonl?token=qs-token-4242&page=2",
    "qs-access-9191": "http://host/d?access_token=qs-access-9191",
    "azure-sig-3131": "https://acct.blob.core.windows.net/c/f.jsonl?sv=2024&sig=azure-sig-3131",
    "apikey-q-5555": "https://api.example.com/v1?api_key=apikey-q-5555",
    "bearer-abc.def-777": "Authorization: Bearer bearer-abc.def-777",
    "hf_" + "A1b2" * 8: "using hf_" + "A1b2" * 8 + " for the hub",
    "sk-" + "x9" * 16: "OPENAI key sk-" + "x9" * 16,
    "mlflowpass-6161": "http://mlflowuser:mlflowpass-6161@127.0.0.1:5000/#/experiments/1",
}
ENVIRONMENT = {  # secrets only the environment holds; their values must not leave it
    "DATA_PASSWORD": "env-data-pw/with-slash-01",
    "HF_TOKEN": "hf_envTokenValue0000000000001",
    "MLFLOW_TRACKING_PASSWORD": "env-mlflow-pw-02",
    "AWS_SESSION_TOKEN": "env-aws-session-token-03",
}


def test_every_secret_shape_is_masked(monkeypatch, tmp_path):
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PWD", str(tmp_path))  # the working directory is no secret, though `pwd` may name one
    assert redact_text(f"store {tmp_path}/artifacts") == f"store {tmp_path}/artifacts"
    for secret, text in SHAPES.items():
        masked = redact_text(text)
        assert secret not in masked and REDACTED in masked, (text, masked)
    for value in ENVIRONMENT.values():
        assert value not in redact_text(f"the value {value} in a line") and REDACTED in redact_text(value)
    harmless = ["s3://bucket/runs/demo/H-2", "sqlite:////tmp/mlflow.db", "https://host:8080/path/x.jsonl?page=2",
                "num_key_value_heads=4 max_new_tokens=48", "user@example.com wrote", "file:///tmp/a b/c",
                "http://127.0.0.1:5000/#/experiments/1/runs/2"]
    assert [redact_text(text) for text in harmless] == harmless
    nested = redact({"data": {"generic": SHAPES[TOKEN]}, "password": "x", "hf_token": None, "list": ["AKIAIOSFODNN7EXAMPLE"]})
    assert nested == {"data": {"generic": f"https://{REDACTED}@raw.example.com/o/r/train.jsonl"},
                      "password": REDACTED, "hf_token": None, "list": [REDACTED]}


def test_an_error_leaving_through_prefect_or_the_console_is_redacted():
    from pipeline.store import StoreError

    error = StoreError(f"cannot read {SHAPES['pw-with/slash']}")
    twin = redacted_exception(error)
    assert type(twin) is StoreError and "pw-with/slash" not in str(twin)
    disk = redacted_exception(OSError(28, "No space left on device", SHAPES["qs-token-4242"]))
    assert isinstance(disk, OSError) and disk.errno == 28 and "qs-token-4242" not in str(disk)
    clean = StoreError("nothing secret")
    assert redacted_exception(clean) is clean


def test_plan_errors_never_print_an_interpolated_secret(tmp_path, monkeypatch):
    """The review's case: `error: data.distill=https://reader:pw...@...` printed from ${oc.env:...}."""
    from flows.convert import main

    monkeypatch.setenv("HD_DATA_SECRET", "interp-secret-value-99")
    monkeypatch.setenv("DATA_PASSWORD", ENVIRONMENT["DATA_PASSWORD"])
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = main(["--plan", "experiment=tiny", f"storage.uri={tmp_path / 'a'}", f"storage.cache_dir={tmp_path / 'c'}",
                     "data.distill=/nonexistent/${oc.env:HD_DATA_SECRET}/d.jsonl",
                     "data.sft=https://reader:${oc.env:DATA_PASSWORD}@data.example.com/sft.jsonl",
                     "tracking.uri=http://mlflowuser:mlflowpass-6161@127.0.0.1:9"])
    printed = stderr.getvalue() + stdout.getvalue()
    assert code == 1 and "tracking.uri: MLflow server http://<redacted>@127.0.0.1:9 cannot be reached" in printed
    assert "data.distill=/nonexistent/<redacted>/d.jsonl: no such file or folder" in printed
    for secret in ("interp-secret-value-99", ENVIRONMENT["DATA_PASSWORD"], "mlflowpass-6161"):
        assert secret not in printed


@pytest.mark.slow
def test_a_flow_run_holding_every_secret_shape_leaks_none(prefect_api, moto_server, mlflow_server, tiny_teacher_uri,
                                                          tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client

    from flows.convert import convert
    from tests.flows.test_convert_flow import capture_output

    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    bucket = moto_server.create_bucket("secrets")
    host = mlflow_server.tracking_uri.removeprefix("http://")
    experiment = f"secrets-{uuid.uuid4().hex[:8]}"
    overrides = [
        "experiment=tiny", "run_name=secrets", f"storage.uri=s3://{bucket}/runs",
        f"storage.endpoint_url={moto_server.endpoint_url}", f"storage.cache_dir={tmp_path / 'cache'}",
        f"tracking.uri=http://mlflowuser:mlflowpass-6161@{host}", f"tracking.experiment={experiment}",
        f"teacher.path={tiny_teacher_uri}",
        # read by no stage up to LOO: they travel through the config into every record
        "data.generic=https://reader:${oc.env:DATA_PASSWORD}@data.example.com/generic.jsonl",
        f"data.sft='{SHAPES['Sig0123456789abcdef']}'",  # quoted: Hydra's grammar reads '=' and '&'
    ]
    console = tmp_path / "console.txt"
    with capture_output(console):
        result = convert(overrides=overrides, until="loo")
    assert result["ran"] == ["teacher", "loo"]
    secrets = [secret for secret in SHAPES if secret in " ".join(overrides)] + list(ENVIRONMENT.values())
    secrets += ["mlflowpass-6161", "AKIAIOSFODNN7EXAMPLE"]

    def assert_clean(text: str, where: str) -> None:
        leaked = [secret for secret in secrets if secret in text]
        assert not leaked, f"{leaked} found in {where}"

    printed = console.read_text(errors="replace")
    assert "MLflow:" in printed and f"http://<redacted>@{host}" in printed  # the run summary's line
    assert_clean(printed, "the console and logs")
    assert_clean(json.dumps(result), "the flow's result")

    client = MlflowClient(mlflow_server.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) >= 3
    for run in runs:
        assert_clean(json.dumps([run.data.params, run.data.tags]), f"MLflow run {run.info.run_name}")
        folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id),
                                                     tracking_uri=mlflow_server.tracking_uri)
        for path in Path(folder).rglob("*"):
            if path.is_file():
                assert_clean(path.read_bytes().decode("latin-1"), f"MLflow artifact {path.name}")

    loo = Artifact.get("secrets-loo")
    assert loo is not None and "<redacted>@" in loo.data  # its MLflow link, without the credentials
    with get_client(sync_client=True) as prefect:
        assert_clean("\n".join(log.message for log in prefect.read_logs()), "Prefect logs")
        ours = [run for run in prefect.read_flow_runs() if run.parameters.get("overrides") == overrides]
        assert len(ours) == 1
        for flow_run in ours:
            # The parameters are the overrides as the user typed them (what is typed into Prefect is Prefect's):
            # the secrets of the environment stay in it, as ${oc.env:...}, never resolved there.
            parameters = json.dumps(flow_run.parameters)
            assert "${oc.env:DATA_PASSWORD}" in parameters
            assert not [value for value in ENVIRONMENT.values() if value in parameters]
            assert_clean(str(flow_run.state.message if flow_run.state else ""), "the Prefect flow run's state")
        for task_run in prefect.read_task_runs():
            assert_clean(str(task_run.state.message if task_run.state else ""), f"Prefect task {task_run.name}")

    s3 = moto_server.client()
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for item in page.get("Contents", [])]
    assert any(key.endswith("/run_config.json") for key in keys) and any(key.endswith("manifest.json") for key in keys)
    for key in keys:  # manifests, stage.json, run_config.json, weights: nothing the store wrote holds one
        assert_clean(s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("latin-1"), key)
    for path in (tmp_path / "cache").rglob("*"):  # nor the local cache (downloads, work folders)
        if path.is_file() and not path.is_symlink():
            assert_clean(path.read_bytes().decode("latin-1"), str(path))
    assert os.environ["DATA_PASSWORD"] == ENVIRONMENT["DATA_PASSWORD"]
