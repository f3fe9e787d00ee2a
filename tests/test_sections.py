"""Stage 2 on real filings: Items, the MD&A hold-out and the `sections` command.

Expected first words and lengths were read off the documents themselves (tags stripped), not off the parser.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgar_tune.config import ParseConfig
from tasks.download import BUNDLED_DIR, collect_local, primary_file
from tasks.sections import find_headings, parse_filing, to_lines
from tasks.split import build_split, parse_all

REPO = Path(__file__).resolve().parent.parent
FILINGS = REPO / "data" / "edgar" / "filings"

# (accession, item, first words of the body, length band in characters)
AMZN_EXPECTED = [
    ("0001018724-21-000004", "1", "This Annual Report on Form 10-K and the documents incorporated herein", (10_000, 14_000)),
    ("0001018724-21-000004", "1A", "Please carefully consider the following discussion of significant", (44_000, 56_000)),
    ("0001018724-21-000004", "7", "Forward-Looking Statements\nThis Annual Report on Form 10-K includes", (46_000, 58_000)),
    ("0001018724-22-000005", "1", "This Annual Report on Form 10-K and the documents incorporated herein", (10_500, 14_500)),
    ("0001018724-22-000005", "1A", "Please carefully consider the following discussion of significant", (46_000, 58_000)),
    ("0001018724-22-000005", "7", "Forward-Looking Statements\nThis Annual Report on Form 10-K includes", (44_000, 55_000)),
]


@pytest.fixture(scope="module")
def amzn() -> dict:
    filings = collect_local(BUNDLED_DIR, ["AMZN"], [2020, 2021])
    return {f["accession"]: parse_filing(primary_file(f)) for f in filings}


@pytest.mark.parametrize(("acc", "item", "first", "band"), AMZN_EXPECTED)
def test_amazon_items(amzn, acc, item, first, band):
    got = amzn[acc].items[item]
    assert got.status == "ok"
    assert got.text.startswith(first)
    assert band[0] <= len(got.text) <= band[1]


def test_amazon_part_iii_items_are_stubs_pointing_to_the_proxy(amzn):
    for doc in amzn.values():
        assert doc.items["11"].status == "incorporated_by_reference"
        assert doc.form == "10-K" and doc.warnings == []


def test_table_of_contents_is_not_taken_for_the_body(amzn):
    doc = amzn["0001018724-21-000004"]
    assert "Risk Factors | 6" not in doc.items["1"].text  # the TOC row would carry a page number
    assert "Unresolved Staff Comments" not in doc.items["1"].text


def test_cross_references_do_not_end_an_item():
    lines = ["Item 7. Management's Discussion", "Overview text.", "Item 8 of Part II, “Financial Statements” says more.",
             "See Item 1A of Part I.", "More MD&A.", "Item 8. Financial Statements", "Numbers."]  # fmt: skip
    assert find_headings(lines) == {"7": 0, "8": 5}


def test_tables_become_rows_with_separated_cells():
    html = "<table><tr><td>Net sales</td><td>$</td><td>386,064</td><td>(12</td><td>)%</td></tr></table><p>After.</p>"
    assert to_lines(html) == ["Net sales | $386,064 | (12)%", "After."]
    assert to_lines(html, tables="drop") == ["After."]


def test_inline_xbrl_header_is_dropped(amzn):
    text = amzn["0001018724-22-000005"].items["1"].text
    assert "dei:AmendmentFlag" not in text and "iae13f" not in text


def test_page_furniture_is_removed(amzn):
    for item in amzn["0001018724-21-000004"].items.values():
        assert "\nTable of Contents\n" not in item.text


@pytest.mark.parametrize(
    ("name", "first_1", "first_7"),
    [
        ("AAPL_10-K_1996.txt.gz", "General\nApple Computer, Inc.", None),
        ("EBAY_10-K_2020.htm.gz", "Overview\neBay Inc. was formed", "FORWARD-LOOKING STATEMENTS"),
        ("META_10-K_2025.html.gz", "Overview\nOur mission is to build the future of human connection", "You should read"),
        ("CIGF5_10-K_2015.html.gz", "GENERAL\nCommonwealth Income & Growth Fund V", "The following is a discussion"),
        ("TGFIN_10-K_2009.txt.gz", "Form and Year of Organization", "The following discussion should be read"),
    ],
)
def test_other_eras_and_formats(name, first_1, first_7):
    doc = parse_filing(FILINGS / name)
    assert doc.items["1"].status == "ok" and doc.items["1"].text.startswith(first_1)
    if first_7:
        assert doc.items["7"].status == "ok" and doc.items["7"].text.startswith(first_7)


def test_cp1252_bytes_are_decoded_with_a_warning(tmp_path):
    path = tmp_path / "old.txt"
    body = "ITEM 1. BUSINESS\n\nThe Company\u2019s products.\n\nITEM 7. MANAGEMENT\u2019S DISCUSSION\n\nSales grew.\n"
    path.write_bytes(body.encode("cp1252"))
    doc = parse_filing(path)
    assert doc.items["1"].text == "The Company’s products."
    assert doc.items["7"].text == "Sales grew."
    assert any("cp1252" in w for w in doc.warnings)


def test_split_holds_out_mdna_and_dedupes_shared_paragraphs():
    filings = collect_local(BUNDLED_DIR, ["AMZN"], [2020, 2021])
    parsed = parse_all([primary_file(f) for f in filings], "rows", workers=1)
    train, val, report = build_split(filings, parsed, ParseConfig())
    assert {r["item"] for r in val} == {"7"} and len(val) == 2
    assert "7" not in {r["item"] for r in train}
    assert {r["fiscal_year"] for r in train} == {2020, 2021}
    assert all(r["ticker"] == "AMZN" and r["accession"] for r in train + val)
    held_out = {p for r in val for p in r["text"].split("\n")}
    assert not held_out & {p for r in train for p in r["text"].split("\n")}
    assert report["paragraphs_removed_from_train_as_in_val"] > 0
    # Part III stubs point to the proxy statement: they enter neither set
    assert "11" not in {r["item"] for r in train}


def test_sections_command_prints_json_per_file():
    files = [str(FILINGS / "TGFIN_10-K_2009.txt.gz"), str(FILINGS / "AAPL_10-K_1996.txt.gz")]
    out = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "sections", "--jsonl", *files],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout  # fmt: skip
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["path"] for d in docs] == files
    assert docs[0]["items"]["7"]["status"] == "ok" and docs[1]["items"]["1A"]["status"] == "not_found"
    assert set(docs[0]) == {"path", "form", "items", "warnings"}
