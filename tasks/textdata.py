"""Users' own data besides 10-Ks, in JumpStart's formats.

Domain adaptation reads TXT, CSV or JSON: the `text` column, or the first column when there is none. A TXT
file gives one row per paragraph (blank-line separated). JSON is JSON Lines or one array of objects.

Instruction tuning reads JSONL records and a `template.json` whose `prompt` and `completion` are Python format
strings over the record's fields. Without a template.json next to the data (or `data.template`), JumpStart's
default is used: the instruction/context/response fields of the Dolly format.

Without `data.validation`, `data.validation_split_ratio` (default 0.2) of the rows is held out, chosen with
`train.train_data_split_seed`.

The download stage records every file a run reads (data, validation data, template) with its sha256
(`describe_source`), at every run; the parse stage reads exactly those bytes (`recorded_bytes`). So an edited file
is read again by the next run, and a file edited between the two stages stops the parse instead of training on
data that no stage recorded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from pathlib import Path

from edgar_tune.config import TEXT_SUFFIXES, ConfigError, DataConfig, PipelineConfig
from tasks.io import read_bytes, read_json, sha256_file

log = logging.getLogger(__name__)

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


def describe_source(cfg: DataConfig) -> list[dict]:
    """Every file a text run reads, with its size and sha256 and its `role`: `train` (`data.source`), `validation`
    (`data.validation`) and `template` (`data.template`, else a template.json next to the data, if there is one)."""
    files = data_files(cfg.source)
    roles = [(files, "train")]
    if cfg.validation:
        roles.append((data_files(cfg.validation), "validation"))
    template = template_file(cfg, files[0])
    if template is not None:
        roles.append(([template], "template"))
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p), "role": role}
            for paths, role in roles for p in paths]  # fmt: skip


def log_changes(manifest: Path, files: list[dict]) -> None:
    """Log the files that are new, changed or gone since the run's last download (why later stages run again)."""
    if not manifest.exists():
        return
    before = {f["path"]: f for f in read_json(manifest).get("files", [])}
    now = {f["path"]: f for f in files}
    for path, f in now.items():
        if path not in before:
            log.info("%s (%s) is new since this run's last download", path, f.get("role", "train"))
        elif before[path]["sha256"] != f["sha256"]:
            log.info("%s changed since this run's last download (%s -> %s bytes); the stages that read it run again",
                     path, f"{before[path]['bytes']:,}", f"{f['bytes']:,}")  # fmt: skip
    for path in before.keys() - now.keys():
        log.info("%s is no longer read (it was at this run's last download)", path)


class SourceChanged(ValueError):
    """A file changed between the download stage that recorded it and the stage that reads it."""


def recorded_bytes(entry: dict) -> bytes:
    """The bytes of a file the download stage recorded, checked against its sha256 there."""
    path = Path(entry["path"])
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SourceChanged(f"{path} is gone since the download stage recorded it; put it back, or rerun from the "
                            "download stage (`edgar-tune rerun download --run RUN`) to train without it") from None
    if (digest := hashlib.sha256(raw).hexdigest()) != entry["sha256"]:
        raise SourceChanged(
            f"{path} changed after the download stage recorded it (sha256 {entry['sha256'][:12]}, now "
            f"{digest[:12]}). Rerun from the download stage (`edgar-tune rerun download --run RUN`, or run the "
            "pipeline again) so that every stage reads the same data"
        )
    return raw


def _text_column(columns: list[str], where: Path) -> str:
    if not columns:
        raise ValueError(f"{where}: no columns found; give a `text` column")
    return "text" if "text" in columns else columns[0]


def read_records(path: Path, data: bytes | None = None) -> list[dict]:
    """Rows of a CSV or JSON/JSONL file (or its bytes, `data`) as dicts, in order."""
    raw = (read_bytes(path) if data is None else data).decode("utf-8-sig")
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


def read_texts(path: Path, data: bytes | None = None) -> list[str]:
    """Domain-adaptation rows of one file (or its bytes, `data`): TXT paragraphs, or the `text` (else first) column
    of CSV/JSON."""
    if path.suffix.lower() == ".txt":
        raw = (read_bytes(path) if data is None else data).decode("utf-8-sig").replace("\r\n", "\n")
        return [p.strip() for p in raw.split("\n\n") if p.strip()]
    records = read_records(path, data)
    if not records:
        return []
    column = _text_column(list(records[0]), path)
    return [str(r.get(column) or "").strip() for r in records if str(r.get(column) or "").strip()]


def template_file(cfg: DataConfig, first: Path) -> Path | None:
    """`data.template`, else a template.json next to the first data file, if there is one."""
    if cfg.template:
        path = Path(cfg.template).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"`data.template` = {cfg.template!r} does not exist")
        return path
    path = first.parent / "template.json"
    return path if path.is_file() else None


def load_template(entry: dict | None) -> tuple[dict, str]:
    """The instruction template recorded by the download stage (else JumpStart's default) and where it came from."""
    if entry is None:
        return JUMPSTART_TEMPLATE, "jumpstart-default"
    path = entry["path"]
    try:
        template = json.loads(recorded_bytes(entry))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); fix the template") from None
    missing = {"prompt", "completion"} - set(template) if isinstance(template, dict) else {"prompt", "completion"}
    if missing:
        raise ConfigError(f"{path} needs `prompt` and `completion` format strings; missing {sorted(missing)}")
    return template, path


def render(template: dict, record: dict, where: str) -> dict:
    """{"prompt", "completion"} of one record; a field the template needs and the record lacks is an error."""
    try:
        return {"prompt": template["prompt"].format(**record), "completion": template["completion"].format(**record)}
    except KeyError as err:
        raise ValueError(
            f"{where}: the template uses field {{{err.args[0]}}} but the record has only {sorted(record)}; fix the "
            "record or give a template.json (`data.template`) that matches your fields"
        ) from None


def _rows(files: list[dict], instruction: bool, template: dict | None) -> list[dict]:
    rows = []
    for entry in files:
        path, data = Path(entry["path"]), recorded_bytes(entry)
        if instruction:
            for n, record in enumerate(read_records(path, data), 1):
                rows.append({"source": path.name, "row": n} | render(template, record, f"{path}, record {n}"))
        else:
            rows.extend({"source": path.name, "row": n, "text": t} for n, t in enumerate(read_texts(path, data), 1))
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


def build_text_split(cfg: PipelineConfig, recorded: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """(train rows, validation rows, report) for a text source, from the files the download stage `recorded`."""
    instruction = cfg.train.instruction_tuned
    role = lambda r: [f for f in recorded if f.get("role", "train") == r]  # noqa: E731
    files, val_files, templates = role("train"), role("validation"), role("template")
    template, template_from = load_template(templates[0] if templates else None) if instruction else (None, None)
    rows = _rows(files, instruction, template)
    if not rows:
        raise ValueError(f"`data.source` = {cfg.data.source!r} has no rows of text")
    if cfg.data.validation:
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
        "files": [f["path"] for f in files],
        "validation": how,
        "template": template_from,
        "train_documents": len(train),
        "val_documents": len(val),
        "train_chars": chars(train),
        "val_chars": chars(val),
    }
    return train, val, report
