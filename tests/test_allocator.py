"""train.cpu_allocator: which C allocator a training process runs with (tasks/allocator.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from edgar_tune.config import ConfigError
from tasks import allocator

REPO = Path(__file__).resolve().parent.parent
TCMALLOC = allocator.find("tcmalloc")


def test_auto_is_the_systems_malloc_on_gpus_and_system_is_never_preloaded():
    assert allocator.resolve("auto", on_gpu=True) == ("system", None)
    assert allocator.resolve("system", on_gpu=False) == ("system", None)
    assert allocator.preload_env("system", None) == ({"LD_PRELOAD": ""} if "LD_PRELOAD" in os.environ else {})


@pytest.mark.skipif(TCMALLOC is not None, reason="tcmalloc is installed here: nothing to refuse")
def test_an_allocator_that_is_not_installed_is_refused_with_the_command_that_installs_it(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with pytest.raises(ConfigError) as err:
        allocator.resolve("tcmalloc", on_gpu=False)
    message = str(err.value)
    assert "train.cpu_allocator=tcmalloc: no libtcmalloc_minimal.so found" in message
    assert "apt install libtcmalloc-minimal4" in message and "train.cpu_allocator=auto" in message
    if allocator.find("jemalloc") is None:  # and auto runs the system's malloc rather than failing
        assert allocator.resolve("auto", on_gpu=False) == ("system", None)


def test_the_allocator_is_found_on_ld_library_path_first(tmp_path, monkeypatch):
    """LD_LIBRARY_PATH (a user's own build, a conda environment's lib/) comes before the system's folders, tcmalloc's
    minimal library before the full one, and LD_PRELOAD keeps what it held."""
    for name in ("libjemalloc.so.2", "libtcmalloc.so.4", "libtcmalloc_minimal.so.4"):
        (tmp_path / name).write_bytes(b"")  # only found here, never loaded
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    assert allocator.find("jemalloc") == str(tmp_path / "libjemalloc.so.2")
    assert allocator.resolve("tcmalloc", on_gpu=False) == ("tcmalloc", str(tmp_path / "libtcmalloc_minimal.so.4"))
    assert allocator.resolve("auto", on_gpu=False)[0] == "tcmalloc"
    env = allocator.preload_env("tcmalloc", str(tmp_path / "libtcmalloc_minimal.so.4"))
    assert env == {"LD_PRELOAD": f"{tmp_path / 'libtcmalloc_minimal.so.4'} /opt/other.so"}


def test_an_allocator_the_user_preloaded_is_the_one_auto_takes_and_system_takes_it_out(monkeypatch):
    """LD_PRELOAD with jemalloc already (a user's own setup): auto trains with it, tcmalloc would preload tcmalloc
    without it, and `system` runs the training process with neither, so nothing runs under another's name."""
    monkeypatch.setenv("LD_PRELOAD", "/opt/libjemalloc.so.2:/opt/other.so")
    assert allocator.resolve("auto", on_gpu=False) == ("jemalloc", None)
    assert allocator.preload_env("jemalloc", None) == {"LD_PRELOAD": "/opt/libjemalloc.so.2 /opt/other.so"}
    assert allocator.preload_env("tcmalloc", "/usr/lib/libtcmalloc_minimal.so.4") == {
        "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4 /opt/other.so"}
    assert allocator.preload_env("system", None) == {"LD_PRELOAD": "/opt/other.so"}


def test_a_training_process_without_the_allocator_it_was_given_refuses_to_train():
    """This test process runs with the system's malloc: asked for tcmalloc, `check` raises instead of training
    without it under its name."""
    running = allocator.in_this_process()
    if running in allocator.LIBRARIES:
        pytest.skip(f"this process runs with {running} (preloaded)")
    assert running.startswith("system") and (platform.libc_ver()[0] != "glibc" or "glibc" in running)
    with pytest.raises(RuntimeError, match="train.cpu_allocator=tcmalloc but the training process runs with system"):
        allocator.check("tcmalloc")
    assert allocator.check("system") == running and allocator.check("auto") == running


@pytest.mark.skipif(TCMALLOC is None, reason="needs tcmalloc installed (apt install libtcmalloc-minimal4)")
def test_a_preloaded_allocator_runs_in_the_child_process():
    env = dict(os.environ, PYTHONPATH=str(REPO), **allocator.preload_env("tcmalloc", TCMALLOC))
    out = subprocess.run([sys.executable, "-c", "from tasks import allocator; print(allocator.check('tcmalloc'))"],
                         env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.strip() == "tcmalloc"


def test_an_oom_killed_training_is_told_what_frees_ram_on_its_device(tmp_path):
    """The OOM killer guards the host's RAM. On the CPU that is the whole training: the message says to recompute
    (when not every layer is), to preload tcmalloc (when the system's malloc ran) and to shrink the micro-batch or
    blocks, with the plan's estimate; it told CPU runs to use a ZeRO offload engine, whose states live in the same
    RAM. On a GPU machine it names what each process keeps on the host."""
    import signal

    import torch

    from edgar_tune.config import TrainConfig
    from tasks.finetune import crash_message

    def message(**settings) -> str:
        cfg = TrainConfig(**{"gradient_checkpointing": False, "cpu_allocator": "system"} | settings)
        return crash_message(-signal.SIGKILL, tmp_path / "none", cfg, {"estimate_gb": 9.46}, ["step 1"])

    first = message().splitlines()[0]
    assert "killed by SIGKILL (signal 9) - on Linux usually the out-of-memory killer" in first
    assert "this run's memory plan estimated 9.46 GB per device" in first
    assert "No checkpoint was complete" in message()
    if torch.cuda.is_available():
        assert "the host's RAM" in first and "train.nproc" in first
        return
    assert "zero3-offload" not in first and "offload engine" not in first
    assert first.endswith("; set train.gradient_checkpointing=true, set train.cpu_allocator=tcmalloc ("
                          f"{allocator.INSTALL['tcmalloc']}, where it is not installed), or lower "
                          "train.per_device_train_batch_size or tokenize.max_input_length. No checkpoint was complete "
                          "(train.save_steps=-1: every 20 steps, and one when stopped), so the next run starts over."
                          ), first  # fmt: skip
    half = message(gradient_checkpointing=True, checkpoint_layers=0.5).splitlines()[0]
    assert "set train.gradient_checkpointing=true with train.checkpoint_layers=1.0, set train.cpu_allocator=tcmalloc" \
        in half
    done = message(gradient_checkpointing=True, cpu_allocator="tcmalloc").splitlines()[0]
    assert "gradient_checkpointing" not in done and "tcmalloc" not in done
    assert "estimated 9.46 GB per device; lower train.per_device_train_batch_size or tokenize.max_input_length" in done
