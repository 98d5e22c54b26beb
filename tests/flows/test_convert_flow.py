"""The convert flow end to end against a real S3 endpoint over HTTP (moto server) and a real `mlflow
server`, read back through boto3, MlflowClient and the Prefect API; then re-runs that skip, and a
checkpoint upload cut off before its manifest."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pipeline.stages
from flows.convert import convert
from pipeline.store import EndpointUnreachableError, S3Store, manifest_digest, open_store

pytestmark = pytest.mark.slow

SECRET = "hunter2-not-for-mlflow"
# credentials the flow's environment holds while it runs; none may appear in anything it records
CANARY_ENV = {
    "AWS_SESSION_TOKEN": "canary-session-token-6d1f",
    "HF_TOKEN": "hf_canaryTokenQ8v2xw",
    "MLFLOW_TRACKING_TOKEN": "canary-mlflow-token-91ab",
}
SECRET_URL = f"https://reader:{SECRET}@data.example.com/generic.jsonl"  # never read (evaluate.generic_nll=false)
# output name -> stage, in the chain's order, for schedule.counts=[2, 3] (the tiny preset)
STAGES = {"teacher": "teacher", "loo": "loo", "H-2": "convert", "mmr-H-2": "mmr", "H-3": "step",
          "H-3-SFT": "sft", "evaluate": "evaluate"}
EVALUATED = ["teacher", "H-2", "H-3", "H-3-SFT"]
STAGE_FUNCTIONS = ("import_teacher", "run_teacher", "run_loo", "run_convert", "run_mmr", "run_step", "run_sft",
                   "run_evaluate")


@dataclass
class FlowRun:
    bucket: str
    run_name: str
    experiment: str
    tracking_uri: str
    overrides: list[str]
    result: dict
    seconds: float
    console: str = ""  # everything the flow printed or logged to stdout/stderr

    def key(self, name: str, filename: str, version: str | None = None) -> str:
        """The object key of a manifest (no version) or of a file of one version."""
        return f"runs/{self.run_name}/{name}/{version}/{filename}" if version else f"runs/{self.run_name}/{name}/{filename}"


def flow_overrides(bucket: str, run_name: str, endpoint_url: str, tracking_uri: str, experiment: str,
                   cache_dir: Path, teacher_uri: str) -> list[str]:
    return [
        "experiment=tiny",
        f"run_name={run_name}",
        f"storage.uri=s3://{bucket}/runs",
        f"storage.endpoint_url={endpoint_url}",
        f"storage.cache_dir={cache_dir}",
        f"tracking.uri={tracking_uri}",
        f"tracking.experiment={experiment}",
        f"teacher.path={teacher_uri}",
        f"data.generic={SECRET_URL}",
        "evaluate.generic_nll=false",
    ]


def forbid_stages(monkeypatch, names=STAGE_FUNCTIONS) -> None:
    """Any call of these stage functions fails the test (run_chain looks them up at call time; the
    stand-in keeps the stage's signature, name and code version, so its cache key is the same)."""
    for name in names:
        @functools.wraps(getattr(pipeline.stages, name))
        def forbidden(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} ran, but its output was complete in the store")
        monkeypatch.setattr(pipeline.stages, name, forbidden)


def read_object(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def object_sizes(client, bucket: str, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


def experiment_runs(tracking_uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def s3_run(prefect_api, moto_server, mlflow_tracking_uri, tiny_teacher_uri, tmp_path_factory) -> FlowRun:
    """The whole tiny chain, once for this module: store in S3, MLflow on the server, teacher from S3."""
    bucket = moto_server.create_bucket("runs")
    experiment = f"flows-{uuid.uuid4().hex[:8]}"
    overrides = flow_overrides(bucket, "e2e", moto_server.endpoint_url, mlflow_tracking_uri, experiment,
                               tmp_path_factory.mktemp("cache"), tiny_teacher_uri)
    started = time.monotonic()
    console = tmp_path_factory.mktemp("console") / "output.txt"
    with pytest.MonkeyPatch.context() as patch, capture_output(console):
        for name, value in CANARY_ENV.items():  # credentials in the environment, as on a real machine
            patch.setenv(name, value)
        result = convert(overrides=overrides)
    return FlowRun(bucket, "e2e", experiment, mlflow_tracking_uri, overrides, result, time.monotonic() - started,
                   console.read_text(errors="replace"))


@contextlib.contextmanager
def capture_output(path: Path) -> Iterator[None]:
    """Everything the flow prints or logs goes to `path` too: sys.stdout/stderr, file descriptors 1 and 2
    (subprocesses, C code) and every record of the root and `prefect` loggers; echoed afterwards."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w", buffering=1, errors="replace") as sink:
        handler = logging.StreamHandler(sink)
        handler.setLevel(logging.DEBUG)
        loggers = [logging.getLogger(), logging.getLogger("prefect")]
        for logger in loggers:
            logger.addHandler(handler)
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            sink.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
    sys.stdout.write(path.read_text(errors="replace")[-5000:])


def test_every_stage_runs_and_stores_a_committed_checkpoint(s3_run, moto_server, tiny_teacher_uri):
    assert s3_run.result["ran"] == list(STAGES)
    assert s3_run.result["skipped"] == []
    client = moto_server.client()
    evaluate_version = json.loads(read_object(client, s3_run.bucket, s3_run.key("evaluate", "manifest.json")))["version"]
    assert s3_run.result["results"] == f"s3://{s3_run.bucket}/runs/e2e/evaluate/{evaluate_version}/summary.json"
    manifests = {}
    for name, stage in STAGES.items():
        manifest = json.loads(read_object(client, s3_run.bucket, s3_run.key(name, "manifest.json")))
        manifests[name] = manifest
        stored = object_sizes(client, s3_run.bucket, f"runs/e2e/{name}/")
        assert {entry["path"] for entry in manifest["files"]} >= {"stage.json", "run_config.json"}
        for entry in manifest["files"]:
            assert stored[s3_run.key(name, entry["path"], manifest["version"])] == entry["size"]
        assert manifest["metadata"]["stage"] == stage
        assert manifest["config_digest"] == manifest["metadata"]["cache_key"]
    for name in ("teacher", "H-2", "H-3", "H-3-SFT"):
        assert {"config.json", "model.safetensors"} <= {entry["path"] for entry in manifests[name]["files"]}
    assert manifests["teacher"]["parent"]["uri"] == tiny_teacher_uri
    assert manifests["H-2"]["parent"]["name"] == "teacher"
    assert manifests["H-3"]["parent"] == {"name": "H-2", "uri": f"s3://{s3_run.bucket}/runs/e2e/H-2",
                                          "manifest_digest": manifest_digest(manifests["H-2"])}
    assert manifests["H-2"]["metadata"]["layer_pattern"].count("M") == 2
    summary = json.loads(read_object(client, s3_run.bucket, s3_run.key("evaluate", "summary.json", evaluate_version)))
    assert [record["checkpoint"] for record in summary] == EVALUATED


def test_mlflow_holds_parent_children_metrics_tags_and_artifacts(s3_run, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(s3_run.tracking_uri)
    runs = experiment_runs(s3_run.tracking_uri, s3_run.experiment)
    parents = [run for run in runs if run.data.tags.get("conversion_run") == "e2e"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == s3_run.result["mlflow_run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["schedule.counts"] == "[2, 3]"
    children = {run.info.run_name: run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    expected = {f"{stage}/{name}" for name, stage in STAGES.items()} | {f"evaluate/{name}" for name in EVALUATED}
    assert set(children) == expected
    assert {run.info.status for run in children.values()} == {"FINISHED"}

    converted = children["convert/H-2"]
    history = client.get_metric_history(converted.info.run_id, "train/loss")
    assert sorted(metric.step for metric in history) == [1, 2, 3, 4, 5, 6]
    assert converted.data.params["train.steps"] == "6"
    assert converted.data.tags["checkpoint.uri"] == f"s3://{s3_run.bucket}/runs/e2e/H-2"
    assert converted.data.tags["checkpoint.layer_pattern"].count("M") == 2
    assert converted.data.tags["checkpoint.mamba_layers"] == "2"
    loo_history = client.get_metric_history(children["loo/loo"].info.run_id, "loo/importance")
    assert sorted(metric.step for metric in loo_history) == [0, 1, 2, 3]  # one per layer

    evaluated = children["evaluate/H-3"]
    assert {"answer_accuracy", "nll", "kl_to_teacher", "tokens_per_s"} <= set(evaluated.data.metrics)
    assert evaluated.data.tags["checkpoint.uri"] == f"s3://{s3_run.bucket}/runs/e2e/H-3"
    assert evaluated.data.tags["checkpoint.mamba_layers"] == "3"

    # Checkpoints side by side: every evaluate run has the same params and metric names, with its lineage.
    evaluations = {name: children[f"evaluate/{name}"] for name in EVALUATED}
    for run in evaluations.values():
        assert set(run.data.params) == {"n_mamba", "layer_pattern", "parent", "converted_layers",
                                        "cumulative_train_tokens"}
        assert set(run.data.metrics) == set(evaluations["teacher"].data.metrics)
    params = {name: run.data.params for name, run in evaluations.items()}
    assert params["teacher"] == {"n_mamba": "0", "layer_pattern": "AAAA", "parent": "none",
                                 "converted_layers": "[]", "cumulative_train_tokens": "0"}
    assert params["H-3"]["parent"] == "H-2" and params["H-3-SFT"]["parent"] == "H-3"
    assert params["H-3"]["layer_pattern"].count("M") == 3
    assert params["H-3"]["layer_pattern"] == children["step/H-3"].data.tags["checkpoint.layer_pattern"]
    assert json.loads(params["H-2"]["converted_layers"]) == [
        i for i, kind in enumerate(params["H-2"]["layer_pattern"]) if kind == "M"]
    assert len(json.loads(params["H-3"]["converted_layers"])) == 1
    tokens = {name: int(params[name]["cumulative_train_tokens"]) for name in EVALUATED}
    assert 0 < tokens["H-2"] < tokens["H-3"] < tokens["H-3-SFT"], tokens  # each stage adds its own
    assert evaluations["H-3"].data.metrics["cumulative_train_tokens"] == tokens["H-3"]
    # Training curves under the same keys in every training stage's run, so the chart view overlays them.
    for name in ("convert/H-2", "step/H-3", "sft/H-3-SFT"):  # (this run's teacher is a given one: not trained)
        curves = set(children[name].data.metrics)
        assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= curves, (name, curves)
        assert not any(key.startswith(("H-", "mmr_layer")) for key in curves), curves
    assert "train/kl" in children["convert/H-2"].data.metrics and "train/kl" not in children["sft/H-3-SFT"].data.metrics
    # MMR trials: one run each, nested under the MMR stage's run, with the same curve keys.
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == children["mmr/mmr-H-2"].info.run_id]
    attention = [i for i, kind in enumerate(params["H-2"]["layer_pattern"]) if kind == "A"]
    assert sorted(run.info.run_name for run in trials) == [f"mmr/mmr-H-2/layer-{i}" for i in attention]
    assert all({"train/loss", "train/kl"} <= set(run.data.metrics) for run in trials)
    # The data each distillation and SFT run trained on, as an MLflow dataset input.
    for name, kind in (("convert/H-2", "distill-train"), ("step/H-3", "distill-train"), ("sft/H-3-SFT", "sft-train")):
        inputs = client.get_run(children[name].info.run_id).inputs.dataset_inputs
        assert [entry.dataset.name for entry in inputs] == [kind], name
        assert inputs[0].dataset.digest and "demo:reasoning" in inputs[0].dataset.source
        assert {tag.key: tag.value for tag in inputs[0].tags}["mlflow.data.context"] == "training"

    def artifacts(run) -> set[str]:
        return {item.path for item in client.list_artifacts(run.info.run_id)}

    assert artifacts(children["loo/loo"]) >= {"loo.json", "loo.png", "stage.json", "run_config.json"}
    assert artifacts(children["mmr/mmr-H-2"]) >= {"mmr.json", "mmr.png"}
    assert artifacts(children["evaluate/evaluate"]) >= {"summary.json", "frontier.png"}
    assert {"run_config.json", "frontier.png", "frontier_tokens.png"} <= artifacts(parent)  # the frontier on the parent
    summary = mlflow.artifacts.download_artifacts(run_id=children["evaluate/evaluate"].info.run_id,
                                                  artifact_path="summary.json", dst_path=str(tmp_path),
                                                  tracking_uri=s3_run.tracking_uri)
    assert [record["checkpoint"] for record in json.loads(Path(summary).read_text())] == EVALUATED


def test_secrets_never_reach_mlflow_prefect_or_logs(s3_run, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    # the session's dummy AWS credentials, the canaries set while the flow ran, a password in a data URL
    secrets = [SECRET, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], *CANARY_ENV.values()]

    def assert_clean(text: str, where: str) -> None:
        leaked = [secret for secret in secrets if secret in text]
        assert not leaked, f"{leaked} found in {where}"

    runs = experiment_runs(s3_run.tracking_uri, s3_run.experiment)
    client = MlflowClient(s3_run.tracking_uri)
    scanned = 0
    for run in runs:
        for key, value in [*run.data.params.items(), *run.data.tags.items()]:
            assert_clean(f"{key}={value}", f"MLflow run {run.info.run_name}")
        assert_clean(" ".join(run.data.metrics), f"metric names of {run.info.run_name}")
        pending = [info for info in client.list_artifacts(run.info.run_id)]
        while pending:  # every artifact, in every folder
            info = pending.pop()
            if info.is_dir:
                pending += client.list_artifacts(run.info.run_id, info.path)
                continue
            local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=info.path,
                                                        dst_path=str(tmp_path / "all" / run.info.run_id),
                                                        tracking_uri=s3_run.tracking_uri)
            assert_clean(Path(local).read_bytes().decode("utf-8", errors="replace"), f"artifact {info.path}")
            scanned += 1
    assert scanned >= len(STAGES)
    with get_client(sync_client=True) as prefect:  # Prefect's record: flow/task parameters and the logs
        flow_runs = prefect.read_flow_runs()
        assert flow_runs
        for flow_run in flow_runs:  # (a password typed into an override is a parameter the user gave
            # Prefect; credentials belong in the environment, e.g. data.generic=https://u:${oc.env:PW}@host/x)
            parameters = json.dumps(flow_run.parameters, default=str).replace(SECRET_URL, "<the user's override>")
            assert_clean(parameters, f"Prefect flow run {flow_run.name}")
        logs = prefect.read_logs()
        assert logs
        assert_clean("\n".join(log.message for log in logs), "Prefect logs")
    assert "results:" in s3_run.console  # the console output was captured
    assert_clean(s3_run.console, "the console output and logs")
    parent = next(run for run in runs if run.data.tags.get("conversion_run") == "e2e")
    assert parent.data.params["data.generic"] == "https://<redacted>@data.example.com/generic.jsonl"
    for run in runs:  # every logged config file: the run's whole config redacted, each stage's settings clean
        if run.info.run_name.startswith("evaluate/") and run.info.run_name != "evaluate/evaluate":
            continue  # per-checkpoint evaluation runs hold metrics and tags only
        if run.data.tags.get("mlflow.parentRunId") not in (None, parent.info.run_id):
            continue  # MMR trials, nested under their stage's run, hold training curves only
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="run_config.json",
                                                   dst_path=str(tmp_path / run.info.run_id),
                                                   tracking_uri=s3_run.tracking_uri)
        text = Path(path).read_text()
        assert not any(secret in text for secret in secrets), run.info.run_name
        if run.info.run_id == parent.info.run_id:
            assert "<redacted>" in text


def test_prefect_artifacts_show_the_tables_with_mlflow_links(s3_run):
    from prefect.artifacts import Artifact

    runs = {run.info.run_name: run for run in experiment_runs(s3_run.tracking_uri, s3_run.experiment)}
    loo = Artifact.get("e2e-loo")
    assert "Leave-one-out" in loo.data and "| 1 |" in loo.data and "| 4 |" in loo.data
    assert runs["loo/loo"].info.run_id in loo.data  # a link into the MLflow UI
    assert s3_run.tracking_uri in loo.data
    mmr = Artifact.get("e2e-mmr-h-2")
    assert "MMR scores" in mmr.data and runs["mmr/mmr-H-2"].info.run_id in mmr.data
    summary = Artifact.get("e2e-evaluate")
    for name in EVALUATED:
        assert f"| {name} |" in summary.data
        assert runs[f"evaluate/{name}"].info.run_id in summary.data
    assert runs["convert/H-2"].info.run_id in summary.data


def test_rerun_skips_every_stage_without_computing(s3_run, moto_server, monkeypatch):
    forbid_stages(monkeypatch)
    client = moto_server.client()
    manifests = {name: read_object(client, s3_run.bucket, s3_run.key(name, "manifest.json")) for name in STAGES}
    runs_before = len(experiment_runs(s3_run.tracking_uri, s3_run.experiment))
    started = time.monotonic()
    result = convert(overrides=s3_run.overrides)
    seconds = time.monotonic() - started
    assert result["ran"] == [] and result["skipped"] == list(STAGES)
    # Not computing is asserted above (every stage function forbidden); the time is a figure, not a limit.
    print(f"re-run of {len(STAGES)} complete stages: {seconds:.1f}s (first run: {s3_run.seconds:.1f}s)")
    assert result["mlflow_run_id"] == s3_run.result["mlflow_run_id"]  # the same parent run, re-attached
    assert len(experiment_runs(s3_run.tracking_uri, s3_run.experiment)) == runs_before  # no new child runs
    for name, raw in manifests.items():
        assert read_object(client, s3_run.bucket, s3_run.key(name, "manifest.json")) == raw


def test_changed_setting_recomputes_only_what_reads_it(s3_run, monkeypatch):
    """evaluate.* is read by the evaluation only: every other stage keeps its cache key (LOO has its own
    decoding budget, loo.max_new_tokens, so its ranking never goes stale when the evaluation's changes)."""
    forbid_stages(monkeypatch, [name for name in STAGE_FUNCTIONS if name != "run_evaluate"])
    result = convert(overrides=[*s3_run.overrides, "evaluate.max_new_tokens=50"], until="evaluate")
    assert result["ran"] == ["evaluate"]
    assert result["skipped"] == [name for name in STAGES if name != "evaluate"]


def test_recomputed_stage_with_the_same_content_leaves_later_stages_alone(s3_run, moto_server, monkeypatch):
    """loo.max_new_tokens enters LOO's key, so LOO runs again; under the nll metric its ranking comes out
    byte-identical, and the later keys, made of content digests, do not change: nothing else runs."""
    forbid_stages(monkeypatch, [name for name in STAGE_FUNCTIONS if name != "run_loo"])
    before = json.loads(read_object(moto_server.client(), s3_run.bucket, s3_run.key("loo", "manifest.json")))
    result = convert(overrides=[*s3_run.overrides, "loo.max_new_tokens=7"], until="convert")
    assert result["ran"] == ["loo"] and result["skipped"] == ["teacher", "H-2"]
    after = json.loads(read_object(moto_server.client(), s3_run.bucket, s3_run.key("loo", "manifest.json")))
    assert after["config_digest"] != before["config_digest"]
    assert [e for e in after["files"] if e["path"] == "loo.json"] == [e for e in before["files"] if e["path"] == "loo.json"]


def test_cut_off_upload_is_never_taken_as_complete(prefect_api, moto_server, mlflow_tracking_uri, tiny_teacher_uri,
                                                   tmp_path, monkeypatch):
    bucket = moto_server.create_bucket("cutoff")
    overrides = flow_overrides(bucket, "cutoff", moto_server.endpoint_url, mlflow_tracking_uri,
                               f"cutoff-{uuid.uuid4().hex[:8]}", tmp_path / "cache", tiny_teacher_uri)
    commit = S3Store._commit

    def connection_lost_before_commit(self, name, version, manifest):
        if name == "H-2":
            raise EndpointUnreachableError("connection lost while writing H-2/manifest.json (simulated)")
        return commit(self, name, version, manifest)

    monkeypatch.setattr(S3Store, "_commit", connection_lost_before_commit)
    with pytest.raises(EndpointUnreachableError):
        convert(overrides=overrides, until="convert")
    stored = object_sizes(moto_server.client(), bucket, "runs/cutoff/H-2/")
    assert any(key.endswith("/model.safetensors") for key in stored)  # the files were uploaded (a version)...
    assert "runs/cutoff/H-2/manifest.json" not in stored  # ...the commit was not
    store = open_store(f"s3://{bucket}/runs/cutoff", endpoint_url=moto_server.endpoint_url,
                       cache_dir=tmp_path / "inspect")
    assert not store.has_checkpoint("H-2") and store.has_checkpoint("loo")

    monkeypatch.setattr(S3Store, "_commit", commit)
    forbid_stages(monkeypatch, ["import_teacher", "run_loo"])
    convert_calls = []
    real_convert = pipeline.stages.run_convert

    @functools.wraps(real_convert)
    def counted(*args, **kwargs):
        convert_calls.append(1)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(pipeline.stages, "run_convert", counted)
    result = convert(overrides=overrides, until="convert")
    assert result["ran"] == ["H-2"] and result["skipped"] == ["teacher", "loo"]
    assert convert_calls == [1]
    assert store.has_checkpoint("H-2")
