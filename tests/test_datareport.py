"""Tokenize's data report, of real filings of two eras: what each Item is, what it adds, and why where it adds
nothing. A filing of 1996 has no Item 1A because the form had none then, not because the parser missed it."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgar_tune.config import ParseConfig
from tasks.cache import CODE
from tasks.datareport import data_report, report_markdown
from tasks.download import BUNDLED_DIR, collect_local, primary_file
from tasks.split import build_split, parse_all

REPO = Path(__file__).resolve().parent.parent
AAPL = {"ticker": "AAPL", "fiscal_year": 1996, "accession": "0000320193-96-000023", "form": "10-K"}


@pytest.fixture(scope="module")
def report() -> dict:
    filings = collect_local(BUNDLED_DIR, ["AMZN"], [2020, 2021])
    paths = [primary_file(f) for f in filings] + [REPO / "data" / "edgar" / "filings" / "AAPL_10-K_1996.txt.gz"]
    train, val, parsed = build_split([*filings, AAPL], parse_all(paths, "rows", workers=1), ParseConfig())
    rows = train + val
    return data_report(parsed, rows, [[0] * (len(r["text"].split()) + 1) for r in rows])  # a word a token, and EOS


def test_an_item_the_form_did_not_have_then_says_so(report):
    amzn20, amzn21, aapl = (f["items"] for f in report["filings"])
    era = "no 'Item {}' heading, and the form had none before FY{}"
    for key, year in (("1A", 2005), ("1B", 2005), ("7A", 1997), ("9A", 2003), ("9B", 2004), ("15", 2003)):
        assert aapl[key] == {"status": "not_found", "chars": 0, "reason": era.format(key, year), "tokens": 0}
    assert amzn20["1C"]["reason"] == era.format("1C", 2023) and amzn20["9C"]["reason"] == era.format("9C", 2021)
    # FY2021's 10-K has Item 9C ("Not applicable"): the filing's own word, not the form's
    assert amzn21["9C"]["reason"] == "the filing says this Item does not apply to it"
    assert amzn21["11"]["reason"] == "short Item that points to another document"
    assert "reason" not in amzn21["7"] and aapl["7"]["status"] == "ok"


def test_the_table_of_items_sums_every_filing(report):
    rows = {row["item"]: row for row in report["items"]}
    assert (rows["1A"]["ok"], rows["1A"]["not_found"], rows["7"]["set"]) == (2, 1, "val")
    assert rows["11"]["incorporated_by_reference"] == 3 and rows["11"]["tokens"] == 0
    assert rows["1B"]["why_not"] == [{"reason": "the filing says this Item does not apply to it", "filings": 2},
                                     {"reason": "no 'Item 1B' heading, and the form had none before FY2005",
                                      "filings": 1}]  # fmt: skip
    for s in ("train", "val"):
        assert sum(r["tokens"] for r in rows.values() if r["set"] == s) == sum(f[f"{s}_tokens"] for f in
                                                                               report["filings"])  # fmt: skip


def test_the_markdown_reads_totals_then_items_then_filings(report):
    md = report_markdown(report)
    assert md.startswith("# Data report\n\n3 filings of 2 companies, FY1996 to FY2021: ")
    assert md.index("## Items") < md.index("## Filings")
    assert ("| 1A | Risk Factors | 2 | 0 | 1 | 102,321 | 14,971 | train | no 'Item 1A' heading, and the form had none "
            "before FY2005 (1) |") in md  # fmt: skip
    assert ("| AMZN | 2021 | 0001018724-22-000005 | 11 | incorporated_by_reference | 171 | 0 | - | short Item that "
            "points to another document |") in md  # fmt: skip
    assert "| AAPL | 1996 | 0000320193-96-000023 | 1A |" not in md  # no text at all: counted in the Items only


def test_a_reworded_report_is_tokenizes_code_alone():
    """The report reaches training and the evaluations only through what the registration logs: its code moves
    tokenize's key, never theirs (so a clearer report never trains or scores again)."""
    assert "tasks/datareport.py" in CODE["tokenize"]
    assert not any(p in CODE[s] for s in ("evaluate-base", "train", "evaluate")
                   for p in ("tasks/datareport.py", "tasks/blocks.py"))  # fmt: skip


def test_filings_that_add_no_text_or_no_validation_text_are_warned_of(tmp_path, caplog):
    """A filing with no Item as text (a layout the parser does not split) added nothing to the run, and one without
    the held-out Item added no validation text, each only in the data report: a run of many filings lost them
    without a word. Here TGFIN's real FY2009 10-K says Item 7A does not apply to it (a smaller reporting company)."""
    from tasks.split import write_parse_stage

    filings_dir = REPO / "data" / "edgar" / "filings"
    (tmp_path / "odd.htm").write_text("<html><body><p>Annual report. Sales grew ten percent.</p></body></html>")
    filings = [*collect_local(BUNDLED_DIR, ["AMZN"], [2020]),
               {"ticker": "876134", "fiscal_year": 2009, "accession": "0001010412-10-000078", "form": "10-K",
                "root": str(filings_dir), "files": {"primary_document": "TGFIN_10-K_2009.txt.gz"}},
               {"ticker": "ODD", "fiscal_year": 2024, "accession": "0000000000-24-000001", "form": "10-K",
                "root": str(tmp_path), "files": {"primary_document": "odd.htm"}}]  # fmt: skip
    with caplog.at_level("WARNING", logger="tasks.split"):
        write_parse_stage(tmp_path / "parse", filings, ParseConfig(val_items=["7", "7A"]))
    assert ("1 of 3 filings have no Item as text, so they add nothing to the run: ODD FY2024 (no 'Item 1' heading "
            "found in the document body: 1; `edgar-tune sections FILE` shows how a file splits)") in caplog.text
    assert "have no Item 7/7A as text" not in caplog.text  # TGFIN's Item 7 validates
    caplog.clear()
    with caplog.at_level("WARNING", logger="tasks.split"):
        write_parse_stage(tmp_path / "parse", filings[:2], ParseConfig(val_items=["7A"]))
    assert ("1 of 2 filings have no Item 7A as text, so they add training text only: 876134 FY2009 (the filing says "
            "this Item does not apply to it: 1)") in caplog.text
