"""Parse throughput: edgar-tune's 10-K parser against edgartools, same files, same run, same machine.

    make bench-parse                      # installs edgartools (bench only), then runs this
    python bench/parse.py --rounds 5 --workers 1 2

Both tools get every real filing the repo carries (the AMZN 10-Ks in data/sec-edgar-filings and all of
data/edgar/filings: inline XBRL, plain HTML, complete-submission SGML, 1990s plain text). Each worker reads the
gzipped file and decodes it; edgartools, which parses HTML, is handed the 10-K document already cut out of an
SGML submission (by our `select_documents`, inside its timing). Throughput is MB of filing text per wall
second over `--rounds` passes, on a warm process pool of each size in `--workers`; the ratio compares the
two tools at the same number of workers.

"Pins right" checks the Items pinned in tests/test_sections.py (1, 1A and 7 of every filing; 6 of Amazon FY2021
and Meta; 8 of eBay and CIGF5, and eBay's 16), which were read off the documents themselves: the status, the
first words of the body and the length band. For
edgartools the "Table of Contents" page header and the heading line that start its section texts are skipped
before comparing, so only the body counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cpu_host, write_result  # noqa: E402
from tasks.io import read_bytes  # noqa: E402
from tasks.sections import decode, parse_filing, select_documents  # noqa: E402
from tests.test_sections import EXPECTED  # noqa: E402  (the hand-read pins)

# Largest first, so a pool of workers is not left waiting on one big filing at the end of a pass.
FILES = sorted(dict.fromkeys(row[0] for row in EXPECTED), key=lambda p: -len(read_bytes(p)))
CHECKED = ("1", "1A", "7")


def run_ours(path: Path) -> dict[str, str]:
    doc = parse_filing(path)
    found = {k: v.text for k, v in doc.items.items() if v.text}  # every Item whose heading and text were found
    return found | {"__not_ok__": ",".join(k for k, v in doc.items.items() if v.text and v.status != "ok")}


def run_edgartools(path: Path) -> dict[str, str]:
    from edgar.documents import HTMLParser, ParserConfig

    text = decode(read_bytes(path), [])
    body = select_documents(text)[0]
    try:
        doc = HTMLParser(ParserConfig(form="10-K")).parse(body)
        sections = doc.sections if doc is not None else {}
    except Exception as err:  # edgartools raises on what it cannot read; that counts as nothing found
        return {"__error__": f"{type(err).__name__}: {err}"[:200]}
    found = {}
    for section in sections.values():
        item = (getattr(section, "item", None) or "").upper()
        if item:
            text = section.text() or ""
            lines = text.strip().split("\n")
            while lines and (not lines[0].strip() or re.match(r"(?i)table of contents$|item\s*\d", lines[0].strip())):
                lines.pop(0)  # its sections start with the page header and the heading: not counted against it
            found[item] = "\n".join(lines).strip()
    return found


TOOLS = {"edgar-tune": run_ours, "edgartools": run_edgartools}


def _job(args: tuple[str, str]) -> dict[str, str]:
    tool, path = args
    return TOOLS[tool](Path(path))


def _warm(tool: str) -> None:
    _job((tool, str(FILES[-1])))


def label(path: Path) -> str:
    return path.name if path.parent.parent.name != "10-K" else f"{path.parent.parent.parent.name}-{path.parent.name}"


def right(tool_items: dict[Path, dict[str, str]]) -> tuple[int, int, list[str]]:
    """(pins right, pins in all, what was wrong) against the hand-read pins."""
    wrong = []
    for path, item, status, first, band in EXPECTED:
        items = tool_items[path]
        text = None if item in items.get("__not_ok__", "").split(",") else items.get(item)
        if status != "ok":
            ok = text is None or len(text) < 300  # absent, or a one-line "not applicable"
        else:
            ok = text is not None and " ".join(text.split()).startswith(first) and band[0] <= len(text) <= band[1]
        if not ok:
            wrong.append(f"{label(path)} Item {item}")
    return len(EXPECTED) - len(wrong), len(EXPECTED), wrong


def measure(tool: str, workers: int, rounds: int) -> dict:
    jobs = [(tool, str(p)) for p in FILES]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_warm, [tool] * workers))  # imports and first-call costs stay out of the timing
        start = time.perf_counter()
        for _ in range(rounds):
            results = list(pool.map(_job, jobs))
        seconds = (time.perf_counter() - start) / rounds
    return {"seconds_per_pass": seconds, "results": dict(zip(FILES, results, strict=True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()

    megabytes = sum(len(read_bytes(p)) for p in FILES) / 1e6
    rows = []
    for workers in args.workers:
        for tool in TOOLS:
            m = measure(tool, workers, args.rounds)
            good, total, wrong = right(m["results"])
            found = sum(len([k for k in items if not k.startswith("__")]) for items in m["results"].values())
            errors = [f"{label(p)}: {items['__error__']}" for p, items in m["results"].items() if "__error__" in items]
            rows.append({"tool": tool, "workers": workers, "mb_per_s": megabytes / m["seconds_per_pass"],
                         "seconds_per_pass": m["seconds_per_pass"], "items_found": found,
                         "pins_right": good, "pins_total": total, "pins_wrong": wrong, "errors": errors})  # fmt: skip
    for row in rows:
        base = next(r for r in rows if r["tool"] == "edgartools" and r["workers"] == row["workers"])
        row["speedup_vs_edgartools"] = row["mb_per_s"] / base["mb_per_s"]

    print(f"\n{len(FILES)} real 10-Ks, {megabytes:.1f} MB of filing text, {args.rounds} passes each\n")
    print(f"{'tool':<11} {'workers':>7} {'MB/s':>7} {'x edgartools':>12} {'Items found':>11} {'pins right':>10}")
    for r in rows:
        print(f"{r['tool']:<11} {r['workers']:>7} {r['mb_per_s']:>7.2f} {r['speedup_vs_edgartools']:>12.1f} "
              f"{r['items_found']:>11} {r['pins_right']:>4}/{r['pins_total']}")  # fmt: skip
    for r in rows:
        if r["workers"] == args.workers[0] and (r["pins_wrong"] or r["errors"]):
            print(f"\n{r['tool']} wrong: {', '.join(r['pins_wrong']) or '-'}")
            for err in r["errors"]:
                print(f"  error: {err}")

    record = {
        "date": dt.date.today().isoformat(),
        "device": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "python": platform.python_version()},  # fmt: skip
        "versions": {p: version(p) for p in ("beautifulsoup4", "lxml", "edgartools")},
        "files": [str(p.relative_to(REPO)) for p in FILES],
        "megabytes": megabytes,
        "rounds": args.rounds,
        "rows": rows,
    }
    print()
    write_result(args.out, "parse", cpu_host(), record)


if __name__ == "__main__":
    main()
