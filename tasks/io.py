"""Atomic file and folder writes, reading of plain or gzip-compressed files, and locks between processes.

Every stage publishes its outputs through these helpers, so a process killed mid-write leaves either the old
artifact or none, never a truncated one. What several runs share (a run folder, the EDGAR cache, a sqlite MLflow
store, the converted SmolLM2) has one writer at a time through `held`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

# The run folder's layout: one subfolder per stage, each published atomically by its stage.
DOWNLOAD, PARSE, TOKENIZE, TRAIN, EVALUATE, REGISTER = (
    "01_download", "02_parse", "03_tokenize", "04_train", "05_evaluate", "06_register",
)  # fmt: skip


def read_json(path: Path) -> Any:
    """A JSON file this project wrote (whole, `atomic_write_json`). One that does not parse was edited or damaged
    since: a ConfigError (a ValueError) names it and what to do, where JSON's error was a traceback."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        from edgar_tune.config import ConfigError

        where = f"{err.msg.removesuffix(' at')}: line {err.lineno}, column {err.colno}"
        raise ConfigError(f"{path} is not whole JSON ({where}); edgar-tune writes it whole, so it was edited or "
                          "damaged since: put it back, or remove it and run again the stage that makes it") from None


def megabytes(*paths: Path) -> float:
    """The size of files and folders (all the files under them), in MB."""
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def out_of_space(err: BaseException | None) -> BaseException | None:
    """The exception in `err`'s chain that says a write found no room, if one does: ENOSPC or EDQUOT, or a library's
    text of them (safetensors' Rust I/O error: `No space left on device (os error 28)`; SQLite's `database or disk
    is full`, under MLflow's store)."""
    import errno

    from edgar_tune.signals import exception_chain

    chain = exception_chain(err)
    found = [e for e in chain if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)]  # with its file
    return (found or [e for e in chain if any(text in str(e) for text in FULL_TEXTS)] or [None])[0]


def disk_full_message(err: BaseException, where: Path) -> str | None:
    """What to say of a stage that stopped on a full disk (`out_of_space`), else None: the disk (the one the failed
    write went to, else `where`'s), its free space, and that the stages done stay done (each publishes its run folder
    whole, so the one that failed left none half-written). Before, the CLI printed tracebacks ending in `OSError:
    [Errno 28] No space left on device` (a registration: 600 lines of MLflow's, ending in SQLite's `database or disk
    is full`), and so did the flow run's state in the Prefect UI."""
    if (full := out_of_space(err)) is None:
        return None
    place = Path(getattr(full, "filename2", None) or getattr(full, "filename", None) or where).resolve()
    while not place.exists() and place != place.parent:
        place = place.parent
    usage = shutil.disk_usage(place)
    return (f"no space left on the disk holding {place}: {size(usage.free)} free of {size(usage.total)}. Free space "
            "there and run it again: the stages already done are kept and not redone (each stage publishes its run "
            "folder whole, so the one that failed left none half-written)")  # fmt: skip


def cache_dir() -> Path:
    """Where converted models and EDGAR downloads are kept across runs ($EDGAR_TUNE_CACHE)."""
    return Path(os.environ.get("EDGAR_TUNE_CACHE", Path.home() / ".cache" / "edgar-tune"))


def holdings(filings: list[dict]) -> str:
    """`AMZN FY2020, FY2021; MSFT FY2012-FY2019`: the companies (tickers) and fiscal years of `filings`."""
    years: dict[str, set[int]] = {}
    for f in filings:
        years.setdefault(f["ticker"], set()).add(f["fiscal_year"])
    return "; ".join(f"{t} {fiscal_years(ys)}" for t, ys in sorted(years.items()))


def fiscal_years(years: Iterable[int]) -> str:
    """`FY2009, FY2012-FY2015`: years in order, three or more in a row as a range."""
    runs: list[list[int]] = []
    for y in sorted(set(years)):
        if runs and y == runs[-1][-1] + 1:
            runs[-1].append(y)
        else:
            runs.append([y])
    return ", ".join(f"FY{r[0]}-FY{r[-1]}" if len(r) > 2 else ", ".join(f"FY{y}" for y in r) for r in runs)


def joined(names: list[str], word: str = "and") -> str:
    """`a`, `a and b`, `a, b and c` (or `word` for "and")."""
    return ", ".join(names[:-1]) + f" {word} " * (len(names) > 1) + names[-1]


def read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing a `.gz` one."""
    data = Path(path).read_bytes()
    return gzip.decompress(data) if str(path).endswith(".gz") else data


def answers(uri: str, timeout: float = 10.0) -> None:
    """Raise (a requests.RequestException) at once if an HTTP server does not answer at all: MLflow's client
    retries a refused connection with backoff for about four minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES), Prefect's
    ends in a traceback. Any HTTP answer will do (a proxy's 401 too); the calls that follow say what is wrong with
    it. A URI that is not http(s) is not asked."""
    if uri.startswith(("http://", "https://")):
        import requests

        requests.head(uri, timeout=timeout, allow_redirects=False)


def not_answering(uri: str, what: str, timeout: float = 5.0) -> str | None:
    """`{what} at {uri} does not answer (ConnectionError)` where nothing answers there (`answers`, `timeout` s to
    connect), else None. A server that connects but is slow to answer (ReadTimeout) counts as answering: a busy
    server is not refused for it."""
    import requests

    try:
        answers(uri, timeout=timeout)
    except requests.ConnectionError as err:  # refused, no such host, TLS, or no connection within the timeout
        return f"{what} at {uri} does not answer ({type(err).__name__})"
    except requests.Timeout:
        return None
    return None


def open_bytes(path: Path) -> IO[bytes]:
    """Open a file to read part of it, as `read_bytes` reads it: a `.gz` one decompressed."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes as stored on disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def umask() -> int:
    """This process's umask, read without changing it (Linux's /proc), else by setting it and putting it back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_LITTER_NAMES = {"Thumbs.db", "desktop.ini"}  # Windows Explorer's


def litter(relative: Path) -> bool:
    """Whether a file (its path in a stage folder or a data folder) is one that programs leave in a folder someone
    looks at, neither an output nor data: hidden files and folders (macOS Finder's `.DS_Store`, the `._NAME` files
    a Mac writes beside each file on a disk of another kind, Jupyter's `.ipynb_checkpoints/`, editors' swap and lock
    files) and Windows' `Thumbs.db` and `desktop.ini`. No stage writes one for another to read (a whole run is
    checked for it in tests/test_pipeline_e2e.py)."""
    return relative.name in _LITTER_NAMES or any(part.startswith(".") for part in relative.parts)


def atomic_write_bytes(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write `data` (bytes, or chunks of them) to a temp sibling, fsync it, then rename it over `path`. The file
    gets the permissions the umask gives a new file (mkstemp's own are 0600: nobody else could read a run folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, bytes | bytearray) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temps(path: Path) -> None:
    """Delete the temp siblings `atomic_write_bytes` leaves when its process is killed mid-write."""
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def umask_modes(root: Path) -> None:
    """Give a folder and everything in it the permissions the umask gives new folders and files (executables keep
    their x bits), as if plain `mkdir` and `open` had made them. mkdtemp makes 0700, and safetensors 0.8 writes every
    weights file 0600 (safetensors/safetensors#782): another user, a container or a serving process could not read
    a stage's adapter."""
    mask = umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                executable = os.lstat(file).st_mode & 0o111
                os.chmod(file, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp sibling folder; on success it replaces `path` whole, on error it is removed.

    The old folder is renamed aside before the new one moves in and deleted afterwards, so at every instant
    `path` is either the complete old folder or the complete new one. Everything in it is published with the
    permissions the umask gives (`umask_modes`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer (one writer per stage folder)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        umask_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Busy(OSError):
    """Another process holds the lock at `path`; `holder` is what it wrote about itself when it took it."""

    def __init__(self, path: Path, holder: dict):
        super().__init__(f"{path} is held by {describe_holder(holder)}")
        self.path, self.holder = path, holder


def describe_holder(holder: dict) -> str:
    run = f"flow run {holder['flow_run']!r}, " if holder.get("flow_run") else ""
    return f"{run}pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


def holder_info(**extra: Any) -> dict:
    """Who takes a lock: this process, this host, now, and its command line (the file a later taker reads)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = " ".join(sys.argv)[:300]
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "command": command} | extra


def _holder(path: Path) -> dict:
    """What the holder of the lock at `path` wrote about itself (nothing if it is writing it this instant)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def held(path: Path, holder: dict, wait: bool = False, log_every: float = 60.0, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made if missing) for the `with` block; `shared`: a lock that
    other shared holders hold at once, and that excludes an exclusive one.

    It excludes other processes on this host, and on other hosts where the file system's flock works (NFSv4,
    Lustre, local disks). The kernel drops the lock when its process ends however it ends (the OOM killer's
    SIGKILL too), so a killed holder never leaves it stale. The holder writes `holder` into the file for whoever
    finds it taken (of several shared holders, the last to come). `wait=False` raises `Busy` at once; `wait=True`
    waits, logging who holds it every `log_every` s.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as every file this project writes
    try:
        logged = None
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # taken
                if not wait:
                    raise Busy(path, _holder(path)) from None
                if logged is None or time.monotonic() - logged >= log_every:
                    log.info("waiting for %s, held by %s", path, describe_holder(_holder(path)))
                    logged = time.monotonic()
                time.sleep(0.2)
            except OSError as err:  # ENOLCK, EOPNOTSUPP: NFS without its lock daemon, some FUSE mounts
                raise OSError(err.errno, f"cannot lock {path} ({err.strerror}): keep run folders, the EDGAR cache "
                              "and sqlite stores on a file system with file locks (a local disk, NFSv4)") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock
