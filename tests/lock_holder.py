"""Hold what a run holds, in a process of its own (another run, another worker), until its stdin closes:

    python -m tests.lock_holder run RUN FLOW_RUN_NAME [wait]  # a run folder or s3:// run, as a run in it does
    python -m tests.lock_holder registry TRACKING_URI     # a store's registrations, as a registering flow run does

It prints `held` once it holds, and this project's log lines (`waiting for ...`) before.
"""

from __future__ import annotations

import logging
import sys
from contextlib import AbstractContextManager
from pathlib import Path

from prefect import flow

from tasks.registry import one_writer
from tasks.storage import RunFolder


def hold(lock: AbstractContextManager) -> None:
    with lock:
        print("held", flush=True)
        sys.stdin.read()


@flow(name="hold-registry")
def hold_registry(uri: str) -> None:
    hold(one_writer(uri, Path.cwd()))


if __name__ == "__main__":
    kind, target, *rest = sys.argv[1:]
    ours = logging.getLogger("tasks")
    ours.setLevel(logging.INFO)
    ours.addHandler(logging.StreamHandler(sys.stdout))
    if kind == "run":
        hold(RunFolder.open(target).lock(wait=rest[1:] == ["wait"], flow_run=rest[0]))
    else:
        hold_registry(target)
