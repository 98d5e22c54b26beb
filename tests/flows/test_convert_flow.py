"""The convert flow end to end against a real S3 endpoint over HTTP (moto server) and a real `mlflow
server`, read back through boto3, MlflowClient and the Prefect API; then re-runs that skip, and a
checkpoint upload cut off before its manifest."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import pipeline.stages
from flows.convert import convert
from pipeline.store import EndpointUnreachableError, S3Store, manifest_digest, open_store

pytestmark = pytest.mark.slow

SECRET = "hunter2-not-for-mlflow"
SECRET_URL = f"https://reader:{SECRET}@data.example.com/generic.jsonl"  # never read by the tiny run
# output name -> stage, in the chain's order, for schedule.counts=[2, 3] (the tiny preset)
STAGES = {"teacher": "teacher", "loo": "loo", "H-2": "convert", "mmr-H-2": "mmr", "H-3": "step",
          "H-3-SFT": "sft", "evaluate": "evaluate"}
EVALUATED = ["teacher", "H-2", "H-3", "H-3-SFT"]
STAGE_FUNCTIONS = ("run_teacher", "run_loo", "run_convert", "run_mmr", "run_step", "run_sft", "run_evaluate")


@dataclass
class FlowRun:
    bucket: str
    run_name: str
    experiment: str
    tracking_uri: str
    overrides: list[str]
    result: dict
    seconds: float

    def key(self, name: str, filename: str) -> str:
        return f"runs/{self.run_name}/{name}/{filename}"


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
    ]


def forbid_stages(monkeypatch, names=STAGE_FUNCTIONS) -> None:
    """Any call of these stage functions fails the test (run_chain looks them up at call time)."""
    for name in names:
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
    result = convert(overrides=overrides)
    return FlowRun(bucket, "e2e", experiment, mlflow_tracking_uri, overrides, result, time.monotonic() - started)


def test_every_stage_runs_and_stores_a_committed_checkpoint(s3_run, moto_server, tiny_teacher_uri):
    assert s3_run.result["ran"] == list(STAGES)
    assert s3_run.result["skipped"] == []
    assert s3_run.result["results"] == f"s3://{s3_run.bucket}/runs/e2e/evaluate/summary.json"
    client = moto_server.client()
    manifests = {}
    for name, stage in STAGES.items():
        manifest = json.loads(read_object(client, s3_run.bucket, s3_run.key(name, "manifest.json")))
        manifests[name] = manifest
        stored = object_sizes(client, s3_run.bucket, f"runs/e2e/{name}/")
        assert {entry["path"] for entry in manifest["files"]} >= {"stage.json", "run_config.json"}
        for entry in manifest["files"]:
            assert stored[s3_run.key(name, entry["path"])] == entry["size"]
        assert manifest["metadata"]["stage"] == stage
        assert manifest["config_digest"] == manifest["metadata"]["cache_key"]
    for name in ("teacher", "H-2", "H-3", "H-3-SFT"):
        assert {"config.json", "model.safetensors"} <= {entry["path"] for entry in manifests[name]["files"]}
    assert manifests["teacher"]["parent"]["uri"] == tiny_teacher_uri
    assert manifests["H-2"]["parent"]["name"] == "teacher"
    assert manifests["H-3"]["parent"] == {"name": "H-2", "uri": f"s3://{s3_run.bucket}/runs/e2e/H-2",
                                          "manifest_digest": manifest_digest(manifests["H-2"])}
    assert manifests["H-2"]["metadata"]["layer_pattern"].count("M") == 2
    summary = json.loads(read_object(client, s3_run.bucket, s3_run.key("evaluate", "summary.json")))
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


def test_secrets_never_reach_mlflow(s3_run, tmp_path):
    import mlflow

    secrets = [SECRET, os.environ["AWS_SECRET_ACCESS_KEY"]]  # the session's dummy AWS credentials
    runs = experiment_runs(s3_run.tracking_uri, s3_run.experiment)
    for run in runs:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert not any(secret in value for secret in secrets), (run.info.run_name, value)
    parent = next(run for run in runs if run.data.tags.get("conversion_run") == "e2e")
    assert parent.data.params["data.generic"] == "https://reader:<redacted>@data.example.com/generic.jsonl"
    for run in runs:  # every logged config file, redacted
        if run.info.run_name.startswith("evaluate/") and run.info.run_name != "evaluate/evaluate":
            continue  # per-checkpoint evaluation runs hold metrics and tags only
        if run.data.tags.get("mlflow.parentRunId") not in (None, parent.info.run_id):
            continue  # MMR trials, nested under their stage's run, hold training curves only
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="run_config.json",
                                                   dst_path=str(tmp_path / run.info.run_id),
                                                   tracking_uri=s3_run.tracking_uri)
        text = Path(path).read_text()
        assert "<redacted>" in text and not any(secret in text for secret in secrets), run.info.run_name


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
    assert seconds < 30, f"re-run took {seconds:.1f}s (first run: {s3_run.seconds:.1f}s)"
    assert result["mlflow_run_id"] == s3_run.result["mlflow_run_id"]  # the same parent run, re-attached
    assert len(experiment_runs(s3_run.tracking_uri, s3_run.experiment)) == runs_before  # no new child runs
    for name, raw in manifests.items():
        assert read_object(client, s3_run.bucket, s3_run.key(name, "manifest.json")) == raw


def test_changed_setting_recomputes_only_what_reads_it(s3_run, monkeypatch):
    """evaluate.* is read by the evaluation only: every other stage keeps its cache key."""
    forbid_stages(monkeypatch, [name for name in STAGE_FUNCTIONS if name != "run_evaluate"])
    result = convert(overrides=[*s3_run.overrides, "evaluate.max_new_tokens=6"], until="evaluate")
    assert result["ran"] == ["evaluate"]
    assert result["skipped"] == [name for name in STAGES if name != "evaluate"]


def test_cut_off_upload_is_never_taken_as_complete(prefect_api, moto_server, mlflow_tracking_uri, tiny_teacher_uri,
                                                   tmp_path, monkeypatch):
    bucket = moto_server.create_bucket("cutoff")
    overrides = flow_overrides(bucket, "cutoff", moto_server.endpoint_url, mlflow_tracking_uri,
                               f"cutoff-{uuid.uuid4().hex[:8]}", tmp_path / "cache", tiny_teacher_uri)
    commit = S3Store._write_manifest

    def connection_lost_before_commit(self, location, manifest):
        if location == "H-2":
            raise EndpointUnreachableError("connection lost while writing H-2/manifest.json (simulated)")
        return commit(self, location, manifest)

    monkeypatch.setattr(S3Store, "_write_manifest", connection_lost_before_commit)
    with pytest.raises(EndpointUnreachableError):
        convert(overrides=overrides, until="convert")
    stored = object_sizes(moto_server.client(), bucket, "runs/cutoff/H-2/")
    assert "runs/cutoff/H-2/model.safetensors" in stored  # the files were uploaded...
    assert "runs/cutoff/H-2/manifest.json" not in stored  # ...the commit was not
    store = open_store(f"s3://{bucket}/runs/cutoff", endpoint_url=moto_server.endpoint_url,
                       cache_dir=tmp_path / "inspect")
    assert not store.has_checkpoint("H-2") and store.has_checkpoint("loo")

    monkeypatch.setattr(S3Store, "_write_manifest", commit)
    forbid_stages(monkeypatch, ["run_teacher", "run_loo"])
    convert_calls = []
    real_convert = pipeline.stages.run_convert

    def counted(*args, **kwargs):
        convert_calls.append(1)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(pipeline.stages, "run_convert", counted)
    result = convert(overrides=overrides, until="convert")
    assert result["ran"] == ["H-2"] and result["skipped"] == ["teacher", "loo"]
    assert convert_calls == [1]
    assert store.has_checkpoint("H-2")
