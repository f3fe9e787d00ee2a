"""prefect.yaml stays deployable: entrypoints resolve, parameters are the flow's, the cron schedule is valid."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_deployments_point_at_the_flow_with_its_parameters():
    from edgar_tune.config import load_config

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"after-10k-season", "on-demand"} <= names
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        assert set(dep["parameters"]) <= set(inspect.signature(flow.fn).parameters)
        load_config(dep["parameters"]["preset"], dep["parameters"].get("overrides"))  # overrides are valid keys
        assert dep["work_pool"]["name"] == "edgar-tune"


def test_cron_schedule_is_valid_and_has_a_timezone():
    from cronsim import CronSim
    from datetime import datetime

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    scheduled = [d for d in spec["deployments"] if d.get("schedules")]
    assert scheduled
    for dep in scheduled:
        for sched in dep["schedules"]:
            assert sched["timezone"]
            nxt = next(CronSim(sched["cron"], datetime(2026, 1, 1)))
            assert nxt.month == 3 and nxt.weekday() == 0 and nxt.hour == 6
