"""Split a 10-K into its Items.

A 10-K arrives as inline-XBRL HTML, plain HTML, a complete-submission SGML `.txt` holding several documents,
or 1990s plain text, in UTF-8 or cp1252. Every format is first flattened into text lines (one paragraph or
one table row per line); the Item headings are then found among the lines that *start* with "Item N", so an
in-text "see Item 8" never splits an Item. The table of contents lists every heading once more before the
body; of all ordered chains of headings we keep the longest, and of those the latest, which is the body's.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import warnings as _warnings

from bs4 import BeautifulSoup, Comment, Doctype, NavigableString, ProcessingInstruction, Tag, XMLParsedAsHTMLWarning

from tasks.io import read_bytes

# Inline XBRL is XHTML; the lxml HTML parser reads it fine and much faster than an XML parser with namespaces.
_warnings.filterwarnings("ignore", category=XMLParsedAsHTMLWarning)

ITEM_ORDER = [
    "1", "1A", "1B", "1C", "2", "3", "4", "5", "6", "7", "7A", "8",
    "9", "9A", "9B", "9C", "10", "11", "12", "13", "14", "15", "16",
]  # fmt: skip
_RANK = {key: i for i, key in enumerate(ITEM_ORDER)}
# The first fiscal year (the year its period ends) whose 10-Ks can have the Item, by the SEC's rules: 1A and 1B for
# fiscal years ending from December 2005, 1C from December 2023, 7A from June 1997, 9A from August 2003, 9B from
# August 2004, 9C in the 10-Ks filed from January 2022, 15 from 2003 (Part IV's exhibits were Item 14 before), 16
# from June 2016. A filing of an earlier year without the Item's heading lacks it by the form of its day.
ITEM_SINCE = {"1A": 2005, "1B": 2005, "1C": 2023, "7A": 1997, "9A": 2003, "9B": 2004, "9C": 2021, "15": 2003,
              "16": 2016}  # fmt: skip
NO_HEADING = "no 'Item {}' heading found in the document body"
TableMode = Literal["rows", "drop"]

_BLOCK_TAGS = frozenset(
    "p div br tr li ul ol h1 h2 h3 h4 h5 h6 section article center pre blockquote hr title dd dt dl "
    "caption page".split()
)
_SKIP_TAGS = frozenset(["script", "style", "head", "ix:header", "xbrl", "noscript"])
_HTML_SNIFF = re.compile(r"<\s*(html|body|div|p|table|font|br)\b", re.I)
_DOCUMENT = re.compile(r"<DOCUMENT>(.*?)</DOCUMENT>", re.S | re.I)
_DOC_TYPE = re.compile(r"<TYPE>\s*([^\s<]+)", re.I)
_DOC_TEXT = re.compile(r"<TEXT>(.*?)(?:</TEXT>|$)", re.S | re.I)
_FORM_IN_TEXT = re.compile(r"\bFORM\s+(10-K(?:405|SB|T)?(?:/A)?)\b", re.I)
_HEADING = re.compile(
    r"^(?:part\s+[ivx]+\s*[,.:\-\u2013\u2014]?\s*)?items?\s*(\d{1,2}\s*[a-c]?)\b\s*(?![a-z])(.*)$", re.I
)
_CROSS_REF_TAIL = re.compile(r"^(?:of\b|in\b|and\b|to\b|,|\)|through\b|above\b|below\b|herein\b)", re.I)
_PAGE_FURNITURE = re.compile(
    r"^(?:table of contents|index|\(?(?:page\s+)?[-\u2013\u2014]?\s*(?:\d{1,3}|[ivxlc]{1,6})\s*[-\u2013\u2014]?\)?"
    r"|[a-z0-9.,&' ]{0,60}\|\s*\d{4} form 10-k\s*\|\s*\d{1,3}|\d{4}\s+form\s+10-k\s+\d{1,3})$",
    re.I,
)
_PAGE_NUMBER = re.compile(r"(\d{1,3})\s*[-\u2013\u2014)]?$")  # a page footer's printed number: "34", "- 34 -", "| 34"
_PAGE_STEP = 3  # printed page numbers that follow each other go up by 1 (a few more where a page is a picture)
# An index of Items that names pages, not headings in the body ("Item 1. | Business | 4-7, 9-10, 71-73", as GE's
# "Form 10-K Cross Reference Index" does; Citigroup's and Intel's are alike, as other parsers' notes say).
_PAGE_REFS = re.compile(r"\d{1,3}(?:\s*[-\u2013]\s*\d{1,3})?(?:\s*,\s*\d{1,3}(?:\s*[-\u2013]\s*\d{1,3})?)*")
_PAGE_CELL = re.compile(rf"(?:^|\|\s*|[^\W\d]\s+)({_PAGE_REFS.pattern})$")  # after a cell's bar, or a title's word
_PART_LINE = re.compile(r"^part\s+[ivx]+\b.{0,80}$", re.I)
_SIGNATURES = re.compile(r"^signatures?$", re.I)
_BY_REFERENCE = re.compile(
    r"incorporated\s+(?:herein\s+)?by\s+reference|is\s+(?:included|contained|set\s+forth)\s+in\s+(?:the\s+|our\s+)?"
    r"(?:\d{4}\s+)?(?:annual\s+report|proxy\s+statement)|exhibit\s+13",
    re.I,
)
# A sentence that points within the filing: "See Item 8 of Part II", "is set forth in Part II, Item 8", "is
# included in Item 1 of Part I", "set forth under Note 13".
_POINTS_HERE = re.compile(
    r"^\W{0,3}(?:see|refer\s+to)\b|\b(?:set\s+forth|included|contained|presented|described|discussed|found)\s+"
    r"(?:in|under)\s+(?:[\u201c\"]?note\s+\d|part\s+[ivx]+|item\s+\d)",
    re.I,
)
# What another document is: the proxy statement, the annual report to shareholders, a 10-Q, an exhibit.
_ANOTHER_DOCUMENT = re.compile(
    r"proxy\s+statement|information\s+statement|annual\s+report\s+to\s+(?:share|stock)holders|exhibit\s+\d|"
    r"quarterly\s+reports?|form\s+(?:10-q|8-k|s-\d)|registration\s+statement",
    re.I,
)
_SENTENCE_BREAK = re.compile(r"\n|(?<=[.!?])[\"\u201d\u2019)]?\s+(?=[A-Z(\u201c\"*])")
_STUB_CHARS = 1500  # an Item this short that points elsewhere is a stub, not content
_STUB_REST_CHARS = 200  # ... unless its sentences that point nowhere come to this much: then it is content
_OMITTED = re.compile(
    r"^(?:\(?not\s+applicable\)?|none|omitted|[\[(]?(?:removed\s+and\s+)?reserved[\])]?|not\s+required)\b"
    r"|\bnot\s+required\s+to\s+(?:provide|include|disclose)|\bis\s+not\s+applicable\b"
    r"|\bnot\s+required\s+for\s+smaller\s+reporting",
    re.I,
)
# An index row's last words that say its Item does not apply, after its title ("Unresolved Staff Comments Not
# applicable": a row whose cells `--tables drop` ran together).
_OMITTED_LAST = re.compile(
    r"(?:^|\s)(\(?not\s+applicable\)?|none|omitted|[\[(]?(?:removed\s+and\s+)?reserved[\])]?)\.?$", re.I
)
_OMITTED_CHARS = 300  # "Not applicable." or "As a smaller reporting company, we are not required to ..."
# Financial statements filed after Part IV (the "F-pages"), to which a short Item 8 points: where they begin (a
# heading line, not a contents line ending in its page) and where they end (the exhibit index or the signatures).
_STATEMENTS_START = re.compile(
    r"^(?:index\s+to\s+(?:consolidated\s+)?financial\s+statements(?:\s+and\s+(?:financial\s+statement\s+)?schedules?)?"
    r"|report\s+of\s+(?:[^,]{1,60},\s+)?independent\s+(?:registered\s+public\s+accounting\s+firm|auditors?|"
    r"accountants?)"
    r"|independent\s+auditors?[\u2019']?s?[\u2019']?\s+report)\W*$",
    re.I,
)
_STATEMENTS_END = re.compile(
    r"^(?:signatures?|(?:index\s+to\s+)?exhibits?(?:\s+index)?|power\s+of\s+attorney)\W*$", re.I
)
_STATEMENTS_MIN_CHARS = 5000  # less is a list of the statements, not the statements
_CONNECTOR_END = re.compile(r"(?:\b(?:and|of|the|for|on|in|to|or)|[,&\-])$", re.I)
# MD&A inside an annual report to shareholders (EX-13): its heading, and the headings that follow it there.
_MDNA_HEADING = re.compile(
    r"^(?:item\s*7\s*[.:\-\u2013\u2014]?\s*)?management[\u2019']?s\s+discussion\s+and\s+analysis\b", re.I
)
_MDNA_HEADING_TAIL = re.compile(r"^(?:of\s+)?(?:financial\s+condition\s+)?(?:and\s+)?results\s+of\s+operations\W*$", re.I)
_MDNA_END = re.compile(
    r"^(?:report\s+of\s+(?:independent|management)|independent\s+(?:auditors?|accountants?)[\u2019']?s?[\u2019']?\s+"
    r"report|consolidated\s+(?:balance\s+sheets?|statements?\s+of)|statements?\s+of\s+(?:consolidated\s+)?"
    r"(?:income|operations|earnings|financial\s+(?:position|condition)|cash\s+flows)|quantitative\s+and\s+"
    r"qualitative\s+disclosures?|selected\s+(?:consolidated\s+)?financial\s+data|management[\u2019']?s\s+report|"
    r"responsibility\s+for\s+financial)",
    re.I,
)


@dataclass
class Item:
    text: str
    status: Literal["ok", "incorporated_by_reference", "not_found"]
    reason: str | None = None

    def to_dict(self) -> dict:
        d = {"text": self.text, "status": self.status}
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class ParsedFiling:
    path: str
    form: str
    items: dict[str, Item]
    warnings: list[str] = field(default_factory=list)
    fiscal_year: int | None = None

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "form": self.form,
            "fiscal_year": self.fiscal_year,
            "items": {k: v.to_dict() for k, v in self.items.items()},
            "warnings": self.warnings,
        }


def decode(raw: bytes, warnings: list[str]) -> str:
    """Decode filing bytes: UTF-8 when valid, else cp1252 (what pre-2010 EDGAR filers mostly wrote)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        warnings.append(f"not valid UTF-8 (byte {err.start}); decoded as cp1252")
        return raw.decode("cp1252", errors="replace")


def select_documents(text: str) -> tuple[str, str | None, list[tuple[str, str]]]:
    """From a complete-submission SGML file, pick the 10-K body; return (body, form, [(type, body) exhibits])."""
    docs = []
    for match in _DOCUMENT.finditer(text):
        chunk = match.group(1)
        type_match = _DOC_TYPE.search(chunk)
        body_match = _DOC_TEXT.search(chunk)
        docs.append(((type_match.group(1).upper() if type_match else ""), body_match.group(1) if body_match else chunk))
    main = next(((t, b) for t, b in docs if t.startswith("10-K")), None)
    if main is None:
        return text, None, []
    return main[1], main[0], [(t, b) for t, b in docs if t.startswith("EX-13")]


def _cell_text(cell: Tag) -> str:
    parts: list[str] = []
    _walk(cell, parts, "rows")
    return " ".join(" ".join(parts).split())


_HEADING_ROW = re.compile(r"^\s*(part\s+[ivx]+|item\s+\d)", re.IGNORECASE)


def _render_table(table: Tag, out: list[str], tables: TableMode) -> None:
    # `drop` removes tabular data but keeps rows that are Part/Item headings: many filings (Amazon's among
    # them) lay their headings out as one-row tables, and dropping those would lose every Item boundary.
    for row in table.find_all("tr"):
        cells = [_cell_text(c) for c in row.find_all(["td", "th"], recursive=False)]
        merged: list[str] = []
        for cell in cells:
            if not cell:
                continue
            if merged and (cell in {")", "%", ")%", "%)"} or merged[-1] in {"$", "(", "$(", "($"}):
                merged[-1] = merged[-1] + cell  # "$" | "386,064" and "12" | "%" are one value
            else:
                merged.append(cell)
        if merged and (tables == "rows" or _HEADING_ROW.match(" ".join(merged))):
            out.append("\n" + (" | " if tables == "rows" else " ").join(merged) + "\n")


def _walk(node: Tag, out: list[str], tables: TableMode, pre: bool = False) -> None:
    for child in node.children:
        if isinstance(child, NavigableString):
            if not isinstance(child, (Comment, Doctype, ProcessingInstruction)):
                # In HTML a newline inside text is a space; only <pre> keeps its line breaks.
                out.append(str(child) if pre else str(child).replace("\n", " "))
            continue
        if not isinstance(child, Tag):
            continue
        name = child.name
        if name in _SKIP_TAGS:
            continue
        style = child.get("style")
        if style and "display:none" in style.replace(" ", "").lower():
            continue
        if name == "table":
            _render_table(child, out, tables)
            continue
        if name in _BLOCK_TAGS:
            out.append("\n")
            _walk(child, out, tables, pre or name == "pre")
            out.append("\n")
        else:
            _walk(child, out, tables, pre)


def _plain_paragraphs(body: str) -> list[str]:
    """Plain text: blank lines separate paragraphs and hard-wrapped lines are joined back, except that a line
    that looks like an Item heading always starts a paragraph (1990s filers often left no blank line after it)."""
    paragraphs: list[str] = []
    current: list[str] = []
    in_heading = False  # a wrapped heading goes on: "Item 7. Management's Discussion ... Condition" / "and Results"
    for line in body.replace("\r", "").split("\n"):
        stripped = line.strip()
        if in_heading and stripped and len(stripped) < 100 and (
            stripped[0].islower() or _CONNECTOR_END.search(paragraphs[-1])
        ):
            paragraphs[-1] = f"{paragraphs[-1]} {stripped}"
            continue
        in_heading = False
        if not stripped or _HEADING.match(stripped) or _PART_LINE.match(stripped):
            if current:
                paragraphs.append(" ".join(current))
            current = []
            if stripped:
                paragraphs.append(stripped)
                in_heading = True
            continue
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def to_lines(body: str, tables: TableMode = "rows", pages: list[int | None] | None = None) -> list[str]:
    """Flatten an HTML or plain-text document into non-empty, whitespace-normalized lines, without its page
    furniture. `pages`, a list, gets the printed page number of each line (that of the footer after it; None
    after the last one, or in a document that prints none)."""
    if _HTML_SNIFF.search(body[:200_000]):
        soup = BeautifulSoup(body, "lxml")
        parts: list[str] = []
        _walk(soup, parts, tables)
        raw_lines = "".join(parts).split("\n")
    else:
        raw_lines = _plain_paragraphs(body)
    lines: list[str] = []
    footers: list[tuple[int, int]] = []  # (lines kept before it, its page number)
    for line in raw_lines:
        line = " ".join(line.replace("\xa0", " ").split())
        if not line:
            continue
        if not _PAGE_FURNITURE.match(line):
            lines.append(line)
        elif pages is not None and (number := _PAGE_NUMBER.search(line)):
            footers.append((len(lines), int(number.group(1))))
    if pages is not None:
        pages[:] = [None] * len(lines)
        start = 0
        for end, number in _page_sequence(footers):
            pages[start:end] = [number] * (end - start)
            start = end
    return lines


def _page_sequence(footers: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Of the page numbers found (a number alone on a line may also be a contents page's or a table's), the
    longest run in which each goes up by 1 to `_PAGE_STEP` from the one before."""
    best: list[tuple[int, int]] = []  # (run length, previous footer) of the run that ends at each footer
    for i, (_, number) in enumerate(footers):
        best.append(max(((best[j][0] + 1, j) for j in range(max(0, i - 50), i)  # a footer follows one of the 50 before
                         if 0 < number - footers[j][1] <= _PAGE_STEP), default=(1, -1)))  # fmt: skip
    if not best:
        return []
    i, run = max(range(len(best)), key=lambda k: best[k][0]), []
    while i >= 0:
        run.append(footers[i])
        i = best[i][1]
    return run[::-1]


def find_headings(lines: list[str]) -> dict[str, int]:
    """Map Item key -> index of its body heading line (longest, then latest, ordered chain of headings)."""
    cands: list[tuple[int, int]] = []  # (line index, rank)
    for i, line in enumerate(lines):
        match = _HEADING.match(line[:300])
        if not match:
            continue
        key = match.group(1).replace(" ", "").upper()
        tail = match.group(2).lstrip(" .:-\u2013\u2014")
        if key in _RANK and not _CROSS_REF_TAIL.match(tail):
            cands.append((i, _RANK[key]))
    # dp[i] = (chain length, sum of line indices, previous candidate) of the best chain ending at candidate i.
    dp: list[tuple[int, int, int]] = []
    for i, (pos, rank) in enumerate(cands):
        best = (1, pos, -1)
        for j in range(i):
            if cands[j][1] < rank and cands[j][0] < pos:
                length, total, _ = dp[j]
                best = max(best, (length + 1, total + pos, j))
        dp.append(best)
    if not dp:
        return {}
    i = max(range(len(dp)), key=lambda k: dp[k][:2])
    chosen: dict[str, int] = {}
    while i >= 0:
        pos, rank = cands[i]
        chosen[ITEM_ORDER[rank]] = pos
        i = dp[i][2]
    return dict(sorted(chosen.items(), key=lambda kv: kv[1]))


def _item_body(lines: list[str], start: int, end: int) -> str:
    heading = _HEADING.match(lines[start])
    first = lines[start]
    body = lines[start + 1 : end]
    if heading and len(first) > 200:  # heading and text share one line (plain-text filings)
        body = [heading.group(2)] + body
    while body and _PART_LINE.match(body[-1]):
        body.pop()
    return _before_signatures(body)


def _before_signatures(lines: list[str]) -> str:
    k = next((k for k, line in enumerate(lines) if _SIGNATURES.match(line)), len(lines))
    return "\n".join(lines[:k]).strip()


def split_items(lines: list[str], warnings: list[str] | None = None,
                pages: list[int | None] | None = None) -> dict[str, Item]:  # fmt: skip
    """Cut lines into Items at their body headings and classify each; what was moved between Items is told in
    `warnings`. `pages` (the printed page of each line, `to_lines`) lets a filing without Item headings in its
    body be cut by the pages its index of Items names."""
    headings = find_headings(lines)
    order = list(headings.items())
    bodies: dict[str, str] = {}
    for n, (key, start) in enumerate(order):
        end = order[n + 1][1] if n + 1 < len(order) else len(lines)
        bodies[key] = _item_body(lines, start, end)
    told: list[str] = []
    if pages and (by_pages := _items_by_pages(lines, pages, order, bodies)):
        bodies, reasons, shown = by_pages
        told.append(f"no Item headings in its body: each Item is taken by the pages its index of Items names "
                    f"({shown}), page by page: a page two Items name is Item 7's, else the first's")
    elif reasons := _statements_after_part_iv(lines, order, bodies):
        told.append("Item 8 taken from the financial statements after Part IV, to which it points")
    if warnings is not None:
        warnings.extend(told)
    items: dict[str, Item] = {}
    for key, text in bodies.items():
        if not text and _OMITTED.search(tail := _heading_tail(lines[headings[key]])):  # "Item 6. [Reserved]"
            items[key] = Item(tail, "not_found", "the filing says this Item does not apply to it")
        elif not text:
            items[key] = Item("", "not_found", reasons.get(key, "heading found but no text under it"))
        elif why := _points_elsewhere(text):
            items[key] = Item(text, "incorporated_by_reference", why)
        elif len(text) < _OMITTED_CHARS and _OMITTED.search(text):
            items[key] = Item(text, "not_found", "the filing says this Item does not apply to it")
        else:
            items[key] = Item(text, "ok", reasons.get(key))
    for key in ITEM_ORDER:
        items.setdefault(key, Item("", "not_found", NO_HEADING.format(key)))
    return {k: items[k] for k in ITEM_ORDER}


def _points_elsewhere(text: str) -> str | None:
    """Why a short Item is a stub that points elsewhere (the proxy statement, another part of the filing), or None
    where it is content: a sentence that points does not make a stub of the sentences beside it that do not (Meta's
    Item 10 points to its proxy statement, then says where its code of conduct is posted; Apple's 1996 Item 5 says
    where its stock trades, then points to Item 8 for the prices)."""
    if len(text) >= _STUB_CHARS:
        return None
    sentences = [part for part in _SENTENCE_BREAK.split(text) if part.strip()]
    pointers = [part for part in sentences if _BY_REFERENCE.search(part) or _POINTS_HERE.search(part)]
    if not pointers or sum(len(part) for part in sentences) - sum(map(len, pointers)) >= _STUB_REST_CHARS:
        return None
    if any(_ANOTHER_DOCUMENT.search(part) for part in pointers):
        return "short Item that points to another document"
    return "short Item that points to another part of this filing"


def _items_by_pages(lines: list[str], pages: list[int | None], order: list[tuple[str, int]],
                    bodies: dict[str, str]) -> tuple[dict[str, str], dict[str, str], str] | None:  # fmt: skip
    """A filing laid out as its annual report, with an index of Items that names pages instead of Item headings in
    the body (GE's "Form 10-K Cross Reference Index": "Item 1. | Business | 4-7, 9-10, 71-73"): the longest chain
    of headings is that index, and every Item under it is empty. Then each Item is the lines printed on its pages:
    the pages listed, or, where every entry is one number (a contents page), from its page up to the page the next
    Item starts on. A page is one Item's, never two: Item 7's (held out) first, then the first listed of the others.
    Returns (bodies, reasons, a few of the Items' pages for the warning), or None for any other filing."""
    empty = [key for key, _ in order if len(bodies[key]) < 100]
    if len(order) < 5 or len(empty) < 0.8 * len(order):
        return None
    tails = {key: _heading_tail(lines[at]) for key, at in order}  # each row but its "Item N"
    refs = {key: match.group(1) for key, tail in tails.items()  # the last cell; with `--tables drop`, the last words
            if (match := _PAGE_CELL.search(tail))}  # fmt: skip
    if len(refs) < 0.5 * len(order):
        return None
    listed = any(re.search(r"[-\u2013,]", cell) for cell in refs.values())
    last_page = max((n for n in pages if n is not None), default=0)
    if not last_page:  # a document that prints no page numbers: its pages cannot be found
        return None
    starts = [(key, min(_page_set(refs[key]))) for key, _ in order if key in refs]
    spans: dict[str, set[int]] = {}
    for n, (key, first) in enumerate(starts):
        if listed:
            spans[key] = _page_set(refs[key])
        else:
            following = [page for _, page in starts[n + 1 :] if page > first]
            spans[key] = set(range(first, following[0] if following else last_page + 1))
    holder: dict[int, str] = {}
    for key in sorted(spans, key=lambda k: k != "7"):  # stable: Item 7, then the index's order
        for page in spans[key]:
            holder.setdefault(page, key)
    index = range(order[0][1], order[-1][1] + 1)  # the index's own rows are no Item's
    held: dict[str, list[str]] = {key: [] for key in spans}
    for i, (line, page) in enumerate(zip(lines, pages, strict=True)):
        if page in holder and i not in index:
            held[holder[page]].append(line)
    new, reasons = dict(bodies), {}
    for key, span in spans.items():
        new[key] = _before_signatures(held[key])
        shown = refs[key] if listed else f"{min(span)}-{max(span)}" if len(span) > 1 else str(min(span))
        others = sorted({holder[page] for page in span} - {key}, key=_RANK.__getitem__)
        reasons[key] = (f"taken from page(s) {shown}, as its index of Items names them" if new[key] else
                        f"its page(s) {shown} are Item {', '.join(others)}'s, listed before it (page by page)"
                        if others else f"no text is printed on its page(s) {shown}")
        if new[key] and others:
            reasons[key] += f" (less what Item {', '.join(others)} holds)"
    for key, tail in tails.items():
        cell = tail.rsplit("|", 1)[-1].strip()  # the last cell (with `--tables drop`, the row: its title is in it)
        if key in spans:
            continue
        if _OMITTED.search(cell):
            new[key] = cell  # "Item 1B. | Unresolved Staff Comments | Not applicable"
        elif "|" not in tail and (last := _OMITTED_LAST.search(cell)):
            new[key] = last.group(1)  # `--tables drop`: "Item 1B. Unresolved Staff Comments Not applicable"
    shown = ", ".join(f"Item {key} p. {refs[key]}" for key in list(spans)[:3]) + (", ..." if len(spans) > 3 else "")
    return new, reasons, shown


def _page_set(cell: str) -> set[int]:
    """The pages an index cell names: "4-7, 9-10, 71-73" -> {4, 5, 6, 7, 9, 10, 71, 72, 73}."""
    wanted: set[int] = set()
    for part in re.split(r"\s*,\s*", cell):
        ends = [int(n) for n in re.split(r"\s*[-\u2013]\s*", part)]
        wanted.update(range(ends[0], ends[-1] + 1))
    return wanted


def _heading_tail(line: str) -> str:
    """What a heading line says after "Item N" and its title's separator: "Item 6. | Reserved" -> "Reserved"."""
    match = _HEADING.match(line[:300])
    return match.group(2).strip(" |.:-\u2013\u2014") if match else ""


def _statements_after_part_iv(lines: list[str], order: list[tuple[str, int]], bodies: dict[str, str]) -> dict:
    """Where a short Item 8 points to financial statements filed after Part IV ("see page F-1", "listed in Item
    15"), make them Item 8's text: else they sit inside the last Item (eBay's Item 16, "None.", held 160,000
    characters of statements) or, after the signatures, in no Item at all. Changes `bodies` in place; returns the
    reason for each Item it filled. What lay between the statements and the signatures (an exhibit index) stays
    with the exhibits: Item 15, or the last Item of filings from before Item 15 and 16 existed."""
    if "8" not in bodies or not bodies["8"] or len(bodies["8"]) >= _STUB_CHARS or order[-1][0] == "8":
        return {}
    last, last_start = order[-1]
    best: tuple[int, int] | None = None
    for start in range(last_start + 1, len(lines)):
        if len(lines[start]) > 200 or not _STATEMENTS_START.match(lines[start]):
            continue
        end = next((j for j in range(start + 1, len(lines)) if _STATEMENTS_END.match(lines[j])), len(lines))
        if best is None or end - start > best[1] - best[0]:
            best = (start, end)
    if best is None or sum(len(line) for line in lines[best[0]:best[1]]) < _STATEMENTS_MIN_CHARS:
        return {}
    start, end = best
    bodies["8"] = "\n".join(lines[start:end])
    rest = _before_signatures(lines[end:])
    bodies[last] = _item_body(lines, last_start, start)
    exhibits = "15" if last == "16" and "15" in bodies else last
    bodies[exhibits] = "\n".join(filter(None, [bodies[exhibits], rest]))
    return {"8": "it points to the financial statements after Part IV; taken from there"}


def detect_form(text: str) -> str | None:
    match = re.search(r"CONFORMED SUBMISSION TYPE:\s*(\S+)", text[:20_000])
    if match:
        return match.group(1).upper()
    match = re.search(r'name="dei:DocumentType"[^>]*>\s*(?:<[^>]+>\s*)*([^<\s]+)', text[:400_000])
    if match:
        return match.group(1).upper()
    match = _FORM_IN_TEXT.search(re.sub(r"<[^>]+>|&nbsp;|&#160;", " ", text[:100_000]))
    return match.group(1).upper() if match else None


def unwrap_fixed_width(text: str, warnings: list[str]) -> str:
    """Undo a re-wrap at a fixed width that ignores words and tags ("Conso" / "lidated", "<p styl" / "e=").

    Some copies of EDGAR documents are cut into lines of exactly N characters; when most long lines have one
    length, the line breaks after lines of that length are artefacts and are removed.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    widths = Counter(len(line) for line in lines if len(line) >= 200)
    if not widths:
        return text
    width, count = widths.most_common(1)[0]
    if count < 0.5 * len(lines):
        return text
    warnings.append(f"lines were hard-wrapped at {width} characters; re-joined")
    return "".join(line if len(line) == width else line + "\n" for line in lines)


def mdna_from_exhibit(lines: list[str]) -> str:
    """The MD&A section of an annual report to shareholders (EX-13): from its heading to the next
    financial-statement heading; of several headings (a contents page lists it too), the longest section."""
    best = ""
    for i, line in enumerate(lines):
        if len(line) > 200 or not _MDNA_HEADING.match(line) or line[-1].isdigit():  # contents: ends in a page
            continue
        start = i + 1
        while start < len(lines) and _MDNA_HEADING_TAIL.match(lines[start]):
            start += 1
        end = next((j for j in range(start, len(lines)) if len(lines[j]) <= 200 and _MDNA_END.match(lines[j])),
                   len(lines))  # fmt: skip
        text = "\n".join(lines[start:end]).strip()
        if len(text) > len(best):
            best = text
    return best


def _mdna_from_ex13(items: dict[str, Item], exhibits: list[tuple[str, str]], tables: TableMode,
                    warnings: list[str]) -> None:  # fmt: skip
    """When Item 7 is incorporated by reference to the annual report (EX-13), take the MD&A from there."""
    for doc_type, body in exhibits:
        mdna = mdna_from_exhibit(to_lines(unwrap_fixed_width(body, warnings), tables))
        if len(mdna) >= _STUB_CHARS:
            items["7"] = Item(mdna, "ok", f"incorporated by reference; taken from the {doc_type} exhibit")
            warnings.append(f"Item 7 taken from {doc_type} (annual report to shareholders)")
            return
    warnings.append("Item 7 is incorporated by reference, but no EX-13 with an MD&A section is in the submission")


_PERIOD_OF_REPORT = re.compile(r"CONFORMED PERIOD OF REPORT:\s*(\d{4})\d{4}")
_COVER_YEAR = re.compile(r"\bfor\s+the\s+(?:fiscal\s+)?year\s+ended\s*:?\s*[a-z]+\.?\s+\d{1,2}\s*,?\s*(\d{4})\b", re.I)
_COVER_LINES = 200


def fiscal_year_in(text: str, lines: list[str]) -> int | None:
    """The fiscal year a 10-K reports (the year its period ends), as the document says it: its SEC header's
    CONFORMED PERIOD OF REPORT, else its cover's "For the fiscal year ended December 31, 2020" (or "For the year
    ended"); None where it says neither (a transition report's cover names a period instead)."""
    if match := _PERIOD_OF_REPORT.search(text[:20_000]):
        return int(match.group(1))
    if match := _COVER_YEAR.search(" ".join(lines[:_COVER_LINES])):
        return int(match.group(1))
    return None


def before_the_item(key: str, fiscal_year: int | None) -> str | None:
    """Why a filing of `fiscal_year` has no heading for Item `key` where the form of its day had no such Item, else
    None."""
    since = ITEM_SINCE.get(key)
    if since is None or fiscal_year is None or fiscal_year >= since:
        return None
    return f"no 'Item {key}' heading, and the form had none before FY{since}"


def parse_filing(path: Path, tables: TableMode = "rows", submission: Path | None = None,
                 fiscal_year: int | None = None) -> ParsedFiling:  # fmt: skip
    """Parse one filing file (plain or .gz) into Items.

    `submission` is the filing's complete-submission `.txt`, read only for its EX-13 when `path` is a primary
    document whose Item 7 is incorporated by reference. `fiscal_year` (EDGAR's, in a run) is the year an Item the
    form of that year lacked is judged by (`before_the_item`); without it, the year the document says it reports.
    """
    warnings: list[str] = []
    text = decode(read_bytes(path), warnings)
    form = detect_form(text)
    body, doc_form, exhibits = select_documents(text)
    form = doc_form or form
    if form is None:
        warnings.append("form type not found in the document; assumed 10-K")
        form = "10-K"
    pages: list[int | None] = []
    lines = to_lines(unwrap_fixed_width(body, warnings), tables, pages)
    items = split_items(lines, warnings, pages)
    if items["7"].status == "incorporated_by_reference":
        if not exhibits and submission is not None and Path(submission) != Path(path):
            exhibits = select_documents(decode(read_bytes(submission), []))[2]
        _mdna_from_ex13(items, exhibits, tables, warnings)
    year = fiscal_year or fiscal_year_in(text, lines)
    for key, item in items.items():
        if item.reason == NO_HEADING.format(key) and (why := before_the_item(key, year)):
            items[key] = Item("", "not_found", why)
    missing = [k for k in ("1", "7") if items[k].status == "not_found"]
    if missing:
        warnings.append(f"Items {', '.join(missing)} not found")
    return ParsedFiling(str(path), form, items, warnings, year)
