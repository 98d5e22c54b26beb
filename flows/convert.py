"""The conversion flow: teacher -> LOO -> H-K -> (MMR -> next H-K)... -> SFT -> evaluate, resumable.

    python -m flows.convert                                   # the whole chain on the defaults
    python -m flows.convert --until loo experiment=tiny        # stop after a stage; Hydra overrides
    python -m flows.convert teacher.path=s3://models/llama storage.uri=s3://bucket/runs tracking=server
    python -m flows.convert --plan experiment=tiny            # check everything, print the plan, run nothing

One Prefect flow run per call; each stage is a task (flows.executor) whose output is a checkpoint in
the store `<storage.uri>/<run_name>/<name>/`, and one MLflow parent run per `run_name` holds a child run
per stage. Running the same command again skips every stage the store already holds under the same
cache key and continues an interrupted one from its last save. Before anything runs, the whole run is
checked (`pipeline.plan`): every problem is printed as one line and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time
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
from flows.publish import summary_records
from pipeline.chain import UNTIL, run_chain
from pipeline.config import RunConfig, to_plain
from pipeline.executor import work_root_for
from pipeline.plan import Plan, plan
from pipeline.stages import summary_table
from pipeline.stages.evaluate import SUMMARY_FILE
from pipeline.store import LocalStore, Store
from pipeline.redaction import redact, redact_text, redacted_exception
from pipeline.tracking import NullTracker, Tracker


def check_run(cfg: RunConfig, until: str = "evaluate", teacher: CheckpointResolver | None = None,
              start: CheckpointResolver | None = None) -> Plan:
    """The plan of this run (`pipeline.plan.plan`): every problem, and what each stage will do."""
    cache_root = cache_root_of(cfg)
    store = open_run_store(cfg, cache_root)
    return plan(cfg, store=store, work_root=work_root_for(cache_root, store, cfg.run_name),
                teacher=teacher or CheckpointResolver.teacher(cfg, cache_root), tracking=lambda: check_tracking(cfg),
                until=until, start=start or CheckpointResolver.start(cfg, cache_root))


def open_tracker(cfg: RunConfig) -> Tracker | NullTracker:
    """The run's MLflow parent run: re-attached on a restart with the same settings, a new one otherwise."""
    if not cfg.tracking.enabled:
        return NullTracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run_name)
    return Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run_name, params=to_plain(cfg))


def location(store: Store, name: str | None = None, filename: str | None = None) -> str:
    """Where the store, a stored output or one of its files is: a path for local stores, else a URI."""
    if name is None:
        return str(store.root) if isinstance(store, LocalStore) else store.uri
    if isinstance(store, LocalStore):
        return str(store.root / name / filename) if filename else str(store.root / name)
    return store.file_uri(name, filename) if filename else store.uri_for(name)


def run_conversion(cfg: RunConfig, until: str = "evaluate") -> dict[str, Any]:
    """The body of the flow, for a composed config."""
    if until not in UNTIL:
        raise ConfigCompositionError(f"until={until!r} is not a stage; valid: {', '.join(UNTIL)}")
    started = time.time()
    cache_root = cache_root_of(cfg)
    teacher, start = CheckpointResolver.teacher(cfg, cache_root), CheckpointResolver.start(cfg, cache_root)
    checked = check_run(cfg, until, teacher, start)
    checked.raise_problems()  # every problem, one line each, before anything is written
    store = open_run_store(cfg, cache_root)
    store.check()
    tracker = open_tracker(cfg)
    executor = StoreExecutor(store, tracker, work_root_for(cache_root, store, cfg.run_name), cfg.run_name,
                             first_count=cfg.schedule.counts[0])
    progress(f"run '{cfg.run_name}' up to {until}: store {location(store)}")
    progress(checked.render())
    with tracker:  # the parent MLflow run: FINISHED, or FAILED / KILLED with the exception
        tracker.log_params(to_plain(cfg))
        tracker.log_dict(to_plain(cfg), "run_config.json")
        tracker.set_tags({"storage.uri": store.uri, "until": until, "prefect.flow_run_id": flow_run.id or ""})
        run_chain(cfg, executor, teacher(), until=until, start=start())
    return _report(cfg, until, store, tracker, executor, time.time() - started)


def _report(cfg: RunConfig, until: str, store: Store, tracker: Any, executor: StoreExecutor,
            seconds: float) -> dict[str, Any]:
    """Prints where the results are; returns the same as the flow's result."""
    ran, skipped = executor.ran, executor.skipped
    progress(f"done in {seconds:.0f}s: {len(ran)} stages computed, {len(skipped)} found complete in the store")
    last = list(executor.outputs)[-1]
    if "evaluate" in executor.outputs:
        evaluated = executor.outputs["evaluate"]
        progress(summary_table(summary_records(store.get_checkpoint("evaluate", digest=evaluated.manifest_digest))))
        results = location(store, "evaluate", SUMMARY_FILE)
    else:
        results = location(store, last)
    progress(f"results: {results}")
    if tracker.run_id is not None:
        if tracker.tracking_uri.startswith(("http://", "https://")):
            where = f"{tracker.tracking_uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
        else:
            where = f"{tracker.tracking_uri}  (`make ui` to browse)"
        where = redact_text(where)
        progress(f"MLflow:  experiment '{cfg.tracking.experiment}', run '{cfg.run_name}' ({tracker.run_id}) at {where}")
    progress(f"Prefect: flow run '{flow_run.name}' ({flow_run.id}) at {prefect_location()}")
    return redact({
        "run_name": cfg.run_name,
        "store": store.uri,
        "results": results,
        "outputs": {name: output.uri for name, output in executor.outputs.items()},
        "ran": ran,
        "skipped": skipped,
        "mlflow_run_id": tracker.run_id,
    }, keys=False)


@flow(name="convert", description="Distil a transformer teacher into attention/Mamba hybrids (Apriel-H1 recipe).")
def convert(overrides: list[str] | None = None, until: str = "evaluate") -> dict[str, Any]:
    """overrides: Hydra overrides, e.g. ["experiment=tiny", "schedule.counts=[2,3]"].
    until: the last stage to run: teacher, loo, convert, mmr, steps, sft or evaluate."""
    try:
        return run_conversion(compose(overrides or []), until)
    except Exception as error:  # what Prefect records of a failure holds no secret
        twin = redacted_exception(error)
        if twin is error:
            raise
        raise twin from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.convert",
        description="Run the conversion chain (stages already complete in the store are skipped).",
        epilog="Overrides use Hydra syntax: experiment=tiny teacher.path=/models/llama schedule.counts=[4,6] "
               "storage.uri=s3://bucket/runs tracking.uri=http://127.0.0.1:5000 run_name=my-run",
    )
    parser.add_argument("--until", default="evaluate", choices=UNTIL, help="last stage to run (default: evaluate)")
    parser.add_argument("--plan", action="store_true",
                        help="check the whole run and print what each stage would do; run and write nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    args = parser.parse_args(argv)
    quiet_console()
    try:
        cfg = compose(args.overrides)  # a bad override fails here, in one line, before anything starts
    except ConfigCompositionError as error:
        print(redact_text(f"error: {error}"), file=sys.stderr)
        return 2
    try:
        checked = check_run(cfg, args.until)  # every problem, before Prefect or MLflow starts
    except Exception as error:
        return print_failure(error)
    if args.plan:
        print(checked.render())
    for problem in checked.problems:
        print(redact_text(f"error: {problem}"), file=sys.stderr)
    if args.plan or checked.problems:
        return 1 if checked.problems else 0
    return run_flow_command(lambda: convert(overrides=args.overrides, until=args.until, return_state=True).result())


if __name__ == "__main__":
    sys.exit(main())
