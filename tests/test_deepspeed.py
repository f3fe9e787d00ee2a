"""DeepSpeed ZeRO through the CLI on the CPU (gloo), with the tiny preset: what ran is what was asked for."""

from __future__ import annotations

import pytest

from edgar_tune.config import ConfigError, load_config
from tests.conftest import run_cli


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
