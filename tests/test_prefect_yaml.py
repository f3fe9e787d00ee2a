"""prefect.yaml stays deployable: entrypoints resolve, parameters are the flow's, the cron schedule is valid."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_deployments_point_at_the_flow_with_its_parameters():
    from edgar_tune.config import RunParameters

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"after-10k-season", "on-demand", "rerun", "sweep", "sweep-point", "export-champion"} <= names
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        assert set(dep.get("parameters", {})) <= set(inspect.signature(flow.fn).parameters)
        for trigger in dep.get("triggers", []):  # what a trigger passes the flow run
            assert set(trigger.get("parameters", {})) <= set(inspect.signature(flow.fn).parameters), trigger
        if "params" in dep.get("parameters", {}):
            RunParameters.model_validate(dep["parameters"]["params"]).load()  # typed, and every key is valid
        assert dep["work_pool"]["name"] == "edgar-tune"
    # the deployment a sweep's `spread` (and `edgar-tune sweep --spread`) names by default
    from edgar_tune.cli import POINT_DEPLOYMENT
    from flows.sweep import POINT_DEPLOYMENT as point_deployment, sweep_point

    flow_name, dep_name = POINT_DEPLOYMENT.split("/")
    assert POINT_DEPLOYMENT == point_deployment and flow_name == sweep_point.name and dep_name in names


def test_cron_schedule_is_valid_and_has_a_timezone():
    from cronsim import CronSim
    from datetime import datetime

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    scheduled = [d for d in spec["deployments"] if d.get("schedules")]
    assert scheduled
    for dep in scheduled:
        for sched in dep["schedules"]:
            if "interval" in sched:  # export-champion's: off until a user turns it on
                assert dep["name"] == "export-champion" and sched["active"] is False, dep
                continue
            assert sched["timezone"]
            nxt = next(CronSim(sched["cron"], datetime(2026, 1, 1)))
            assert nxt.month == 3 and nxt.weekday() == 0 and nxt.hour == 6


def test_flow_parameters_are_one_typed_model_with_descriptions():
    from edgar_tune.config import ConfigError, RunParameters
    from flows.pipeline import edgar_tune_pipeline

    schema = edgar_tune_pipeline.parameters.model_dump()
    assert list(schema["properties"]) == ["params"]
    fields = RunParameters.model_json_schema()["properties"]
    for name in ("preset", "tickers", "fiscal_years", "model", "revision", "deepspeed", "lora_r", "epoch",
                 "learning_rate"):  # fmt: skip
        assert fields[name].get("description"), name
    assert set(fields["deepspeed"]["anyOf"][0]["enum"]) == {"zero2", "zero3", "zero3-offload"}
    cfg = RunParameters(preset="tiny", tickers=["msft"], lora_r=4, overrides={"train.warmup": 0.1},
                        model="org/model", revision="v1.0").load()  # fmt: skip
    assert (cfg.data.tickers, cfg.train.lora_r, cfg.train.warmup, cfg.train.lora_alpha) == (["MSFT"], 4, 0.1, 32)
    assert (cfg.model.name, cfg.model.revision) == ("org/model", "v1.0")
    import pytest

    with pytest.raises(ConfigError, match="train.learnin_rate"):
        RunParameters(overrides={"train.learnin_rate": 1}).load()


def test_the_schedule_follows_the_latest_10ks_and_named_years_win_over_a_presets_latest(tmp_path):
    import pytest
    from pydantic import ValidationError

    from edgar_tune.config import RunParameters

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    season = next(d for d in spec["deployments"] if d["name"] == "after-10k-season")
    cfg = RunParameters.model_validate(season["parameters"]["params"]).load()
    assert cfg.data.source == "edgar" and cfg.data.latest_years  # not a fixed list of years that goes stale
    with pytest.raises(ValidationError, match="not both"):
        RunParameters(fiscal_years=[2020], latest_years=1)
    preset = yaml.safe_load((REPO / "configs" / "presets" / "tiny.yaml").read_text())
    preset["data"]["latest_years"] = 2
    (tmp_path / "latest.yaml").write_text(yaml.safe_dump(preset))
    assert RunParameters(preset=str(tmp_path / "latest.yaml")).load().data.latest_years == 2
    cfg = RunParameters(preset=str(tmp_path / "latest.yaml"), fiscal_years=[2021]).load()
    assert (cfg.data.fiscal_years, cfg.data.latest_years) == ([2021], None)


def test_rerun_flow_offers_the_stages_and_each_reruns_its_dependents():
    from flows.pipeline import edgar_tune_rerun
    from tasks.cache import STAGES, downstream

    schema = edgar_tune_rerun.parameters.model_dump()
    assert set(schema["required"]) == {"stage", "run"}
    assert schema["properties"]["if_busy"]["enum"] == ["fail", "wait"]
    assert tuple(schema["properties"]["stage"]["enum"]) == STAGES
    assert downstream("train") == ["train", "evaluate", "register"]
    assert downstream("evaluate-base") == ["evaluate-base", "register"]
    assert downstream("tokenize") == ["tokenize", "evaluate-base", "train", "evaluate", "register"]
    assert downstream("download") == list(STAGES)
