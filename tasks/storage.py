"""Where a run lives: a local folder (the default) or an `s3://` URL shared by several workers.

Stages always read and write a local folder. For an `s3://` run that folder is a working copy under
$EDGAR_TUNE_CACHE/runs/, and the run's truth is the bucket:
- after a stage runs, its folder is uploaded under a new version prefix (`NAME@VERSION/...`), then the
  pointer object `NAME.json` (one atomic PUT) is switched to it, then older versions are deleted; a reader
  never sees half a folder;
- before a stage needs a folder, the working copy is brought to the pointer's version.
Prefect's persisted results for an `s3://` run go to `.prefect-results/` beside the run, so a worker that
picks up a retried run finds the cache that another worker wrote. One run or rerun works in a run at a time
(`RunFolder.lock`): a lock file in the folder, and for an `s3://` run a lease in the bucket too (`BucketLease`).
Credentials and endpoint come from the usual AWS settings (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...), read by s3fs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path

from tasks.io import (DOWNLOAD, EVALUATE, PARSE, REGISTER, TOKENIZE, TRAIN, Busy, atomic_dir, atomic_write_bytes,
                      atomic_write_json, cache_dir, describe_holder, held, holder_info, sha256_file)  # fmt: skip

RESULTS = ".prefect-results"
LOCK = ".lock"  # in the run folder (an s3:// run's working copy): held while a run or rerun works in it
WAIT_S = 7 * 24 * 3600  # the longest a run that waits its turn (`if_busy: wait`) waits for an s3:// run's lease
LEASE = ".lease.json"  # in an s3:// run's prefix: the run that works in it, while it does
# On a store that refuses If-Match: how long a take-over waits before it reads the lease back (at most lease_s / 4)
TAKE_OVER_SETTLE_S = 2.0
LEASE_S = "EDGAR_TUNE_S3_LEASE_S"  # how long a lease outlives its last renewal (default 300 s; renewed every fifth)

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


RUN_NAME = ".stages/run.json"  # what names a local run in its keys (`run_identity`)


def run_identity(local: Path) -> str:
    """What names a local run in its stages' cache keys and in its registration's run key: the folder's path when a
    run first worked in it, recorded in `.stages/run.json` (`RunFolder.name_run`), or its path as it is now where
    there is no record. Named by its path alone, a run folder moved or renamed (`mv runs/a runs/b`, a disk
    mounted elsewhere) ran every stage again, training included, and registered the same weights as a new version;
    now it keeps its keys. A copy (`cp -r`) is the same run until its config or data move its keys: its stages are
    `Cached`, and a change trains and registers as in the folder it was copied from."""
    local = Path(local).resolve()
    record = local / RUN_NAME
    if not record.exists():
        return str(local)
    try:
        return str(json.loads(record.read_text())["name"])
    except (ValueError, KeyError, TypeError) as err:
        from edgar_tune.config import ConfigError

        raise ConfigError(f"{record} does not name the run ({type(err).__name__}: {err}); put back the folder's "
                          f"first path as {{\"name\": \"...\"}} to keep its stages, or remove the file to name the run "
                          "by where it is now (its stages run again)") from None  # fmt: skip


def check_run_folder(out: str) -> None:
    """Refuse `out` (`run --out`, the flow's `out_dir`) where it is a local folder that holds files but no run: a run
    writes config.yaml, summary.json and a folder a stage there, and would overwrite a config.yaml of the user's
    (`--out .` in a project folder; `--out ""`, an unset variable, is the current folder too). An empty folder, one
    a run worked in (its `.stages`, `.lock`, stage folders or summary.json), or one not there yet, is taken.

    Raises:
        ConfigError: saying what the folder holds, and what to give instead.
    """
    from edgar_tune.config import ConfigError

    if not out.strip():
        raise ConfigError("--out (the flow's out_dir) is empty, which is the current folder; give the run a folder, "
                          "as runs/NAME (`.` for the current folder)")  # fmt: skip
    if "://" in out or not (local := Path(out).expanduser()).is_dir():
        return
    names = sorted(p.name for p in local.iterdir())
    if not names or set(names) & {".stages", LOCK, "summary.json", DOWNLOAD, PARSE, TOKENIZE, TRAIN, EVALUATE,
                                  REGISTER}:  # fmt: skip
        return
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise ConfigError(f"run folder {local.resolve()} holds files of no run ({shown}), which a run's config.yaml and "
                      "stage folders would land among; give --out (the flow's out_dir) a new or empty folder, or a "
                      "run's, as runs/NAME")  # fmt: skip


@dataclass
class RunFolder:
    ref: str  # what the user gave: a folder, or an s3:// URL
    local: Path  # where the stages read and write
    remote: str | None = None  # the s3:// URL, or None for a local run
    _results: object = field(default=None, repr=False)  # Prefect's result storage for the run (a path or a block)
    _lease: BucketLease | None = field(default=None, repr=False)  # an s3:// run's, while held

    @classmethod
    def open(cls, ref: str) -> RunFolder:
        ref = str(ref)
        if ref.startswith("s3://"):
            ref = ref.rstrip("/")
            name = f"{hashlib.sha256(ref.encode()).hexdigest()[:12]}-{ref.rsplit('/', 1)[-1]}"
            local = _working_copies() / name
            local.mkdir(parents=True, exist_ok=True)
            return cls(ref, local, ref)
        from edgar_tune.config import ConfigError

        if "://" in ref:
            raise ConfigError(f"run folder {ref!r}: give a local folder or an s3:// URL")
        local = Path(ref).expanduser().resolve()
        try:
            local.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file on the way ("Not a directory"), a folder this user cannot write
            raise ConfigError(f"run folder {local} cannot be made ({err.strerror}: {err.filename}); give --out (the "
                              "flow's out_dir) a folder this user can write") from None  # fmt: skip
        if not os.access(local, os.W_OK | os.X_OK):  # there, but the first write in it would fail
            raise ConfigError(f"run folder {local}: this user cannot write in it; give --out (the flow's out_dir) a "
                              "folder this user can write")  # fmt: skip
        return cls(str(local), local)

    @property
    def keyed_as(self) -> str:
        """The run's name in its stages' cache keys: an s3:// run's URL, a local run's `run_identity`."""
        return self.ref if self.remote is not None else run_identity(self.local)

    def name_run(self) -> None:
        """Record a local run's name (`run_identity`) before its first stage runs, so that it keeps it when the
        folder moves. A folder made before runs recorded one is named by its path now: its keys stay the same."""
        if self.remote is None and not (self.local / RUN_NAME).exists():
            atomic_write_json(self.local / RUN_NAME, {"name": str(self.local)})

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
        holder = holder_info(run=self.ref, **about)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(held(self.local / LOCK, holder, wait=wait))
            except Busy as err:
                raise ConfigError(f"run folder {self.ref} is in use by another run "
                                  f"({describe_holder(err.holder)}); {advice}") from None  # fmt: skip
            if self.remote is not None:
                self._hold_across_workers(stack, advice, wait, holder)
            yield

    def _hold_across_workers(self, stack: contextlib.ExitStack, advice: str, wait: bool, holder: dict) -> None:
        """An s3:// run is shared through the bucket, so workers on other hosts are not excluded by this host's
        lock file: the run also holds its lease in the bucket (`BucketLease`), which every host that can run in it
        can reach, with or without a shared Prefect server."""
        from edgar_tune.config import ConfigError

        lease = BucketLease(self._fs(), self.remote, holder)
        try:
            stack.enter_context(lease.held(wait=wait))
        except Busy as err:
            raise ConfigError(f"run {self.ref} is in use by a run on another host ({describe_holder(err.holder)}; its "
                              f"lease {lease.url} was renewed {err.holder['renewed_s_ago']:.0f} s ago, and frees "
                              f"{lease.lease_s:.0f} s after a renewal that does not come, as when its holder was "
                              f"killed); {advice}") from None  # fmt: skip
        self._lease = lease
        stack.callback(setattr, self, "_lease", None)

    # -- Prefect results ---------------------------------------------------------------------------------------
    def result_storage(self) -> dict:
        """`with_options` for the stage tasks: Prefect's results kept with the run, so that whichever Prefect home
        runs it next (another shell, `make` against a plain `edgar-tune`, a worker) finds its finished stages
        `Cached`: in `RUN/.stages/results/` for a local run, beside an s3:// run in its bucket. In Prefect's default
        storage (`$PREFECT_HOME/storage`) only the home that ran a stage found its result, and every other one ran
        the stage again, training included, over outputs the folder already held."""
        if self._results is None and self.remote is None:
            self._results = (self.local / ".stages" / "results").resolve()  # a path: Prefect's LocalFileSystem
        elif self._results is None:
            from prefect.filesystems import RemoteFileSystem

            basepath = f"{self.remote.rsplit('/', 1)[0]}/{RESULTS}"
            self._results = RemoteFileSystem(basepath=basepath)
            block = f"edgar-tune-results-{hashlib.sha256(basepath.encode()).hexdigest()[:12]}"
            self._results.save(block, overwrite=True)
        return {"result_storage": self._results}

    # -- sync ---------------------------------------------------------------------------------------------------
    def _fs(self):
        return s3_fs()

    def push(self, names: list[str]) -> None:
        """Publish these files or folders of the working copy to the bucket (no-op for a local run)."""
        if self.remote is None:
            return
        if self._lease is not None:
            self._lease.check()
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


class BucketLease:
    """One run at a time in an s3:// run, among all the hosts that reach its bucket: the object `URL/.lease.json`,
    made only where it is not (a conditional PUT, `If-None-Match: *`), renewed by a thread every fifth of its
    `lease_s` while the run works (`If-Match` its last ETag), and deleted when the run ends. A lease not renewed
    for `lease_s` (300 s; EDGAR_TUNE_S3_LEASE_S), as when its holder was SIGKILLed, is taken over by the next run,
    which logs whose it was; ages are read on the store's clock (its Last-Modified and Date), so the hosts' clocks
    do not matter. A holder whose lease was taken over (it stalled past `lease_s`) stops before its next upload
    (`check`). A store that ignores conditional writes is found out at the first lease, and warned about: there,
    the lease excludes no other host. One that refuses them (501 NotImplemented, as some S3-compatible stores answer)
    is warned about the same way, and the run goes on without a lease there."""

    def __init__(self, fs, url: str, holder: dict) -> None:
        self.fs, self.url, self.holder = fs, f"{url}/{LEASE}", holder
        self.bucket, self.key, _ = fs.split_path(self.url)
        self.lease_s = _lease_s()
        self.token, self.etag, self.renewals = uuid.uuid4().hex, "", 0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._began: float | None = None  # when this run first asked for it
        self._seen: tuple[str, float] | None = None  # (ETag, first seen) of a held lease, for a store without Date
        self.refused: str | None = None  # why the store takes no lease: it refuses conditional writes
        self.no_if_match = False  # the store refuses If-Match: the ETag is read before each PUT instead

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "token": self.token, "renewals": self.renewals}).encode()

    def _put(self, **condition: str) -> str:
        return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)["ETag"]

    def _put_if_match(self, etag: str) -> str:
        """PUT the lease if its ETag is still `etag`: with If-Match, or, on a store that takes If-None-Match but
        refuses If-Match (501 NotImplemented: AWS S3 added the two a quarter apart, and S3-compatible stores follow
        it), by reading the ETag just before an unconditional PUT. A renewal cannot race a take-over that way (a
        lease changes hands only once it went `lease_s` unrenewed); two take-overs of one stale lease can, so a
        take-over there reads the lease back before it counts (`_took_over`).

        Raises:
            FileNotFoundError: the ETag is not `etag` (or there is no lease): a lost race, as a 412 is.
        """
        if not self.no_if_match:
            try:
                return self._put(IfMatch=etag)
            except OSError as err:
                if _s3_code(err) != "NotImplemented":
                    raise
                self.no_if_match = True
                log.warning("the S3 store of %s refuses If-Match (%s): its lease is renewed and taken over by reading "
                            "its ETag before each PUT, and a take-over reads it back %.1f s later, so two runs taking "
                            "over one stale lease at once both start only if their requests are that far apart (AWS "
                            "S3, MinIO and R2 honour If-Match)", self.url, err.__cause__ or err,
                            self._settle_s())  # fmt: skip
        head = self._head()
        if head is None or head[0] != etag:
            raise FileNotFoundError(f"{self.url} is no longer the lease this run knew ({etag})")
        return self._put()

    @contextlib.contextmanager
    def held(self, wait: bool) -> Iterator[None]:
        """Hold the lease for the block. `wait`: wait for the run that holds it to end, logging who every minute.

        Raises:
            Busy: another run holds it and `wait` is False (its `holder` says who, and `renewed_s_ago`).
        """
        logged = None
        while not self._take():
            holder = self._holder()
            if holder is None:
                continue  # let go of between the two requests
            if not wait:
                raise Busy(Path(self.url), holder)
            if time.monotonic() - (logged or -60) >= 60:
                log.info("waiting for %s, held by a run on another host (%s)", self.url.rsplit("/", 1)[0],
                         describe_holder(holder))  # fmt: skip
                logged = time.monotonic()
            if time.monotonic() - (self._began or time.monotonic()) > WAIT_S:
                raise TimeoutError(f"waited {WAIT_S / 86400:.0f} days for {self.url}")
            time.sleep(min(5.0, self.lease_s / 5))
        if self.refused:  # nothing to renew or let go of
            yield
            return
        renewer = threading.Thread(target=self._renew, name="s3-lease", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            self._stop.set()
            renewer.join()
            self._let_go()

    def _take(self) -> bool:
        """Make the lease, or take over one that has not been renewed for `lease_s`; False if it is held."""
        self._began = self._began or time.monotonic()
        try:
            self.etag = self._put(IfNoneMatch="*")
        except FileExistsError:  # 412 on If-None-Match
            return self._take_over()
        except OSError as err:
            if _lost_race(err):  # 409 ConditionalRequestConflict: another PUT of it raced this one
                return False
            if _s3_code(err) != "NotImplemented":
                raise
            self.refused = str(err.__cause__ or err)
            log.warning("the S3 store of %s refuses conditional writes (If-None-Match: %s): this run holds no lease "
                        "there, so nothing keeps a run on another host out of it; give each host's runs their own "
                        "s3:// URLs there (AWS S3, MinIO and R2 honour them)", self.url, self.refused)  # fmt: skip
            return True
        self._probe()
        return True

    def _probe(self) -> None:
        """A second `If-None-Match: *` PUT must be refused now that the lease is there: a store that takes it
        ignores conditional writes, and two hosts could hold one run there."""
        try:
            self.etag = self._put(IfNoneMatch="*")
        except OSError:  # 412 (or 409, a PUT racing it): refused, as it must be
            return
        log.warning("the S3 store of %s ignores conditional writes (If-None-Match): its lease excludes no run on "
                    "another host, so give each host's runs their own s3:// URLs there (AWS S3, MinIO and R2 "
                    "honour them)", self.url)  # fmt: skip

    def _take_over(self) -> bool:
        head = self._head()
        if head is None:
            return False  # let go of since: the next PUT makes it
        etag, age = head
        if age < self.lease_s:
            return False
        old = self._holder() or {}
        try:
            self.etag = self._put_if_match(etag)
        except OSError as err:
            if _lost_race(err):  # another run took it over first, or it was let go of
                return False
            raise
        if self.no_if_match and not self._took_over():
            return False
        log.warning("took over the lease of %s from a run that stopped renewing it %.0f s ago (%s): it ended without "
                    "letting go, as a killed run does", self.url.rsplit("/", 1)[0], age,
                    describe_holder(old) if old else "holder unknown")  # fmt: skip
        return True

    def _settle_s(self) -> float:
        return min(TAKE_OVER_SETTLE_S, self.lease_s / 4)

    def _took_over(self) -> bool:
        """After a take-over by an unconditional PUT: whether the lease is still this run's a moment later. Two runs
        that found one stale lease at once both PUT it; the later PUT is the lease, and the other run, reading it
        back, waits (as for a held lease) instead of starting beside it."""
        time.sleep(self._settle_s())
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
            return True
        log.info("another run took over the lease of %s at the same time, and holds it", self.url.rsplit("/", 1)[0])
        return False

    def _head(self) -> tuple[str, float] | None:
        """The lease's ETag and its age in seconds, on the store's clock; None if there is none."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date:
            return head["ETag"], (parsedate_to_datetime(date) - head["LastModified"]).total_seconds()
        if self._seen is None or self._seen[0] != head["ETag"]:  # no Date header: time since it last changed, here
            self._seen = (head["ETag"], time.monotonic())
        return head["ETag"], time.monotonic() - self._seen[1]

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.fs.cat_file(self.url))
        except FileNotFoundError:
            return None
        head = self._head()
        holder["renewed_s_ago"] = head[1] if head else 0.0
        return holder

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 5):
            self.renewals += 1
            try:
                self.etag = self._put_if_match(self.etag)
            except Exception as err:  # noqa: BLE001 (the store unreachable for a while: the lease lasts lease_s)
                if isinstance(err, OSError) and _lost_race(err):
                    holder = self._holder()
                    self.lost = (f"the lease of {self.url} was taken over by another run "
                                 f"({describe_holder(holder) if holder else 'now let go of'}) after this one did "
                                 f"not renew it for {self.lease_s:.0f} s")  # fmt: skip
                    log.error("%s: this run stops before its next upload", self.lost)
                    return
                log.warning("could not renew the lease of %s (%s); trying again in %.0f s", self.url, err,
                            self.lease_s / 5)  # fmt: skip

    def check(self) -> None:
        """Raise if the lease was taken over: another run works in the run now, and this one must not write."""
        if self.lost:
            raise RuntimeError(f"{self.lost}; this run stopped so that two runs do not write one run")

    def _let_go(self) -> None:
        if self.lost:
            return
        try:
            head = self._head()
            if head is not None and head[0] == self.etag:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        except OSError as err:
            log.warning("could not delete the lease %s (%s): the next run takes it over %.0f s after its last "
                        "renewal", self.url, err, self.lease_s)  # fmt: skip


def _lease_s() -> float:
    """EDGAR_TUNE_S3_LEASE_S, or 300 s."""
    from edgar_tune.config import ConfigError

    value = os.environ.get(LEASE_S) or "300"
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ConfigError(f"{LEASE_S}={value!r}: give the seconds an s3:// run's lease outlives its last renewal "
                          "(300 by default; it is renewed every fifth of that)")  # fmt: skip
    return seconds


def _lost_race(err: OSError) -> bool:
    """Whether a conditional PUT of a lease failed on its condition (another run changed or removed it first)."""
    return isinstance(err, FileNotFoundError) or _s3_code(err) in ("PreconditionFailed", "ConditionalRequestConflict")


def _s3_code(err: BaseException) -> str | None:
    """The S3 error code behind an error s3fs translated (`PreconditionFailed`, ...)."""
    cause = err.__cause__
    return getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
