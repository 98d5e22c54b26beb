"""The one executor: every stage call of `pipeline.chain` runs through `Executor`, whatever drives it.

For one call:
1. cache key = sha256 of (stage, its code version, its config arguments as given -- nothing else of the
   config --, and the content digests of its inputs: earlier outputs and the user's teacher). Equal keys
   mean the same computation on the same inputs.
2. If the store holds a committed output of that name (its manifest.json exists: a cut-off upload has
   none) recorded under that key, it is used as it is. This is what resumes a run, also on another machine
   sharing the bucket.
3. Otherwise the inputs are fetched by the version the key was computed from (`store.hold(name,
   digest=...)`, verified, kept from pruning while the stage runs: another run committing a newer version
   meanwhile changes nothing here), the stage runs into a fresh output folder with a persistent work
   folder `<work_root>/<name>` (its training state survives a kill, so running again continues from the
   last save; state saved under another key is discarded), its settings are written beside it
   (run_config.json, from the very settings the key digests), and the output is committed through the
   store, manifest last, with the key as its config digest.

Work folders belong to one run: `work_root_for` names them after the run's store URI (`<cache>/work/
<run_name>-<digest of the store URI>`), and each stage's work folder is locked (flock) while the stage
uses it, so two runs never share or delete each other's training state or output folder.

`run_local` uses it as it is over a folder store; `flows/` subclasses it to run each call as a Prefect
task inside an MLflow child run (`attempt`, `committed`, `dispatch` are the hooks).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import key_plain
from pipeline.reporting import ConsoleReporter, Reporter
from pipeline.stages.common import RUN_CONFIG, STAGE_META, read_meta, write_run_config
from pipeline.store import (
    MANIFEST_NAME,
    CheckpointRef,
    IntegrityError,
    LeaseHeldError,
    NotFoundError,
    Store,
    config_digest,
    manifest_digest,
)

# Files of an output that record how and when it was made, not what it is: outside its content digest.
RECORD_FILES = frozenset({STAGE_META, RUN_CONFIG})


def work_root_for(cache_root: Path, store: Store, run_name: str) -> Path:
    """The work folders of the run writing to `store`: `<cache_root>/work/<run_name>-<digest of the store URI>`
    (two runs of one run_name on different stores never share them)."""
    digest = hashlib.sha256(store.uri.encode("utf-8")).hexdigest()[:12]
    return Path(cache_root) / "work" / f"{run_name}-{digest}"


def content_digest(manifest: Mapping[str, Any]) -> str:
    """What a committed output holds: its files' paths and sha256, without the records of time and
    settings, so recomputing a byte-identical output leaves every later key unchanged."""
    return config_digest({entry["path"]: entry["sha256"] for entry in manifest["files"]
                          if entry["path"] not in RECORD_FILES})


_FOLDER_DIGESTS: dict[tuple, str] = {}  # (folder, its files' paths, sizes and mtimes) -> digest, per process


def folder_digest(folder: Path) -> str:
    """Content digest of a local folder of files (a user's teacher): every file's path and sha256 (hidden
    files aside); of a single file (a GGUF teacher): its name and sha256. Hashed once per process while
    no file's size or modification time changes."""
    if folder.is_file():
        files, folder = [folder], folder.parent
    else:
        files = sorted(path for path in folder.rglob("*") if path.is_file()
                       and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    stamp = (str(folder.resolve()), *((path.relative_to(folder).as_posix(), path.stat().st_size, path.stat().st_mtime_ns)
                                      for path in files))
    if stamp not in _FOLDER_DIGESTS:
        entries = {}
        for path in files:
            with open(path, "rb") as handle:
                entries[path.relative_to(folder).as_posix()] = hashlib.file_digest(handle, "sha256").hexdigest()
        _FOLDER_DIGESTS[stamp] = config_digest(entries)
    return _FOLDER_DIGESTS[stamp]


@dataclass(frozen=True)
class Source:
    """An input from outside the store (the user's teacher): where it is, what it holds, how to get it."""

    uri: str  # as the user gave it (recorded as the output's parent)
    digest: str  # content digest: a changed teacher at the same URI is a new input
    fetch: Callable[[], Path] = field(compare=False, repr=False)  # -> the local folder (downloads once)
    files: tuple[str, ...] = ()  # relative paths of its files (the plan checks them without fetching)
    read: Callable[[str], bytes] | None = field(default=None, compare=False, repr=False)  # one small file


def local_source(uri: str, folder: Path) -> Source:
    """A folder on this machine as a Source, digested by content."""
    files = tuple(sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
                         and not any(part.startswith(".") for part in path.relative_to(folder).parts)))
    return Source(uri, folder_digest(folder), lambda: folder, files, lambda name: (folder / name).read_bytes())


@dataclass(frozen=True)
class Output:
    """A committed stage output in the store: what the calls pass to each other."""

    name: str
    stage: str
    uri: str
    digest: str  # content_digest of its manifest
    manifest_digest: str
    cache_key: str
    mlflow_run_id: str | None = None
    layer_pattern: str | None = None
    n_mamba: int | None = None  # converted layers (Mamba + Gated DeltaNet): the K of H-K
    ran: bool = False  # computed by this run (False: found complete in the store)

    def ref(self) -> CheckpointRef:
        return CheckpointRef(self.name, self.uri, self.manifest_digest, self.cache_key)


Input = Output | Source | Mapping[str, Output]


@dataclass
class StageCall:
    """One stage function applied to its config arguments and its inputs.

    run: a stage function (`pipeline.stages`, marked with its stage name and code version), called as
        run(**settings, **inputs-as-folders, out_dir=..., work_dir=..., reporter=...).
    settings: the config sections and values it reads, by parameter name (its key digests exactly these).
    inputs: parameter name -> an earlier Output, the user's Source, or a name -> Output mapping.
    (A plain dataclass of plain values: Prefect walks task arguments.)
    """

    name: str  # output name: "teacher", "loo", "H-4", "mmr-H-4", "H-5-SFT", "evaluate"
    run: Callable[..., Any]
    settings: dict[str, Any]
    inputs: dict[str, Input]
    is_checkpoint: bool = True  # a model folder (vs. a table of results)

    @property
    def stage(self) -> str:
        return self.run.stage_name

    def check_signature(self) -> None:
        """The call binds every parameter of the stage function (a wiring mistake fails before any work)."""
        inspect.signature(self.run).bind(**self.settings, **self.inputs, out_dir=None, work_dir=None, reporter=None)


def input_digest(value: Input) -> Any:
    if isinstance(value, (Output, Source)):
        return value.digest
    return {name: output.digest for name, output in value.items()}


def cache_key(call: StageCall) -> str:
    return config_digest({
        "stage": call.stage,
        "code_version": call.run.code_version,
        "settings": key_plain(call.settings),
        "inputs": {role: input_digest(value) for role, value in sorted(call.inputs.items())},
    })


def parent_of(call: StageCall) -> CheckpointRef | str | None:
    """Which input an output derives from, for its manifest (a registered checkpoint: where it came from,
    not the teacher it was checked against)."""
    for role in ("parent", "checkpoint", "source", "teacher"):
        value = call.inputs.get(role)
        if isinstance(value, Output):
            return value.ref()
        if isinstance(value, Source):
            return value.uri if "://" in value.uri else Path(value.uri).resolve().as_uri()
    return None


class Executor:
    """Runs each call into `store` (skip when committed under the same key, resume, stage, commit).

    work_root: the stages' persistent work folders (`<cache>/work/<run_name>`).
    (A plain class, not a dataclass: Prefect walks dataclass task arguments.)
    """

    def __init__(self, store: Store, work_root: Path, reporter: Reporter | None = None) -> None:
        self.store = store
        self.work_root = Path(work_root)
        self.reporter = reporter or ConsoleReporter()
        self.outputs: dict[str, Output] = {}

    # --- the chain's interface ----------------------------------------------------------------------

    def __call__(self, call: StageCall) -> Output:
        key = cache_key(call)
        output = self.dispatch(call, key)
        self.outputs[call.name] = output
        return output

    @property
    def ran(self) -> list[str]:
        return [name for name, output in self.outputs.items() if output.ran]

    @property
    def skipped(self) -> list[str]:
        return [name for name, output in self.outputs.items() if not output.ran]

    def dispatch(self, call: StageCall, key: str) -> Output:
        """Where a call runs (here: in this process; flows: as a Prefect task)."""
        output, computed = self.find_or_compute(call, key)
        if not computed:
            self.progress(f"[{call.name}] complete in the store, skipped ({output.uri})")
        return output

    def find_or_compute(self, call: StageCall, key: str) -> tuple[Output, bool]:
        """(output, computed): the committed output under this key, or computed now under the write lease."""
        found = self.find(call, key)
        if found is None:
            with self.store.lease(call.name):  # another run writing this stage: wait or fail naming it
                found = self.find(call, key)  # it may have finished the stage while we waited
                if found is None:
                    return self.execute(call, key), True
        return found, False

    def progress(self, message: str) -> None:
        self.reporter.progress(message)

    # --- skip, or compute ---------------------------------------------------------------------------------

    def status(self, call: StageCall, key: str) -> str:
        """'skip' (committed under this key), 'resume' (saved training state under this key) or 'run'."""
        if self.find(call, key, quiet=True) is not None:
            return "skip"
        work_dir, key_file = self.work_root / call.name, self.work_root / f"{call.name}.key"
        if work_dir.is_dir() and any(work_dir.iterdir()) and key_file.is_file() and key_file.read_text() == key:
            return "resume"
        return "run"

    def find(self, call: StageCall, key: str, quiet: bool = False) -> Output | None:
        """The committed output of this call under this key, or None (absent, other key, unreadable)."""
        try:
            manifest = self.store.manifest(call.name)
        except NotFoundError:
            return None
        except IntegrityError as error:
            if not quiet:
                self.progress(f"[{call.name}] stored manifest unreadable ({error}); computing again")
            return None
        if manifest["config_digest"] != key:
            if not quiet:
                self.progress(f"[{call.name}] stored with other settings, inputs or code; computing again")
            return None
        meta = manifest.get("metadata") or {}
        return Output(call.name, call.stage, self.store.uri_for(call.name), content_digest(manifest),
                      manifest_digest(manifest), key, meta.get("mlflow_run_id"), meta.get("layer_pattern"),
                      meta.get("n_mamba"))

    def execute(self, call: StageCall, key: str) -> Output:
        started = time.time()
        self.progress(f"[{call.name}] {call.stage} ...")
        with contextlib.ExitStack() as held:
            held.enter_context(self._work_lock(call.name))
            inputs = {role: self._local(value, held) for role, value in call.inputs.items()}
            return self._execute(call, key, inputs, started)

    def _execute(self, call: StageCall, key: str, inputs: dict[str, Any], started: float) -> Output:
        work_dir = self._work_dir(call.name, key)
        out_dir = self.work_root / f"{call.name}.output"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        with self.attempt(call, key) as (reporter, run_id):
            call.run(**call.settings, **inputs, out_dir=out_dir, work_dir=work_dir, reporter=reporter)
            write_run_config(out_dir, call.settings)  # what the key covers, from the dict it digests
            pattern, n_mamba = layer_pattern(read_meta(out_dir))
            ref = self.store.put_checkpoint(
                out_dir, call.name, config_digest=key, parent=parent_of(call),
                metadata={"stage": call.stage, "code_version": call.run.code_version, "cache_key": key,
                          "mlflow_run_id": run_id, "layer_pattern": pattern, "n_mamba": n_mamba,
                          "inputs": {role: _input_names(value) for role, value in call.inputs.items()}},
            )
            output = Output(call.name, call.stage, ref.uri, content_digest(self._manifest_of(ref)),
                            ref.manifest_digest, key, run_id, pattern, n_mamba, ran=True)
            self.committed(call, output, out_dir, reporter)
        shutil.rmtree(work_dir, ignore_errors=True)
        (self.work_root / f"{call.name}.key").unlink(missing_ok=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        self.progress(f"[{call.name}] done in {time.time() - started:.0f}s: {ref.uri}")
        return output

    # --- hooks ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def attempt(self, call: StageCall, key: str) -> Iterator[tuple[Reporter, str | None]]:
        """Around one computation: the stage's reporter and the id of its tracking run (none here)."""
        yield self.reporter, None

    def committed(self, call: StageCall, output: Output, out_dir: Path, reporter: Reporter) -> None:
        """After the output is committed, before its folder goes (flows: MLflow tags and files)."""

    # --- helpers -----------------------------------------------------------------------------------------

    def _local(self, value: Input, held: contextlib.ExitStack) -> Any:
        """An input as a local folder: a Source fetched, an Output as the very version its digest names,
        held (not pruned) until `held` closes."""
        if isinstance(value, Source):
            return value.fetch()
        if isinstance(value, Output):
            return held.enter_context(self.store.hold(value.name, digest=value.manifest_digest))
        return {name: held.enter_context(self.store.hold(output.name, digest=output.manifest_digest))
                for name, output in value.items()}

    def _manifest_of(self, ref: CheckpointRef) -> dict[str, Any]:
        """The manifest of the version just committed (even if another run has committed a newer one since)."""
        manifest = self.store.manifest(ref.name)
        if manifest_digest(manifest) != ref.manifest_digest:
            folder = self.store.get_checkpoint(ref.name, digest=ref.manifest_digest)
            manifest = json.loads((folder / MANIFEST_NAME).read_text())
        return manifest

    @contextlib.contextmanager
    def _work_lock(self, name: str) -> Iterator[None]:
        """This process's exclusive use of the stage's work folder (flock: the kernel drops it if the process
        dies); another process using it is one line naming it."""
        from pipeline.store.lease import LocalLease, describe_holder

        lock = LocalLease(name, str(self.work_root / name), self.work_root / f"{name}.lock")
        holder = lock._try_acquire()
        if holder is not None:
            raise LeaseHeldError(f"the work folder {self.work_root / name} is in use by another run "
                                 f"({describe_holder(holder)}); wait for it to finish or stop it, then run again")
        try:
            yield
        finally:
            lock.release()

    def _work_dir(self, name: str, key: str) -> Path:
        """The stage's persistent work folder; state saved under another key is discarded, not resumed."""
        work_dir, key_file = self.work_root / name, self.work_root / f"{name}.key"
        if work_dir.exists() and (not key_file.is_file() or key_file.read_text() != key):
            self.progress(f"  discarding the saved state of {name}: it belongs to other settings or inputs")
            shutil.rmtree(work_dir)
        if work_dir.exists() and any(work_dir.iterdir()):
            self.progress(f"  resuming {name} from the state saved in {work_dir}")
        work_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        return work_dir


def _input_names(value: Input) -> Any:
    if isinstance(value, Output):
        return value.name
    if isinstance(value, Source):
        return value.uri
    return [output.name for output in value.values()]


def layer_pattern(meta: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """(layer pattern, converted layer count: Mamba + Gated DeltaNet, the K of H-K) from a stage.json; a
    teacher is all attention."""
    count = meta.get("n_mamba")
    if count is not None and meta.get("n_gdn"):
        count += meta["n_gdn"]
    if meta.get("layer_pattern") is not None:
        return meta["layer_pattern"], count
    if meta.get("stage") in ("teacher", "teacher_finetune") and isinstance(meta.get("layers"), int):
        from pipeline.model.config import attention_pattern

        return attention_pattern(meta["layers"]), 0
    return None, count


__all__ = ["Executor", "Output", "Source", "local_source", "StageCall", "cache_key", "content_digest", "folder_digest",
           "layer_pattern", "work_root_for"]
