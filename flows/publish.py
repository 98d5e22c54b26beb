"""Stage outputs shown to people: files and tags in MLflow, markdown tables as Prefect artifacts.

Reads the files the stages wrote (loo.json, mmr.json, summary.json, stage.json) and formats them; it
computes nothing. JSON files go to MLflow through `log_dict`, which redacts secret-looking values (a
stage's run_config.json holds every config value, URLs included); images go as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.executor import Output
from pipeline.redaction import redact_text
from pipeline.stages.common import RUN_CONFIG, STAGE_META
from pipeline.stages.evaluate import SUMMARY_FILE, TOKENS_FRONTIER_FILE, summary_table
from pipeline.stages.loo import LOO_FILE
from pipeline.stages.mmr import MMR_FILE

if TYPE_CHECKING:
    from flows.executor import StoreExecutor

SUMMARY_METRICS = ("answer_accuracy", "nll", "kl_to_teacher", "nll_generic", "kl_generic", "tokens_per_s", "throughput_ratio",
                   "decode_ratio", "cumulative_train_tokens")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def log_output_files(run: Any, folder: Path, reported: Sequence[Path]) -> None:
    """The files a stage reported, plus its stage.json and run_config.json, as MLflow artifacts."""
    seen: set[str] = set()
    for path in [*reported, folder / STAGE_META, folder / RUN_CONFIG]:
        path = Path(path)
        if path.name in seen or not path.is_file():
            continue
        seen.add(path.name)
        if path.suffix == ".json":
            run.log_dict(read_json(path), path.name)
        else:
            run.log_artifact(path)


def mlflow_run_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str:
    """A markdown link to a run in the MLflow UI for a server URI, else the run id."""
    if not run_id:
        return "-"
    if tracking_uri and tracking_uri.startswith(("http://", "https://")) and experiment_id:
        return redact_text(f"[{run_id[:8]}]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})")
    return f"`{run_id[:8]}`"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())).strip("-")


# --- tables ----------------------------------------------------------------------------------------

def loo_markdown(folder: Path, first: int | None, run_link: str) -> str:
    loo = read_json(folder / LOO_FILE)
    by_layer = {entry["layer"]: entry for entry in loo["layers"]}
    lines = [
        f"### Leave-one-out layer importance ({loo['metric']}, mode {loo['mode']})",
        f"Baseline {loo['metric']}: {loo['baseline']:.4f}. Least important first; MLflow run {run_link}.",
        "",
        "| rank | layer | score without it | importance | converted first |",
        "| --- | --- | --- | --- | --- |",
    ]
    first = None if first is None else first - len(loo.get("mamba_layers", []))  # a hybrid teacher's stay Mamba
    for rank, layer in enumerate(loo["ranking"], start=1):
        entry = by_layer[layer]
        chosen = "yes" if first is not None and rank <= first else ""
        lines.append(f"| {rank} | {layer} | {entry['score']:.4f} | {entry['importance']:+.4f} | {chosen} |")
    return "\n".join(lines)


def mmr_markdown(folder: Path, name: str, run_link: str) -> str:
    mmr = read_json(folder / MMR_FILE)
    mixers = "mixers" in mmr  # (layer, mixer) pairs: schedule.mixers other than [mamba]
    # a Gated DeltaNet pair is trained once: its initialisation draws nothing
    gdn_once = " (Gated DeltaNet pairs: one)" if "gdn" in mmr.get("mixers", ()) and mmr.get("seeds", 1) > 1 else ""
    lines = [
        f"### MMR scores from H-{mmr['n_mamba'] + mmr.get('n_gdn', 0)} ({name})",
        f"Mean distillation loss of the last {mmr['score_window']} of {mmr['steps']} steps per candidate, "
        f"averaged over {mmr.get('seeds', 1)} initialisation(s) (± their standard deviation)"
        f"{gdn_once}; lowest first (easiest to replace). MLflow run {run_link}.",
        "",
        "| rank | layer | mixer | loss |" if mixers else "| rank | layer | loss |",
        "| --- | --- | --- | --- |" if mixers else "| --- | --- | --- |",
    ]
    for rank, entry in enumerate(mmr["ranking"], start=1):
        spread = "" if entry.get("std") is None else f" ± {entry['std']:.4f}"
        mixer = f" {entry['mixer']} |" if mixers else ""
        lines.append(f"| {rank} | {entry['layer']} |{mixer} {entry['loss']:.4f}{spread} |")
    return "\n".join(lines)


def kl_markdown(folder: Path, name: str, run_link: str) -> str:
    """The KL-guided scoring's table (pipeline/stages/kl.py): each layer's KL fall, smallest first."""
    from pipeline.stages.kl import KL_FILE

    kl = read_json(folder / KL_FILE)
    reference = kl["all_converted_loss"]
    lines = [
        f"### KL-guided scores from H-{kl['n_mamba']} ({name})",
        f"Mean distillation loss of the last {kl['score_window']} of {kl['steps']} steps per trial; every remaining "
        f"attention layer converted: {'-' if reference is None else f'{reference:.4f}'}. KL fall = that minus the "
        f"loss with the layer kept as attention; smallest first (converted first). MLflow run {run_link}.",
        "",
        "| rank | layer | loss with it kept | KL fall |",
        "| --- | --- | --- | --- |",
    ]
    for rank, entry in enumerate(kl["ranking"], start=1):
        loss = "-" if entry["loss"] is None else f"{entry['loss']:.4f}"
        lines.append(f"| {rank} | {entry['layer']} | {loss} | {entry['kl_fall']:+.4f} |")
    return "\n".join(lines)


def summary_records(folder: Path) -> list[dict[str, Any]]:
    return read_json(folder / SUMMARY_FILE)


def summary_markdown(records: list[dict[str, Any]], links: Mapping[str, str], location: str) -> str:
    lines = ["### Hybrid checkpoints: quality and throughput", f"`{location}`", "", summary_table(records), "",
             "| checkpoint | MLflow run |", "| --- | --- |"]
    lines += [f"| {record['checkpoint']} | {links.get(record['checkpoint'], '-')} |" for record in records]
    return "\n".join(lines)


EVALUATION_PARAMS = ("n_mamba", "layer_pattern", "parent", "converted_layers", "cumulative_train_tokens")


def evaluation_params(record: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluated checkpoint's lineage as MLflow params: the same keys for every checkpoint (the teacher:
    parent "none", no converted layers, 0 tokens), so the compare view lines them up."""
    values = {name: record.get(name) for name in EVALUATION_PARAMS}
    values["parent"] = values["parent"] or "none"
    values["converted_layers"] = list(values["converted_layers"] or [])
    values["cumulative_train_tokens"] = int(values["cumulative_train_tokens"] or 0)
    return values


def summary_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    from pipeline.evaluate.lm_harness import score_metrics

    metrics = {name: float(record[name]) for name in SUMMARY_METRICS if isinstance(record.get(name), (int, float))}
    return {**metrics, **score_metrics(record.get("lm_eval"))}  # lm_eval/<task>/<metric>, same on every checkpoint


# --- what each stage publishes -----------------------------------------------------------------------

@dataclass(frozen=True)
class Publisher:
    """What a stage's output publishes beyond its MLflow run's files and tags; `StoreExecutor` calls them.

    committed(executor, out_dir): into MLflow, once the stage has computed and committed its output.
    artifact(executor, folder, output, link) -> (markdown, description): a Prefect markdown artifact after the
    stage's task, computed or found in the store; folder: the stored output, link: its MLflow run's.
    """

    committed: Callable[[StoreExecutor, Path], None] | None = None
    artifact: Callable[[StoreExecutor, Path, Output, str], tuple[str, str]] | None = None


def log_evaluation_runs(executor: StoreExecutor, out_dir: Path) -> None:
    """One MLflow child run per evaluated checkpoint: the same params (its lineage) and metric names
    for every checkpoint, and its checkpoint tags, so MLflow's compare view sets them side by side;
    the frontier plots go on the parent run."""
    for record in summary_records(out_dir):
        name = record["checkpoint"]
        source = executor.outputs.get(name)
        with executor.tracker.child("evaluate", checkpoint=name) as run:
            run.log_params(evaluation_params(record))
            run.log_metrics(summary_metrics(record))
            if source is not None:
                run.set_checkpoint_tags(source.uri, layer_pattern=source.layer_pattern,
                                        mamba_layers=record.get("n_mamba"))
        executor.evaluation_runs[name] = run.run_id
    for plot in (out_dir / "frontier.png", out_dir / TOKENS_FRONTIER_FILE):
        if plot.is_file():
            executor.tracker.log_artifact(plot)


def loo_artifact(executor: StoreExecutor, folder: Path, output: Output, link: str) -> tuple[str, str]:
    return loo_markdown(folder, executor.first_count, link), "Leave-one-out layer ranking"


def mmr_artifact(executor: StoreExecutor, folder: Path, output: Output, link: str) -> tuple[str, str]:
    return mmr_markdown(folder, output.name, link), f"MMR scores ({output.name})"


def kl_artifact(executor: StoreExecutor, folder: Path, output: Output, link: str) -> tuple[str, str]:
    return kl_markdown(folder, output.name, link), f"KL-guided scores ({output.name})"


def summary_artifact(executor: StoreExecutor, folder: Path, output: Output, link: str) -> tuple[str, str]:
    """The final summary, each checkpoint with the MLflow runs that produced and evaluated it."""
    links = {}
    for name in [record["checkpoint"] for record in summary_records(folder)]:
        produced = executor.outputs.get(name)
        links[name] = (f"produced in {executor.run_link(produced.mlflow_run_id if produced else None)}, "
                       f"evaluated in {executor.run_link(executor.evaluation_runs.get(name) or output.mlflow_run_id)}")
    markdown = summary_markdown(summary_records(folder), links, f"{output.uri}/summary.json")
    return markdown, "Quality and throughput of every checkpoint"


# A stage's publication is its entry here; a stage without one publishes only its MLflow run.
PUBLISHERS: dict[str, Publisher] = {
    "loo": Publisher(artifact=loo_artifact),
    "mmr": Publisher(artifact=mmr_artifact),
    "kl": Publisher(artifact=kl_artifact),
    "evaluate": Publisher(committed=log_evaluation_runs, artifact=summary_artifact),
}


__all__ = [
    "EVALUATION_PARAMS",
    "PUBLISHERS",
    "Publisher",
    "artifact_key",
    "evaluation_params",
    "log_output_files",
    "kl_artifact",
    "kl_markdown",
    "log_evaluation_runs",
    "loo_artifact",
    "loo_markdown",
    "mlflow_run_link",
    "mmr_artifact",
    "mmr_markdown",
    "read_json",
    "summary_artifact",
    "summary_markdown",
    "summary_metrics",
    "summary_records",
]
