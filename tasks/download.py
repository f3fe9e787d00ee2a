"""Stage 1: get 10-K filings into the sec-edgar-downloader folder layout and record them in a manifest.

`bundled` and local folders are read in place; `edgar` downloads from SEC EDGAR. The URLs and the folder
layout are sec-edgar-downloader's own (`sec-edgar-filings/TICKER/10-K/ACCESSION/...`), read from its modules
at call time, so a test points the real code at a loopback server by patching only those base URLs. The HTTP
layer is ours because the library's has no timeout, no retry and writes files non-atomically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from sec_edgar_downloader import _constants as sed_constants
from sec_edgar_downloader import _orchestrator as sed_orchestrator
from sec_edgar_downloader import _sec_gateway as sed_gateway
from sec_edgar_downloader._types import DownloadMetadata

from edgar_tune.config import REPO_ROOT, DataConfig, DataNotFound
from tasks.io import (
    atomic_write_bytes, atomic_write_json, cache_dir, fiscal_years, held, holder_info, holdings, joined, open_bytes,
    remove_stale_temps, sha256_file,
)  # fmt: skip
from tasks.progress import Progress

log = logging.getLogger(__name__)

BUNDLED_DIR = REPO_ROOT / "data" / "sec-edgar-filings"
MANIFEST = "manifest.json"
TEN_K_FORMS = {"10-K": "10-K", "10-K405": "10-K"}  # 10-K405 is a 10-K with a box ticked (until 2002)
_IDENTITY = re.compile(r"^\S.*\s\S+@\S+\.\S+$")


SEC_URL_ENV = "EDGAR_TUNE_SEC_URL"


def edgar_urls() -> tuple[str, str, str]:
    """sec-edgar-downloader's (ticker map, submissions, filing) URL templates, read at call time.

    $EDGAR_TUNE_SEC_URL points all three at one mirror or proxy that serves EDGAR's paths (`/files/...`,
    `/submissions/...`, `/Archives/...`); unset, they are the library's own (www.sec.gov and data.sec.gov).
    """
    base = os.environ.get(SEC_URL_ENV, "").rstrip("/")
    if not base:
        return sed_gateway.URL_CIK_MAPPING, sed_orchestrator.URL_SUBMISSIONS, sed_orchestrator.URL_FILING
    return (f"{base}/files/company_tickers_exchange.json", f"{base}/submissions/{{submission}}",
            f"{base}/Archives/edgar/data/{{cik}}/{{acc_num_no_dash}}/{{document}}")  # fmt: skip


class EdgarError(RuntimeError):
    """EDGAR refused or failed a request in a way a retry will not fix."""


class NotFoundOnEdgar(EdgarError):
    """EDGAR answered 404."""



def resolve_identity(identity: str | None) -> str:
    """The SEC User-Agent, from the parameter or $EDGAR_IDENTITY; checked before any request is sent."""
    identity = (identity or os.environ.get("EDGAR_IDENTITY", "")).strip()
    if not identity:
        raise EdgarError(
            "SEC EDGAR requires every client to identify itself: set EDGAR_IDENTITY='Your Name you@example.com' "
            "(or `data.edgar_identity`) and run again. No request was sent."
        )
    if not _IDENTITY.match(identity):
        raise EdgarError(
            f"EDGAR_IDENTITY={identity!r} must be 'Name email@domain' (SEC fair-access policy); fix it and run "
            "again. No request was sent."
        )
    return identity


class RateLimiter:
    """At most `rate` acquisitions per second across all threads of this process.

    A slot is granted only to a thread that is running when it comes due, and the next one is due `1/rate` after
    that grant. Booking slots ahead instead lets a process pause (a garbage collection, a long C call) release every
    slot that fell due during the pause at once, and SEC sees a burst.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                if now >= self._next:
                    self._next = now + self.interval
                    return
                wait = self._next - now
            time.sleep(wait)


_LIMITER = RateLimiter(10.0)  # SEC fair access: 10 requests/s per user, all machines together

# Inside a Prefect run, every request also takes a slot of this global rate limit on the Prefect server, so runs
# on all workers together stay under SEC's 10 requests/s. Created on first use with 1 slot that frees at 10/s;
# lower it in the UI (Concurrency -> Global) when something else shares your SEC quota, and every run obeys.
EDGAR_RATE_LIMIT = "sec-edgar"
EDGAR_RATE_PER_SECOND = 10.0


def prefect_rate_limit() -> Callable[[], None] | None:
    """The Prefect-wide EDGAR rate limit when running in a flow or task run, else None (this process's only)."""
    from tasks.limits import ensure_limit, in_prefect_run

    if not in_prefect_run():
        return None
    from prefect.concurrency.sync import rate_limit

    ensure_limit(EDGAR_RATE_LIMIT, 1, slot_decay_per_second=EDGAR_RATE_PER_SECOND)
    return lambda: rate_limit(EDGAR_RATE_LIMIT, timeout_seconds=600, strict=True)


def _cause(err: Exception) -> str:
    """What went wrong under requests' wrapping: "Failed to resolve 'www.sec.gov' ([Errno -2] ...)" rather than
    urllib3's whole retry record around it."""
    inner = getattr(err.args[0], "reason", None) if err.args else None
    return str(inner or err)


@dataclass
class EdgarClient:
    """GET with a User-Agent, a timeout, the shared rate limit and retries on answers worth retrying."""

    identity: str
    timeout: float = 30.0
    max_retries: int = 5
    backoff: float = 1.0
    shared_limit: Callable[[], None] | None = None  # e.g. prefect_rate_limit(): taken before every request

    def __post_init__(self) -> None:
        self.session = requests.Session()
        self.session.headers.update({"User-Agent": self.identity, "Accept-Encoding": "gzip, deflate"})
        self.requests_sent = 0

    def get(self, url: str) -> bytes:
        for attempt in range(self.max_retries + 1):
            _LIMITER.acquire()
            if self.shared_limit is not None:
                self.shared_limit()
            self.requests_sent += 1
            try:
                resp = self.session.get(url, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                # ChunkedEncodingError: the body stopped short of its Content-Length (a cut connection)
                reason, wait = f"{type(err).__name__}: {_cause(err)}", self.backoff * 2**attempt
                advice = (f"This machine did not reach {urlsplit(url).netloc}: check its connection (a proxy is "
                          "read from HTTPS_PROXY), or train on filings on disk (`data.source`: bundled, or a folder "
                          "in sec-edgar-downloader's layout)")  # fmt: skip
            else:
                if resp.status_code == 200:
                    return resp.content
                if resp.status_code == 404:
                    raise NotFoundOnEdgar(f"EDGAR has no {url} (404)")
                throttled = resp.status_code == 429 or (
                    resp.status_code == 403 and "rate threshold" in resp.text.lower()
                )
                if not (throttled or resp.status_code >= 500):
                    raise EdgarError(
                        f"EDGAR answered {resp.status_code} for {url}: check EDGAR_IDENTITY is "
                        "'Name email@domain' and the ticker/CIK exist"
                    )
                reason = f"HTTP {resp.status_code}"
                wait = _retry_after(resp) or self.backoff * 2**attempt
                advice = ("SEC is throttling this machine (its fair-access limit): wait 10 minutes and run again"
                          if throttled else "EDGAR's servers are failing: run again later")  # fmt: skip
            if attempt == self.max_retries:
                raise EdgarError(f"EDGAR request failed after {self.max_retries + 1} tries ({reason}) for {url}. "
                                 f"{advice}; files already downloaded are kept.")  # fmt: skip
            log.warning("EDGAR %s for %s; retrying in %.1fs", reason, url, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def get_json(self, url: str) -> dict:
        return json.loads(self.get(url))


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return min(float(value), 600.0) if value else None
    except ValueError:
        return None


def _read_manifest(folder: Path) -> list[dict]:
    path = folder / MANIFEST
    return json.loads(path.read_text())["filings"] if path.exists() else []


def _select(filings: Iterable[dict], tickers: list[str], years: list[int], latest: int | None = None) -> list[dict]:
    """The filings of `tickers` for `years`; with `latest`, each ticker's `latest` most recent fiscal years."""
    mine = [f for f in filings if any(_is_company(f, t) for t in tickers)]
    if latest is None:
        return [f for f in mine if f["fiscal_year"] in years]
    keep = set()
    for cik in {f["cik"] for f in mine}:
        own = {f["fiscal_year"] for f in mine if f["cik"] == cik}
        keep |= {(cik, y) for y in sorted(own, reverse=True)[:latest]}
    return [f for f in mine if (f["cik"], f["fiscal_year"]) in keep]


def latest_fiscal_years(rows: Iterable[dict], n: int) -> set[int]:
    """The `n` most recent fiscal years among 10-K rows that have an original (not amended) 10-K."""
    return set(sorted({fiscal_year_of(r) for r in rows if r["form"] in TEN_K_FORMS}, reverse=True)[:n])


def collect_local(folder: Path, tickers: list[str], years: list[int], latest: int | None = None) -> list[dict]:
    """Filings from a sec-edgar-downloader folder: one with edgar-tune's manifest (bundled data, earlier downloads),
    or one sec-edgar-downloader wrote itself (`scan_downloaded`), or both: a folder edgar-tune wrote that
    sec-edgar-downloader downloaded into later; `latest`: each ticker's `latest` most recent fiscal years in it,
    instead of `years`."""
    folder, held = local_filings(folder)
    chosen = _select(held, tickers, years, latest)
    for f in chosen:
        if "sha256" not in f:  # found by scan_downloaded (a manifest lists each file's): digested now
            f["sha256"] = {k: sha256_file(folder / p) for k, p in f["files"].items()}
        for rel in f["files"].values():
            if not (folder / rel).exists():
                raise DataNotFound(f"{folder / rel} is listed in {folder / MANIFEST} but missing")
    return sorted((dict(f, root=str(folder)) for f in chosen), key=lambda f: (f["ticker"], f["fiscal_year"]))


def local_filings(folder: Path) -> tuple[Path, list[dict]]:
    """A local source's filings folder (`sec-edgar-filings`, or the folder given) and every 10-K in it: listed in
    its manifest, then found as sec-edgar-downloader lays them out.

    Raises:
        DataNotFound: the folder is not there, or is a file that is no text source.
    """
    given = folder = Path(folder).expanduser()
    if folder.name != sed_constants.ROOT_SAVE_FOLDER_NAME and (folder / sed_constants.ROOT_SAVE_FOLDER_NAME).is_dir():
        folder = folder / sed_constants.ROOT_SAVE_FOLDER_NAME
    if not folder.is_dir():
        raise DataNotFound(f"`data.source` = {str(given)!r} does not exist" if not folder.exists() else
                           f"`data.source` = {str(given)!r} is a file but not TXT, CSV, JSON or JSONL; give "
                           "one of those, or a folder of 10-K filings")  # fmt: skip
    listed = _read_manifest(folder) if (folder / MANIFEST).exists() else None
    return folder, [*(listed or []), *scan_downloaded(folder, listed)]


SUBMISSION_FILES = (sed_constants.FILING_FULL_SUBMISSION_FILENAME, sed_constants.FILING_FULL_SUBMISSION_FILENAME
                    + ".gz")  # fmt: skip
# the primary document's name: sec-edgar-downloader 5's, then 4's (`filing-details.html`)
PRIMARY_STEMS = (sed_constants.PRIMARY_DOC_FILENAME_STEM, "filing-details")
_HEADER_KEYS = {"CONFORMED SUBMISSION TYPE": "form", "CONFORMED PERIOD OF REPORT": "period",
                "FILED AS OF DATE": "filed", "CENTRAL INDEX KEY": "cik"}  # fmt: skip


def scan_downloaded(root: Path, listed: list[dict] | None = None) -> list[dict]:
    """The 10-K filings in a folder sec-edgar-downloader wrote (`Downloader(...).get("10-K", "AMZN")`), which has
    no manifest: each `TICKER/FORM/ACCESSION/` with its `full-submission.txt`, whose SEC header says the form, the
    company's CIK, the period reported (its year is the fiscal year, as EDGAR's `reportDate` is for a download)
    and the filing date; `primary-document.*` (`download_details=True`; `filing-details.*` from
    sec-edgar-downloader 4) is the document parsed where there is one.
    Other forms (10-Q, 10-K/A) are left out and counted in a line of the log; an accession under two names (asked
    for by ticker and by CIK) is read once; of two 10-Ks a company filed for one fiscal year, the later (a
    re-filing, as the EDGAR download takes it); a complete submission cut off (sec-edgar-downloader writes in
    place, so a download stopped part-way leaves one, and no primary document after it) is left out with a warning.
    `listed`: the filings of the folder's manifest.json, where edgar-tune wrote it and sec-edgar-downloader
    downloaded into it later: only the accessions it does not list are read, and of them only fiscal years it has
    none of for their company.

    Raises:
        FileNotFoundError: the folder (without a manifest) holds no filing in that layout, saying what it looked for.
    """
    filings, others, cut = [], {}, []
    seen = {f["accession"] for f in listed or []}
    for company in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for sub in sorted(q for name in SUBMISSION_FILES for q in company.glob(f"*/*/{name}")):
            if (acc := sub.parent.name) in seen:
                continue
            seen.add(acc)
            head = _sec_header(sub)
            if (form := head.get("form", "?")) not in TEN_K_FORMS:
                others[form] = others.get(form, 0) + 1
                continue
            if not (head.get("period") or head.get("filed")):
                log.warning("%s: its SEC header names neither the period reported nor the filing date; left out",
                            sub)  # fmt: skip
                continue
            dates = {"filing_date": _day(head.get("filed")), "report_date": _day(head.get("period"))}
            found = accession_files(sub.parent)
            if "primary_document" not in found and head.get("envelope") and _cut_off(sub):  # the library writes it 2nd
                cut.append(sub)
                log.warning("%s is cut off (it opens an SGML envelope that it does not close): sec-edgar-downloader "
                            "writes files in place, and a download stopped part-way leaves one; left out. Delete "
                            "its folder and download it again", sub)  # fmt: skip
                continue
            files = {kind: str(path.relative_to(root)) for kind, path in found.items()}
            cik = company.name.zfill(sed_constants.CIK_LENGTH) if company.name.isdigit() else head.get("cik", "")
            filings.append({"ticker": company.name, "cik": cik, "form": TEN_K_FORMS[form], "filed_form": form,
                            "fiscal_year": fiscal_year_of({"reportDate": dates["report_date"],
                                                           "filingDate": dates["filing_date"]}),
                            "accession": acc, **dates, "files": files})  # fmt: skip
    filings = _one_a_year(filings, listed or [])
    if listed is not None:
        if filings:
            log.info("%s: %d 10-K filing(s) its %s does not list (downloaded into it later), of %s, read as "
                     "sec-edgar-downloader wrote them%s", root, len(filings), MANIFEST,
                     ", ".join(sorted({f["ticker"] for f in filings})),
                     f"; left out {_counted(others)}" if others else "")  # fmt: skip
        return filings
    if not filings and cut:
        named = ", ".join(map(str, cut))
        raise DataNotFound(f"`data.source` = {str(root)!r}: every 10-K in it is cut off ({named}): delete their "
                           "folders and download them again")  # fmt: skip
    if not filings:
        raise DataNotFound(
            f"`data.source` = {str(root)!r} holds no 10-K that edgar-tune can read: no {MANIFEST} (a folder "
            "`edgar-tune` wrote) and no `TICKER/10-K/ACCESSION/full-submission.txt` (as sec-edgar-downloader "
            f"writes){f', only other forms ({_counted(others)})' if others else ''}, and no TXT, CSV, JSON or JSONL "
            "files directly in it. Point `data.source` at the folder that holds `sec-edgar-filings`, or use "
            "`data.source=edgar` to download")  # fmt: skip
    log.info("%s has no %s: read as sec-edgar-downloader wrote it, %d 10-K filing(s) of %s, each dated by its "
             "full-submission.txt's SEC header%s", root, MANIFEST, len(filings),
             ", ".join(sorted({f["ticker"] for f in filings})),
             f"; left out {_counted(others)}" if others else "")  # fmt: skip
    return filings


def _one_a_year(scanned: list[dict], listed: list[dict]) -> list[dict]:
    """One 10-K a company and fiscal year among `scanned`: none where the manifest (`listed`) has that year for the
    company, else the latest filed, as `_download` keeps the first of EDGAR's newest-first rows (a second 10-K for a
    year is a re-filing). Each one left out is said in the log."""
    held = {(f["cik"], f["fiscal_year"]): f for f in listed}
    kept: dict[tuple[str, int], dict] = {}
    for f in sorted(scanned, key=lambda f: f["filing_date"] or "", reverse=True):
        key = (f["cik"] or f["ticker"], f["fiscal_year"])  # a header without a CIK: its folder's name
        if (other := held.get(key) or kept.get(key)) is None:
            kept[key] = f
            continue
        log.info("%s FY%d: %s (filed %s) left out; %s (filed %s) is read for that year%s", f["ticker"],
                 f["fiscal_year"], f["accession"], f["filing_date"], other["accession"], other["filing_date"],
                 f", as {MANIFEST} lists it" if key in held else ": the later 10-K of a fiscal year is its "
                 "re-filing")  # fmt: skip
    return [f for f in scanned if kept.get((f["cik"] or f["ticker"], f["fiscal_year"])) is f]


_BESIDE = (".etag", ".lock", ".tmp")  # what a copy fetched from S3 (`fetch_s3`), or a write under way, has beside it


def accession_files(folder: Path) -> dict[str, Path]:
    """The filing files in an accession folder of sec-edgar-downloader's layout: `full_submission` and
    `primary_document`, those of them that are there."""
    found = {"full_submission": next((folder / n for n in SUBMISSION_FILES if (folder / n).is_file()), None),
             "primary_document": next((p for stem in PRIMARY_STEMS for p in sorted(folder.glob(f"{stem}.*"))
                                       if p.suffix not in _BESIDE), None)}  # fmt: skip
    return {kind: path for kind, path in found.items() if path is not None}


def filing_documents(where: Path) -> list[tuple[Path, Path | None]]:
    """What to parse for each filing at `where`: a file as it is (no submission beside it); a folder in
    sec-edgar-downloader's layout, at any level (`sec-edgar-filings`, a company, a form, an accession), as each
    accession's (primary document or else complete submission, the complete submission where both are there: its
    exhibits hold what a 10-K incorporates by reference).

    Raises:
        FileNotFoundError: `where` is not there, or is a folder with no filing in that layout.
    """
    if where.is_file():
        return [(where, None)]
    if not where.is_dir():
        raise DataNotFound(f"{where} does not exist")
    filing = (*SUBMISSION_FILES, *(f"{stem}." for stem in PRIMARY_STEMS))  # one walk of the tree, not one a name
    folders = sorted({p.parent for p in where.rglob("*") if p.name.startswith(filing)})
    documents = []
    for folder in folders:
        files = accession_files(folder)
        primary = files.get("primary_document", files.get("full_submission"))
        documents.append((primary, files.get("full_submission") if "primary_document" in files else None))
    if not documents:
        raise DataNotFound(f"{where} holds no filing as sec-edgar-downloader lays them out "
                           "(`ACCESSION/full-submission.txt` or `ACCESSION/primary-document.html`)")  # fmt: skip
    return documents


def _cut_off(submission: Path) -> bool:
    """Whether a complete submission that opens with `<SEC-DOCUMENT>` (its header says so: `envelope`; a 1990s file
    whose tags were stripped cannot tell) lacks its closing tag at the end."""
    with open_bytes(submission) as f:
        tail = b""
        if submission.name.endswith(".gz"):  # a gzip stream is read to its end to know it
            while chunk := f.read(1 << 20):
                tail = (tail + chunk)[-512:]
        else:
            f.seek(max(0, submission.stat().st_size - 512))
            tail = f.read()
    return b"</SEC-DOCUMENT>" not in tail


def _counted(forms: dict[str, int]) -> str:
    return ", ".join(f"{n} {form}" for form, n in sorted(forms.items()))


def _day(header_date: str | None) -> str | None:
    """An SEC header's YYYYMMDD as EDGAR's JSON writes dates (YYYY-MM-DD)."""
    return f"{header_date[:4]}-{header_date[4:6]}-{header_date[6:8]}" if header_date else None


def _sec_header(path: Path) -> dict[str, str]:
    """The fields of a complete submission's SEC header (before its first document) named in `_HEADER_KEYS`, each
    as it first appears (the filer's CIK before any other party's), and `envelope` where it opens `<SEC-DOCUMENT>`
    (`_cut_off` can then tell a file cut short)."""
    with open_bytes(path) as f:  # a header is a few KB; a filing's documents, megabytes
        text = f.read(8192).decode("latin-1")
        if "</SEC-HEADER>" not in text and "<DOCUMENT>" not in text:  # many filers, or a 1990s one's stripped tags
            text += f.read((1 << 16) - 8192).decode("latin-1")
    head: dict[str, str] = {"envelope": "<SEC-DOCUMENT>"} if "<SEC-DOCUMENT>" in text[:4096] else {}
    for line in text.split("<DOCUMENT>", 1)[0].splitlines():
        key, _, value = line.strip().partition(":")
        if (field := _HEADER_KEYS.get(key.strip())) and field not in head and value.strip():
            head[field] = value.strip()
    return head


def _sec_tickers(client: EdgarClient) -> dict[str, str]:
    """SEC's ticker list (`company_tickers_exchange.json`): ticker -> CIK."""
    data = client.get_json(edgar_urls()[0])
    cik_i, ticker_i = data["fields"].index("cik"), data["fields"].index("ticker")
    return {str(row[ticker_i]).upper(): str(row[cik_i]).zfill(sed_constants.CIK_LENGTH) for row in data["data"]}


def _cik_of(ticker: str, mapping: dict[str, str]) -> str | None:
    """`ticker`'s CIK in SEC's ticker list (a share class as quote screens write it, BRK.B, as SEC's BRK-B)."""
    if ticker in mapping:
        return mapping[ticker]
    if (dashed := _dashed(ticker)) in mapping:
        log.info("ticker %s is %s in SEC's ticker list (CIK %s)", ticker, dashed, mapping[dashed])
        return mapping[dashed]
    return None


def _resolve_tickers(client: EdgarClient, tickers: list[str], on_disk: dict[str, str | None]) -> dict[str, str]:
    """The CIK of each of `tickers` (those the download asks EDGAR about), all looked up before any filing is
    fetched: SEC's ticker list is read once, and every ticker not in it is named in one error, not the first one
    after the filings of the tickers before it. A CIK is its own. A ticker no longer in the list (its company
    delisted, acquired or renamed) whose filings are on disk (`on_disk`) is the CIK they name, with a warning: a
    schedule over `data.latest_years` keeps following that company's filings.

    Raises:
        EdgarError: tickers that are not in the list, with the closest ones in it.
    """
    import difflib

    ciks: dict[str, str] = {}
    mapping = None
    unknown = []
    for ticker in tickers:
        if ticker.isdigit():
            ciks[ticker] = ticker.zfill(sed_constants.CIK_LENGTH)
            continue
        mapping = mapping if mapping is not None else _sec_tickers(client)
        if (cik := _cik_of(ticker, mapping)) is None and (cik := on_disk.get(ticker)) is not None:
            log.warning("ticker %s is no longer in SEC's ticker list (delisted, acquired or renamed); its filings on "
                        "disk are CIK %s's, whose are asked for", ticker, cik)  # fmt: skip
        if cik is None:
            near = difflib.get_close_matches(ticker, mapping, n=3, cutoff=0.75)
            unknown.append(f"{ticker!r}" + (f" (did you mean {joined(near, word='or')}?)" if near else ""))
            continue
        ciks[ticker] = cik
    if unknown:
        one = len(unknown) == 1
        raise EdgarError(f"ticker{'' if one else 's'} {joined(unknown)} {'is' if one else 'are'} not in SEC's ticker "
                         f"list; give {'its CIK' if one else 'their CIKs'} instead (data.tickers). Nothing was "
                         "downloaded")  # fmt: skip
    return ciks


def _submissions(client: EdgarClient, cik: str) -> Iterable[dict]:
    """Every filing row of a company, newest first: `filings.recent`, then the older pages in `filings.files`,
    each fetched only when the rows before it have been read."""
    submissions_url = edgar_urls()[1]
    url = submissions_url.format(submission=sed_constants.SUBMISSION_FILE_FORMAT.format(cik=cik))
    first = client.get_json(url)
    pages = [first["filings"]["recent"]]
    pages_left = [p["name"] for p in first["filings"].get("files", [])]
    while pages:
        page = pages.pop(0)
        keys = [k for k in ("accessionNumber", "form", "primaryDocument", "filingDate", "reportDate") if k in page]
        for values in zip(*(page[k] for k in keys), strict=True):
            yield dict(zip(keys, values, strict=True))
        if not pages and pages_left:
            pages.append(client.get_json(submissions_url.format(submission=pages_left.pop(0))))


# The annual reports of companies that file no 10-K: a foreign private issuer's, a Canadian one's (MJDS)
FOREIGN_ANNUAL = {"20-F": "a foreign private issuer's annual report", "40-F": "a Canadian issuer's annual report"}


def _ten_k_rows(client: EdgarClient, cik: str, latest: int | None) -> tuple[list[dict], set[str]]:
    """A company's 10-K rows (amendments too), newest first, and the `FOREIGN_ANNUAL` forms among the rows read.
    With `latest`, they stop at the first row older than its `latest` most recent fiscal years with a 10-K, so older
    pages of its filings are not fetched."""
    rows: list[dict] = []
    foreign: set[str] = set()
    for row in _submissions(client, cik):
        if row["form"] in FOREIGN_ANNUAL:
            foreign.add(row["form"])
        if not row["form"].startswith("10-K"):
            continue
        if latest is not None:
            years = latest_fiscal_years(rows, latest)
            if len(years) == latest and fiscal_year_of(row) < min(years):
                break
        rows.append(row)
    return rows, foreign


def fiscal_year_of(row: dict) -> int:
    """The fiscal year a 10-K reports: the year of its period end (reportDate), else the year before filing."""
    if row.get("reportDate"):
        return int(row["reportDate"][:4])
    return int(row["filingDate"][:4]) - 1


def download_edgar(cfg: DataConfig, dest: Path, client: EdgarClient | None = None) -> tuple[list[dict], list[dict]]:
    """Download the selected 10-Ks into `dest` (sec-edgar-downloader layout); return (filings, skipped).

    A rerun whose `fiscal_years` are all on disk sends no request at all. With `latest_years`, every run asks
    EDGAR which fiscal years are the latest (one request a company, more only for companies with pages of
    filings) and downloads only what it does not have.
    """
    client = client or EdgarClient(resolve_identity(cfg.edgar_identity), shared_limit=prefect_rate_limit())
    # Runs share the cache and its manifest: downloading into it at once, each would write back its own view of the
    # manifest (the last one dropping the other's companies) and could remove the other's half-written file as a
    # stale temp. They take turns; their requests share one 10/s limit anyway.
    with held(Path(dest) / ".download.lock", holder_info(tickers=cfg.tickers), wait=True):
        return _download(cfg, Path(dest) / sed_constants.ROOT_SAVE_FOLDER_NAME, client)


def _download(cfg: DataConfig, root: Path, client: EdgarClient) -> tuple[list[dict], list[dict]]:
    # A company is its CIK: asked for as `AMZN` and as `1018724`, its filings are downloaded once, into the folder
    # of the name it was first asked by.
    filings = [f for f in _read_manifest(root) if all((root / p).exists() for p in f["files"].values())]
    have = {(f["cik"], f["fiscal_year"]) for f in filings}
    skipped: list[dict] = []
    chosen: set[tuple[str, int]] = set()
    fetched, fetched_bytes, start = 0, 0, time.monotonic()
    bar = Progress("EDGAR download", len(cfg.tickers), "companies", logger=None)  # a bar in the UI; lines below
    on_disk = {t: _cik_on_disk(t, filings) for t in cfg.tickers}
    whole = {t for t, cik in on_disk.items()  # every year asked for is on disk: no request for it at all
             if cfg.latest_years is None and cik and all((cik, y) in have for y in cfg.fiscal_years)}  # fmt: skip
    ciks = _resolve_tickers(client, [t for t in cfg.tickers if t not in whole], on_disk)
    for i, ticker in enumerate(cfg.tickers, 1):
        bar.update(i - 1, f"{fetched} filing(s), {fetched_bytes / 1e6:.1f} MB downloaded")
        if ticker in whole:
            chosen |= {(on_disk[ticker], y) for y in cfg.fiscal_years}
            continue
        cik = ciks[ticker]
        name = next((f["ticker"] for f in filings if f["cik"] == cik), ticker)  # one folder a company
        rows, foreign = _ten_k_rows(client, cik, cfg.latest_years)
        years = set(cfg.fiscal_years) if cfg.latest_years is None else latest_fiscal_years(rows, cfg.latest_years)
        chosen |= {(cik, y) for y in years}
        found: set[int] = set()
        for row in rows:
            form, year = row["form"], fiscal_year_of(row)
            if year not in years:
                continue
            if form not in TEN_K_FORMS:  # 10-K/A and friends (never overwriting the original), 10-KSB, 10-KT
                skipped.append({"ticker": ticker, "fiscal_year": year, "form": form,
                                "accession": row["accessionNumber"], "reason": not_taken(form)})  # fmt: skip
                continue
            if year in found:  # rows are newest first; a second 10-K for a year is a re-filing
                continue
            if (cik, year) in have:
                found.add(year)
                continue
            try:
                filings.append(_fetch_filing(client, root, name, cik, row, year))
                have.add((cik, year))
                found.add(year)
                fetched += 1
                fetched_bytes += sum((root / p).stat().st_size for p in filings[-1]["files"].values())
                log.info("downloaded %s %s FY%s (%s): company %d of %d, %d filing(s) and %.1f MB in %.0f s so far",
                         ticker, form, year, row["accessionNumber"], i, len(cfg.tickers), fetched,
                         fetched_bytes / 1e6, time.monotonic() - start)  # fmt: skip
            except NotFoundOnEdgar as err:
                skipped.append({"ticker": ticker, "fiscal_year": year, "form": form,
                                "accession": row["accessionNumber"], "reason": str(err), "recheck": True})
            _write_manifest(root, filings)
        recorded = {s["fiscal_year"] for s in skipped if s["ticker"] == ticker and s["form"] in TEN_K_FORMS}
        held = {y for c, y in have if c == cik}
        for year in sorted(years - found - recorded - held):
            skipped.append({"ticker": ticker, "fiscal_year": year, "form": "10-K", "reason": "no 10-K on EDGAR",
                            "recheck": True})  # fmt: skip
        ten_ks = {fiscal_year_of(r) for r in rows if r["form"] in TEN_K_FORMS}
        files = [f"it files {form}s ({FOREIGN_ANNUAL[form]}), which edgar-tune does not read" for form in
                 sorted(foreign) if not ten_ks]  # fmt: skip
        left_out(ticker, [s for s in skipped if s["ticker"] == ticker and s["fiscal_year"] not in found | held],
                 "on EDGAR", ten_ks, *files)  # fmt: skip
        if cfg.latest_years and not ten_ks:  # no year to take: what it files instead, if it is one we know
            log.warning("%s: no 10-K on EDGAR, left out of the run%s (data.tickers)", ticker,
                        f"; {joined(files)}" if files else "")  # fmt: skip
        elif cfg.latest_years:
            _log_latest(ticker, years & held, cfg.latest_years)
    _write_manifest(root, filings)
    bar.update(len(cfg.tickers), f"{fetched} filing(s), {fetched_bytes / 1e6:.1f} MB downloaded")
    if fetched:
        log.info("EDGAR: %d filing(s), %.1f MB, in %.0f s (%d request(s) at most 10/s)", fetched, fetched_bytes / 1e6,
                 time.monotonic() - start, client.requests_sent)  # fmt: skip
    picked = sorted((f for f in filings if (f["cik"], f["fiscal_year"]) in chosen),
                    key=lambda f: (f["ticker"], f["fiscal_year"]))  # fmt: skip
    return [dict(f, root=str(root)) for f in picked], skipped


def not_taken(form: str) -> str:
    """Why a filing of the 10-K family on EDGAR (`10-K/A`, `10-KSB`, `10-KT`, ...) is not downloaded."""
    if form.endswith("/A"):
        return f"an amendment ({form}): only original 10-Ks are taken"
    if form.startswith("10-KSB"):  # Item 6 is the MD&A (Plan of Operation), Item 7 the financial statements
        return f"a {form}: the small-business annual report, whose Items are numbered otherwise, is not read as a 10-K"
    if form.startswith("10-KT"):
        return f"a {form}: a transition period's report, not a fiscal year's, is not taken"
    return f"a {form}, not a 10-K"


def left_out(ticker: str, skipped: list[dict], where: str, has: Iterable[int], *files: str) -> None:
    """Warn, in one line, of the fiscal years asked for that a company has no 10-K taken for `where` (`on EDGAR`,
    `in the bundled filings`), and why, and the years it has there (or what it `files` instead): the run goes on
    with the others (the download manifest lists them under `skipped`)."""
    why: dict[int, list[str]] = {}
    for s in skipped:
        reasons = why.setdefault(s["fiscal_year"], [])
        if s.get("accession") and s["reason"] not in reasons:  # a filing of that year that was not taken
            reasons.append(s["reason"])
    if why:
        said = [f"FY{y}" + (f" ({'; '.join(r)})" if r else "") for y, r in sorted(why.items())]
        instead = f": {joined(list(files))}" if files else ""
        has = (f"its 10-Ks {where} are for {fiscal_years(has)} (data.fiscal_years)" if has else
               f"it has no 10-K {where}{instead} (data.tickers)")  # fmt: skip
        log.warning("%s: no 10-K for %s %s, left out of the run; %s", ticker, joined(said, "or"), where, has)


def _cik_on_disk(ticker: str, filings: list[dict]) -> str | None:
    """The CIK of `ticker` without asking EDGAR: a CIK is its own; a ticker's is on its downloaded filings."""
    if ticker.isdigit():
        return ticker.zfill(sed_constants.CIK_LENGTH)
    return next((f["cik"] for f in filings if _is_company(f, ticker)), None)


def _fetch_filing(client: EdgarClient, root: Path, ticker: str, cik: str, row: dict, year: int) -> dict:
    acc = row["accessionNumber"]
    todo = sed_orchestrator.get_to_download(cik, acc, row.get("primaryDocument") or "")
    meta = DownloadMetadata(download_folder=root.parent, form="10-K", cik=cik, ticker=ticker)
    primary_name = f"{sed_constants.PRIMARY_DOC_FILENAME_STEM}{todo.details_doc_suffix}"
    filing_url = edgar_urls()[2]  # the library's URL_FILING, or the mirror's

    def url(document: str) -> str:
        return filing_url.format(cik=cik.lstrip("0"), acc_num_no_dash=acc.replace("-", ""), document=document)

    wanted = [("full_submission", url(f"{acc}.txt"), sed_constants.FILING_FULL_SUBMISSION_FILENAME)]
    if row.get("primaryDocument"):  # filings from before 2001 have none: the submission .txt is the document
        wanted.append(("primary_document", url(row["primaryDocument"].rsplit("/")[-1]), primary_name))
    files = {}
    for kind, url, name in wanted:
        path = sed_orchestrator.get_save_location(meta, acc, name)
        remove_stale_temps(path)  # left by a process killed while writing
        if not path.exists():
            atomic_write_bytes(path, client.get(url))
        files[kind] = str(path.relative_to(root))
    return {
        "ticker": ticker, "cik": cik, "form": TEN_K_FORMS[row["form"]], "filed_form": row["form"],
        "fiscal_year": year, "accession": acc, "filing_date": row.get("filingDate"),
        "report_date": row.get("reportDate"), "files": files,
        "sha256": {k: sha256_file(root / p) for k, p in files.items()},
    }  # fmt: skip


def _write_manifest(root: Path, filings: list[dict]) -> None:
    atomic_write_json(root / MANIFEST, {"filings": sorted(filings, key=lambda f: (f["ticker"], f["fiscal_year"]))})


def primary_file(filing: dict) -> Path:
    """The file the parser reads: the primary document when there is one, else the full submission."""
    files = filing["files"]
    return Path(filing["root"]) / files.get("primary_document", files.get("full_submission"))


def submission_file(filing: dict) -> Path | None:
    """The complete-submission `.txt` (with every exhibit) when the filing has one on disk."""
    rel = filing["files"].get("full_submission")
    path = Path(filing["root"]) / rel if rel else None
    return path if path is not None and path.exists() else None


def gather_filings(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Resolve `data.source` into the list of filings (and the ones skipped with a reason)."""
    if cfg.source == "edgar":  # reports each ticker's missing years itself
        dest = Path(cfg.download_dir) if cfg.download_dir else cache_dir() / "edgar"
        filings, skipped = download_edgar(cfg, dest)
    else:
        if cfg.source == "bundled":
            folder = BUNDLED_DIR
        elif cfg.source.startswith("s3://"):
            folder = fetch_s3_filings(cfg.source, cfg.tickers, cfg.fiscal_years, cfg.latest_years)
        else:
            folder = Path(cfg.source)
        filings, skipped = collect_local(folder, cfg.tickers, cfg.fiscal_years, cfg.latest_years), []
        where = "in the bundled filings" if cfg.source == "bundled" else f"in {cfg.source}"
        for t in cfg.tickers:
            years = sorted(f["fiscal_year"] for f in filings if _is_company(f, t))
            if cfg.latest_years and not years:  # it said "the latest 2 fiscal year(s) are FY none"
                log.warning("%s: no 10-K %s, left out of the run; it holds %s (data.tickers)", t, where,
                            holdings(local_filings(folder)[1]) or "no 10-K")  # fmt: skip
            elif cfg.latest_years:
                _log_latest(t, years, cfg.latest_years)
            else:
                missing = [{"ticker": t, "fiscal_year": y, "form": "10-K", "reason": f"not in {cfg.source}",
                            "recheck": True}  # the next run looks again: a 10-K downloaded into the folder since
                           for y in cfg.fiscal_years if y not in years]  # fmt: skip
                if missing:
                    left_out(t, missing, where, {f["fiscal_year"] for f in local_filings(folder)[1]
                                                 if _is_company(f, t)})  # fmt: skip
                skipped += missing
    if not filings:
        n = cfg.latest_years
        wanted = f"the latest {n} fiscal year(s)" if n else f"fiscal years {cfg.fiscal_years}"
        local = cfg.source != "edgar" and not cfg.source.startswith("s3://")  # the copy of s3 holds those asked
        held = f"; it holds {holdings(local_filings(folder)[1]) or 'no 10-K'}" if local else ""
        if cfg.source == "bundled":  # Amazon's two: the demo's. Other companies come from EDGAR.
            held += " (for other companies or years, set `data.source=edgar` and EDGAR_IDENTITY)"
        raise DataNotFound(
            f"no 10-K found for tickers {cfg.tickers} and {wanted} in `data.source` = {cfg.source!r}{held}; change "
            "`data.tickers`, `data.fiscal_years`/`data.latest_years` or the source"
        )
    return filings, skipped


def fetch_s3_filings(url: str, tickers: list[str], years: list[int], latest: int | None = None) -> Path:
    """The filings of `tickers` under an s3:// `.../sec-edgar-filings` prefix (edgar-tune's download cache, or a
    folder sec-edgar-downloader wrote, copied to a bucket that every worker of a pool reads), copied into this
    machine's cache in the same layout (`tasks.textdata.fetch_s3`: an object is fetched again only when its ETag
    changed), and the copy's folder, read then as a local one is (`collect_local`). With edgar-tune's
    manifest.json, the files of the filings it lists for those tickers (by ticker or CIK) and `years` (or
    `latest`); beside them (without one, alone), the accessions it does not list in the company folders named by
    the tickers, every year (a CIK whose company's folder is named by its ticker fetches every company's: only
    their SEC headers tell). What the copy holds that the bucket no longer does is removed from it, so a filing
    deleted there is not read here.

    Raises:
        FileNotFoundError: the prefix holds no object.
        ConfigError: credentials that cannot read it.
    """
    from tasks.storage import s3_fs
    from tasks.textdata import _s3_access, fetch_s3, s3_copy

    prefix = url.rstrip("/")
    fs = s3_fs()
    with _s3_access(url, "data.source"):
        keys = fs.find(prefix)  # bucket/key, each object under the prefix
    rels = sorted(k[len(prefix) - len("s3://") + 1:] for k in keys)
    if not rels:
        raise DataNotFound(f"`data.source` = {url!r} holds no object (or these credentials cannot list it)")
    _prune(s3_copy(prefix), set(rels))
    listed = json.loads(fetch_s3(f"{prefix}/{MANIFEST}").read_text())["filings"] if MANIFEST in rels else None
    wanted = {rel for f in _select(listed or [], tickers, years, latest) for rel in f["files"].values()}
    known = {f["accession"] for f in listed or []}
    loose = [rel for rel in rels if "/" in rel and (rel.count("/") < 2 or rel.split("/")[2] not in known)]
    companies = {rel.split("/", 1)[0] for rel in loose}
    folder_of = {f["cik"]: next(iter(f["files"].values())).split("/", 1)[0] for f in listed or []}
    named = set()
    for t in tickers:  # the company folders a ticker names; a CIK, also its folder in the manifest
        own = {c for c in companies if _is_company({"ticker": c, "cik": c if c.isdigit() else ""}, t)}
        mine = {folder_of[f["cik"]] for f in listed or [] if _is_company(f, t)}
        named |= own | (mine & companies) if own or mine or not t.isdigit() else companies
    if not named and listed is None:
        raise DataNotFound(f"`data.source` = {url!r} has no company folder named {', '.join(tickers)} "
                           f"(it has {', '.join(sorted(companies)[:20]) or 'none'}); change `data.tickers`")
    wanted |= {rel for rel in loose if rel.split("/", 1)[0] in named}
    log.info("%s: fetching %d object(s) of %s into this machine's cache (fetched again only when changed)", url,
             len(wanted), ", ".join(tickers))  # fmt: skip
    for rel in sorted(wanted):
        fetch_s3(f"{prefix}/{rel}")
    return s3_copy(prefix)


def _prune(copy: Path, rels: set[str]) -> None:
    """Remove from the local `copy` of an S3 prefix each file the prefix no longer holds (`rels`, relative to it),
    with its ETag stamp: a filing, or a manifest.json, deleted from the bucket is then not read from the copy."""
    if not copy.is_dir():
        return
    gone = [p for p in copy.rglob("*") if p.is_file() and p.suffix not in _BESIDE
            and str(p.relative_to(copy)) not in rels]  # fmt: skip
    for path in gone:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".etag").unlink(missing_ok=True)
    if gone:
        names = sorted(str(p.relative_to(copy)) for p in gone)
        log.info("%s: removed %d file(s) the bucket no longer holds (%s%s)", copy, len(gone), ", ".join(names[:5]),
                 ", ..." * (len(names) > 5))  # fmt: skip


def _is_company(filing: dict, ticker: str) -> bool:
    """Whether `ticker` (a ticker or a CIK, with or without leading zeros) names the company of `filing`; a share
    class written with a dot or a slash (BRK.B) is the dashed one (BRK-B)."""
    if ticker.isdigit():
        return ticker.lstrip("0") == filing["cik"].lstrip("0")
    return _dashed(ticker) == _dashed(filing["ticker"].upper())


def _dashed(ticker: str) -> str:
    """A ticker as SEC's list writes a share class: BRK.B, BRK/B and BRK B are BRK-B."""
    return re.sub(r"[./ ]", "-", ticker)


def _log_latest(ticker: str, years: Iterable[int], n: int) -> None:
    log.info("%s: the latest %d fiscal year(s) are FY%s (data.latest_years=%d; data.fiscal_years is not used)",
             ticker, n, ", FY".join(map(str, sorted(years))) or " none", n)  # fmt: skip
