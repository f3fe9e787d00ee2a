"""A termination signal that an error took the place of.

A SIGTERM that lands while Prefect's task engine makes a task run meets a bug of Prefect's (3.8.8): the engine's
crash handler runs before the task run exists, and raises `ValueError: Task run is not set` in place of the
signal's `TerminationSignal`. The flow run then ends `Failed` with that error, as if the stage had failed by
itself, and a script or notebook that called the flow goes on, with the signal gone. `signal_behind` finds the
signal behind such an error; the flows call their stages `as_signal()`, which raises it again, so that the flow
engine does what it does with any SIGTERM: it marks the run `Crashed` ("Execution was aborted by a termination
signal") and ends the process with the signal.

Python runs a signal's handler between two bytecodes of the main thread, wherever it is: in a finalizer (`__del__`,
run by the garbage collector in the middle of an `open()`), the handler's exception is printed as "Exception ignored
in ..." and dropped, and the run goes on as if no signal had come. A fresh clone's suite once saw a run go on after
its SIGTERM; 33 runs signalled in a loop here lost 1 so, in regex's `Group.__del__` during an import of
transformers. `keep_signals` delivers such a signal again.

A handler's exception raised between a lock's `acquire()` and the `try` that releases it leaves the lock held by
the main thread for good. Logging's module lock, left so by Ctrl-C, hung a run at exit: Prefect's events worker
waited for the lock to log a debug line, while the main thread, at interpreter shutdown, waited for that worker to
drain (a fresh clone's suite: a CLI run that outlived its SIGINT by 60 s, its threads' stacks dumped). On the way
out of a run, `release_leaked_locks` releases the logging locks the main thread still holds.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def exception_chain(err: BaseException | None) -> list[BaseException]:
    """`err` and the exceptions it was raised from or while handling (`__cause__`, else `__context__`), in turn."""
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def signal_behind(err: BaseException | None) -> int | None:
    """The signal that began the exception chain ending in `err`, if a signal did: Prefect raises
    TerminationSignal for a SIGTERM during a flow run, and the CLI's handler SystemExit(128 + signal)."""
    from prefect.exceptions import TerminationSignal

    for link in exception_chain(err):
        if isinstance(link, TerminationSignal):
            return link.signal
        if isinstance(link, SystemExit) and link.code in (128 + signal.SIGTERM, 128 + signal.SIGHUP):
            return link.code - 128
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


_kept = False
AGAIN_S = 0.05  # the delay of a signal delivered again (where it lands in a finalizer again, it is delivered again)


def keep_signals() -> None:
    """Deliver again a termination signal (SIGTERM, SIGHUP, Ctrl-C's SIGINT) whose exception Python dropped because
    its handler ran inside a finalizer; its handler then runs again at the next bytecode outside it. Installs a
    `sys.unraisablehook` once per process. What else a finalizer drops, the hook before it prints; for a signal it
    printed Python's "Exception ignored in ..." and a traceback of the finalizer the signal landed in, which says
    nothing to whoever pressed Ctrl-C: one line names the finalizer instead."""
    global _kept
    if _kept:
        return
    _kept = True
    before = sys.unraisablehook

    def hook(unraisable) -> None:
        err = unraisable.exc_value
        sig = signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal_behind(err)
        if sig is None:
            before(unraisable)
        else:  # from another thread, once this hook has returned: here it would be dropped again
            where = getattr(unraisable.object, "__qualname__", None) or type(unraisable.object).__name__
            print(f"edgar-tune: {signal.Signals(sig).name} landed in a finalizer ({where}), which drops its "
                  "exception: delivering it again", file=sys.stderr)  # fmt: skip
            again = threading.Timer(AGAIN_S, os.kill, (os.getpid(), sig))
            again.daemon = True
            again.start()

    sys.unraisablehook = hook


def release_leaked_locks() -> None:
    """Release logging's module lock and its handlers' locks where this thread holds them: call it only where no
    logging call is on this thread's stack, so that any hold is one an exception cut short (see above)."""
    handlers = [ref() for ref in list(logging._handlerList)]  # weak references, as logging keeps them
    for lock in [logging._lock, *(h.lock for h in handlers if h is not None)]:
        while lock is not None and lock._is_owned():
            lock.release()


@contextmanager
def leaked_locks_released() -> Iterator[None]:
    """A run's body: an exception out of it (Ctrl-C's KeyboardInterrupt, a signal's SystemExit) releases the
    logging locks it cut short, before the engine's handlers and the interpreter's exit need other threads."""
    try:
        yield
    except BaseException:
        release_leaked_locks()
        raise
