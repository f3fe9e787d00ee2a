"""Presets and config errors: every preset is tested; every error names the key to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgar_tune.config import PRESETS_DIR, ConfigError, flat_params, load_config

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def test_required_presets_exist():
    assert {"demo", "tiny"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_starts_with_its_command(name):
    first = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# edgar-tune run --preset {name}")
    cfg = load_config(name)
    assert cfg.preset == name


def test_demo_and_tiny_use_the_same_filings():
    demo, tiny = load_config("demo"), load_config("tiny")
    assert demo.data == tiny.data
    assert demo.data.source == "bundled" and demo.data.fiscal_years == [2020, 2021]


def test_overrides_dotted_and_bare_keys():
    cfg = load_config("tiny", ["train.learning_rate=1e-4", "lora_r=4", "data.tickers=[amzn]", "epoch=2"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.lora_r == 4 and cfg.train.epoch == 2.0
    assert cfg.data.tickers == ["AMZN"]
    assert flat_params(cfg)["train.lora_r"] == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learnin_rate=1e-4", "unknown config key `train.learnin_rate`. Did you mean `train.learning_rate`"),
        ("bogus=1", "unknown config key `bogus`"),
        ("train.lora_r=0", "`train.lora_r`"),
        ("train.learning_rate=abc", "`train.learning_rate`"),
        ("data.fiscal_years=[1850]", "`data.fiscal_years`"),
        ("train.mode=qlora", "`train.mode`"),
        ("tokenize.max_input_length=3", "`tokenize.max_input_length`"),
        ("noequals", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("tiny", [override])


def test_unknown_key_in_a_preset_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# edgar-tune run --preset bad.yaml\ntrain:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key `train.learning_rat`"):
        load_config(str(bad))


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="demo, tiny"):
        load_config("nope")


def test_cli_rejects_a_bad_key_before_starting_anything():
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--set", "lora_rank=8"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown config key `lora_rank`" in proc.stderr
