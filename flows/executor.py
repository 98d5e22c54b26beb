"""The pipeline's one executor (`pipeline.executor.Executor`), run as Prefect tasks with MLflow runs.

Keys, skipping, resuming and committing are the pipeline's; this subclass adds, per call:
- a Prefect task (named after the output; `Cached` when the store already holds it under its key),
- an MLflow child run around each computation with the stage's settings as params, its metrics, files
  and checkpoint tags (and, before it starts, the runs of earlier attempts that were killed and left
  RUNNING are ended as KILLED),
- Prefect markdown artifacts with the LOO ranking, MMR scores and final summary.
What a stage publishes beyond its MLflow run is its entry in `flows.publish.PUBLISHERS`.

Prefect's own result cache is not used: the store is the record of what is complete, shared by every
machine that points at it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.console import progress
from flows.publish import PUBLISHERS, artifact_key, log_output_files, mlflow_run_link
from pipeline.config import to_plain
from pipeline.executor import Executor, Output, StageCall
from pipeline.redaction import redact_text, redacted_exception
from pipeline.reporting import ConsoleReporter
from pipeline.stages.common import read_meta
from pipeline.store import Store

CACHE_KEY_TAG = "stage.cache_digest"  # ("…_key" would be redacted as a secret-looking name)


class StageReporter:
    """The stages' Reporter: metrics into the stage's MLflow run, progress to the console and Prefect;
    a trial (an MMR trial) gets a run nested under the stage's, named `<stage>/<name>/<trial>`."""

    def __init__(self, run: Any, tracker: Any = None, stage: str = "", name: str = "") -> None:
        self.run = run
        self.tracker, self.stage, self.name = tracker, stage, name
        self.artifacts: list[Path] = []

    @contextlib.contextmanager
    def trial(self, name: str) -> Iterator[StageReporter]:
        with self.tracker.child(self.stage, checkpoint=f"{self.name}/{name}", parent_run_id=self.run.run_id) as run:
            yield StageReporter(run, self.tracker, self.stage, f"{self.name}/{name}")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log_metrics(metrics, step=step)

    def log_artifact(self, path: Any) -> None:
        self.artifacts.append(Path(path))  # logged with the stage's other files once it has finished

    def progress(self, message: str) -> None:
        progress(message)


class PrefectLogReporter(ConsoleReporter):
    """`ConsoleReporter` whose lines go to the Prefect run's log and the console once (`flows.console.progress`);
    metrics and files dropped. The executor's own reporter: each computed stage gets a `StageReporter`."""

    def progress(self, message: str) -> None:
        progress(message)


@task(cache_policy=NO_CACHE, persist_result=False)
def run_stage(executor: StoreExecutor, call: StageCall, key: str) -> Any:
    """One stage: skipped if the store has it under this key, else computed and stored. A failure's message
    reaches Prefect's records redacted."""
    try:
        found, computed = executor.find_or_compute(call, key)
    except Exception as error:
        twin = redacted_exception(error)
        if twin is error:
            raise
        raise twin from None
    if computed:
        return found
    progress(f"[{call.name}] complete in the store, skipped ({found.uri})")
    return Completed(data=found, name="Cached", message=f"found {found.uri} (cache key {key[:12]})")


class StoreExecutor(Executor):
    """`pipeline.executor.Executor` with a Prefect task per call and an MLflow child run per computation.

    tracker: pipeline.tracking.Tracker or NullTracker (the parent run).
    first_count: Mamba layers of the first conversion (marked in the LOO table).
    """

    def __init__(self, store: Store, tracker: Any, work_root: Path, run_name: str, *,
                 first_count: int | None = None) -> None:
        super().__init__(store, work_root, PrefectLogReporter())
        self.tracker = tracker
        self.run_name = run_name
        self.first_count = first_count
        self.evaluation_runs: dict[str, str | None] = {}

    def dispatch(self, call: StageCall, key: str) -> Output:
        stage_task = run_stage.with_options(name=call.name, task_run_name=call.name, tags=[call.stage])
        output: Output = stage_task(self, call, key, return_state=True).result()
        self.publish(call, output)
        return output

    @contextlib.contextmanager
    def attempt(self, call: StageCall, key: str) -> Iterator[tuple[StageReporter, str | None]]:
        ended = self.tracker.end_abandoned(call.stage, call.name)
        if ended:
            progress(f"  ended {ended} MLflow run(s) of {call.name} left RUNNING by a killed attempt (KILLED)")
        with self.tracker.child(call.stage, checkpoint=call.name, tags={CACHE_KEY_TAG: key}) as run:
            run.log_params(to_plain(call.settings))
            yield StageReporter(run, self.tracker, call.stage, call.name), run.run_id

    def committed(self, call: StageCall, output: Output, out_dir: Path, reporter: StageReporter) -> None:
        run = reporter.run
        data = read_meta(out_dir).get("data")
        if isinstance(data, dict):  # what it trained on: an MLflow dataset input
            run.log_dataset(data["name"], data["digest"], data["source"], rows=data.get("rows"),
                            columns=data.get("columns", ()))
        if call.is_checkpoint:
            run.set_checkpoint_tags(output.uri, layer_pattern=output.layer_pattern, mamba_layers=output.n_mamba)
        else:
            run.set_tags({"output.uri": output.uri})
        log_output_files(run, out_dir, reporter.artifacts)
        publisher = PUBLISHERS.get(call.stage)
        if publisher is not None and publisher.committed is not None:  # evaluate: a run per checkpoint
            publisher.committed(self, out_dir)

    # --- after the task: Prefect artifacts ----------------------------------------------------------------

    def run_link(self, run_id: str | None) -> str:
        return mlflow_run_link(getattr(self.tracker, "tracking_uri", None),
                               getattr(self.tracker, "experiment_id", None), run_id)

    def publish(self, call: StageCall, output: Output) -> None:
        """The stage's markdown artifact (`flows.publish.PUBLISHERS`): the LOO ranking, the MMR and KL-guided
        scores, the final summary."""
        publisher = PUBLISHERS.get(call.stage)
        if publisher is None or publisher.artifact is None:
            return
        folder = self.store.get_checkpoint(output.name, digest=output.manifest_digest)
        link = self.run_link(output.mlflow_run_id)
        markdown, description = publisher.artifact(self, folder, output, link)
        create_markdown_artifact(markdown=redact_text(markdown), key=artifact_key(self.run_name, output.name),
                                 description=redact_text(description))


__all__ = ["CACHE_KEY_TAG", "StageReporter", "StoreExecutor", "run_stage"]
