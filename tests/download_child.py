"""Run the real stage-1 download in a child process against the loopback EDGAR (the kill test's victim).

    python -m tests.download_child BASE_URL DEST TICKER YEAR
"""

from __future__ import annotations

import sys
from pathlib import Path

from sec_edgar_downloader import _orchestrator, _sec_gateway

from edgar_tune.config import DataConfig
from tasks.download import EdgarClient, download_edgar

if __name__ == "__main__":
    base, dest, ticker, year = sys.argv[1:5]
    _sec_gateway.URL_CIK_MAPPING = f"{base}/files/company_tickers_exchange.json"
    _orchestrator.URL_SUBMISSIONS = f"{base}/submissions/{{submission}}"
    _orchestrator.URL_FILING = f"{base}/Archives/edgar/data/{{cik}}/{{acc_num_no_dash}}/{{document}}"
    cfg = DataConfig(source="edgar", tickers=[ticker], fiscal_years=[int(year)])
    download_edgar(cfg, Path(dest), EdgarClient("Edgar Tune Tests tests@example.com", timeout=60))
