"""What the console shows: the pipeline's progress lines, Prefect's warnings, one line per error.

Prefect's own console output (state changes, temporary-server notices, tracebacks of failed runs) is
turned down: the flow prints its progress itself, and the entry points print failures. The Prefect API
(and so the UI) still receives every log line of the flow and task runs.
"""

from __future__ import annotations

import logging
import os

# Defaults for the processes we start (a served flow run inherits them); a user's setting wins.
QUIET_ENVIRONMENT = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",  # Prefect's console handler; API logs keep INFO
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight-loading bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map bars
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # a "View run" line per ended run; the flow prints one
}
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _NoRunStates(logging.Filter):
    """Drops flow/task run records (state changes, tracebacks) from the console; the entry point reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(_RUN_LOGGERS)


def quiet_console() -> None:
    """Call at the start of an entry point (before any flow runs)."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"])
            if not any(isinstance(item, _NoRunStates) for item in handler.filters):
                handler.addFilter(_NoRunStates())
    for name in ("mlflow", "alembic", "botocore", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The environment variables above reach libraries imported later; these, the ones imported already.
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _console_shows_run_info() -> bool:
    """True when Prefect's console handler already prints a run logger's INFO records."""
    from prefect.logging.handlers import PrefectConsoleHandler

    return any(
        isinstance(handler, PrefectConsoleHandler)
        and handler.level <= logging.INFO
        and not any(isinstance(item, _NoRunStates) for item in handler.filters)
        for handler in logging.getLogger().handlers
    )


def progress(message: str) -> None:
    """One progress line: to the Prefect run's log (UI) when in a run, and to the console once."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().info(message)
    except MissingContextError:
        pass
    if not _console_shows_run_info():
        print(message, flush=True)


__all__ = ["QUIET_ENVIRONMENT", "progress", "quiet_console"]
