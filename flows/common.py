"""What both flows' command lines (`flows.convert`, `flows.ablation`) share: the run's store and cache
folder, the user's teacher as a Source, the MLflow tracking check, where the Prefect run is shown, and how a
flow command ends: its exit code, a user error as one line, a bug with its traceback."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from prefect.runtime import flow_run

from flows.config import ConfigCompositionError
from flows.sources import teacher_source
from pipeline.config import ConfigError, RunConfig
from pipeline.executor import Source
from pipeline.convert import ConversionError
from pipeline.data import DataLoadError, DemoDataError, TokenizerError
from pipeline.evaluate.lm_harness import LMEvalError
from pipeline.model.config import HybridConfigError
from pipeline.model.gguf import GGUFError
from pipeline.model.kernels import KernelUnavailableError
from pipeline.model.layouts import LayoutError
from pipeline.errors import StageError
from pipeline.store import Store, StoreError, open_store
from pipeline.redaction import redact_text
from pipeline.tracking import default_tracking_uri
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


class CheckpointResolver:
    """A checkpoint the user names, the teacher (`teacher.path`) or the start checkpoint (`start.path`), as a
    Source, resolved once (listing and digest; the weights come later); None when the path is unset."""

    def __init__(self, path: str | None, cfg: RunConfig, cache_root: Path) -> None:
        self.path, self.cfg, self.cache_root, self.source = path, cfg, cache_root, None

    @classmethod
    def teacher(cls, cfg: RunConfig, cache_root: Path) -> CheckpointResolver:
        return cls(cfg.teacher.path, cfg, cache_root)

    @classmethod
    def start(cls, cfg: RunConfig, cache_root: Path) -> CheckpointResolver:
        return cls(cfg.start.path, cfg, cache_root)

    def __call__(self) -> Source | None:
        if self.source is None and self.path:
            self.source = teacher_source(self.path, self.cache_root, self.cfg.storage.endpoint_url)
        return self.source


def prefect_location() -> str:
    """The Prefect UI of this flow run, or where its record is kept when no server is configured."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url and flow_run.ui_url:
        return flow_run.ui_url
    return "the local Prefect database (`make ui` to browse)"


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
