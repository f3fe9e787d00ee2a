"""This project's log lines in the flow run's log (the Prefect UI) and on the worker's console."""

from __future__ import annotations

import logging
import sys

from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, silent outside a run (a stage run in-process by `edgar-tune stage`, a thread)."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], MissingContextError):
            return
        super().handleError(record)


def logs_into_the_flow_run() -> None:
    """This project's log lines (what changed since the last download, the memory plan, the champion decision, a
    wait for a lock) at INFO in the flow run's log in the Prefect UI and on the worker's console. Prefect's logging
    config sends only its own loggers to the API and shows other libraries' lines from WARNING up."""
    for name in ("tasks", "flows", "kernels", "edgar_tune"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):  # PREFECT_LOGGING_EXTRA_LOGGERS did it
            logger.addHandler(_RunLogHandler())
