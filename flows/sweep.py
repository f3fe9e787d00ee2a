"""`edgar-tune-sweep`: one finished run's data trained under a grid of settings, and the results side by side.

Each point of the grid is a run folder beside the base run, `BASE+learning_rate=0.0003+lora_r=16` (the keys whose
value differs from the base's; the point that differs in none is the base itself). A new one starts as a copy of the
base (a copy is the same run: tasks/cache.py), less the folders of the stages the point's settings make again, so
the download, the parse, the blocks and the base model's perplexity are not made again, and EDGAR is not asked
again. Each then runs as the pipeline does, stage by stage through the cache, as a flow run of its own: a sweep run
again, or resumed after a failure, finds the points that finished `Cached`.

Every point registers its version as any run does (the champion alias goes to one only if it beats the champion on
the same held-out text), and its MLflow run is nested under the sweep's own run, which holds the comparison: a table
(`sweep.json`, `sweep.md`) and a plot of the perplexity after fine-tuning of each point. The MLflow UI's Compare on
the nested runs gives the parallel-coordinates plot of the swept keys against `val_perplexity`.

Under `prune`, a point whose validation loss during training falls behind the other points' median by the same
training tokens (those finished, and those training beside it that have validated as far) stops at that validation
(tasks/pruning.py); its row says so, and a sweep without `prune` finishes it from its checkpoint.

Only keys that leave the data and what scores it alone can be swept (`FIXED`, and the keys the parse reads): another
ticker or year, another parse or split, another base model or another registry would compare perplexities on other
text or in other units.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed

from edgar_tune.config import (ConfigError, PipelineConfig, StageFailed, flat_params, load_run_config, parse_value,
                               resolve_key, tracking_uri)  # fmt: skip
from edgar_tune.reaper import watch_embedded_server
from edgar_tune.signals import run_body
from tasks.cache import OUTPUTS, STAGE_CONFIG, STAGES, downstream, reads_key
from tasks.io import TOKENIZE, atomic_write_json, atomic_write_text, read_json
from tasks.pruning import LIVE, MIN_POINTS, PRUNED, WARMUP, PointPruned, describe, peers_said
from tasks.storage import LOCK, RUN_NAME, RunFolder

log = logging.getLogger(__name__)

# Sections (and keys) a sweep does not vary, and why: the points must score the same held-out text, in the same units.
FIXED = {
    "preset": "the preset is the base run's",
    "data": "the filings (or files) are the base run's; other data holds out other text",
    "parse": "the parse decides the held-out text (Item 7) and the training text",
    "model": "another base model's perplexity is in other units (its own tokens)",
    "registry": "every point registers where the base run does",
}
POINT_FLOW = "edgar-tune-sweep-point"  # the flow of `sweep_point`, whose deployment `spread` names
POINT_DEPLOYMENT = f"{POINT_FLOW}/sweep-point"  # prefect.yaml's
POLL_SECONDS = 5.0  # how often a spread sweep reads its points' flow runs
STATUS_SECONDS = 600.0  # and how often it logs where they stand, between their changes of state
SWEEP_TAG = "edgar_tune.sweep"  # on the sweep's MLflow run and on each point's: the sweep's key (`sweep_key`)
NAME_LIMIT = 200  # characters of a point's folder name; a longer one ends in a digest
# Keys that change which held-out blocks a validation inside training scores: under them no two points' validation
# losses compare, which pruning ranks them by (as does a point that makes its blocks again: `remade`).
VALIDATION_KEYS = ("train.eval_blocks", "eval.max_val_samples")
# A range to draw values from (`--sample`): `1e-5..1e-3` uniform, `log:1e-5..1e-3` log-uniform.
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
RANGE = re.compile(rf"^(log:)?({_NUMBER})\.\.({_NUMBER})$")
DRAWS_PER_POINT = 100  # draws tried for each point of a sample before its space is taken to be too small


def parse_grid(items: list[str]) -> dict[str, list | str]:
    """`["train.learning_rate=1e-4,3e-4", "lora_r=8,16"]` -> `{"train.learning_rate": [0.0001, 0.0003], ...}`. The
    values are split at commas; a key whose value is a list takes a YAML list of its values
    (`train.lora_target_modules=[[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]]`); a range to draw from with
    `--sample` stays as its text (`learning_rate=log:1e-5..1e-3`)."""
    grid: dict[str, list | str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid `{item}` must look like key=value,value,..., e.g. "
                              "train.learning_rate=1e-4,3e-4")  # fmt: skip
        key, text = (part.strip() for part in item.split("=", 1))
        if RANGE.match(text):  # drawn from with --sample (check_grid)
            values = text
        elif text.startswith("["):
            values = parse_value(text)
        else:
            values = [parse_value(v.strip()) for v in text.split(",")]
        if key in grid:  # given once as `lora_r` and once as `train.lora_r`: check_grid says so
            raise ConfigError(f"--grid gives `{key}` twice: give its values once, with commas ({key}=a,b)")
        grid[key] = values if isinstance(values, list | str) else [values]
    return grid


def check_grid(grid: dict[str, Any]) -> dict[str, list | str]:
    """The grid with its keys in their dotted form, each a non-empty list of values or a range to draw from
    (`RANGE`'s text: `LOW..HIGH`, `log:LOW..HIGH`).

    Raises:
        ConfigError: an unknown key, a key a sweep does not vary (`FIXED`), no values, or a range whose ends are out
            of order (or not above 0, for a log range)."""
    if not grid:
        raise ConfigError("a sweep needs at least one key to vary: --grid KEY=VALUE,VALUE (e.g. "
                          "train.learning_rate=1e-4,3e-4)")  # fmt: skip
    out: dict[str, list] = {}
    for key, values in grid.items():
        dotted, why = resolve_key(key), None
        section = dotted.split(".", 1)[0]
        if dotted in STAGE_CONFIG["parse"]:  # train.instruction_tuned, train.train_data_split_seed
            why = "the parse reads it, and the parse decides the held-out text and the training text"
        if why := FIXED.get(section) or FIXED.get(dotted) or why:
            raise ConfigError(f"`{dotted}` cannot be swept: {why}. A sweep trains one run's data under other "
                              f"settings; start a run for each value instead (edgar-tune run --set {dotted}=...)")
        if dotted in out:
            raise ConfigError(f"the grid gives `{dotted}` twice (as `{key}` too): give its values once")
        if isinstance(values, str) and (match := RANGE.match(values.strip())):
            log_scale, low, high = match.group(1), float(match.group(2)), float(match.group(3))
            if not low < high or (log_scale and low <= 0):
                raise ConfigError(f"`{dotted}` ranges over {values}: give LOW..HIGH with LOW below HIGH" + (
                                  " and above 0 (a log range)" if log_scale else ""))  # fmt: skip
            out[dotted] = values.strip()
            continue
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"`{dotted}` has no values in the grid: give one or more ({dotted}=a,b)")
        out[dotted] = values
    return out


def _shown(value: Any) -> str:
    """A value as a point's folder name shows it (`0.0003`, `q_proj,v_proj`, `none`)."""
    if isinstance(value, list | tuple):
        return ",".join(_shown(v) for v in value)
    if value is None or isinstance(value, bool):
        text = str(value).lower()
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in "._-," else "_" for c in text)


def point_name(base: str, moved: dict[str, Any], keys: list[str] | None = None) -> str:
    """The folder name of the grid point that differs from the base run `base` in `moved` (key: value): each key by
    its last part, unless two of the grid's `keys` share it (`train.x` and `eval.x`)."""
    if not moved:
        return base
    last = [k.rsplit(".", 1)[-1] for k in (keys or moved)]
    parts = [f"{k if last.count(k.rsplit('.', 1)[-1]) > 1 else k.rsplit('.', 1)[-1]}={_shown(v)}"
             for k, v in moved.items()]  # fmt: skip
    name = "+".join([base, *parts])
    if len(name) > NAME_LIMIT:
        name = f"{name[: NAME_LIMIT - 13]}+{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def sweep_points(base_dir: Path, grid: dict[str, list | str], sample: int | None = None,
                 seed: int = 0) -> list[dict]:  # fmt: skip
    """Every point of the grid, in order, or `sample` points drawn from it at random (`draw`): {name, folder,
    overrides (the grid's keys), moved (those that differ from the base's value), remade (the stages its settings
    make again)}. Each point's config is checked as a run's.

    Raises:
        ConfigError: a value the key does not take (as `--set` says it), two values the config reads alike, or a
            range without `sample`."""
    base_cfg = load_run_config(base_dir)
    base = flat_params(base_cfg)
    points, names = [], {}
    if sample is None and (ranged := [k for k, v in grid.items() if isinstance(v, str)]):
        raise ConfigError(f"`{ranged[0]}` ranges over {grid[ranged[0]]}: draw points from it with --sample N (the "
                          "sweep deployment's `sample`), or list its values (key=a,b,c)")  # fmt: skip
    whole = {k for k in grid if isinstance(base[k], int) and not isinstance(base[k], bool)}  # draws whole numbers
    for values in itertools.product(*grid.values()) if sample is None else draw(grid, sample, seed, whole):
        given = dict(zip(grid, values, strict=True))
        try:
            cfg = load_run_config(base_dir, given)
        except ConfigError as err:
            raise ConfigError(f"grid point {_settings(given)}: {err}") from None
        flat = flat_params(cfg)
        overrides = {k: flat[k] for k in grid}  # as the config reads them (1e-4 and 0.0001 alike)
        moved = {k: v for k, v in overrides.items() if v != base[k]}
        name = point_name(base_dir.name, moved, list(grid))
        if name in names and names[name][1] == overrides:
            raise ConfigError(f"grid points {_settings(names[name][0])} and {_settings(given)} are the same settings "
                              f"({_settings(overrides)}): give each value once")  # fmt: skip
        if name in names:  # values that differ only in what a folder name cannot hold
            raise ConfigError(f"grid points {_settings(names[name][0])} and {_settings(given)} would share the folder "
                              f"{name}: give values that differ in letters or digits")  # fmt: skip
        names[name] = (given, overrides)
        points.append({"name": name, "folder": base_dir.parent / name, "overrides": overrides, "moved": moved,
                       "remade": remade(base_cfg, cfg), "config": cfg})  # fmt: skip
    return points


def draw(grid: dict[str, list | str], sample: int, seed: int, whole: set[str] = frozenset()) -> list[tuple]:
    """`sample` different points drawn at random from `grid` with `seed` (the same each time): each listed key's
    value uniformly from its list, each range's uniformly, or log-uniformly (`log:`), whole numbers for the keys in
    `whole` (those that hold them), others to 3 significant digits (a folder name a person reads, a value a config
    file holds as it is).

    Raises:
        ConfigError: a `sample` below 1, or more points than the grid holds."""
    if sample < 1:
        raise ConfigError(f"sample={sample}: draw 1 or more points")
    rng = random.Random(seed)
    drawers = []
    for key, values in grid.items():
        if isinstance(values, list):
            drawers.append(lambda values=values: values[rng.randrange(len(values))])
            continue
        log_scale, low, high = RANGE.match(values).groups()

        def one(low=float(low), high=float(high), log_scale=log_scale, whole=key in whole):
            x = math.exp(rng.uniform(math.log(low), math.log(high))) if log_scale else rng.uniform(low, high)
            return round(x) if whole else float(f"{x:.3g}")

        drawers.append(one)
    seen: dict[str, tuple] = {}
    for _ in range(DRAWS_PER_POINT * sample):
        values = tuple(d() for d in drawers)
        seen.setdefault(json.dumps(values, default=str), values)
        if len(seen) == sample:
            return list(seen.values())
    raise ConfigError(f"sample={sample}, but {DRAWS_PER_POINT * sample} draws from the grid gave {len(seen)} different "
                      "points: sample fewer, widen its ranges, or sweep the whole grid (no --sample)")  # fmt: skip


def remade(before: PipelineConfig, after: PipelineConfig) -> list[str]:
    """The stages that the change from `before` to `after` makes again (those that read a changed key, and what
    depends on them), and the registration."""
    old, new = flat_params(before), flat_params(after)
    moved = [k for k in new if new[k] != old.get(k)]
    out = {"register"}
    for stage in STAGES[:-1]:
        if any(reads_key(stage, cfg, k) for k in moved for cfg in (before, after)):
            out |= set(downstream(stage))
    return [s for s in STAGES if s in out]


def _settings(point: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items()) or "the base run's settings"


def sweep_key(base_ref: str, grid: dict[str, list | str], sample: int | None = None, seed: int = 0) -> str:
    """What names a sweep: its base run and its grid (and what it drew from it), so a sweep run again finds its
    MLflow run."""
    named = [base_ref, grid] if sample is None else [base_ref, grid, sample, seed]
    return hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_base(base_dir: Path, ref: str) -> None:
    """A sweep starts from a run whose every stage finished here.

    Raises:
        ConfigError: an s3:// run, or a folder that lacks a stage's outputs (the run to finish first)."""
    if "://" in ref:
        raise ConfigError(f"a sweep copies a local run folder beside it; {ref} is a URL. Sweep from a local run "
                          "(`edgar-tune run --out runs/NAME`)")  # fmt: skip
    for stage in STAGES:
        if not (base_dir / OUTPUTS[stage]).exists():
            raise ConfigError(f"{ref} has no {OUTPUTS[stage]}: a sweep starts from a finished run; finish it first "
                              f"(`edgar-tune run --out {ref}` with its settings, or `edgar-tune rerun {stage} --run "
                              f"{ref}`)")  # fmt: skip


def check_point_folder(point: dict, base_dir: Path) -> None:
    """A point's folder, where it is there already, must be this base's copy, made for the point's settings (an
    earlier sweep that stopped): anything else there is refused, and left as it is."""
    folder: Path = point["folder"]
    if folder == base_dir or not folder.exists():
        return
    problem = None
    if not (folder / "config.yaml").is_file() or not (folder / RUN_NAME).is_file():
        problem = "is not a run folder"
    elif read_json(folder / RUN_NAME) != read_json(base_dir / RUN_NAME):
        problem = f"holds another run ({read_json(folder / RUN_NAME).get('name')})"
    else:
        there, want = flat_params(load_run_config(folder)), flat_params(point["config"])
        if differ := [k for k in want if there.get(k) != want[k]]:
            problem = "holds the run with other settings (" + ", ".join(
                f"{k}={there.get(k)!r}" for k in differ[:3]) + ")"  # fmt: skip
    if problem:
        raise ConfigError(f"{folder} {problem}, where the sweep would put the point {_settings(point['moved'])}; "
                          "move it away, or sweep from another base")  # fmt: skip


def copy_base(base_dir: Path, point: dict) -> None:
    """The point's folder, as a copy of the base run less the folders of the stages it makes again; written under a
    hidden name and renamed, so a copy cut short leaves no run folder behind."""
    folder: Path = point["folder"]
    if folder.exists():
        return
    owners: dict[str, list[str]] = {}
    for stage in STAGES:
        owners.setdefault(OUTPUTS[stage].split("/")[0], []).append(stage)
    left = {f for f, stages in owners.items() if set(stages) <= set(point["remade"])} | {LOCK, "summary.json", LIVE}
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(base_dir, partial, symlinks=True,
                    ignore=lambda where, names: [n for n in names if Path(where) == base_dir and n in left])
    os.replace(partial, folder)
    log.info("sweep: %s made from %s (left out, made again: %s)", folder.name, base_dir.name,
             ", ".join(sorted(left - {LOCK, "summary.json", LIVE})) or "nothing")  # fmt: skip


def prepare(ref: str, grid: dict[str, Any], here: bool = True, sample: int | None = None,
            seed: int = 0) -> tuple[Path, dict[str, list | str], list[dict]]:  # fmt: skip
    """The base run's folder, the grid (`check_grid`) and its points (`sweep_points`), every point checked before the
    first trains, so that a refusal comes now and not hours in: its folder (`check_point_folder`) and, where the
    points train `here` (not on a work pool's workers, which check them as each starts), its engine on this machine
    (`preflight`) and, where it trains on the base's blocks, its memory plan and profile step. With `sample`, the
    points are that many drawn from the grid with `seed` (`draw`)."""
    from tasks.finetune import plan_training, preflight

    base_dir = Path(ref).expanduser().resolve()
    check_base(base_dir, ref)
    grid = check_grid(grid)
    points = sweep_points(base_dir, grid, sample, seed)
    for point in points:
        check_point_folder(point, base_dir)
        if not here:
            continue
        try:
            precision = preflight(point["config"].train)
            if "tokenize" not in point["remade"] and "train" in point["remade"]:
                with _quiet("tasks.finetune"):  # each point's plan is logged when it trains; a warning now
                    plan_training(base_dir / TOKENIZE, point["config"].train, precision)
        except ConfigError as err:
            raise ConfigError(f"grid point {_settings(point['moved'])}: {err}") from None
    return base_dir, grid, points


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The logger `name` at WARNING for a while."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@flow(name="edgar-tune-sweep-point", log_prints=True)
def sweep_point(out_dir: str, overrides: dict, if_busy: Literal["fail", "wait"] = "fail",
                prune: dict | None = None) -> Any:  # fmt: skip
    """One point of a sweep: its run folder's stages (all but the download), each `Cached` where its key stands.
    Under `prune` (the sweep's rule and the other points' folders: tasks/pruning.py) a weak training stops at a
    validation: the flow run then ends `Pruned` (a kind of Completed), and `pruned.json` in the folder says why."""
    from flows.pipeline import run_stages

    folder = RunFolder.open(out_dir)
    cfg = load_run_config(folder.local, overrides)
    try:
        summary = run_stages(folder, cfg, STAGES[1:], wait=if_busy == "wait", prune=prune)
    except PointPruned as err:
        record = err.decision | {"prefect_flow_run_id": str(flow_run.id) if flow_run.id else None,
                                 "time": time.time()}  # fmt: skip
        atomic_write_json(folder.local / PRUNED, record)
        log.warning("sweep point %s pruned at %s", folder.local.name, describe(record))
        return Completed(name="Pruned", message=describe(record), data={"pruned": record})
    (folder.local / PRUNED).unlink(missing_ok=True)  # pruned by an earlier sweep, finished now
    return summary


@flow(name="edgar-tune-sweep", log_prints=True)
def edgar_tune_sweep(run: str, grid: dict[str, list | str], if_busy: Literal["fail", "wait"] = "fail",
                     spread: str | None = None, at_once: int | None = None, prune: bool = False,
                     prune_min_points: int = MIN_POINTS, prune_warmup: float = WARMUP, sample: int | None = None,
                     sample_seed: int = 0) -> dict:  # fmt: skip
    """Train a finished run's data under every combination of the grid's values, then compare the results.

    Args:
        run: The base run: a local run folder, or the Prefect flow-run id of an edgar-tune run.
        grid: Config keys and the values to try, e.g. {"train.learning_rate": [1e-4, 3e-4], "train.lora_r": [8, 16]},
            or, with `sample`, a range to draw from ("log:1e-5..1e-3" log-uniform, "0..0.1" uniform). Not data,
            parse, model or registry keys: the points must score the same held-out text.
        if_busy: When another run works in a folder the sweep uses: fail at once, or wait for it to end.
        spread: Run each point as a flow run of this deployment of the sweep-point flow (prefect.yaml's
            `edgar-tune-sweep-point/sweep-point`, or another of its deployments, e.g. on a GPU pool), on its work
            pool's workers, at the same time as far as they take them. Empty: one after another, in this flow run.
        at_once: With `spread`, how many points may be queued or running at once (empty: all of them; the pool's
            workers and concurrency limits decide how many run).
        prune: Stop a point's training at a validation where its best validation loss so far is above the median of
            the other points' by the same training tokens (the median stopping rule: the points that finished, and
            those still training that have validated as far), keeping a checkpoint that a sweep without it resumes;
            its row says so. Needs validation during training (train.eval_steps > 0).
        prune_min_points: With `prune`: how many other points must have validated as far (finished, or still
            training) before a point is pruned.
        prune_warmup: With `prune`: the fraction of its steps a point trains before it may be pruned.
        sample: Draw this many different points from the grid at random (its ranges, and its lists), instead of
            running every combination of its lists.
        sample_seed: With `sample`: the seed of the draw (the same seed draws the same points, so a sweep run
            again finds them).
    """
    from flows.pipeline import resolve_run

    watch_embedded_server()
    with run_body():
        ref = resolve_run(run)
        deployment = check_spread(spread, at_once)
        base_dir, grid, points = prepare(ref, grid, deployment is None, sample, sample_seed)
        rule = check_prune(prune, prune_min_points, prune_warmup, points)
        uri = tracking_uri(points[0]["config"].registry.tracking_uri, base_dir.parent)
        log.info("sweep of %s: %d point(s) over %s%s", ref, len(points), ", ".join(grid),
                 f", each a flow run of {deployment} on its pool's workers" if deployment else "")  # fmt: skip
        rows: list[dict] = []
        result = {"base": ref, "grid": grid, "key": sweep_key(str(base_dir), grid, sample, sample_seed),
                  "points": rows, "mlflow_tracking_uri": uri, "prune": rule,
                  "sample": None if sample is None else {"points": sample, "seed": sample_seed}}  # fmt: skip
        experiment = points[0]["config"].registry.experiment

        def made(point: dict) -> None:
            """The point's folder, from the base's, where it is not there yet."""
            if not point["folder"].exists():  # made under the base's lock: not while a run writes in it
                with RunFolder.open(str(base_dir)).lock(wait=if_busy == "wait", flow_run=flow_run.name):
                    copy_base(base_dir, point)

        def finished(point: dict, summary: dict | None, error: str | None) -> None:
            if error is not None:
                log.error("sweep point %s failed: %s", point["name"], error)
            rows.append(_row(point, summary, error, uri))
            result["points"] = rank(rows)
            if len(rows) == len(points):  # what each registration decided, until then
                aliases_now(result["points"], uri)
            # in MLflow as it goes: the points so far, nested as each finishes (a sweep of 7B trainings takes days)
            result["mlflow_run_id"] = log_sweep(result, experiment, over=len(rows) == len(points),
                                                nest=None if result.get("mlflow_run_id") is None else rows[-1:])

        for point in points:
            point["prune"] = None if rule is None else rule | {"peers": [str(p["folder"]) for p in points
                                                                         if p is not point]}  # fmt: skip
        todo = []
        for point in points:
            if earlier := pruned_before(point, rule):  # stands under the same rule; without one, the point finishes
                log.info("sweep point %s: pruned in an earlier run of this sweep (%s)", point["name"],
                         describe(earlier))  # fmt: skip
                finished(point, {"pruned": earlier}, None)
            else:
                todo.append(point)
        if deployment:
            on_pool(todo, deployment, at_once, if_busy, made, finished)
        else:
            for i, point in enumerate(todo, 1):
                log.info("sweep point %d of %d: %s", i, len(todo), _settings(point["moved"]))
                try:
                    made(point)
                    summary = sweep_point.with_options(flow_run_name=point["name"])(
                        str(point["folder"]), point["overrides"], if_busy, point["prune"])  # fmt: skip
                except Exception as err:  # noqa: BLE001 (one point's failure leaves the others to run; raised below)
                    finished(point, None, f"{type(err).__name__}: {err}")
                else:
                    finished(point, summary, None)
        print(format_sweep(result))
        if flow_run.id:
            _publish(result)
        if failed := [r for r in rows if r.get("error")]:
            raise StageFailed(f"{len(failed)} of {len(rows)} sweep point(s) failed: " + "; ".join(
                f"{r['name']}: {r['error'].splitlines()[0]}" for r in failed) + ". Run the sweep again to retry them "
                "(the points that finished are Cached)")  # fmt: skip
        return result


def check_prune(prune: bool, min_points: int, warmup: float, points: list[dict]) -> dict | None:
    """The rule that prunes weak points ({"min_points", "warmup"}: tasks/pruning.py), or None without `prune`.

    Raises:
        ConfigError: a rule out of range, or points whose validation losses would not compare: one that validates
            not at all during training, or points that validate on other held-out blocks."""
    if not prune:
        return None
    if min_points < 1:
        raise ConfigError(f"prune_min_points={min_points}: give 1 or more (how many other points must have "
                          "validated as far before one is pruned)")  # fmt: skip
    if not 0 <= warmup < 1:
        raise ConfigError(f"prune_warmup={warmup}: give a fraction from 0 to below 1 (of a point's steps, before "
                          "which it is not pruned)")  # fmt: skip
    if silent := [p for p in points if not p["config"].train.eval_steps]:
        raise ConfigError(f"pruning judges points by their validation loss during training, and grid point "
                          f"{_settings(silent[0]['moved'])} runs none (train.eval_steps=0): add --grid "
                          "train.eval_steps=N (every point validating every N steps), or sweep without pruning")
    if moved := [k for k in VALIDATION_KEYS if len({str(p["overrides"].get(k)) for p in points}) > 1]:
        raise ConfigError(f"the grid varies {moved[0]}, so its points validate on other held-out blocks and their "
                          "validation losses do not compare: sweep it without pruning")  # fmt: skip
    if remake := [p for p in points if "tokenize" in p["remade"]]:
        raise ConfigError(f"grid point {_settings(remake[0]['moved'])} makes its blocks again, so it validates on "
                          "other held-out blocks than the others and their validation losses do not compare: sweep "
                          "it without pruning")  # fmt: skip
    return {"min_points": min_points, "warmup": warmup}


def pruned_before(point: dict, rule: dict | None) -> dict | None:
    """What pruned `point` in an earlier run of the sweep (its folder's `pruned.json`), where it stands: under the
    same rule, its training still unfinished. Without a rule, or under another, the point trains on from its
    checkpoint."""
    path = point["folder"] / PRUNED
    if rule is None or not path.is_file() or (point["folder"] / OUTPUTS["train"]).exists():
        return None
    record = read_json(path)
    return record if record.get("rule") == rule else None


def check_spread(spread: str | None, at_once: int | None) -> str | None:
    """The full name of the sweep-point deployment that `spread` names (`NAME` alone is a deployment of the
    sweep-point flow), checked on the Prefect server; None where the points run in this process.

    Raises:
        ConfigError: no server configured, no such deployment, one of another flow, an `at_once` below 1, or a pool
            whose one slot this sweep's own flow run holds (its points would wait for ever)."""
    if at_once is not None and (not spread or at_once < 1):
        raise ConfigError(f"at_once={at_once}: " + ("give 1 or more points at once" if spread else
                          "at_once is for points spread over a work pool (spread); without it they run one after "
                          "another"))  # fmt: skip
    if not spread:
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    from tasks.io import not_answering

    name = spread if "/" in spread else f"{POINT_FLOW}/{spread}"
    if name.split("/", 1)[0] != POINT_FLOW:
        raise ConfigError(f"spread={spread!r} is a deployment of the flow {name.split('/', 1)[0]!r}; the points run "
                          f"as flow runs of the sweep-point flow: give a deployment of {POINT_FLOW} (prefect.yaml's "
                          f"{POINT_DEPLOYMENT})")  # fmt: skip
    url = get_current_settings().api.url
    if not url:
        raise ConfigError("spreading a sweep over a work pool needs a Prefect server that its workers poll, and "
                          "PREFECT_API_URL is unset (a temporary embedded server has no deployment and no worker): "
                          "`make server`, `make deploy`, `make worker`, then PREFECT_API_URL=http://HOST:4200/api; or "
                          "sweep without spreading")  # fmt: skip
    if gone := not_answering(url, "the Prefect server"):
        raise ConfigError(f"PREFECT_API_URL: {gone}; start it (`make server`), or sweep without spreading")
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(f"the Prefect server at {url} has no deployment {name}: deploy prefect.yaml's "
                              f"(`make deploy`), or give another with spread") from None  # fmt: skip
        if not dep.work_pool_name:
            raise ConfigError(f"deployment {name} has no work pool, so no worker would run its points; give it one "
                              "(prefect.yaml's work_pool)")  # fmt: skip
        pool = client.read_work_pool(dep.work_pool_name)
        here = client.read_flow_run(flow_run.id).work_pool_name if flow_run.id else None
        if pool.concurrency_limit is not None and pool.concurrency_limit <= 1 and here == pool.name:
            raise ConfigError(f"work pool {pool.name} runs {pool.concurrency_limit} flow run at a time, and this "
                              f"sweep's run holds it: its points would wait for ever. Run the sweep on another pool "
                              f"(or from the CLI), or raise the pool's limit (prefect work-pool set-concurrency-limit "
                              f"{pool.name} N)")  # fmt: skip
        status = getattr(pool.status, "value", pool.status)
        if status in ("NOT_READY", "PAUSED"):
            log.warning("sweep: work pool %s is %s: the points wait until %s", pool.name,
                        "paused" if status == "PAUSED" else "polled by no worker now",
                        f"it is resumed (prefect work-pool resume {pool.name})" if status == "PAUSED" else
                        f"a worker starts (prefect worker start --pool {pool.name})")  # fmt: skip
    return name


def on_pool(points: list[dict], deployment: str, at_once: int | None, if_busy: str, made: Callable[[dict], None],
            finished: Callable[[dict, dict | None, str | None], None]) -> None:
    """Each point as a flow run of `deployment` (on its work pool's workers), `at_once` of them queued or running
    at a time (all, where None), `finished` called for each as it ends. Where this stops before they all ended (a
    cancel, a crash), those still queued or running are cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    waiting, running, seen = list(enumerate(points, 1)), {}, {}
    last_status = time.monotonic()
    with get_client(sync_client=True) as client:
        try:
            while waiting or running:
                while waiting and (at_once is None or len(running) < at_once):
                    i, point = waiting.pop(0)
                    try:
                        made(point)
                        fr = _queue(deployment, point, if_busy, f"{flow_run.id}/{flow_run.run_count}/{point['name']}")
                    except Exception as err:  # noqa: BLE001 (the others run; the sweep fails at the end)
                        finished(point, None, f"{type(err).__name__}: {err}")
                        continue
                    log.info("sweep point %d of %d: %s: flow run %s (%s), queued", i, len(points),
                             _settings(point["moved"]), fr.name, fr.id)  # fmt: skip
                    running[fr.id], seen[fr.id] = point, "SCHEDULED"
                time.sleep(POLL_SECONDS)
                for run_id, point in list(running.items()):
                    try:
                        fr = client.read_flow_run(run_id)
                    except Exception as err:  # noqa: BLE001 (a server busy for a while: the points run on; read again)
                        log.warning("sweep: point %s's flow run could not be read (%s: %s); reading it again",
                                    point["name"], type(err).__name__, err)  # fmt: skip
                        continue
                    kind = fr.state.type.value if fr.state else "SCHEDULED"
                    if kind != seen[run_id]:
                        seen[run_id] = kind
                        if kind == "RUNNING":
                            log.info("sweep point %s: running", point["name"])
                    if fr.state is not None and fr.state.is_final():
                        del running[run_id]
                        finished(point, *_pool_result(point, fr))
                if running and time.monotonic() - last_status > STATUS_SECONDS:
                    last_status = time.monotonic()
                    states = [f"{p['name']}: {seen[r].lower()}" for r, p in running.items()]
                    log.info("sweep: %d of %d point(s) ended; %s%s", len(points) - len(running) - len(waiting),
                             len(points), "; ".join(states), f"; {len(waiting)} not queued yet" if waiting else "")
        finally:
            for run_id, point in running.items():  # only where this stopped early
                with contextlib.suppress(Exception):
                    fr = client.read_flow_run(run_id)
                    if fr.state is None or not fr.state.is_final():
                        started = fr.state is not None and fr.state.type.value in ("RUNNING", "CANCELLING")
                        message = "the sweep that queued it stopped"
                        client.set_flow_run_state(run_id, Cancelling(message=message) if started else
                                                  Cancelled(message=message), force=True)  # fmt: skip
                        log.warning("sweep: point %s's flow run %s cancelled (the sweep stopped)", point["name"],
                                    fr.name)  # fmt: skip


def _queue(deployment: str, point: dict, if_busy: str, key: str, tries: int = 3) -> Any:
    """The point's flow run of `deployment`, made once: `key` (the sweep's flow run, its attempt and the point)
    makes the server answer a request made again with the run it made. Prefect's client makes a request again when
    the server has not answered in its timeout (a SQLite server waits up to 60 s for its lock), which had made the
    point twice, the second run waiting for the first's folder and then finding it all `Cached`."""
    from prefect.deployments import run_deployment

    for attempt in range(1, tries + 1):
        try:
            return run_deployment(deployment, parameters={"out_dir": str(point["folder"]), "overrides":
                                  point["overrides"], "if_busy": if_busy, "prune": point.get("prune")},
                                  flow_run_name=point["name"], timeout=0, idempotency_key=key)  # fmt: skip
        except Exception as err:  # noqa: BLE001 (asked again with the same key; the last failure is the point's)
            if attempt == tries:
                raise
            log.warning("sweep: queueing %s failed (%s: %s); asking again", point["name"], type(err).__name__, err)
    raise AssertionError("unreachable")


def _pool_result(point: dict, fr: Any) -> tuple[dict | None, str | None]:
    """(summary, None) of a point's flow run that completed ({"pruned": why} where it was pruned), or (None, why
    it did not)."""
    if not fr.state.is_completed():
        message = (fr.state.message or "").strip()
        return None, f"flow run {fr.name} {fr.state.name}" + (f": {message}" if message else "")
    if fr.state.name == "Pruned":
        path = point["folder"] / PRUNED
        record = read_json(path) if path.is_file() else {}
        if record.get("prefect_flow_run_id") == str(fr.id):
            return {"pruned": record}, None
    path = point["folder"] / "summary.json"
    summary = read_json(path) if path.is_file() else {}
    if summary.get("prefect_flow_run_id") != str(fr.id):  # another file system than the worker's
        return None, (f"flow run {fr.name} completed, but {path} is not its summary (the worker wrote it where this "
                      "sweep does not see it: give the workers and the sweep the same file system)")
    return summary, None


def _row(point: dict, summary: dict | None, error: str | None = None, uri: str | None = None) -> dict:
    row = {"name": point["name"], "folder": str(point["folder"]), "settings": point["overrides"],
           "moved": point["moved"]}  # fmt: skip
    if summary is None:
        return row | {"error": error}
    if "pruned" in summary:  # its training's MLflow run (curves so far, KILLED) is in the sweep's store
        return row | {"pruned": summary["pruned"], "mlflow_run_id": summary["pruned"].get("mlflow_run_id"),
                      "mlflow_tracking_uri": uri}  # fmt: skip
    keep = ("ppl_before", "ppl_after", "ppl_change_pct", "registered_model", "model_version", "model_alias",
            "mlflow_tracking_uri", "mlflow_run_id", "train_steps", "train_tokens_seen", "seconds", "stages",
            "champion_comparison")  # fmt: skip
    return row | {k: summary.get(k) for k in keep}


def aliases_now(rows: list[dict], uri: str) -> None:
    """Each point's version's aliases as the registry holds them once the sweep is over (`model_alias`: a point that
    took the champion alias may have lost it to a later one, and the base's was decided before the sweep). A point
    registered in another store (a base run copied from elsewhere) keeps what its registration decided."""
    import mlflow

    try:
        client = mlflow.MlflowClient(uri)
        for r in rows:
            if _scored(r) and r["mlflow_tracking_uri"] == uri:
                version = client.get_model_version(r["registered_model"], str(r["model_version"]))
                r["model_alias"] = ",".join(sorted(version.aliases)) or None
    except Exception as err:  # noqa: BLE001 (the table says what each registration decided)
        log.warning("sweep: the aliases now could not be read from %s (%s: %s); shown as registered", uri,
                    type(err).__name__, err)  # fmt: skip


def _scored(row: dict) -> bool:
    """Whether the point finished, with its perplexity after fine-tuning (not failed, not pruned)."""
    return not row.get("error") and not row.get("pruned")


def rank(rows: list[dict]) -> list[dict]:
    """Lowest perplexity after fine-tuning first; then the pruned points, lowest validation loss first; failed
    points last, in grid order."""
    return sorted(rows, key=lambda r: (1 if r.get("pruned") else 2 if r.get("error") else 0,
                                       r["pruned"]["best_val_loss"] if r.get("pruned") else r.get("ppl_after") or 0.0))


def format_sweep(result: dict) -> str:
    """The sweep as printed: a row per point, best first; a failed or pruned point's row says so across the
    columns of the scores."""
    keys = list(result["grid"])
    short = [k.rsplit(".", 1)[-1] for k in keys]
    head = ["", *short, "before", "after", "change", "version", "train", "made"]
    lines = []
    for i, r in enumerate(result["points"]):
        cells = [("*" if i == 0 and _scored(r) else " "), *(_shown(r["settings"][k]) for k in keys)]
        if r.get("error"):
            lines.append([*cells, "failed: " + r["error"].splitlines()[0][:80]])
            continue
        if r.get("pruned"):
            d = r["pruned"]
            lines.append([*cells, f"pruned at step {d['step']}/{d['planned_steps']}: validation loss "
                          f"{d['best_val_loss']:.4f} > median {d['median']:.4f} of {peers_said(d, short=True)}"])
            continue
        ran = [s for s, state in (r["stages"] or {}).items() if state == "Completed"]
        cells += [f"{r['ppl_before']:.3f}", f"{r['ppl_after']:.3f}", f"{r['ppl_change_pct']:+.1f}%",
                  f"v{r['model_version']}" + (f" @{r['model_alias']}" if r["model_alias"] else "")
                  + ("" if r["mlflow_tracking_uri"] == result["mlflow_tracking_uri"] else " (another store)"),
                  f"{(r['seconds'] or {}).get('train', 0):.0f}s" if "train" in ran else "cached",
                  ("base run" + (f": {', '.join(ran)}" if ran else "")) if not r["moved"] else
                  ("all cached" if not ran else ", ".join(ran))]  # fmt: skip
        lines.append(cells)
    whole = [head, *(row for row in lines if len(row) == len(head))]  # the others' last cell spans the scores
    widths = [max(len(str(row[c])) for row in whole) for c in range(len(head))]
    drawn = result.get("sample")
    out = [f"edgar-tune sweep of {result['base']}: {len(result['points'])} point(s)" + (
           f" drawn at random from the grid (seed {drawn['seed']})" if drawn else "") + ", perplexity on held-out "
           "validation text, lowest first"]  # fmt: skip
    out += ["  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip()
            for row in [head, *lines]]  # fmt: skip
    if rule := result.get("prune"):
        out.append(f"Pruned: a point whose best validation loss was above the median of {rule['min_points']} or "
                   f"more other points' by the same training tokens (finished, or training and as far), after "
                   f"{rule['warmup']:.0%} of its steps")  # fmt: skip
    if result.get("mlflow_run_id"):
        out.append(f"MLflow: run {result['mlflow_run_id']} at {result['mlflow_tracking_uri']}, the points' runs "
                   "nested under it")  # fmt: skip
    return "\n".join(out)


def log_sweep(result: dict, experiment: str, over: bool = True, nest: list[dict] | None = None) -> str | None:
    """The sweep's MLflow run (found again by its key when the sweep runs again): its grid, the table and a plot of
    the points so far, the runs of the points in `nest` (default: every finished one) nested under it; ended when the
    sweep is `over`. None, after a warning, where MLflow cannot be written (the table is printed)."""
    import tempfile

    import mlflow

    uri = result["mlflow_tracking_uri"]
    try:
        client = mlflow.MlflowClient(uri)
        run_id = result.get("mlflow_run_id")  # written after an earlier point of this sweep
        if run_id is None:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            found = client.search_runs([exp_id], f"tags.`{SWEEP_TAG}` = '{result['key']}' and "
                                       f"tags.`{SWEEP_TAG}.role` = 'sweep'", max_results=1)  # fmt: skip
            tags = {SWEEP_TAG: result["key"], f"{SWEEP_TAG}.role": "sweep", "edgar_tune.base_run": result["base"]}
            run_id = found[0].info.run_id if found else client.create_run(
                exp_id, run_name=f"sweep-{Path(result['base']).name}", tags=tags).info.run_id  # fmt: skip
            if not found:
                client.log_param(run_id, "grid", json.dumps(result["grid"], default=str)[:6000])
                if result.get("sample"):
                    client.log_param(run_id, "sample", json.dumps(result["sample"]))
        done = [r for r in result["points"] if _scored(r)]
        if done:
            client.log_metric(run_id, "best_val_perplexity", done[0]["ppl_after"])
        client.set_tag(run_id, f"{SWEEP_TAG}.prune", json.dumps(result.get("prune")))
        client.log_metric(run_id, "pruned_points", sum(1 for r in result["points"] if r.get("pruned")))
        with tempfile.TemporaryDirectory() as tmp:
            atomic_write_json(Path(tmp) / "sweep.json", result)
            atomic_write_text(Path(tmp) / "sweep.md", format_sweep(result) + "\n")
            if done:
                _plot(Path(tmp) / "sweep_perplexity.png", result, done)
            client.log_artifacts(run_id, tmp)
        for r in [r for r in (result["points"] if nest is None else nest) if not r.get("error")]:
            if not r.get("mlflow_run_id"):  # a pruned point whose training MLflow did not take
                continue
            if r["mlflow_tracking_uri"] != uri:  # a base run copied from elsewhere, registered there
                log.info("sweep: %s registered in %s, not in %s: its run is not nested", r["name"],
                         r["mlflow_tracking_uri"], uri)  # fmt: skip
                continue
            client.set_tag(r["mlflow_run_id"], "mlflow.parentRunId", run_id)
            client.set_tag(r["mlflow_run_id"], SWEEP_TAG, result["key"])
        if over:
            client.set_terminated(run_id, "FAILED" if any(r.get("error") for r in result["points"]) else "FINISHED")
        else:
            client.update_run(run_id, "RUNNING")  # a sweep run again reopens its run until it is over
        return run_id
    except Exception as err:  # noqa: BLE001 (the points are registered; the comparison is printed)
        log.warning("sweep: MLflow at %s took no run for the comparison (%s: %s)", uri, type(err).__name__, err)
        return None


def _plot(path: Path, result: dict, done: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [", ".join(f"{k.rsplit('.', 1)[-1]}={_shown(r['settings'][k])}" for k in result["grid"]) for r in done]
    after = [r["ppl_after"] for r in done]
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.35 * len(done)))
    # dots, not bars: the points differ by a little of perplexity's whole, which bars from zero would hide
    ax.plot(after, range(len(done)), "o", color="tab:blue")
    ax.plot(after[:1], [0], "o", color="tab:green", markersize=9)
    pad = max((max(after) - min(after)) * 0.25, max(after) * 0.002)
    ax.set_xlim(min(after) - pad, max(after) + 2.5 * pad)  # room for the labels on the right
    ax.set_ylim(len(done) - 0.5, -0.5)  # best on top
    ax.set_yticks(range(len(done)), names, fontsize=8)
    for i, r in enumerate(done):
        ax.annotate(f"  {r['ppl_after']:.3f} ({r['ppl_change_pct']:+.1f}%)", (r["ppl_after"], i), va="center",
                    fontsize=7)  # fmt: skip
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("perplexity on held-out validation text after fine-tuning (lower is better)")
    ax.set_title(f"Sweep of {Path(result['base']).name}: {len(done)} point(s); before fine-tuning "
                 f"{done[0]['ppl_before']:.3f}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _publish(result: dict) -> None:
    """The comparison on the sweep's flow run page in the Prefect UI (Artifacts)."""
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(markdown="```\n" + format_sweep(result) + "\n```", key="edgar-tune-sweep",
                                 description=f"sweep of {result['base']}")  # fmt: skip
    except Exception as err:  # noqa: BLE001 (the table is printed and in MLflow)
        log.warning("sweep: the Prefect server took no artifact (%s: %s)", type(err).__name__, err)
