"""Users' own data besides 10-Ks, in JumpStart's formats.

Domain adaptation reads TXT, CSV or JSON: the `text` column, or the first column when there is none. A TXT
file gives one row per paragraph (blank-line separated). JSON is JSON Lines or one array of objects.

Instruction tuning reads JSONL records and a `template.json` whose `prompt` and `completion` are Python format
strings over the record's fields. Without a template.json next to the data (or `data.template`), JumpStart's
default is used: the instruction/context/response fields of the Dolly format. Records that are conversations
(`messages`, a list of role/content objects, as OpenAI's chat format, or ShareGPT's `conversations`) are chat data
instead: the tokenize stage writes them in the model's own chat template and trains on the assistant's turns
(`tasks.blocks.chat_segments`). A conversation may call tools, as OpenAI's fine-tuning format writes it (an
assistant's `tool_calls`, a `tool` turn with the result, the record's `tools`) or LLaMA-Factory's ShareGPT one
(`function_call` and `observation` turns, `tools` as JSON text): the calls train as the assistant's turns, written
as the chat template writes them, so that the version calls tools as `edgar-tune serve` reads them back.

Without `data.validation`, `data.validation_split_ratio` (default 0.2) of the rows is held out, chosen with
`train.train_data_split_seed`.

The download stage records every file a run reads (data, validation data, template) with its sha256
(`describe_source`), at every run; the parse stage reads exactly those bytes (`recorded_bytes`). So an edited file
is read again by the next run, and a file edited between the two stages stops the parse instead of training on
data that no stage recorded.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import random
import string
from collections.abc import Callable, Iterator
from pathlib import Path

from edgar_tune.config import TEXT_SUFFIXES, ConfigError, DataConfig, DataNotFound, PipelineConfig, RerunNeeded
from tasks.io import (atomic_write_bytes, cache_dir, held, holder_info, joined, litter, read_bytes, read_json,
                      sha256_file)  # fmt: skip

log = logging.getLogger(__name__)

DEFAULT_VALIDATION_SPLIT_RATIO = 0.2
JUMPSTART_TEMPLATE = {
    "prompt": "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n",
    "completion": " {response}",
}


def data_files(source: str, key: str = "data.source") -> list[str]:
    """The files of a text source (paths, or s3:// URLs): the file itself, or the data files of a folder or S3
    prefix, one level deep (template.json excluded)."""
    if is_s3(source):
        return _s3_files(source, key)
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)]
    if not path.exists():
        raise DataNotFound(f"`{key}` = {source!r} does not exist")
    files = sorted(p for p in path.iterdir() if _is_data(p.name))
    if not files:
        raise DataNotFound(f"`{key}` = {source!r} has no .txt, .csv, .json or .jsonl files directly in it")
    _unread_folders(source, key, [p.name for p in path.iterdir() if p.is_dir()])
    _unread_hidden(source, key, [p.name for p in path.iterdir() if p.is_file()])
    return [str(p) for p in files]


def _unread_folders(source: str, key: str, names: list[str]) -> None:
    """Say which subfolders of a source folder (or prefix) are not read: a source is one level deep, and files a
    user meant to train on must not be left out without a word."""
    shown = sorted(f"{n}/" for n in names if not n.startswith("."))
    if shown:
        log.warning("`%s` = %s: %s not read (a source is the data files directly in it); give a subfolder as its own "
                    "source to train on it", key, source, ", ".join(shown[:10]) + (f" and {len(shown) - 10} more"
                    if len(shown) > 10 else ""))  # fmt: skip


def _unread_hidden(source: str, key: str, names: list[str]) -> None:
    """Say which hidden files with a data suffix a source folder (or prefix) holds and are not read (`litter`)."""
    if hidden := sorted(n for n in names if _is_text(n) and litter(Path(n))):
        log.info("`%s` = %s: %s not read: hidden files, as a Mac (`._NAME`), Jupyter and editors leave beside data; "
                 "rename one without its leading dot to train on it", key, source, ", ".join(hidden[:10]) +
                 (f" and {len(hidden) - 10} more" if len(hidden) > 10 else ""))  # fmt: skip


def _is_text(name: str) -> bool:
    """Whether a file's name is a data file's: TXT/CSV/JSON/JSONL, not the template."""
    return Path(name).suffix.lower() in TEXT_SUFFIXES and Path(name).name != "template.json"


def _is_data(name: str) -> bool:
    """Whether a file in a data folder (or under an S3 prefix) is data: `_is_text`, and not one that programs leave
    in a folder (`litter`: the `._train.csv` beside `train.csv` that a Mac writes on an exFAT or network disk,
    binary, stopped the run as a CSV that is not UTF-8)."""
    return _is_text(name) and not litter(Path(Path(name).name))


def describe_source(cfg: DataConfig, digest: Callable[[Path], str] = sha256_file) -> list[dict]:
    """Every file a text run reads, with its size and sha256 and its `role`: `train` (`data.source`), `validation`
    (`data.validation`) and `template` (`data.template`, else a template.json next to the data, if there is one).
    An s3:// object is fetched into the cache and described by its URL (`url`) instead of a `path`. `digest`
    hashes a file: the download stage passes the run's memo (tasks.cache.FileDigests), so a file unchanged since
    the last run is not read again."""
    files = data_files(cfg.source)
    roles = [(files, "train")]
    if cfg.validation:
        roles.append((data_files(cfg.validation, "data.validation"), "validation"))
    template = template_file(cfg, files[0])
    if template is not None:
        roles.append(([template], "template"))
    return [_describe(where, role, digest) for wheres, role in roles for where in wheres]


def _describe(where: str, role: str, digest: Callable[[Path], str]) -> dict:
    """A file's `path`, or an s3:// object's `url` (its copy in this machine's cache is not recorded: other workers
    keep theirs elsewhere, and the manifest must not differ by worker), with size, sha256 and role."""
    if is_s3(where):
        path, at = fetch_s3(where, ROLE_KEY[role]), {"url": where}
    else:
        path = Path(where).expanduser().resolve()
        at = {"path": str(path)}
    if role != "template" and _an_edgar_submission(path):
        raise ConfigError(f"`{ROLE_KEY[role]}`: {where} is an EDGAR filing (a complete submission, as "
                          "`full-submission.txt`), not text to train on as it is: give the folder that holds "
                          "`sec-edgar-filings` as `data.source`, with `data.tickers` and `data.fiscal_years`, and "
                          "each 10-K is split into its Items, Item 7 (the MD&A) held out")  # fmt: skip
    return at | {"bytes": path.stat().st_size, "sha256": digest(path), "role": role}


def _an_edgar_submission(path: Path) -> bool:
    """Whether a .txt file is an EDGAR complete submission (its SGML envelope and SEC header; a 1990s one whose
    tags were stripped keeps the header's fields), which read as paragraphs would train on the envelope, every
    exhibit and no held-out MD&A."""
    if path.suffix.lower() != ".txt":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).decode("latin-1")
    return "<SEC-DOCUMENT>" in head or "<SEC-HEADER>" in head or \
        ("ACCESSION NUMBER:" in head and "CONFORMED SUBMISSION TYPE:" in head)  # fmt: skip


def location(entry: dict) -> str:
    """Where a recorded file is: its s3:// URL or its path."""
    return entry.get("url") or entry["path"]


def data_locations(manifest: dict) -> list[str]:
    """The data files (training and validation, not the template) a download stage's manifest records, each where
    it is (`location`); none for a 10-K run."""
    return [location(f) for f in manifest.get("files", []) if f.get("role") != "template"]


# -- s3:// sources: JumpStart's training channel ------------------------------------------------------------------
def is_s3(where: str) -> bool:
    return str(where).startswith("s3://")


@contextlib.contextmanager
def _s3_access(url: str, key: str) -> Iterator[None]:
    """Turn S3's credential and permission errors into one that names the key and what to set."""
    from botocore.exceptions import BotoCoreError

    try:
        yield
    except (PermissionError, BotoCoreError) as err:
        raise ConfigError(f"`{key}` = {url!r}: {type(err).__name__}: {err}. Give credentials that can read it "
                          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role; "
                          "AWS_ENDPOINT_URL for S3-compatible stores)") from None  # fmt: skip


def _s3_files(source: str, key: str) -> list[str]:
    from tasks.storage import s3_fs

    fs = s3_fs()
    with _s3_access(source, key):
        if Path(source).suffix.lower() in TEXT_SUFFIXES:
            if not fs.isfile(source):
                raise DataNotFound(f"`{key}` = {source!r} is not an object in that bucket (or these "
                                   "credentials cannot read it)")  # fmt: skip
            return [source]
        prefix = source.rstrip("/")
        listed = fs.ls(prefix, detail=True) if fs.isdir(prefix) else []
    files = sorted(f"s3://{o['name']}" for o in listed if o["type"] == "file" and _is_data(o["name"]))
    if not files:
        raise DataNotFound(
            f"`{key}` = {source!r} has no .txt, .csv, .json or .jsonl objects directly under it (10-K filings in "
            "a bucket: give the prefix of their `sec-edgar-filings` folder, s3://BUCKET/.../sec-edgar-filings)"
        )
    _unread_folders(source, key, [o["name"].rstrip("/").rsplit("/", 1)[-1] for o in listed if o["type"] == "directory"])
    _unread_hidden(source, key, [o["name"].rsplit("/", 1)[-1] for o in listed if o["type"] == "file"])
    return files


ROLE_KEY = {"train": "data.source", "validation": "data.validation", "template": "data.template"}


def s3_copy(url: str) -> Path:
    """Where this machine keeps its copy of an s3:// object (or the objects under a prefix)."""
    return cache_dir() / "data" / "s3" / url[len("s3://"):].rstrip("/")


def fetch_s3(url: str, key: str = "data.source") -> Path:
    """The local copy of an s3:// object, in $EDGAR_TUNE_CACHE/data/s3/BUCKET/KEY: fetched again only when its
    ETag or size changed, written atomically, with a progress bar for large objects. Runs that share the cache
    take turns per object, so a copy and its ETag stamp always belong together."""
    import time

    from tqdm.auto import tqdm

    from tasks.progress import OwnLine, Progress, console_bars
    from tasks.storage import s3_fs

    fs = s3_fs()
    local = s3_copy(url)
    stamp = local.with_name(local.name + ".etag")
    with held(local.with_name(local.name + ".lock"), holder_info(fetching=url), wait=True):
        with _s3_access(url, key):
            info = fs.info(url)
        tag = f"{info.get('ETag', '')}:{info['size']}"
        if local.is_file() and stamp.is_file() and stamp.read_text() == tag:
            return local
        start, large = time.monotonic(), info["size"] >= 1 << 26  # 64 MB: a bar, and log lines after 30 s
        lines = Progress(f"fetch {url}", info["size"] >> 20, "MB", logger=OwnLine(log, {"open": None}), quiet_s=30)
        got = 0

        def counted(chunk: bytes) -> bytes:
            nonlocal got
            got += len(chunk)
            bar.update(len(chunk))
            if large:
                lines.update(got >> 20)
            return chunk

        shown = {"total": info["size"], "unit": "B", "unit_scale": True, "desc": f"fetch {Path(url).name}",
                 "disable": not (large and console_bars())}  # fmt: skip
        with fs.open(url, "rb", block_size=1 << 23) as src, tqdm(**shown) as bar:
            atomic_write_bytes(local, (counted(c) for c in iter(lambda: src.read(1 << 23), b"")))
        atomic_write_bytes(stamp, tag.encode())
    log.info("fetched %s (%s bytes) in %.1f s", url, f"{info['size']:,}", time.monotonic() - start)
    return local


def log_changes(manifest: Path, files: list[dict]) -> None:
    """Log the files that are new, changed or gone since the run's last download (why later stages run again)."""
    if not manifest.exists():
        return
    before = {location(f): f for f in read_json(manifest).get("files", [])}
    now = {location(f): f for f in files}
    for path, f in now.items():
        if path not in before:
            log.info("%s (%s) is new since this run's last download", path, f.get("role", "train"))
        elif before[path]["sha256"] != f["sha256"]:
            log.info("%s changed since this run's last download (%s -> %s bytes); the stages that read it run again",
                     path, f"{before[path]['bytes']:,}", f"{f['bytes']:,}")  # fmt: skip
    for path in before.keys() - now.keys():
        log.info("%s is no longer read (it was at this run's last download)", path)


class SourceChanged(RerunNeeded):
    """A file changed between the download stage that recorded it and the stage that reads it."""


def recorded_bytes(entry: dict) -> bytes:
    """The bytes of a file the download stage recorded, checked against its sha256 there (an s3:// object from
    this machine's copy, fetched again if the object changed or this worker has none)."""
    try:
        url, key = entry.get("url"), ROLE_KEY[entry.get("role", "train")]
        raw = (fetch_s3(url, key) if url else Path(entry["path"])).read_bytes()
    except FileNotFoundError:
        raise SourceChanged(f"{location(entry)} is gone since the download stage recorded it; put it back, or "
                            "rerun from the download stage (`edgar-tune rerun download --run RUN`) to train without "
                            "it") from None  # fmt: skip
    if (digest := hashlib.sha256(raw).hexdigest()) != entry["sha256"]:
        raise SourceChanged(
            f"{location(entry)} changed after the download stage recorded it (sha256 {entry['sha256'][:12]}, now "
            f"{digest[:12]}). Rerun from the download stage (`edgar-tune rerun download --run RUN`, or run the "
            "pipeline again) so that every stage reads the same data"
        )
    return raw


def _text_column(records: list[dict], where: Path) -> str:
    """The `text` column, else the first (JumpStart's rule), said in the log; a first column of numbers alone (an
    `id` before the text) is refused: it trained on the numbers, or ended in "fewer than one block" at tokenize."""
    columns = list(records[0])
    if not columns:
        raise ConfigError(f"{where}: no columns found; give a `text` column")
    if "text" in columns:
        return "text"
    first = columns[0]
    if any(isinstance(r.get(first), list | dict) for r in records):  # JSON's lists or objects: str() of them is no text
        if first in CHAT_KEYS:
            raise ConfigError(f"{where} holds conversations (`{first}`): set `train.instruction_tuned=true` to train "
                              "on them, written in the model's chat template")  # fmt: skip
        raise ConfigError(f"{where} has no `text` column, and its first column, `{first}`, which is read then, holds "
                          f"lists or objects, not text; name the column of your text `text` (its columns: "
                          f"{', '.join(columns)})")  # fmt: skip
    values = [v for r in records if (v := str(r.get(first) or "").strip())]
    if values and all(map(_number, values)):
        raise ConfigError(f"{where} has no `text` column, and its first column, `{first}`, which is read then, holds "
                          f"numbers only; name the column of your text `text` (its columns: {', '.join(columns)})")
    if {"instruction", "response"} <= set(columns) or {"prompt", "completion"} <= set(columns):
        log.warning("%s has no `text` column, so its first column, `%s`, alone is the training text (JumpStart's "
                    "rule); its columns (%s) are an instruction data set's: set `train.instruction_tuned=true` to "
                    "train on them as prompt and completion", where, first, ", ".join(columns))  # fmt: skip
    else:
        log.info("%s has no `text` column: its first column, `%s`, is the text (JumpStart's rule; columns: %s)",
                 where, first, ", ".join(columns))  # fmt: skip
    return first


def _number(value: str) -> bool:
    try:
        float(value.replace(",", ""))
    except ValueError:
        return False
    return True


def _text(path: Path, data: bytes | None) -> str:
    """A data file's text: UTF-8 (a byte-order mark is dropped); anything else is refused with where it broke."""
    raw = read_bytes(path) if data is None else data
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); save "
                          "the file as UTF-8") from None  # fmt: skip


def read_records(path: Path, data: bytes | None = None) -> list[dict]:
    """Rows of a CSV or JSON/JSONL file (or its bytes, `data`) as dicts, in order."""
    raw = _text(path, data)
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
                    raise ConfigError(f"{path}, line {n}: not valid JSON ({err.msg}); fix or remove the line") from None
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad:
        raise ConfigError(f"{path}: record {bad} is not a JSON object; every record needs named fields")
    return rows


def read_texts(path: Path, data: bytes | None = None) -> list[str]:
    """Domain-adaptation rows of one file (or its bytes, `data`): TXT paragraphs, or the `text` (else first) column
    of CSV/JSON."""
    if path.suffix.lower() == ".txt":
        raw = _text(path, data).replace("\r\n", "\n")
        return [p.strip() for p in raw.split("\n\n") if p.strip()]
    records = read_records(path, data)
    if not records:
        return []
    column = _text_column(records, path)
    return [str(r.get(column) or "").strip() for r in records if str(r.get(column) or "").strip()]


def template_file(cfg: DataConfig, first: str) -> str | None:
    """`data.template`, else a template.json next to the first data file (a path or an s3:// URL), if there is one."""
    if cfg.template:
        if not (_s3_exists(cfg.template) if is_s3(cfg.template) else Path(cfg.template).expanduser().is_file()):
            raise DataNotFound(f"`data.template` = {cfg.template!r} does not exist")
        return cfg.template
    if is_s3(first):
        beside = first.rsplit("/", 1)[0] + "/template.json"
        return beside if _s3_exists(beside) else None
    beside = Path(first).parent / "template.json"
    return str(beside) if beside.is_file() else None


def _s3_exists(url: str) -> bool:
    from tasks.storage import s3_fs

    with _s3_access(url, "data.template"):
        return s3_fs().isfile(url)


def load_template(entry: dict | None) -> tuple[dict, str]:
    """The instruction template recorded by the download stage (else JumpStart's default) and where it came from."""
    if entry is None:
        return JUMPSTART_TEMPLATE, "jumpstart-default"
    path = location(entry)
    try:
        template = json.loads(recorded_bytes(entry))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); fix the template") from None
    missing = {"prompt", "completion"} - set(template) if isinstance(template, dict) else {"prompt", "completion"}
    if missing:
        raise ConfigError(f"{path} needs `prompt` and `completion` format strings; missing {sorted(missing)}")
    for key in ("prompt", "completion"):
        _check_format(template[key], f"{path}: `{key}`")
    return template, path


def _check_format(value, where: str) -> None:
    """Refuse a template string that `str.format` cannot fill from a record's fields by name: a format error
    ("{instruction" ends in a ValueError's traceback at the first record), a field without a name ({} or {0}, which
    no record fills), or something other than a string."""
    if not isinstance(value, str):
        raise ConfigError(f"{where} is {type(value).__name__} {value!r}; give a format string, as \"{{instruction}}\"")
    try:
        fields = format_fields(value)
    except ValueError as err:
        raise ConfigError(f"{where} {value!r} is not a format string ({err}); write each record field as {{name}}, "
                          "and a brace that is text as {{ or }}") from None  # fmt: skip
    if unnamed := [field for field in fields if field == "" or field.isdigit()]:
        raise ConfigError(f"{where} {value!r} has a field without a name ({{{unnamed[0]}}}); name the record's "
                          "field, as {instruction}")  # fmt: skip


def format_fields(value: str) -> list[str]:
    """The fields a format string fills, as written ("instruction", "a.b", ""); ValueError where it is malformed."""
    return [field for _, field, _, _ in string.Formatter().parse(value) if field is not None]


def template_fields(template: str) -> list[str]:
    """The record fields a prompt template fills, in order, once each (`{company.name}` fills `company`)."""
    return list(dict.fromkeys(f.split(".")[0].split("[")[0] for f in format_fields(template)))


def render(template: dict, record: dict, where: str) -> dict:
    """{"prompt", "completion"} of one record; a field the template needs and the record lacks is an error, and a
    null one (JSON's null) is empty text, not "None"."""
    record = {k: "" if v is None else v for k, v in record.items()}
    try:
        return {"prompt": template["prompt"].format(**record), "completion": template["completion"].format(**record)}
    except KeyError as err:
        raise ConfigError(
            f"{where}: the template uses field {{{err.args[0]}}} but the record has only {sorted(record)}; fix the "
            "record or give a template.json (`data.template`) that matches your fields"
        ) from None
    except (ValueError, AttributeError, IndexError) as err:  # "{amount:d}" of a string field, "{a.b}", "{a[3]}"
        raise ConfigError(f"{where}: the template cannot format this record ({err}); fix the template "
                          "(`data.template`) or the record") from None  # fmt: skip


CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speakers (`conversations` of {"from", "value"}, as Axolotl and LLaMA-Factory read them) -> roles; a
# `function_call` turn's value is a call's JSON ({"name", "arguments"}, or a list of them), LLaMA-Factory's
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool"}  # fmt: skip
CHAT_KEYS = ("messages", "conversations")  # a record holding either is a conversation


def chat_messages(record: dict, where: str, to_train: bool = True) -> list[dict]:
    """A chat record's conversation: its `messages` (OpenAI's {"role", "content"}), or its `conversations`
    (ShareGPT's {"from", "value"}, speakers human and gpt as user and assistant), as role (system, user,
    assistant or tool) and text, with at least one assistant turn (what trains) when it is `to_train`. A tool call
    (an assistant's `tool_calls`, ShareGPT's `function_call`) and its result (a `tool` turn, ShareGPT's
    `observation`) as transformers' chat templates take them (`tool_turn`). An assistant turn of `weight` 0 (OpenAI's)
    keeps it, and does not train (`_weight`); a record's `parallel_tool_calls` false holds each turn to one call. An
    assistant turn's `reasoning_content` goes to the template, which writes it where it writes reasoning.

    Raises:
        ConfigError: a record with neither, a turn that is not such an object, no assistant turn to train, a weight
            or `parallel_tool_calls` that is wrong.
    """
    key = "messages" if "messages" in record or "conversations" not in record else "conversations"
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: `{key}` is {'missing' if turns is None else repr(turns)[:80]}; a chat file's "
                          "every record is a conversation, {\"messages\": [{\"role\": \"user\", \"content\": "
                          "\"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}]} (or ShareGPT's "
                          "\"conversations\" of {\"from\", \"value\"})")  # fmt: skip
    sharegpt = key == "conversations"
    roles = SHAREGPT_ROLES if sharegpt else {role: role for role in CHAT_ROLES}
    names = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for i, turn in enumerate(turns, 1):
        role, text = (turn.get(names[0]), turn.get(names[1])) if isinstance(turn, dict) else (None, None)
        if not sharegpt and isinstance(turn, dict) and (turn.get("tool_calls") or role == "tool"):
            messages.append(tool_turn(turn, f"{where}, turn {i}") | _weight(turn, f"{where}, turn {i}")
                            | _reasoning(turn, f"{where}, turn {i}"))  # fmt: skip
            continue
        if not (isinstance(role, str) and role in roles and isinstance(text, str)):  # a list's role: no TypeError
            raise ConfigError(f"{where}, turn {i}: {repr(turn)[:80]} is not {{\"{names[0]}\": ROLE, \"{names[1]}\": "
                              f"TEXT}} with ROLE one of {', '.join(roles)}")  # fmt: skip
        if sharegpt and role == "function_call":  # LLaMA-Factory's: the call's (or calls') JSON
            messages.append(tool_turn({"role": "assistant", "tool_calls": _sharegpt_calls(text)}, f"{where}, turn {i}"))
        else:
            messages.append({"role": roles[role], "content": text}
                            | (_weight(turn, f"{where}, turn {i}") if not sharegpt else {})
                            | _reasoning(turn, f"{where}, turn {i}"))  # fmt: skip
    _single_calls(record, messages, where)
    if to_train and not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        weighed = any(m["role"] == "assistant" for m in messages)  # each of weight 0
        raise ConfigError(f"{where}: no assistant turn{' to train (each has weight 0)' if weighed else ''}, and the "
                          "assistant's turns are what trains; give each conversation one or more"
                          + (" of weight 1 (or none)" if weighed else ""))  # fmt: skip
    return messages


def _reasoning(turn: dict, where: str) -> dict:
    """An assistant turn's `reasoning_content` (Qwen3's templates read it; Axolotl's and vLLM's name), as
    {"reasoning_content": text} to add to the turn for its template to write (a template that writes no reasoning
    leaves it out), else {}.

    Raises:
        ConfigError: reasoning that is not text, or on a turn that is not the assistant's."""
    if turn.get("reasoning_content") is None:
        return {}
    if turn.get("role", turn.get("from")) not in ("assistant", "gpt") or not isinstance(turn["reasoning_content"], str):
        raise ConfigError(f"{where}: reasoning_content={json.dumps(turn['reasoning_content'])[:40]}; it is an "
                          "assistant turn's reasoning, as text")  # fmt: skip
    return {"reasoning_content": turn["reasoning_content"]}


def _weight(turn: dict, where: str) -> dict:
    """An assistant turn's `weight` in OpenAI's fine-tuning format: 0, the turn does not train (it is kept in the
    conversation as context); 1 (or none), it does. As {"weight": 0} to add to the turn, else {}.

    Raises:
        ConfigError: a weight that is not 0 or 1, or one on a turn that is not the assistant's."""
    if "weight" not in turn:
        return {}
    if turn.get("role") != "assistant" or turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
        raise ConfigError(f"{where}: weight={json.dumps(turn['weight'])[:40]} on a {turn.get('role')} turn; a weight "
                          "is OpenAI's, on an assistant turn: 0 (it does not train) or 1 (it does)")  # fmt: skip
    return {} if turn["weight"] else {"weight": 0}


def _single_calls(record: dict, messages: list[dict], where: str) -> None:
    """A record's `parallel_tool_calls` (OpenAI's fine-tuning format: false, each assistant turn calls one tool at
    most), checked against its turns.

    Raises:
        ConfigError: a value that is not true or false, a turn of more than one call where it is false."""
    single = record.get("parallel_tool_calls")
    if single is None:
        return
    if not isinstance(single, bool):
        raise ConfigError(f"{where}: parallel_tool_calls={json.dumps(single)[:40]}; it is true or false")
    many = next((i for i, m in enumerate(messages, 1) if len(m.get("tool_calls") or ()) > 1), None)
    if single is False and many:
        raise ConfigError(f"{where}, turn {many}: {len(messages[many - 1]['tool_calls'])} tool calls in one turn, "
                          "and the record's parallel_tool_calls is false (one a turn): make it true (or leave it "
                          "out), or split the calls into turns of their own")  # fmt: skip


def unwritten_tool_turn(messages: list, tokenizer) -> int | None:
    """The first turn (from 1) of `messages` that is a tool call or its result, where `tokenizer`'s chat template
    does not write tool calls (it has no `tool_calls`, and would leave them out); None where there is none."""
    if writes_tool_calls(tokenizer):
        return None
    return next((i for i, t in enumerate(messages, 1) if isinstance(t, dict) and (t.get("role") == "tool" or
                                                                                 t.get("tool_calls"))), None)


def writes_tool_calls(tokenizer) -> bool:
    """Whether `tokenizer`'s chat template writes an assistant's tool calls (it reads `tool_calls`)."""
    return "tool_calls" in str(getattr(tokenizer, "chat_template", None) or "")


def tool_turn(turn: dict, where: str) -> dict:
    """A tool call or its result in OpenAI's form (an assistant's `tool_calls`, each {"id", "type": "function",
    "function": {"name", "arguments": JSON text}}; a `tool` turn's `content` and `tool_call_id`), as transformers'
    chat templates take it (a call's arguments a mapping).

    Raises:
        ConfigError: a turn not of that form."""
    wrong = ConfigError(f"{where}: {str(turn)[:80]} is not an assistant's {{\"tool_calls\": [{{\"id\", \"type\": "
                        f"\"function\", \"function\": {{\"name\", \"arguments\": JSON text}}}}]}} nor a {{\"role\": "
                        f"\"tool\", \"content\": TEXT, \"tool_call_id\"}}")  # fmt: skip
    if turn.get("role") == "tool":
        if not isinstance(turn.get("content"), str):
            raise wrong
        return {"role": "tool", "content": turn["content"], **({"tool_call_id": turn["tool_call_id"]}
                                                                 if turn.get("tool_call_id") else {})}  # fmt: skip
    calls, given = [], turn["tool_calls"] if turn.get("role") == "assistant" else None
    for call in given if isinstance(given, list) else [None]:
        function = call["function"] if isinstance(call, dict) and isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not (isinstance(function.get("name"), str) and isinstance(arguments, dict)):
            raise wrong
        calls.append({"type": "function", **({"id": call["id"]} if call.get("id") else {}),
                      "function": {"name": function["name"], "arguments": arguments}})  # fmt: skip
    return {"role": "assistant", "content": turn.get("content") or "", "tool_calls": calls}


def _sharegpt_calls(text: str) -> list | None:
    """A ShareGPT `function_call` turn's value (LLaMA-Factory's: {"name", "arguments"}, or a list of them) as
    OpenAI's `tool_calls`; None where it is not that JSON."""
    try:
        said = json.loads(text)
    except json.JSONDecodeError:
        return None
    said = said if isinstance(said, list) else [said]
    if not all(isinstance(c, dict) for c in said):
        return None
    return [{"type": "function", "function": {"name": c.get("name"), "arguments": c.get("arguments")}} for c in said]


def chat_tools(record: dict, where: str) -> list[dict] | None:
    """A chat record's `tools` (OpenAI's fine-tuning format: function tools, {"type": "function", "function":
    {"name", "parameters"}}; LLaMA-Factory's: JSON text of {"name", "parameters"}), as chat templates take them;
    None for none.

    Raises:
        ConfigError: tools of another shape."""
    tools = record.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: `tools` is not JSON ({err.msg})") from None
    if not tools:
        return None
    tools = [t if isinstance(t, dict) and "function" in t else {"type": "function", "function": t}
             for t in tools] if isinstance(tools, list) else None  # fmt: skip
    if tools is None or not all(isinstance(t["function"], dict) and isinstance(t["function"].get("name"), str)
                                for t in tools):  # fmt: skip
        raise ConfigError(f"{where}: `tools` is {str(record.get('tools'))[:80]}, not a list of function tools "
                          "({\"type\": \"function\", \"function\": {\"name\", \"parameters\"}})")  # fmt: skip
    return tools


def _rows(files: list[dict], instruction: bool, template: dict | None, chat: bool | None = None) -> list[dict]:
    """The rows of `files`: documents, examples the template renders, or conversations (`chat`; None: those where
    the first record has `messages` or `conversations`)."""
    rows = []
    for entry in files:
        path, data = Path(location(entry)), recorded_bytes(entry)
        records = read_records(path, data) if instruction else []
        if chat is None and instruction:
            chat = bool(records) and any(key in records[0] for key in CHAT_KEYS)
        if instruction and chat:
            for n, record in enumerate(records, 1):
                where = f"{path}, record {n}"
                tools = chat_tools(record, where)
                rows.append({"source": path.name, "row": n, "messages": chat_messages(record, where)}
                            | ({"tools": tools} if tools else {}))  # fmt: skip
        elif instruction:
            used = {field for key in ("prompt", "completion") for field in template_fields(template[key])}
            nulls: dict[str, int] = {}
            for n, record in enumerate(records, 1):
                rows.append({"source": path.name, "row": n} | render(template, record, f"{path}, record {n}"))
                for field in [k for k in used if k in record and record[k] is None]:
                    nulls[field] = nulls.get(field, 0) + 1
            if nulls:
                log.warning("%s: %s null; the template renders null as empty text", path,
                            joined([f"`{k}` in {n} record(s)" for k, n in sorted(nulls.items())]))  # fmt: skip
        else:
            rows.extend({"source": path.name, "row": n, "text": t} for n, t in enumerate(read_texts(path, data), 1))
    return rows


def row_text(row: dict) -> str:
    """A row's text, without markup: a document's, an example's prompt and completion, a conversation's turns."""
    if "messages" in row:
        return "\n".join((m["content"] or "") + (json.dumps(m["tool_calls"]) if m.get("tool_calls") else "")
                         for m in row["messages"])  # fmt: skip
    return row["text"] if "text" in row else row["prompt"] + row["completion"]


def split_rows(rows: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `ratio` of the rows (at least one), chosen by `seed`; both sets keep their file order."""
    if len(rows) < 2:
        raise ConfigError(f"{len(rows)} row(s) cannot be split into training and validation; add data or give "
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
        raise ConfigError(f"`data.source` = {cfg.data.source!r} has no rows of text")
    chat = "messages" in rows[0]  # conversations, written in the model's chat template
    if chat and templates:
        raise ConfigError(f"{location(files[0])} holds conversations (`messages`), which are written in the model's "
                          f"own chat template, and {location(templates[0])} is a template for records' fields: "
                          "remove the template (or `data.template`), or give records fields")  # fmt: skip
    if chat:
        template, template_from = None, "the model's chat template"
    if cfg.data.validation:
        train, val = rows, _rows(val_files, instruction, template, chat)
        how = f"data.validation ({len(val_files)} file(s))"
    else:
        ratio = cfg.data.validation_split_ratio or DEFAULT_VALIDATION_SPLIT_RATIO
        train, val = split_rows(rows, ratio, cfg.train.train_data_split_seed)
        how = f"validation_split_ratio={ratio}, train_data_split_seed={cfg.train.train_data_split_seed}"
    chars = lambda rs: sum(map(len, (row_text(r) for r in rs)))  # noqa: E731
    report = {
        "kind": "instruction" if instruction else "text",
        "files": [location(f) for f in files],
        "validation": how,
        "template": template_from,
        **({"chat": True} if chat else {}),  # served from messages in the model's chat template
        **({"prompt_template": template} if instruction and not chat else {}),  # for the registered version, its card
        "train_documents": len(train),
        "val_documents": len(val),
        "train_chars": chars(train),
        "val_chars": chars(val),
    }
    return train, val, report
