"""Users' own data besides 10-Ks, in JumpStart's formats.

Domain adaptation reads TXT, CSV or JSON: the `text` column, or the first column when there is none. A TXT
file gives one row per paragraph (blank-line separated). JSON is JSON Lines or one array of objects.

Instruction tuning reads JSONL records and a `template.json` whose `prompt` and `completion` are Python format
strings over the record's fields. Without a template.json next to the data (or `data.template`), JumpStart's
default is used: the instruction/context/response fields of the Dolly format.

Without `data.validation`, `data.validation_split_ratio` (default 0.2) of the rows is held out, chosen with
`train.train_data_split_seed`.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from edgar_tune.config import TEXT_SUFFIXES, ConfigError, PipelineConfig
from tasks.io import read_bytes, sha256_file

DEFAULT_VALIDATION_SPLIT_RATIO = 0.2
JUMPSTART_TEMPLATE = {
    "prompt": "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n",
    "completion": " {response}",
}


def data_files(source: str) -> list[Path]:
    """The files of a text source: the file itself, or the data files of a folder (template.json excluded)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"`data.source` = {source!r} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in TEXT_SUFFIXES and p.name != "template.json")
    if not files:
        raise FileNotFoundError(f"`data.source` = {source!r} has no .txt, .csv, .json or .jsonl files")
    return files


def describe_files(files: list[Path]) -> list[dict]:
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]


def _text_column(columns: list[str], where: Path) -> str:
    if not columns:
        raise ValueError(f"{where}: no columns found; give a `text` column")
    return "text" if "text" in columns else columns[0]


def read_records(path: Path) -> list[dict]:
    """Rows of a CSV or JSON/JSONL file as dicts, in order."""
    raw = read_bytes(path).decode("utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(raw)))
    stripped = raw.lstrip()
    if suffix == ".json" and stripped.startswith("["):
        rows = json.loads(stripped)
    else:
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg}); fix or remove the line") from None
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad:
        raise ValueError(f"{path}: record {bad} is not a JSON object; every record needs named fields")
    return rows


def read_texts(path: Path) -> list[str]:
    """Domain-adaptation rows of one file: TXT paragraphs, or the `text` (else first) column of CSV/JSON."""
    if path.suffix.lower() == ".txt":
        raw = read_bytes(path).decode("utf-8-sig").replace("\r\n", "\n")
        return [p.strip() for p in raw.split("\n\n") if p.strip()]
    records = read_records(path)
    if not records:
        return []
    column = _text_column(list(records[0]), path)
    return [str(r.get(column) or "").strip() for r in records if str(r.get(column) or "").strip()]


def load_template(cfg: PipelineConfig, files: list[Path]) -> tuple[dict, str]:
    """The instruction template and where it came from."""
    candidates = [Path(cfg.data.template)] if cfg.data.template else [files[0].parent / "template.json"]
    for path in candidates:
        if path.is_file():
            template = json.loads(path.read_text())
            missing = {"prompt", "completion"} - set(template)
            if missing:
                raise ConfigError(f"{path} needs `prompt` and `completion` format strings; missing {sorted(missing)}")
            return template, str(path.resolve())
        if cfg.data.template:
            raise FileNotFoundError(f"`data.template` = {cfg.data.template!r} does not exist")
    return JUMPSTART_TEMPLATE, "jumpstart-default"


def render(template: dict, record: dict, where: str) -> dict:
    """{"prompt", "completion"} of one record; a field the template needs and the record lacks is an error."""
    try:
        return {"prompt": template["prompt"].format(**record), "completion": template["completion"].format(**record)}
    except KeyError as err:
        raise ValueError(
            f"{where}: the template uses field {{{err.args[0]}}} but the record has only {sorted(record)}; fix the "
            "record or give a template.json (`data.template`) that matches your fields"
        ) from None


def _rows(files: list[Path], instruction: bool, template: dict | None) -> list[dict]:
    rows = []
    for path in files:
        if instruction:
            for n, record in enumerate(read_records(path), 1):
                rows.append({"source": path.name, "row": n} | render(template, record, f"{path}, record {n}"))
        else:
            rows.extend({"source": path.name, "row": n, "text": t} for n, t in enumerate(read_texts(path), 1))
    return rows


def split_rows(rows: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `ratio` of the rows (at least one), chosen by `seed`; both sets keep their file order."""
    if len(rows) < 2:
        raise ValueError(f"{len(rows)} row(s) cannot be split into training and validation; add data or give "
                         "`data.validation`")  # fmt: skip
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(ratio * len(rows)))
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def build_text_split(cfg: PipelineConfig) -> tuple[list[dict], list[dict], dict]:
    """(train rows, validation rows, report) for a text source."""
    instruction = cfg.train.instruction_tuned
    files = data_files(cfg.data.source)
    template, template_from = load_template(cfg, files) if instruction else (None, None)
    rows = _rows(files, instruction, template)
    if not rows:
        raise ValueError(f"`data.source` = {cfg.data.source!r} has no rows of text")
    if cfg.data.validation:
        val_files = data_files(cfg.data.validation)
        train, val = rows, _rows(val_files, instruction, template)
        how = f"data.validation ({len(val_files)} file(s))"
    else:
        ratio = cfg.data.validation_split_ratio or DEFAULT_VALIDATION_SPLIT_RATIO
        train, val = split_rows(rows, ratio, cfg.train.train_data_split_seed)
        how = f"validation_split_ratio={ratio}, train_data_split_seed={cfg.train.train_data_split_seed}"
    chars = (lambda rs: sum(len(r["prompt"]) + len(r["completion"]) for r in rs)) if instruction else (
        lambda rs: sum(len(r["text"]) for r in rs))  # fmt: skip
    report = {
        "kind": "instruction" if instruction else "text",
        "files": [str(p) for p in files],
        "validation": how,
        "template": template_from,
        "train_documents": len(train),
        "val_documents": len(val),
        "train_chars": chars(train),
        "val_chars": chars(val),
    }
    return train, val, report
