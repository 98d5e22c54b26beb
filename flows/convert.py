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
import errno
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from prefect import flow
from prefect.runtime import flow_run

from flows.config import ConfigCompositionError, compose
from flows.console import progress, quiet_console
from flows.executor import StoreExecutor
from flows.publish import summary_records
from flows.sources import teacher_source
from pipeline.chain import UNTIL, run_chain
from pipeline.config import ConfigError, RunConfig, to_plain
from pipeline.executor import Source, work_root_for
from pipeline.plan import Plan, plan
from pipeline.convert import ConversionError
from pipeline.data import DataLoadError, DemoDataError, TokenizerError
from pipeline.errors import StageError
from pipeline.evaluate.lm_harness import LMEvalError
from pipeline.model.config import HybridConfigError
from pipeline.model.gguf import GGUFError
from pipeline.model.kernels import KernelUnavailableError
from pipeline.model.layouts import LayoutError
from pipeline.stages import summary_table
from pipeline.stages.evaluate import SUMMARY_FILE
from pipeline.store import LocalStore, Store, StoreError, open_store
from pipeline.redaction import redact, redact_text, redacted_exception
from pipeline.tracking import NullTracker, Tracker, default_tracking_uri
from pipeline.train.state import StateSaveError

DEFAULT_CACHE_ROOT = ".cache"  # <cache>/store: S3 downloads; <cache>/work: resumable stage state
# Errors whose message says everything: the command line prints them as one line, without a traceback:
# bad input (settings, teacher, tokenizer, data, kernels missing), or a store / tracking server that cannot
# be used. Anything else is a bug, printed with its traceback.
USER_ERRORS = (ConfigCompositionError, ConfigError, StageError, StoreError, ImportError, MlflowException,
               DataLoadError, TokenizerError, DemoDataError, LayoutError, HybridConfigError, ConversionError,
               GGUFError, LMEvalError, KernelUnavailableError, StateSaveError)
# OS errors a user's machine causes (a full disk or quota, a file too large, permissions, a read-only
# file system): one line naming the file and what to do.
DISK_ERRNOS = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space within your disk quota",
               errno.EFBIG: "raise the file-size limit (ulimit -f) or free space"}
PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def user_error_lines(error: BaseException) -> list[str] | None:
    """The lines a user error prints (`error: ...` each), or None for a bug (its traceback is printed)."""
    if isinstance(error, USER_ERRORS):
        return str(error).splitlines() or [type(error).__name__]
    if isinstance(error, OSError) and (error.errno in DISK_ERRNOS or error.errno in PERMISSION_ERRNOS):
        return [os_error_line(error)]
    return None


def os_error_line(error: OSError) -> str:
    """`No space left on device (ENOSPC) writing <file>: free space on that disk, then run again ...`."""
    name = errno.errorcode.get(error.errno, str(error.errno))
    where = f" at {error.filename}" if error.filename is not None else ""
    if error.filename2 is not None:
        where += f" -> {error.filename2}"
    if error.errno in DISK_ERRNOS:
        hint = (f"{DISK_ERRNOS[error.errno]} (or point storage.cache_dir / storage.uri to another disk), then run "
                "again: committed stages are kept and a stopped one resumes from its last save")
    else:
        hint = "fix the permissions of that path (or choose another storage.cache_dir / storage.uri), then run again"
    return f"{error.strerror or error} ({name}){where}: {hint}"


def open_run_store(cfg: RunConfig, cache_root: Path) -> Store:
    """The run's own store: `<storage.uri>/<run_name>`, so checkpoint names are the chain's names
    (opening touches nothing; the plan checks it can be written)."""
    return open_store(f"{cfg.storage.uri.rstrip('/')}/{cfg.run_name}", endpoint_url=cfg.storage.endpoint_url,
                      cache_dir=cache_root / "store", retain_seconds=cfg.storage.retain_hours * 3600)


def cache_root_of(cfg: RunConfig) -> Path:
    return Path(cfg.storage.cache_dir or DEFAULT_CACHE_ROOT).expanduser().resolve()


def check_tracking(cfg: RunConfig) -> None:
    """The MLflow tracking URI can be reached (a server answers /health; a database's folder exists)."""
    if not cfg.tracking.enabled:
        return
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        shown = redact_text(uri)  # a server URI may carry credentials: sent as basic auth, as MLflow does
        request = _health_request(uri)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status != 200:
                    raise ConnectionError(f"MLflow server {shown} answered /health with HTTP {response.status}")
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = redact_text(getattr(error, "reason", error))
            raise ConnectionError(f"MLflow server {shown} cannot be reached ({reason})") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).expanduser().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConnectionError(f"{uri}: the folder {folder} does not exist or is not writable")
    elif "://" not in uri or uri.startswith("file:"):
        raise ConnectionError(f"{redact_text(uri)} is a file store, which MLflow 3 no longer keeps up to date: use "
                              "sqlite:///<folder>/mlflow.db (the default) or a server's http(s):// URI")


def _health_request(uri: str):
    """GET <server>/health, the URI's userinfo (if any) as an Authorization: Basic header."""
    import base64
    import urllib.request
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    headers = {}
    if parts.username is not None or parts.password is not None:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    return urllib.request.Request(f"{urlunsplit(parts).rstrip('/')}/health", headers=headers)


class TeacherResolver:
    """The user's teacher (or, `key="start"`, the start checkpoint) as a Source, resolved once (listing and
    digest; the weights come later)."""

    def __init__(self, cfg: RunConfig, cache_root: Path, key: str = "teacher") -> None:
        self.cfg, self.cache_root, self.source = cfg, cache_root, None
        self.path = cfg.teacher.path if key == "teacher" else cfg.start.path

    def __call__(self) -> Source | None:
        if self.source is None and self.path:
            self.source = teacher_source(self.path, self.cache_root, self.cfg.storage.endpoint_url)
        return self.source


def check_run(cfg: RunConfig, until: str = "evaluate", teacher: TeacherResolver | None = None,
              start: TeacherResolver | None = None) -> Plan:
    """The plan of this run (`pipeline.plan.plan`): every problem, and what each stage will do."""
    cache_root = cache_root_of(cfg)
    store = open_run_store(cfg, cache_root)
    return plan(cfg, store=store, work_root=work_root_for(cache_root, store, cfg.run_name),
                teacher=teacher or TeacherResolver(cfg, cache_root), tracking=lambda: check_tracking(cfg),
                until=until, start=start or TeacherResolver(cfg, cache_root, "start"))


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


def prefect_location() -> str:
    """The Prefect UI of this flow run, or where its record is kept when no server is configured."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url and flow_run.ui_url:
        return flow_run.ui_url
    return "the local Prefect database (`make ui` to browse)"


def run_conversion(cfg: RunConfig, until: str = "evaluate") -> dict[str, Any]:
    """The body of the flow, for a composed config."""
    if until not in UNTIL:
        raise ConfigCompositionError(f"until={until!r} is not a stage; valid: {', '.join(UNTIL)}")
    started = time.time()
    cache_root = cache_root_of(cfg)
    teacher, start = TeacherResolver(cfg, cache_root), TeacherResolver(cfg, cache_root, "start")
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


def run_flow_command(start: Callable[[], Any]) -> int:
    """A command line's flow run and its exit code: 0 done, 130 interrupted (run it again to continue), 1 a
    user error (its lines printed, no traceback) or a bug (the whole traceback)."""
    try:
        start()
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    except Exception as error:
        return print_failure(error)
    return 0


def print_failure(error: Exception) -> int:
    """Prints a failure and returns the exit code 1: a user error's lines (`user_error_lines`), without a
    traceback; a bug's whole traceback (it helps). Both redacted."""
    lines = user_error_lines(error)
    if lines is None:
        print(redact_text("".join(traceback.format_exception(error))), file=sys.stderr, end="")
    else:
        for line in lines:
            print(redact_text(f"error: {line}"), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
