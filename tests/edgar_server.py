"""A loopback HTTP server that plays SEC EDGAR with real filings, and can misbehave on request.

It serves EDGAR's three endpoints in their real shapes: the ticker list (a real 2023 copy), submissions JSON
(built from Tesla's real response, with each company's filings in the `filings.recent` arrays), and the Archives
documents: the real filings in data/ (Amazon, Apple 1996, eBay, Meta, TGFIN). Faults are queued per path: an HTTP status with headers and
body, a slow answer, a dropped connection, or a body cut off half way.
"""

from __future__ import annotations

import copy
import gzip
import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
API = REPO / "data" / "edgar" / "api"
BUNDLED = REPO / "data" / "sec-edgar-filings"

AMZN_CIK = "0001018724"
# Real rows of Amazon's EDGAR filing index: (accession, form, primary document, filed, period of report).
AMZN_ROWS = [
    ("0001018724-22-000019", "10-Q", "amzn-20220331.htm", "2022-04-29", "2022-03-31"),
    ("0001018724-22-000005", "10-K", "amzn-20211231.htm", "2022-02-04", "2021-12-31"),
    ("0001018724-21-000028", "8-K", "amzn-20210429.htm", "2021-04-29", "2021-04-29"),
    ("0001018724-21-000030", "10-K/A", "amzn-20201231x10ka.htm", "2021-04-30", "2020-12-31"),
    ("0001018724-21-000004", "10-K", "amzn-20201231.htm", "2021-02-03", "2020-12-31"),
    ("0001018724-20-000004", "10-K", "amzn-20191231x10k.htm", "2020-01-31", "2019-12-31"),
]
HAVE = {"0001018724-21-000004", "0001018724-22-000005"}  # the filings whose documents we carry
FILINGS = REPO / "data" / "edgar" / "filings"

# The other real filings the repo carries, each behind its company's submissions JSON:
# (CIK, company, tickers, accession, form, primary document, filed, period of report, file in data/edgar/filings).
# Pre-2001 filings have no primary document on EDGAR (an empty `primaryDocument`): only the `.txt` submission.
# CIGF5 is not served: its CIK is not recorded with the fixture.
OTHERS = [
    ("0000320193", "APPLE COMPUTER INC", ["AAPL"], "0000320193-96-000023", "10-K", "", "1996-12-19", "1996-09-27",
     "AAPL_10-K_1996.txt.gz"),
    ("0001065088", "EBAY INC", ["EBAY"], "0001065088-21-000006", "10-K", "ebay1231202010-k.htm", "2021-02-04",
     "2020-12-31", "EBAY_10-K_2020.htm.gz"),
    ("0001326801", "Meta Platforms, Inc.", ["META"], "0001326801-25-000017", "10-K", "meta-20241231.htm",
     "2025-01-30", "2024-12-31", "META_10-K_2025.html.gz"),
    ("0000876134", "TGFIN HOLDINGS INC", [], "0001010412-10-000078", "10-K", "tgfin10k123109040610finaldra.htm",
     "2010-04-06", "2009-12-31", "TGFIN_10-K_2009.txt.gz"),
]  # fmt: skip


def _gz_json(name: str) -> dict:
    return json.loads(gzip.decompress((API / f"{name}.gz").read_bytes()))


def submissions(cik: str, name: str, tickers: list[str], filing_rows: list[tuple]) -> dict:
    """Tesla's real submissions response with its identity and filings swapped for another company's."""
    doc = copy.deepcopy(_gz_json("CIK0001318605.json"))
    doc.update(cik=cik.lstrip("0"), name=name, tickers=tickers, exchanges=["Nasdaq"] * len(tickers))
    recent = doc["filings"]["recent"]
    template = {k: v[0] for k, v in recent.items()}
    rows = []
    for acc, form, primary, filed, period in filing_rows:
        row = dict(template, accessionNumber=acc, form=form, primaryDocument=primary, filingDate=filed,
                   reportDate=period, acceptanceDateTime=f"{filed}T12:00:00.000Z", primaryDocDescription=form)  # fmt: skip
        rows.append(row)
    doc["filings"]["recent"] = {k: [r[k] for r in rows] for k in template}
    doc["filings"]["files"] = []
    return doc


def amzn_submissions() -> dict:
    return submissions(AMZN_CIK, "AMAZON COM INC", ["AMZN"], AMZN_ROWS)


def ten_k_document(sgml: bytes) -> tuple[str, bytes]:
    """(file name, body) of the 10-K document inside a complete submission."""
    text = sgml.decode("latin-1")
    start = text.index("<TYPE>10-K")
    name = text[text.index("<FILENAME>", start) + 10 :].split("\n", 1)[0].strip()
    body = text[text.index("<TEXT>", start) + 6 : text.index("</TEXT>", start)]
    return name, body.strip("\n").encode("latin-1")


def full_submission(acc: str, primary: bytes, filename: str, filed: str, period: str) -> bytes:
    """A complete-submission envelope around the real primary document, as EDGAR's `{acc}.txt` is built."""
    head = (
        f"<SEC-DOCUMENT>{acc}.txt : {filed.replace('-', '')}\n<SEC-HEADER>{acc}.hdr.sgml : {filed.replace('-', '')}\n"
        f"ACCESSION NUMBER:\t\t{acc}\nCONFORMED SUBMISSION TYPE:\t10-K\nPUBLIC DOCUMENT COUNT:\t\t1\n"
        f"CONFORMED PERIOD OF REPORT:\t{period.replace('-', '')}\nFILED AS OF DATE:\t\t{filed.replace('-', '')}\n"
        f"COMPANY CONFORMED NAME:\t\t\tAMAZON COM INC\nCENTRAL INDEX KEY:\t\t\t{AMZN_CIK}\n</SEC-HEADER>\n"
        f"<DOCUMENT>\n<TYPE>10-K\n<SEQUENCE>1\n<FILENAME>{filename}\n<DESCRIPTION>10-K\n<TEXT>\n"
    ).encode()
    return head + primary + b"\n</TEXT>\n</DOCUMENT>\n</SEC-DOCUMENT>\n"


class FakeEdgar:
    """Routes, request log and fault queue of the loopback EDGAR."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.faults: dict[str, list[dict]] = defaultdict(list)
        self.requests: list[tuple[float, str, str]] = []  # (time, path, user agent)
        self.lock = threading.Lock()
        self.routes["/files/company_tickers_exchange.json"] = gzip.decompress(
            (API / "company_tickers_exchange.json.gz").read_bytes()
        )
        self.routes[f"/submissions/CIK{AMZN_CIK}.json"] = json.dumps(amzn_submissions()).encode()
        for acc, _form, primary, filed, period in AMZN_ROWS:
            if acc not in HAVE:
                continue
            doc = gzip.decompress((BUNDLED / "AMZN" / "10-K" / acc / "primary-document.html.gz").read_bytes())
            base = f"/Archives/edgar/data/{AMZN_CIK.lstrip('0')}/{acc.replace('-', '')}"
            self.routes[f"{base}/{primary}"] = doc
            self.routes[f"{base}/{acc}.txt"] = full_submission(acc, doc, primary, filed, period)
        for cik, name, tickers, acc, form, primary, filed, period, file in OTHERS:
            self.add_company(cik, name, tickers, [(acc, form, primary, filed, period)])
            raw = gzip.decompress((FILINGS / file).read_bytes())
            base = f"/Archives/edgar/data/{cik.lstrip('0')}/{acc.replace('-', '')}"
            if file.endswith(".txt.gz"):  # the file is the complete submission
                self.routes[f"{base}/{acc}.txt"] = raw
                if primary:
                    self.routes[f"{base}/{primary}"] = ten_k_document(raw)[1]
            else:
                self.routes[f"{base}/{primary}"] = raw
                self.routes[f"{base}/{acc}.txt"] = full_submission(acc, raw, primary, filed, period)

        self._initial_routes = dict(self.routes)

    def add_company(self, cik: str, name: str, tickers: list[str], rows: list[tuple]) -> None:
        self.routes[f"/submissions/CIK{cik}.json"] = json.dumps(submissions(cik, name, tickers, rows)).encode()

    def amzn_as_of(self, day: str, paged: bool = False) -> None:
        """Amazon's submissions as EDGAR served them on `day` (the rows filed before it). `paged`: the oldest row
        on a second page named in `filings.files`, as EDGAR pages a long history."""
        rows = [r for r in AMZN_ROWS if r[3] < day]
        doc = submissions(AMZN_CIK, "AMAZON COM INC", ["AMZN"], rows[:-1] if paged else rows)
        if paged:
            page = f"CIK{AMZN_CIK}-submissions-001.json"
            doc["filings"]["files"] = [{"name": page, "filingCount": 1, "filingFrom": rows[-1][3],
                                        "filingTo": rows[-1][3]}]  # fmt: skip
            older = submissions(AMZN_CIK, "AMAZON COM INC", ["AMZN"], rows[-1:])["filings"]["recent"]
            self.routes[f"/submissions/{page}"] = json.dumps(older).encode()
        self.routes[f"/submissions/CIK{AMZN_CIK}.json"] = json.dumps(doc).encode()

    def fail(self, path_part: str, *faults: dict) -> None:
        """Queue faults for the next requests whose path contains `path_part`."""
        with self.lock:
            self.faults[path_part].extend(faults)

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.requests.clear()
            self.routes = dict(self._initial_routes)

    def take_fault(self, path: str) -> dict | None:
        with self.lock:
            for part, queue in self.faults.items():
                if part in path and queue:
                    return queue.pop(0)
        return None


def _handler(edgar: FakeEdgar):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            with edgar.lock:
                edgar.requests.append((time.monotonic(), self.path, self.headers.get("User-Agent", "")))
            fault = edgar.take_fault(self.path)
            if fault and fault.get("drop"):
                self.close_connection = True
                self.connection.shutdown(2)  # the peer sees the connection drop with no answer
                return
            if fault and fault.get("sleep"):
                time.sleep(fault["sleep"])
            if fault and fault.get("status"):
                return self._send(fault["status"], fault.get("body", b"error"), fault.get("headers", {}))
            body = edgar.routes.get(self.path)
            if body is None:
                return self._send(404, b"Not Found", {})
            if fault and "truncate" in fault:  # promise the whole body, send a part, then hang or hang up
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(fault["truncate"])
                self.close_connection = True
                return
            self._send(200, body, {"Content-Type": "application/json" if self.path.endswith(".json") else "text/html"})

        def _send(self, status: int, body: bytes, headers: dict) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def start(edgar: FakeEdgar | None = None) -> tuple[ThreadingHTTPServer, FakeEdgar, str]:
    edgar = edgar or FakeEdgar()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(edgar))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, edgar, f"http://127.0.0.1:{server.server_address[1]}"
