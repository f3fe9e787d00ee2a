"""`make setup` on the machines a newcomer brings: too old a Python is refused with what to do, and a venv that
Debian's python3 (without python3-venv) leaves half made is removed, so the next `make` starts clean instead of
taking a venv without pip for one. The interpreters here are stand-ins that answer as those do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setup(tmp_path: Path, python: str) -> subprocess.CompletedProcess:
    for name in ("Makefile", "requirements.lock", "requirements-nodeps.txt", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    return subprocess.run(["make", "setup", f"PYTHON={python}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def _stand_in(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\nexec {sys.executable} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def test_make_refuses_a_python_older_than_3_11_before_making_anything(tmp_path):
    old = _stand_in(tmp_path / "python3.10", 'if [ "$1" = "--version" ]; then echo "Python 3.10.12"; exit 0; fi\n'
                    '[ "$1" = "-c" ] && exit 1')  # fmt: skip
    proc = _setup(tmp_path, old)
    assert proc.returncode != 0
    assert f"edgar-tune needs Python 3.11 or newer; {old} is Python 3.10.12. Name another: make setup PYTHON=" in proc.stderr
    assert not (tmp_path / ".venv").exists()


def test_make_removes_the_venv_that_python_without_ensurepip_half_made(tmp_path):
    debian = _stand_in(tmp_path / "python3", 'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then\n'
                       f'  {sys.executable} -m venv --without-pip "$3"\n'
                       '  echo "The virtual environment was not created successfully because ensurepip is not" >&2\n'
                       "  exit 1\nfi")  # fmt: skip
    proc = _setup(tmp_path, debian)
    assert proc.returncode != 0 and "ensurepip is not" in proc.stderr
    assert "make removed the half-made .venv, so the next make starts clean" in proc.stderr
    assert not (tmp_path / ".venv").exists()
