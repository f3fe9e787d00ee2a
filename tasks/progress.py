"""Progress of long work where a person watching a run looks: lines in the run's log, and a progress bar in the
Prefect UI (a progress artifact on the task run). A terminal keeps its tqdm bars too; a console that is a file or
a pipe (a worker's log file, `docker logs`, journald) gets the log lines only (`console_bars`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

from tasks.io import read_jsonl

log = logging.getLogger(__name__)

EVENTS = "events.jsonl"  # the training process's progress and log lines, in the train stage's folder
Point = tuple[str, float, int, float]  # a point of a curve: (MLflow metric key, value, step, unix time)
CURVES = ("train_loss", "learning_rate", "tokens_per_s", "val_loss")
BARS = "EDGAR_TUNE_BARS"  # 1: tqdm bars on the console; 0: log lines only; unset: bars on a terminal only
# The libraries' own switches for their bars, read when each is imported (so by every process a run starts).
# TQDM_DISABLE turns off every other tqdm bar: transformers' GGUF conversion and "Writing model shards", ...
LIBRARY_BARS_OFF = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TQDM_DISABLE": "1"}


def console_bars() -> bool:
    """Whether tqdm bars draw on this process's console: on a terminal, yes. In a file or a pipe every redraw of a
    bar stays, as a line of its own (a run's 48 steps of training left 48 bar lines, each glued to a loss dict),
    and the log lines say the same at most every 30 s. `EDGAR_TUNE_BARS` (1 or 0) decides where set; a flow sets
    it for the processes it starts (`settle_bars`), whose console is a pipe that it passes on to its own."""
    setting = os.environ.get(BARS)
    return setting == "1" if setting in ("0", "1") else sys.stderr.isatty()


def settle_console() -> bool:
    """What an edgar-tune process does before it imports the libraries (the CLI, a flow run's process, a training
    process): decide the bars (`settle_bars`), and drop DeepSpeed's warning "Setting accelerator to CPU. If you have
    GPU or other accelerator, we were unable to detect it" where there is no GPU to detect. Every process that
    loads transformers' Trainer or saves a model imports DeepSpeed, and each printed it, outside the run's log.
    Where CUDA sees a device it cannot use, the warning stays. MLflow's SQL store logs each database error it catches
    with its traceback and raises it at once, which its caller reports: its line stays, the traceback goes
    (`_raised_at_once`). Returns the bars' decision."""
    logging.getLogger("DeepSpeed").addFilter(_no_gpu_to_detect)
    logging.getLogger("mlflow.store.db.utils").addFilter(_raised_at_once)
    return settle_bars()


def _raised_at_once(record: logging.LogRecord) -> bool:
    """Drop the traceback of MLflow's "SQLAlchemy database error. The following exception is caught." (with its SQL,
    kept): MLflow raises the same error as an MlflowException on the next line, for the caller to say. A full disk
    under a registration printed 100 lines of it before the stage's one."""
    if record.getMessage().startswith("SQLAlchemy database error. The following exception is caught."):
        record.exc_info, record.exc_text = None, None
    return True


def _no_gpu_to_detect(record: logging.LogRecord) -> bool:
    if not record.getMessage().startswith("Setting accelerator to CPU"):
        return True
    import torch  # DeepSpeed imported it to look for a GPU

    return torch.cuda.device_count() > 0


def settle_bars() -> bool:
    """Decide `console_bars` for this process and the processes it starts (the training processes inherit the
    setting), and without bars, turn off the bars the libraries draw themselves: datasets' (map, save), the
    Hugging Face Hub's (downloads), transformers' (loading weights) and MLflow's (artifacts). Returns the
    decision."""
    setting = os.environ.get(BARS)
    if setting is not None and setting not in ("0", "1"):
        log.warning("%s=%r is neither 1 (progress bars on the console) nor 0 (log lines only); deciding by the "
                    "console instead (a terminal: bars)", BARS, setting)  # fmt: skip
        del os.environ[BARS]
    on = console_bars()
    os.environ[BARS] = "1" if on else "0"
    if not on:
        for var, value in LIBRARY_BARS_OFF.items():
            os.environ.setdefault(var, value)
        if "huggingface_hub" in sys.modules:  # imported already: too late for its variable
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils.logging import disable_progress_bar

            disable_progress_bar()
        if "datasets" in sys.modules:
            from datasets.utils.tqdm import disable_progress_bars as disable_datasets_bars

            disable_datasets_bars()
    return on


def clock(seconds: float) -> str:
    """0:04:05 for 245 seconds."""
    return str(datetime.timedelta(seconds=round(seconds)))


class OwnLine(logging.LoggerAdapter):
    """A logger whose lines start on a line of their own where a tqdm bar holds the console's line open (a bar ends
    in a carriage return). `extra["open"]`: a threading.Event set while another process's bar holds it (a line
    breaks it once), or None for a bar of this process, open all along (it redraws below the line)."""

    def log(self, level, msg, *args, **kwargs):
        if self.isEnabledFor(level):
            self._break_line()
        super().log(level, msg, *args, **kwargs)

    def replay(self, level: int, message: str, created: float) -> None:
        """A line another process logged at `created` (a time.time()), logged here with that time, so that the
        run's log (the Prefect UI's included) shows when it happened, not when it was read."""
        if not self.isEnabledFor(level):
            return
        self._break_line()
        record = self.logger.makeRecord(self.logger.name, level, "(another process)", 0, "%s", (message,), None)
        record.created, record.msecs = created, created % 1 * 1000
        self.logger.handle(record)

    def _break_line(self) -> None:
        held = self.extra["open"]
        if not console_bars():  # no bar holds the line
            return
        if held is None or held.is_set():
            if held is not None:
                held.clear()
            sys.stderr.write("\n")
            sys.stderr.flush()


class Progress:
    """`what` done `done` of `total` `unit`: a log line (unless `logger` is None: work that logs its own) and a
    progress artifact (inside a Prefect run) at the first update, then at most every `every_s` seconds, and at the
    end. With `quiet_s`, nothing shows before that many seconds: short work (scoring a small validation set) keeps
    its tqdm bar only (where one draws: `console_bars`). `close` shows the update held back when the work ends
    before its total (early stopping).

    Showing progress never fails the work: an artifact the server refuses is logged once, and the work goes on.
    """

    def __init__(self, what: str, total: int, unit: str, *, logger: logging.Logger | None = log, every_s: float = 30.0,
                 quiet_s: float = 0.0) -> None:  # fmt: skip
        self.what, self.total, self.unit, self.logger, self.every_s = what, max(total, 1), unit, logger, every_s
        self.start = time.monotonic()
        self._next = self.start + quiet_s
        self._shown = quiet_s <= 0  # whether the end shows however soon it comes
        self._artifact = None
        self._broken = False
        self._held: tuple | None = None

    def update(self, done: int, detail: str = "", *, rate: float | None = None, elapsed: float | None = None) -> None:
        """`rate` (units per second) estimates the time left, and `elapsed` is the time the work took so far, as
        measured where it runs; by default, the time since this was made, and done / that."""
        now = time.monotonic()
        if now < self._next and not (done >= self.total and self._shown):
            self._held = (done, detail, rate, elapsed)
            return
        self._held = None
        self._shown = True
        self._next = now + self.every_s
        elapsed = elapsed if elapsed is not None else now - self.start
        rate = rate if rate is not None else done / elapsed if elapsed > 0 else None
        pct = 100.0 * min(done, self.total) / self.total
        when = f"{clock(elapsed)} elapsed"
        if done < self.total and rate:
            when += f", about {clock((self.total - done) / rate)} left"
        line = f"{self.what}: {done:,} of {self.total:,} {self.unit} ({pct:.0f}%), {when}"
        if self.logger:
            self.logger.info("%s%s", line, f"; {detail}" if detail else "")
        self.to_ui(pct, line + (f"  \n{detail}" if detail else ""))

    def close(self) -> None:
        """Show the update held back, if anything was shown before it."""
        if self._held and self._shown:
            self._next = 0.0
            done, detail, rate, elapsed = self._held
            self.update(done, detail, rate=rate, elapsed=elapsed)

    def to_ui(self, pct: float, description: str) -> None:
        """The progress bar in the Prefect UI, when inside a flow or task run: there is none where Prefect is not
        imported (a model server loading a hub base, a notebook), which is not made to import it (0.6 s)."""
        if "prefect.context" not in sys.modules:
            return
        from prefect.context import FlowRunContext, TaskRunContext

        if self._broken or (TaskRunContext.get() is None and FlowRunContext.get() is None):
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self._artifact is None:
                self._artifact = create_progress_artifact(pct, description=f"**{self.what}**  \n{description}")
            else:
                update_progress_artifact(self._artifact, pct, description=f"**{self.what}**  \n{description}")
        except Exception as err:  # noqa: BLE001 (an unreachable server must not fail hours of training)
            self._broken = True
            log.warning("%s: the Prefect server took no progress update (%s: %s); the log lines go on",
                        self.what, type(err).__name__, err)  # fmt: skip


def whole_events(data: bytes) -> list[dict]:
    """The events of an events file's whole lines (a line cut short by a crash, with another after it, is skipped:
    the next are whole)."""
    events = []
    for line in data.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


class Curves:
    """Training's curves from the training process's events (tasks.finetune.progress_events): the points of
    `CURVES`, as the train stage logs them to MLflow while training runs (`follow_progress`), and as the register
    stage logs those a tracking server never took (`training_points`).

    Tokens/s is the rate since the previous loss, validation time left out. `rate` (steps/s since training began,
    validation included) is the pace the time left is estimated from, as the rest of the run will validate too."""

    def __init__(self) -> None:
        self.begin: dict = {}
        self.last, self.validating = (0, 0.0), 0.0  # (step, time) of the previous loss; validation seconds since
        self.rate: float | None = None

    def points(self, event: dict) -> list[Point]:
        if "log" in event:
            return []
        step, at = event["step"], event["time"]
        if event.get("begin"):
            self.begin, self.last, self.validating = event, (step, at), 0.0
            return []
        if not self.begin:
            return []
        if "eval_loss" in event:
            self.validating += event.get("eval_runtime", 0.0)
            return [("val_loss", event["eval_loss"], step, at)]
        if "loss" not in event:
            return []
        seconds = self.elapsed(event)
        self.rate = (step - self.begin["step"]) / seconds if seconds > 0 else None
        training_s = at - self.last[1] - self.validating
        window = (step - self.last[0]) / training_s if training_s > 0 else self.rate
        self.last, self.validating = (step, at), 0.0
        points = [("train_loss", event["loss"], step, at)]
        if event.get("learning_rate") is not None:
            points.append(("learning_rate", event["learning_rate"], step, at))
        if window:
            points.append(("tokens_per_s", window * event["tokens_per_step"], step, at))
        return points

    def elapsed(self, event: dict) -> float:
        return event["time"] - self.begin["time"]


def training_points(train_dir: Path) -> list[Point]:
    """Every point of training's curves that a finished train stage's folder holds: those of its events file, at
    the times they were made, and for the steps it lacks (a resumed training's steps before the crash, whose
    events went with the crashed attempt) the losses and learning rates of the Trainer's history, at this time."""
    events = train_dir / EVENTS
    curves = Curves()
    points = [p for e in whole_events(events.read_bytes() if events.exists() else b"") for p in curves.points(e)]
    have, now = {(key, step) for key, _, step, _ in points}, time.time()
    history = {"loss.jsonl": {"train_loss": "loss", "learning_rate": "learning_rate"},  # file: {key: its field}
               "val_loss.jsonl": {"val_loss": "val_loss"}}  # fmt: skip
    for name, keys in history.items():
        for row in read_jsonl(train_dir / name) if (train_dir / name).exists() else []:
            for key, field in keys.items():
                if row.get(field) is not None and (key, int(row["step"])) not in have:
                    points.append((key, float(row[field]), int(row["step"]), now))
    return points
