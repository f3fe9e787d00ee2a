"""Tokenize's data report (`data_report.json` and `.md`): what each Item of each filing is, what it adds to either
set, and why where it adds nothing. Only the registration reads it, so its code is in tokenize's code version alone:
a reworded report trains nothing again."""

from __future__ import annotations

import json
from collections import Counter

from tasks.sections import ITEM_ORDER

# The form's titles now; where an Item number held something else before, that too (filings of every era come in).
ITEM_TITLES = {
    "1": "Business", "1A": "Risk Factors", "1B": "Unresolved Staff Comments", "1C": "Cybersecurity",
    "2": "Properties", "3": "Legal Proceedings",
    "4": "Mine Safety Disclosures; 2010-11, (Removed and Reserved); before 2010, Submission of Matters to a Vote of "
         "Security Holders",
    "5": "Market for Common Equity", "6": "[Reserved]; before 2021, Selected Financial Data",
    "7": "Management's Discussion and Analysis (MD&A)",
    "7A": "Market Risk Disclosures", "8": "Financial Statements and Supplementary Data",
    "9": "Changes in and Disagreements with Accountants", "9A": "Controls and Procedures", "9B": "Other Information",
    "9C": "Foreign Jurisdictions that Prevent Inspections", "10": "Directors, Executive Officers and Governance",
    "11": "Executive Compensation", "12": "Security Ownership", "13": "Relationships and Director Independence",
    "14": "Principal Accountant Fees and Services; before FY2003, Exhibits",
    "15": "Exhibits and Financial Statement Schedules",
    "16": "Form 10-K Summary",
}  # fmt: skip

_STATUSES = ("ok", "incorporated_by_reference", "not_found")
_REASONS_SHOWN = 3  # an Item's most common reasons for training nothing, in the table of Items


def data_report(parse_report: dict, rows: list[dict], token_lists: list[list[int]], packed: dict | None = None) -> dict:
    """The parse report with the tokens each Item of each filing contributes (after the train/val dedupe), under
    `items` the same summed per Item over the filings (`item_summary`), and under `packed` what training gets of
    them (tokenize's stats: blocks, their length, the tokens in them and those left over)."""
    tokens: dict[tuple[str, str], int] = {}
    for row, ids in zip(rows, token_lists, strict=True):
        tokens[(row["accession"], row["item"])] = len(ids) - 1  # without the EOS appended per document
    report = json.loads(json.dumps(parse_report))
    for filing in report["filings"]:
        for key, item in filing["items"].items():
            item["tokens"] = tokens.get((filing["accession"], key), 0)
        filing["train_tokens"] = sum(i["tokens"] for k, i in filing["items"].items() if k not in report["val_items"])
        filing["val_tokens"] = sum(i["tokens"] for k, i in filing["items"].items() if k in report["val_items"])
    report["items"] = item_summary(report)
    if packed:
        report["packed"] = packed
    return report


def item_summary(report: dict) -> list[dict]:
    """One row per Item over every filing: how many filings have it as text (`ok`), as a pointer elsewhere, or not
    at all; the characters and tokens it adds; its set; and its most common reasons for adding nothing."""
    rows = []
    keys = [k for k in ITEM_ORDER if any(k in f["items"] for f in report["filings"])]
    for key in keys:
        items = [f["items"][key] for f in report["filings"] if key in f["items"]]
        counts = Counter(i["status"] for i in items)
        used = [i for i in items if i["status"] == "ok"]
        reasons = Counter(i.get("reason") or i["status"] for i in items if i["status"] != "ok")
        rows.append({
            "item": key, "title": ITEM_TITLES[key], **{s: counts[s] for s in _STATUSES},
            "chars": sum(i["chars"] for i in used), "tokens": sum(i.get("tokens", 0) for i in used),
            "set": "val" if key in report["val_items"] else "train",
            "why_not": [{"reason": r, "filings": n} for r, n in reasons.most_common()],
        })  # fmt: skip
    return rows


def report_markdown(report: dict) -> str:
    """The report as Markdown: a line of totals, a table of Items over all filings (what one reads first, with
    hundreds of filings), a table of each filing's Items with why each that trains nothing does not, and the
    warnings."""
    filings = report["filings"]
    years = sorted(f["fiscal_year"] for f in filings)
    companies = len({f["ticker"] for f in filings})
    val = "/".join(report["val_items"])
    trained = sum(f["train_tokens"] for f in filings)
    held = sum(f["val_tokens"] for f in filings)
    out = [
        "# Data report", "",
        f"{len(filings)} filings of {companies} {'company' if companies == 1 else 'companies'}, FY{years[0]} to "
        f"FY{years[-1]}: {trained:,} tokens of training text, {held:,} of validation text (Item {val}). "
        f"{report['paragraphs_removed_from_train_as_in_val']:,} paragraphs left training because validation holds "
        f"them too.{_packed(report.get('packed'))}", "",
        "## Items", "",
        "| item | title | ok | by reference | not found | chars | tokens | set | why not, in how many filings |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]  # fmt: skip
    for row in report["items"]:
        why = row["why_not"][:_REASONS_SHOWN]
        more = len(row["why_not"]) - len(why)
        said = "; ".join(f"{w['reason']} ({w['filings']})" for w in why) + (f"; {more} more" if more else "")
        out.append(f"| {row['item']} | {row['title']} | {row['ok']} | {row['incorporated_by_reference']} | "
                   f"{row['not_found']} | {row['chars']:,} | {row['tokens']:,} | {row['set']} | {said} |")  # fmt: skip
    out += ["", "## Filings", "", "Items without a word of text are left out (the table of Items counts them).", "",
            "| ticker | FY | accession | item | status | chars | tokens | set | why |",
            "|---|---|---|---|---|---:|---:|---|---|"]  # fmt: skip
    for f in filings:
        for key, item in f["items"].items():
            if item["status"] == "not_found" and not item["chars"]:
                continue
            role = "val" if key in report["val_items"] else "train"
            role = role if item["status"] == "ok" else "-"
            out.append(f"| {f['ticker']} | {f['fiscal_year']} | {f['accession']} | {key} | {item['status']} "
                       f"| {item['chars']:,} | {item['tokens']:,} | {role} | {item.get('reason') or ''} |")  # fmt: skip
    warnings = [f"- {f['ticker']} FY{f['fiscal_year']}: {w}" for f in filings for w in f["warnings"]]
    return "\n".join(out + (["", "## Warnings", "", *warnings] if warnings else [])) + "\n"


def _packed(packed: dict | None) -> str:
    """The totals line's account of the blocks, which the run's summary counts ("train 93,696")."""
    if not packed:
        return ""
    return (f" Packed for training, with an end-of-text token after each document: {packed['tokens']:,} tokens in "
            f"{packed['blocks']:,} blocks of {packed['block_length']:,}, the last {packed['dropped']:,} left over.")
