"""Prefect global concurrency limits that edgar-tune makes on first use, on the server every worker shares.

- `sec-edgar`: a rate limit (1 slot that frees at 10/s) that every EDGAR request takes, so runs on all workers
  together stay under SEC's 10 requests/s (tasks/download.py).
- `edgar-tune-registry-<hash>`: one slot per MLflow tracking server, held by a registration (or a promotion by
  hand), so two do not read the same champion at once (tasks/registry.py).

They show in the UI under Concurrency -> Global, where they can be changed. The second is taken on a shared server
only (`shared_server`); without one, a lock file on this host does its work. (An `s3://` run is held through a
lease in its bucket, which every host that works in it reaches: tasks/storage.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)

SLOT_LEASE_S = 300  # a held slot is a lease: renewed while held, freed this long after a holder that died
# Where `make server` keeps the leases: on disk (PREFECT_HOME), so a restarted server still frees a dead holder's slot.
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def shared_server() -> bool:
    """Whether a Prefect server is configured (PREFECT_API_URL), which workers on other hosts can share.

    Without one, Prefect starts an embedded server for this host's runs. Its limits exclude nobody that a lock file
    on this host does not, and it never frees a slot whose holder was killed: its lease reaper does not run there.
    A run killed by the OOM killer while it held one left it taken for good, and every later run was refused."""
    return prefect_api() is not None


def prefect_api() -> str | None:
    """The configured Prefect server's API URL (PREFECT_API_URL, without a trailing slash); None without one."""
    from prefect.settings import get_current_settings

    return (get_current_settings().api.url or "").rstrip("/") or None


_checked: set[str] = set()  # the servers whose lease storage this process has read


def _check_lease_storage() -> None:
    """Warn, once per process and server, where the Prefect server keeps the leases of slots in memory (Prefect's
    default): a slot held across a restart of that server stays taken for good. Its settings say so
    (`GET /admin/settings`); a server that does not show them (Prefect Cloud) is not warned about."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
        if url in _checked:
            return
        _checked.add(url)
        try:
            answer = client.request("GET", "/admin/settings")
            storage = answer.json()["server"]["concurrency"]["lease_storage"]
        except Exception:  # noqa: BLE001 (no settings to read: nothing to warn about)
            return
    if storage.endswith(".memory"):
        log.warning("the Prefect server at %s keeps the leases of concurrency slots in memory (%s, Prefect's "
                    "default): a slot held across a restart of it stays taken, and the runs or registrations that "
                    "need it are refused or wait until someone frees it in the UI. Start it with "
                    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=%s, as `make server` does", url, storage,
                    LEASE_STORAGE)  # fmt: skip


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


def slot_name(prefix: str, key: str) -> str:
    """A limit's name for one shared thing (an s3:// run, a tracking URI): the prefix and a hash of the key."""
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def slot(name: str, wait_s: float | None) -> Iterator[None]:
    """Hold the one slot of the limit `name` (made if missing) for the `with` block, as a lease that a thread renews
    while it is held; a renewal that fails does not stop the work.

    Raises:
        ConcurrencySlotAcquisitionError: `wait_s` None and the slot is taken (the server answers 423 Locked).
        TimeoutError: the slot stayed taken for `wait_s` seconds.
    """
    from prefect.concurrency.sync import concurrency

    ensure_limit(name, 1)
    _check_lease_storage()
    wait = {"max_retries": 0} if wait_s is None else {"timeout_seconds": wait_s}
    with concurrency(name, occupy=1, strict=True, lease_duration=SLOT_LEASE_S, raise_on_lease_renewal_failure=False,
                     **wait):  # fmt: skip
        yield
