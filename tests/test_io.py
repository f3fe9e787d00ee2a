"""tasks/io.py: atomic writes publish with the permissions the umask gives, as a plain `open` or `mkdir` would,
whatever the library that wrote a file inside a stage folder chose."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from tasks.io import Busy, atomic_dir, atomic_write_json, held, holder_info, read_json, umask
from tests.conftest import run_held


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_atomic_writes_get_the_umasks_permissions(tmp_path, mask):
    """A run folder is read by others (a teammate, an MLflow server, a worker under another user): a published file
    or stage folder gets 0666 or 0777 less the umask, not mkstemp's 0600, mkdtemp's 0700 or safetensors' 0600."""
    old = os.umask(mask)
    try:
        assert umask() == mask
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        atomic_write_json(tmp_path / "a.json", {"a": 2})  # a rewrite too
        with atomic_dir(tmp_path / "stage") as tmp:
            (tmp / "adapter").mkdir()
            save_file({"w": torch.zeros(2)}, tmp / "adapter" / "adapter_model.safetensors")  # 0600 in 0.8
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    stage = tmp_path / "stage"
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [stage, *stage.rglob("*")]}
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert modes == {"stage": 0o777 & ~mask, "stage/adapter": 0o777 & ~mask, "stage/run.sh": 0o777 & ~mask,
                     "stage/adapter/adapter_model.safetensors": 0o666 & ~mask}  # fmt: skip


def test_a_held_folder_names_its_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    """A second taker is refused at once with what the holder wrote (its flow run, pid, host, since); the kernel
    drops the lock of a holder killed by SIGKILL (the OOM killer's way), so no stale lock stops the next run."""
    lock = tmp_path / ".lock"  # where RunFolder.lock holds a run folder
    with run_held(str(tmp_path), "first") as holder:
        with pytest.raises(Busy) as err, held(lock, holder_info()):
            pass
        assert (err.value.holder["pid"], err.value.holder["flow_run"]) == (holder.pid, "first")
        assert f"flow run 'first', pid {holder.pid} on " in str(err.value)
        holder.kill()
        holder.wait(timeout=30)
        with held(lock, holder_info(flow_run="second")):
            assert '"flow_run": "second"' in lock.read_text()


def test_a_waiting_taker_gets_the_lock_when_its_holder_lets_go(tmp_path):
    with run_held(str(tmp_path), "first") as holder:
        threading.Timer(1.0, holder.stdin.close).start()
        start = time.monotonic()
        with held(tmp_path / ".lock", holder_info(), wait=True):
            assert time.monotonic() - start >= 0.9


def test_a_server_is_not_answering_only_when_nothing_takes_the_connection():
    """Nothing listening: said (the CLI refuses at once rather than wait out MLflow's retries). A server that takes
    the connection and is slow to answer counts as answering: a busy server is not refused for it."""
    import socket

    from tasks.io import not_answering
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    assert not_answering(dead, "the server") == f"the server at {dead} does not answer (ConnectionError)"
    with socket.socket() as slow:  # takes connections (the backlog), never answers them
        slow.bind(("127.0.0.1", 0))
        slow.listen(4)
        assert not_answering(f"http://127.0.0.1:{slow.getsockname()[1]}", "the server", timeout=0.5) is None
    assert not_answering("sqlite:///runs/mlflow.db", "the store") is None  # not a server: not asked


def test_a_json_file_edited_or_damaged_since_is_named_with_what_to_do(tmp_path):
    """A stage's stats.json or stamp that no longer parses (edited by hand, a damaged disk) ended `edgar-tune stage`
    or a rerun in JSONDecodeError's traceback; it is a ConfigError (a ValueError, as callers that forgive a damaged
    memo catch) naming the file."""
    from edgar_tune.config import ConfigError

    path = tmp_path / "stats.json"
    atomic_write_json(path, {"blocks": 3})
    assert read_json(path) == {"blocks": 3}
    path.write_text('{"blocks": 3,')
    with pytest.raises(ConfigError) as err:
        read_json(path)
    assert str(err.value) == (f"{path} is not whole JSON (Expecting property name enclosed in double quotes: line 1, "
                              "column 14); edgar-tune writes it whole, so it was edited or damaged since: put it back, "
                              "or remove it and run again the stage that makes it")  # fmt: skip
