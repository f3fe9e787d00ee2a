"""Pruning a sweep's weak points: the median stopping rule, judged at each validation inside training.

A point of a sweep (flows/sweep.py) that trains under a rule stops at a validation where its best validation loss so
far is higher than the median of the other points' best validation loss by the same number of training tokens,
counting the points whose training has finished (their whole curves, `04_train/val_loss.jsonl`) and the points still
training that have validated as far (their curves so far, `LIVE`, which each training under a rule keeps in its run
folder), once `min_points` of them count and once it has trained `warmup` of its steps. Points spread over a pool
train at the same time: the first of them, as many as there are workers, are judged against each other, not only
once some have finished. A pruned point counts for none (its curve stopped where it was behind). Tokens, not steps,
line the curves up, so points that differ in batch size or accumulation compare at the same amount of text read.
(Golovin et al., "Google Vizier", 2017, and Ray Tune's MedianStoppingRule, which counts the trials that have reported
as far, judge the same way.)

The training stops after that validation with a checkpoint of its step: a sweep run again without the rule
resumes the point there and finishes it. Nothing else of it is published, and its stage fails with `PointPruned`,
which the sweep's point flow turns into a `Pruned` state and a `pruned.json` in the point's folder.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

from edgar_tune.config import StageFailed
from tasks.io import TRAIN, atomic_write_text, read_json, read_jsonl

log = logging.getLogger(__name__)

PRUNED = "pruned.json"  # what the rule decided: in the training's temp folder, then in the point's run folder
LIVE = f"{TRAIN}.validations.jsonl"  # in a run folder: its training's validations so far, under a rule, until published
MIN_POINTS = 2  # points that validated as far before any is pruned: one alone is one training's noise
WARMUP = 0.25  # of a point's steps before it may be pruned: a lower learning rate is behind early, and may end ahead
RULE_KEYS = ("min_points", "warmup")  # what a rule is, less the peers it reads; a decision stands under the same


class PointPruned(StageFailed):
    """The training stopped at a validation where the sweep's rule judged it weak (`judge`); `decision` says why."""

    def __init__(self, decision: dict) -> None:
        self.decision = decision
        kept = (f"a checkpoint of step {decision['step']} is kept, from which a sweep without --prune finishes it"
                if decision.get("checkpoint", True) else "no checkpoint is kept (train.save_steps=0): a sweep "
                "without --prune trains it from the start")  # fmt: skip
        super().__init__(f"pruned by the sweep's median rule: {describe(decision)}; {kept}")


def describe(decision: dict) -> str:
    """`step 20 of 60: best validation loss 5.1230 > 4.8710, the median of 2 finished point(s) by the same tokens`
    (`... of 4 point(s) (1 still training) by ...` where some were)."""
    return (f"step {decision['step']} of {decision['planned_steps']}: best validation loss "
            f"{decision['best_val_loss']:.4f} > {decision['median']:.4f}, the median of {peers_said(decision)} by the "
            "same tokens")  # fmt: skip


def peers_said(decision: dict, short: bool = False) -> str:
    """Whom `decision` was judged against: `2 finished point(s)`, or `4 point(s) (1 still training)` (short: `2
    finished`, `4, 1 training`)."""
    n, training = len(decision["peers"]), len(decision.get("training", ()))  # none before 2026-12-06's records
    if not training:
        return f"{n} finished" if short else f"{n} finished point(s)"
    return f"{n}, {training} training" if short else f"{n} point(s) ({training} still training)"


def curve_of(folder: Path) -> list[tuple[int, float]] | None:
    """A finished training's validations in `folder` (a run folder) as (training tokens seen, loss), or None where
    its training has not finished there or ran no validation."""
    stats, losses = folder / TRAIN / "stats.json", folder / TRAIN / "val_loss.jsonl"
    if not stats.is_file() or not losses.is_file():
        return None
    try:
        done = read_json(stats)
        per_step = done["train_tokens_seen"] / done["steps"]
        return [(round(row["step"] * per_step), float(row["val_loss"])) for row in read_jsonl(losses)] or None
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):  # one being written, or of an old layout
        return None


def live_curve(folder: Path) -> list[tuple[int, float]] | None:
    """The validations so far (training tokens seen, loss) of a training under a rule in `folder` (a run folder):
    one still training, or one that stopped (killed, or pruned: `judge` leaves those out); None where there are
    none."""
    try:
        return sorted((int(row["tokens"]), float(row["val_loss"])) for row in read_jsonl(folder / LIVE)) or None
    except (OSError, ValueError, KeyError, TypeError):  # none there, or of another layout: not counted
        return None


def write_live(path: Path, log_history: list[dict], tokens_per_step: int) -> None:
    """`LIVE` at `path`: the validations of `log_history` (a Trainer's, those before a resume included) as rows of
    step, tokens and loss, replaced whole (a point that reads it finds the last whole one)."""
    rows = [{"step": h["step"], "tokens": h["step"] * tokens_per_step, "val_loss": h["eval_loss"]}
            for h in log_history if "eval_loss" in h]  # fmt: skip
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def best_by(curve: list[tuple[int, float]], tokens: int) -> float | None:
    """The lowest finite loss of `curve` by `tokens` (inf where all were not finite), or None where it has no
    validation that early."""
    seen = [loss for at, loss in curve if at <= tokens]
    return min((x for x in seen if math.isfinite(x)), default=math.inf) if seen else None


def judge(best: float, step: int, planned: int, tokens: int, rule: dict) -> dict | None:
    """The decision to prune a point whose best validation loss so far is `best`, at `step` of `planned`, having
    read `tokens`, under `rule` ({"peers": other points' run folders, "min_points", "warmup"}); None to go on.
    The peers that count: those whose training finished, and those still training that have validated by as many
    tokens or more (their best by `tokens`, as a finished one's); not a pruned one."""
    if step >= planned or step < rule["warmup"] * planned:
        return None
    peers, training = {}, []
    for folder in map(Path, rule["peers"]):
        if (curve := curve_of(folder)) is None:
            curve = None if (folder / PRUNED).exists() else live_curve(folder)
            if curve is None or curve[-1][0] < tokens:  # it may yet do better by then
                continue
            training.append(folder.name)
        if (theirs := best_by(curve, tokens)) is not None:
            peers[folder.name] = theirs
    if len(peers) < rule["min_points"]:
        return None
    median = statistics.median(peers.values())
    if best <= median:  # a NaN loss is no better than any median: a diverging point is pruned
        return None
    return {"step": step, "planned_steps": planned, "tokens": tokens, "best_val_loss": best, "median": median,
            "peers": peers, "training": training, "rule": {k: rule[k] for k in RULE_KEYS}}  # fmt: skip


def prune_weak(rule: dict, tokens_per_step: int, live: Path):
    """A Trainer callback that judges the training at each validation under `rule` (`judge`) and, where it is
    weak, stops it after that step with a checkpoint of it. Rank 0 keeps the validations so far in `live` (`LIVE`,
    for the other points to judge by) and reads the other points' curves; under a launcher the ranks agree by one
    all-reduce, as they do for a SIGTERM. `decision` is then set on every rank (rank 0's says why)."""
    from transformers import TrainerCallback

    from tasks.finetune import _any_rank

    class PruneWeak(TrainerCallback):
        def __init__(self) -> None:
            self.decision: dict | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # a resumed training's validations are its checkpoint's, none after
                write_live(live, state.log_history, tokens_per_step)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if "eval_loss" not in (metrics or {}) or self.decision is not None:
                return
            decision = None
            if state.is_world_process_zero:  # its validations so far, those before a resume too (the checkpoint's)
                write_live(live, state.log_history, tokens_per_step)  # this one included: logged before this call
                losses = [h["eval_loss"] for h in state.log_history if "eval_loss" in h] + [metrics["eval_loss"]]
                best = min((x for x in losses if math.isfinite(x)), default=math.inf)  # none finite: worse than any
                decision = judge(best, state.global_step, state.max_steps, state.global_step * tokens_per_step, rule)
            if (_any_rank(decision is not None, args.device) if args.world_size > 1 else decision is not None):
                self.decision = decision or {}
                control.should_training_stop = True
                control.should_save = self.decision["checkpoint"] = args.save_strategy != "no"
                if decision:
                    log.warning("pruned: %s; training stops after this step%s", describe(decision),
                                ", with a checkpoint of it" if control.should_save else "")  # fmt: skip

        def on_save(self, args, state, control, **kwargs):
            if self.decision is not None:  # nothing is published: load_best_model_at_end's reload would be waste
                state.best_model_checkpoint = None

    return PruneWeak()
