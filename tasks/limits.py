"""Prefect global concurrency limits that edgar-tune makes on first use, on the server every worker shares.

- `sec-edgar`: a rate limit (1 slot that frees at 10/s) that every EDGAR request takes, so runs on all workers
  together stay under SEC's 10 requests/s (tasks/download.py).
- `edgar-tune-run-<hash>`: one slot per `s3://` run, held by the run or rerun that works in it, so workers on other
  hosts (which share the run through the bucket, not a disk) do not work in it at once (tasks/storage.py).
- `edgar-tune-registry-<hash>`: one slot per MLflow tracking server, held by a registration from a flow run, so
  two do not read the same champion at once (tasks/registry.py).

They show in the UI under Concurrency -> Global, where they can be changed.
"""

from __future__ import annotations

import contextlib


def in_prefect_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run (so a Prefect server is there to hold limits)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def ensure_limit(name: str, limit: int, **settings: float) -> None:
    """Create the global concurrency limit `name` unless it exists (another run may create it at the same time)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit, **settings))
