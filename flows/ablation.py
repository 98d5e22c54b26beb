"""The ablation flow: the recipe's data, loss and layer-order choices against their alternatives, on one teacher.

    python -m flows.ablation experiment=tiny ablation.seeds=[0]       # a reduced run (CPU, seconds)
    python -m flows.ablation --plan experiment=gpu_demo                # check everything, run nothing
    make ablation ARGS="experiment=gpu_demo schedule.counts=[4,6]"

The stage calls are `pipeline.ablation.run_ablation`'s, run by the conversion flow's executor (a Prefect
task per call, an MLflow child run per computation) into the same store as the conversion flow,
`<storage.uri>/<run_name>`: the teacher and the LOO ranking are the ones `make pipeline` makes (or makes
them for it). The MLflow parent run is `<run_name>-ablation`; the report (<ablation.report_name>-<device>.json, .md,
.png in `ablation.results_dir`) is built from the stored quality outputs and logged to it, with one child
run per arm (mean metrics across seeds).

Several processes can share one store and one tracking database (e.g. one per seed, each on its own
GPU): a stage another process is computing is waited for (`ablation.lease_wait_s`), then found complete;
a final run over every seed then computes nothing and writes the report of all of them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.common import (
    CheckpointResolver,
    cache_root_of,
    check_tracking,
    open_run_store,
    prefect_location,
    print_failure,
    run_flow_command,
)
from flows.config import ConfigCompositionError, compose
from flows.console import progress, quiet_console
from flows.executor import StoreExecutor
from pipeline.ablation import (
    ARMS,
    METRICS,
    check_schedule,
    collect_records,
    report_settings,
    run_ablation,
    summarize,
    write_report,
)
from pipeline.config import ConfigError, RunConfig, to_plain
from pipeline.executor import work_root_for
from pipeline.plan import Plan, plan
from pipeline.redaction import redact_text
from pipeline.tracking import NullTracker, Tracker

TRACKER_LEASE = "ablation-tracking"  # a store lease: one process at a time finds or creates the parent run
RESULTS_DIGEST_TAG = "ablation.records_digest"


def parent_run_name(cfg: RunConfig) -> str:
    return f"{cfg.run_name}-ablation"


def check_ablation(cfg: RunConfig, teacher: CheckpointResolver | None = None) -> Plan:
    """Every problem of this run (the conversion flow's checks, the ablation's schedule) and what each of
    its stage calls will do, before anything is written."""
    cache_root = cache_root_of(cfg)
    try:
        check_schedule(cfg)
    except ConfigError as error:
        return Plan(problems=[str(error)])
    store = open_run_store(cfg, cache_root)
    return plan(cfg, store=store, work_root=work_root_for(cache_root, store, cfg.run_name),
                teacher=teacher or CheckpointResolver.teacher(cfg, cache_root), tracking=lambda: check_tracking(cfg),
                until="steps", chain=lambda execute, source, _start: run_ablation(cfg, execute, source))


def open_parent(cfg: RunConfig, store) -> Tracker | NullTracker:
    """The MLflow parent run `<run_name>-ablation`, found or created under a store lease: concurrent
    processes would otherwise each create one (and race creating the database's tables)."""
    name = parent_run_name(cfg)
    if not cfg.tracking.enabled:
        return NullTracker(cfg.tracking.uri, cfg.tracking.experiment, name)
    with store.lease(TRACKER_LEASE):
        return Tracker(cfg.tracking.uri, cfg.tracking.experiment, name)


def log_arm_runs(tracker: Any, summary: list[dict], records: list[dict]) -> None:
    """One child run per arm under the parent: its params and mean metrics across seeds (each seed's as a
    step). An arm whose records are unchanged keeps its run (a rerun adds nothing); one with other records
    (more seeds) replaces it: these runs are summaries of the store, made again from it at will."""
    from pipeline.store import config_digest

    if isinstance(tracker, NullTracker):
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri)
    for row in summary:
        mine = sorted((record for record in records if record["arm"] == row["arm"]), key=lambda r: r["seed"])
        digest = config_digest(mine)
        existing = [run for run in client.search_runs([tracker.experiment_id], filter_string=(
            f"tags.stage = 'ablation' and tags.checkpoint = '{row['arm']}'"), max_results=100)
            if run.data.tags.get("mlflow.parentRunId") == tracker.run_id]
        if any(run.data.tags.get(RESULTS_DIGEST_TAG) == digest for run in existing):
            continue
        for run in existing:
            client.delete_run(run.info.run_id)
        with tracker.child("ablation", checkpoint=row["arm"], tags={RESULTS_DIGEST_TAG: digest}) as run:
            run.log_params({name: row[name] for name in ("data", "loss", "ordering", "n_mamba", "seeds")})
            metrics = {f"{name}_mean": row[name] for name in METRICS}
            metrics |= {f"{name}_std": row[f"{name}_std"] for name in METRICS if row[f"{name}_std"] is not None}
            run.log_metrics({**metrics, "tokens_mean": row["tokens"]})
            for record in mine:
                run.log_metrics({name: float(record[name]) for name in METRICS}, step=record["seed"])


def run_ablation_flow(cfg: RunConfig, command: str) -> dict[str, Any]:
    started = time.time()
    cache_root = cache_root_of(cfg)
    teacher = CheckpointResolver.teacher(cfg, cache_root)
    checked = check_ablation(cfg, teacher)
    checked.raise_problems()
    store = open_run_store(cfg, cache_root)
    store.check()
    store.lease_wait_seconds = cfg.ablation.lease_wait_s  # wait for a stage another process is computing
    tracker = open_parent(cfg, store)
    executor = StoreExecutor(store, tracker, work_root_for(cache_root, store, cfg.run_name), parent_run_name(cfg),
                             first_count=cfg.schedule.counts[0])
    progress(f"ablation '{cfg.run_name}', seeds {list(cfg.ablation.seeds)}: store {store.uri}")
    progress(checked.render())
    with tracker:
        # params are immutable in MLflow: the seeds, which differ between the processes of one ablation, are a tag
        tracker.log_params({name: value for name, value in to_plain(cfg).items() if name != "ablation"})
        tracker.set_tags({"storage.uri": store.uri, "prefect.flow_run_id": flow_run.id or "",
                          "ablation.seeds": str(list(cfg.ablation.seeds))})
        results = run_ablation(cfg, executor, teacher())
        teacher_quality, records = collect_records(
            results, lambda output: store.get_checkpoint(output.name, digest=output.manifest_digest))
        # the date the results were computed (the newest scoring), so the same store gives the same report
        computed = max(store.manifest(result.quality.name)["created"] for result in results)
        paths = write_report(teacher_quality, records, cfg.ablation.results_dir, command=command,
                             date=str(computed)[:19].replace("T", " ") + " UTC", settings=report_settings(cfg),
                             name=cfg.ablation.report_name)
        for path in paths.values():
            tracker.log_artifact(path)
        log_arm_runs(tracker, summarize(records), records)
    ran, skipped = executor.ran, executor.skipped
    progress(f"done in {time.time() - started:.0f}s: {len(ran)} stages computed, {len(skipped)} found complete in "
             "the store")
    progress(paths["md"].read_text().split("\n\n## ")[0])
    progress(f"results: {', '.join(str(path) for path in paths.values())}")
    if tracker.run_id is not None:
        progress(f"MLflow:  experiment '{cfg.tracking.experiment}', run '{parent_run_name(cfg)}' ({tracker.run_id}) "
                 f"at {tracker.tracking_uri}")
    progress(f"Prefect: flow run '{flow_run.name}' ({flow_run.id}) at {prefect_location()}")
    return {"run_name": cfg.run_name, "store": store.uri, "results": {kind: str(path) for kind, path in paths.items()},
            "records": records, "ran": ran, "skipped": skipped, "mlflow_run_id": tracker.run_id,
            "outputs": {name: output.uri for name, output in executor.outputs.items()}}


@flow(name="ablation", description="Which data, which loss, which layer order: the recipe's choices against "
                                   "their alternatives, on one teacher (several seeds).")
def ablation(overrides: list[str] | None = None, command: str | None = None) -> dict[str, Any]:
    """overrides: Hydra overrides, e.g. ["experiment=tiny", "ablation.seeds=[0]"]. command: how the run was
    started, for the report (default: the overrides)."""
    overrides = overrides or []
    return run_ablation_flow(compose(overrides), command or shlex.join(["python", "-m", "flows.ablation", *overrides]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.ablation",
        description="Run the ablation (stages already complete in the store are skipped) and write its report.",
        epilog="Overrides use Hydra syntax: experiment=gpu_demo ablation.seeds=[0,1,2] ablation.results_dir=/tmp/out",
    )
    parser.add_argument("--plan", action="store_true",
                        help="check the whole run and print what each stage would do; run and write nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    args = parser.parse_args(argv)
    quiet_console()
    try:
        cfg = compose(args.overrides)
    except ConfigCompositionError as error:
        print(redact_text(f"error: {error}"), file=sys.stderr)
        return 2
    try:
        checked = check_ablation(cfg)
    except Exception as error:
        return print_failure(error)
    if args.plan:
        print(checked.render())
        print(f"arms: {', '.join(arm.name for arm in ARMS)}; seeds {list(cfg.ablation.seeds)}; report into "
              f"{Path(cfg.ablation.results_dir).resolve()}")
    for problem in checked.problems:
        print(redact_text(f"error: {problem}"), file=sys.stderr)
    if args.plan or checked.problems:
        return 1 if checked.problems else 0
    command = shlex.join(["python", "-m", "flows.ablation", *args.overrides])
    return run_flow_command(lambda: ablation(overrides=args.overrides, command=command, return_state=True).result())


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ablation", "check_ablation", "main", "parent_run_name", "run_ablation_flow"]
