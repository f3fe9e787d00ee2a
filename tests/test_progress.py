"""tasks/progress.py and the train stage's progress: what a person watching a run reads in its log, at the pace a
long run needs (the first update, then at most every `every_s`, and the end). The lines and the progress bar of a
real run in the Prefect UI are checked in test_prefect_server.py, and on the console in test_pipeline_e2e.py."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from tasks.finetune import follow_progress
from tasks.progress import BARS, LIBRARY_BARS_OFF, Progress, clock


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("tasks.")]


def test_progress_shows_the_first_update_then_every_few_seconds_and_the_end(caplog):
    caplog.set_level(logging.INFO)
    bar = Progress("scoring", 10, "documents", every_s=3600)
    for done in range(1, 11):
        bar.update(done, f"at {done}", rate=2.0, elapsed=done / 2)
    assert _lines(caplog) == ["scoring: 1 of 10 documents (10%), 0:00:00 elapsed, about 0:00:04 left; at 1",
                              "scoring: 10 of 10 documents (100%), 0:00:05 elapsed; at 10"]  # fmt: skip


def test_an_update_held_back_shows_when_the_work_ends_early(caplog):
    """Early stopping ends training before its last planned step: its last loss still reaches the log."""
    caplog.set_level(logging.INFO)
    bar = Progress("training", 100, "steps", every_s=3600)
    bar.update(1, "loss 2.0", elapsed=1.0)
    bar.update(40, "loss 1.5", elapsed=90.0, rate=0.5)
    bar.close()
    assert _lines(caplog)[1] == "training: 40 of 100 steps (40%), 0:01:30 elapsed, about 0:02:00 left; loss 1.5"


def test_short_quiet_work_shows_nothing_beyond_its_tqdm_bar(caplog):
    caplog.set_level(logging.INFO)
    bar = Progress("perplexity (base)", 5, "tokens", quiet_s=3600)
    for done in range(1, 6):
        bar.update(done)
    bar.close()
    assert _lines(caplog) == []


def _decided(stderr: str, setting: str | None) -> tuple[str, str]:
    """What `settle_bars` decides in a new process whose stderr is a terminal (a pseudo-terminal) or a pipe, with
    EDGAR_TUNE_BARS at `setting`: (its decision and the environment it leaves its children, its stderr)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    code = ("import os; from tasks.progress import settle_bars; on = settle_bars(); "
            "print(on, *(os.environ.get(k) for k in ('EDGAR_TUNE_BARS', 'HF_DATASETS_DISABLE_PROGRESS_BARS', "
            "'MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'))); "
            "from tqdm.auto import tqdm; [*tqdm(range(3), desc='a bar of its own')]")  # a library's own tqdm bar
    env = {k: v for k, v in os.environ.items() if k != BARS and k not in LIBRARY_BARS_OFF}
    if setting is not None:
        env[BARS] = setting
    main, other = pty.openpty() if stderr == "terminal" else os.pipe()
    if stderr == "terminal":  # a new pseudo-terminal is 0 columns wide: tqdm would draw its bars empty
        fcntl.ioctl(other, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=other, text=True,
                          timeout=120)  # fmt: skip
    os.close(other)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # a pseudo-terminal with its other end closed reads as EIO at its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    err = b"".join(chunks).decode()
    assert proc.returncode == 0, err
    return proc.stdout.strip(), err


def test_progress_bars_draw_on_a_terminal_and_log_lines_go_to_files_and_pipes():
    """A worker's console in a file or a pipe (a log file, `docker logs`) kept every redraw of every bar, glued
    to the Trainer's loss dicts; now it gets the log lines only, and so do the processes it starts (the
    training process's console is a pipe its parent reads), libraries' bars included. EDGAR_TUNE_BARS decides
    where set; a value that is neither 1 nor 0 is named, and the console decides."""
    decision, err = _decided("terminal", None)
    assert decision == "True 1 None None" and "a bar of its own: 100%|" in err
    assert _decided("pipe", None) == ("False 0 1 false", "")  # TQDM_DISABLE: no bar that tqdm draws for anyone
    assert _decided("pipe", "1")[0] == "True 1 None None" and _decided("terminal", "0") == ("False 0 1 false", "")
    decision, err = _decided("pipe", "yes")
    assert decision == "False 0 1 false" and "EDGAR_TUNE_BARS='yes' is neither 1" in err and "%|" not in err


def test_deepspeeds_cpu_notice_is_dropped_where_there_is_no_gpu(monkeypatch):
    """Every process that loads transformers' Trainer or saves a model imports DeepSpeed, which warned "Setting
    accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it" on the console, outside
    the run's log. Without a GPU that says nothing; where CUDA sees a device it cannot use, it stays."""
    import torch
    from deepspeed.accelerator import real_accelerator

    from tasks.progress import _no_gpu_to_detect, settle_console

    for var in (BARS, *LIBRARY_BARS_OFF):  # settle_console sets them: they are put back after the test
        monkeypatch.delenv(var, raising=False)
    settle_console()
    seen: list[str] = []
    catch = logging.Handler()
    catch.emit = lambda record: seen.append(record.getMessage())
    ds_log = logging.getLogger("DeepSpeed")
    ds_log.addHandler(catch)
    try:
        monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # detect again, as a new process does
        assert real_accelerator.get_accelerator().device_name() == "cpu"
        ds_log.warning("another warning")
    finally:
        ds_log.removeHandler(catch)
    assert seen == ["another warning"]
    record = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 0, "Setting accelerator to CPU. ...", (), None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _no_gpu_to_detect(record)


def test_clock_reads_as_hours_minutes_seconds():
    assert (clock(0.4), clock(245), clock(3 * 3600 + 61)) == ("0:00:00", "0:04:05", "3:01:01")


@pytest.mark.timeout(60)
def test_the_train_stage_shows_the_training_processes_progress_as_it_comes(tmp_path, caplog):
    """`follow_progress` reads the events the training process appends (a resumed run here), whole lines only,
    and logs them as they come, with tokens/s from the events' own times, validation time left out; the training
    process's own log lines under their own logger's name, at their own time."""
    caplog.set_level(logging.INFO)
    events = tmp_path / "events.jsonl"
    stop = threading.Event()
    follower = threading.Thread(target=follow_progress, args=(events, stop, 0.05))
    follower.start()
    t0 = 1_000_000.0
    rows = [{"time": t0 - 9, "log": {"name": "tasks.finetune", "level": logging.INFO, "message": "a\nb"}},
            {"step": 100, "max_steps": 300, "time": t0, "tokens_per_step": 4096, "begin": True},
            {"step": 101, "max_steps": 300, "time": t0 + 2, "tokens_per_step": 4096, "loss": 1.25,
             "learning_rate": 2e-4}]  # fmt: skip
    with events.open("w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.write('{"step": 102, "max_st')  # half a line: the training process is writing it
        f.flush()
        time.sleep(0.3)
        f.write('eps": 300, "time": %s, "tokens_per_step": 4096, "eval_loss": 1.5, "eval_runtime": 2.5}\n' % (t0 + 5))
        # 2 steps in 6 s, 2.5 s of them validating: 2 x 4096 / 3.5 tokens/s; the time left from 3 steps in 8 s
        f.write(json.dumps({"step": 103, "max_steps": 300, "time": t0 + 8, "tokens_per_step": 4096, "loss": 1.0}))
        f.write("\n")
    stop.set()
    follower.join(timeout=30)
    assert [r.name for r in caplog.records][:2] == ["tasks.finetune", "tasks.finetune"]
    assert caplog.records[0].created == t0 - 9
    assert _lines(caplog) == [
        "a\nb",
        "training resumes at step 100 of 300",
        "training: 101 of 300 steps (34%), 0:00:02 elapsed, about 0:06:38 left; loss 1.2500, learning rate "
        "2.00e-04, 2,048 tokens/s",
        "training step 102 of 300: validation loss 1.5000",
        "training: 103 of 300 steps (34%), 0:00:08 elapsed, about 0:08:45 left; loss 1.0000, 2,341 tokens/s",
    ]


def test_a_long_validation_inside_training_shows_its_progress(tiny_run, tmp_path, caplog, monkeypatch):
    """A validation inside training (a 7B model over a year's MD&A: minutes) logged nothing until its loss, and its
    bar is gone from log files. Past `VALIDATION_QUIET_S` (30 s; 0 here) it logs its batches, as other long work
    does, each validation its own: here the Trainer's, validating 16 blocks one at a time at steps 2 and 4."""
    from tasks import finetune
    from tests.conftest import train_variants

    monkeypatch.setattr(finetune, "VALIDATION_QUIET_S", 0.0)
    caplog.set_level(logging.INFO, "tasks.finetune")
    train_variants(tiny_run, tmp_path, {"validated": {"eval_steps": 2}}, steps=4, max_val_samples=16)
    assert [x.split(", 0:00")[0] for x in _lines(caplog) if ": validation: " in x] == [
        "training step 2 of 4: validation: 1 of 16 batches (6%)",
        "training step 2 of 4: validation: 16 of 16 batches (100%)",
        "training step 4 of 4: validation: 1 of 16 batches (6%)",
        "training step 4 of 4: validation: 16 of 16 batches (100%)",
    ]


def test_the_register_stage_finds_every_point_of_the_curves_in_the_train_stages_folder(tmp_path):
    """What a tracking server never took is logged at registration: the points the follower made, at the times
    the training made them, and for a resumed training's steps before the crash (whose events went with the
    crashed attempt) the losses and learning rates of the Trainer's history."""
    from tasks.io import write_jsonl
    from tasks.progress import training_points

    t0 = 1_000_000.0
    write_jsonl(tmp_path / "events.jsonl", [
        {"time": t0 - 1, "log": {"name": "tasks.finetune", "level": logging.INFO, "message": "fused"}},
        {"step": 2, "max_steps": 4, "time": t0, "tokens_per_step": 1000, "begin": True},
        {"step": 3, "max_steps": 4, "time": t0 + 2, "tokens_per_step": 1000, "loss": 1.5, "learning_rate": 1e-4},
        {"step": 4, "max_steps": 4, "time": t0 + 6, "tokens_per_step": 1000, "eval_loss": 1.7, "eval_runtime": 3.0},
        {"step": 4, "max_steps": 4, "time": t0 + 7, "tokens_per_step": 1000, "loss": 1.25, "learning_rate": 0.0}])
    write_jsonl(tmp_path / "loss.jsonl", [{"step": s, "loss": 3.0 - s / 2, "learning_rate": 2e-4 / s} for s in (1, 2, 3, 4)])
    write_jsonl(tmp_path / "val_loss.jsonl", [{"step": 2, "val_loss": 1.9}, {"step": 4, "val_loss": 1.7}])
    before = time.time()
    points = training_points(tmp_path)
    at = {(key, step): (value, t) for key, value, step, t in points}
    assert len(at) == len(points) == 12  # each point once: 7 from the events, 5 from the history
    assert at[("train_loss", 3)] == (1.5, t0 + 2) and at[("tokens_per_s", 3)] == (500.0, t0 + 2)
    assert at[("learning_rate", 4)] == (0.0, t0 + 7) and at[("tokens_per_s", 4)] == (500.0, t0 + 7)  # 1 step in 2 s
    assert at[("val_loss", 4)] == (1.7, t0 + 6)
    for key, step, value in [("train_loss", 1, 2.5), ("learning_rate", 1, 2e-4), ("train_loss", 2, 2.0),
                             ("learning_rate", 2, 1e-4), ("val_loss", 2, 1.9)]:  # fmt: skip
        assert at[(key, step)][0] == value and at[(key, step)][1] >= before, (key, step)
    assert ("tokens_per_s", 2) not in at


def test_the_training_processs_log_records_become_whole_events(tmp_path):
    """What `tasks.train_worker` sets up on rank 0: its lines go to the events file, whole, a traceback included."""
    from tasks.finetune import EventLog

    events = tmp_path / "stage" / "events.jsonl"
    logger = logging.getLogger("tasks.test-events")
    handler = EventLog(events)
    logger.addHandler(handler)
    try:
        logger.warning("fused %d layers", 3)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it broke")
    finally:
        logger.removeHandler(handler)
    rows = [json.loads(x)["log"] for x in events.read_text().splitlines()]
    assert rows[0] == {"name": "tasks.test-events", "level": logging.WARNING, "message": "fused 3 layers"}
    assert rows[1]["message"].startswith("it broke\nTraceback") and "ValueError: boom" in rows[1]["message"]
