"""Hold a run folder as a run does, in its own process (another run, another worker): `python -m tests.lock_holder
RUN [FLOW_RUN_NAME]` takes `RunFolder.open(RUN).lock()`, prints `held` and keeps it until its stdin closes."""

from __future__ import annotations

import sys

from tasks.storage import RunFolder

if __name__ == "__main__":
    with RunFolder.open(sys.argv[1]).lock(flow_run=sys.argv[2] if len(sys.argv) > 2 else None):
        print("held", flush=True)
        sys.stdin.read()
