"""MLflow tracking for a conversion run: one parent run, one child run per stage or evaluated checkpoint.

    tracker = Tracker(tracking_uri, experiment="hybrid-distill", run_name="qwen-h30")
    tracker.log_params(resolved_config)               # nested dicts become dotted keys
    with tracker.child("convert", checkpoint="H-25") as run:
        run.log_metrics({"train/loss": loss}, step=step)
        run.log_dict(loo_table, "loo.json")
        run.set_checkpoint_tags(ref.uri, layer_pattern=pattern, mamba_layers=25)
    tracker.finish()

The parent run is found again on restart by its ``conversion_run`` tag, so a resumed conversion keeps
logging into the same parent. Children are new runs (a failed attempt stays visible as FAILED).

Secrets never reach MLflow: params, tags, logged dicts and texts, dataset sources and text artifacts
pass through :mod:`pipeline.redaction`, which masks values whose key looks like a secret
(``AWS_SECRET_ACCESS_KEY``, ``hf_token``, ``password``, ``api_key``, ...), the userinfo of URIs
(``https://user:pass@host``, ``https://<token>@host``), query-string credentials and presigned URLs, tokens
of well-known shapes and the values of secret environment variables. Binary files given to
``log_artifact`` (plots) are uploaded as they are.

A parent run is re-attached only with the same params (a restart of the same run); a run name reused with
other settings gets a new parent run, since MLflow params cannot change.

The default tracking URI is ``sqlite:///<working dir>/mlflow.db`` (MLflow 3 refuses plain
``file:`` stores); ``MLFLOW_TRACKING_URI`` or the ``tracking_uri`` argument points at a server. Nothing here
talks to MLflow at import time, and mlflow is imported only when a :class:`Tracker` is created, so code
that logs through :class:`NullTracker` runs without mlflow installed. No torch either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.redaction import REDACTED, is_secret_key, redact, redact_text

logger = logging.getLogger(__name__)

_SUPPRESS_URL_PRINTING = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
PARAMS_DIGEST_TAG = "conversion_run.params_digest"  # on the parent run: which settings it was started with
CONVERSION_RUN_TAG = "conversion_run"  # on the parent run: the conversion run's name
STAGE_TAG = "stage"
CHECKPOINT_TAG = "checkpoint"
CHECKPOINT_URI_TAG = "checkpoint.uri"
LAYER_PATTERN_TAG = "checkpoint.layer_pattern"
MAMBA_LAYERS_TAG = "checkpoint.mamba_layers"
PARENT_RUN_ID_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests children under the parent
# MLflow 3's UI opens an experiment without this tag as a GenAI one (traces); ours are model training runs,
# shown as the runs table, its compare and chart views.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow's limits (mlflow.utils.validation); copied so that this module imports without mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_TRUNCATION_MARK = "...[truncated]"
TEXT_SUFFIXES = frozenset({".json", ".jsonl", ".yaml", ".yml", ".md", ".txt", ".csv", ".log", ".cfg", ".ini"})

_BAD_KEY_CHARACTERS = re.compile(r"[^\w./\- :]")


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ImportError(
            "pipeline.tracking.Tracker needs mlflow, which is not installed: pip install "
            "'hybrid-distill[orchestration]' (or mlflow), or log through NullTracker"
        ) from None
    return mlflow


def default_tracking_uri(project_dir: str | os.PathLike[str] | None = None) -> str:
    """``sqlite:///<project_dir>/mlflow.db``; project_dir defaults to the working directory."""
    return f"sqlite:///{(Path(project_dir) if project_dir is not None else Path.cwd()).resolve() / 'mlflow.db'}"


# ----------------------------------------------------------------------------------------------------
# Redaction, flattening, limits


def _redact_string(value: str) -> str:
    return redact_text(value)


def _as_text(value: Any) -> str:
    """Scalars as MLflow writes them (str), containers as JSON."""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(redact(value), sort_keys=True, default=str)
    return str(value)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"layers": 4}}`` -> ``{"model.layers": "4"}``; lists stay whole, as JSON."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    flat: dict[str, str] = {}
    for name, value in config.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, key))
        else:
            flat[key] = _as_text(value)
    return flat


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def _clean_key(key: str) -> str:
    """A key MLflow accepts: allowed characters only, at most MAX_KEY_LENGTH long (a hash keeps
    truncated keys distinct)."""
    key = _BAD_KEY_CHARACTERS.sub("_", str(key))
    if len(key) > MAX_KEY_LENGTH:
        key = key[: MAX_KEY_LENGTH - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return key


def _safe_items(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    """Redacted, stringified, truncated values under cleaned keys (redaction uses the original key)."""
    return {
        _clean_key(key): _truncate(REDACTED if is_secret_key(key) else _redact_string(_as_text(value)), limit)
        for key, value in values.items()
    }


def _layer_pattern_text(layer_pattern: str | Sequence[str]) -> str:
    return layer_pattern if isinstance(layer_pattern, str) else ",".join(str(layer) for layer in layer_pattern)


# ----------------------------------------------------------------------------------------------------
# Logging into one run


class RunLogger:
    """Logs into one MLflow run through an explicit client and run id (thread-safe; no global active run)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self._client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs a (nested) config as flat params. MLflow params cannot change: a key already logged with
        another value (a resumed run whose config changed) is skipped with a warning."""
        from mlflow.entities import Param

        values = _safe_items(flatten_params(params), MAX_PARAM_VALUE_LENGTH)
        existing = self._client.get_run(self.run_id).data.params
        changed = sorted(key for key, value in values.items() if key in existing and existing[key] != value)
        if changed:
            logger.warning(
                "run %s already has different values for params %s; keeping the old ones", self.run_id, changed
            )
        new = [Param(key, value) for key, value in values.items() if key not in existing]
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Logs scalar metrics (floats, numpy or one-element tensors) at ``step``."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [Metric(_clean_key(key), float(value), timestamp, int(step or 0)) for key, value in metrics.items()]
        for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=entries[start : start + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(key, value) for key, value in _safe_items(tags, MAX_TAG_VALUE_LENGTH).items()]
        for start in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=entries[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def set_checkpoint_tags(
        self, uri: str, *, layer_pattern: str | Sequence[str] | None = None, mamba_layers: int | None = None
    ) -> None:
        """Tags the checkpoint this run produced or evaluated: its URI, layer pattern and Mamba count."""
        tags: dict[str, Any] = {CHECKPOINT_URI_TAG: uri}
        if layer_pattern is not None:
            tags[LAYER_PATTERN_TAG] = _layer_pattern_text(layer_pattern)
        if mamba_layers is not None:
            tags[MAMBA_LAYERS_TAG] = int(mamba_layers)
        self.set_tags(tags)

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Uploads a file, or a folder's contents; text files (json, yaml, md, txt, csv, log) redacted."""
        local_path = Path(local_path)
        if local_path.is_dir():
            for path in sorted(item for item in local_path.rglob("*") if item.is_file()):
                relative = path.parent.relative_to(local_path).as_posix()
                folder = "/".join(part for part in (artifact_path, relative) if part and part != ".") or None
                self.log_artifact(path, folder)
        elif local_path.suffix.lower() in TEXT_SUFFIXES:
            text = local_path.read_text(errors="replace")
            name = f"{artifact_path.rstrip('/')}/{local_path.name}" if artifact_path else local_path.name
            self._client.log_text(self.run_id, redact_text(text), name)
        else:
            self._client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Logs a dict (a table, the resolved config) as JSON or YAML by the file's extension, redacted."""
        self._client.log_dict(self.run_id, redact(obj), artifact_file)

    def log_dataset(self, name: str, digest: str, source: str, *, context: str = "training",
                    rows: int | None = None, columns: Sequence[str] = ()) -> None:
        """Records a dataset the run read as an MLflow dataset input (the run page's "Datasets used",
        searchable across runs): name, content digest and source, with the row count and columns."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = _redact_string(str(source))
        dataset = Dataset(
            name=name, digest=str(digest)[:36], source_type="local" if "://" not in source else source.split(":", 1)[0],
            source=json.dumps({"uri": source}), schema=json.dumps({"columns": list(columns)}) if columns else None,
            profile=json.dumps({"num_rows": rows}) if rows is not None else None,
        )
        self._client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, _redact_string(text), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Logs a matplotlib (or plotly) figure as an image file."""
        self._client.log_figure(self.run_id, figure, artifact_file)


class ChildRun(RunLogger):
    """The run of one stage or evaluated checkpoint; ended by :meth:`Tracker.child`."""


class Tracker(RunLogger):
    """The parent MLflow run of one conversion run, and the factory of its child runs."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "hybrid-distill",
        run_name: str = "default",
        *,
        artifact_location: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """tracking_uri: a server (``http://host:5000``) or database URI; default ``MLFLOW_TRACKING_URI``,
        else :func:`default_tracking_uri`. artifact_location: used only when the experiment is created.
        params: the settings this conversion runs with: the parent run of this run name is re-attached only
        if it was started with the same ones (else a new parent run starts); None: any parent of the name.
        """
        mlflow = _import_mlflow()
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
        # MLflow prints a "View run at <tracking URI>/..." line per ended run, credentials included: the
        # flows print their own (redacted) link instead
        os.environ.setdefault(_SUPPRESS_URL_PRINTING, "true")
        if redact_text(self.tracking_uri) != self.tracking_uri:
            os.environ[_SUPPRESS_URL_PRINTING] = "true"
        self.experiment = experiment
        self.run_name = run_name
        self.params_digest = None if params is None else hashlib.sha256(
            json.dumps(_safe_items(flatten_params(params), MAX_PARAM_VALUE_LENGTH), sort_keys=True).encode()
        ).hexdigest()
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_id = self._experiment_id(client, experiment, artifact_location)
        super().__init__(client, self._parent_run_id(client))

    @staticmethod
    def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException:  # created meanwhile by another process
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _parent_run_id(self, client: Any) -> str:
        """The oldest non-deleted parent run tagged with this run name, reopened; else a new one."""
        from mlflow.entities import ViewType

        quote = "'" if "'" not in self.run_name else '"'
        if quote in self.run_name:
            raise ValueError(f"run_name {self.run_name!r} may not contain both kinds of quotes")
        runs = client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{CONVERSION_RUN_TAG} = {quote}{self.run_name}{quote}",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
            max_results=50,
        )
        parents = [run for run in runs if PARENT_RUN_ID_TAG not in run.data.tags]
        if self.params_digest is not None:
            others = [run for run in parents if run.data.tags.get(PARAMS_DIGEST_TAG) != self.params_digest]
            parents = [run for run in parents if run.data.tags.get(PARAMS_DIGEST_TAG) == self.params_digest]
            if others and not parents:
                logger.warning("run name %s was used with other settings (MLflow run %s): starting a new parent run",
                               self.run_name, others[-1].info.run_id)
        if parents:
            run = parents[-1] if self.params_digest is not None else parents[0]
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            logger.info("re-attached to MLflow run %s (%s)", run.info.run_id, self.run_name)
            return run.info.run_id
        tags = {CONVERSION_RUN_TAG: self.run_name}
        if self.params_digest is not None:
            tags[PARAMS_DIGEST_TAG] = self.params_digest
        run = client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
        return run.info.run_id

    @contextlib.contextmanager
    def child(
        self, stage: str, checkpoint: str | None = None, *, tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[ChildRun]:
        """A child run for a stage, or for one checkpoint within a stage; FINISHED on normal exit,
        FAILED on an exception (KILLED on Ctrl-C), which propagates. parent_run_id: nest it under
        another child (an MMR trial under its stage's run) instead of the conversion's parent run."""
        run_tags = {PARENT_RUN_ID_TAG: parent_run_id or self.run_id, STAGE_TAG: stage}
        if checkpoint is not None:
            run_tags[CHECKPOINT_TAG] = checkpoint
        run_tags.update(_safe_items(tags or {}, MAX_TAG_VALUE_LENGTH))
        name = stage if checkpoint is None else f"{stage}/{checkpoint}"
        run = self._client.create_run(self.experiment_id, run_name=name, tags=run_tags)
        child = ChildRun(self._client, run.info.run_id)
        try:
            yield child
        except KeyboardInterrupt:
            self._client.set_terminated(child.run_id, status="KILLED")
            raise
        except BaseException:
            self._client.set_terminated(child.run_id, status="FAILED")
            raise
        self._client.set_terminated(child.run_id, status="FINISHED")

    def end_abandoned(self, stage: str, checkpoint: str, status: str = "KILLED") -> int:
        """Ends the child runs of this stage and checkpoint still RUNNING: left by an attempt that was
        killed before it could end them (a restarted run calls this before its own attempt), with the
        trials nested under them (`<checkpoint>/<trial>`). Returns how many were ended."""
        quote = "'" if "'" not in checkpoint else '"'
        runs = self._client.search_runs(
            [self.experiment_id],
            filter_string=(f"tags.{STAGE_TAG} = '{stage}' and tags.{CHECKPOINT_TAG} LIKE {quote}{checkpoint}%{quote} "
                           "and attributes.status = 'RUNNING'"),
            max_results=1000,
        )
        stale = [run for run in runs if run.data.tags.get(CHECKPOINT_TAG) == checkpoint
                 and run.data.tags.get(PARENT_RUN_ID_TAG) == self.run_id]
        parents = {run.info.run_id for run in stale}
        stale += [run for run in runs if run.data.tags.get(CHECKPOINT_TAG, "").startswith(f"{checkpoint}/")
                  and run.data.tags.get(PARENT_RUN_ID_TAG) in parents]
        for run in stale:
            self._client.set_terminated(run.info.run_id, status=status)
        return len(stale)

    def finish(self, status: str = "FINISHED") -> None:
        """Ends the parent run (a later Tracker with the same run name reopens it)."""
        self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.finish("FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED")


# ----------------------------------------------------------------------------------------------------
# The same interface, logging nothing


class NullRun:
    """Stands in for ChildRun where nothing is tracked."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def set_checkpoint_tags(
        self, uri: str, *, layer_pattern: str | Sequence[str] | None = None, mamba_layers: int | None = None
    ) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, *, context: str = "training",
                    rows: int | None = None, columns: Sequence[str] = ()) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass


class NullTracker(NullRun):
    """Stands in for Tracker where nothing is tracked (no mlflow needed)."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "hybrid-distill",
        run_name: str = "default",
        *,
        artifact_location: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name

    @contextlib.contextmanager
    def child(
        self, stage: str, checkpoint: str | None = None, *, tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[NullRun]:
        yield NullRun()

    def end_abandoned(self, stage: str, checkpoint: str, status: str = "KILLED") -> int:
        return 0

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        pass
