"""Users' own data in JumpStart's formats: TXT/CSV/JSON domain adaptation, JSONL instruction tuning.

The rows are real paragraphs of Amazon's bundled 10-Ks, written out in each format.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edgar_tune.config import ConfigError, DataNotFound, load_config
from flows.pipeline import _ask_again
from tasks.stages import download_filings, extract_sections  # imports Prefect, which sets up logging, before caplog
from tasks.textdata import JUMPSTART_TEMPLATE, SourceChanged, read_texts, render, split_rows
from tests.conftest import free_port, run_cli, wait_http

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def paragraphs(amzn_files) -> list[str]:
    from tasks.sections import parse_filing

    doc = parse_filing(amzn_files[0], "drop")
    text = doc.items["1"].text + "\n" + doc.items["1A"].text
    paragraphs = [p for p in text.split("\n") if len(p) > 200]
    assert len(paragraphs) > 50  # so no test below can pass on an empty list
    return paragraphs


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_uses_the_text_column_else_the_first(tmp_path, paragraphs, caplog):
    with_text = _write_csv(tmp_path / "a.csv", ["id", "text"], [[i, p] for i, p in enumerate(paragraphs[:5])])
    assert read_texts(with_text) == paragraphs[:5]
    first = _write_csv(tmp_path / "b.csv", ["body", "id"], [[p, i] for i, p in enumerate(paragraphs[:5])])
    with caplog.at_level("INFO", logger="tasks.textdata"):
        assert read_texts(first) == paragraphs[:5]
    assert f"{first} has no `text` column: its first column, `body`, is the text (JumpStart's rule; columns: body, " \
           "id)" in caplog.text  # fmt: skip
    # an id before the text: the ids were the training text, or "fewer than one block" at tokenize
    ids = _write_csv(tmp_path / "c.csv", ["id", "body"], [[f"{i:,}", p] for i, p in enumerate(paragraphs[:5], 999)])
    with pytest.raises(ConfigError, match=re.escape(f"{ids} has no `text` column, and its first column, `id`, which "
                                                    "is read then, holds numbers only; name the column of your text "
                                                    "`text` (its columns: id, body)")):  # fmt: skip
        read_texts(ids)


def test_json_lines_json_array_and_txt_paragraphs(tmp_path, paragraphs):
    lines = tmp_path / "a.json"
    lines.write_text("".join(json.dumps({"text": p, "n": 1}) + "\n" for p in paragraphs[:4]))
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"body": p} for p in paragraphs[:4]]))
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(paragraphs[:4]) + "\n")
    assert read_texts(lines) == read_texts(array) == read_texts(txt) == paragraphs[:4]
    bad = tmp_path / "d.json"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_texts(bad)
    latin1 = tmp_path / "e.csv"
    latin1.write_bytes("text\nNet sales rose.\nCaf\u00e9 revenue fell.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"e.csv, line 3: not UTF-8 \(byte 0xe9 at offset 24\); save the file as"):
        read_texts(latin1)


def test_records_whose_first_column_is_no_text_are_refused_saying_what_to_set(tmp_path, caplog):
    """Without a `text` column the first is read (JumpStart's rule); a first column of JSON lists or objects
    trained on their Python repr. Conversations say to set instruction_tuned."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{chat} holds conversations (`messages`): set "
                                                    "`train.instruction_tuned=true` to train on them")):  # fmt: skip
        read_texts(chat)
    tagged = tmp_path / "tagged.jsonl"
    tagged.write_text(json.dumps({"tags": ["10-K"], "body": "Net sales grew."}) + "\n")
    with pytest.raises(ConfigError, match=re.escape("its first column, `tags`, which is read then, holds lists or "
                                                    "objects, not text; name the column of your text `text` (its "
                                                    "columns: tags, body)")):  # fmt: skip
        read_texts(tagged)
    dolly = tmp_path / "dolly.jsonl"  # instruction records read as text: the JumpStart rule stands, said loudly
    dolly.write_text(json.dumps({"instruction": "Sum up.", "context": "Net sales grew.", "response": "Up."}) + "\n")
    with caplog.at_level(logging.WARNING, logger="tasks.textdata"):
        assert read_texts(dolly) == ["Sum up."]
    assert (f"{dolly} has no `text` column, so its first column, `instruction`, alone is the training text "
            "(JumpStart's rule); its columns (instruction, context, response) are an instruction data set's: set "
            "`train.instruction_tuned=true`") in caplog.text


def test_a_folder_source_reads_its_own_files_and_names_the_subfolders_it_leaves(tmp_path, paragraphs, caplog):
    from tasks.textdata import data_files

    (tmp_path / "2021").mkdir()
    (tmp_path / "2021" / "b.txt").write_text(paragraphs[1])
    (tmp_path / ".cache").mkdir()
    (tmp_path / "template.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no .txt, .csv, .json or .jsonl files directly in it"):
        data_files(str(tmp_path))
    (tmp_path / "a.txt").write_text(paragraphs[0])
    # what a Mac writes beside a file on an exFAT or network disk (binary: read, it stopped the run as not UTF-8)
    (tmp_path / "._a.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\xb0")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with caplog.at_level("INFO", logger="tasks.textdata"):
        assert data_files(str(tmp_path)) == [str(tmp_path / "a.txt")]
    assert f"`data.source` = {tmp_path}: 2021/ not read (a source is the data files directly in it); give a " in caplog.text
    assert f"`data.source` = {tmp_path}: ._a.txt not read: hidden files, as a Mac (`._NAME`), Jupyter" in caplog.text
    assert ".cache/" not in caplog.text and ".DS_Store" not in caplog.text


def test_a_10k_submission_given_as_text_is_refused_naming_the_10k_source(tmp_path):
    """A `full-submission.txt` is a .txt file: given as `data.source` (the file, or its accession folder), it was
    read as paragraphs, training on the SGML envelope and every exhibit with no MD&A held out. The download stage
    refuses it, naming the 10-K source that parses it; real submissions of 2009 and of 1996 (its tags stripped)."""
    import gzip

    from edgar_tune.config import DataConfig
    from tasks.textdata import describe_source

    for name in ("TGFIN_10-K_2009.txt.gz", "AAPL_10-K_1996.txt.gz"):
        folder = tmp_path / name.split("_")[0]
        folder.mkdir()
        submission = folder / "full-submission.txt"
        submission.write_bytes(gzip.decompress((REPO / "data" / "edgar" / "filings" / name).read_bytes()))
        said = rf"`data.source`: {submission} is an EDGAR filing .* give the folder that holds `sec-edgar-filings`"
        for source in (submission, folder):
            with pytest.raises(ConfigError, match=said):
                describe_source(DataConfig(source=str(source)))
    plain = tmp_path / "notes.txt"
    plain.write_text("ACCESSION NUMBER: is what EDGAR calls a filing's id.\n")  # text about filings is text
    assert [f["role"] for f in describe_source(DataConfig(source=str(plain)))] == ["train"]


def test_split_holds_out_the_ratio_with_its_seed():
    rows = [{"text": str(i)} for i in range(50)]
    train, val = split_rows(rows, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40 and not {r["text"] for r in train} & {r["text"] for r in val}
    assert split_rows(rows, 0.2, seed=0) == (train, val) and split_rows(rows, 0.2, seed=1) != (train, val)


def test_jumpstart_default_template_and_a_missing_field():
    out = render(JUMPSTART_TEMPLATE, {"instruction": "Summarize.", "context": "Net sales rose.", "response": "Up."}, "x")
    assert out["prompt"].endswith("### Instruction:\nSummarize.\n\n### Input:\nNet sales rose.\n\n")
    assert out["completion"] == " Up."
    with pytest.raises(ValueError, match=r"field \{response\}"):
        render(JUMPSTART_TEMPLATE, {"instruction": "a", "context": "b"}, "data.jsonl, record 3")


def test_a_null_field_renders_as_empty_text_and_is_counted(tmp_path, caplog):
    """JSON's null in a field the template uses rendered as "None" in the prompt, silently; it is empty text, and
    the parse stage's log counts the records per field."""
    import hashlib

    from tasks.textdata import _rows

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "context": None if i % 2 else "c", "response": "r",
                                        "note": None}) + "\n" for i in range(4)))  # fmt: skip
    entry = {"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    with caplog.at_level(logging.WARNING, logger="tasks.textdata"):
        rows = _rows([entry], True, JUMPSTART_TEMPLATE)
    assert "None" not in "".join(r["prompt"] for r in rows) and rows[1]["prompt"].endswith("### Input:\n\n\n")
    assert f"{data}: `context` in 2 record(s) null; the template renders null as empty text" in caplog.text
    assert "note" not in caplog.text  # a field the template does not use


@pytest.mark.parametrize(("prompt", "said"), [
    ("{instruction", "`prompt` '{instruction' is not a format string (expected '}' before end of string); write each "
                     "record field as {name}, and a brace that is text as {{ or }}"),
    ("{} and {instruction}", "`prompt` '{} and {instruction}' has a field without a name ({}); name the record's "
                             "field"),
    (3, '`prompt` is int 3; give a format string, as "{instruction}"'),
])  # fmt: skip
def test_a_template_that_cannot_format_records_is_refused_as_it_is_read(tmp_path, prompt, said):
    """A template.json whose format string is malformed ended the parse stage in a ValueError's traceback at the
    first record; it is refused where the template is read, naming the file and the key."""
    import hashlib

    from tasks.textdata import load_template

    path = tmp_path / "template.json"
    path.write_text(json.dumps({"prompt": prompt, "completion": " {response}"}))
    entry = {"path": str(path), "role": "template", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {said}")):
        load_template(entry)
    spec = {"prompt": "{amount:d}", "completion": " {response}"}  # a format the record's field cannot take
    with pytest.raises(ConfigError, match=r"record 2: the template cannot format this record \(Unknown format code"):
        render(spec, {"amount": "12", "response": "up"}, "data.jsonl, record 2")


def test_prompt_tokens_are_masked_out_of_the_loss(tiny_run):
    from tasks.blocks import encode_instructions
    from tasks.models import load_tokenizer

    runs, _ = tiny_run
    tok = load_tokenizer(str(runs / "latest" / "03_tokenize" / "tiny-llama"))
    rows = [{"prompt": "### Instruction:\nWhat were net sales?\n\n", "completion": " Net sales were $386.1 billion."}]
    cols, cut = encode_instructions(rows, tok, 128)
    prompt_len = len(tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"])
    ids, labels = cols["input_ids"][0], cols["labels"][0]
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tok.eos_token_id and cut == 0
    assert tok.decode(ids[prompt_len:-1]) == rows[0]["completion"]
    # A large set is tokenized a thousand examples at a time, for the stage's progress, to the same ids.
    many = [{"prompt": f"### Instruction:\nWhat were net sales in {2000 + i % 24}?\n\n", "completion": f" ${i}."}
            for i in range(2500)]  # fmt: skip
    heard: list[int] = []
    cols, _ = encode_instructions(many, tok, 128, heard.append)
    assert heard == [1000, 1000, 500]
    prompts = tok([r["prompt"] for r in many], add_special_tokens=False)["input_ids"]
    completions = tok([r["completion"] for r in many], add_special_tokens=False)["input_ids"]
    assert cols["input_ids"] == [p + c + [tok.eos_token_id] for p, c in zip(prompts, completions, strict=True)]


def test_an_edited_source_is_read_again_and_never_half(tmp_path, paragraphs, caplog):
    """The user's files are described (sha256) by the download stage at every run, and the parse stage reads only
    those bytes. Before, a CSV edited in place under the same name left every stage `Cached` on the old rows."""
    data, template = tmp_path / "data" / "qa.jsonl", tmp_path / "data" / "template.json"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"q": p[:80], "a": p[80:160]}) + "\n" for p in paragraphs[:10]))
    template.write_text(json.dumps({"prompt": "Q: {q}\n", "completion": "A: {a}"}))
    cfg = load_config("tiny", [f"data.source={data}", "instruction_tuned=true"])
    run = tmp_path / "run"
    assert _ask_again(run, cfg), "a text source must be described again at every run"
    download_filings.fn(run, cfg.data)
    manifest = json.loads((run / "01_download" / "manifest.json").read_text())
    assert [(Path(f["path"]).name, f["role"]) for f in manifest["files"]] == [("qa.jsonl", "train"),
                                                                              ("template.json", "template")]
    assert extract_sections.fn(run, cfg)["train_documents"] == 8

    with open(data, "a") as f:  # edited in place, under the same name, after the download stage
        f.write("".join(json.dumps({"q": p[:80], "a": p[80:160]}) + "\n" for p in paragraphs[10:20]))
    with pytest.raises(SourceChanged, match=r"qa.jsonl changed after the download stage recorded it .* rerun download"):
        extract_sections.fn(run, cfg)
    with caplog.at_level("INFO", logger="tasks.textdata"):
        download_filings.fn(run, cfg.data)
    assert "qa.jsonl changed since this run's last download" in caplog.text
    assert extract_sections.fn(run, cfg)["train_documents"] == 16

    template.write_text(json.dumps({"prompt": "Question: {q}\n", "completion": "Answer: {a}"}))
    with pytest.raises(SourceChanged, match="template.json changed"):
        extract_sections.fn(run, cfg)
    download_filings.fn(run, cfg.data)
    extract_sections.fn(run, cfg)
    assert json.loads((run / "02_parse" / "train.jsonl").read_text().splitlines()[0])["prompt"].startswith("Question:")
    data.unlink()
    with pytest.raises(SourceChanged, match="qa.jsonl is gone since the download stage recorded it"):
        extract_sections.fn(run, cfg)
    assert not _ask_again(run, cfg)  # as on another host resuming an s3:// run: the recorded download stands


@pytest.mark.slow  # make test-slow; the JSONL end-to-end run and the CSV/TXT/JSON readers' tests stay in make test
def test_domain_adaptation_from_a_csv_end_to_end(tmp_path, paragraphs, prefect_server):
    data = _write_csv(tmp_path / "amzn.csv", ["text"], [[p] for p in paragraphs])
    s = run_cli(tmp_path, "--set", f"data.source={data}", "--set", "validation_split_ratio=0.25", "--set", "max_steps=30",
                env=prefect_server)  # fmt: skip
    assert s["filings"] == [] and s["data_files"] == [str(data)]
    assert s["ppl_after"] < s["ppl_before"]
    report = json.loads((tmp_path / "latest" / "02_parse" / "report.json").read_text())
    assert report["kind"] == "text" and report["val_documents"] == round(0.25 * len(paragraphs))


def test_instruction_tuning_from_jsonl_end_to_end(tmp_path, paragraphs, prefect_server, capsys):
    from flows.pipeline import format_summary

    data = tmp_path / "continue.jsonl"
    records = [{"instruction": "Continue this passage from Amazon's 10-K.", "context": a[:400], "response": b[:300]}
               for a, b in zip(paragraphs, paragraphs[1:], strict=False)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    s = run_cli(tmp_path, "--set", f"data.source={data}", "--set", "instruction_tuned=true", "--set", "max_steps=30",
                "--set", "max_input_length=256", "--set", "per_device_train_batch_size=4", env=prefect_server)  # fmt: skip
    assert s["ppl_after"] < s["ppl_before"]
    run = tmp_path / "latest"
    assert json.loads((run / "02_parse" / "report.json").read_text())["template"] == "jumpstart-default"
    after = json.loads((run / "05_evaluate" / "finetuned.json").read_text())
    assert after["scored"] == "completion tokens"
    tok_stats = json.loads((run / "03_tokenize" / "stats.json").read_text())
    assert tok_stats["kind"] == "instruction" and after["tokens"] == tok_stats["val_tokens"]
    docs = tok_stats["val_tokens_per_document"]  # whole examples, and the completion tokens scored of each
    assert sum(d["scored_tokens"] for d in docs) == tok_stats["val_tokens"]
    assert all(0 < d["scored_tokens"] < d["tokens"] for d in docs)
    assert s["validation"] == (f"completion tokens of {len(docs)} held-out examples "
                               "(validation_split_ratio=0.2, train_data_split_seed=0)")  # fmt: skip
    assert f"validation {s['val_tokens']:,}: completion tokens of" in format_summary(s)
    assert format_summary(s).splitlines()[2].split() == ["data", "continue.jsonl"]
    # Its samples are the first held-out examples, prompted in the template, beside the responses held out (not
    # JumpStart's 10-K text to continue, which it was not tuned to answer)
    held = [json.loads(line) for line in (run / "02_parse" / "val.jsonl").read_text().splitlines()][:4]
    rows = json.loads((run / "05_evaluate" / "finetuned.samples.json").read_text())["rows"]
    assert [r["prompt"] for r in rows] == [h["prompt"] for h in held]
    assert all(h["completion"].startswith(r["reference"]) and r["reference"] for r, h in zip(rows, held, strict=True))
    assert ("generation samples (fine-tuned): 4 held-out example(s), 1 sample(s) each, up to 100 tokens after the "
            "prompt") in (tmp_path / "run.log").read_text()  # fmt: skip
    import mlflow  # the registered version names its files, and `edgar-tune models` shows them (a 10-K run's filings)

    from edgar_tune.cli import _data_summary
    from tasks.registry import versions

    row = next(r for r in versions(mlflow.MlflowClient(s["mlflow_tracking_uri"]), s["registered_model"])
               if r["version"] == str(s["model_version"]))  # fmt: skip
    assert row["filings"] == [] and row["data_files"] == [str(data)] and _data_summary(row) == "continue.jsonl"
    # The version keeps the template it was trained in: `generate --field` writes a prompt in it, and an export's
    # card shows it (whoever loaded the export could not know how to prompt it).
    from edgar_tune.cli import main

    client = mlflow.MlflowClient(s["mlflow_tracking_uri"])
    mv = client.get_model_version(s["registered_model"], str(s["model_version"]))
    assert json.loads(mv.tags["prompt_template"]) == JUMPSTART_TEMPLATE
    model = f"models:/{s['registered_model']}/{s['model_version']}"
    store = ["--tracking-uri", s["mlflow_tracking_uri"]]
    capsys.readouterr()
    assert main(["generate", "--model", model, *store, "--field", "instruction=Continue.", "--field",
                 "context=Net sales grew.", "--max-new-tokens", "2", "--json"]) == 0  # fmt: skip
    said = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert said["prompt"] == JUMPSTART_TEMPLATE["prompt"].format(instruction="Continue.", context="Net sales grew.")
    # Loaded (or served), it takes the template's fields as columns too: the same prompt, the same text.
    import pandas as pd

    loaded = mlflow.pyfunc.load_model(model)
    assert [c.name for c in loaded.metadata.get_input_schema().inputs] == ["prompt", "instruction", "context"]
    fields = {"instruction": ["Continue."], "context": ["Net sales grew."]}
    assert loaded.predict(fields, {"max_new_tokens": 2}) == [said["generated"]]
    assert loaded.predict(pd.DataFrame({"prompt": [said["prompt"]]}), {"max_new_tokens": 2}) == [said["generated"]]
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"the request has both a prompt and the template's "
                       r"fields \(instruction\); give one"):  # fmt: skip
        loaded.predict({"prompt": "x", "instruction": "y"})
    assert main(["export", "--model", model, *store, "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "## Prompt it" in card and "### Instruction:\n{instruction}\n\n### Input:\n{context}" in card
    # The same data again: the download stage describes the file again (it could have been edited under the same
    # name); its manifest is the same, so everything after it stays cached. From another Prefect home (another
    # shell, a worker): Prefect's results are kept with the run, not in the home that ran it.
    again = run_cli(tmp_path, "--set", f"data.source={data}", "--set", "instruction_tuned=true", "--set", "max_steps=30",
                    "--set", "max_input_length=256", "--set", "per_device_train_batch_size=4",
                    env={**prefect_server, "PREFECT_HOME": str(tmp_path / "another-home")})  # fmt: skip
    assert again["stages"].pop("download") == "Completed" and set(again["stages"].values()) == {"Cached"}
    # The data gone from this machine (as on a host that resumes an s3:// run): this run stands on its recorded
    # download; a new run from it is refused at once, before Prefect starts, saying where a relative path was read.
    gone = data.rename(tmp_path / "moved.jsonl")
    stands = run_cli(tmp_path, "--set", f"data.source={data}", "--set", "instruction_tuned=true", "--set",
                     "max_steps=30", "--set", "max_input_length=256", "--set", "per_device_train_batch_size=4",
                     env=prefect_server)  # fmt: skip
    assert set(stands["stages"].values()) == {"Cached"}
    said = (tmp_path / "run.log").read_text()
    assert f"{data} is not on this machine: the run's recorded download stage stands" in said
    for given, where in ((str(data), ""), ("continue.jsonl", f" (a relative path, looked for in {REPO})")):
        new = [sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out", str(tmp_path / "new"),
               "--set", f"data.source={given}"]  # fmt: skip
        proc = subprocess.run(new, cwd=REPO, env=dict(os.environ, **prefect_server), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 2 and "prefect" not in proc.stderr.lower(), proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == (f"edgar-tune: error: `data.source` = {given!r} does not "
                                                        f"exist{where}; give a file or folder that does, `bundled` "
                                                        "or `edgar`")  # fmt: skip
    gone.rename(data)
    # Edited after the download stage recorded it: a rerun of the parse stage refuses to read it, and gives the
    # command for this run that reads it again.
    with data.open("a") as f:
        f.write(json.dumps(records[0]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "rerun", "parse", "--run", str(run)], cwd=REPO,
                          env=dict(os.environ, **prefect_server), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "continue.jsonl changed after the download stage recorded it" in proc.stderr, proc.stderr[-3000:]
    assert f"(`edgar-tune rerun download --run {run}`, or run the pipeline again)" in proc.stderr


def test_text_that_cannot_be_split_ends_the_run_saying_what_to_change(tmp_path, prefect_server):
    """A problem with the data that a stage finds (one row: no split can hold any out) ends the run with exit 2 and
    its message last, as a config error does; it ended in a ValueError traceback, exit 1."""
    one = tmp_path / "one.csv"
    one.write_text("text\nRevenue grew on higher unit sales.\n")
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out",
                           str(tmp_path / "run"), "--set", f"data.source={one}"], cwd=REPO, timeout=300,
                          env=dict(os.environ, **prefect_server), capture_output=True, text=True)  # fmt: skip
    said = "1 row(s) cannot be split into training and validation; add data or give `data.validation`"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"edgar-tune: error: {said}"
    # Prefect logs the error that ends the stage's task run and the flow run, without the traceback of its engine
    # above it: on the console, and in the flow run's log in the UI.
    assert "Traceback" not in proc.stderr and "task run 'parse' - Task run failed with exception: ConfigError" \
        in proc.stderr, proc.stderr[-3000:]  # fmt: skip
    # ...once there, naming the stage, then the CLI's line: Prefect's three other lines with the whole message (the
    # task run and the flow run finishing Failed, the flow run meeting it) stay in the UI's log (below)
    assert proc.stderr.count(said) == 2, proc.stderr[-3000:]
    name = re.search(r"Beginning flow run '([^']+)'", proc.stderr)[1]
    api = httpx.Client(base_url=prefect_server["PREFECT_API_URL"], timeout=60)
    run = api.post("/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}},
                                              "sort": "EXPECTED_START_TIME_DESC"}).json()[0]  # fmt: skip
    query = {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC"}
    for _ in range(60):  # the logs reach the server in batches, after the run's state
        messages = [r["message"] for r in api.post("/logs/filter", json=query).json()]
        if any(m.startswith("Encountered exception") for m in messages):
            break
        time.sleep(0.5)
    ended = [m for m in messages if said in m]
    assert len(ended) >= 2 and not any("Traceback" in m for m in messages), messages


def test_the_run_log_keeps_a_bugs_traceback():
    """The run's log drops the traceback of an error that explains itself (the test above); a bug's stays, for its
    report."""
    from flows.logs import logs_into_the_flow_run

    logs_into_the_flow_run()
    logger, kept = logging.getLogger("prefect.task_runs"), []
    for err in (ConfigError("give `data.validation`"), DataNotFound("`data.source` = 'x' does not exist"),
                KeyError("blocks")):  # fmt: skip
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "Task run failed with exception: %r",
                                   (err,), (type(err), err, err.__traceback__))  # fmt: skip
        assert logger.filter(record)  # as Logger.handle asks before any handler sees the record
        kept.append(record.exc_info and record.exc_info[0])
    assert kept == [None, None, KeyError]


def test_instruction_tuning_needs_jsonl():
    with pytest.raises(ConfigError, match="reads JSONL"):
        load_config("tiny", ["data.source=notes.csv", "instruction_tuned=true"])


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # fmt: skip

# Qwen2.5's way of writing tools and calls (its template, shortened): the tools in the system turn, each call
# between <tool_call> and </tool_call>, which its tokenizer holds as tokens of their own
TOOL_QWEN = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ '\\n' + t | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant"
    "{% if m.content %}{{ '\\n' + m.content }}{% endif %}{% for c in m.tool_calls %}{% set c = c.function %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + c.name + '\", \"arguments\": ' }}{{ c.arguments | tojson }}"
    "{{ '}\\n</tool_call>' }}{% endfor %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


# Qwen3's chat template, shortened: the reasoning of an assistant turn after the last user turn written in a
# <think> block (its `reasoning_content`, or a block its content begins with), earlier turns' left out; the
# generation prompt closes an empty block where `enable_thinking` is false
THINK_QWEN = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}{% if m.role == 'assistant' %}{% set content = m.content %}"
    "{% set reasoning = m.reasoning_content or '' %}{% if not reasoning and '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last %}{{ '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}{% endif %}"
    "{{ content }}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, paragraphs) -> Path:
    """A tiny Llama (as the tiny preset builds) whose tokenizer has a ChatML chat template: a chat model's folder."""
    from edgar_tune.config import ModelConfig
    from tasks.models import build_tiny_llama, load_tokenizer

    folder = build_tiny_llama(tmp_path_factory.mktemp("chat") / "tiny-chat", paragraphs, ModelConfig(), 0)
    tok = load_tokenizer(str(folder))
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def _conversation(a: str, b: str) -> list[dict]:
    return [{"role": "system", "content": "You read 10-Ks."}, {"role": "user", "content": a},
            {"role": "assistant", "content": b[:120]}, {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": b[120:200]}]  # fmt: skip


def test_a_conversation_trains_on_the_assistants_turns_in_the_models_chat_template(tiny_chat_model, paragraphs,
                                                                                 tmp_path):
    from tasks.blocks import chat_segments, encode_instructions
    from tasks.models import load_tokenizer
    from tasks.textdata import chat_messages

    tok = load_tokenizer(str(tiny_chat_model))
    messages = _conversation(paragraphs[0][:200], paragraphs[1])
    pieces = chat_segments(messages, tok, "chat.jsonl, record 1")
    assert "".join(text for text, _ in pieces) == tok.apply_chat_template(messages, tokenize=False)
    turns = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    assert [text for text, trained in pieces if trained] == turns  # each turn to its end marker; the header not
    assert pieces[-2][0].endswith("<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
    rows = [{"source": "chat.jsonl", "row": 1, "messages": messages}]
    cols, cut = encode_instructions(rows, tok, 1024)
    labels = cols["labels"][0]
    assert cut == 0 and tok.decode([t for t in labels if t != -100]) == "".join(turns)  # no EOS after the template's
    assert tok.decode(cols["input_ids"][0]) == tok.apply_chat_template(messages, tokenize=False)
    from tasks.split import text_sha256  # what the promotion gate compares: the conversations, not their absence

    assert text_sha256(rows) != text_sha256([{**rows[0], "messages": messages[:3]}]) != text_sha256([])
    # What cannot train says why and what to change.
    plain = load_tokenizer(str(tiny_chat_model))
    plain.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template, which conversations .* use a chat model"):
        chat_segments(messages, plain, "chat.jsonl, record 1")
    with pytest.raises(ConfigError, match=r"chat.jsonl, record 1: .* \(at assistant message 1\), .* start each "):
        chat_segments(messages[2:3], tok, "chat.jsonl, record 1")
    gemma = load_tokenizer(str(tiny_chat_model))  # a template that refuses a system turn, as Gemma's does
    gemma.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') "
                           "}}{% endif %}" + CHATML)  # fmt: skip
    with pytest.raises(ConfigError, match="chat.jsonl, record 1: .*'s chat template refuses the conversation: System "
                       "role not supported; change the conversation"):  # fmt: skip
        chat_segments(messages, gemma, "chat.jsonl, record 1")
    from mlflow.exceptions import MlflowException

    from tasks.registry import chat_prompt

    with pytest.raises(MlflowException, match="the request: the model's chat template refuses these messages: System"):
        chat_prompt(gemma, json.dumps(messages[:2]), "the request")  # served: a 400 saying so
    for record, said in (({"instruction": "q"}, "`messages` is missing; a chat file's every record is a conversation"),
                         ({"messages": [{"role": "bot", "content": "x"}]}, "turn 1: {'role': 'bot', 'content': 'x'} "
                          "is not {\"role\": ROLE, \"content\": TEXT} with ROLE one of system, user, assistant"),
                         ({"conversations": [{"from": "human", "value": 3}]}, "turn 1: {'from': 'human', 'value': 3} "
                          "is not {\"from\": ROLE, \"value\": TEXT} with ROLE one of system, human, user, gpt"),
                         ({"messages": [{"role": ["user"], "content": "x"}]}, "turn 1: {'role': ['user'], "),
                         ({"messages": ["Hi"]}, "turn 1: 'Hi' is not {\"role\": ROLE"),
                         ({"messages": messages[:2]}, "no assistant turn, and the assistant's turns are what")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            chat_messages(record, "chat.jsonl, record 3")
    # ShareGPT's conversations (Axolotl's and LLaMA-Factory's other chat format) are the same conversation.
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in messages]}
    assert chat_messages(sharegpt, "chat.jsonl, record 1") == messages
    import hashlib

    from tasks.textdata import _rows

    data = tmp_path / "sharegpt.jsonl"
    data.write_text(json.dumps(sharegpt) + "\n")  # told from its first record, as `messages` would be
    entry = {"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert _rows([entry], True, JUMPSTART_TEMPLATE) == [{"source": "sharegpt.jsonl", "row": 1, "messages": messages}]


def test_conversations_that_call_tools_train_the_calls_as_the_chat_template_writes_them(tiny_chat_model):
    """A conversation that calls a tool, in OpenAI's fine-tuning format (the record's `tools`, an assistant's
    `tool_calls` with arguments as JSON text, a `tool` turn with the result) or LLaMA-Factory's ShareGPT one
    (`function_call` and `observation` turns, `tools` as JSON text), trains the call as the chat template writes it
    (the tools shown in the prompt, the result not trained), and `edgar-tune serve` reads such a call back
    (`CallForm`): what tuning a version to call tools takes. A template that writes no calls refuses them, since
    the call's turn would train empty; so do tools and calls of another shape. Before, every tool turn was refused
    ("is not {"role": ROLE, "content": TEXT}")."""
    from edgar_tune.serve import CallForm
    from tasks.blocks import chat_segments, encode_instructions
    from tasks.generate import turn_end
    from tasks.models import load_tokenizer
    from tasks.split import text_sha256
    from tasks.textdata import chat_messages, chat_tools

    tool = {"name": "lookup", "description": "An Item of the 10-K.", "parameters": {
        "type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]}}  # fmt: skip
    openai_form = {"tools": [{"type": "function", "function": tool}], "messages": [
        {"role": "user", "content": "What does Item 7 say?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "lookup", "arguments": '{"item": "7"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Net sales increased 22%."},
        {"role": "assistant", "content": "Net sales grew 22%."}]}  # fmt: skip
    sharegpt = {"tools": json.dumps([tool]), "conversations": [
        {"from": "human", "value": "What does Item 7 say?"},
        {"from": "function_call", "value": '{"name": "lookup", "arguments": {"item": "7"}}'},
        {"from": "observation", "value": "Net sales increased 22%."},
        {"from": "gpt", "value": "Net sales grew 22%."}]}  # fmt: skip
    tok = load_tokenizer(str(tiny_chat_model))
    tok.chat_template = TOOL_QWEN
    rows = []
    for n, record in enumerate((openai_form, sharegpt), 1):
        where = f"chat.jsonl, record {n}"
        rows.append({"source": "chat.jsonl", "row": n, "messages": chat_messages(record, where),
                     "tools": chat_tools(record, where)})  # fmt: skip
    pieces = [chat_segments(r["messages"], tok, "chat.jsonl", r["tools"]) for r in rows]
    call = '<tool_call>\n{"name": "lookup", "arguments": {"item": "7"}}\n</tool_call><|im_end|>\n'
    assert [t for t, trained in pieces[0] if trained] == [call, "Net sales grew 22%.<|im_end|>\n"], pieces[0]
    assert pieces[1] == pieces[0]  # the same conversation, in either format
    shown = pieces[0][0][0]
    assert shown.startswith("<|im_start|>system\n<tools>\n") and '"name": "lookup"' in shown  # the tools, untrained
    assert any("<|im_start|>tool\nNet sales increased 22%.<|im_end|>" in t for t, trained in pieces[0] if not trained)
    cols, _ = encode_instructions(rows[:1], tok, 1024)
    trained = tok.decode([t for t in cols["labels"][0] if t != -100])
    assert trained == call + "Net sales grew 22%.<|im_end|>\n"
    form = CallForm.of(tok, turn_end(tok))  # what the server reads back from an answer the version writes so
    assert form.read(call.removesuffix("<|im_end|>\n"), ["lookup"]) == (None, [("lookup", '{"item": "7"}')], True)
    assert text_sha256(rows[:1]) != text_sha256([{**rows[0], "tools": None}])  # the tools shown count
    # what cannot train says why and what to change
    tok.chat_template = CHATML
    with pytest.raises(ConfigError, match=r"chat.jsonl, turn 2: a tool call or its result, which .*'s chat template "
                       r"does not write \(it has no `tool_calls`\): the call's turn would train empty"):  # fmt: skip
        chat_segments(rows[0]["messages"], tok, "chat.jsonl")
    wrong = [({"tools": [{"type": "function", "function": {"description": "no name"}}], "messages": []},
              r"record 1: `tools` is .* not a list of function tools"),
             ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "lookup",
                                                                              "arguments": "{"}}]}]},
              r"record 1, turn 1: .* is not an assistant's \{\"tool_calls\""),
             ({"conversations": [{"from": "function_call", "value": "lookup(7)"}]},
              r"record 1, turn 1: .* is not an assistant's \{\"tool_calls\"")]  # fmt: skip
    for record, why in wrong:
        with pytest.raises(ConfigError, match=why):
            chat_tools(record, "chat.jsonl, record 1")
            chat_messages(record, "chat.jsonl, record 1")


def test_a_turn_of_weight_0_stays_in_the_conversation_untrained_as_openai_fine_tuning_reads_it(tiny_chat_model):
    """OpenAI's fine-tuning format marks an assistant turn that should not train with `"weight": 0` (a worse answer
    kept as context for the turns that follow); 1, or none, trains. Such a turn is written in the prompt and left
    out of the labels, a tool call's as a text answer's; a record's `parallel_tool_calls: false` holds each turn to
    one call. A weight that is not 0 or 1, one on a turn that is not the assistant's, a conversation whose every
    assistant turn has weight 0, and calls in one turn against parallel_tool_calls false are refused, naming the
    record and turn. Before, `weight` was ignored: every assistant turn trained, the ones marked 0 too."""
    from tasks.blocks import chat_segments, encode_instructions
    from tasks.models import load_tokenizer
    from tasks.textdata import chat_messages

    tok = load_tokenizer(str(tiny_chat_model))
    tok.chat_template = TOOL_QWEN
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"item": "7"}'}}
    record = {"messages": [
        {"role": "user", "content": "Net sales?"},
        {"role": "assistant", "content": "Sales were fine.", "weight": 0},
        {"role": "user", "content": "In figures?"},
        {"role": "assistant", "tool_calls": [call], "weight": 0},
        {"role": "tool", "tool_call_id": "call_1", "content": "Net sales increased 22%."},
        {"role": "assistant", "content": "Net sales grew 22%.", "weight": 1}]}  # fmt: skip
    messages = chat_messages(record, "chat.jsonl, record 1")
    assert [m.get("weight") for m in messages] == [None, 0, None, 0, None, None]
    pieces = chat_segments(messages, tok, "chat.jsonl, record 1")
    assert [t for t, trained in pieces if trained] == ["Net sales grew 22%.<|im_end|>\n"]
    untrained = "".join(t for t, trained in pieces if not trained)
    assert "Sales were fine.<|im_end|>" in untrained and '"name": "lookup"' in untrained  # context, not labels
    assert "".join(t for t, _ in pieces) == tok.apply_chat_template(messages, tokenize=False)
    cols, _ = encode_instructions([{"source": "chat.jsonl", "row": 1, "messages": messages}], tok, 1024)
    assert tok.decode([t for t in cols["labels"][0] if t != -100]) == "Net sales grew 22%.<|im_end|>\n"
    two = {"parallel_tool_calls": False, "messages": [{"role": "user", "content": "Both?"},
                                                       {"role": "assistant", "tool_calls": [call, call]}]}  # fmt: skip
    assert len(chat_messages(two | {"parallel_tool_calls": True}, "r")[1]["tool_calls"]) == 2
    wrong = [(record["messages"][:1] + [{"role": "assistant", "content": "x", "weight": 2}],
              r"record 1, turn 2: weight=2 on a assistant turn; a weight is OpenAI's, on an assistant turn: 0 .* or 1"),
             ([{"role": "user", "content": "x", "weight": 0}, *record["messages"][1:]], "turn 1: weight=0 on a user"),
             (record["messages"][:1] + [{"role": "assistant", "content": "x", "weight": True}], "turn 2: weight=true"),
             (record["messages"][:2], r"record 1: no assistant turn to train \(each has weight 0\), and the "),
             (two, r"record 1, turn 2: 2 tool calls in one turn, and the record's parallel_tool_calls is false \(one "
                   r"a turn\): make it true \(or leave it out\), or split the calls")]  # fmt: skip
    for given, why in wrong:
        with pytest.raises(ConfigError, match=why):
            chat_messages(given if isinstance(given, dict) else {"messages": given}, "chat.jsonl, record 1")
    with pytest.raises(ConfigError, match=r"parallel_tool_calls=\"no\"; it is true or false"):
        chat_messages(two | {"parallel_tool_calls": "no"}, "chat.jsonl, record 1")


def test_a_template_that_drops_earlier_turns_reasoning_trains_a_conversation_a_turn_at_a_time(tiny_chat_model,
                                                                                                caplog):
    """Qwen3's chat template writes an assistant turn's reasoning only after the last user message, so a turn is
    written otherwise once later turns follow it, and the conversation as written cannot be cut into its turns.
    Each assistant turn then trains as an example of its own: the conversation before it as the template writes it
    (earlier turns without their reasoning: the prompt the version is given at that turn), then the turn, its
    reasoning block and all. Held-out examples keep their row. Before, such a conversation was refused ("does not
    write the conversation as a continuation of its start"), so multi-turn data could not tune a Qwen3 base."""
    from tasks.blocks import chat_examples, chat_segments, encode_instructions
    from tasks.models import load_tokenizer
    from tasks.textdata import chat_messages

    tok = load_tokenizer(str(tiny_chat_model))
    tok.chat_template = THINK_QWEN
    record = {"messages": [
        {"role": "user", "content": "Net sales?"},
        {"role": "assistant", "reasoning_content": "Item 7 has them.", "content": "Up 22%."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "reasoning_content": "Item 7 says why.", "content": "AWS grew."}]}  # fmt: skip
    messages = chat_messages(record, "chat.jsonl, record 1")
    with pytest.raises(ConfigError, match=r"record 1: .* writes an assistant turn differently once later turns follow"):
        chat_segments(messages, tok, "chat.jsonl, record 1")
    examples = chat_examples(messages, tok, "chat.jsonl, record 1")
    assert [[t for t, trained in e if trained] for e in examples] == [
        ["<think>\nItem 7 has them.\n</think>\n\nUp 22%.<|im_end|>\n"],
        ["<think>\nItem 7 says why.\n</think>\n\nAWS grew.<|im_end|>\n"]]  # fmt: skip
    assert examples[1][0][0] == ("<|im_start|>user\nNet sales?<|im_end|>\n<|im_start|>assistant\nUp 22%.<|im_end|>\n"
                                 "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")  # as prompted then
    assert chat_examples(messages[:2], tok, "r") == [chat_segments(messages[:2], tok, "r")]  # one turn: one example
    rows = [{"source": "chat.jsonl", "row": n, "messages": m} for n, m in ((1, messages), (2, messages[:2]))]
    origin: list[int] = []
    with caplog.at_level("INFO", logger="tasks.blocks"):
        cols, _ = encode_instructions(rows, tok, 1024, origin=origin)
    assert origin == [0, 0, 1] and len(cols["input_ids"]) == 3
    assert [tok.decode([t for t in lab if t != -100]) for lab in cols["labels"]] == [
        "".join(t for t, trained in e if trained) for e in [*examples, examples[0]]]  # fmt: skip
    assert "1 conversation(s) trained a turn at a time (2 examples)" in caplog.text


def _tagged_chat_model(chat_model: Path, folder: Path, tags: list[str], template: str) -> Path:
    """A copy of `chat_model` in `folder`, its tokenizer holding `tags` as tokens of their own (their embedding rows
    new) and writing `template`: a base as Qwen's are."""
    from transformers import AutoModelForCausalLM

    from tasks.models import load_tokenizer

    shutil.copytree(chat_model, folder)
    tok = load_tokenizer(str(folder))
    tok.add_tokens(tags)
    tok.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_trainable_tokens_are_the_added_tokens_the_examples_hold_or_those_named(tiny_chat_model, tmp_path):
    """`train.trainable_tokens`: under auto, the tokenizer's added tokens that are not special and that the training
    split holds (the call's tags here; not <think>, which no example holds, nor <|endoftext|>, special); or the
    tokens named, each one of the vocabulary's (a word piece too); none under full fine-tuning or `none`. A name
    that is not one token is refused saying what it reads as and the added tokens, and rows to train under ZeRO-3
    are refused saying what to set."""
    from datasets import Dataset

    from edgar_tune.config import TrainConfig
    from tasks.finetune import trainable_tokens
    from tasks.models import load_tokenizer

    tags = ["<tool_call>", "</tool_call>", "<think>"]
    tok = load_tokenizer(str(_tagged_chat_model(tiny_chat_model, tmp_path / "tagged", tags, TOOL_QWEN)))
    ids = dict(zip(tags, tok.convert_tokens_to_ids(tags), strict=True))
    split = tmp_path / "03_tokenize"
    texts = ['<tool_call>{"name": "lookup"}</tool_call>', "Net sales increased.<|endoftext|>"]
    Dataset.from_dict({"input_ids": [tok.encode(t) for t in texts]}).save_to_disk(split / "train")
    auto = TrainConfig()
    assert trainable_tokens(split, auto, tok) == {t: ids[t] for t in tags[:2]}
    word = tok.convert_ids_to_tokens(tok.encode(" sales"))[0]
    named = auto.model_copy(update={"trainable_tokens": ["<think>", word]})
    assert trainable_tokens(split, named, tok) == {"<think>": ids["<think>"], word: tok.convert_tokens_to_ids(word)}
    assert trainable_tokens(split, auto.model_copy(update={"mode": "full"}), tok) == {}
    assert trainable_tokens(split, TrainConfig(trainable_tokens="none"), tok) == {}
    with pytest.raises(ConfigError, match=re.escape(
            "train.trainable_tokens: '<tool>' is not one token of this tokenizer (it reads as 4: ['<', 'to', 'ol', "
            "'>']); name tokens of its vocabulary, such as its added tokens (<|endoftext|>, <tool_call>, </tool_call>, "
            "<think>)")):  # fmt: skip
        trainable_tokens(split, TrainConfig(trainable_tokens=["<tool>"]), tok)
    with pytest.raises(ConfigError, match=re.escape(
            "train.trainable_tokens=auto trains the rows of <tool_call>, </tool_call> beside LoRA, and "
            "train.deepspeed=zero3 shards the embedding matrix whose rows peft reads whole (not tried): set "
            "train.trainable_tokens=none")):  # fmt: skip
        trainable_tokens(split, TrainConfig(deepspeed="zero3"), tok)


def test_a_version_tuned_on_tool_calls_calls_a_tool_of_its_own_choice_when_served(tmp_path, paragraphs,
                                                                                    tiny_chat_model, prefect_server):
    """The loop a user runs to have a version call tools: conversations whose assistant calls a tool (OpenAI's
    fine-tuning format) tune a base whose chat template writes tool calls, the run registers the version, and
    `edgar-tune serve` asked with `tools` (and no `tool_choice`: "auto") answers with the call, of the version's
    own choice (no logit_bias), its arguments kept to the tool's parameters, the turn ending as trained
    (finish_reason "tool_calls", not "length": the template's turn end, text here, is the grammar's to allow after
    the calls). Before, such records were refused, and "auto" with them. Tuned with LoRA, the default: the tags'
    embedding rows train beside it (`train.trainable_tokens=auto`); with `train.trainable_tokens=none` this version
    never wrote the tag (finish_reason "length", a run of `": "`), as LoRA alone leaves the rows as resized."""
    import openai

    from tests.test_serving import edgar_tune_serve

    # the tiny chat model, its tokenizer holding the call's tags as Qwen's does
    base = _tagged_chat_model(tiny_chat_model, tmp_path / "tiny-tools", ["<tool_call>", "</tool_call>"], TOOL_QWEN)
    tool = {"type": "function", "function": {"name": "lookup", "description": "An Item of the 10-K.", "parameters": {
        "type": "object", "properties": {"item": {"enum": ["7", "7A", "8"]}}, "required": ["item"]}}}  # fmt: skip
    records = [{"tools": [tool], "messages": [
        {"role": "user", "content": a[:150]},
        {"role": "assistant", "tool_calls": [{"id": f"call_{n}", "type": "function", "function": {
            "name": "lookup", "arguments": json.dumps({"item": ["7", "7A", "8"][n % 3]})}}]},
        {"role": "tool", "tool_call_id": f"call_{n}", "content": a[150:300]},
        {"role": "assistant", "content": b[:100]}]}
        for n, (a, b) in enumerate(zip(paragraphs, paragraphs[1:], strict=False)) if len(a) > 300]  # fmt: skip
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    s = run_cli(tmp_path, "--set", f"data.source={data}", "--set", "instruction_tuned=true", "--set", "max_steps=60",
                "--set", f"model.name={base}", "--set", "max_input_length=512",
                "--set", "per_device_train_batch_size=4", env=prefect_server)  # fmt: skip
    assert s["ppl_after"] < s["ppl_before"]
    assert s["mode"] == "lora" and s["trainable_tokens"] == ["<tool_call>", "</tool_call>"]
    with edgar_tune_serve(f"models:/{s['registered_model']}/{s['model_version']}", tmp_path,
                          MLFLOW_TRACKING_URI=s["mlflow_tracking_uri"]) as base_url:  # fmt: skip
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        answered = client.chat.completions.create(model=s["registered_model"], max_tokens=120, tools=[tool],
                                                  messages=[{"role": "user", "content": "Which Item is MD&A?"}])
    said = answered.choices[0]
    assert said.finish_reason == "tool_calls" and said.message.tool_calls, said
    call = said.message.tool_calls[0].function
    assert call.name == "lookup" and json.loads(call.arguments)["item"] in ("7", "7A", "8"), call
    from edgar_tune.cli import main  # the adapter, the rows in it, as peft loads it; its card names them

    assert main(["export", "--model", f"models:/{s['registered_model']}/{s['model_version']}", "--tracking-uri",
                 s["mlflow_tracking_uri"], "--adapter", "--out", str(tmp_path / "adapter")]) == 0  # fmt: skip
    from tasks.models import load_tokenizer

    ids = load_tokenizer(str(base)).convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    rows = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["trainable_token_indices"]
    assert rows == {"model.embed_tokens": ids}, rows  # the tiny Llama's head is tied: peft ties its rows to these
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "| `train.trainable_tokens` | <tool_call>, </tool_call> |" in card


@pytest.mark.slow  # about 42 s: make test-slow. make test splits reasoning as it streams (test_serving.py) and serves a
# version tuned on conversations end to end (the tool-call test above).
def test_a_version_tuned_to_reason_is_served_its_reasoning_apart_from_its_answer(tmp_path, paragraphs,
                                                                                 tiny_chat_model, prefect_server):
    """A base whose chat template writes reasoning (Qwen3's `<think>` block, its tokenizer holding the tags), tuned
    on conversations whose assistant turns give their `reasoning_content`, writes a block before each answer; served,
    `edgar-tune serve` answers the block's text as `reasoning` and the rest as content, as vLLM's reasoning parsers
    do, whole or streamed (reasoning deltas, then content), `chat_template_kwargs` going to the template (Qwen3's
    `enable_thinking` false: the prompt closes an empty block, so all is content) and `include_reasoning` false
    leaving it out; the Responses API answers a `reasoning` item before the message (streamed as
    `response.reasoning_text.delta` events), and takes it back as input. Before, `reasoning_content` was dropped from
    training records, the block came back inside content, a request's `chat_template_kwargs` was refused, and a
    reasoning item in a Responses API input too."""
    import openai

    from tests.test_serving import edgar_tune_serve

    # the tiny chat model, its tokenizer holding Qwen3's tags
    base = _tagged_chat_model(tiny_chat_model, tmp_path / "tiny-think", ["<think>", "</think>"], THINK_QWEN)
    records = [{"messages": [{"role": "user", "content": a[:150]},
                             {"role": "assistant", "reasoning_content": "Item 7 says so.", "content": b[:60]}]
                + ([{"role": "user", "content": "And then?"}, {"role": "assistant", "reasoning_content": "Item 7 says "
                    "so.", "content": b[60:120]}] if n % 2 else [])}  # every other one two turns, a turn at a time
               for n, (a, b) in enumerate(zip(paragraphs, paragraphs[1:], strict=False))]  # fmt: skip
    data = tmp_path / "think.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    s = run_cli(tmp_path, "--set", f"data.source={data}", "--set", "instruction_tuned=true", "--set", "max_steps=60",
                "--set", f"model.name={base}", "--set", "max_input_length=256", "--set", "train.mode=full",
                "--set", "per_device_train_batch_size=4", env=prefect_server)  # fmt: skip
    assert s["ppl_after"] < s["ppl_before"]
    trained = json.loads((tmp_path / "latest" / "02_parse" / "train.jsonl").read_text().splitlines()[0])
    assert trained["messages"][1]["reasoning_content"] == "Item 7 says so."  # kept, for the template to write
    stats = json.loads((tmp_path / "latest" / "03_tokenize" / "stats.json").read_text())
    assert len(stats["val_tokens_per_document"]) > stats["val_documents"]  # the two-turn ones: two examples
    asked = [{"role": "user", "content": paragraphs[0][:150]}]
    with edgar_tune_serve(f"models:/{s['registered_model']}/{s['model_version']}", tmp_path,
                          MLFLOW_TRACKING_URI=s["mlflow_tracking_uri"]) as base_url:  # fmt: skip
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        ask = {"model": s["registered_model"], "messages": asked, "max_tokens": 40}
        whole = client.chat.completions.create(**ask)
        chunks = list(client.chat.completions.create(**ask, stream=True))
        plain = client.chat.completions.create(**ask, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        left_out = client.chat.completions.create(**ask, extra_body={"include_reasoning": False})
        # kept to a format: the reasoning block first, as trained, then the format (vLLM's reasoning models' way)
        item = {"type": "object", "properties": {"item": {"enum": ["7", "7A", "8"]}}, "required": ["item"],
                "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}  # fmt: skip
        formatted = client.chat.completions.create(**ask | {"max_tokens": 80}, response_format={
            "type": "json_schema", "json_schema": {"name": "item", "schema": item}})  # fmt: skip
        formatted_chunks = list(client.chat.completions.create(**ask | {"max_tokens": 80}, stream=True, response_format={
            "type": "json_schema", "json_schema": {"name": "item", "schema": item}}))  # fmt: skip
        called = client.chat.completions.create(**ask | {"max_tokens": 80}, tools=[{"type": "function", "function": {
            "name": "lookup", "parameters": item}}], tool_choice={"type": "function", "function": {"name": "lookup"}})
        with client.responses.stream(model=s["registered_model"], input=asked[0]["content"], max_output_tokens=80,
                                     tools=[{"type": "function", "name": "lookup", "parameters": item}],
                                     tool_choice={"type": "function", "name": "lookup"}) as stream:  # fmt: skip
            named_events = list(stream)  # the SDK checks each item keeps its index from its first event
        # the Responses API: a reasoning item, then the message; streamed, reasoning_text events
        response = client.responses.create(model=s["registered_model"], input=asked[0]["content"], max_output_tokens=40)
        with client.responses.stream(model=s["registered_model"], input=asked[0]["content"],
                                     max_output_tokens=40) as stream:  # fmt: skip
            events = list(stream)
        back = [asked[0], *[o.model_dump(exclude_none=True) for o in response.output],
                {"role": "user", "content": "And then?"}]  # the items sent back, as the Agents SDK does
        answered = client.responses.create(model=s["registered_model"], input=back, max_output_tokens=4)
        as_chat = client.chat.completions.create(**ask | {"max_tokens": 4, "messages": [
            asked[0], whole.choices[0].message.model_dump(exclude_none=True), back[-1]]})  # fmt: skip
        refused = {}
        for name, value in (("chat_template_kwargs", {"tools": []}), ("chat_template_kwargs", ["x"]),
                            ("include_reasoning", "yes")):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(**ask | {"max_tokens": 4}, extra_body={name: value})
            refused[name, json.dumps(value)] = err.value.body["message"]
    said = whole.choices[0].message
    assert said.reasoning == "Item 7 says so." and said.content and "<think>" not in said.content, said  # learned
    streamed = {kind: "".join(getattr(c.choices[0].delta, kind, None) or "" for c in chunks if c.choices)
                for kind in ("reasoning", "content")}  # fmt: skip
    assert streamed == {"reasoning": said.reasoning, "content": said.content}, chunks
    for answer in (formatted, called):
        said = answer.choices[0].message
        given = said.tool_calls[0].function.arguments if said.tool_calls else said.content
        assert said.reasoning == "Item 7 says so." and json.loads(given)["item"] in ("7", "7A", "8"), answer
    streamed = {kind: "".join(getattr(c.choices[0].delta, kind, None) or "" for c in formatted_chunks if c.choices)
                for kind in ("reasoning", "content")}  # fmt: skip
    thought, function = named_events[-1].response.output  # the reasoning, then the call, in the order streamed
    assert (thought.content[0].text, function.name) == ("Item 7 says so.", "lookup"), named_events[-1]
    assert [e.output_index for e in named_events if e.type == "response.output_item.added"] == [0, 1]
    assert streamed == {"reasoning": "Item 7 says so.", "content": formatted.choices[0].message.content}
    said = whole.choices[0].message
    thought, message = response.output
    assert (thought.type, thought.content[0].text, message.type) == ("reasoning", said.reasoning, "message")
    assert response.output_text == said.content and thought.id.startswith("rs_")
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
    kinds = [e.type for e in events]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == said.reasoning
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert events[-1].response.output[0].model_dump(exclude={"id"}) == thought.model_dump(exclude={"id"})
    assert events[-1].response.output[0].id == events[2].item.id  # one item, from its first event to the response
    assert answered.usage.input_tokens == as_chat.usage.prompt_tokens  # the reasoning item back, as chat's turn
    said = plain.choices[0].message  # the prompt closed an empty block: no reasoning, all content
    assert said.reasoning is None and said.content and plain.usage.prompt_tokens > whole.usage.prompt_tokens
    said = left_out.choices[0].message
    assert "reasoning" not in (said.model_extra or {}) and said.content == whole.choices[0].message.content
    assert refused["chat_template_kwargs", '{"tools": []}'].endswith("tools the request gives otherwise (messages, "
                                                                      "tools)")  # fmt: skip
    assert refused["chat_template_kwargs", '["x"]'].startswith('chat_template_kwargs=["x"]: an object of the variab')
    assert refused["include_reasoning", '"yes"'] == 'include_reasoning must be true or false, got "yes"'


@pytest.mark.slow  # about 45 s: make test-slow. make test trains conversations in the chat template end to end in the
# tool-call test above, serves `messages` (test_serving.py), and MLflow's server a version.
def test_chat_tuning_end_to_end_serves_messages_in_the_chat_template(tmp_path, paragraphs, tiny_chat_model,
                                                                      prefect_server, capsys):  # fmt: skip
    """Records that are conversations train in the model's own chat template (not a template.json), and the
    registered version takes `messages` (a user's text, or a JSON conversation) and writes the prompt itself."""
    import mlflow
    import pandas as pd

    from edgar_tune.cli import main
    from tasks.models import load_tokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": _conversation(a[:200], b)}) + "\n"
                            for a, b in zip(paragraphs, paragraphs[1:], strict=False)))  # fmt: skip
    s = run_cli(tmp_path, "--set", f"data.source={data}", "--set", "instruction_tuned=true", "--set", "max_steps=20",
                "--set", f"model.name={tiny_chat_model}", "--set", "max_input_length=512",
                "--set", "per_device_train_batch_size=4", env=prefect_server)  # fmt: skip
    run = tmp_path / "latest"
    report = json.loads((run / "02_parse" / "report.json").read_text())
    assert report["template"] == "the model's chat template" and report["chat"] and "prompt_template" not in report
    after = json.loads((run / "05_evaluate" / "finetuned.json").read_text())
    assert after["scored"] == "completion tokens" and s["ppl_after"] < s["ppl_before"]
    # Sampled on held-out conversations up to the assistant's first turn, in the chat template, beside that turn
    held = [json.loads(line)["messages"] for line in (run / "02_parse" / "val.jsonl").read_text().splitlines()][:4]
    rows = json.loads((run / "05_evaluate" / "base.samples.json").read_text())["rows"]
    assert [r["prompt"] for r in rows] == [f"<|im_start|>system\nYou read 10-Ks.<|im_end|>\n<|im_start|>user\n"
                                           f"{h[1]['content']}<|im_end|>\n<|im_start|>assistant\n" for h in held]
    assert [r["reference"] for r in rows] == [h[2]["content"] + "<|im_end|>\n" for h in held]
    table = json.loads(Path(mlflow.MlflowClient(s["mlflow_tracking_uri"]).download_artifacts(
        s["mlflow_run_id"], "eval/generations.json", str(tmp_path / "dl"))).read_text())  # fmt: skip
    assert table["columns"] == ["prompt", "sample", "base_model", "fine_tuned", "reference"]
    assert [row[4] for row in table["data"]] == [r["reference"] for r in rows]
    model = f"models:/{s['registered_model']}/{s['model_version']}"
    mlflow.set_tracking_uri(s["mlflow_tracking_uri"])
    loaded = mlflow.pyfunc.load_model(model)
    inputs = loaded.metadata.get_input_schema().inputs  # `messages` a list of turns, or text
    assert [(c.name, type(c.type).__name__) for c in inputs] == [("prompt", "DataType"), ("messages", "AnyType")]
    tok = load_tokenizer(str(tiny_chat_model))
    asked = [{"role": "user", "content": "Net sales grew."}]
    prompt = tok.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
    said = loaded.predict(pd.DataFrame({"prompt": [prompt]}), {"max_new_tokens": 3})
    assert loaded.predict({"messages": ["Net sales grew."]}, {"max_new_tokens": 3}) == said
    assert loaded.predict({"messages": json.dumps(asked)}, {"max_new_tokens": 3}) == said
    assert loaded.predict({"messages": asked}, {"max_tokens": 3}) == said  # as OpenAI's chat requests give them
    # Served: OpenAI's chat request is one conversation, and the `inputs` of several are one request each
    system = [{"role": "system", "content": "Be brief."}, *asked]
    alone = loaded.predict({"messages": json.dumps(system)}, {"max_new_tokens": 3})
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=s["mlflow_tracking_uri"],
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    serve = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model,
                              "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=tmp_path,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", serve)
        url = f"http://127.0.0.1:{port}/invocations"
        openai = httpx.post(url, json={"messages": system, "max_tokens": 3}, timeout=120)
        batch = httpx.post(url, json={"inputs": {"messages": [system, asked]}, "params": {"max_new_tokens": 3}},
                           timeout=120)  # fmt: skip
        two = httpx.post(url, json={"messages": system, "max_tokens": 3, "max_new_tokens": 5}, timeout=120)
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    assert openai.json() == alone, openai.text  # unwrapped, as MLflow answers a request in that form
    assert batch.json() == {"predictions": alone + said}, batch.text
    assert two.status_code == 400 and "are two names for the tokens to generate" in two.json()["message"], two.text
    with pytest.raises(mlflow.exceptions.MlflowException, match=re.escape(
            "the request, turn 1: {'role': 'me', 'content': 'x'} is not {\"role\": ROLE, \"content\": TEXT} with "
            "ROLE one of system, user, assistant")):  # checked as a training record's turns are
        loaded.predict({"messages": '[{"role": "me", "content": "x"}]'})
    capsys.readouterr()
    assert main(["generate", "--model", model, "--tracking-uri", s["mlflow_tracking_uri"], "--message",
                 "Net sales grew.", "--max-new-tokens", "3", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"message": "Net sales grew.", "generated": said[0]}
    assert main(["export", "--model", model, "--tracking-uri", s["mlflow_tracking_uri"], "--out",
                 str(tmp_path / "export")]) == 0  # fmt: skip
    card = (tmp_path / "export" / "README.md").read_text()
    assert "trained on conversations written in its tokenizer's chat template" in card and "apply_chat_template" in card
    assert ("It ends its answer with `<|im_end|>`, where the template ends the assistant's turn, which may not be its "
            "EOS: stop there too (`generate(..., stop_strings=['<|im_end|>'], tokenizer=tokenizer)`)") in card
    from tasks.export import _prompt_lines  # a GGUF's card: the file carries the template, llama.cpp applies it

    assert "llama.cpp applies it to a conversation" in "\n".join(_prompt_lines(None, chat=True, gguf=True))
    # A template.json beside conversations is refused: which of the two writes the prompt?
    (tmp_path / "template.json").write_text(json.dumps(JUMPSTART_TEMPLATE))
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out",
                           str(tmp_path / "both"), "--set", f"data.source={data}", "--set", "instruction_tuned=true",
                           "--set", f"model.name={tiny_chat_model}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **prefect_server})  # fmt: skip
    assert proc.returncode != 0 and (f"edgar-tune: error: {data} holds conversations (`messages`), which are written "
                                     "in the model's own chat template, and") in proc.stderr, proc.stderr[-2000:]
