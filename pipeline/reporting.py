"""Where a stage sends its metrics, files and progress lines: the `Reporter` interface and the console one.

On a floor below the stages (it imports no torch), so the executor, the flows and any layer under the
stages can name the interface without importing `pipeline.stages`. `pipeline.stages.common` (and
`pipeline.stages`) re-export both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Protocol

from pipeline.redaction import redact_text


class Reporter(Protocol):
    """Where stages send metrics and files (MLflow through the orchestration layer, or nowhere)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | os.PathLike) -> None: ...

    def progress(self, message: str) -> None: ...

    def trial(self, name: str) -> contextlib.AbstractContextManager[Reporter]:
        """A reporter for one of several trainings inside a stage (an MMR trial), so that each one's
        curves sit under the same `train/...` keys in a run of its own (MLflow: a nested run)."""
        ...


class ConsoleReporter:
    """Prints progress lines; drops metrics (the default when a stage runs on its own)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike) -> None:
        pass

    def progress(self, message: str) -> None:
        print(redact_text(f"{self.prefix}{message}"), flush=True)

    @contextlib.contextmanager
    def trial(self, name: str) -> Iterator[ConsoleReporter]:
        yield self


__all__ = ["ConsoleReporter", "Reporter"]
