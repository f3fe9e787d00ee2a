"""A termination signal that an error took the place of.

A SIGTERM that lands while Prefect's task engine makes a task run meets a bug of Prefect's (3.8.8): the engine's
crash handler runs before the task run exists, and raises `ValueError: Task run is not set` in place of the
signal's `TerminationSignal`. The flow run then ends `Failed` with that error, as if the stage had failed by
itself, and a script or notebook that called the flow goes on, with the signal gone. `signal_behind` finds the
signal behind such an error; the flows call their stages `as_signal()`, which raises it again, so that the flow
engine does what it does with any SIGTERM: it marks the run `Crashed` ("Execution was aborted by a termination
signal") and ends the process with the signal.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


def signal_behind(err: BaseException | None) -> int | None:
    """The signal that began the exception chain ending in `err`, if a signal did: Prefect raises
    TerminationSignal for a SIGTERM during a flow run, and the CLI's handler SystemExit(128 + signal)."""
    from prefect.exceptions import TerminationSignal

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, TerminationSignal):
            return err.signal
        if isinstance(err, SystemExit) and err.code in (128 + signal.SIGTERM, 128 + signal.SIGHUP):
            return err.code - 128
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def as_signal() -> Iterator[None]:
    """Inside a flow run: an error raised in place of a termination signal is raised as that signal again."""
    try:
        yield
    except Exception as err:
        if (sig := signal_behind(err)) is None:
            raise
        from prefect.exceptions import TerminationSignal

        raise TerminationSignal(sig) from err
