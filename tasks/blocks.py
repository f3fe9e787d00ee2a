"""Stage 3: tokenize the split and pack training text into fixed-length blocks (`datasets`)."""

from __future__ import annotations

import hashlib
import json
from itertools import chain
from pathlib import Path

from datasets import Dataset

from edgar_tune.config import PipelineConfig
from tasks.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, read_jsonl
from tasks.models import TINY, load_tokenizer, resolve_base_model


def block_length(requested: int, model_dir: str) -> int:
    """JumpStart's rule: -1 means min(1024, the model's maximum context)."""
    if requested != -1:
        return requested
    from transformers import AutoConfig

    max_pos = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None) or 1024
    return min(1024, max_pos)


def _fingerprint(key: str, rows: list[dict]) -> str:
    digest = hashlib.sha256(key.encode())
    for row in rows:
        digest.update(row["text"].encode("utf-8"))
    return digest.hexdigest()[:32]


def pack(token_lists: list[list[int]], length: int) -> tuple[list[list[int]], int]:
    """Concatenate documents (each already ending in EOS) and cut into blocks; return (blocks, tokens dropped)."""
    flat = list(chain.from_iterable(token_lists))
    n = len(flat) // length
    return [flat[i * length : (i + 1) * length] for i in range(n)], len(flat) - n * length


def data_report(parse_report: dict, rows: list[dict], token_lists: list[list[int]]) -> dict:
    """The parse report with the tokens each Item of each filing contributes (after the train/val dedupe)."""
    tokens: dict[tuple[str, str], int] = {}
    for row, ids in zip(rows, token_lists, strict=True):
        tokens[(row["accession"], row["item"])] = len(ids) - 1  # without the EOS appended per document
    report = json.loads(json.dumps(parse_report))
    for filing in report["filings"]:
        for key, item in filing["items"].items():
            item["tokens"] = tokens.get((filing["accession"], key), 0)
        filing["train_tokens"] = sum(i["tokens"] for k, i in filing["items"].items() if k not in report["val_items"])
        filing["val_tokens"] = sum(i["tokens"] for k, i in filing["items"].items() if k in report["val_items"])
    return report


def report_markdown(report: dict) -> str:
    """A readable table: characters and tokens per Item per filing, with each Item's status and the warnings."""
    lines = ["| ticker | FY | accession | item | status | chars | tokens | set |", "|---|---|---|---|---|---:|---:|---|"]
    for f in report["filings"]:
        for key, item in f["items"].items():
            if item["status"] == "not_found" and not item["chars"]:
                continue
            role = "val" if key in report["val_items"] else "train"
            role = role if item["status"] == "ok" else "-"
            lines.append(f"| {f['ticker']} | {f['fiscal_year']} | {f['accession']} | {key} | {item['status']} "
                         f"| {item['chars']:,} | {item['tokens']:,} | {role} |")  # fmt: skip
    warnings = [f"- {f['ticker']} FY{f['fiscal_year']}: {w}" for f in report["filings"] for w in f["warnings"]]
    removed = report["paragraphs_removed_from_train_as_in_val"]
    tail = [f"\nParagraphs removed from training because they also appear in validation: {removed}"]
    return "\n".join(lines + tail + (["\nWarnings:", *warnings] if warnings else [])) + "\n"


def write_tokenize_stage(out: Path, parse_dir: Path, cfg: PipelineConfig) -> dict:
    """Write `train/` (packed blocks) and `val/` (one token list per held-out MD&A) datasets, plus stats."""
    train_rows, val_rows = read_jsonl(parse_dir / "train.jsonl"), read_jsonl(parse_dir / "val.jsonl")
    with atomic_dir(out) as tmp:
        # The tiny model's tokenizer is trained on this run's training text (never on the validation text).
        base = resolve_base_model(cfg.model, tmp, (r["text"] for r in train_rows), cfg.train.seed)
        if cfg.model.name == TINY:
            base_ref = {"kind": "run_local", "path": TINY}
        else:
            base_ref = {"kind": "path_or_hub", "path": base}
        tokenizer = load_tokenizer(base)
        length = block_length(cfg.tokenize.max_input_length, base)
        eos = tokenizer.eos_token_id

        def encode(batch: dict) -> dict:
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"input_ids": [x + [eos] for x in ids]}

        # An explicit fingerprint: hashing the closure (and the tokenizer in it) is slow and prints bytecode.
        key = f"{base}|{length}|{len(tokenizer)}"
        train_tok = Dataset.from_list(train_rows).map(
            encode, batched=True, desc="tokenize train", new_fingerprint=_fingerprint(key, train_rows)
        )
        blocks, dropped = pack(train_tok["input_ids"], length)
        Dataset.from_dict({"input_ids": blocks}).save_to_disk(tmp / "train")
        val_tok = Dataset.from_list(val_rows).map(
            encode, batched=True, desc="tokenize validation", new_fingerprint=_fingerprint(key, val_rows)
        )
        val_tok.remove_columns(["text"]).save_to_disk(tmp / "val")
        stats = {
            "base_model": base_ref,
            "block_length": length,
            "train_blocks": len(blocks),
            "train_tokens": len(blocks) * length,
            "train_tokens_dropped_at_end": dropped,
            "val_documents": len(val_tok),
            "val_tokens": sum(len(x) for x in val_tok["input_ids"]),
            "val_tokens_per_document": [
                {k: r[k] for k in ("ticker", "fiscal_year", "accession")} | {"tokens": len(ids)}
                for r, ids in zip(val_rows, val_tok["input_ids"], strict=True)
            ],
            "tokenizer_vocab": len(tokenizer),
        }
        if not blocks:
            raise ValueError(
                f"training text has {dropped} tokens, fewer than one block of {length}; lower "
                "`tokenize.max_input_length` or add filings"
            )
        atomic_write_json(tmp / "stats.json", stats)
        report = data_report(read_json(parse_dir / "report.json"), train_rows + val_rows,
                             list(train_tok["input_ids"]) + list(val_tok["input_ids"]))  # fmt: skip
        atomic_write_json(tmp / "data_report.json", report)
        atomic_write_text(tmp / "data_report.md", report_markdown(report))
    return stats


def base_model_path(tokenize_dir: Path) -> str:
    """Where the base model of a run lives, as recorded by its tokenize stage."""
    ref = json.loads((tokenize_dir / "stats.json").read_text())["base_model"]
    return str(tokenize_dir / ref["path"]) if ref["kind"] == "run_local" else ref["path"]
