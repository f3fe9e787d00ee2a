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

A library's bare `except:` (or `except BaseException`) that a signal's handler runs inside catches its exception
and goes on; such code runs everywhere in a run, imports included, and a fresh clone's suite saw a flow called from
Python go on through every stage and return after Ctrl-C, the only trace of the signal lost. Inside a flow's body
(`run_body`), the SIGINT and SIGTERM handlers' exceptions carry a canary whose finalizer runs when the exception is
freed: freed while the body is still the one watched, nobody raised it on, so it is said in one line (where it was
dropped) and the signal delivered again.

Not SIGTERM's in a flow run that a Prefect worker runs: the worker asks the flow run's process, through a channel of
its own, before it cancels it with a SIGTERM, and the process says yes only where Prefect's own SIGTERM handler is
the one installed (the very function, not one that calls it). Wrapped, the UI's Cancel of a run ended it `Crashed`
("Execution was aborted by a termination signal"), not `Cancelled`, wherever it landed outside the training (which
stops at a checkpoint by a handler of its own): during a download, tokenizing, an evaluation, a sweep waiting for its
points. There, a SIGTERM whose exception is dropped is not delivered again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import weakref
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
            if (canary := getattr(err, _CANARY, None)) is not None:
                canary.said[0] = True  # said and delivered again here, not by its finalizer too
            where = getattr(unraisable.object, "__qualname__", None) or type(unraisable.object).__name__
            print(f"edgar-tune: {signal.Signals(sig).name} landed in a finalizer ({where}), which drops its "
                  "exception: delivering it again", file=sys.stderr)  # fmt: skip
            again = threading.Timer(AGAIN_S, os.kill, (os.getpid(), sig))
            again.daemon = True
            again.start()

    sys.unraisablehook = hook


def keyboard_interrupt_handled() -> None:
    """Say to Python that a KeyboardInterrupt was handled, so that the exit status asked for is the one the process
    ends with. A KeyboardInterrupt out of an `exec()` or `eval()` of a string (dataclasses and namedtuple build
    their methods so, at import) sets a flag in CPython (3.11) that is never cleared however the exception is
    handled: a process started with `python -m` then ends by SIGINT once it has shut down, whatever `SystemExit` it
    raised. The CLI's Ctrl-C ended `-2` for its parent in place of its 130 so (CI's suite, 2026-12-05). The next
    such `exec` clears the flag; an `exec` of nothing does only that."""
    exec("")


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


WATCHED = (signal.SIGINT, signal.SIGTERM)
_CANARY = "_edgar_tune_canary"
_live: set[int] = set()  # the bodies being watched; a signal's exception dropped after its body ended is let be
_bodies = 0


class _Canary:
    """Rides on a signal's exception, as an attribute, and is freed with it."""

    __slots__ = ("__weakref__", "said")

    def __init__(self, said: list[bool]):
        self.said = said


def _watching(handler, body: int):
    """`handler` (a Python handler that raises: Python's KeyboardInterrupt, Prefect's TerminationSignal, the CLI's
    SystemExit), its exception given a canary."""

    def on(signum, frame):
        try:
            handler(signum, frame)
        except BaseException as err:
            said = [False]
            canary = _Canary(said)
            setattr(err, _CANARY, canary)
            weakref.finalize(canary, _dropped, signum, body, said).atexit = False
            raise

    on.watching = True
    return on


def _dropped(signum: int, body: int, said: list[bool]) -> None:
    """A canary's finalizer: its signal's exception was freed. Where its body still runs, something caught the
    exception and went on: deliver the signal again, from another thread (a signal raised here, in a finalizer,
    would be dropped)."""
    if said[0] or body not in _live:
        return
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in (weakref.__file__, __file__):
        frame = frame.f_back
    where = "" if frame is None else f" in {frame.f_code.co_name} ({_short(frame.f_code.co_filename)}:{frame.f_lineno})"
    print(f"edgar-tune: {signal.Signals(signum).name}'s exception was caught and dropped{where}: delivering it "
          "again", file=sys.stderr)  # fmt: skip
    again = threading.Timer(AGAIN_S, os.kill, (os.getpid(), signum))
    again.daemon = True
    again.start()


def _short(path: str) -> str:
    """A source file's path from its package on: after site-packages, or after the repository's root."""
    for root in ("site-packages/", os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/"):
        if root in path:
            return path.split(root, 1)[1]
    return path


def _worker_cancels() -> bool:
    """Whether a Prefect worker (its runner) supervises this process through its control channel, and Prefect's own
    SIGTERM handler is the one installed, which that channel needs in place to cancel the run (see above)."""
    try:
        from prefect._internal import control_listener
        from prefect.utilities.engine import is_prefect_sigterm_handler_installed
    except ImportError:  # another Prefect: wrapped, as a CLI run's is
        return False
    return bool(getattr(control_listener, "_started", False)) and is_prefect_sigterm_handler_installed()


@contextmanager
def dropped_signals_delivered_again() -> Iterator[None]:
    """Inside: a SIGINT's or SIGTERM's exception that code catches and drops is delivered again (see above). The
    handlers are wrapped where they are Python's that raise (never SIG_IGN or the default action), from the main
    thread only (only there can they be set, and run), and put back on the way out."""
    global _bodies
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _bodies += 1
    body = _bodies
    before = {}
    for sig in WATCHED:
        handler = signal.getsignal(sig)
        if sig == signal.SIGTERM and _worker_cancels():
            continue
        if callable(handler) and not getattr(handler, "watching", False):
            before[sig] = handler
            signal.signal(sig, _watching(handler, body))
    _live.add(body)
    try:
        yield
    finally:
        _live.discard(body)
        for sig, handler in before.items():
            signal.signal(sig, handler)


@contextmanager
def run_body() -> Iterator[None]:
    """A flow's body: a signal whose exception code in it drops is delivered again, and an exception out of it
    releases the logging locks it cut short."""
    keep_signals()
    with dropped_signals_delivered_again(), leaked_locks_released():
        yield
