"""This project's log lines in the flow run's log (the Prefect UI) and on the worker's console."""

from __future__ import annotations

import logging
import sys

from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

from edgar_tune.config import ConfigError, DataNotFound, StageFailed
from tasks.download import EdgarError

# Errors whose message says in full what went wrong and what to change: a config or data problem (data that is not
# there), EDGAR's refusal, a stage that failed for a reason it gives (a full disk, a training that crashed, with its
# last lines), a loss or perplexity gone NaN. The CLI prints them in one line; so do the run's logs
# (`_ExplainedErrors`).
EXPLAINED = (ConfigError, DataNotFound, EdgarError, StageFailed, FloatingPointError)


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, silent outside a run (a stage run in-process by `edgar-tune stage`, a thread)."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], MissingContextError):
            return
        super().handleError(record)


class _ExplainedErrors(logging.Filter):
    """Prefect logs the exception a task run or flow run ends with, with its traceback: for an `EXPLAINED` error,
    fifty lines of Prefect's engine and this project's calls, twice (the stage's task run, then the flow run), above
    the message that says what to change, in the UI's log and on the console. This keeps the message and drops the
    traceback of those; any other error keeps it: that one is a bug, and its traceback what a report needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPLAINED):
            record.explained = str(record.exc_info[1])  # for the CLI's console, which says it once (cli._Once)
            record.exc_info = record.exc_text = None
        return True


def logs_into_the_flow_run() -> None:
    """This project's log lines (what changed since the last download, the memory plan, the champion decision, a
    wait for a lock) at INFO in the flow run's log in the Prefect UI and on the worker's console. Prefect's logging
    config sends only its own loggers to the API and shows other libraries' lines from WARNING up. The error that
    ends a run is logged without a traceback where its message explains it (`_ExplainedErrors`)."""
    for name in ("tasks", "flows", "kernels", "edgar_tune"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):  # PREFECT_LOGGING_EXTRA_LOGGERS did it
            logger.addHandler(_RunLogHandler())
    for name in ("prefect.task_runs", "prefect.flow_runs"):  # the loggers of the records that end a run
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ExplainedErrors) for f in logger.filters):
            logger.addFilter(_ExplainedErrors())
