"""DeepSpeed ZeRO through the CLI on the CPU (gloo), with the tiny preset: what ran is what was asked for."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from edgar_tune.config import ConfigError, load_config
from tests.conftest import REPO, run_cli


def test_zero2_in_one_process_matches_the_plain_run(tiny_run, tmp_path, prefect_server):
    _, plain = tiny_run
    s = run_cli(tmp_path, "--deepspeed", "zero2", env=prefect_server)
    assert (s["engine"], s["zero_stage"], s["world_size"], s["dtype"]) == ("deepspeed", 2, 1, "float32")
    assert s["gradient_checkpointing"] is True
    assert s["ppl_after"] == pytest.approx(plain["ppl_after"], rel=0.02)
    assert plain["engine"] == "hf-trainer" and plain["zero_stage"] is None


@pytest.mark.slow  # about 100 s on 2 cores: make test-slow (ZeRO-2 in one process stays in make test)
def test_zero3_over_two_processes(tmp_path, prefect_server):
    s = run_cli(tmp_path, "--deepspeed", "zero3", "--nproc", "2", env=prefect_server)
    assert (s["engine"], s["zero_stage"], s["world_size"]) == ("deepspeed", 3, 2)
    assert s["ppl_after"] < s["ppl_before"]
    assert (tmp_path / "latest" / "04_train" / "adapter" / "adapter_model.safetensors").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.nproc": 2}, "also set train.deepspeed"),
        ({"train.deepspeed": "zero4"}, "zero2, zero3, zero3-offload"),
    ],
)
def test_bad_engine_settings_are_refused_before_anything_runs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_half_precision_on_cpu_is_refused():
    from tasks.finetune import resolve_precision

    assert resolve_precision("auto") == "fp32"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_precision("bf16")


def test_shipped_configs_are_valid_deepspeed_configs():
    import json

    from tasks.finetune import deepspeed_config_path

    for name, stage in [("zero2", 2), ("zero3", 3), ("zero3-offload", 3)]:
        cfg = json.loads(deepspeed_config_path(name).read_text())
        assert cfg["zero_optimization"]["stage"] == stage
        assert "optimizer" not in cfg  # the Trainer's torch AdamW: no fused_adam build on machines without nvcc
    assert json.loads(deepspeed_config_path("zero3-offload").read_text())["zero_optimization"]["offload_param"]


def test_a_hostfile_is_read_as_deepspeeds_launcher_reads_it(tmp_path):
    """The world size (memory plan, steps) counts the slots DeepSpeed's launcher launches: a `#` line is none (it was
    counted). A file that is not there is refused (the launcher would train on this node alone, with a warning, under
    the hostfile's name), as are lines the launcher refuses, a host twice and no slots: before the first stage."""
    from deepspeed.launcher.runner import _parse_hostfile

    from edgar_tune.config import TrainConfig
    from tasks.finetune import hostfile_slots, preflight, world_size

    good = tmp_path / "hostfile"
    good.write_text("# worker-0 slots=8 is down this week\n\nworker-1 slots=8\nworker-2   slots=4 # spare\n")
    assert hostfile_slots(str(good)) == dict(_parse_hostfile(good.read_text().splitlines())) == {"worker-1": 8,
                                                                                                  "worker-2": 4}
    assert world_size(TrainConfig(deepspeed="zero2", hostfile=str(good))) == 12
    cases = {
        "worker-1 8\n": "line 1: 'worker-1 8' is not `HOST slots=N`; a line `HOST slots=GPUS` per node",
        "worker-1 slots=8\nworker-1 slots=8\n": "line 2: worker-1 is there twice; give each node once",
        "# nobody\n": "names no slots",
    }
    for text, says in cases.items():
        good.write_text(text)
        where = f"train.hostfile={good}{',' if 'line' in says else ''}"
        with pytest.raises(ConfigError, match=re.escape(f"{where} {says}")):
            preflight(TrainConfig(deepspeed="zero2", hostfile=str(good)))
    missing = tmp_path / "nodes"
    with pytest.raises(ConfigError, match=re.escape(f"train.hostfile={missing}: cannot read it (No such file")):
        preflight(TrainConfig(deepspeed="zero2", hostfile=str(missing)))


def test_a_deepspeed_config_that_is_not_one_is_refused_before_anything_runs(tmp_path):
    """A `train.deepspeed` JSON that does not parse, or is not an object, ended in a JSONDecodeError's (or an
    AttributeError's) traceback once the run planned its memory, after the data stages; the CLI refuses it before
    Prefect starts, in one line."""
    from edgar_tune.config import TrainConfig
    from tasks.finetune import preflight

    cut, listed = tmp_path / "cut.json", tmp_path / "list.json"
    cut.write_text('{"zero_optimization": ')
    listed.write_text("[2]")
    with pytest.raises(ConfigError, match=re.escape(f"{cut} is not a JSON file (Expecting value: line 1")):
        preflight(TrainConfig(deepspeed=str(cut)))
    with pytest.raises(ConfigError, match=re.escape(f"{listed} holds a JSON list, not the object of a DeepSpeed")):
        preflight(TrainConfig(deepspeed=str(listed)))
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out",
                           str(tmp_path / "run"), "--deepspeed", str(cut)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"edgar-tune: error: train.deepspeed='{cut}': {cut} is not a JSON file (Expecting value: line 1 column 23 "
        "(char 22)); give a DeepSpeed config (configs/deepspeed/zero2.json is one)"], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()
