"""Stage 1 against the loopback EDGAR: the real download code, with only the base URLs patched."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgar_tune.config import DataConfig, DataNotFound
from tasks.download import (
    BUNDLED_DIR,
    EdgarClient,
    EdgarError,
    RateLimiter,
    collect_local,
    download_edgar,
    gather_filings,
    primary_file,
)
from tasks.sections import parse_filing

REPO = Path(__file__).resolve().parent.parent
FILINGS = REPO / "data" / "edgar" / "filings"

IDENTITY = "Edgar Tune Tests tests@example.com"


def _client(**kw) -> EdgarClient:
    return EdgarClient(IDENTITY, timeout=kw.pop("timeout", 5), backoff=0.05, **kw)


def test_missing_identity_fails_before_any_request(edgar, tmp_path, monkeypatch):
    monkeypatch.delenv("EDGAR_IDENTITY", raising=False)
    cfg = DataConfig(source="edgar", download_dir=str(tmp_path))
    with pytest.raises(EdgarError, match="EDGAR_IDENTITY"):
        gather_filings(cfg)
    assert edgar.requests == []


def test_bad_identity_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGAR_IDENTITY", "just-a-name")
    with pytest.raises(EdgarError, match="Name email@domain"):
        gather_filings(DataConfig(source="edgar", download_dir=str(tmp_path)))


def test_a_run_without_an_identity_is_refused_before_prefect_starts(tmp_path):
    """`edgar-tune run --set data.source=edgar` without EDGAR_IDENTITY, or with one SEC does not take, stops at once
    with the download stage's own words, before a Prefect server starts (it used to, and fail 15 s in)."""
    env = {k: v for k, v in os.environ.items() if k not in ("EDGAR_IDENTITY", "PREFECT_API_URL")}
    for identity, said in ((None, "set EDGAR_IDENTITY='Your Name you@example.com'"),
                           ("just-a-name", "EDGAR_IDENTITY='just-a-name' must be 'Name email@domain'")):  # fmt: skip
        run = [sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out", str(tmp_path / "run"),
               "--set", "data.source=edgar"]  # fmt: skip
        proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120,
                              env=env | ({"EDGAR_IDENTITY": identity} if identity else {}))  # fmt: skip
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
        assert "prefect" not in proc.stderr.lower() and not (tmp_path / "run").exists()


def test_downloads_by_fiscal_year_into_downloader_layout(edgar, tmp_path):
    cfg = DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2020, 2021])
    filings, skipped = download_edgar(cfg, tmp_path, _client())
    assert [(f["fiscal_year"], f["accession"]) for f in filings] == [
        (2020, "0001018724-21-000004"),
        (2021, "0001018724-22-000005"),
    ]
    for f in filings:
        folder = tmp_path / "sec-edgar-filings" / "AMZN" / "10-K" / f["accession"]
        assert (folder / "full-submission.txt").exists() and (folder / "primary-document.html").exists()
        expected = gzip.decompress((BUNDLED_DIR / "AMZN" / "10-K" / f["accession"] / "primary-document.html.gz").read_bytes())
        assert f["sha256"]["primary_document"] == hashlib.sha256(expected).hexdigest()
        assert f["cik"] == "0001018724" and f["form"] == "10-K" and f["filing_date"] and f["report_date"]
    # the 10-K/A for FY2020 is recorded and skipped by policy, never overwriting the original
    assert any(s["form"] == "10-K/A" and "amendment" in s["reason"] for s in skipped)
    assert all(ua == IDENTITY for _, _, ua in edgar.requests)


def test_rerun_with_everything_present_sends_no_request(edgar, tmp_path):
    cfg = DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2021])
    download_edgar(cfg, tmp_path, _client())
    edgar.reset()
    filings, _ = download_edgar(cfg, tmp_path, _client())
    assert len(filings) == 1 and edgar.requests == []


def test_throttling_and_server_errors_are_retried_honouring_retry_after(edgar, tmp_path):
    edgar.fail("/submissions/", {"status": 429, "headers": {"Retry-After": "0.3"}})
    edgar.fail("000101872422000005/amzn", {"status": 403, "body": b"Request Rate Threshold Exceeded"},
               {"status": 503}, {"drop": True})  # fmt: skip
    cfg = DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2021])
    filings, _ = download_edgar(cfg, tmp_path, _client())
    assert len(filings) == 1
    subs = [t for t, p, _ in edgar.requests if p.startswith("/submissions/")]
    assert len(subs) == 2 and subs[1] - subs[0] >= 0.3


def test_tries_used_up_say_what_to_do_by_their_cause(edgar):
    """Every try failed: a host that cannot be reached says to check the connection or to train on filings on disk
    (before, whatever the cause, it said to wait out SEC's throttling, and quoted urllib3's whole retry record);
    throttling says to wait; failing servers, to come back later."""
    from tasks.download import edgar_urls
    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    with pytest.raises(EdgarError) as refused:
        _client(max_retries=1).get(f"http://127.0.0.1:{port}/files/company_tickers_exchange.json")
    said = str(refused.value)
    assert said.startswith("EDGAR request failed after 2 tries (ConnectionError: ") and "Max retries" not in said
    assert said.endswith(f"This machine did not reach 127.0.0.1:{port}: check its connection (a proxy is read from "
                         "HTTPS_PROXY), or train on filings on disk (`data.source`: bundled, or a folder in "
                         "sec-edgar-downloader's layout); files already downloaded are kept."), said  # fmt: skip
    url = edgar_urls()[1].format(submission="CIK0001018724.json")
    edgar.fail("/submissions/", {"status": 403, "body": b"Request Rate Threshold Exceeded"}, {"status": 429})
    with pytest.raises(EdgarError, match=r"\(HTTP 429\) for .*\. SEC is throttling this machine \(its fair-access "
                       r"limit\): wait 10 minutes and run again; files already downloaded are kept\.$"):  # fmt: skip
        _client(max_retries=1).get(url)
    edgar.fail("/submissions/", {"status": 503}, {"status": 502})
    with pytest.raises(EdgarError, match=r"\(HTTP 502\) for .*\. EDGAR's servers are failing: run again later; "):
        _client(max_retries=1).get(url)


def test_slow_answer_times_out_and_is_retried(edgar, tmp_path):
    edgar.fail("/submissions/", {"sleep": 1.5})
    cfg = DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2021])
    filings, _ = download_edgar(cfg, tmp_path, _client(timeout=0.5))
    assert len(filings) == 1


def test_missing_fiscal_year_and_404_are_recorded(edgar, tmp_path, caplog):
    # FY2019's documents are not on the loopback EDGAR: its 404 is recorded, and the run goes on, saying so (the
    # years asked for were only in the manifest: a run of five years could train on two without a word).
    cfg = DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2015, 2019, 2021])
    with caplog.at_level("WARNING", logger="tasks.download"):
        filings, skipped = download_edgar(cfg, tmp_path, _client())
    assert [f["fiscal_year"] for f in filings] == [2021]
    reasons = {s["fiscal_year"]: s["reason"] for s in skipped if s["form"] != "10-K/A"}
    assert "404" in reasons[2019] and reasons[2015] == "no 10-K on EDGAR"
    [line] = [r.getMessage() for r in caplog.records if "left out of the run" in r.getMessage()]
    assert line.startswith("AMZN: no 10-K for FY2015 or FY2019 (") and line.endswith(
        ") on EDGAR, left out of the run; its 10-Ks on EDGAR are for FY2019-FY2021 (data.fiscal_years)")


def test_a_10ksb_or_a_10kt_is_not_taken_and_the_run_says_why(edgar, tmp_path, caplog):
    """EDGAR's index lists a small business's 10-KSB (until 2009; MD&A is its Item 6, Item 7 its financial
    statements) and a transition period's 10-KT among the 10-K family: neither is read as a fiscal year's 10-K, and
    they were recorded as amendments. The rows before the real 10-K are invented; their documents are not asked."""
    from tests.edgar_server import OTHERS

    cik, name, _, acc, form, primary, filed, period, _ = OTHERS[3]  # TGFIN's FY2009 10-K
    edgar.add_company(cik, name, [], [
        (acc, form, primary, filed, period),
        ("0001010412-07-000001", "10-KT", "kt.htm", "2007-03-30", "2006-06-30"),
        ("0001010412-06-000002", "10-KSB/A", "ksba.htm", "2006-05-01", "2005-12-31"),
        ("0001010412-06-000001", "10-KSB", "ksb.htm", "2006-03-30", "2005-12-31"),
    ])  # fmt: skip
    cfg = DataConfig(source="edgar", tickers=[cik], fiscal_years=[2005, 2006, 2009])
    with caplog.at_level("WARNING", logger="tasks.download"):
        filings, skipped = download_edgar(cfg, tmp_path, _client())
    assert [f["fiscal_year"] for f in filings] == [2009]
    assert {s["form"]: s["reason"] for s in skipped if "accession" in s} == {
        "10-KT": "a 10-KT: a transition period's report, not a fiscal year's, is not taken",
        "10-KSB/A": "an amendment (10-KSB/A): only original 10-Ks are taken",
        "10-KSB": "a 10-KSB: the small-business annual report, whose Items are numbered otherwise, is not read as a "
                  "10-K"}  # fmt: skip
    assert not any(ksb in p for _, p, _ in edgar.requests for ksb in ("kt.htm", "ksb"))
    assert (f"{cik}: no 10-K for FY2005 (an amendment (10-KSB/A): only original 10-Ks are taken; a 10-KSB: the "
            "small-business annual report, whose Items are numbered otherwise, is not read as a 10-K) or FY2006 (a "
            "10-KT: a transition period's report, not a fiscal year's, is not taken) on EDGAR, left out of the "
            "run; its 10-Ks on EDGAR are for FY2009 (data.fiscal_years)") in caplog.text


def test_bundled_data_reads_through_the_same_layout():
    filings = collect_local(BUNDLED_DIR, ["AMZN"], [2020, 2021])
    assert [f["fiscal_year"] for f in filings] == [2020, 2021]
    assert all(f["files"]["primary_document"].startswith("AMZN/10-K/") for f in filings)


def test_a_local_source_without_the_filings_asked_says_what_it_holds():
    """The bundle holds Amazon's FY2020 and FY2021: asked for MSFT (or 2019), the refusal says so, and where other
    companies come from; it said only "change the tickers, the years or the source"."""
    for tickers, years in ((["MSFT"], [2020, 2021]), (["AMZN"], [2019])):
        with pytest.raises(DataNotFound) as err:
            gather_filings(DataConfig(source="bundled", tickers=tickers, fiscal_years=years))
        assert ("in `data.source` = 'bundled'; it holds AMZN FY2020, FY2021 (for other companies or years, set "
                "`data.source=edgar` and EDGAR_IDENTITY); change `data.tickers`") in str(err.value)


def test_a_company_that_files_20fs_is_said_to(edgar, tmp_path, caplog):
    """A foreign private issuer (Taiwan Semiconductor's CIK; the rows are invented) files 20-Fs, not 10-Ks: asked
    for, it was a year "not found" in the manifest; now the warning says what it files, and which key to change."""
    edgar.add_company("0001046179", "TAIWAN SEMICONDUCTOR MANUFACTURING CO LTD", ["TSM"], [
        ("0001046179-24-000010", "6-K", "tsm-6k.htm", "2024-05-10", "2024-05-10"),
        ("0001046179-24-000001", "20-F", "tsm-20f.htm", "2024-04-18", "2023-12-31"),
    ])  # fmt: skip
    cfg = DataConfig(source="edgar", tickers=["AMZN", "1046179"], fiscal_years=[2021, 2023])
    with caplog.at_level("WARNING", logger="tasks.download"):
        filings, _ = download_edgar(cfg, tmp_path, _client())
    assert [(f["ticker"], f["fiscal_year"]) for f in filings] == [("AMZN", 2021)]
    assert ("1046179: no 10-K for FY2021 or FY2023 on EDGAR, left out of the run; it has no 10-K on EDGAR: it files "
            "20-Fs (a foreign private issuer's annual report), which edgar-tune does not read (data.tickers)"
            ) in caplog.text  # fmt: skip
    caplog.clear()
    with caplog.at_level("INFO", logger="tasks.download"):  # its latest years: it said "FY none"
        download_edgar(DataConfig(source="edgar", tickers=["1046179"], latest_years=2), tmp_path, _client())
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("1046179")] == [
        "1046179: no 10-K on EDGAR, left out of the run; it files 20-Fs (a foreign private issuer's annual report), "
        "which edgar-tune does not read (data.tickers)"]  # fmt: skip


def test_a_year_a_local_source_lacks_is_said_and_the_run_goes_on(caplog):
    with caplog.at_level("WARNING", logger="tasks.download"):
        filings, skipped = gather_filings(DataConfig(source="bundled", tickers=["AMZN"], fiscal_years=[2019, 2020]))
    assert [f["fiscal_year"] for f in filings] == [2020] and [s["fiscal_year"] for s in skipped] == [2019]
    assert ("AMZN: no 10-K for FY2019 in the bundled filings, left out of the run; its 10-Ks in the "
            "bundled filings are for FY2020, FY2021 (data.fiscal_years)") in caplog.text
    with caplog.at_level("WARNING", logger="tasks.download"):  # it said "the latest 1 fiscal year(s) are FY none"
        gather_filings(DataConfig(source="bundled", tickers=["AMZN", "MSFT"], latest_years=1))
    assert ("MSFT: no 10-K in the bundled filings, left out of the run; it holds AMZN FY2020, FY2021 (data.tickers)"
            in caplog.text)  # fmt: skip


def test_downloaded_folder_works_as_a_local_source(edgar, tmp_path):
    download_edgar(DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2020]), tmp_path, _client())
    filings, _ = gather_filings(DataConfig(source=str(tmp_path), tickers=["AMZN"], fiscal_years=[2020]))
    assert filings[0]["accession"] == "0001018724-21-000004"


def test_a_folder_sec_edgar_downloader_wrote_is_read_without_a_manifest(edgar, tmp_path, caplog):
    """A user's own sec-edgar-downloader folder (the library itself, run against the loopback EDGAR) is a source as
    it is: each 10-K found by its full-submission.txt's SEC header (fiscal year, CIK, form), the primary document
    parsed where it was downloaded and the complete submission where not, and nothing written into the folder. A
    year not in it is recorded to be looked for again; a folder with no filings, or none at all, says what it
    looked for."""
    from sec_edgar_downloader import Downloader

    from tasks.download import submission_file

    mine = tmp_path / "mine"
    downloader = Downloader("Edgar Tune Tests", "tests@example.com", mine)
    assert downloader.get("10-K", "AMZN", download_details=True) == 2  # FY2019's documents are not served
    assert downloader.get("10-K", "AAPL") == 1  # 1996; no primary document (the library's default, too)
    assert downloader.get("10-K", "0000876134") == 1  # TGFIN, which has no ticker: its folder is its CIK
    written = sorted((p, p.stat().st_mtime_ns) for p in mine.rglob("*"))
    cfg = DataConfig(source=str(mine), tickers=["AMZN", "AAPL", "876134"],
                     fiscal_years=[1996, 2009, 2020, 2021, 2022])  # fmt: skip
    with caplog.at_level("INFO", logger="tasks.download"):
        filings, skipped = gather_filings(cfg)
    assert [(f["ticker"], f["cik"], f["fiscal_year"], f["report_date"], f["accession"]) for f in filings] == [
        ("0000876134", "0000876134", 2009, "2009-12-31", "0001010412-10-000078"),
        ("AAPL", "0000320193", 1996, "1996-09-27", "0000320193-96-000023"),
        ("AMZN", "0001018724", 2020, "2020-12-31", "0001018724-21-000004"),
        ("AMZN", "0001018724", 2021, "2021-12-31", "0001018724-22-000005")]  # fmt: skip
    both = {"full_submission", "primary_document"}
    assert [set(f["files"]) for f in filings] == [{"full_submission"}] * 2 + [both] * 2
    assert [(s["fiscal_year"], s["recheck"]) for s in skipped if s["ticker"] == "AMZN"] == [
        (1996, True), (2009, True), (2022, True)]  # a 10-K downloaded into the folder later is found by the next run
    assert any("read as sec-edgar-downloader wrote it, 4 10-K filing(s) of 0000876134, AAPL, AMZN" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    for f in filings:
        assert all(len(digest) == 64 for digest in f["sha256"].values())
        doc = parse_filing(primary_file(f), submission=submission_file(f))
        assert doc.items["7"].status == "ok" and len(doc.items["7"].text) > 5_000, (f["ticker"], doc.warnings)
    assert primary_file(filings[2]).name == "primary-document.html"
    assert sorted((p, p.stat().st_mtime_ns) for p in mine.rglob("*")) == written  # no manifest written there
    older = tmp_path / "v4" / "sec-edgar-filings"  # sec-edgar-downloader 4 named the primary document so
    shutil.copytree(mine / "sec-edgar-filings" / "AMZN", older / "AMZN")
    for doc in older.rglob("primary-document.html"):
        doc.rename(doc.with_name("filing-details.html"))
    v4, _ = gather_filings(DataConfig(source=str(older), tickers=["AMZN"], fiscal_years=[2021]))
    assert primary_file(v4[0]).name == "filing-details.html"
    cut = tmp_path / "cut" / "sec-edgar-filings"  # a download stopped part-way: sec-edgar-downloader writes in place
    shutil.copytree(mine / "sec-edgar-filings" / "0000876134", cut / "0000876134")
    half = next(cut.rglob("full-submission.txt"))
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    with pytest.raises(FileNotFoundError, match=f"every 10-K in it is cut off \\({half}\\): delete their folders"):
        gather_filings(DataConfig(source=str(cut), tickers=["876134"], fiscal_years=[2009]))
    shutil.copytree(mine / "sec-edgar-filings" / "AAPL", cut / "AAPL")  # 1996: its stripped tags cannot tell
    with caplog.at_level("WARNING", logger="tasks.download"):
        kept, _ = gather_filings(DataConfig(source=str(cut), tickers=["876134", "AAPL"], fiscal_years=[1996, 2009]))
    assert [f["ticker"] for f in kept] == ["AAPL"]
    assert f"{half} is cut off (it opens an SGML envelope that it does not close)" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no 10-K .* no `TICKER/10-K/ACCESSION/full-submission.txt`"):
        gather_filings(DataConfig(source=str(tmp_path / "empty"), tickers=["AMZN"], fiscal_years=[2020]))
    with pytest.raises(FileNotFoundError, match=r"`data.source` = '.*/nowhere' does not exist"):
        gather_filings(DataConfig(source=str(tmp_path / "nowhere"), tickers=["AMZN"], fiscal_years=[2020]))


def test_a_folder_edgar_tune_wrote_that_sec_edgar_downloader_added_to_reads_both(edgar, tmp_path, caplog):
    """A copy of the bundled folder (its manifest lists AMZN's FY2020 and FY2021) into which sec-edgar-downloader
    later downloaded more: the companies it added are read from their SEC headers beside what the manifest lists; an
    accession the manifest lists is read as it lists it, and a second 10-K of a year it has is left out, as is the
    earlier of two a folder alone has for a year (a re-filing), each said in the log."""
    from sec_edgar_downloader import Downloader

    mine = tmp_path / "mine"
    shutil.copytree(BUNDLED_DIR, mine / "sec-edgar-filings")
    downloader = Downloader("Edgar Tune Tests", "tests@example.com", mine)
    assert downloader.get("10-K", "AMZN") == 2  # full-submission.txt beside the listed primary documents
    assert downloader.get("10-K", "AAPL") == downloader.get("10-K", "0000876134") == 1
    root = mine / "sec-edgar-filings"
    refiled = root / "AMZN" / "10-K" / "0001018724-22-000077"  # another 10-K of FY2021, as EDGAR would serve it
    shutil.copytree(root / "AMZN" / "10-K" / "0001018724-22-000005", refiled)
    tgfin = root / "0000876134" / "10-K"
    later = tgfin / "0001010412-10-000099"
    shutil.copytree(tgfin / "0001010412-10-000078", later)
    sub = later / "full-submission.txt"
    sub.write_bytes(sub.read_bytes().replace(b"FILED AS OF DATE:\t\t20100406", b"FILED AS OF DATE:\t\t20100520", 1))
    cfg = DataConfig(source=str(mine), tickers=["AMZN", "AAPL", "876134"], fiscal_years=[1996, 2009, 2020, 2021])
    with caplog.at_level("INFO", logger="tasks.download"):
        filings, skipped = gather_filings(cfg)
    assert [(f["ticker"], f["fiscal_year"], f["accession"], sorted(f["files"])) for f in filings] == [
        ("0000876134", 2009, "0001010412-10-000099", ["full_submission"]),
        ("AAPL", 1996, "0000320193-96-000023", ["full_submission"]),
        ("AMZN", 2020, "0001018724-21-000004", ["primary_document"]),
        ("AMZN", 2021, "0001018724-22-000005", ["primary_document"])]  # fmt: skip
    assert len(skipped) == 12 - 4 and all(len(d) == 64 for f in filings for d in f["sha256"].values())
    assert "2 10-K filing(s) its manifest.json does not list (downloaded into it later), of 0000876134, AAPL" in (
        caplog.text)  # fmt: skip
    assert ("AMZN FY2021: 0001018724-22-000077 (filed 2022-02-04) left out; 0001018724-22-000005 "
            "(filed 2022-02-04) is read for that year, as manifest.json lists it") in caplog.text
    assert ("0001010412-10-000078 (filed 2010-04-06) left out; 0001010412-10-000099 (filed 2010-05-20) is read "
            "for that year: the later 10-K of a fiscal year is its re-filing") in caplog.text


def test_a_company_asked_by_ticker_and_by_cik_is_downloaded_once(edgar, tmp_path):
    """A company is its CIK: `AMZN`, then `1018724` (in another run, then in the same run), fetch one filing once."""
    def archives() -> list[str]:
        return [p for _, p, _ in edgar.requests if "/Archives/" in p]

    amzn = DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2021])
    by_ticker, _ = download_edgar(amzn, tmp_path, _client())
    assert len(archives()) == 2  # the full submission and the primary document
    edgar.requests.clear()
    by_cik, skipped = download_edgar(DataConfig(source="edgar", tickers=["0001018724"], fiscal_years=[2021]), tmp_path,
                                     _client())  # fmt: skip
    assert by_cik == by_ticker and skipped == [] and edgar.requests == []  # known on disk: no request at all
    both = DataConfig(source="edgar", tickers=["1018724", "AMZN"], fiscal_years=[2020, 2021])
    filings, _ = download_edgar(both, tmp_path, _client())
    assert [(f["ticker"], f["fiscal_year"]) for f in filings] == [("AMZN", 2020), ("AMZN", 2021)]
    assert len(archives()) == 2  # FY2020 once, under the name it was first asked by
    assert sorted(p.name for p in (tmp_path / "sec-edgar-filings").iterdir()) == ["AMZN", "manifest.json"]
    local, skipped = gather_filings(DataConfig(source=str(tmp_path), tickers=["1018724"], fiscal_years=[2020, 2021]))
    assert [f["fiscal_year"] for f in local] == [2020, 2021] and skipped == []


def test_unknown_ticker_names_the_fix(edgar, tmp_path, caplog):
    """Every ticker is looked up before any filing is fetched: all those SEC's list lacks are named in one error,
    with the closest ones in it. A ticker that has left the list (a company delisted, acquired or renamed) whose
    filings are on disk is followed by the CIK they name, so a schedule over `latest_years` goes on."""
    with pytest.raises(EdgarError, match="ticker 'NOPE1' is not in SEC's ticker list; give its CIK"):
        download_edgar(DataConfig(source="edgar", tickers=["NOPE1"], fiscal_years=[2020]), tmp_path, _client())
    several = DataConfig(source="edgar", tickers=["AMZN", "amzm", "EBAY", "QQQZX"], fiscal_years=[2020])
    named = (r"^tickers 'AMZM' \(did you mean [^)]*AMZN[^)]*\) and 'QQQZX' \(did [^)]*\) are not in SEC's ticker list; "
             r"give their CIKs instead \(data.tickers\). Nothing was downloaded")
    with pytest.raises(EdgarError, match=named):
        download_edgar(several, tmp_path, _client())
    assert [p for _, p, _ in edgar.requests if "/files/" not in p] == []  # one request: the ticker list
    latest = DataConfig(source="edgar", tickers=["AMZN"], latest_years=1)
    assert [f["fiscal_year"] for f in download_edgar(latest, tmp_path, _client())[0]] == [2021]
    listed = json.loads(edgar.routes["/files/company_tickers_exchange.json"])
    ticker = listed["fields"].index("ticker")
    listed["data"] = [row for row in listed["data"] if row[ticker] != "AMZN"]  # AMZN delisted
    edgar.routes["/files/company_tickers_exchange.json"] = json.dumps(listed).encode()
    with caplog.at_level("WARNING", logger="tasks.download"):
        assert [f["fiscal_year"] for f in download_edgar(latest, tmp_path, _client())[0]] == [2021]
    assert "ticker AMZN is no longer in SEC's ticker list (delisted, acquired or renamed); its filings on disk are " \
           "CIK 0001018724's, whose are asked for" in caplog.text
    with pytest.raises(EdgarError, match=r"ticker 'AMZN' \(did you mean [^)]*\) is not in SEC's ticker list"):
        download_edgar(latest, tmp_path / "elsewhere", _client())  # nothing on disk there to name its company


def test_a_share_class_written_with_a_dot_is_the_dashed_ticker_sec_lists(edgar, tmp_path):
    """Quote screens write Berkshire's class B as BRK.B (or BRK/B); SEC's ticker list has BRK-B."""
    edgar.add_company("0001067983", "BERKSHIRE HATHAWAY INC", ["BRK-A", "BRK-B"], [])
    for given in ("BRK.B", "brk/b"):
        _, skipped = download_edgar(DataConfig(source="edgar", tickers=[given], fiscal_years=[2020]), tmp_path,
                                    _client())  # fmt: skip
        assert [s["reason"] for s in skipped] == ["no 10-K on EDGAR"], skipped
    assert [p for _, p, _ in edgar.requests if "/submissions/" in p] == ["/submissions/CIK0001067983.json"] * 2
    from tasks.download import _is_company

    on_disk = {"ticker": "BRK-B", "cik": "0001067983"}  # a local folder's filing (sec-edgar-downloader's name)
    assert _is_company(on_disk, "BRK.B") and _is_company(on_disk, "1067983") and not _is_company(on_disk, "BRK-A")


def test_every_era_downloads_and_parses(edgar, tmp_path, caplog):
    """1996 plain text (no primary document on EDGAR), 2009 SGML by CIK, and two inline-XBRL filings."""
    cfg = DataConfig(source="edgar", tickers=["AAPL", "EBAY", "META", "876134"], fiscal_years=[1996, 2009, 2020, 2024])
    with caplog.at_level("INFO", logger="tasks.download"):
        filings, _ = download_edgar(cfg, tmp_path, _client())
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloaded ")]
    assert [m.split(": ")[1].split(",")[0] for m in progress] == [f"company {i} of 4" for i in range(1, 5)]
    assert "4 filing(s) and" in progress[-1]
    assert any(r.getMessage().startswith("EDGAR: 4 filing(s), ") for r in caplog.records)
    got = {(f["ticker"], f["fiscal_year"]): f for f in filings}
    assert set(got) == {("AAPL", 1996), ("EBAY", 2020), ("META", 2024), ("876134", 2009)}
    assert set(got[("AAPL", 1996)]["files"]) == {"full_submission"}  # 1996: the .txt is the document
    assert got[("876134", 2009)]["cik"] == "0000876134"
    for f in filings:
        doc = parse_filing(primary_file(f))
        assert doc.items["7"].status == "ok" and len(doc.items["7"].text) > 5_000, (f["ticker"], doc.warnings)
    assert not any(p.endswith("/") for _, p, _ in edgar.requests), "asked EDGAR for an empty document name"


def test_10k405_is_taken_as_a_10k(edgar, tmp_path):
    from tests.edgar_server import OTHERS

    cik, name, tickers, acc, _form, primary, filed, period, _ = OTHERS[0]
    edgar.add_company(cik, name, tickers, [(acc, "10-K405", primary, filed, period)])  # the same filing, as 10-K405
    filings, _ = download_edgar(DataConfig(source="edgar", tickers=["AAPL"], fiscal_years=[1996]), tmp_path, _client())
    assert [(f["form"], f["filed_form"]) for f in filings] == [("10-K", "10-K405")]


def test_body_cut_off_half_way_is_retried(edgar, tmp_path):
    edgar.fail("ebay1231202010-k.htm", {"truncate": 0})
    filings, _ = download_edgar(DataConfig(source="edgar", tickers=["EBAY"], fiscal_years=[2020]), tmp_path, _client())
    path = Path(filings[0]["root"]) / filings[0]["files"]["primary_document"]
    assert path.read_bytes() == gzip.decompress((FILINGS / "EBAY_10-K_2020.htm.gz").read_bytes())
    assert sum("ebay1231202010-k.htm" in p for _, p, _ in edgar.requests) == 2


def test_concurrent_downloads_share_one_rate_limit(edgar, tmp_path):
    """Four downloads on four threads (as Prefect runs concurrent tasks) stay at or under 10 requests/s in total."""
    jobs = [("AAPL", 1996), ("EBAY", 2020), ("META", 2024), ("AMZN", 2021)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(lambda j: download_edgar(DataConfig(source="edgar", tickers=[j[0]], fiscal_years=[j[1]]),
                                                      tmp_path / j[0], _client()), jobs))  # fmt: skip
    assert all(len(filings) == 1 for filings, _ in done)
    times = sorted(t for t, _, _ in edgar.requests)
    assert len(times) >= 15
    assert (len(times) - 1) / (times[-1] - times[0]) <= 10.5  # the whole run: 10/s, give or take one late arrival
    # Any 11 consecutive arrivals span about 1 s. The limiter spaces the sends 0.1 s apart; on a loaded 2-core
    # machine a thread can be paused between its slot and its send, so arrivals get some slack.
    assert min(b - a for a, b in zip(times, times[10:])) >= 0.8


def test_two_downloads_into_one_cache_at_once_keep_both_companies(edgar_server, edgar, tmp_path):
    """Runs share the download cache (`data.download_dir`, default ~/.cache/edgar-tune/edgar) and its manifest. Two
    processes downloading into it at once each read the manifest at their start and wrote their own view back after
    every filing, so the last writer dropped the other's company (seen here: only one of the two was left), and the
    next run asked EDGAR for it again. They now take turns on the cache."""
    _, base = edgar_server
    procs = [subprocess.Popen([sys.executable, "-m", "tests.download_child", base, str(tmp_path), ticker, "2020"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for ticker in ("AMZN", "EBAY")]  # fmt: skip
    outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    manifest = json.loads((tmp_path / "sec-edgar-filings" / "manifest.json").read_text())["filings"]
    assert sorted((f["ticker"], f["fiscal_year"]) for f in manifest) == [("AMZN", 2020), ("EBAY", 2020)]


def test_rate_limiter_sends_no_burst_after_the_process_pauses():
    """A process pause (here the main thread holds the GIL for 0.5 s, as a long garbage collection does) lets
    five slots fall due. They are granted one by one afterwards, 0.1 s apart, not all at once."""
    limiter, grants = RateLimiter(10.0), []

    def worker() -> None:
        for _ in range(4):
            limiter.acquire()
            grants.append(time.monotonic())

    interval = sys.getswitchinterval()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(worker) for _ in range(4)]
        time.sleep(0.35)
        sys.setswitchinterval(5.0)  # no other thread runs until this one blocks
        try:
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                pass
        finally:
            sys.setswitchinterval(interval)
        for f in futures:
            f.result()
    grants.sort()
    assert len(grants) == 16
    # 0.1 s apart, give or take a thread woken a little late: any 5 consecutive grants span about 0.4 s
    assert min(b - a for a, b in zip(grants, grants[4:])) >= 0.3, [round(t - grants[0], 3) for t in grants]


def test_killed_download_leaves_no_partial_file_and_the_rerun_fetches_it(edgar_server, edgar, tmp_path):
    _, base = edgar_server
    primary = "ebay1231202010-k.htm"
    edgar.fail(primary, {"truncate": 30})  # half the body, then the server hangs: the client is mid-download
    child = subprocess.Popen([sys.executable, "-m", "tests.download_child", base, str(tmp_path), "EBAY", "2020"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(primary in p for _, p, _ in edgar.requests):
        assert time.monotonic() < deadline and child.poll() is None, "the child never asked for the document"
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    folder = tmp_path / "sec-edgar-filings" / "EBAY" / "10-K" / "0001065088-21-000006"
    assert sorted(p.name for p in folder.iterdir()) == ["full-submission.txt"]  # complete, and nothing else
    edgar.reset()
    filings, _ = download_edgar(DataConfig(source="edgar", tickers=["EBAY"], fiscal_years=[2020]), tmp_path, _client())
    path = Path(filings[0]["root"]) / filings[0]["files"]["primary_document"]
    assert path.read_bytes() == gzip.decompress((FILINGS / "EBAY_10-K_2020.htm.gz").read_bytes())
    fetched = [p for _, p, _ in edgar.requests if "/Archives/" in p]
    assert len(fetched) == 1 and primary in fetched[0]  # the finished full submission was kept, not fetched again


def test_latest_years_follow_edgar_as_10ks_are_filed(edgar, tmp_path):
    """`latest_years` asks EDGAR at every run: Amazon's FY2021 10-K appears on 2022-02-04 and is the latest from
    then on. What is on disk is never fetched again; an older page of filings is read only until a 10-K older
    than the latest years shows (the rows are newest first, and amendments are filed after their original)."""
    def archives() -> list[str]:
        return [p.rsplit("/", 1)[-1] for _, p, _ in edgar.requests if "/Archives/" in p]

    latest = DataConfig(source="edgar", tickers=["AMZN"], latest_years=1)
    edgar.amzn_as_of("2022-01-01", paged=True)
    filings, skipped = download_edgar(latest, tmp_path, _client())
    assert [f["fiscal_year"] for f in filings] == [2020]
    assert [(s["fiscal_year"], s["form"]) for s in skipped] == [(2020, "10-K/A")]  # the amendment, never taken

    edgar.requests.clear()
    edgar.amzn_as_of("2022-03-01", paged=True)  # the FY2021 10-K is filed
    filings, _ = download_edgar(latest, tmp_path, _client())
    assert [f["fiscal_year"] for f in filings] == [2021]
    assert sorted(archives()) == ["0001018724-22-000005.txt", "amzn-20211231.htm"]  # only the new filing
    assert not any("submissions-001" in p for _, p, _ in edgar.requests)  # FY2020's 10-K on page 1 ends the search

    edgar.requests.clear()
    two = DataConfig(source="edgar", tickers=["AMZN"], latest_years=2)
    filings, _ = download_edgar(two, tmp_path, _client())
    assert [f["fiscal_year"] for f in filings] == [2020, 2021] and archives() == []  # both on disk already

    # three years reach the older page; FY2019's documents are not on the loopback EDGAR, so it is recorded
    filings, skipped = download_edgar(DataConfig(source="edgar", tickers=["AMZN"], latest_years=3), tmp_path, _client())
    assert [f["fiscal_year"] for f in filings] == [2020, 2021]
    assert any("submissions-001" in p for _, p, _ in edgar.requests)
    assert any(s["fiscal_year"] == 2019 and "404" in s["reason"] for s in skipped)


def test_latest_years_of_a_local_source():
    assert [f["fiscal_year"] for f in collect_local(BUNDLED_DIR, ["AMZN"], [], latest=1)] == [2021]
    filings, skipped = gather_filings(DataConfig(source="bundled", tickers=["AMZN"], latest_years=5))
    assert [f["fiscal_year"] for f in filings] == [2020, 2021] and skipped == []
