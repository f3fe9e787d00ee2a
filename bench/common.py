"""What every benchmark shares and that needs no torch: the host's name in result files, and writing them."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path


def cpu_host() -> str:
    """A CPU host as the results' file names know it (x86-64-2cpu)."""
    return re.sub(r"[^a-z0-9]+", "-", f"{platform.machine()}-{os.cpu_count()}cpu".lower())


def write_result(out: Path, what: str, device: str, record) -> Path:
    """Write bench/results/<date>-[<what>-]<device>.json (atomically: a run killed mid-write keeps the last one)
    and say where."""
    from tasks.io import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    slug = device.lower().replace(" ", "-")
    path = out / f"{dt.date.today().isoformat()}-{what + '-' if what else ''}{slug}.json"
    atomic_write_json(path, record)
    print(f"wrote {path}")
    return path
