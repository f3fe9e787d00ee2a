"""Stage 1 against the loopback EDGAR: the real download code, with only the base URLs patched."""

from __future__ import annotations

import gzip
import hashlib

import pytest

from edgar_tune.config import DataConfig
from tasks.download import BUNDLED_DIR, EdgarClient, EdgarError, collect_local, download_edgar, gather_filings

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


def test_slow_answer_times_out_and_is_retried(edgar, tmp_path):
    edgar.fail("/submissions/", {"sleep": 1.5})
    cfg = DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2021])
    filings, _ = download_edgar(cfg, tmp_path, _client(timeout=0.5))
    assert len(filings) == 1


def test_missing_fiscal_year_and_404_are_recorded(edgar, tmp_path):
    # FY2019's documents are not on the loopback EDGAR: its 404 is recorded, and the run goes on.
    cfg = DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2015, 2019, 2021])
    filings, skipped = download_edgar(cfg, tmp_path, _client())
    assert [f["fiscal_year"] for f in filings] == [2021]
    reasons = {s["fiscal_year"]: s["reason"] for s in skipped if s["form"] != "10-K/A"}
    assert "404" in reasons[2019] and reasons[2015] == "no 10-K on EDGAR"


def test_bundled_data_reads_through_the_same_layout():
    filings = collect_local(BUNDLED_DIR, ["AMZN"], [2020, 2021])
    assert [f["fiscal_year"] for f in filings] == [2020, 2021]
    assert all(f["files"]["primary_document"].startswith("AMZN/10-K/") for f in filings)


def test_downloaded_folder_works_as_a_local_source(edgar, tmp_path):
    download_edgar(DataConfig(source="edgar", tickers=["AMZN"], fiscal_years=[2020]), tmp_path, _client())
    filings, _ = gather_filings(DataConfig(source=str(tmp_path), tickers=["AMZN"], fiscal_years=[2020]))
    assert filings[0]["accession"] == "0001018724-21-000004"


def test_unknown_ticker_names_the_fix(edgar, tmp_path):
    with pytest.raises(EdgarError, match="give its CIK"):
        download_edgar(DataConfig(source="edgar", tickers=["NOPE1"], fiscal_years=[2020]), tmp_path, _client())
