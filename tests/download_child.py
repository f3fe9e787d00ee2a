"""Run the real stage-1 download in a child process against the loopback EDGAR.

    python -m tests.download_child BASE_URL DEST TICKER YEAR           # the kill test's victim
    python -m tests.download_child BASE_URL DEST TICKER YEAR --flow    # the download task in a Prefect flow run
"""

from __future__ import annotations

import sys
from pathlib import Path

from sec_edgar_downloader import _orchestrator, _sec_gateway

from edgar_tune.config import DataConfig
from tasks.download import EdgarClient, download_edgar

if __name__ == "__main__":
    base, dest, ticker, year = sys.argv[1:5]
    as_flow = "--flow" in sys.argv
    _sec_gateway.URL_CIK_MAPPING = f"{base}/files/company_tickers_exchange.json"
    _orchestrator.URL_SUBMISSIONS = f"{base}/submissions/{{submission}}"
    _orchestrator.URL_FILING = f"{base}/Archives/edgar/data/{{cik}}/{{acc_num_no_dash}}/{{document}}"
    cfg = DataConfig(source="edgar", tickers=[ticker], fiscal_years=[int(year)], download_dir=dest,
                     edgar_identity="Edgar Tune Tests tests@example.com")  # fmt: skip
    if as_flow:
        from prefect import flow

        from tasks.stages import download_filings

        flow(name="download-only")(lambda: download_filings(Path(dest) / "run", cfg))()
    else:
        download_edgar(cfg, Path(dest), EdgarClient("Edgar Tune Tests tests@example.com", timeout=60))
