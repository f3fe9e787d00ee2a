"""The edgar-tune flow: download -> parse -> tokenize -> fine-tune -> evaluate (before/after) -> register."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from edgar_tune.config import RunParameters
from tasks.finetune import memory_plan, preflight
from tasks.io import DOWNLOAD, TOKENIZE, TRAIN, atomic_write_json, atomic_write_text, read_json
from tasks.stages import (
    download_filings,
    evaluate_perplexity,
    extract_sections,
    finetune_model,
    pack_blocks,
    register_model,
)


@flow(name="edgar-tune", log_prints=True)
def edgar_tune_pipeline(params: RunParameters = RunParameters()) -> dict:  # noqa: B008 (never mutated)
    """Domain-adapt a causal LM to 10-K filings and register it; returns the run summary."""
    import yaml

    cfg = params.load()
    precision = preflight(cfg.train)  # a GPU-only engine on a CPU machine fails here, not after the data stages
    out_dir = params.out_dir
    run_dir = Path(out_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    timed("download", download_filings, run_dir, cfg.data)
    timed("parse", extract_sections, run_dir, cfg)
    tok = timed("tokenize", pack_blocks, run_dir, cfg)
    memory_plan(run_dir / TOKENIZE, cfg.train, precision)  # a run that cannot fit stops before any model runs
    before = timed("evaluate_before", evaluate_perplexity, run_dir, cfg.eval, False, cfg.generate)
    train = timed("train", finetune_model, run_dir, cfg.train, cfg.eval)
    after = timed("evaluate_after", evaluate_perplexity, run_dir, cfg.eval, True, cfg.generate)
    flow_run_id = str(flow_run.id) if flow_run.id else None
    reg = timed("register", register_model, run_dir, cfg, flow_run_id)
    summary = build_summary(run_dir, cfg.preset, tok, before, train, after, reg, timings) | {
        "prefect_flow_run_id": flow_run_id
    }
    atomic_write_json(run_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary


def build_summary(run_dir: Path, preset: str, tok: dict, before: dict, train: dict, after: dict, reg: dict,
                  timings: dict) -> dict:  # fmt: skip
    manifest = read_json(run_dir / DOWNLOAD / "manifest.json")
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
        "filings": filings,
        "data_files": [f["path"] for f in manifest.get("files", [])],
        "base_model": read_json(run_dir / TOKENIZE / "stats.json")["base_model"],
        "mlflow_tracking_uri": reg["tracking_uri"],
        "mlflow_run_id": reg["mlflow_run_id"],
        "registered_model": reg["registered_model"],
        "model_version": reg["model_version"],
        "model_alias": reg["model_alias"],
        "engine": train["engine"],
        "zero_stage": train["zero_stage"],
        "world_size": train["world_size"],
        "gradient_checkpointing": train["gradient_checkpointing"],
        "mode": train["mode"],
        "dtype": train["dtype"],
        "device": train["device"],
        "train_steps": train["steps"],
        "resumed_from_step": train.get("resumed_from_step"),
        "best_step": train.get("best_step"),
        "stopped_early": train.get("stopped_early"),
        "quantization": train.get("quantization"),
        "memory_estimate_gb": train.get("memory_plan", {}).get("estimate_gb"),
        "peak_memory_gb": train.get("peak_memory_gb"),
        "seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
        "weights": str(run_dir / TRAIN / train["weights"]),
    }


def format_summary(s: dict) -> str:
    filings = ", ".join(f"{f['ticker']} {f['form']} FY{f['fiscal_year']}" for f in s["filings"]) or ", ".join(
        Path(p).name for p in s["data_files"])  # fmt: skip
    stages = "  ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items())
    return "\n".join([
        "",
        "edgar-tune run summary",
        f"  filings           {filings}",
        f"  tokens            train {s['train_tokens']:,} (seen {s['train_tokens_seen']:,}), "
        f"held-out MD&A {s['val_tokens']:,}",
        f"  training          {s['mode']} on {s['device']}, {s['engine']}, {s['train_steps']} steps, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
        f"  perplexity        before {s['ppl_before']:.3f}  ->  after {s['ppl_after']:.3f}  "
        f"({s['ppl_change_pct']:+.1f}%)",
        f"  registered        {s['registered_model']} v{s['model_version']} @{s['model_alias']}",
        f"  MLflow            {s['mlflow_tracking_uri']}",
        f"  time              {s['total_seconds']:.0f}s  ({stages})",
        f"  summary           {s['run_dir']}/summary.json",
        "",
    ])  # fmt: skip
