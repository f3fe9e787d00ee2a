"""The embedded Prefect server ends with the command that started it, however that command ends.

Without PREFECT_API_URL, a flow run starts Prefect's embedded server: a uvicorn process (about 230 MB) that
Prefect stops at the interpreter's exit. A command killed by SIGKILL (the OOM killer, `kill -9`) never gets
there, and the server runs on, holding its port, for good. So `edgar-tune run` and `rerun` start that server
themselves, before the flow (Prefect's client then finds it running), and with it this module as a process of
its own:

    python -m edgar_tune.reaper COMMAND_PID SERVER_PID

It waits for the command's process to end, then stops the server: SIGTERM, and SIGKILL if it is still there 5 s
later. Both processes are held by pidfds (Linux 5.3+), so a reused PID is never signalled. When the command ends
on its own, Prefect has stopped the server already and this finds nothing to do.

A flow called from Python (a notebook, a script: `edgar_tune_pipeline(RunParameters(...))`) starts the server
itself, through Prefect's code, in a session of its own too (`own_session_for_embedded_server`, on importing
`flows`); the flow's first line (`watch_embedded_server`) then starts the reaper for it, once per process.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import select
import signal
import subprocess
import sys

GRACE_S = 5.0
_started: list[subprocess.Popen] = []  # held, so that no reaper is collected (with a warning) while it watches
_watched: set[int] = set()  # the server PIDs a reaper of this process watches


def wait_for_end(pid: int) -> None:
    """Return once process `pid` has ended, however it ended (at once if it has). Linux 5.3+ (a pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])  # readable once it has ended
    finally:
        os.close(fd)


def reap(command_pid: int, server_pid: int) -> None:
    """Wait for `command_pid` to end, then stop `server_pid` (see the module's docstring)."""
    try:
        server = os.pidfd_open(server_pid)
    except ProcessLookupError:
        return
    wait_for_end(command_pid)
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, None)):
        try:
            signal.pidfd_send_signal(server, sig)
        except ProcessLookupError:
            return
        if select.select([server], [], [], wait)[0]:
            return


def start(server_pid: int) -> subprocess.Popen | None:
    """Watch this process and stop `server_pid` when it ends; None where pidfds are missing (not Linux) or a reaper
    of this process watches it already."""
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal") or server_pid in _watched:
        return None
    _watched.add(server_pid)
    reaper = subprocess.Popen([sys.executable, "-m", "edgar_tune.reaper", str(os.getpid()), str(server_pid)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    _started.append(reaper)
    return reaper


class _OwnSession:
    """`subprocess` as Prefect's server module sees it while `embedded_prefect` starts the server: its Popen starts
    the process in a session of its own, everything else is `subprocess`'s."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs) -> subprocess.Popen:  # noqa: N802 (subprocess's name)
        return subprocess.Popen(*args, start_new_session=True, **kwargs)


SERVER_MODULE = "prefect.server.api.server"


class _InOwnSession(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Prefect's server module, imported (where a flow run first needs the embedded server) with its `subprocess`
    `_OwnSession`: the server it starts runs in a session of its own. One entry of `sys.meta_path`, which leaves
    it at the module's import; every other import passes it by."""

    def find_spec(self, name: str, path=None, target=None):
        if name != SERVER_MODULE:
            return None
        sys.meta_path.remove(self)  # the module's own spec, found as if this were not here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.subprocess = _OwnSession()


def own_session_for_embedded_server() -> None:
    """Have the embedded Prefect server start in a session of its own wherever a flow run starts it: a flow called
    from Python (a script, a notebook) starts it through Prefect's own code, in the caller's process group, so a
    Ctrl-C in the script's terminal ended the server at once, while the flow still had to stop its training at a
    checkpoint and mark the run Crashed (see `embedded_prefect`). Called on importing `flows`; the server module
    is not imported for it (3.6 s a worker's flow run would pay for nothing), but patched when it is."""
    module = sys.modules.get(SERVER_MODULE)
    if module is not None:
        module.subprocess = _OwnSession()
    elif not any(isinstance(f, _InOwnSession) for f in sys.meta_path):
        sys.meta_path.insert(0, _InOwnSession())


def embedded_prefect() -> int | None:
    """Start Prefect's embedded server now, where a flow run would start it (no PREFECT_API_URL), with a reaper
    that stops it when this process ends; returns the server's PID, or None where a server is configured.

    The server runs in a session of its own. In the command's process group, a signal to the whole group (Ctrl-C
    in a terminal, `timeout`, a supervisor stopping the job) ended it at once, while the flow still had to stop
    its training at a checkpoint and record how the run ended: the command then retried the dead server for
    minutes (221 s after a Ctrl-C here), printed connection tracebacks, and left the flow run `Running` in
    Prefect's database. Now the server outlives the signal, the flow records the run `Crashed`, and the server
    stops when the command ends (Prefect's exit handler, or the reaper if the command is killed).

    Raises:
        ConfigError: a configured server that does not answer.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        _check_answers(settings.api.url)
        return None
    if not settings.server.ephemeral.enabled:
        return None
    own_session_for_embedded_server()
    from prefect.server.api import server as server_module

    server = server_module.SubprocessASGIServer()  # the instance Prefect's client asks for: it finds it running
    server.start()
    start(server.server_process.pid)
    return server.server_process.pid


def _check_answers(api: str) -> None:
    """Raises ConfigError at once for a configured Prefect server that does not answer (a port mistyped, a server
    not started): the flow run ended in 80 lines of httpx's and Prefect's traceback."""
    from edgar_tune.config import ConfigError
    from tasks.io import not_answering

    if gone := not_answering(api, "the Prefect server"):
        raise ConfigError(f"PREFECT_API_URL: {gone}; start it (`prefect server start`), or unset PREFECT_API_URL to "
                          "run on a temporary embedded one")  # fmt: skip


def watch_embedded_server() -> int | None:
    """Start a reaper for the embedded Prefect server this process runs, if it runs one that none watches yet (a
    flow called from Python started it); returns its PID, or None where this process runs none."""
    server_module = sys.modules.get("prefect.server.api.server")  # not imported: no server here (importing it
    if server_module is None:  # would cost a worker's flow run 3.6 s)
        return None
    # the instance of a flow run without PREFECT_API_URL (Prefect's own registry; the killed-run test checks it)
    server = getattr(server_module.SubprocessASGIServer, "_instances", {}).get(None)
    process = getattr(server, "server_process", None)
    if process is None or process.poll() is not None:
        return None
    start(process.pid)
    return process.pid


if __name__ == "__main__":
    reap(int(sys.argv[1]), int(sys.argv[2]))
