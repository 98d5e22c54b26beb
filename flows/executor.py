"""Runs each StageCall of `pipeline.chain.run_chain` as a Prefect task over the checkpoint store.

For one call:
1. cache key = sha256 of (stage, output name, digest of the config the stage reads, manifest digests of
   its inputs). Equal keys mean the same computation on the same inputs.
2. If the store holds a committed output of that name (its manifest.json exists: a cut-off upload has
   none) recorded with that key, the task ends as `Cached` without loading anything. This is what
   resumes a run, also on another machine sharing the bucket.
3. Otherwise the inputs are fetched (`store.get_checkpoint`, verified), the stage runs into a fresh
   output folder with a persistent work folder `<cache>/work/<run_name>/<name>` (its training state
   survives a kill, so re-running continues from the last save), and the output is put into the store
   with the key as its config digest, in an MLflow child run holding the stage's params, metrics,
   files and checkpoint tags.

Prefect's own result cache is not used: the store is the record of what is complete, shared by every
machine that points at it.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.console import progress
from flows.publish import (
    artifact_key,
    evaluation_params,
    layer_pattern,
    log_output_files,
    loo_markdown,
    mlflow_run_link,
    mmr_markdown,
    read_json,
    summary_markdown,
    summary_metrics,
    summary_records,
)
from pipeline.chain import StageCall
from pipeline.stages.common import STAGE_META
from pipeline.stages.evaluate import TOKENS_FRONTIER_FILE
from pipeline.store import CheckpointRef, IntegrityError, NotFoundError, Store, config_digest, manifest_digest

CACHE_KEY_TAG = "stage.cache_digest"  # ("…_key" would be redacted as a secret-looking name)
PARENT_ROLES = ("parent", "checkpoint", "teacher")  # which input a stage's output derives from, in order


@dataclass(frozen=True)
class StageOutput:
    """A committed stage output in the store: what the tasks pass to each other."""

    name: str
    stage: str
    uri: str
    manifest_digest: str
    cache_key: str
    mlflow_run_id: str | None = None
    layer_pattern: str | None = None
    n_mamba: int | None = None
    ran: bool = False  # computed by this flow run (False: found complete in the store)

    def ref(self) -> CheckpointRef:
        return CheckpointRef(self.name, self.uri, self.manifest_digest, self.cache_key)


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


def _replace_strings(value: Any, aliases: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return aliases.get(value, value)
    if isinstance(value, Mapping):
        return {key: _replace_strings(item, aliases) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_strings(item, aliases) for item in value]
    return value


@task(cache_policy=NO_CACHE, persist_result=False)
def run_stage(executor: StoreExecutor, call: StageCall, key: str) -> Any:
    """One stage: skipped if the store has it under this key, else computed and stored."""
    found = executor.find(call, key)
    if found is not None:
        progress(f"[{call.name}] complete in the store, skipped ({found.uri})")
        return Completed(data=found, name="Cached", message=f"found {found.uri} (cache key {key[:12]})")
    return executor.execute(call, key)


class StoreExecutor:
    """The `execute` of `pipeline.chain.run_chain` for a flow: one task per call, outputs in `store`.

    work_root: `<cache>/work/<run_name>`, the stages' persistent work folders.
    first_count: Mamba layers of the first conversion (marked in the LOO table).
    key_aliases: strings of the stage configs that stand for others in cache keys (a teacher downloaded
        from s3:// runs from a local folder, but its key names the URI, the same on every machine).
    prepare: call name -> functions run before that stage computes (downloading that teacher).
    (A plain class, not a dataclass: Prefect walks dataclass task arguments.)
    """

    def __init__(self, store: Store, tracker: Any, work_root: Path, run_name: str, *, first_count: int | None = None,
                 key_aliases: Mapping[str, str] | None = None,
                 prepare: Mapping[str, list[Callable[[], Any]]] | None = None) -> None:
        self.store = store
        self.tracker = tracker  # pipeline.tracking.Tracker or NullTracker
        self.work_root = work_root
        self.run_name = run_name
        self.first_count = first_count
        self.key_aliases = dict(key_aliases or {})
        self.prepare = dict(prepare or {})
        self.outputs: dict[str, StageOutput] = {}
        self.evaluation_runs: dict[str, str | None] = {}

    # --- the chain's interface ----------------------------------------------------------------------

    def __call__(self, call: StageCall) -> StageOutput:
        key = self.cache_key(call)
        stage_task = run_stage.with_options(name=call.name, task_run_name=call.name, tags=[call.stage])
        output: StageOutput = stage_task(self, call, key, return_state=True).result()
        self.outputs[call.name] = output
        self.publish(call, output)
        return output

    @property
    def ran(self) -> list[str]:
        return [name for name, output in self.outputs.items() if output.ran]

    @property
    def skipped(self) -> list[str]:
        return [name for name, output in self.outputs.items() if not output.ran]

    def cache_key(self, call: StageCall) -> str:
        return config_digest({
            "stage": call.stage,
            "name": call.name,
            "config": config_digest(_replace_strings(call.config, self.key_aliases)),
            "inputs": {role: output.manifest_digest for role, output in sorted(call.inputs.items())},
        })

    # --- inside the task ------------------------------------------------------------------------------

    def find(self, call: StageCall, key: str) -> StageOutput | None:
        """The committed output of this call under this key, or None (absent, other key, unreadable)."""
        try:
            manifest = self.store.manifest(call.name)
        except NotFoundError:
            return None
        except IntegrityError as error:
            progress(f"[{call.name}] stored manifest unreadable ({error}); computing again")
            return None
        if manifest["config_digest"] != key:
            progress(f"[{call.name}] stored with other settings or inputs; computing again")
            return None
        meta = manifest.get("metadata") or {}
        return StageOutput(call.name, call.stage, self.store.uri_for(call.name), manifest_digest(manifest), key,
                           meta.get("mlflow_run_id"), meta.get("layer_pattern"), meta.get("n_mamba"))

    def execute(self, call: StageCall, key: str) -> StageOutput:
        started = time.time()
        progress(f"[{call.name}] {call.stage} ...")
        for prepare in self.prepare.get(call.name, []):
            prepare()
        input_dirs = {role: self.store.get_checkpoint(output.name) for role, output in call.inputs.items()}
        work_dir = self._work_dir(call.name, key)
        out_dir = self.work_root / f"{call.name}.output"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        with self.tracker.child(call.stage, checkpoint=call.name, tags={CACHE_KEY_TAG: key}) as run:
            run.log_params(call.config)
            reporter = StageReporter(run, self.tracker, call.stage, call.name)
            call.run(input_dirs, out_dir, work_dir, reporter)
            meta = read_json(out_dir / STAGE_META) if (out_dir / STAGE_META).is_file() else {}
            if isinstance(meta.get("data"), dict):  # what it trained on: an MLflow dataset input
                data = meta["data"]
                run.log_dataset(data["name"], data["digest"], data["source"], rows=data.get("rows"),
                                columns=data.get("columns", ()))
            pattern, n_mamba = layer_pattern(meta)
            ref = self.store.put_checkpoint(
                out_dir, call.name, config_digest=key, parent=self._parent(call),
                metadata={"stage": call.stage, "cache_key": key, "mlflow_run_id": run.run_id,
                          "layer_pattern": pattern, "n_mamba": n_mamba,
                          "inputs": {role: output.name for role, output in call.inputs.items()}},
            )
            if call.is_checkpoint:
                run.set_checkpoint_tags(ref.uri, layer_pattern=pattern, mamba_layers=n_mamba)
            else:
                run.set_tags({"output.uri": ref.uri})
            log_output_files(run, out_dir, reporter.artifacts)
            output = StageOutput(call.name, call.stage, ref.uri, ref.manifest_digest, key, run.run_id, pattern,
                                 n_mamba, ran=True)
            if call.stage == "evaluate":
                self._evaluation_runs(out_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
        (self.work_root / f"{call.name}.key").unlink(missing_ok=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        progress(f"[{call.name}] done in {time.time() - started:.0f}s: {ref.uri}")
        return output

    def _work_dir(self, name: str, key: str) -> Path:
        """The stage's persistent work folder; state saved under another key is discarded, not resumed."""
        work_dir, key_file = self.work_root / name, self.work_root / f"{name}.key"
        if work_dir.exists() and (not key_file.is_file() or key_file.read_text() != key):
            progress(f"  discarding the saved state of {name}: it belongs to other settings or inputs")
            shutil.rmtree(work_dir)
        if work_dir.exists() and any(work_dir.iterdir()):
            progress(f"  resuming {name} from the state saved in {work_dir}")
        work_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        return work_dir

    def _parent(self, call: StageCall) -> CheckpointRef | str | None:
        for role in PARENT_ROLES:
            if role in call.inputs:
                return call.inputs[role].ref()
        source = _replace_strings(call.config, self.key_aliases).get("teacher", {}).get("path")
        if source:  # the user's teacher, recorded by URI
            return source if "://" in source else Path(source).resolve().as_uri()
        return None

    def _evaluation_runs(self, out_dir: Path) -> None:
        """One MLflow child run per evaluated checkpoint: the same params (its lineage) and metric names
        for every checkpoint, and its checkpoint tags, so MLflow's compare view sets them side by side;
        the frontier plots go on the parent run."""
        for record in summary_records(out_dir):
            name = record["checkpoint"]
            source = self.outputs.get(name)
            with self.tracker.child("evaluate", checkpoint=name) as run:
                run.log_params(evaluation_params(record))
                run.log_metrics(summary_metrics(record))
                if source is not None:
                    run.set_checkpoint_tags(source.uri, layer_pattern=source.layer_pattern,
                                            mamba_layers=record.get("n_mamba"))
            self.evaluation_runs[name] = run.run_id
        for plot in (out_dir / "frontier.png", out_dir / TOKENS_FRONTIER_FILE):
            if plot.is_file():
                self.tracker.log_artifact(plot)

    # --- after the task: Prefect artifacts ----------------------------------------------------------------

    def run_link(self, run_id: str | None) -> str:
        return mlflow_run_link(getattr(self.tracker, "tracking_uri", None),
                               getattr(self.tracker, "experiment_id", None), run_id)

    def publish(self, call: StageCall, output: StageOutput) -> None:
        """Markdown tables of the LOO ranking, the MMR scores and the final summary."""
        if call.stage not in ("loo", "mmr", "evaluate"):
            return
        folder = self.store.get_checkpoint(output.name)
        link = self.run_link(output.mlflow_run_id)
        if call.stage == "loo":
            markdown, description = loo_markdown(folder, self.first_count, link), "Leave-one-out layer ranking"
        elif call.stage == "mmr":
            markdown, description = mmr_markdown(folder, output.name, link), f"MMR scores ({output.name})"
        else:
            links = {}
            for name in [record["checkpoint"] for record in summary_records(folder)]:
                produced = self.outputs.get(name)
                links[name] = (f"produced in {self.run_link(produced.mlflow_run_id if produced else None)}, "
                               f"evaluated in {self.run_link(self.evaluation_runs.get(name) or output.mlflow_run_id)}")
            markdown = summary_markdown(summary_records(folder), links, f"{output.uri}/summary.json")
            description = "Quality and throughput of every checkpoint"
        create_markdown_artifact(markdown=markdown, key=artifact_key(self.run_name, output.name),
                                 description=description)


__all__ = ["StageOutput", "StageReporter", "StoreExecutor", "run_stage"]
