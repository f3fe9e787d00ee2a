"""Stage 2 on real filings: Items, the MD&A hold-out and the `sections` command.

Expected first words and lengths were read off the documents themselves (tags stripped), not off the parser.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from edgar_tune.config import ParseConfig
from tasks.download import BUNDLED_DIR, collect_local, primary_file
from tasks.sections import find_headings, fiscal_year_in, parse_filing, split_items, to_lines, unwrap_fixed_width
from tasks.split import build_split, parse_all

REPO = Path(__file__).resolve().parent.parent
FILINGS = REPO / "data" / "edgar" / "filings"

AMZN_DIR = REPO / "data" / "sec-edgar-filings" / "AMZN" / "10-K"
AMZN_20, AMZN_21 = (AMZN_DIR / a / "primary-document.html.gz" for a in ("0001018724-21-000004", "0001018724-22-000005"))

# Every real filing the repo carries: (file, item, status, first words of the body, length band in characters).
# Read off the documents themselves: tags stripped, whitespace collapsed, each body heading located by hand; the
# band is about +-8% around the characters between that heading and the next Item's body heading.
EXPECTED = [
    (AMZN_20, "1", "ok", "This Annual Report on Form 10-K and the documents incorporated herein", (10_000, 14_000)),
    (AMZN_20, "1A", "ok", "Please carefully consider the following discussion of significant", (44_000, 56_000)),
    (AMZN_20, "7", "ok", "Forward-Looking Statements This Annual Report on Form 10-K includes", (46_000, 58_000)),
    (AMZN_21, "1", "ok", "This Annual Report on Form 10-K and the documents incorporated herein", (10_500, 14_500)),
    (AMZN_21, "1A", "ok", "Please carefully consider the following discussion of significant", (46_000, 58_000)),
    (AMZN_21, "7", "ok", "Forward-Looking Statements This Annual Report on Form 10-K includes", (44_000, 55_000)),
    (AMZN_21, "6", "not_found", "Reserved", (8, 8)),  # "Item 6. | Reserved": the heading says it, no text under it
    (FILINGS / "AAPL_10-K_1996.txt.gz", "1", "ok", 'General Apple Computer, Inc. ("Apple" or the "Company") was incorporated', (21_500, 25_500)),
    (FILINGS / "AAPL_10-K_1996.txt.gz", "1A", "not_found", "", (0, 0)),  # FY1996: Item 1A exists from FY2005
    (FILINGS / "AAPL_10-K_1996.txt.gz", "7", "ok", "The following discussion should be read in conjunction with the consolidated financial statements", (49_500, 58_500)),
    (FILINGS / "CIGF5_10-K_2015.html.gz", "1", "ok", "GENERAL Commonwealth Income & Growth Fund V (the “Partnership” or “CIGF5”) was formed", (31_500, 37_000)),
    (FILINGS / "CIGF5_10-K_2015.html.gz", "1A", "not_found", "NOT APPLICABLE", (14, 14)),
    (FILINGS / "CIGF5_10-K_2015.html.gz", "7", "ok", "The following is a discussion of our current financial position and results of operations.", (26_500, 31_500)),
    # CIGF5's statements come after the signatures, to the end of the document.
    (FILINGS / "CIGF5_10-K_2015.html.gz", "8", "ok", "Report of Independent Registered Public Accounting Firm The Partners Commonwealth", (54_000, 64_000)),
    (FILINGS / "EBAY_10-K_2020.htm.gz", "1", "ok", "Overview eBay Inc. was formed as a sole proprietorship in September 1995", (27_000, 32_000)),
    (FILINGS / "EBAY_10-K_2020.htm.gz", "1A", "ok", "Risk Factors Summary: The summary of risks below provides an overview", (78_000, 92_000)),
    (FILINGS / "EBAY_10-K_2020.htm.gz", "7", "ok", "FORWARD-LOOKING STATEMENTS This Annual Report on Form 10-K contains forward-looking", (64_000, 75_000)),
    # eBay's Item 8 points to the statements after Part IV; they follow Item 16 ("None."), up to the exhibit index.
    (FILINGS / "EBAY_10-K_2020.htm.gz", "8", "ok", "Report of Independent Registered Public Accounting Firm To the Board of Directors", (137_000, 161_000)),
    (FILINGS / "EBAY_10-K_2020.htm.gz", "16", "not_found", "None.", (5, 5)),
    (FILINGS / "META_10-K_2025.html.gz", "1", "ok", "Overview Our mission is to build the future of human connection", (37_000, 44_000)),
    (FILINGS / "META_10-K_2025.html.gz", "1A", "ok", "Certain factors may have a material adverse effect on our business", (174_000, 204_000)),
    (FILINGS / "META_10-K_2025.html.gz", "6", "not_found", "[Reserved]", (10, 10)),
    (FILINGS / "META_10-K_2025.html.gz", "7", "ok", "You should read the following discussion of our financial condition", (56_500, 66_500)),
    (FILINGS / "TGFIN_10-K_2009.txt.gz", "1", "ok", "Form and Year of Organization The Registrant consists of TGFIN Holdings", (3_900, 4_600)),
    (FILINGS / "TGFIN_10-K_2009.txt.gz", "1A", "not_found", "As a smaller reporting company, we are not required to provide risk factors.", (70, 80)),
    (FILINGS / "TGFIN_10-K_2009.txt.gz", "7", "ok", "The following discussion should be read in conjunction with the Consolidated Financial Statements", (5_500, 6_500)),
]  # fmt: skip


@pytest.fixture(scope="module")
def parsed() -> dict:
    return {path: parse_filing(path) for path in dict.fromkeys(row[0] for row in EXPECTED)}


@pytest.fixture(scope="module")
def amzn(parsed) -> dict:
    return {path.parent.name: parsed[path] for path in (AMZN_20, AMZN_21)}


@pytest.mark.parametrize(("path", "item", "status", "first", "band"), EXPECTED, ids=lambda v: getattr(v, "name", None))
def test_items_of_every_real_filing(parsed, path, item, status, first, band):
    got = parsed[path].items[item]
    assert got.status == status, got.reason
    assert " ".join(got.text.split()).startswith(first)
    assert band[0] <= len(got.text) <= band[1]


def test_an_item_whose_heading_says_it_does_not_apply():
    lines = ["Item 3. Legal Proceedings", "None.", "Item 4. (Removed and Reserved)", "Item 5. Market", "Text.",
             "Item 6. Selected Financial Data", "Item 7. MD&A", "Discussion."]  # fmt: skip
    items = split_items(lines)
    assert (items["3"].text, items["3"].status) == ("None.", "not_found")
    assert (items["4"].text, items["4"].status) == ("(Removed and Reserved)", "not_found")
    assert items["4"].reason == items["3"].reason == "the filing says this Item does not apply to it"
    assert (items["6"].text, items["6"].reason) == ("", "heading found but no text under it")  # a title, nothing else


def test_statements_after_part_iv_are_item_8_and_nothing_of_the_tail_is_lost(parsed):
    ebay, cigf5 = parsed[FILINGS / "EBAY_10-K_2020.htm.gz"], parsed[FILINGS / "CIGF5_10-K_2015.html.gz"]
    for doc in (ebay, cigf5):
        assert doc.items["8"].reason == "it points to the financial statements after Part IV; taken from there"
        assert "Item 8 taken from the financial statements after Part IV, to which it points" in doc.warnings
    # eBay's exhibit index (between the statements and the signatures) stays with the exhibits, Item 15.
    assert ebay.items["15"].text.startswith("(a) The following documents are filed as part of this report")
    assert "INDEX TO EXHIBITS\nNo. | Exhibit Description" in ebay.items["15"].text
    assert ebay.items["15"].text.endswith("+ Indicates a management contract or compensatory plan or arrangement.")
    assert "INDEX TO EXHIBITS" not in ebay.items["8"].text and "SIGNATURES" not in ebay.items["15"].text
    assert cigf5.items["8"].text.endswith("due to longer useful lives for tax reporting purposes.")
    assert cigf5.items["15"].text.startswith("(a) (1) | Financial Statements")  # its list of them, as before
    # A filing whose Item 8 holds its statements is left as it is (Amazon's, Meta's, Apple's, TGFIN's).
    assert all(not doc.items["8"].reason for path, doc in parsed.items() if doc not in (ebay, cigf5))


@pytest.mark.parametrize("path", list(dict.fromkeys(row[0] for row in EXPECTED)), ids=lambda p: p.name)
def test_dropping_tables_keeps_every_item_boundary(parsed, path):
    # Amazon lays its Item headings out as one-row tables: `drop` must keep those rows, or no Item is found.
    dropped, rows = parse_filing(path, "drop"), parsed[path]
    found = {k for k, v in rows.items.items() if v.status != "not_found"}
    assert {k for k, v in dropped.items.items() if v.status != "not_found"} == found
    for key in ("1", "1A", "7"):
        assert dropped.items[key].status == rows.items[key].status
        assert len(dropped.items[key].text) <= len(rows.items[key].text)
    assert dropped.items["7"].text[:60] == rows.items["7"].text[:60]


def test_amazon_part_iii_items_are_stubs_pointing_to_the_proxy(amzn):
    for doc in amzn.values():
        assert doc.items["11"].status == "incorporated_by_reference"
        assert doc.items["11"].reason == "short Item that points to another document"
        assert doc.form == "10-K" and doc.warnings == []


def test_a_sentence_that_points_elsewhere_does_not_make_a_stub_of_the_text_beside_it(parsed, amzn):
    # Each Item below was read in the filing: content beside a pointer (ok, so it trains), or a pointer alone.
    meta, aapl = parsed[FILINGS / "META_10-K_2025.html.gz"], parsed[FILINGS / "AAPL_10-K_1996.txt.gz"]
    ebay, amzn20 = parsed[FILINGS / "EBAY_10-K_2020.htm.gz"], amzn["0001018724-21-000004"]
    content = [
        (meta, "10", "Our board of directors has adopted a Code of Conduct"),  # after "incorporated by reference to
        (ebay, "10", "We have adopted a Code of Business Conduct and Ethics"),  # our Proxy Statement ..."
        (amzn20, "10", "we intend to disclose amendments to our Code of Business Conduct and Ethics"),
        (amzn20, "9B", "we processed and delivered orders of consumer products"),  # then points to two 10-Qs
        (aapl, "5", "on the Tokyo Stock Exchange under the symbol APPLE"),  # then points to Item 8 for the prices
    ]
    for doc, key, words in content:
        assert (doc.items[key].status, doc.items[key].reason) == ("ok", None), (doc.path, key)
        assert words in " ".join(doc.items[key].text.split())
    within = "short Item that points to another part of this filing"
    assert (amzn20.items["3"].status, amzn20.items["3"].reason) == ("incorporated_by_reference", within)  # "See Item 8"
    assert (ebay.items["3"].reason, aapl.items["3"].reason) == (within, within)  # "under Note 13", "in Part II"
    assert ebay.items["11"].reason == aapl.items["10"].reason == "short Item that points to another document"


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


def test_the_fiscal_year_is_the_documents_own_word_and_an_item_its_form_lacked_says_so(parsed):
    """Each real filing's year, as its SEC header (CONFORMED PERIOD OF REPORT) or else its cover ("For the fiscal
    year ended December 31, 2020"; "ended: December 31, 2009"; "December 31 , 2020") says it: `sections` judges by
    it the Items the form of that year had none of, as a run does by EDGAR's year (tests/test_datareport.py)."""
    years = {path.name.split("_")[0] if path.parent == FILINGS else path.parent.name: doc.fiscal_year
             for path, doc in parsed.items()}  # fmt: skip
    assert years == {"0001018724-21-000004": 2020, "0001018724-22-000005": 2021, "AAPL": 1996, "CIGF5": 2015,
                     "EBAY": 2020, "META": 2024, "TGFIN": 2009}  # fmt: skip
    for name, year in (("AAPL_10-K_1996.txt.gz", 1996), ("TGFIN_10-K_2009.txt.gz", 2009)):  # their covers alone
        lines = gzip.decompress((FILINGS / name).read_bytes()).decode("latin-1").splitlines()
        start = next(i for i, line in enumerate(lines) if "FORM 10-K" in line.upper())
        assert fiscal_year_in("", [line for line in lines[start:] if "PERIOD OF REPORT" not in line]) == year
    assert fiscal_year_in("", ["For the transition period from July 1, 2020 to December 31, 2020"]) is None
    cover = ["ANNUAL REPORT PURSUANT TO SECTION 13 OR 15(d)", "For the year ended June 30, 2004"]  # no "fiscal"
    assert fiscal_year_in("", cover) == 2004
    aapl = parsed[FILINGS / "AAPL_10-K_1996.txt.gz"].items
    assert aapl["1A"].reason == "no 'Item 1A' heading, and the form had none before FY2005"
    assert aapl["7A"].reason == "no 'Item 7A' heading, and the form had none before FY1997"
    # Given its year (EDGAR's, in a run), the parser judges by that one
    later = parse_filing(FILINGS / "AAPL_10-K_1996.txt.gz", fiscal_year=2010).items
    assert later["1A"].reason == "no 'Item 1A' heading found in the document body" and later["1C"].reason.endswith(
        "before FY2023")  # fmt: skip


def test_sections_command_prints_json_per_file():
    files = [str(FILINGS / "TGFIN_10-K_2009.txt.gz"), str(FILINGS / "AAPL_10-K_1996.txt.gz")]
    out = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "sections", "--jsonl", *files],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout  # fmt: skip
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["path"] for d in docs] == files
    assert docs[0]["items"]["7"]["status"] == "ok" and docs[1]["items"]["1A"]["status"] == "not_found"
    assert set(docs[0]) == {"path", "form", "fiscal_year", "items", "warnings"} and docs[1]["fiscal_year"] == 1996


def test_sections_command_takes_a_folder_in_sec_edgar_downloaders_layout(tmp_path):
    """A folder of filings (the bundled `sec-edgar-filings`, a company's, an accession's) is each accession's
    document; a path that is not there, a folder with no filing, or a file that is no filing's text (a PDF, an empty
    file) is refused before any is parsed (they were an IsADirectoryError's traceback, and "Items not found")."""
    bundled = REPO / "data" / "sec-edgar-filings"

    def sections(*paths) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgar_tune.cli", "sections", "--jsonl", *map(str, paths)],
                              capture_output=True, text=True, cwd=REPO)  # fmt: skip

    done = sections(bundled, bundled / "AMZN" / "10-K" / "0001018724-22-000005")
    assert done.returncode == 0, done.stderr[-2000:]
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    accessions = [Path(d["path"]).parent.name for d in docs]
    assert accessions == ["0001018724-21-000004", "0001018724-22-000005", "0001018724-22-000005"]
    assert all(d["items"]["7"]["status"] == "ok" for d in docs)
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj")  # parsed into "Items not found"
    (tmp_path / "empty.htm").write_text(" \n")
    (tmp_path / "utf16.txt").write_text("ITEM 7. MD&A", encoding="utf-16")
    for given, said in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "holds no filing as sec-edgar"),
                        (tmp_path / "report.pdf", "is a PDF; give a filing's HTML or text"),
                        (tmp_path / "empty.htm", "is empty"), (tmp_path / "utf16.txt", "is binary, not text")):
        refused = sections(bundled, given)
        assert refused.returncode == 2 and refused.stdout == "", refused.stdout[-300:]
        assert f"edgar-tune: error: {given} {said}" in refused.stderr, refused.stderr[-2000:]


def test_sections_piped_into_a_reader_that_stops_ends_quietly():
    """`edgar-tune sections FILE --json | head` ended in a BrokenPipeError traceback once head had its lines. Now it
    ends as `cat` does: no traceback, exit status 141 (128 + SIGPIPE). The output is larger than the pipe's buffer,
    so the reader's leaving is met mid-write."""
    proc = subprocess.Popen([sys.executable, "-m", "edgar_tune.cli", "sections", "--json",
                             str(FILINGS / "AAPL_10-K_1996.txt.gz")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO)  # fmt: skip
    assert proc.stdout.readline() == b"{\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err[-3000:]


def test_sections_table_says_why_an_item_was_not_taken():
    files = [str(FILINGS / "CIGF5_10-K_2015.html.gz"), str(FILINGS / "AAPL_10-K_1996.txt.gz")]
    out = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "sections", *files],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout  # fmt: skip
    lines = {(path, line.split()[1]): line for path, body in zip(files, out.split(files[1]), strict=True) for line in
             body.splitlines() if line.startswith("  Item ")}  # fmt: skip
    assert " NOT APPLICABLE " in lines[files[0], "1A"]
    assert lines[files[0], "1A"].endswith("[the filing says this Item does not apply to it]")
    assert lines[files[1], "1A"].endswith("[no 'Item 1A' heading, and the form had none before FY2005]")
    assert f"{files[1]}  form 10-K, FY1996\n" in out  # the year the document says, by which that is judged
    assert lines[files[1], "3"].endswith("[short Item that points to another part of this filing]")  # Part II, Item 8
    assert lines[files[1], "10"].endswith("[short Item that points to another document]")  # the proxy statement
    assert lines[files[0], "8"].endswith("[it points to the financial statements after Part IV; taken from there]")
    assert "[" not in lines[files[0], "1"] and "[" not in lines[files[1], "7"]  # an `ok` Item has no reason
    assert len({line.index("[") for line in lines.values() if "[" in line}) == 1  # the reasons in one column


def _aapl_with_mdna_in_ex13() -> tuple[str, str, int]:
    """Apple's real FY1996 10-K rearranged the way many 1990s filers filed: Item 7 says it is incorporated by
    reference to the annual report, and the MD&A text sits in an EX-13 document of the same submission.
    (None of the real filings here has an EX-13, so this one is assembled from real text; the envelope is
    EDGAR's.) Returns (10-K document, EX-13 document, the MD&A's length when parsed in place)."""
    raw = gzip.decompress((FILINGS / "AAPL_10-K_1996.txt.gz").read_bytes()).decode()
    i7 = raw.index("Item 7. Management's Discussion")
    body = raw.index("The following discussion should be read", i7)
    i8 = raw.index("Item 8. Financial Statements")
    stub = ("Item 7. Management's Discussion and Analysis of Financial Condition and Results of Operations\n\n"
            "The information required by this item is incorporated herein by reference to the section entitled\n"
            '"Management\'s Discussion and Analysis" of the Registrant\'s 1996 Annual Report to Shareholders,\n'
            "filed as Exhibit 13 to this report.\n\n")  # fmt: skip
    ten_k = raw[:i7] + stub + raw[i8:]
    ex13 = ("1996 ANNUAL REPORT TO SHAREHOLDERS\n\nCONTENTS\n\nManagement's Discussion and Analysis        12\n"
            "Consolidated Statements of Operations        30\n\n"
            "MANAGEMENT'S DISCUSSION AND ANALYSIS OF FINANCIAL CONDITION\nAND RESULTS OF OPERATIONS\n\n"
            + raw[body:i8] + "\nREPORT OF INDEPENDENT AUDITORS\n\nThe Board of Directors and Shareholders\n")  # fmt: skip
    return ten_k, ex13, len(parse_filing(FILINGS / "AAPL_10-K_1996.txt.gz").items["7"].text)


def _sgml(*docs: tuple[str, str]) -> str:
    parts = [f"<DOCUMENT>\n<TYPE>{t}\n<SEQUENCE>{i}\n<TEXT>\n{body}\n</TEXT>\n</DOCUMENT>\n" for i, (t, body) in enumerate(docs, 1)]
    return "<SEC-DOCUMENT>\n<SEC-HEADER>\nCONFORMED SUBMISSION TYPE:\t10-K\n</SEC-HEADER>\n" + "".join(parts) + "</SEC-DOCUMENT>\n"


def test_mdna_incorporated_by_reference_is_taken_from_ex13(tmp_path):
    ten_k, ex13, in_place = _aapl_with_mdna_in_ex13()
    alone = tmp_path / "primary-document.txt"
    alone.write_text(ten_k)
    doc = parse_filing(alone)
    assert doc.items["7"].status == "incorporated_by_reference"
    assert any("no EX-13" in w for w in doc.warnings)

    full = tmp_path / "full-submission.txt"
    full.write_text(_sgml(("10-K", ten_k), ("EX-13", ex13), ("EX-27", "financial data schedule")))
    for got in (parse_filing(full), parse_filing(alone, submission=full)):
        mdna = got.items["7"]
        assert mdna.status == "ok" and "EX-13" in mdna.reason
        assert mdna.text.startswith("The following discussion should be read in conjunction")
        assert abs(len(mdna.text) - in_place) < 0.02 * in_place  # the contents page's line is not taken
        assert "REPORT OF INDEPENDENT AUDITORS" not in mdna.text
        assert got.items["1"].text.startswith("General\nApple Computer")


def test_html_line_breaks_inside_text_are_spaces():
    html = "<html><body><p>Item 7.\nManagement's Discussion</p><pre>a\nb</pre></body></html>"
    assert to_lines(html) == ["Item 7. Management's Discussion", "a", "b"]


def test_fixed_width_rewrap_is_undone():
    line = "<p>" + "x" * 40 + "Conso"
    text = "\n".join([line.ljust(300, "y")[:300]] * 3 + ["lidated</p>"])
    warnings: list[str] = []
    assert "\n" not in unwrap_fixed_width(text, warnings).strip() and "300" in warnings[0]


def _ebay_without_item_headings() -> str:
    """eBay's real FY2020 10-K with the "ITEM 7:" of each body heading taken out (the titles stay), as filers that
    lay their 10-K out as their annual report write it: the only "Item N" lines left are an index of Items with
    pages, here eBay's own contents page ("Item 7. | Management's Discussion ... | 34"). The pages are eBay's
    printed ones (a number at the foot of each). Assembled from the real filing: none here is laid out so."""
    raw = gzip.decompress((FILINGS / "EBAY_10-K_2020.htm.gz").read_bytes()).decode()
    assembled, n = re.subn(r">(?:ITEM|Item) \d{1,2}[A-C]?:\s*<", "><", raw)
    assert n == 20  # every body heading, none of the contents page's rows
    return assembled


def _paragraphs(text: str) -> set[str]:
    return {p for p in text.split("\n") if len(p) > 40}


def test_a_10k_without_item_headings_is_cut_by_the_pages_its_index_names(parsed, tmp_path):
    path = tmp_path / "ebay.htm"
    path.write_text(_ebay_without_item_headings())
    doc, whole = parse_filing(path), parsed[FILINGS / "EBAY_10-K_2020.htm.gz"]
    assert any(w.startswith("no Item headings in its body: each Item is taken by the pages") for w in doc.warnings)
    # A contents page names where each Item starts: Item 7 is pages 34 to 52 (Item 7A starts on 53), and holds
    # every paragraph of the MD&A its headings mark, and less than 1% more.
    mdna = doc.items["7"]
    assert (mdna.status, mdna.reason) == ("ok", "taken from page(s) 34-52, as its index of Items names them")
    assert _paragraphs(whole.items["7"].text) <= _paragraphs(mdna.text)
    assert len(whole.items["7"].text) <= len(mdna.text) < 1.01 * len(whole.items["7"].text)
    assert _paragraphs(whole.items["1A"].text) <= _paragraphs(doc.items["1A"].text)  # pages 11-28
    # Items 1B to 4 all start on page 29: the page is the first's, and the others say so.
    assert doc.items["1B"].status == "ok" and doc.items["2"].status == "not_found"
    assert doc.items["2"].reason == "its page(s) 29 are Item 1B's, listed before it (page by page)"
    # No page is in two Items (no line is in them more often than in the document), and the index's rows in none.
    document = to_lines(path.read_text())
    taken = Counter(line for item in doc.items.values() if item.text for line in item.text.split("\n"))
    assert not taken - Counter(document)
    assert sum(len(line) * n for line, n in taken.items()) > 0.95 * sum(map(len, document))  # the cover, contents
    assert not any("Item 7. | Management" in item.text for item in doc.items.values())


def test_an_index_that_lists_page_ranges_takes_each_items_pages(tmp_path):
    # GE's "FORM 10-K CROSS REFERENCE INDEX" lists ranges and several of them ("4-7, 9-10, 71-73"), and "Not
    # applicable"; its rows are laid out as here (its real markup: cells of spans). The body is eBay's, as above.
    rows = [("1.", "Business", "4-10"), ("1A.", "Risk Factors", "11-28"), ("1B.", "Unresolved Staff Comments",
            "Not applicable"), ("2.", "Properties", "29"), ("3.", "Legal Proceedings", "29, 96-97"),
            ("5.", "Market for Registrant's Common Equity", "30-31"), ("7.", "Management's Discussion and Analysis "
            "of Financial Condition and Results of Operations", "34-52"), ("7A.", "Quantitative and Qualitative "
            "Disclosures About Market Risk", "53-55"), ("8.", "Financial Statements", "59-112")]  # fmt: skip
    index = "".join(f"<tr><td><span>Item {n}</span></td><td><span>{title}</span></td><td><span>{pages}</span></td></tr>"
                    for n, title, pages in rows)  # fmt: skip
    html = _ebay_without_item_headings()
    cut = html.rindex("<table", 0, html.index(">Page</span>"))  # eBay's contents table goes; GE's index comes last
    end = html.index("</table>", cut) + len("</table>")
    html = html[:cut] + html[end:].replace("</body>", "<div><span>FORM 10-K CROSS REFERENCE INDEX</span></div>"
                                            f"<table>{index}</table></body>")  # fmt: skip
    path = tmp_path / "ge_like.htm"
    path.write_text(html)
    doc = parse_filing(path)
    assert doc.items["7"].reason == "taken from page(s) 34-52, as its index of Items names them"
    assert doc.items["3"].reason == ("taken from page(s) 29, 96-97, as its index of Items names them (less what "
                                     "Item 2 holds)")  # page 29, named by Item 2 first
    assert (doc.items["1B"].text, doc.items["1B"].status) == ("Not applicable", "not_found")
    assert doc.items["8"].text.startswith("Report of Independent Registered Public Accounting Firm")
    assert doc.items["16"].reason == "no 'Item 16' heading found in the document body"  # not in the index
    # `--tables drop` keeps the index's rows, without the bars between cells: the pages are the row's last words
    dropped = parse_filing(path, "drop")
    assert dropped.items["7"].reason == doc.items["7"].reason
    assert dropped.items["3"].reason == doc.items["3"].reason
    # ... and its last words say Item 1B does not apply (it was "heading found but no text under it")
    assert (dropped.items["1B"].text, dropped.items["1B"].reason) == ("Not applicable", doc.items["1B"].reason)


def test_page_numbers_are_the_run_of_footers_not_a_contents_pages_numbers():
    # GE's footer, as its 10-K writes it at the foot of each page: one line "2025 FORM 10-K 77", which is furniture.
    footer = ('<div style="text-align:right"><span style="font-size:8pt">2025 FORM 10-K</span><span style="font-'
              'weight:700"> {}</span></div><hr style="page-break-after:always"/>')
    contents = "<p>Business</p><p>4</p><p>Risk Factors</p><p>11</p><p>Properties</p><p>29</p>"  # numbers alone
    html = "<html><body>" + contents + footer.format(2) + "".join(f"<p>text of page {n}</p>" + footer.format(n)
                                                                   for n in range(3, 8)) + "<p>after</p></body></html>"
    pages: list = []
    lines = to_lines(html, pages=pages)
    assert "2025 FORM 10-K 3" not in lines and "text of page 3" in lines
    assert dict(zip(lines, pages, strict=True)) == {"Business": 2, "Risk Factors": 2, "Properties": 2,
                                                    **{f"text of page {n}": n for n in range(3, 8)}, "after": None}
