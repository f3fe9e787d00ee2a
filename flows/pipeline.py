"""The edgar-tune flows.

`edgar-tune`: download -> parse -> tokenize -> evaluate the base -> fine-tune -> evaluate -> register. Every
stage is cached on what it reads (tasks/cache.py), so a run with the same parameters is all `Cached`, a change
to a training hyperparameter reuses the data stages, and the UI's Retry of a failed run redoes only the stage
that failed and those after it.

`edgar-tune-rerun`: recompute one stage of an existing run from its recorded config (config.yaml), then every
stage that depends on it; nothing upstream runs.
"""

from __future__ import annotations

from tasks.progress import settle_console

# Before anything imports tqdm, which reads TQDM_DISABLE once, at import: a worker's console in a file or a pipe gets
# log lines, no bar redraws (tasks.progress.console_bars). The worker loads this file as a script, not `flows`.
settle_console()

import logging
import time
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from edgar_tune.config import ConfigError, PipelineConfig, RerunNeeded, RunParameters, flow_run_id, tracking_uri
from edgar_tune.reaper import watch_embedded_server
from edgar_tune.signals import as_signal, run_body
from flows.logs import logs_into_the_flow_run
from tasks.cache import (
    NEEDS,
    OUTPUTS,
    STAGES,
    at_commit,
    changed,
    config_view,
    decide,
    kept_otherwise,
    lacking,
    needing,
    read_stamps,
    record,
    rerun_config,
    rerun_stages,
    why_it_runs,
)
from tasks.finetune import plan_training, preflight
from tasks.io import (
    DOWNLOAD, EVALUATE, PARSE, REGISTER, TOKENIZE, TRAIN, atomic_write_json, atomic_write_text, joined,
    read_json,
)  # fmt: skip
from tasks.models import check_model_name
from tasks.stages import (
    download_filings,
    evaluate_perplexity,
    extract_sections,
    finetune_model,
    pack_blocks,
    register_model,
)
from tasks.storage import RunFolder, check_run_folder
from tasks.textdata import data_locations

log = logging.getLogger(__name__)


logs_into_the_flow_run()

Stage = Literal["download", "parse", "tokenize", "evaluate-base", "train", "evaluate", "register"]


@flow(name="edgar-tune", log_prints=True)
def edgar_tune_pipeline(params: RunParameters = RunParameters()) -> dict:  # noqa: B008 (never mutated)
    """Domain-adapt a causal LM to 10-K filings and register it; returns the run summary."""
    watch_embedded_server()
    with run_body():  # a signal that lands in a finalizer or a library's bare `except:` is not lost, nor does one
        # that cuts a logging call short hang the exit (edgar_tune/signals.py)
        cfg = params.load()
        check_run_folder(params.out_dir)
        return run_stages(RunFolder.open(params.out_dir), cfg, STAGES, wait=params.if_busy == "wait")


@flow(name="edgar-tune-rerun", log_prints=True)
def edgar_tune_rerun(stage: Stage, run: str, overrides: dict | None = None,
                     if_busy: Literal["fail", "wait"] = "fail") -> dict:  # fmt: skip
    """Recompute one stage of a run from its recorded config, then every stage that depends on it.

    Args:
        stage: The stage to recompute; the stages after it that depend on it are recomputed too, and the other
            perplexity (before or after fine-tuning) where the change moves its key, so both are scored alike.
        run: The run folder, its s3:// URL, or the Prefect flow-run id of the edgar-tune run.
        overrides: Config keys to change first, e.g. {"train.learning_rate": 1e-4}; recorded in config.yaml. A
            key that a stage the rerun does not run reads (data.tickers for a rerun of train) is refused.
        if_busy: When another run works in the folder: fail at once, or wait for it to end.
    """
    watch_embedded_server()
    with run_body():
        folder = RunFolder.open(resolve_run(run))
        folder.pull(["config.yaml"])
        rerun_config(stage, folder.local, overrides, folder.ref)  # a bad key fails now, not after a wait
        with _holding(folder, if_busy == "wait"):
            folder.pull(["config.yaml"])  # as the run that held the folder left it
            cfg = rerun_config(stage, folder.local, overrides, folder.ref)
            todo, forced = rerun_stages(stage)
            return _run_stages(folder, cfg, todo, force=forced)


def resolve_run(run: str) -> str:
    """A run folder or URL as given, or the `out_dir` parameter of the edgar-tune flow run with that id. A local
    folder must be there: a rerun of one that is not (mistyped, or moved since the flow run) stops with where it
    looked, and makes no empty folder in its place."""
    run_id = flow_run_id(run)
    if run_id is None:
        if "://" not in run and not Path(run).expanduser().is_dir():
            raise ConfigError(f"run folder {run} does not exist; give the folder of a run (`edgar-tune run --out "
                              "DIR`), its s3:// URL or its flow run's id")  # fmt: skip
        return run
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            fr = client.read_flow_run(run_id)
        except ObjectNotFound:
            from prefect.settings import get_current_settings

            url = get_current_settings().api.url
            server = f"the Prefect server at {url}" if url else "the embedded Prefect server (PREFECT_API_URL unset)"
            raise ConfigError(f"{server} has no flow run {run}; give the run folder (`--run DIR`), or set "
                              "PREFECT_API_URL to the server that ran it") from None  # fmt: skip
    params = fr.parameters.get("params")
    if params is None:
        raise ConfigError(f"flow run {run} is not an edgar-tune pipeline run (it has no `params`); give the run folder")
    out_dir = RunParameters.model_validate(params).out_dir
    if "://" not in out_dir and not Path(out_dir).is_absolute() and not Path(out_dir).exists():
        raise ConfigError(f"flow run {run} wrote to {out_dir!r} relative to its worker's folder, which is not "
                          f"here ({Path.cwd()}); run from there or give the run folder")  # fmt: skip
    if "://" not in out_dir and not Path(out_dir).expanduser().is_dir():
        raise ConfigError(f"flow run {run} wrote to {out_dir}, which is not there now (moved or removed); give the "
                          "run folder where it is (`--run FOLDER`): a run folder moved keeps its stages")  # fmt: skip
    return out_dir


def run_stages(folder: RunFolder, cfg: PipelineConfig, todo: tuple[str, ...] | list[str],
               force: bool | list[str] = False, wait: bool = False, prune: dict | None = None) -> dict:  # fmt: skip
    """Run the stages in `todo` (pipeline order) in `folder`; the others must have left their outputs.

    `force` recomputes every stage in `todo` (or those it names); otherwise a stage whose key is unchanged and
    whose outputs are still in the folder is `Cached`. The folder is held for the whole run: a second run or rerun
    of the same folder fails at once, naming the first, before it writes anything, or with `wait` waits for the
    first to end. `prune`: a sweep's rule for its training (tasks/pruning.py).
    """
    with _holding(folder, wait):
        return _run_stages(folder, cfg, todo, force, prune)


def _holding(folder: RunFolder, wait: bool):
    """The folder's lock, in this flow run's name."""
    return folder.lock(wait=wait, flow_run=flow_run.name, flow_run_id=str(flow_run.id) if flow_run.id else None)


def _run_stages(folder: RunFolder, cfg: PipelineConfig, todo: tuple[str, ...] | list[str],
                force: bool | list[str], prune: dict | None = None) -> dict:  # fmt: skip
    import yaml

    run_dir = folder.local
    forced = set(todo) if force is True else set(force or ())
    precision = preflight(cfg.train) if "train" in todo else None  # a GPU-only engine fails here, not after data
    if {"train", "register"} & set(todo):  # and a store MLflow cannot open ($MLFLOW_TRACKING_URI), not after training
        tracking_uri(cfg.registry.tracking_uri, run_dir.parent)
    at = cfg
    if "tokenize" in todo:  # the one stage that reads `model.name`; the later ones load what it resolved
        at = at_commit(cfg, check_model_name(cfg.model.name, cfg.model.revision))
    skipped = [s for s in STAGES if s not in todo]
    folder.pull([OUTPUTS[s].split("/")[0] for s in skipped] + [f".stages/{s}.json" for s in skipped])
    if why := lacking(run_dir, todo, folder.ref):
        raise ConfigError(why)
    if why := kept_otherwise(run_dir, cfg, todo):
        raise RerunNeeded(why).for_run(folder.ref)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    folder.push(["config.yaml"])
    folder.name_run()
    flow_run_id = str(flow_run.id) if flow_run.id else None
    timings: dict[str, float] = {}
    states: dict[str, str] = {s: "skipped" for s in skipped}
    decided: dict[str, tuple[bool, str, dict]] = {}
    for stage in [s for s in STAGES if s in todo]:
        # A run that cannot fit stops before any model runs; one whose training is cached has nothing to plan.
        if stage == "evaluate-base" and "train" in todo:
            decided["train"] = _must_run(folder, cfg, "train", "train" in forced)  # its one input is final
            if decided["train"][0]:
                plan_training(run_dir / TOKENIZE, cfg.train, precision)
        start = time.perf_counter()
        states[stage] = _run_stage(folder, at if stage == "tokenize" else cfg, stage, stage in forced, flow_run_id,
                                   decided.get(stage), prune)  # fmt: skip
        timings[stage] = round(time.perf_counter() - start, 1)
    summary = build_summary(run_dir, cfg.preset, timings, flow_run_id) | {"stages": states, "run": folder.ref}
    atomic_write_json(run_dir / "summary.json", summary)
    folder.push(["summary.json"])
    print(format_summary(summary))
    if flow_run_id:  # the result on the flow run's page in the UI, and in each model's timeline of runs
        from flows.artifacts import announce_registration, publish_run

        publish_run(summary, run_dir)
        if states.get("register") == "Completed":  # a version registered now, not one a cached run found
            announce_registration(summary)
    return summary


def _run_stage(folder: RunFolder, cfg: PipelineConfig, stage: str, force: bool, flow_run_id: str | None,
               decided: tuple[bool, str, dict] | None = None, prune: dict | None = None) -> str:  # fmt: skip
    """Run (or find cached) one stage; return its Prefect state name (Completed or Cached). `decided`: what
    `_must_run` already said of it in this run; `prune`, a sweep's rule for training."""
    run_dir = folder.local
    fresh, key, inputs = decided or _must_run(folder, cfg, stage, force)
    view = config_view(cfg, stage)
    task, args = {
        "download": (download_filings, (run_dir, view.data)),
        "parse": (extract_sections, (run_dir, view)),
        "tokenize": (pack_blocks, (run_dir, view)),
        "evaluate-base": (evaluate_perplexity, (run_dir, view.eval, False, view.generate)),
        "train": (finetune_model, (run_dir, view.train, view.eval, cfg.registry, cfg.preset, flow_run_id, prune)),
        "evaluate": (evaluate_perplexity, (run_dir, view.eval, True, view.generate)),
        "register": (register_model, (run_dir, view, flow_run_id)),
    }[stage]
    options = {"refresh_cache": fresh, "task_run_name": stage} | folder.result_storage()
    stamps = read_stamps(run_dir, stage)
    with as_signal():  # a SIGTERM that Prefect's task engine turns into an error crashes the run, as any SIGTERM does
        state = task.with_options(**options)(*args, cache_key=key, return_state=True)
    try:
        state.result()  # raises the stage's error, so the flow run fails with it
    except RerunNeeded as err:  # the command it gives, for this run
        raise err.for_run(folder.ref) from None
    if touched := changed(stamps, read_stamps(run_dir, stage)):
        shown = ", ".join(touched[:5]) + (f" and {len(touched) - 5} more" if len(touched) > 5 else "")
        log.error("stage %s changed files in the folders it only reads (%s): its cache key no longer describes "
                  "them, so the next run will redo it. This is a bug in edgar-tune; please report it.", stage, shown)
    if state.name != "Cached":
        record(run_dir, stage, key, inputs)
        folder.push([OUTPUTS[stage].split("/")[0], f".stages/{stage}.json"])
    return state.name


def _must_run(folder: RunFolder, cfg: PipelineConfig, stage: str, force: bool) -> tuple[bool, str, dict]:
    """Whether `stage` must run rather than stand as cached (its inputs are final), its cache key and what it
    reads (`stage_inputs`)."""
    run_dir = folder.local
    folder.pull([f".stages/{stage}.json", OUTPUTS[stage].split("/")[0]])
    fresh, key, inputs = decide(stage, folder.keyed_as, run_dir, cfg, force)
    return fresh or (stage == "download" and _ask_again(run_dir, cfg)), key, inputs


def dry_run(out_dir: str, cfg: PipelineConfig, todo: tuple[str, ...] | list[str] = STAGES,
            forced: tuple[str, ...] | list[str] = (), why_forced: str = "") -> list[tuple[str, str]]:  # fmt: skip
    """What `edgar-tune run` with `cfg` (or a rerun: its `todo` and `forced` stages, `rerun_stages`) would do in the
    local run folder `out_dir`, stage by stage, and why, as the flow decides it (`_must_run`), running nothing:
    `cached`; `runs: WHY` (`why_it_runs`: the keys that moved, the inputs, the code; or `why_forced`); `asks its
    source again` (the download, `_ask_again`); or, after a stage that runs or asks, that it runs if what that
    stage makes is new (its key then moves, which cannot be known before)."""
    run_dir = Path(out_dir).expanduser().resolve()
    if not (run_dir / ".stages").is_dir():
        return [(stage, "runs: the folder holds no run yet") for stage in STAGES]
    keyed_as = RunFolder(str(run_dir), run_dir).keyed_as
    at = at_commit(cfg, check_model_name(cfg.model.name, cfg.model.revision))
    rows: list[tuple[str, str]] = []
    moving: list[str] = []  # stages that run, or may make something new
    runs: set[str] = set()  # stages that run
    for stage in STAGES:
        if stage not in todo:
            rows.append((stage, "kept as it is (not rerun)"))
            continue
        if stage in forced:
            rows.append((stage, f"runs: {why_forced}"))
            runs.add(stage)
            moving.append(stage)
            continue
        view = at if stage == "tokenize" else cfg
        fresh, _, inputs = decide(stage, keyed_as, run_dir, view, False)  # on the folders as they are now
        upstream = [s for s in moving if s in NEEDS[stage] or needing(s, [stage]) == stage]
        # a training's weights are new, an evaluation's record its time: what reads them runs after them
        after = [f"`{s}`" for s in upstream if s in runs & {"evaluate-base", "train", "evaluate"}]
        if fresh:
            rows.append((stage, f"runs: {why_it_runs(run_dir, stage, view, inputs)}"))
            runs.add(stage)
        elif after:
            rows.append((stage, f"runs after {joined(after)}, whose outputs it reads"))
        elif stage == "download" and _ask_again(run_dir, cfg):
            rows.append((stage, "asks its source again (data.latest_years, a filing missing last time, or your own "
                                "files); what follows stands if it finds what it has"))  # fmt: skip
        elif upstream:
            rows.append((stage, f"cached, unless {joined([f'`{s}`' for s in upstream], 'or')} makes something new"))
        else:
            rows.append((stage, "cached"))
            continue
        moving.append(stage)
    return rows


def _ask_again(run_dir: Path, cfg: PipelineConfig) -> bool:
    """Whether the download must ask its source again though its key is unchanged: `data.latest_years` (which
    years are the latest changes when a 10-K is filed), the last download found some filing missing on EDGAR
    (not filed yet, or 404), or the source is the user's own files (edited in place under the same name). If the
    answer is the same, the manifest is too, and every later stage stays cached."""
    if cfg.data.latest_years is not None:
        return True
    if cfg.data.is_text:
        return _text_source_here(cfg)
    manifest = run_dir / DOWNLOAD / "manifest.json"
    return manifest.exists() and any(s.get("recheck") for s in read_json(manifest).get("skipped", []))


def _text_source_here(cfg: PipelineConfig) -> bool:
    """Whether this machine can read a text source to describe it again. A worker on another host that resumes an
    `s3://` run may not have a local `data.source`: the run's recorded download stands there, and a stage that
    must read the files stops with where they are."""
    if missing := cfg.data.not_here():
        log.warning("%s is not on this machine: the run's recorded download stage stands (the data cannot be "
                    "checked for edits here)", " and ".join(missing.values()))  # fmt: skip
    return not missing


def build_summary(run_dir: Path, preset: str, timings: dict, flow_run_id: str | None) -> dict:
    """The run's figures, read from its stage folders (so a rerun of one stage summarises the whole run)."""
    manifest = read_json(run_dir / DOWNLOAD / "manifest.json")
    tok = read_json(run_dir / TOKENIZE / "stats.json")
    train = read_json(run_dir / TRAIN / "stats.json")
    before = read_json(run_dir / EVALUATE / "base.json")
    after = read_json(run_dir / EVALUATE / "finetuned.json")
    reg = read_json(run_dir / REGISTER / "registration.json")
    filings = [{k: f[k] for k in ("ticker", "form", "fiscal_year", "accession")} for f in manifest["filings"]]
    return {
        "preset": preset,
        "run_dir": str(run_dir),
        "ppl_before": before["perplexity"],
        "ppl_after": after["perplexity"],
        "ppl_change_pct": round(100 * (after["perplexity"] / before["perplexity"] - 1), 2),
        "train_tokens": tok["train_tokens"],
        "train_tokens_seen": train["train_tokens_seen"],
        "val_tokens": after["tokens"],
        "validation": validation_label(read_json(run_dir / PARSE / "report.json"), tok),
        "filings": filings,
        "data_files": data_locations(manifest),
        "base_model": tok["base_model"],
        "mlflow_tracking_uri": reg["tracking_uri"],
        "mlflow_run_id": reg["mlflow_run_id"],
        "registered_model": reg["registered_model"],
        "model_version": reg["model_version"],
        "model_alias": reg["model_alias"],
        "champion_comparison": reg.get("champion_comparison"),
        "engine": train["engine"],
        "zero_stage": train["zero_stage"],
        "world_size": train["world_size"],
        "gradient_checkpointing": train["gradient_checkpointing"],
        "cpu_allocator": train.get("cpu_allocator"),
        "micro_batch": train.get("per_device_train_batch_size"),
        "gradient_accumulation_steps": train.get("gradient_accumulation_steps"),
        "memory_fit": train.get("memory_plan", {}).get("fit"),
        "mode": train["mode"],
        "trainable_tokens": train.get("trainable_tokens"),
        "dtype": train["dtype"],
        "device": train["device"],
        "train_steps": train["steps"],
        "resumed_from_step": train.get("resumed_from_step"),
        "best_step": train.get("best_step"),
        "stopped_early": train.get("stopped_early"),
        "quantization": train.get("quantization"),
        "memory_estimate_gb": train.get("memory_plan", {}).get("estimate_gb"),
        "peak_memory_gb": train.get("peak_memory_gb"),
        "peak_rss_gb": train.get("peak_rss_gb"),
        "seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
        "weights": str(run_dir / TRAIN / train["weights"]),
        "prefect_flow_run_id": flow_run_id,
    }


def validation_label(parse_report: dict, tok_stats: dict) -> str:
    """What the validation perplexity was measured on, in words: the held-out Items of the 10-Ks, or the user's
    held-out rows (and for instruction tuning, only their completions are scored)."""
    if "filings" in parse_report:  # 10-Ks
        items = parse_report.get("val_items", ["7"])
        return "held-out Item 7 (MD&A)" if items == ["7"] else "held-out Items " + ", ".join(items)
    n = tok_stats["val_documents"]
    rows = f"{n} held-out {'example' if tok_stats['kind'] == 'instruction' else 'row'}{'s' if n != 1 else ''}"
    scored = "completion tokens of " if tok_stats["kind"] == "instruction" else ""
    return f"{scored}{rows} ({parse_report['validation']})"


def _compared(c: dict | None) -> str:
    """What the new version was measured against, for the summary's `registered` line."""
    if not c or "version" not in c:
        return ""
    if c["perplexity"] is None:
        return f" (not compared with champion v{c['version']}: {c['basis']})"
    return f" (champion v{c['version']}: {c['perplexity']:.3f}, {c['basis']})"


def _base(ref: dict | None) -> str:
    """The run's base for its summary: a hub id at its commit, a folder, or a model the run built."""
    from edgar_tune.config import base_shown

    if not ref:
        return "-"
    if ref["kind"] == "run_local":
        return f"{ref['path']} (built by this run)"
    return base_shown(ref["path"], ref.get("revision"))


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """The run summary as (label, text) rows: the lines the run prints, and the table of its Prefect artifact."""
    filings = ", ".join(f"{f['ticker']} {f['form']} FY{f['fiscal_year']}" for f in s["filings"]) or ", ".join(
        Path(p).name for p in s["data_files"])  # fmt: skip
    stages = "  ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items())
    cached = [k for k, v in s["stages"].items() if v == "Cached"]
    skipped = [k for k, v in s["stages"].items() if v == "skipped"]
    return [
        ("filings" if s["filings"] else "data", filings),
        ("tokens", f"train {s['train_tokens']:,} (seen {s['train_tokens_seen']:,}), "
                   f"validation {s['val_tokens']:,}: {s.get('validation', 'held-out Item 7 (MD&A)')}"),
        ("base model", _base(s.get("base_model"))),
        ("training", f"{s['mode']} on {s['device']}, {s['engine']}, {s['train_steps']} steps"
         + (f" of micro-batch {s['micro_batch']} x {s['gradient_accumulation_steps']}" if s["micro_batch"] else "")
         + f", gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
         + (" (chosen by train.memory_fit)" if s["memory_fit"] else "")
         + (f", allocator {s['cpu_allocator']}" if s.get("cpu_allocator") and s["device"] == "cpu" else "")),
        ("perplexity", f"before {s['ppl_before']:.3f}  ->  after {s['ppl_after']:.3f}  ({s['ppl_change_pct']:+.1f}%)"),
        ("registered", f"{s['registered_model']} v{s['model_version']} @{s['model_alias']}"
         + _compared(s["champion_comparison"])),
        ("MLflow", s["mlflow_tracking_uri"]),
        ("time", f"{s['total_seconds']:.0f}s  ({stages})"),
        ("cached", f"{', '.join(cached) or 'none'}" + (f"; not rerun: {', '.join(skipped)}" if skipped else "")),
        ("summary", f"{s['run']}/summary.json"),
    ]  # fmt: skip


def format_summary(s: dict) -> str:
    return "\n".join(["", "edgar-tune run summary", *(f"  {k:<18}{v}" for k, v in summary_rows(s)), ""])
