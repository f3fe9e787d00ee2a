"""The six pipeline stages as Prefect tasks.

Each reads its inputs from the run folder and publishes its own subfolder atomically, so any stage can be
rerun on its own from what the stages before it left. Results are persisted under the `cache_key` the flow
computes (tasks.cache.stage_key: config read, artifacts read, code version), so a run with the same inputs
finds them `Cached`; `cache_key=None` (a plain call) caches nothing.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

from prefect import task

from edgar_tune.config import (DataConfig, EvalConfig, GenerateConfig, PipelineConfig, RegisterConfig, RerunNeeded,
                               StageFailed, TrainConfig)  # fmt: skip
from tasks.cache import StageKey, made_otherwise
from tasks.io import (DOWNLOAD, EVALUATE, PARSE, REGISTER, TOKENIZE, TRAIN, atomic_dir, atomic_write_json,
                      disk_full_message, read_json)  # fmt: skip


def stage_task(name: str, stage: str | None = None):
    """A pipeline stage: cached on the flow's `cache_key`, its result persisted (JSON) for later runs. A stage that
    stops on a full disk raises `StageFailed` saying which disk and how much is free (`disk_full_message`), under the
    stage's name as the CLI and the Prefect UI's task runs give it (`stage`; None: evaluate_perplexity's, whose
    `finetuned` says which of the two evaluations it is), the task's after it.

    Stages log through `logging`, never `print`. The flow's `log_prints` is off inside them because libraries
    print to a captured stdout: dill (under `datasets`' fingerprints) reads a function's globals from
    `dis.dis` output, which Prefect would otherwise send to the run's log as bytecode."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(run_dir: Path, *args, **kwargs):
            try:
                return fn(run_dir, *args, **kwargs)
            except Exception as err:  # an OSError, or a library's error over one (MLflow's store)
                if isinstance(err, StageFailed) or (full := disk_full_message(err, run_dir)) is None:
                    raise
                which = stage or _evaluation(fn, run_dir, *args, **kwargs)
                raise StageFailed(f"stage {which} ({name}): {full}") from err

        return task(name=name, cache_policy=StageKey(), persist_result=True, result_serializer="json",
                    log_prints=False)(run)  # fmt: skip

    return wrap


def _evaluation(fn, *args, **kwargs) -> str:
    """Which evaluation a call of evaluate_perplexity is, in the CLI's stage names."""
    return "evaluate" if inspect.signature(fn).bind(*args, **kwargs).arguments["finetuned"] else "evaluate-base"


@stage_task("download_filings", "download")
def download_filings(run_dir: Path, cfg: DataConfig, cache_key: str | None = None) -> dict:
    """Fetch (or locate) the 10-K filings and write the run's filing manifest."""
    if cfg.is_text:  # users' own TXT/CSV/JSON/JSONL: record what will be read, byte for byte (at every run)
        from tasks.cache import run_digests
        from tasks.textdata import describe_source, log_changes

        digests = run_digests(run_dir)  # a file unchanged since the last run is not read again
        files = describe_source(cfg, digests)
        digests.save()
        log_changes(run_dir / DOWNLOAD / "manifest.json", files)
        with atomic_dir(run_dir / DOWNLOAD) as tmp:
            atomic_write_json(tmp / "manifest.json", {"source": cfg.source, "filings": [], "files": files, "skipped": []})
        return {"files": len(files)}
    from tasks.download import gather_filings

    filings, skipped = gather_filings(cfg)
    with atomic_dir(run_dir / DOWNLOAD) as tmp:
        atomic_write_json(tmp / "manifest.json", {"source": cfg.source, "filings": filings, "skipped": skipped})
    return {"filings": len(filings), "skipped": len(skipped)}


@stage_task("extract_sections", "parse")
def extract_sections(run_dir: Path, cfg: PipelineConfig, cache_key: str | None = None) -> dict:
    """Split each filing into Items (Item 7, the MD&A, validates; the rest trains), or split users' text rows."""
    from tasks.split import write_parse_stage, write_text_parse_stage

    if cfg.data.is_text:
        return write_text_parse_stage(run_dir / PARSE, cfg, read_json(run_dir / DOWNLOAD / "manifest.json")["files"])
    filings = read_json(run_dir / DOWNLOAD / "manifest.json")["filings"]
    report = write_parse_stage(run_dir / PARSE, filings, cfg.parse)
    return {k: v for k, v in report.items() if k != "filings"}


@stage_task("pack_blocks", "tokenize")
def pack_blocks(run_dir: Path, cfg: PipelineConfig, cache_key: str | None = None) -> dict:
    """Resolve the base model, tokenize the split and pack training text into blocks."""
    from tasks.blocks import write_tokenize_stage

    return write_tokenize_stage(run_dir / TOKENIZE, run_dir / PARSE, cfg)


@stage_task("finetune_model", "train")
def finetune_model(run_dir: Path, cfg: TrainConfig, eval_cfg: EvalConfig, registry: RegisterConfig | None = None,
                   preset: str = "", flow_run_id: str | None = None, prune: dict | None = None,
                   cache_key: str | None = None) -> dict:  # fmt: skip
    """Fine-tune with LoRA or in full; resumes from the last complete checkpoint of an interrupted run. With
    `registry`, training's curves go to the run's MLflow run as they come (the key leaves it out: it
    changes where the curves are shown, not what is trained). `prune`: a sweep's rule that may stop a weak point at
    a validation (tasks/pruning.py); the key leaves it out too, as a training it lets finish is the same."""
    from tasks.finetune import write_train_stage

    live = None
    if registry is not None:
        from tasks.registry import live_training_run

        live = lambda: live_training_run(run_dir, registry, preset, flow_run_id)  # noqa: E731
    return write_train_stage(run_dir / TRAIN, run_dir / TOKENIZE, cfg, eval_cfg, live, prune)


@stage_task("evaluate_perplexity")
def evaluate_perplexity(run_dir: Path, cfg: EvalConfig, finetuned: bool, gen: GenerateConfig | None = None,
                        cache_key: str | None = None) -> dict:  # fmt: skip
    """Perplexity on the held-out MD&A, of the base model or of the fine-tuned one; then generation samples."""
    from tasks.perplexity import write_eval

    weights = None
    if finetuned:
        stats = read_json(run_dir / TRAIN / "stats.json")
        weights = run_dir / TRAIN / stats["weights"]
    out = run_dir / EVALUATE / ("finetuned.json" if finetuned else "base.json")
    companies = []
    if gen is not None:
        filings = read_json(run_dir / DOWNLOAD / "manifest.json")["filings"]
        companies = [gen.company_names.get(t, t) for t in dict.fromkeys(f["ticker"] for f in filings)]
    result = write_eval(out, run_dir / TOKENIZE, cfg, weights, gen, companies)
    return {k: result[k] for k in ("perplexity", "tokens", "seconds")}


@stage_task("register_model", "register")
def register_model(run_dir: Path, cfg: PipelineConfig, flow_run_id: str | None,
                   cache_key: str | None = None) -> dict:  # fmt: skip
    """Log the run to MLflow, register the model and set its alias; refused (`RerunNeeded`) where a stage before it
    made its outputs otherwise than the config and the folders say (`made_otherwise`)."""
    from tasks.registry import register_run

    if why := made_otherwise(run_dir, cfg):
        raise RerunNeeded(why)
    result = register_run(run_dir, run_dir.parent, cfg, flow_run_id)
    with atomic_dir(run_dir / REGISTER) as tmp:
        atomic_write_json(tmp / "registration.json", result)
    return result
