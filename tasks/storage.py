"""Where a run lives: a local folder (the default) or an `s3://` URL shared by several workers.

Stages always read and write a local folder. For an `s3://` run that folder is a working copy under
$EDGAR_TUNE_CACHE/runs/, and the run's truth is the bucket:
- after a stage runs, its folder is uploaded under a new version prefix (`NAME@VERSION/...`), then the
  pointer object `NAME.json` (one atomic PUT) is switched to it, then older versions are deleted; a reader
  never sees half a folder;
- before a stage needs a folder, the working copy is brought to the pointer's version.
Prefect's persisted results for an `s3://` run go to `.prefect-results/` beside the run, so a worker that
picks up a retried run finds the cache that another worker wrote. One run or rerun works in a run at a time
(`RunFolder.lock`): a lock file in the folder, and for an `s3://` run a slot on the shared Prefect server too.
Credentials and endpoint come from the usual AWS settings (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...), read by s3fs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tasks.io import Busy, atomic_dir, atomic_write_bytes, cache_dir, describe_holder, held, holder_info, sha256_file

RESULTS = ".prefect-results"
LOCK = ".lock"  # in the run folder (an s3:// run's working copy): held while a run or rerun works in it
WAIT_S = 7 * 24 * 3600  # the longest a run that waits its turn (`if_busy: wait`) waits for an s3:// run's slot

log = logging.getLogger(__name__)


def s3_fs():
    """An s3fs file system that caches no listing: other workers (and users) write to the same buckets."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _working_copies() -> Path:
    """Where this machine keeps the working copies of s3:// runs, each named after its URL."""
    return cache_dir() / "runs"


def folder_identity(local: Path) -> str:
    """The same name for a run folder from any machine: an s3:// run's working copy by its name (after its URL),
    which every worker shares; a local folder by host and path."""
    import socket

    local = Path(local).resolve()
    if local.parent == _working_copies().resolve():
        return f"s3-run:{local.name}"
    return f"{socket.gethostname()}:{local}"


@dataclass
class RunFolder:
    ref: str  # what the user gave: a folder, or an s3:// URL
    local: Path  # where the stages read and write
    remote: str | None = None  # the s3:// URL, or None for a local run
    _results: object = field(default=None, repr=False)  # the saved RemoteFileSystem block, once made

    @classmethod
    def open(cls, ref: str) -> RunFolder:
        ref = str(ref)
        if ref.startswith("s3://"):
            ref = ref.rstrip("/")
            name = f"{hashlib.sha256(ref.encode()).hexdigest()[:12]}-{ref.rsplit('/', 1)[-1]}"
            local = _working_copies() / name
            local.mkdir(parents=True, exist_ok=True)
            return cls(ref, local, ref)
        if "://" in ref:
            raise ValueError(f"run folder {ref!r}: only local folders and s3:// URLs are supported")
        local = Path(ref).resolve()
        local.mkdir(parents=True, exist_ok=True)
        return cls(str(local), local)

    # -- one run at a time ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, wait: bool = False, **about: str | None) -> Iterator[None]:
        """Hold the folder for one run or rerun: two in one folder would overwrite each other's stages, remove each
        other's half-written ones, and evaluate or register the other's weights under their own settings.

        `wait` waits for a run that holds it to end (logging who holds it every minute), as a queue would.

        Raises:
            ConfigError: another process holds it and `wait` is False; the message names it (flow run, pid, host,
                since when).
        """
        from edgar_tune.config import ConfigError

        advice = ("two runs in one folder would overwrite each other's stages. Wait for it to end (then Retry this "
                  "run: its finished stages are Cached), give this run another out_dir, or let it wait its turn "
                  "(`if_busy: wait`, `edgar-tune run --wait`, `edgar-tune rerun --wait`)")  # fmt: skip
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(held(self.local / LOCK, holder_info(run=self.ref, **about), wait=wait))
            except Busy as err:
                raise ConfigError(f"run folder {self.ref} is in use by another run "
                                  f"({describe_holder(err.holder)}); {advice}") from None  # fmt: skip
            if self.remote is not None:
                self._hold_across_workers(stack, advice, wait)
            yield

    def _hold_across_workers(self, stack: contextlib.ExitStack, advice: str, wait: bool) -> None:
        """An s3:// run is shared through the bucket, so workers on other hosts are not excluded by this host's
        lock file. They share the Prefect server: the run also takes the one slot of a global concurrency limit
        named after its URL, as a lease that a thread renews while the run holds it and the server frees
        `SLOT_LEASE_S` after a holder that died without releasing it. Without a shared server (PREFECT_API_URL), the
        lock file is all: an embedded server's slot would exclude no other host, and stay taken after a kill."""
        from tasks.limits import SLOT_LEASE_S, shared_server, slot, slot_name

        if not shared_server():
            return
        from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

        from edgar_tune.config import ConfigError

        name = slot_name("edgar-tune-run", self.remote)
        try:
            stack.enter_context(slot(name, wait_s=None))
        except ConcurrencySlotAcquisitionError as err:  # the server answered 423 Locked: the slot is taken
            if wait:
                log.info("waiting for %s, held by a run on another worker (the Prefect global concurrency limit %s)",
                         self.ref, name)  # fmt: skip
                stack.enter_context(slot(name, wait_s=WAIT_S))
                return
            raise ConfigError(f"run {self.ref} is in use by a run on another worker: it holds the Prefect global "
                              f"concurrency limit {name} ({err}; a worker that died frees it within "
                              f"{SLOT_LEASE_S // 60} minutes on a server that keeps its leases on disk, as `make "
                              "server` does; one held across a restart of a server that keeps them in memory stays "
                              "taken: free it in the UI, Concurrency -> Global, once no run works in it); "
                              f"{advice}") from None  # fmt: skip

    # -- Prefect results ---------------------------------------------------------------------------------------
    def result_storage(self) -> dict:
        """`with_options` for the stage tasks: results beside an s3:// run; Prefect's default storage otherwise."""
        if self.remote is None:
            return {}
        if self._results is None:
            from prefect.filesystems import RemoteFileSystem

            basepath = f"{self.remote.rsplit('/', 1)[0]}/{RESULTS}"
            self._results = RemoteFileSystem(basepath=basepath)
            self._results.save(f"edgar-tune-results-{hashlib.sha256(basepath.encode()).hexdigest()[:12]}", overwrite=True)
        return {"result_storage": self._results}

    # -- sync ---------------------------------------------------------------------------------------------------
    def _fs(self):
        return s3_fs()

    def push(self, names: list[str]) -> None:
        """Publish these files or folders of the working copy to the bucket (no-op for a local run)."""
        if self.remote is None:
            return
        fs = self._fs()
        for name in names:
            path = self.local / name
            if path.is_file():
                fs.pipe_file(f"{self.remote}/{name}", path.read_bytes())
            elif path.is_dir():
                self._push_dir(fs, name, path)

    def _push_dir(self, fs, name: str, path: Path) -> None:
        files = {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
        version = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        pointer = f"{self.remote}/{name}.json"
        old = json.loads(fs.cat_file(pointer)) if fs.exists(pointer) else None
        if old is None or old["version"] != version:
            prefix = f"{self.remote}/{name}@{version}"
            for rel in files:
                fs.put_file(str(path / rel), f"{prefix}/{rel}")
            fs.pipe_file(pointer, json.dumps({"version": version, "files": files}).encode())
            if old is not None:
                fs.rm(f"{self.remote}/{name}@{old['version']}", recursive=True)
        atomic_write_bytes(self._pulled(name), version.encode())

    def pull(self, names: list[str]) -> None:
        """Bring these files or folders of the working copy to the bucket's version (no-op for a local run)."""
        if self.remote is None:
            return
        fs = self._fs()
        for name in dict.fromkeys(names):
            pointer = f"{self.remote}/{name}.json"
            if fs.exists(pointer):
                self._pull_dir(fs, name, json.loads(fs.cat_file(pointer)))
            elif fs.exists(f"{self.remote}/{name}"):
                atomic_write_bytes(self.local / name, fs.cat_file(f"{self.remote}/{name}"))

    def _pull_dir(self, fs, name: str, pointer: dict) -> None:
        mark = self._pulled(name)
        if (self.local / name).is_dir() and mark.exists() and mark.read_text() == pointer["version"]:
            return
        with atomic_dir(self.local / name) as tmp:
            for rel, digest in pointer["files"].items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{self.remote}/{name}@{pointer['version']}/{rel}", str(tmp / rel))
                if sha256_file(tmp / rel) != digest:
                    raise OSError(f"{self.remote}/{name}@{pointer['version']}/{rel} does not match its pointer")
        atomic_write_bytes(mark, pointer["version"].encode())

    def _pulled(self, name: str) -> Path:
        return self.local / ".synced" / f"{name.replace('/', '_')}.version"
