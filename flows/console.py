"""What the console shows: the pipeline's progress lines, Prefect's warnings, one line per error.

Prefect's own console output (state changes, temporary-server notices, tracebacks of failed runs) is
turned down: the flow prints its progress itself, and the entry points print failures. The Prefect API
(and so the UI) still receives every log line of the flow and task runs. Every line -- progress, log
records of any library and their tracebacks, to the console and to Prefect's API -- is redacted
(`pipeline.redaction`) on its way out.
"""

from __future__ import annotations

import logging
import os
import traceback

from pipeline.redaction import redact_text

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


class _Redact(logging.Filter):
    """Masks secrets in a record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: shown as its format string
            message = str(record.msg)
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None and not getattr(record, "_redacted_exc", False):
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            record._redacted_exc = True
        return True


_REDACT = _Redact()


def redact_logs() -> None:
    """Adds the redacting filter to every log handler configured so far (the console's, Prefect's API one)."""
    loggers = [logging.getLogger(), *(item for item in logging.Logger.manager.loggerDict.values()
                                      if isinstance(item, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if _REDACT not in handler.filters:
                handler.addFilter(_REDACT)


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
    redact_logs()


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

    message = redact_text(message)
    try:
        get_run_logger().info(message)
    except MissingContextError:
        pass
    if not _console_shows_run_info():
        print(message, flush=True)


__all__ = ["QUIET_ENVIRONMENT", "progress", "quiet_console", "redact_logs"]
