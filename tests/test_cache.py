"""Stage cache keys: each stage's key moves with what it reads, and only with that."""

from __future__ import annotations

import json
from pathlib import Path

from edgar_tune.config import REPO_ROOT, load_config
from tasks.cache import CODE, STAGES, config_view, folder_digest, is_current, record, stage_key
from tasks.io import DOWNLOAD


def _keys(run_dir: Path, **overrides) -> dict[str, str]:
    cfg = load_config("tiny", overrides)
    return {s: stage_key(s, str(run_dir), run_dir, cfg) for s in STAGES}


def test_a_training_hyperparameter_moves_only_the_training_keys(tmp_path):
    base, changed = _keys(tmp_path), _keys(tmp_path, **{"train.learning_rate": 1e-4})
    moved = [s for s in STAGES if base[s] != changed[s]]
    # evaluate's key moves too once train writes different weights (it hashes 04_train), not through the config
    assert moved == ["train", "register"]
    assert [s for s in STAGES if base[s] != _keys(tmp_path, **{"parse.val_items": ["7", "7A"]})[s]] == [
        "parse", "tokenize", "register"]  # fmt: skip
    assert _keys(tmp_path / "other")["download"] != base["download"]  # another run folder, another key


def test_the_task_sees_only_the_config_in_its_key():
    cfg = load_config("tiny", {"train.learning_rate": 1e-4, "train.seed": 7})
    view = config_view(cfg, "tokenize")
    assert view.train.seed == 7 and view.train.learning_rate == type(cfg.train)().learning_rate
    assert view.data == cfg.data and view.eval == type(cfg.eval)()


def test_every_stage_module_is_in_some_stage_code_version():
    listed = {Path(p).name for paths in CODE.values() for p in paths}
    plumbing = {"__init__.py", "io.py", "stages.py", "cache.py", "storage.py"}
    modules = {p.name for p in (REPO_ROOT / "tasks").glob("*.py")} - plumbing
    assert modules <= listed, modules - listed


def test_download_digest_ignores_where_this_machine_keeps_the_filings(tmp_path):
    def manifest(folder: Path, root: str) -> Path:
        (folder / DOWNLOAD).mkdir(parents=True)
        filing = {"ticker": "AMZN", "root": root, "files": {}, "sha256": {"primary_document": "ab"}}
        (folder / DOWNLOAD / "manifest.json").write_text(json.dumps({"filings": [filing], "skipped": []}))
        return folder / DOWNLOAD

    assert folder_digest(manifest(tmp_path / "a", "/home/a/.cache")) == folder_digest(manifest(tmp_path / "b", "/b"))


def test_a_stamp_stands_only_with_its_outputs_and_its_key(tmp_path):
    record(tmp_path, "train", "k1")
    assert not is_current(tmp_path, "train", "k1")  # no 04_train/stats.json
    (tmp_path / "04_train").mkdir()
    (tmp_path / "04_train" / "stats.json").write_text("{}")
    assert is_current(tmp_path, "train", "k1") and not is_current(tmp_path, "train", "k2")
