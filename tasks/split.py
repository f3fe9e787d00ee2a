"""Stage 2: parse each filing into Items and split them: Item 7 (MD&A) validates, every other Item trains."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from edgar_tune.config import ConfigError, ParseConfig, PipelineConfig
from tasks.download import primary_file, submission_file
from tasks.io import atomic_dir, atomic_write_json, holdings, write_jsonl
from tasks.progress import OwnLine, Progress, console_bars
from tasks.sections import ParsedFiling, parse_filing

log = logging.getLogger(__name__)


def _parse_one(args: tuple[str, str | None, str, int | None]) -> ParsedFiling:
    path, submission, tables, year = args
    return parse_filing(Path(path), tables, Path(submission) if submission else None, year)  # type: ignore[arg-type]


def parse_all(paths: list[Path], tables: str, workers: int | None = None, submissions: list[Path | None] | None = None,
              years: list[int | None] | None = None) -> list[ParsedFiling]:  # fmt: skip
    """Parse filings, several at a time on a process pool when there are several.

    `submissions` are the filings' complete-submission files, read for EX-13 when Item 7 points there; `years`
    their fiscal years as EDGAR gives them (else each document's own word).
    """
    from tqdm.auto import tqdm

    subs, years = submissions or [None] * len(paths), years or [None] * len(paths)
    jobs = [(str(p), str(s) if s else None, tables, y) for p, s, y in zip(paths, subs, years, strict=True)]
    # Hundreds of filings take minutes: lines in the run's log (beside the console's bar after 30 s), a bar in the UI
    progress = Progress("parse", len(jobs), "filings", logger=OwnLine(log, {"open": None}), quiet_s=30)
    bar = {"total": len(jobs), "desc": "parse", "unit": "filing", "disable": len(jobs) < 2 or not console_bars()}

    def shown(parsed):
        for done, doc in enumerate(tqdm(parsed, **bar), 1):
            progress.update(done)
            yield doc

    if len(jobs) < 2 or workers == 1:
        return list(shown(map(_parse_one, jobs)))
    with ProcessPoolExecutor(max_workers=min(workers or 2, len(jobs))) as pool:
        return list(shown(pool.map(_parse_one, jobs)))


def build_split(filings: list[dict], parsed: list[ParsedFiling], cfg: ParseConfig) -> tuple[list, list, dict]:
    """Return (train rows, validation rows, data report); rows carry ticker, fiscal year, item, accession."""
    train, val, report_filings = [], [], []
    for filing, doc in zip(filings, parsed, strict=True):
        meta = {k: filing[k] for k in ("ticker", "fiscal_year", "accession")}
        meta["form"] = filing["form"]
        per_item = {}
        for key, item in doc.items.items():
            per_item[key] = {"status": item.status, "chars": len(item.text)}
            if item.reason:
                per_item[key]["reason"] = item.reason
            if item.status != "ok":  # stubs that point elsewhere and missing Items never enter either set
                continue
            paragraphs = [p for p in item.text.split("\n") if len(p) >= cfg.min_paragraph_chars]
            row = dict(meta, item=key, paragraphs=paragraphs)
            (val if key in cfg.val_items else train).append(row)
        report_filings.append(dict(meta, items=per_item, warnings=doc.warnings))
    removed = _drop_shared_paragraphs(train, val)
    train = [_finish(r) for r in train if r["paragraphs"]]
    val = [_finish(r) for r in val]
    report = {
        "filings": report_filings,
        "train_documents": len(train),
        "val_documents": len(val),
        "train_chars": sum(len(r["text"]) for r in train),
        "val_chars": sum(len(r["text"]) for r in val),
        "paragraphs_removed_from_train_as_in_val": removed,
        "val_items": cfg.val_items,
    }
    return train, val, report


def _why_not(report: dict, keys: list[str]) -> str:
    """What the filings' Items `keys` are instead of text, the most common first: "no 'Item 1C' heading, and the form
    had none before FY2023: 2"."""
    reasons = Counter(item.get("reason") or item["status"] for f in report["filings"]
                      for key, item in f["items"].items() if key in keys and item["status"] != "ok")  # fmt: skip
    return "; ".join(f"{reason}: {n}" for reason, n in reasons.most_common(3))


def _warn_gaps(report: dict, val_items: list[str]) -> None:
    """Warn of the filings that give the run no text (no Item found as text: a layout the parser does not split)
    and of those that give no validation text (no held-out Item as text), naming them and the commonest reasons: a
    run of many filings lost them without a word (the data report, logged to MLflow, lists each Item)."""
    empty, no_val = [], []
    for f in report["filings"]:
        ok = {key for key, item in f["items"].items() if item["status"] == "ok"}
        if not ok:
            empty.append(f)
        elif not ok & set(val_items):
            no_val.append(f)
    n, items = len(report["filings"]), "/".join(val_items)
    if empty:
        log.warning("%d of %d filings have no Item as text, so they add nothing to the run: %s (%s; `edgar-tune "
                    "sections FILE` shows how a file splits)", len(empty), n, holdings(empty),
                    _why_not({"filings": empty}, ["1"]))  # fmt: skip
    if no_val:
        log.warning("%d of %d filings have no Item %s as text, so they add training text only: %s (%s)", len(no_val),
                    n, items, holdings(no_val), _why_not({"filings": no_val}, val_items))  # fmt: skip


def _drop_shared_paragraphs(train: list[dict], val: list[dict]) -> int:
    """Remove from training every paragraph that also appears verbatim in validation; return the count."""
    held_out = {p for row in val for p in row["paragraphs"]}
    removed = 0
    for row in train:
        kept = [p for p in row["paragraphs"] if p not in held_out]
        removed += len(row["paragraphs"]) - len(kept)
        row["paragraphs"] = kept
    return removed


def _finish(row: dict) -> dict:
    paragraphs = row.pop("paragraphs")
    return dict(row, text="\n".join(paragraphs))


def text_sha256(rows: list[dict]) -> str:
    """Hash of the text of the rows (10-K Items, text rows, instruction prompt + completion, or a conversation's
    turns with their roles)."""
    digest = hashlib.sha256()
    for r in rows:
        for key in ("text", "prompt", "completion"):
            if key in r:
                digest.update(r[key].encode("utf-8"))
                digest.update(b"\x00")
        if "messages" in r:  # without it, every chat data set hashed alike: "the same validation data" to the gate
            digest.update(json.dumps(r["messages"], ensure_ascii=False).encode("utf-8"))
            digest.update(b"\x00")
            if r.get("tools"):  # the tools a conversation was shown
                digest.update(json.dumps(r["tools"], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def write_text_parse_stage(out: Path, cfg: PipelineConfig, recorded: list[dict]) -> dict:
    """Users' TXT/CSV/JSON (or instruction JSONL) rows, split into training and validation, from the files the
    download stage `recorded`."""
    from tasks.textdata import build_text_split

    train, val, report = build_text_split(cfg, recorded)
    if not val or not train:
        raise ConfigError(f"the split left {len(train)} training and {len(val)} validation rows; add data")
    report["train_sha256"], report["val_sha256"] = text_sha256(train), text_sha256(val)
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        atomic_write_json(tmp / "report.json", report)
    return report


def write_parse_stage(out: Path, filings: list[dict], cfg: ParseConfig) -> dict:
    """Parse, split and write `train.jsonl`, `val.jsonl`, `sections.jsonl` and `report.json` atomically."""
    parsed = parse_all([primary_file(f) for f in filings], cfg.tables, submissions=[submission_file(f) for f in filings],
                       years=[f["fiscal_year"] for f in filings])  # fmt: skip
    train, val, report = build_split(filings, parsed, cfg)
    if not val:
        items = "/".join(cfg.val_items)
        raise ConfigError(f"no validation text: none of the {len(filings)} filings has Item {items} as text "
                          f"({_why_not(report, cfg.val_items)}); hold out another Item (`parse.val_items`; Item 7 is "
                          f"the MD&A) or add filings that have Item {items}")  # fmt: skip
    if not train:
        raise ConfigError(f"no training text: every Item with text in the {len(filings)} filings is held out "
                          f"(`parse.val_items`: {', '.join(cfg.val_items)}) or repeats held-out text; hold out fewer "
                          "Items or add filings")  # fmt: skip
    _warn_gaps(report, cfg.val_items)
    report["train_sha256"], report["val_sha256"] = text_sha256(train), text_sha256(val)
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        write_jsonl(tmp / "sections.jsonl", [dict(f, parsed=p.to_dict()) for f, p in zip(filings, parsed, strict=True)])
        atomic_write_json(tmp / "report.json", report)
    return report
