"""pipeline.tracking against a real MLflow server over HTTP (and the default SQLite store)."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import pytest

from pipeline.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    REDACTED,
    ChildRun,
    NullRun,
    NullTracker,
    Tracker,
    default_tracking_uri,
    flatten_params,
    is_secret_key,
    redact,
)

mlflow = pytest.importorskip("mlflow")


def client_for(uri: str):
    return mlflow.MlflowClient(tracking_uri=uri)


def runs_by_name(client, experiment_name: str) -> dict:
    experiment = client.get_experiment_by_name(experiment_name)
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


# ----------------------------------------------------------------------------------------------------
# pure helpers


def test_flatten_params_and_secret_keys():
    config = {
        "model": {"layers": 4, "pattern": ["attention", "mamba"], "mixer": {"d_state": 16}},
        "lr": 1e-3,
        "empty": {},
    }
    assert flatten_params(config) == {
        "model.layers": "4",
        "model.pattern": '["attention", "mamba"]',
        "model.mixer.d_state": "16",
        "lr": "0.001",
        "empty": "{}",
    }
    secrets = ["AWS_SECRET_ACCESS_KEY", "aws_access_key_id", "aws_session_token", "hf_token", "hfToken", "apiKey",
               "db.password", "store.credentials.profile", "key", "auth"]  # fmt: skip
    harmless = ["num_key_value_heads", "tokenizer", "max_new_tokens", "pad_token_id", "author", "monkey",
                "checkpoint.uri"]  # fmt: skip
    assert [key for key in secrets if not is_secret_key(key)] == []
    assert [key for key in harmless if is_secret_key(key)] == []
    assert redact({"url": "https://bob:hunter2@host/x", "nested": [{"password": "pw"}]}) == {
        "url": f"https://{REDACTED}@host/x",  # the whole userinfo: a user name is often a token
        "nested": [{"password": REDACTED}],
    }


def test_null_tracker_has_the_tracker_interface():
    def public_signatures(cls, constructor=True):
        return {  # parameters and defaults; return annotations name each class's own types
            name: inspect.signature(member).replace(return_annotation=inspect.Signature.empty)
            for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") or name in ("__enter__", "__exit__") or (constructor and name == "__init__")
        }

    assert public_signatures(NullTracker) == public_signatures(Tracker)
    # runs are made by child(), so only their methods must match
    assert public_signatures(NullRun, constructor=False) == public_signatures(ChildRun, constructor=False)
    with NullTracker(run_name="r") as tracker:
        tracker.log_params({"a": {"b": 1}})
        with tracker.child("convert", checkpoint="H-2") as run:
            run.log_metrics({"loss": 1.0}, step=3)
            run.set_checkpoint_tags("s3://b/p/H-2", layer_pattern=["attention"], mamba_layers=0)
            run.log_dict({"a": 1}, "a.json")


# ----------------------------------------------------------------------------------------------------
# against the server


def test_parent_and_child_runs_with_metrics_and_artifacts(mlflow_tracking_uri, mlflow_experiment, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracker = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-1")
    tracker.log_params(
        {"model": {"layers": 4, "pattern": ["attention", "mamba"]}, "train": {"lr": 1e-3}, "notes": "x" * 7000}
    )
    tracker.set_tags({"schedule": "2,3"})
    with tracker.child("convert", checkpoint="H-2") as run:
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1), "kl": 0.1 * step}, step=step)
        run.log_dict({"layer": [0, 1, 2, 3], "importance": [0.4, 0.1, 0.3, 0.2]}, "loo.json")
        figure, axes = plt.subplots()
        axes.bar([0, 1, 2, 3], [0.4, 0.1, 0.3, 0.2])
        run.log_figure(figure, "plots/loo.png")
        plt.close(figure)
        summary = tmp_path / "summary.txt"
        summary.write_text("accuracy 0.5\n")
        run.log_artifact(summary)
        pattern = ["attention", "mamba", "attention", "mamba"]
        run.set_checkpoint_tags("s3://bucket/run/H-2", layer_pattern=pattern, mamba_layers=2)
    with tracker.child("evaluate", checkpoint="H-2") as evaluation:
        evaluation.log_metrics({"accuracy": 0.5})
    tracker.finish()

    client = client_for(mlflow_tracking_uri)  # a fresh client: everything is read back from the server
    runs = runs_by_name(client, mlflow_experiment)
    assert set(runs) == {"conversion-1", "convert/H-2", "evaluate/H-2"}
    parent, child = runs["conversion-1"], runs["convert/H-2"]

    assert parent.info.status == "FINISHED" and parent.data.tags["conversion_run"] == "conversion-1"
    assert parent.data.tags["schedule"] == "2,3"
    params = parent.data.params
    assert params["model.layers"] == "4" and params["model.pattern"] == '["attention", "mamba"]'
    assert params["train.lr"] == "0.001"
    assert len(params["notes"]) == MAX_PARAM_VALUE_LENGTH and params["notes"].endswith("[truncated]")

    for run in (child, runs["evaluate/H-2"]):
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
    assert child.data.tags["stage"] == "convert" and child.data.tags["checkpoint"] == "H-2"
    assert child.data.tags["checkpoint.uri"] == "s3://bucket/run/H-2"
    assert child.data.tags["checkpoint.layer_pattern"] == "attention,mamba,attention,mamba"
    assert child.data.tags["checkpoint.mamba_layers"] == "2"

    history = client.get_metric_history(child.info.run_id, "loss")
    assert [(metric.step, metric.value) for metric in sorted(history, key=lambda m: m.step)] == [
        (step, 1.0 / (step + 1)) for step in range(5)
    ]
    assert [metric.step for metric in client.get_metric_history(runs["evaluate/H-2"].info.run_id, "accuracy")] == [0]

    listed = {item.path for item in client.list_artifacts(child.info.run_id)}
    assert listed == {"loo.json", "plots", "summary.txt"}
    downloaded = Path(client.download_artifacts(child.info.run_id, "", str(tmp_path / "download")))
    loo = json.loads((downloaded / "loo.json").read_text())
    assert loo == {"layer": [0, 1, 2, 3], "importance": [0.4, 0.1, 0.3, 0.2]}
    assert (downloaded / "plots" / "loo.png").read_bytes().startswith(b"\x89PNG")
    assert (downloaded / "summary.txt").read_text() == "accuracy 0.5\n"


def test_restart_reattaches_to_the_parent_run(mlflow_tracking_uri, mlflow_experiment, caplog):
    first = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-r")
    first.log_params({"a": 1})
    with first.child("teacher"):
        pass
    first.finish("FAILED")  # the process died

    second = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-r")
    assert second.run_id == first.run_id, "a restart must log into the same parent run"
    client = client_for(mlflow_tracking_uri)
    assert client.get_run(second.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        second.log_params({"a": 2, "b": 3})  # 'a' cannot change in MLflow: kept, with a warning
    assert client.get_run(second.run_id).data.params == {"a": "1", "b": "3"}
    assert "different values for params ['a']" in caplog.text

    other = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-other")
    assert other.run_id != first.run_id

    client.delete_run(first.run_id)  # a deleted parent is not revived: a new one is started
    third = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-r")
    assert third.run_id not in (first.run_id, other.run_id)


def test_a_run_name_reused_with_other_settings_gets_a_new_parent_run(mlflow_tracking_uri, mlflow_experiment):
    """The review's case: a reused run_name kept the first run's params, and the changed values only warned."""
    settings = {"train": {"lr": 0.001}, "run_name": "conversion-p"}
    first = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-p", params=settings)
    first.log_params(settings)
    first.finish("FAILED")
    restarted = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-p", params=settings)
    assert restarted.run_id == first.run_id  # the same run, restarted
    changed = {"train": {"lr": 0.01}, "run_name": "conversion-p"}
    other = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-p", params=changed)
    other.log_params(changed)
    assert other.run_id != first.run_id
    client = client_for(mlflow_tracking_uri)
    assert client.get_run(other.run_id).data.params["train.lr"] == "0.01"
    assert client.get_run(first.run_id).data.params["train.lr"] == "0.001"
    assert Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-p", params=changed).run_id == other.run_id


def test_failed_stage_marks_its_child_run_failed(mlflow_tracking_uri, mlflow_experiment):
    tracker = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-f")
    with pytest.raises(RuntimeError, match="diverged"):
        with tracker.child("mmr", checkpoint="H-3") as run:
            run.log_metrics({"loss": float("nan")}, step=1)
            raise RuntimeError("diverged")
    runs = runs_by_name(client_for(mlflow_tracking_uri), mlflow_experiment)
    assert runs["mmr/H-3"].info.status == "FAILED"
    assert runs["conversion-f"].info.status == "RUNNING"


SECRETS = {
    "aws": "AKIAverysecret0001",
    "aws_id": "AKIAkeyid0002",
    "hf": "hf_secrettoken0003",
    "db": "dbpassword0004",
    "url": "urlpassword0005",
    "api": "apikeyvalue0006",
}


def test_secrets_never_reach_mlflow(mlflow_server, mlflow_experiment, tmp_path):
    config = {
        "store": {
            "uri": "s3://bucket/run",
            "AWS_SECRET_ACCESS_KEY": SECRETS["aws"],
            "aws_access_key_id": SECRETS["aws_id"],
        },
        "hf_token": SECRETS["hf"],
        "database": {"password": SECRETS["db"]},
        "tracking": {"uri": f"https://alice:{SECRETS['url']}@mlflow.example.org"},
        "model": {"num_key_value_heads": 2, "pattern": [{"apiKey": SECRETS["api"]}]},
    }
    tracker = Tracker(mlflow_server.tracking_uri, mlflow_experiment, "conversion-s")
    tracker.log_params(config)
    tracker.set_tags(
        {"AWS_SECRET_ACCESS_KEY": SECRETS["aws"], "endpoint": f"https://alice:{SECRETS['url']}@minio:9000"}
    )
    with tracker.child("convert", checkpoint="H-2", tags={"hf_token": SECRETS["hf"]}) as run:
        run.log_dict(config, "config.json")
        run.log_dict(config, "config.yaml")
        run.log_text(f"tracking at https://alice:{SECRETS['url']}@mlflow.example.org", "notes.txt")
        run.log_params(config)

    client = client_for(mlflow_server.tracking_uri)
    runs = runs_by_name(client, mlflow_experiment)
    parent, child = runs["conversion-s"], runs["convert/H-2"]
    params = parent.data.params
    assert params["store.AWS_SECRET_ACCESS_KEY"] == REDACTED and params["store.aws_access_key_id"] == REDACTED
    assert params["hf_token"] == REDACTED and params["database.password"] == REDACTED
    assert params["tracking.uri"] == f"https://{REDACTED}@mlflow.example.org"
    assert params["model.num_key_value_heads"] == "2" and params["store.uri"] == "s3://bucket/run"
    assert parent.data.tags["AWS_SECRET_ACCESS_KEY"] == REDACTED and child.data.tags["hf_token"] == REDACTED

    downloaded = Path(client.download_artifacts(child.info.run_id, "", str(tmp_path / "download")))
    logged_config = json.loads((downloaded / "config.json").read_text())
    assert logged_config["store"]["AWS_SECRET_ACCESS_KEY"] == REDACTED
    assert logged_config["model"]["num_key_value_heads"] == 2

    # nothing anywhere the server keeps (its database, its artifact folder) or returns holds a secret
    everything = [json.dumps([run.data.params, run.data.tags]) for run in (parent, child)]
    everything += [path.read_text(errors="replace") for path in downloaded.rglob("*") if path.is_file()]
    # the server's folder: its database (+ journal), artifacts and log
    server_root = Path(mlflow_server.backend_store_uri.removeprefix("sqlite:///")).parent
    everything += [path.read_bytes().decode("latin-1") for path in server_root.rglob("*") if path.is_file()]
    leaked = {name for name, secret in SECRETS.items() for text in everything if secret in text}
    assert not leaked, f"secrets reached MLflow: {sorted(leaked)}"


def test_default_tracking_uri_is_a_local_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(experiment="local", run_name="conversion-l")
    assert tracker.tracking_uri == default_tracking_uri()
    with tracker.child("teacher") as run:
        run.log_metrics({"loss": 2.5}, step=7)
    client = client_for(default_tracking_uri())
    child = runs_by_name(client, "local")["teacher"]
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss")] == [(7, 2.5)]
    assert (tmp_path / "mlflow.db").is_file()


def test_restart_ends_the_runs_a_killed_attempt_left_running(mlflow_tracking_uri, mlflow_experiment):
    first = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-k")
    client = client_for(mlflow_tracking_uri)

    def killed_attempt(tracker, checkpoint):
        """A child run as a SIGKILLed attempt leaves it: created by child(), never ended."""
        return client.create_run(tracker.experiment_id, run_name=f"convert/{checkpoint}", tags={
            "mlflow.parentRunId": tracker.run_id, "stage": "convert", "checkpoint": checkpoint}).info.run_id

    abandoned = killed_attempt(first, "H-4")
    trial = client.create_run(first.experiment_id, run_name="convert/H-4/layer-1", tags={  # nested in it
        "mlflow.parentRunId": abandoned, "stage": "convert", "checkpoint": "H-4/layer-1"}).info.run_id
    with first.child("convert", checkpoint="H-5") as finished:
        pass
    other = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-k-other")
    foreign = killed_attempt(other, "H-4")  # another conversion run's: left alone

    restarted = Tracker(mlflow_tracking_uri, mlflow_experiment, "conversion-k")
    assert restarted.end_abandoned("convert", "H-4") == 2
    assert client.get_run(abandoned).info.status == client.get_run(trial).info.status == "KILLED"
    assert client.get_run(finished.run_id).info.status == "FINISHED"
    assert client.get_run(foreign).info.status == "RUNNING"
    assert restarted.end_abandoned("convert", "H-4") == 0
    assert NullTracker().end_abandoned("convert", "H-4") == 0


def test_experiments_open_as_model_training_and_trials_nest_under_their_stage(mlflow_tracking_uri, mlflow_experiment):
    """MLflow 3's UI shows an experiment without `mlflow.experimentKind` as a GenAI one (traces, no runs
    table); a run nested under a child (an MMR trial) names that child as its parent."""
    client = client_for(mlflow_tracking_uri)
    existing = client.create_experiment(f"{mlflow_experiment}-old")  # made before the tag existed
    Tracker(mlflow_tracking_uri, f"{mlflow_experiment}-old", "r")
    assert client.get_experiment(existing).tags["mlflow.experimentKind"] == "custom_model_development"
    tracker = Tracker(mlflow_tracking_uri, mlflow_experiment, "r")
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    with tracker.child("mmr", checkpoint="mmr-H-2") as stage:
        with tracker.child("mmr", checkpoint="mmr-H-2/layer-1", parent_run_id=stage.run_id) as trial:
            trial.log_metrics({"train/loss": 0.5}, step=1)
        stage.log_dataset("distill-train", "abc123", "demo:reasoning?seed=0", rows=10, columns=["messages"])
    runs = runs_by_name(client, mlflow_experiment)
    assert runs["mmr/mmr-H-2/layer-1"].data.tags["mlflow.parentRunId"] == stage.run_id
    assert runs["mmr/mmr-H-2"].data.tags["mlflow.parentRunId"] == tracker.run_id
    [entry] = client.get_run(stage.run_id).inputs.dataset_inputs
    assert (entry.dataset.name, entry.dataset.digest) == ("distill-train", "abc123")
    assert json.loads(entry.dataset.profile) == {"num_rows": 10}
