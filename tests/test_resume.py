"""Checkpoints and resume: a training process is SIGKILLed, rerun, and must continue the same trajectory.

The train stage runs as `edgar-tune stage train` in a subprocess on a copy of the tiny run's tokenized data.
The kill is a real SIGKILL once checkpoint-40 is complete; the rerun must skip an incomplete checkpoint, resume
from step 40 and log the same loss at every step as an uninterrupted run (same step, LR, RNG, data order).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.checkpoints import (MARKER, VALIDATION_SET, checkpoint_step, complete_checkpoints, latest_checkpoint,
                               publish_checkpoint)  # fmt: skip
from tasks.cache import STAGES
from tasks.io import megabytes

REPO = Path(__file__).resolve().parent.parent
# profile_step=0: the tiny run's config (tests/conftest.py) profiles step 30, past a 20-step run's end
SETTINGS = ["max_steps=100", "lora_dropout=0.1", "max_val_samples=16", "eval_steps=20", "keep_checkpoints=true",
            "profile_step=0"]  # fmt: skip


def _run_copy(tiny_run, dest: Path) -> Path:
    runs, _ = tiny_run
    dest.mkdir(parents=True)
    shutil.copy(runs / "latest" / "config.yaml", dest / "config.yaml")
    shutil.copytree(runs / "latest" / "03_tokenize", dest / "03_tokenize")
    return dest


def _stage_cmd(run: Path, extra: list[str]) -> list[str]:
    sets = [a for s in SETTINGS + extra for a in ("--set", s)]
    return [sys.executable, "-m", "edgar_tune.cli", "stage", "train", "--run", str(run), *sets]


def _train(run: Path, extra: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(_stage_cmd(run, extra), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "04_train" / "loss.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["learning_rate"]) for r in rows]


# Both slow (make test-slow): `make test` keeps to 20 minutes; its Prefect crash + Retry test resumes from a
# checkpoint after a real SIGKILL, these check the loss at every step too.
@pytest.mark.slow
@pytest.mark.parametrize("engine,on_resume", [([], []), (["deepspeed=zero2"], []),
                                              (["early_stopping_patience=0", "load_best_model_at_end=false"],
                                               ["eval_blocks=2"])],
                         ids=["lora", "lora-zero2", "lora-fewer-validation-blocks"])  # fmt: skip
def test_sigkilled_training_resumes_on_the_same_trajectory(tiny_run, tmp_path, engine, on_resume):
    """`on_resume`: settings the rerun changes (what the validations score, while their loss steers nothing)."""
    reference = _run_copy(tiny_run, tmp_path / "reference")
    _train(reference, engine)

    run = _run_copy(tiny_run, tmp_path / "killed")
    ckpts = run / "04_train.checkpoints"
    proc = subprocess.Popen(_stage_cmd(run, engine), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (ckpts / "checkpoint-40" / MARKER).exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "04_train").exists(), "a killed stage must not publish"
    # What a kill between the rename and the marker leaves: a checkpoint folder without its marker.
    shutil.rmtree(ckpts / "checkpoint-60", ignore_errors=True)
    shutil.copytree(ckpts / "checkpoint-40", ckpts / "checkpoint-60")
    (ckpts / "checkpoint-60" / MARKER).unlink()

    resumed = _train(run, engine + on_resume)
    log = resumed.stdout + resumed.stderr
    assert re.search(r"removing \S+/checkpoint-60 \([\d.]+ MB\): no COMPLETE marker", log), log[-3000:]
    assert not (ckpts / "checkpoint-60").exists() or (ckpts / "checkpoint-60" / MARKER).exists()  # the rerun's own
    stats = json.loads((run / "04_train" / "stats.json").read_text())
    assert stats["resumed_from_step"] == 40 and stats["steps"] == 100
    if "deepspeed=zero2" in engine:
        assert (stats["engine"], stats["zero_stage"]) == ("deepspeed", 2)
    ours, theirs = _losses(run), _losses(reference)
    assert [s for s, _, _ in ours] == [s for s, _, _ in theirs] == list(range(1, 101))
    for (step, loss, lr), (_, ref_loss, ref_lr) in zip(ours, theirs, strict=True):
        assert lr == pytest.approx(ref_lr, rel=1e-9), step
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), step
    assert not list(run.glob(".*.tmp")), "the killed writer's temp folder was not cleaned up"


@pytest.mark.slow  # about a minute: make test-slow
def test_resuming_under_other_settings_is_refused_and_a_fresh_start_keeps_them_aside(tiny_run, tmp_path):
    run = _run_copy(tiny_run, tmp_path / "run")
    ckpts = run / "04_train.checkpoints"
    _train(run, ["max_steps=20"])  # keep_checkpoints: leaves checkpoint-20 as an interrupted run would
    assert (ckpts / "checkpoint-20" / MARKER).exists()
    proc = subprocess.run(_stage_cmd(run, ["max_steps=20", "learning_rate=0.001"]), cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2
    assert "train.learning_rate: 0.003 -> 0.001" in proc.stderr and "train.resume=false" in proc.stderr
    _train(run, ["max_steps=20", "learning_rate=0.001", "resume=false"])
    aside = list(tmp_path.joinpath("run").glob("04_train.checkpoints.old-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint-20" / MARKER).exists()
    assert json.loads((run / "04_train" / "stats.json").read_text())["resumed_from_step"] is None


@pytest.mark.parametrize("when", ["after a step", pytest.param("during a validation", marks=pytest.mark.slow)])
def test_a_sigterm_stops_training_at_the_step_it_is_in_with_a_checkpoint_the_rerun_resumes_from(tiny_run, tmp_path,
                                                                                                when):  # fmt: skip
    """SIGTERM to a run whose training process works (a cancel in the Prefect UI, `kill`, `timeout`): before, the
    stage waited for the training process, which trained on to its last step, and then threw its work away. Now
    the stage asks it to stop (SIGTERM), and it stops at the end of the step it is in, with a checkpoint of that
    step (not one of train.save_steps'), the latest, which the rerun resumes from. In a 100-step run:
    - after a step: the kill comes once checkpoint-20 is complete (save_steps 20), to every process of the stage's
      tree at once, as systemd stops a unit (KillMode=control-group);
    - during a validation: the kill comes as step 20's validation starts (one window a batch, about 400 of them:
      seconds here, minutes on a 7B). Before, the validation ran to its end, checkpoint-20 was saved, then one
      more step and checkpoint-21; now the validation stops at the batch it is in and checkpoint-20 is the stop's.
    With two DataLoader workers, as on GPUs by default: a SIGTERM that reached them (the stage's to its training
    process's group, once; systemd's) killed them, and the training process failed mid-step on "DataLoader worker
    ... is killed by signal: Terminated" instead of saving its checkpoint."""
    run = _run_copy(tiny_run, tmp_path / "run")
    ckpts = run / "04_train.checkpoints"
    sets = ["dataloader_num_workers=2"]
    if when == "during a validation":
        sets += ["max_val_samples=-1", "per_device_eval_batch_size=1"]

    def ready() -> bool:
        if when == "after a step":
            return (ckpts / "checkpoint-20" / MARKER).exists()
        events = [json.loads(line) for f in run.glob(".04_train.*/events.jsonl") for line in f.read_text().splitlines()]
        return any(e.get("step") == 20 and "loss" in e for e in events)  # logged as its validation starts

    with _stage(run, sets) as (proc, out):
        _until(ready, proc, out)
        trainer = _trainer_of(proc.pid)
        asked = time.monotonic()
        for pid in [proc.pid, *_descendants(proc.pid)] if when == "after a step" else [proc.pid]:
            os.kill(pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        took = time.monotonic() - asked
    log = "".join(out)
    assert not Path(f"/proc/{trainer}").exists(), "the training process outlived the stage"
    assert "killed by signal" not in log, log[-3000:]
    if when == "after a step":
        stopped = re.search(r"SIGTERM: training stops after step (\d+) of 100", log)
        assert stopped, log[-3000:]
        step = int(stopped[1])
        assert 20 < step < 100, step
    else:
        assert "SIGTERM during the validation of step 20: the validation is dropped; training stops after step 20 " \
               "of 100" in log, log[-3000:]  # fmt: skip
        step = 20
    assert took < 60, took
    assert latest_checkpoint(ckpts) == ckpts / f"checkpoint-{step}", sorted(p.name for p in ckpts.iterdir())
    assert not (run / "04_train").exists(), "a stopped stage must not publish"
    # what the rerun resumes from (resuming from a checkpoint: the tests above, and the Prefect crash + Retry test)



@pytest.mark.slow  # about 23 s: make test-slow (make test stops a training with SIGTERM, and under the launcher)
def test_a_second_ctrl_c_kills_a_training_that_is_saving_its_stop_checkpoint(tiny_run, tmp_path):
    """Ctrl-C makes the stage wait while its training finishes the step it is in and saves it (a minute, or 1.5
    steps where steps are longer); a second Ctrl-C during that wait kills the training at once and says what the
    next run resumes from. Before, it left the wait unannounced, and the training died only with the CLI's process
    (in a notebook, which goes on, it saved unwatched after the stage had ended). The training here is frozen
    (SIGSTOP) once checkpoint-20 is written, as one deep in a long step would be: the first Ctrl-C cannot end it."""
    run = _run_copy(tiny_run, tmp_path / "run")
    ckpts = run / "04_train.checkpoints"
    with _stage(run, []) as (proc, out):
        _until((ckpts / "checkpoint-20" / MARKER).exists, proc, out)
        trainer = _trainer_of(proc.pid)
        os.kill(trainer, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGINT)
        _until(lambda: "Ctrl-C again to kill it now" in "".join(out), proc, out)
        os.kill(proc.pid, signal.SIGINT)
        asked = time.monotonic()
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
        took = time.monotonic() - asked
    log = "".join(out)
    assert took < 15, took  # not the first stop's 60 s
    assert not Path(f"/proc/{trainer}").exists(), "the training process outlived the stage"
    last = latest_checkpoint(ckpts)
    assert f"Ctrl-C again: the training is killed (SIGKILL), without a checkpoint of the step it was in. The next " \
           f"run (or Retry in the Prefect UI) resumes from {last.name} in {ckpts}." in log, log[-3000:]  # fmt: skip
    assert checkpoint_step(last) % 20 == 0, last  # a save_steps checkpoint: the stop's was never written
    assert not (run / "04_train").exists()

@contextlib.contextmanager
def _stage(run: Path, extra: list[str]):
    """`edgar-tune stage train` running, and the list its output lines go to as they come: (process, lines). Killed
    at the end if it still runs."""
    proc = subprocess.Popen(_stage_cmd(run, extra), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        yield proc, out
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=30)


def _until(ready, proc, out: list[str], timeout: float = 300) -> None:
    """Wait until `ready()`, failing with the stage's output (`out`) if it ends or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, "".join(out)[-3000:]
        time.sleep(0.02)


def _trainer_of(stage: int) -> int:
    """The training process among the stage's children."""
    [trainer] = [int(c) for c in Path(f"/proc/{stage}/task/{stage}/children").read_text().split()
                 if b"tasks.train_worker" in Path(f"/proc/{c}/cmdline").read_bytes()]  # fmt: skip
    return trainer


def _descendants(pid: int) -> list[int]:
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return children + [d for c in children for d in _descendants(c)]


@pytest.mark.parametrize("how", [pytest.param("SIGTERM to the stage", marks=pytest.mark.slow), "SIGTERM to one rank",
                                 pytest.param("SIGKILL to the stage", marks=pytest.mark.slow)])  # fmt: skip
def test_ranks_under_the_launcher_stop_together_with_a_checkpoint_or_die_with_a_killed_stage(tiny_run, tmp_path, how):
    """ZeRO-3 over two processes (DeepSpeed's launcher, its launch process, two ranks, their DataLoader workers),
    signalled once training runs.
    - SIGTERM to the stage: before, the stage waited on its launcher while the ranks trained on to their last
      step; then it stopped the launcher's group, and the ranks died by SIGTERM's default, losing the steps since
      the last checkpoint. Now the stage asks each rank to stop, and they stop after the same step with a
      checkpoint of it (in make test-slow).
    - SIGTERM to one rank (a spot node's notice, say, reaching one node's ranks): the ranks agree at each step's
      end whether any was asked, so both stop after the same step and save it together; the stage then fails,
      naming that checkpoint.
    - SIGKILL to the stage: it took the launcher only (PR_SET_PDEATHSIG), and its launch process and both ranks
      trained on, for nobody. Now each rank ends with the stage's process (`end_with_the_stage`), by SIGKILL:
      no checkpoint is written while a rerun could be resuming."""
    run = _run_copy(tiny_run, tmp_path / "run")
    ckpts = run / "04_train.checkpoints"
    sets = ["deepspeed=zero3", "nproc=2", "max_steps=400", "dataloader_num_workers=1"]
    proc = subprocess.Popen(_stage_cmd(run, sets), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"training: \d+ of 400 steps", line):
                break
        tree = _descendants(proc.pid)
        commands = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in tree}
        ranks = [p for p, c in commands.items() if b"tasks.train_worker" in c and b"deepspeed.launcher" not in c
                 and b"deepspeed.launcher.launch" in commands.get(_parent(p), b"")]  # not a rank's workers
        assert len(ranks) == 2 and len(tree) >= 6, "".join(seen)[-3000:]  # launcher, launch, 2 ranks, 2 workers
        os.kill(max(ranks) if how == "SIGTERM to one rank" else proc.pid, getattr(signal, how.split()[0]))
        rest = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)  # a full pipe never waits
        rest.start()
        proc.wait(timeout=120)
        deadline = time.monotonic() + 60
        while (left := [p for p in tree if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"{len(left)} of the stage's {len(tree)} training processes outlived a {how}"
        rest.join(timeout=30)
    finally:
        for p in _descendants(proc.pid) if proc.poll() is None else []:
            os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    log = "".join(seen)
    if how == "SIGKILL to the stage":
        assert proc.returncode == -9
        return
    assert proc.returncode == (128 + signal.SIGTERM if how == "SIGTERM to the stage" else 1), log[-3000:]
    # after a step, or in a validation (a rank's SIGTERM can land there)
    stopped = re.search(r"SIGTERM.*[:;] training stops after step (\d+) of 400 on all 2 ranks", log)
    assert stopped, log[-3000:]
    step = int(stopped[1])
    last = latest_checkpoint(ckpts)
    assert last == ckpts / f"checkpoint-{step}", sorted(p.name for p in ckpts.iterdir())
    assert {p.name for p in last.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert (last / f"global_step{step}").is_dir()  # both ranks' ZeRO shards of the optimizer
    assert not (run / "04_train").exists(), "a stopped stage must not publish"
    if how == "SIGTERM to one rank":
        assert "the training process stopped on a SIGTERM sent to it, not to this run" in log, log[-3000:]
        assert f"resumes from checkpoint-{step}" in log, log[-3000:]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_rank_on_another_host_does_not_watch_the_stage_pid(monkeypatch):
    """A hostfile's launcher could pass EDGAR_TUNE_STAGE_PID on to other nodes, where that PID is not the stage's
    (or is nobody's: the rank would stop at once). Only a rank on the stage's host watches it."""
    import socket

    from tasks.finetune import STAGE_PID, end_with_the_stage

    def watching() -> bool:
        return any(t.name == "end-with-the-stage" for t in threading.enumerate())

    monkeypatch.setenv(STAGE_PID, "1@not-" + socket.gethostname())  # pid 1 never ends: a wrong watch stays quiet
    end_with_the_stage()
    assert not watching()
    monkeypatch.setenv(STAGE_PID, f"1@{socket.gethostname()}")
    end_with_the_stage()
    assert watching()



@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own, resized by `resize(bytes)`: a disk that fills (mounting needs root, as here and in CI)."""
    where = tmp_path / "disk"
    where.mkdir()

    def resize(nbytes: int) -> None:
        mounted = os.path.ismount(where)
        opts = f"size={nbytes}" + (",remount" if mounted else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode and not mounted:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): it takes root")
        assert done.returncode == 0, done.stderr

    yield where, resize
    if os.path.ismount(where):
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_disk_fails_at_a_checkpoint_with_what_takes_it_and_the_rerun_resumes(tiny_run, tmp_path, small_disk):
    """The checkpoints' disk holds a checkpoint and a half: after the first, the run is warned that the rest needs
    more than is free; the second fails to write, and the stage says the disk is full, what takes it, and what the
    next run resumes from, having removed the unfinished copy. Before, the save died on torch's `unexpected pos
    3246080 vs 3245972` or safetensors' `os error 28` under 280 lines of tracebacks, `exited with status 1`, and left
    the unfinished copy holding the space for the rerun. Given room, the rerun resumes from the first checkpoint."""
    # A checkpoint's size, from the tiny run's published adapter (the same LoRA): its folder (weights, config,
    # card, tokenizer), Adam's two moments of each weight (fp32, as the weights), and about 16 kB of trainer state
    # and RNG. Checked against checkpoint-20 below (training 20 steps first to measure it took 20 s).
    adapter = tiny_run[0] / "latest" / "04_train" / "adapter"
    each = megabytes(adapter) * 1e6 + 2 * (adapter / "adapter_model.safetensors").stat().st_size + 16e3
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")  # not on the small disk
    disk, resize = small_disk
    resize(1 << 30)
    run = _run_copy(tiny_run, disk / "run")
    resize(int(shutil.disk_usage(disk).used + 1.6 * each))  # a checkpoint and a half free, above what it holds
    ckpts = run / "04_train.checkpoints"
    full = subprocess.run(_stage_cmd(run, ["max_steps=40"]), cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    log = full.stdout + full.stderr
    assert full.returncode == 1, log[-3000:]
    mb = r"[\d.]+ MB"
    assert re.search(rf"WARNING tasks.checkpoints: the disk holding {ckpts} has {mb} free, and the rest of this "
                     rf"training needs about {mb} there: 1 more checkpoint\(s\) of {mb} \(train.save_total_limit=2 "
                     r"kept, and the one being written\) and the final model", log), log[-3000:]  # fmt: skip
    assert re.search(rf"\nedgar-tune: failed: checkpoint-40 could not be written: the disk holding {ckpts} is full "
                     rf"\({mb} free of {mb}\)\. Its unfinished copy( \({mb}\))? is removed; the complete checkpoints "
                     rf"take {mb} \(checkpoint-20\)\. Free space on that disk, or keep fewer checkpoints "
                     rf"\(train.save_total_limit=2\)\. The next run \(or Retry in the Prefect UI\) resumes from "
                     rf"checkpoint-20 in {ckpts}\.", log), log[-3000:]  # fmt: skip
    assert "edgar_tune/cli.py" not in full.stderr  # the CLI's own traceback (the training's last lines stay)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-20", "run.json"]
    assert 0.8 < each / (megabytes(ckpts / "checkpoint-20") * 1e6) < 1.2, "the estimate above no longer holds"
    assert not (run / "04_train").exists() and not list(run.glob(".04_train*"))
    resize(int(shutil.disk_usage(disk).used + 10 * each))  # space freed
    resumed = subprocess.run(_stage_cmd(run, ["max_steps=40"]), cwd=REPO, capture_output=True, text=True, env=env,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    stats = json.loads((run / "04_train" / "stats.json").read_text())
    assert stats["resumed_from_step"] == 20 and stats["steps"] == 40
    assert "WARNING tasks.checkpoints: the disk" not in resumed.stderr


def test_a_training_whose_disk_cannot_hold_one_checkpoint_is_refused_before_its_model_loads(tiny_run, small_disk):
    """Less room than one checkpoint's weights and optimizer moments at 2 bytes each (a bound: the run would surely
    fail at its first save, after train.save_steps of work): refused while the run is planned, nothing written."""
    disk, resize = small_disk
    resize(1 << 30)
    run = _run_copy(tiny_run, disk / "run")
    trained = json.loads((tiny_run[0] / "latest" / "04_train" / "stats.json").read_text())["memory_plan"]["shape"]
    resize(shutil.disk_usage(disk).used + 3 * trained["lora_params"])  # half the bound
    done = subprocess.run(_stage_cmd(run, []), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.search(rf"\nedgar-tune: failed: the disk holding {run} has [\d.]+ MB free, and a checkpoint of this "
                     rf"training takes [\d.]+ MB at the least \({trained['lora_params'] / 1e6:,.2f}M trained "
                     r"parameters and their optimizer state, 2 bytes each at the least\): free space on that disk\n",
                     done.stderr), done.stderr[-3000:]  # fmt: skip
    assert "launching" not in done.stderr and not (run / "04_train.checkpoints").exists()


@pytest.mark.parametrize("stage,task,has", [("tokenize", "pack_blocks", ["01_download", "02_parse"]),
                                            pytest.param("register", "register_model", ["04_train", "05_evaluate"],
                                                         marks=pytest.mark.slow)])  # fmt: skip
def test_a_stage_that_fills_the_disk_says_which_and_its_rerun_needs_only_room(tiny_run, small_disk, stage, task, has):
    """A stage on a disk with no room for what it writes: before, tracebacks ending in `OSError: [Errno 28] No space
    left on device`, no path (the registration: 600 lines of MLflow's, ending in SQLite's `database or disk is
    full`). Now one line naming the stage, the disk (where the failed write went: the run's, the MLflow store's) and
    its free space; nothing half-written is left in the run, nor in the MLflow store by a model upload the disk cut
    short (its files and its logged model, FAILED, or PENDING where the full disk kept MLflow from marking it), and
    with room the same command runs."""
    import mlflow

    runs, _ = tiny_run
    disk, resize = small_disk
    resize(1 << 30)
    shutil.copytree(runs / "latest", disk / "run", symlinks=True)
    run = disk / "run"
    after = [p.name for p in run.iterdir() if p.name.startswith("0") and p.name > has[-1]]
    for name in after + ["summary.json"] + [f".stages/{s}.json" for s in STAGES[STAGES.index(stage) :]]:
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink(missing_ok=True)  # what it wrote
    kept = sorted(p.name for p in run.iterdir())
    store = f"sqlite:///{disk / 'mlflow.db'}"
    if stage == "register":  # the store made, so that the disk fills during the model's upload (2.9 MB)
        mlflow.MlflowClient(store).search_experiments()
    resize(shutil.disk_usage(disk).used + ((1500 if stage == "register" else 8) << 10))
    cmd = [sys.executable, "-m", "edgar_tune.cli", "stage", stage, "--run", str(run)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store beside the run: this disk
    full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert full.returncode == 1, full.stderr[-3000:]
    where = re.escape(str(run)) if stage == "tokenize" else re.escape(str(disk)) + r"/\S+"  # the store's, or the run's
    assert re.search(rf"(^|\n)edgar-tune: failed: stage {stage} \({task}\): no space left on the disk holding "
                     rf"{where}: [\d.]+ MB free of [\d.]+ MB\. Free space there and run it again: the stages already "
                     r"done are kept and not redone", full.stderr), full.stderr[-3000:]  # fmt: skip
    assert "edgar_tune/cli.py" not in full.stderr, full.stderr[-3000:]  # no traceback of the CLI's
    assert sorted(p.name for p in run.iterdir()) == sorted(kept + [".lock"] * (".lock" not in kept))
    if stage == "register":
        uploaded = [p for p in disk.glob("mlartifacts/*/models/*") if any(f.is_file() for f in p.rglob("*"))]
        # PENDING where the full disk kept MLflow from marking it FAILED
        assert re.search(r"removed an unfinished upload of the model from MLflow run \w+: logged model m-\w+ \("
                         r"(FAILED|PENDING), [\d.]+ MB\)", full.stderr), full.stderr[-3000:]  # fmt: skip
        assert uploaded == [], uploaded
        assert "Traceback" not in full.stderr, full.stderr[-3000:]  # MLflow's of the SQLite error it raises on
    resize(1 << 30)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    if stage == "register":  # one model in the store, the one registered
        client = mlflow.MlflowClient(store)
        models = client.search_logged_models([e.experiment_id for e in client.search_experiments()])
        assert [str(m.status) for m in models] == ["READY"]


def test_a_full_disk_names_each_evaluation_as_the_cli_does():
    """evaluate_perplexity is two stages; a full disk's message names the one that ran (`stage evaluate-base`)."""
    from tasks.stages import _evaluation, evaluate_perplexity

    fn = evaluate_perplexity.fn.__wrapped__
    assert _evaluation(fn, Path("run"), None, False) == "evaluate-base"
    assert _evaluation(fn, Path("run"), None, finetuned=True, gen=None) == "evaluate"


def test_checkpoint_is_published_by_rename_then_marker(tmp_path):
    """Published by rename, then the marker; with the permissions the umask gives (safetensors 0.8 writes 0600)."""
    from tasks.io import umask

    staging = tmp_path / "tmp-checkpoint-5"
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (staging / "adapter_model.safetensors").chmod(0o600)
    final = tmp_path / "checkpoint-5"
    publish_checkpoint(staging, final, 5)
    assert not staging.exists() and (final / MARKER).read_text() == "step 5\n"
    assert (final / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask()
    # Unfinished ones are never resumed from: no marker, or still in staging.
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "tmp-checkpoint-12").mkdir()
    assert complete_checkpoints(tmp_path) == [final]
    assert latest_checkpoint(tmp_path) == final
    # The next run removes them: each holds a checkpoint's space, and one left by a full disk kept it full.
    from tasks.checkpoints import prepare

    assert prepare(tmp_path, {"train.learning_rate": 0.003}, resume=True) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "run.json"]


def test_the_room_a_training_still_needs_counts_the_checkpoints_it_keeps_and_its_final_model(tmp_path):
    """From a checkpoint of 13 MB whose weights take 10: with 2 kept (train.save_total_limit) and 1 there, two more
    saves peak at 3 checkpoints (the one being written beside the two kept): 26 MB more; one more save ends with 2
    and the final model: 23 MB; none, the final model only; with 2 there and 5 to come, one more checkpoint."""
    from tasks.checkpoints import room_needed

    latest = tmp_path / "checkpoint-2"
    latest.mkdir()
    for name, nbytes in (("adapter_model.safetensors", 10_000_000), ("optimizer.pt", 3_000_000),
                         ("training_args.bin", 5_000)):  # fmt: skip
        (latest / name).write_bytes(b"x" * nbytes)
    each, model = 13_005_000, 10_000_000
    assert room_needed(latest, 1, 2, 2) == (2 * each, 2, each, model)
    assert room_needed(latest, 1, 2, 1) == (each + model, 1, each, model)
    assert room_needed(latest, 1, 2, 0) == (model, 0, each, model)
    assert room_needed(latest, 2, 2, 5) == (each, 1, each, model)
    assert room_needed(latest, 1, 1, 3) == (each, 1, each, model)


def test_resume_allows_the_settings_that_leave_the_trajectory_alone(tmp_path):
    """Checkpointing and dataloader settings may change on resume (a run that ran out of memory recomputes more
    layers), also against checkpoints written when they still counted; the learning rate may not."""
    from tasks.checkpoints import prepare

    folder = tmp_path / "ckpts"
    old = {"train.learning_rate": 0.003, "train.gradient_checkpointing": False, "train.checkpoint_layers": 1.0}
    assert prepare(folder, old, resume=True) is None
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / MARKER).write_text("step 5\n")  # a complete checkpoint of that run
    assert prepare(folder, {"train.learning_rate": 0.003}, resume=True) == folder / "checkpoint-5"
    with pytest.raises(ValueError, match="train.learning_rate: 0.003 -> 0.001"):
        prepare(folder, {"train.learning_rate": 0.001}, resume=True)


def test_what_the_validations_score_may_change_on_resume_while_their_loss_steers_nothing(tmp_path):
    """The advice of a run whose validations cost too much (train.eval_blocks=N) applies to its rerun: with no early
    stopping and the last checkpoint published, the validation set's settings may change on resume, also against
    checkpoints that recorded them; while the validation loss picks the checkpoint or stops the run, they may not
    (the best loss so far was measured on the other set)."""
    from edgar_tune.config import EvalConfig, TrainConfig
    from tasks.checkpoints import prepare, resume_settings

    tokenized = {"train_blocks": 810, "block_length": 128, "base_model": {"kind": "run_local", "path": "tiny-llama"}}
    free = {"early_stopping_patience": 0, "load_best_model_at_end": False}

    def settings(train: dict, **eval_) -> dict:
        return resume_settings(TrainConfig(**train).model_dump(), EvalConfig(**eval_).model_dump(), tokenized, 1)

    defaults = settings({})
    for i, steering in enumerate(({}, {"early_stopping_patience": 0}, {"load_best_model_at_end": False})):
        folder = tmp_path / f"steered-{i}"
        assert prepare(folder, settings(steering), resume=True, defaults=defaults) is None
        (folder / "checkpoint-5").mkdir()
        (folder / "checkpoint-5" / MARKER).write_text("step 5\n")
        with pytest.raises(ValueError, match=r"train.eval_blocks: -1 -> 8"):
            prepare(folder, settings(steering | {"eval_blocks": 8}), resume=True, defaults=defaults)

    folder = tmp_path / "free"
    assert prepare(folder, settings(free), resume=True, defaults=defaults) is None
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / MARKER).write_text("step 5\n")
    fewer = settings(free | {"eval_blocks": 8}, max_val_samples=64, per_device_eval_batch_size=2)
    assert prepare(folder, fewer, resume=True, defaults=defaults) == folder / "checkpoint-5"
    # against a record that holds them (checkpoints of a run whose validations steered, or of an older release)
    folder = tmp_path / "recorded"
    assert prepare(folder, settings(free) | {k: defaults[k] for k in VALIDATION_SET}, resume=True) is None
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / MARKER).write_text("step 5\n")
    assert prepare(folder, fewer, resume=True, defaults=defaults) == folder / "checkpoint-5"
    with pytest.raises(ValueError, match=r"train.learning_rate: 0.0001 -> 0.001"):  # what training does still counts
        prepare(folder, settings(free | {"learning_rate": 0.001}), resume=True, defaults=defaults)
    with pytest.raises(ValueError, match=r"train.early_stopping_patience: 0 -> 3"):  # and steering it again
        prepare(folder, settings(free | {"early_stopping_patience": 3}), resume=True, defaults=defaults)


def test_checkpoints_from_before_a_setting_existed_resume_at_its_default_only(tmp_path):
    """A setting added to edgar-tune since the checkpoints were written (train.eval_blocks, here) is missing from
    their record: it was at its default then, so the run resumes at that default and is refused at another value.
    The train stage's own defaults (resume_settings of the default configs) are what it compares with."""
    from edgar_tune.config import EvalConfig, TrainConfig
    from tasks.checkpoints import prepare, resume_settings

    tokenized = {"train_blocks": 810, "block_length": 128, "base_model": {"kind": "run_local", "path": "tiny-llama"}}
    now = resume_settings(TrainConfig().model_dump(), EvalConfig().model_dump(), tokenized, 1)
    folder = tmp_path / "ckpts"
    assert prepare(folder, {k: v for k, v in now.items() if k != "train.eval_blocks"}, resume=True) is None
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / MARKER).write_text("step 5\n")
    with pytest.raises(ValueError, match=r"train.eval_blocks: None -> -1"):  # what it said before the defaults
        prepare(folder, now, resume=True)
    later = resume_settings(TrainConfig(eval_blocks=8).model_dump(), EvalConfig().model_dump(), tokenized, 1)
    with pytest.raises(ValueError, match=r"train.eval_blocks: -1 -> 8"):
        prepare(folder, later, resume=True, defaults=now)
    assert prepare(folder, now, resume=True, defaults=now) == folder / "checkpoint-5"


def test_a_stop_waits_for_a_step_as_long_as_the_steps_take(tmp_path):
    """A stop waits 60 s for the training to checkpoint the step it is in, or 1.5 steps and 30 s to save where steps
    are longer, at the pace the train stage reads from the training's events: an 8192-token SmolLM2 step on 2 CPU
    cores (2.5 to 3 min) was SIGKILLed with its checkpoint unwritten."""

    from tasks.finetune import STOP_GRACE_S, follow_progress, stop_grace_s

    events = [{"begin": True, "step": 0, "max_steps": 4, "time": 1000.0},
              {"step": 1, "time": 1160.0, "loss": 2.0, "learning_rate": 1e-4, "tokens_per_step": 8192},
              {"step": 2, "time": 1340.0, "loss": 1.9, "learning_rate": 1e-4, "tokens_per_step": 8192}]  # fmt: skip
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    stop, pace = threading.Event(), {}
    stop.set()  # one pass over the file
    follow_progress(path, stop, 0.0, pace=pace)
    assert pace == {"step_s": pytest.approx(170.0)}
    assert stop_grace_s(pace["step_s"]) == pytest.approx(285.0)
    assert stop_grace_s(None) == stop_grace_s(1.2) == STOP_GRACE_S == 60.0  # before the first step; a GPU's steps


@pytest.mark.parametrize("trained", ["token rows", "dora", "pissa"])
def test_what_trains_beside_lora_resumes_from_a_checkpoint_on_the_same_trajectory(tiny_run, tmp_path, trained):
    """`train.trainable_tokens`: the rows train beside LoRA into the checkpoints, and a training resumed from one
    goes on as the uninterrupted one did, its losses and the rows it saves the same (no dropout: the same numbers).
    So do DoRA's magnitudes (`train.use_dora`, through lean_lora, whose weights' row norms are computed once), and
    adapters that started from PiSSA through a randomized SVD (`train.lora_init=pissa_niter_2`): the resumed training
    decomposes the base again, to the same start, and publishes the same plain LoRA."""
    import torch
    from safetensors.torch import load_file

    from edgar_tune.config import EvalConfig, TrainConfig
    from tasks.finetune import train
    from tasks.models import base_model_path, load_tokenizer

    runs, _ = tiny_run
    tok = runs / "latest" / "03_tokenize"
    token = load_tokenizer(base_model_path(tok)).convert_ids_to_tokens(100)
    extra = {"token rows": {"trainable_tokens": [token]}, "dora": {"use_dora": True, "lean_lora": True},
             "pissa": {"lora_init": "pissa_niter_2"}}[trained]
    kept = {"token rows": "trainable_tokens_delta", "dora": "magnitude", "pissa": "lora_"}[trained]
    cfg = TrainConfig(max_steps=6, logging_steps=1, eval_steps=0, early_stopping_patience=0, save_steps=3,
                      load_best_model_at_end=False, lora_dropout=0.0, memory_check="off", **extra)  # fmt: skip
    done = {}
    for name, resume_from in (("whole", None), ("resumed", tmp_path / "whole.ckpt" / "checkpoint-3")):
        stats = train(tmp_path / name, tok, cfg, EvalConfig(max_val_samples=4), tmp_path / f"{name}.ckpt",
                      resume_from)  # fmt: skip
        losses = [json.loads(x) for x in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
        rows = {k: v for k, v in load_file(tmp_path / name / "adapter" / "adapter_model.safetensors").items()
                if kept in k}  # fmt: skip
        done[name] = stats, {x["step"]: x["loss"] for x in losses}, rows
    (whole, whole_losses, whole_rows), (resumed, resumed_losses, resumed_rows) = done["whole"], done["resumed"]
    assert resumed["resumed_from_step"] == 3
    assert [resumed_losses[s] for s in (4, 5, 6)] == pytest.approx([whole_losses[s] for s in (4, 5, 6)], rel=1e-6)
    assert list(whole_rows) == list(resumed_rows) and len(whole_rows) == {"token rows": 1, "dora": 14,
                                                                             "pissa": 28}[trained]
    for key, value in whole_rows.items():
        torch.testing.assert_close(resumed_rows[key], value)
    if trained != "token rows":
        return
    assert whole["trainable_tokens"] == resumed["trainable_tokens"] == [token]
    base = load_file(Path(base_model_path(tok)) / "model.safetensors")["model.embed_tokens.weight"][100]
    assert not torch.allclose(next(iter(whole_rows.values()))[0], base)  # the row trained
