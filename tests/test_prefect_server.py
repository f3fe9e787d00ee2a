"""edgar-tune on a real Prefect server: deployments from prefect.yaml, a process worker, runs created the way
the UI creates them, stage caching across runs, the UI's Retry after a training crash, reruns, and the shared
EDGAR rate limit.

The server is started once per test session (conftest.prefect_server); the worker runs the flow in its own
processes, which reach the loopback EDGAR through $EDGAR_TUNE_SEC_URL (a base URL, nothing else replaced).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from tests.conftest import REPO, export_trigger_acts_on_a_new_champion_only

PREFECT = str(Path(sys.executable).parent / "prefect")
IDENTITY = "Edgar Tune Tests tests@example.com"
DATA_STAGES = ["download", "parse", "tokenize", "evaluate-base"]
MODEL_STAGES = ["train", "evaluate", "register"]
ALL_STAGES = DATA_STAGES + MODEL_STAGES
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
FIRST_RUN = "first-run"  # a copy of the first run this file's worker made, as it finished


class Api:
    """The REST calls the Prefect UI makes."""

    def __init__(self, url: str) -> None:
        # Longer than SQLite's 60 s busy timeout in Prefect's server: a write can wait that long for the lock.
        self.http = httpx.Client(base_url=url, timeout=90)

    def request(self, method: str, path: str, **kw):
        """One call, retried on 503 as Prefect's own client does: the server answers 503 for errors worth retrying
        (a SQLite database locked by a worker's writes). Prefect's server on SQLite sometimes holds the lock for
        its whole 60 s busy timeout (PrefectHQ/prefect#10188): the retries cover two minutes, and reads (GETs and
        filters) are also retried when the server has not answered in time."""
        reads = method == "GET" or path.endswith("/filter")
        deadline = time.monotonic() + 150
        for attempt in range(20):
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TimeoutException:
                if not reads or time.monotonic() > deadline:
                    raise
                continue
            if resp.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(min(0.5 * 2**attempt, 8))
        assert resp.status_code < 300, resp.text
        return resp.json() if resp.content else None

    def post(self, path: str, body: dict | None = None):
        return self.request("POST", path, json=body or {})

    def get(self, path: str):
        return self.request("GET", path)

    def deployment(self, name: str) -> dict:
        found = self.post("/deployments/filter", {"deployments": {"name": {"any_": [name]}}})
        assert len(found) == 1, found
        return found[0]

    def custom_run(self, params: dict) -> str:
        """The UI's "Custom run" of the on-demand deployment."""
        dep = self.deployment("on-demand")
        return self.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"params": params}})["id"]

    def wait(self, run_id: str, timeout: float = 600, states: set[str] = TERMINAL) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{run_id}")
            if run["state"]["type"] in states:
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} still {run['state']['type']} after {timeout} s")

    def stage_states(self, run_id: str, stages: list[str], timeout: float = 180) -> dict[str, list[str]]:
        """Task-run state names by stage, oldest first (a retried run has two attempts at some stages), once every
        one of `stages` has a task run and every task run is final. Task-run states reach the server as events,
        after the flow run's own state: an all-cached run is COMPLETED before its last stages are recorded."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}},
                                                   "sort": "EXPECTED_START_TIME_ASC"})  # fmt: skip
            out: dict[str, list[str]] = {}
            for tr in runs:  # a task run's first event can reach the server before its state: state None
                out.setdefault(tr["name"], []).append((tr["state"] or {}).get("name", "no state yet"))
            settled = set(stages) <= set(out) and all((tr["state"] or {}).get("type") in TERMINAL for tr in runs)
            if settled or time.monotonic() > deadline:
                return out
            time.sleep(0.5)

    def events(self, name: str, run_ids: list[str], expect: int, timeout: float = 60) -> list[dict]:
        """The events called `name` related to these flow runs, once `expect` of them are there (events reach the
        server's store in batches, after the run's own state) or `timeout` has passed."""
        deadline = time.monotonic() + timeout
        related = {"id": [f"prefect.flow-run.{r}" for r in run_ids]}
        while True:
            page = self.post("/events/filter", {"filter": {"event": {"name": [name]}, "related": related}, "limit": 50})
            if len(page["events"]) >= expect or time.monotonic() > deadline:
                return page["events"]
            time.sleep(0.5)

    def exports(self, store: str, expect: int, timeout: float = 300) -> list[dict]:
        """The export-champion deployment's flow runs for the MLflow store `store`, oldest first, once `expect` of
        them are there and all are final (a trigger's run is created after its event reaches the server), or
        `timeout` has passed."""
        dep = self.deployment("export-champion")
        deadline = time.monotonic() + timeout
        while True:
            runs = self.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}},
                                                   "sort": "EXPECTED_START_TIME_ASC"})  # fmt: skip
            runs = [r for r in runs if r["parameters"].get("tracking_uri") == store]
            final = all(r["state"]["type"] in TERMINAL for r in runs)
            if (len(runs) >= expect and final) or time.monotonic() > deadline:
                return runs
            time.sleep(1)

    def logs(self, run_id: str, until: str, timeout: float = 60) -> list[dict]:
        """The flow run's log records in the UI's order, once one of them contains `until`: they reach the server
        in batches, after the run's own state."""
        deadline = time.monotonic() + timeout
        while True:
            out: list[dict] = []
            query = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
            while batch := self.post("/logs/filter", query | {"offset": len(out)}):
                out += batch
            if any(until in r["message"] for r in out) or time.monotonic() > deadline:
                return out
            time.sleep(0.5)


@pytest.fixture(scope="module")
def deployed(prefect_server, edgar_server, tmp_path_factory):
    """Both deployments of prefect.yaml deployed to the server, and a process worker serving the pool."""
    _, base = edgar_server
    home = tmp_path_factory.mktemp("worker")
    env = dict(os.environ, **prefect_server, PREFECT_HOME=str(home / "prefect"), EDGAR_TUNE_SEC_URL=base,
               EDGAR_IDENTITY=IDENTITY, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="0")  # fmt: skip
    for cmd in ([PREFECT, "work-pool", "create", "edgar-tune", "--type", "process"],
                [PREFECT, "--no-prompt", "deploy", "--all"]):  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    api = Api(prefect_server["PREFECT_API_URL"])
    export = api.deployment("export-champion")  # its champions into this test's folder, not the checkout's exports/
    api.request("PATCH", f"/deployments/{export['id']}",
                json={"parameters": export["parameters"] | {"out": str(home / "exports" / "{model}" / "{alias}")}})
    log = open(home / "worker.log", "wb")  # noqa: SIM115 (closed at teardown)
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "edgar-tune"], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        yield api, env, home
    finally:
        os.killpg(worker.pid, signal.SIGINT)
        try:  # it stops in 1-3 s (if it inherited SIGINT ignored it never did: see conftest.py)
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        log.close()


def _params(out: Path, **extra) -> dict:
    return {"preset": "tiny", "out_dir": str(out), "source": "edgar", "tickers": ["AMZN"],
            "fiscal_years": [2020, 2021]} | extra  # fmt: skip


def _log_tail(home: Path) -> str:
    return (home / "worker.log").read_text(errors="replace")[-6000:]


def test_deployments_from_prefect_yaml_and_the_cron_schedule_produces_runs(deployed):
    api, _, _ = deployed
    season = api.deployment("after-10k-season")
    assert season["work_pool_name"] == "edgar-tune" and api.deployment("on-demand")["work_pool_name"] == "edgar-tune"
    assert season["parameter_openapi_schema"]["properties"]["params"]  # the typed form the UI renders
    deadline = time.monotonic() + 60
    while True:
        scheduled = api.post("/flow_runs/filter", {"deployments": {"id": {"any_": [season["id"]]}},
                                                   "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})  # fmt: skip
        if scheduled or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert scheduled, "the scheduler made no run from the cron schedule"
    export = api.deployment("export-champion")  # its schedule is there, off until turned on
    assert [s["active"] for s in export["schedules"]] == [False], export["schedules"]
    for run in scheduled:
        when = datetime.fromisoformat(run["expected_start_time"]).astimezone(ZoneInfo("America/New_York"))
        assert (when.weekday(), when.hour, when.minute) == (0, 6, 0) and when.month in (3, 4), when
        assert run["parameters"]["params"]["source"] == "edgar"


@pytest.mark.parametrize("rerun_by_id", [False, pytest.param(True, marks=pytest.mark.slow)])  # True: a rerun more
def test_same_parameters_twice_is_all_cached_and_a_new_learning_rate_reuses_the_data(deployed, edgar, tmp_path,
                                                                                     rerun_by_id):  # fmt: skip
    api, _, home = deployed
    # 480 of the 810 blocks drawn at random, as the demo does (JumpStart's max_train_samples): drawing them must
    # leave the finished tokenize stage's folder as it was, or the second run would train again. 10 steps: what
    # is trained does not matter here. lean_lora: a line that the training process logs.
    sample = {"overrides": {"max_train_samples": 480, "max_steps": 10, "lean_lora": True,
                            "data.download_dir": str(tmp_path / "edgar")}}  # its own: downloaded from EDGAR here
    first = api.wait(api.custom_run(_params(tmp_path / "run", **sample)))
    assert first["state"]["type"] == "COMPLETED", _log_tail(home)
    assert api.stage_states(first["id"], ALL_STAGES) == {s: ["Completed"] for s in ALL_STAGES}
    assert any("/Archives/" in p for _, p, _ in edgar.requests)
    # This project's INFO lines are in the run's log in the UI, beside Prefect's own.
    logs = [(r["name"], r["message"]) for r in api.logs(first["id"], until=" as champion (")]
    assert any(n == "tasks.download" and m.startswith("EDGAR: 2 filing(s), ") for n, m in logs), logs
    assert any(n == "tasks.registry" and m.startswith("registered edgar-tune-10k v") for n, m in logs), logs
    # From the training process: its own lines, its progress in the log, and a progress bar on the train stage;
    # the download's bar on its stage.
    assert any(n == "tasks.finetune" and m.startswith("train.lean_lora: ") for n, m in logs), logs
    assert any(n == "tasks.finetune" and m.startswith("training: 10 of 10 steps (100%), ") for n, m in logs), logs
    found = api.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first["id"]]},
                                                         "type": {"any_": ["progress"]}}})  # fmt: skip
    bars = {b["description"].split("  \n")[0].strip("*"): b for b in found}
    assert {k: b["data"] for k, b in bars.items()} == {"EDGAR download": 100.0, "training": 100.0}, found
    for what, stage in (("EDGAR download", "download"), ("training", "train")):
        task_run = api.post("/task_runs/filter", {"task_runs": {"id": {"any_": [bars[what]["task_run_id"]]}}})
        assert task_run[0]["name"] == stage, task_run
    trained = (tmp_path / "run" / "04_train" / "stats.json").stat().st_mtime_ns
    if not (home / FIRST_RUN).exists():  # a base for the spread sweep below (`sweep_base`)
        shutil.copytree(tmp_path / "run", home / FIRST_RUN)
    # The result on the run's page in the UI: the summary, each held-out MD&A's perplexity, the data report.
    summary = first_summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    card, table, report = _result_artifacts(api, first["id"])
    assert card.startswith(f"**edgar-tune-10k v{summary['model_version']} @champion**: perplexity "
                           f"{summary['ppl_before']:.3f} → {summary['ppl_after']:.3f} "
                           f"({summary['ppl_change_pct']:+.1f}%) on held-out Item 7 (MD&A)"), card  # fmt: skip
    assert f"| MLflow | `{summary['mlflow_tracking_uri']}` |" in card and "| cached | none |" in card, card
    documents = json.loads((tmp_path / "run" / "05_evaluate" / "finetuned.json").read_text())["documents"]
    assert [(r["fiscal_year"], r["item"], r["tokens"], r["perplexity_after"]) for r in table] == [
        (d["fiscal_year"], d["item"], d["tokens"], round(d["perplexity"], 3)) for d in documents]  # fmt: skip
    assert report == (tmp_path / "run" / "03_tokenize" / "data_report.md").read_text()
    assert "| AMZN | 2021 | 0001018724-22-000005 | 7 | ok |" in report

    edgar.reset()
    # The folder moved (renamed, a disk mounted elsewhere) keeps its run: named by its path, it trained again.
    run = (tmp_path / "run").rename(tmp_path / "moved")
    second = api.wait(api.custom_run(_params(run, **sample)))
    assert second["state"]["type"] == "COMPLETED", _log_tail(home)
    assert api.stage_states(second["id"], ALL_STAGES) == {s: ["Cached"] for s in ALL_STAGES}
    assert edgar.requests == []  # not one HTTP call to EDGAR
    assert (run / "04_train" / "stats.json").stat().st_mtime_ns == trained  # no training
    summary = json.loads((run / "summary.json").read_text())
    assert summary["prefect_flow_run_id"] == second["id"] and set(summary["stages"].values()) == {"Cached"}
    assert (summary["run"], summary["model_version"]) == (str(run.resolve()), first_summary["model_version"])
    # in the model's timeline of runs (the UI's Artifacts page), the cached run's card beside the first one's
    card = _result_artifacts(api, second["id"])[0]
    assert f"| cached | {', '.join(ALL_STAGES)} |" in card, card
    runs = {"any_": [first["id"], second["id"]]}
    timeline = api.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["edgar-tune-10k-summary"]},
                                                            "flow_run_id": runs}})  # fmt: skip
    assert len(timeline) == 2, timeline

    third = api.wait(api.custom_run(_params(run, learning_rate=0.001, **sample)))
    assert third["state"]["type"] == "COMPLETED", _log_tail(home)
    states = api.stage_states(third["id"], ALL_STAGES)
    assert {s: states[s] for s in DATA_STAGES} == {s: ["Cached"] for s in DATA_STAGES}
    assert {s: states[s] for s in MODEL_STAGES} == {s: ["Completed"] for s in MODEL_STAGES}
    assert edgar.requests == []
    # An automation's event for each version registered (the first run's, the third's), none for the cached run's
    third_summary = json.loads((run / "summary.json").read_text())
    events = api.events("edgar-tune.model.registered", [first["id"], second["id"], third["id"]], expect=2)
    by_run = {next(r["prefect.resource.id"] for r in e["related"] if r["prefect.resource.role"] == "flow-run"): e
              for e in events}  # fmt: skip
    assert set(by_run) == {f"prefect.flow-run.{first['id']}", f"prefect.flow-run.{third['id']}"}, events
    event = by_run[f"prefect.flow-run.{third['id']}"]
    assert event["resource"] == {"prefect.resource.id": "edgar-tune.model.edgar-tune-10k",
                                 "prefect.resource.name": "edgar-tune-10k",
                                 "edgar-tune.version": third_summary["model_version"],
                                 "edgar-tune.alias": third_summary["model_alias"]}, event  # fmt: skip
    assert event["payload"]["ppl_after"] == third_summary["ppl_after"]
    assert by_run[f"prefect.flow-run.{first['id']}"]["resource"]["edgar-tune.alias"] == "champion"
    assert any(r["prefect.resource.role"] == "deployment" for r in event["related"]), event
    export_trigger_acts_on_a_new_champion_only(by_run[f"prefect.flow-run.{first['id']}"])
    # ... and the export-champion deployment, run by that trigger (Prefect's own) for each new champion, not for
    # the cached run: the folder holds the champion, merged, as `edgar-tune export` writes it.
    champions = [s for s in (first_summary, third_summary) if s["model_alias"] == "champion"]
    store = first_summary["mlflow_tracking_uri"]
    exports = api.exports(store, expect=len(champions))
    assert [r["state"]["type"] for r in exports] == ["COMPLETED"] * len(champions), _log_tail(home)
    held = json.loads((home / "exports" / "edgar-tune-10k" / "champion" / "edgar_tune.json").read_text())
    assert (held["version"], held["tracking_uri"], held["adapter"]) == (champions[-1]["model_version"], store, False)
    cards = api.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["edgar-tune-10k-export"]},
                                                         "flow_run_id": {"any_": [r["id"] for r in exports]}}})  # fmt: skip
    assert any(f"holds edgar-tune-10k v{held['version']} (merged, float32)" in c["data"] for c in cards), cards
    # A promotion from the UI (the promote deployment), of the version that is not the champion: the alias moves,
    # the version's record names the flow run and the reason, and its event starts the export of it.
    other = third_summary if champions[-1] is first_summary else first_summary
    made = api.post(f"/deployments/{api.deployment('promote')['id']}/create_flow_run",
                    {"parameters": {"version": other["model_version"], "reason": "a check of our own",
                                    "tracking_uri": store}})  # fmt: skip
    promoted = api.wait(made["id"])
    assert promoted["state"]["type"] == "COMPLETED", _log_tail(home)
    import mlflow

    client = mlflow.MlflowClient(store)
    assert str(client.get_model_version_by_alias("edgar-tune-10k", "champion").version) == other["model_version"]
    record = json.loads(client.get_model_version("edgar-tune-10k", other["model_version"]).tags["promoted_by_hand"])
    assert (record["by"], record["reason"]) == (f"Prefect flow run {promoted['name']}", "a check of our own"), record
    exports = api.exports(store, expect=len(champions) + 1)
    assert [r["state"]["type"] for r in exports] == ["COMPLETED"] * (len(champions) + 1), _log_tail(home)
    held = json.loads((home / "exports" / "edgar-tune-10k" / "champion" / "edgar_tune.json").read_text())
    assert held["version"] == other["model_version"]

    # `edgar-tune rerun STAGE --run FLOW_RUN_ID`: that stage and its dependents, nothing upstream; the other
    # perplexity through the cache, scored again here since the change moves its key, so that both use the same
    # windows. A change that no stage of the rerun makes is refused, by the flow (the UI's rerun deployment skips
    # the CLI's check), and config.yaml keeps what the run was made with.
    env = dict(os.environ, PREFECT_API_URL=api.http.base_url.__str__().rstrip("/"))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from edgar_tune.config import ConfigError
    from flows.pipeline import resolve_run

    # The first run's folder has moved: a rerun by its flow run's id says so, and makes no empty folder there.
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with pytest.raises(ConfigError, match=f"flow run {first['id']} wrote to {tmp_path / 'run'}, which is not "
                           r"there now \(moved or removed\); give the run folder where it is"):  # fmt: skip
            resolve_run(first["id"])
        assert resolve_run(third["id"]) == str(run)
        unknown = "01234567-89ab-cdef-0123-456789abcdef"  # a mistyped id, or one from another server
        with pytest.raises(ConfigError, match=f"the Prefect server at {env['PREFECT_API_URL']} has no flow run "
                           f"{unknown}; give the run folder"):  # fmt: skip
            resolve_run(unknown)
    with pytest.raises(ConfigError, match=f"run folder {tmp_path / 'nope'} does not exist; give the folder of a run"):
        resolve_run(str(tmp_path / "nope"))  # as the UI's rerun deployment passes it
    assert not (tmp_path / "run").exists() and not (tmp_path / "nope").exists()
    recorded = (run / "config.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "rerun", "train", "--run", third["id"], "--set",
                           "model.tiny_layers=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "`model.tiny_layers` is read by tokenize, which `rerun train` does not run" in proc.stderr, proc.stderr
    assert (run / "config.yaml").read_text() == recorded
    # A rerun by the flow run's id is one by its folder once resolve_run (above) found it; make test reruns by a
    # folder in test_pipeline_e2e.py and test_storage.py.
    if not rerun_by_id:
        return
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "rerun", "evaluate-base", "--run", third["id"],
                           "--set", "eval.stride=32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"] == {"download": "skipped", "parse": "skipped", "tokenize": "skipped",
                                 "evaluate-base": "Completed", "train": "skipped", "evaluate": "Completed",
                                 "register": "Completed"}  # fmt: skip
    rerun_states = api.stage_states(summary["prefect_flow_run_id"], ["evaluate-base", "evaluate", "register"])
    assert rerun_states == {"evaluate-base": ["Completed"], "evaluate": ["Completed"], "register": ["Completed"]}
    now = (run / "config.yaml").read_text()
    assert [yaml.safe_load(text)["eval"]["stride"] for text in (recorded, now)] == [64, 32]


def _result_artifacts(api: Api, run_id: str) -> tuple[str, list[dict], str]:
    """A flow run's result as the UI shows it: (summary markdown, per-document table rows, data report markdown)."""
    found = api.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]},
                                                         "type": {"any_": ["markdown", "table"]}}})  # fmt: skip
    keyed = {a["key"]: a["data"] for a in found if a["key"]}
    report = [a["data"] for a in found if not a["key"] and a["description"].startswith("data report of run ")]
    assert set(keyed) == {"edgar-tune-10k-summary", "edgar-tune-10k-perplexity"} and len(report) == 1, found
    table = keyed["edgar-tune-10k-perplexity"]
    return keyed["edgar-tune-10k-summary"], json.loads(table) if isinstance(table, str) else table, report[0]


@pytest.mark.slow
def test_the_season_schedule_retrains_when_a_10k_is_filed_and_only_then(deployed, edgar, tmp_path):
    """The after-10k-season deployment with its own parameters (each ticker's latest fiscal years, asked of EDGAR
    at every run), on the tiny model: a run before Amazon files its FY2021 10-K, one after, and one more."""
    api, _, home = deployed
    season = api.deployment("after-10k-season")
    # Its own download folder: other tests of this session download Amazon's 10-Ks into the shared cache.
    params = season["parameters"]["params"] | {"preset": "tiny", "out_dir": str(tmp_path / "run"),
                                               "overrides": {"max_steps": 10,
                                                             "data.download_dir": str(tmp_path / "edgar")}}
    assert params["latest_years"] == 2 and "fiscal_years" not in params

    def run() -> tuple[dict, dict]:
        made = api.post(f"/deployments/{season['id']}/create_flow_run", {"parameters": {"params": params}})
        done = api.wait(made["id"])
        assert done["state"]["type"] == "COMPLETED", _log_tail(home)
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        return api.stage_states(done["id"], ALL_STAGES), summary

    edgar.amzn_as_of("2022-01-01")  # FY2020 and FY2019 are the latest; FY2019's documents are not on this EDGAR
    states, first = run()
    assert states == {s: ["Completed"] for s in ALL_STAGES}
    assert [f["fiscal_year"] for f in first["filings"]] == [2020]
    v1 = int(first["model_version"])  # other tests of this server register under the same model name

    edgar.amzn_as_of("2022-03-01")  # Amazon files its FY2021 10-K
    edgar.requests.clear()
    states, second = run()
    assert states == {s: ["Completed"] for s in ALL_STAGES}
    assert [f["fiscal_year"] for f in second["filings"]] == [2020, 2021] and second["model_version"] == str(v1 + 1)
    assert sorted(p.rsplit("/", 1)[-1] for _, p, _ in edgar.requests if "/Archives/" in p) == [
        "0001018724-22-000005.txt", "amzn-20211231.htm"]  # fmt: skip

    edgar.requests.clear()  # nothing new on EDGAR: one look at the filings, nothing fetched, nothing retrained
    states, third = run()
    assert states == {"download": ["Completed"]} | {s: ["Cached"] for s in ALL_STAGES[1:]}
    assert [p for _, p, _ in edgar.requests if "/Archives/" in p] == []
    assert third["model_version"] == str(v1 + 1) and third["ppl_after"] == second["ppl_after"]


def _train_worker_pid(run: Path) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tasks.train_worker" in cmd and any(str(run).encode() in c for c in cmd):
            return int(proc.name)
    return None


def test_training_crash_fails_the_run_and_the_ui_retry_resumes_only_what_failed(deployed, tmp_path):
    api, _, home = deployed
    run = tmp_path / "run"
    params = _params(run, source="bundled", overrides={"train.save_steps": 20})
    run_id = api.custom_run(params)
    marker = run / "04_train.checkpoints" / "checkpoint-20" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert time.monotonic() < deadline, _log_tail(home)
        if int(time.monotonic() * 20) % 20 == 0:
            assert api.get(f"/flow_runs/{run_id}")["state"]["type"] not in TERMINAL, _log_tail(home)
        time.sleep(0.05)
    pid = _train_worker_pid(run)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    failed = api.wait(run_id)
    assert failed["state"]["type"] == "FAILED", failed["state"]
    message = failed["state"]["message"]
    assert "killed by SIGKILL" in message and "out-of-memory" in message and "resumes from checkpoint-" in message
    # The run's log in the UI says it once per record, without the traceback of Prefect's engine (a worker's run)
    logs = [r["message"] for r in api.logs(run_id, "Encountered exception")]
    assert any("killed by SIGKILL" in m for m in logs) and not any("Traceback" in m for m in logs), logs[-4:]

    # The UI's Retry: the same flow run back to Scheduled/AwaitingRetry; the worker runs it again.
    api.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True})
    done = api.wait(run_id)
    assert done["state"]["type"] == "COMPLETED", _log_tail(home)
    states = api.stage_states(run_id, ALL_STAGES)
    for stage in DATA_STAGES:  # ran once, then found in the cache
        assert states[stage] == ["Completed", "Cached"], (stage, states)
    assert states["train"] == ["Failed", "Completed"]
    assert states["evaluate"] == states["register"] == ["Completed"]
    stats = json.loads((run / "04_train" / "stats.json").read_text())
    assert stats["resumed_from_step"] >= 20 and stats["steps"] == 60

    # MLflow drew both trainings' curves as they came: the killed one is FAILED with the steps it had made; the
    # registration completed the resumed one's, with the steps from before the crash, each step once.
    import mlflow

    summary = json.loads((run / "summary.json").read_text())
    client = mlflow.MlflowClient(summary["mlflow_tracking_uri"])
    trainings = client.search_runs([client.get_experiment_by_name("edgar-tune").experiment_id],
                                   filter_string="tags.`edgar_tune.training` = 'true'", order_by=["start_time ASC"])
    mine = [r for r in trainings if r.data.tags["prefect_flow_run_id"] == run_id]
    assert [r.info.status for r in mine] == ["FAILED", "FINISHED"], [(r.info.run_id, r.info.status) for r in mine]
    killed = [m.step for m in client.get_metric_history(mine[0].info.run_id, "train_loss")]
    assert killed and killed == sorted(set(killed)) and killed[-1] >= 20
    assert mine[1].info.run_id == stats["mlflow_run_id"] == summary["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(mine[1].info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 61)), steps


def test_concurrent_runs_share_the_prefect_edgar_rate_limit(deployed, edgar_server, edgar, tmp_path):
    api, env, _ = deployed
    _, base = edgar_server
    jobs = [("AAPL", 1996), ("EBAY", 2020), ("META", 2024), ("AMZN", 2021)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.download_child", base, str(tmp_path / t), t, str(y),
                               "--flow"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for t, y in jobs]  # fmt: skip
    for p in procs:
        out = p.communicate(timeout=300)[0].decode(errors="replace")
        assert p.returncode == 0, out[-3000:]
    limit = api.get("/v2/concurrency_limits/sec-edgar")
    assert (limit["limit"], limit["slot_decay_per_second"]) == (1, 10.0)
    times = sorted(t for t, _, _ in edgar.requests)
    assert len(times) >= 15
    # Four processes, each limited to 10/s on its own, would send up to 40/s; the shared limit keeps all of them
    # together near 10/s: any 11 consecutive arrivals span about 1 s (some slack for a loaded 2-core machine).
    assert min(b - a for a, b in zip(times, times[10:])) >= 0.8


@pytest.mark.slow
def test_a_cancel_in_the_ui_stops_the_training_with_a_checkpoint_the_retry_resumes_from(deployed, tmp_path):
    """The UI's Cancel on a run that trains: the worker stops the flow run's process group. Before, that took the
    training process down by SIGTERM's default, and the steps since the last checkpoint (train.save_steps) were
    lost; now the training process has a group of its own, the train stage stops it, and it stops at the end of
    the step it is in, with a checkpoint of that step. The run ends Cancelled either way."""
    import re

    api, _, home = deployed
    run = tmp_path / "run"
    run_id = api.custom_run(_params(run, source="bundled", overrides={"train.save_steps": 20, "train.max_steps": 400}))
    marker = run / "04_train.checkpoints" / "checkpoint-20" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert time.monotonic() < deadline, _log_tail(home)
        time.sleep(0.05)
    pid = _train_worker_pid(run)
    assert pid is not None
    asked = time.monotonic()
    api.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING"}, "force": True})  # the UI's Cancel
    ended = api.wait(run_id, timeout=180)
    took = time.monotonic() - asked
    assert ended["state"]["type"] == "CANCELLED", (ended["state"], _log_tail(home))
    assert not Path(f"/proc/{pid}").exists(), "the training process outlived the cancelled run"
    logs = "\n".join(r["message"] for r in api.logs(run_id, "training stops after step"))
    stopped = re.search(r"training stops after step (\d+) of 400", logs)
    assert stopped and 20 < int(stopped[1]) < 400, logs[-3000:]
    assert (run / "04_train.checkpoints" / f"checkpoint-{stopped[1]}" / "COMPLETE").exists()
    assert took < 60, took


def test_the_uis_cancel_outside_the_training_ends_the_run_cancelled_not_crashed(deployed, tmp_path):
    """The UI's Cancel of a run while it parses or tokenizes: `Cancelled`. The worker asks the flow run's process
    before it sends the SIGTERM, and the process says yes only where Prefect's own SIGTERM handler is installed;
    edgar-tune's flows wrapped it (edgar_tune/signals.py), and such a run ended `Crashed`."""
    api, _, home = deployed
    run_id = api.custom_run(_params(tmp_path / "run", source="bundled"))
    deadline = time.monotonic() + 240
    while True:
        states = {t["name"]: (t["state"] or {}).get("type")
                  for t in api.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})}  # fmt: skip
        if "RUNNING" in (states.get("parse"), states.get("tokenize")):
            break
        assert time.monotonic() < deadline and "train" not in states, (states, _log_tail(home))
        time.sleep(0.1)
    api.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
    ended = api.wait(run_id, timeout=120)
    assert ended["state"]["type"] == "CANCELLED", (states, ended["state"], _log_tail(home))


def _point_runs(api: Api, sweep_id: str) -> list[dict]:
    """The flow runs of the sweep-point deployment that the sweep's flow run `sweep_id` queued (its subflows)."""
    dep = api.deployment("sweep-point")
    runs = api.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}, "sort": "START_TIME_ASC"})
    parents = {tr["id"] for tr in api.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [sweep_id]}}})}
    return [r for r in runs if r["parent_task_run_id"] in parents]


@pytest.fixture
def sweep_base(deployed, request, tmp_path) -> Path:
    """A finished tiny run to sweep from, at `tmp_path/latest`: a copy of the first run that
    test_same_parameters_twice_... made through the worker (this file runs in its order), else of the tiny run (made
    for it where that test did not run: 45 s)."""
    _, _, home = deployed
    source = home / FIRST_RUN
    if not source.is_dir():
        runs, _ = request.getfixturevalue("tiny_run")
        source = runs / "latest"
    shutil.copytree(source, tmp_path / "latest")
    return tmp_path / "latest"


def test_a_sweep_spread_over_the_pool_runs_its_points_at_once(deployed, sweep_base, tmp_path):
    """The sweep deployment run from the UI with `spread`: each point is a flow run of the sweep-point deployment,
    queued by the sweep's run (its subflow in the UI) and run by the pool's worker, side by side; the comparison is
    the one a sweep in one process makes. Pruned points, `at_once` and the UI's Cancel of a spread sweep: the slow
    test below."""
    import mlflow

    api, _, home = deployed
    start = _spread_sweep(api, sweep_base)

    # validating every 5 steps: the first run made through the worker trains 10, past no validation at 20
    sweep_id = start({"train.learning_rate": [0.01, 0.03], "train.eval_steps": [5]})
    ended = api.wait(sweep_id)
    assert ended["state"]["type"] == "COMPLETED", (ended["state"], _log_tail(home))
    runs = _point_runs(api, sweep_id)
    points = {r["name"]: r for r in runs}
    new = ["latest+learning_rate=0.01+eval_steps=5", "latest+learning_rate=0.03+eval_steps=5"]
    assert sorted(r["name"] for r in runs) == new, runs  # each once (a request made again makes no second run)
    assert {r["state"]["type"] for r in runs} == {"COMPLETED"}
    assert all(r["work_pool_name"] == "edgar-tune" for r in points.values())
    # side by side: each started before any ended
    assert max(r["start_time"] for r in points.values()) < min(r["end_time"] for r in points.values()), points
    for name in new:
        stages = json.loads((tmp_path / name / "summary.json").read_text())["stages"]
        assert stages == {"download": "skipped", "parse": "Cached", "tokenize": "Cached", "evaluate-base": "Cached",
                          "train": "Completed", "evaluate": "Completed", "register": "Completed"}, (name, stages)
    table = _artifact(api, sweep_id, "edgar-tune-sweep")
    assert table.count("train, evaluate, register") == 2, table
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("edgar-tune")
    (found,) = client.search_runs([exp.experiment_id], "tags.`edgar_tune.sweep.role` = 'sweep'")
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{found.info.run_id}'")
    assert sorted(r.data.params["train.learning_rate"] for r in nested) == ["0.01", "0.03"]


def _spread_sweep(api: Api, base: Path):
    """`start(grid, **params)`: the sweep deployment's flow run over `base`, spread over the pool; its id."""
    sweep = api.deployment("sweep")

    def start(grid: dict, **params) -> str:
        return api.post(f"/deployments/{sweep['id']}/create_flow_run",
                        {"parameters": {"run": str(base), "grid": grid, "spread": "sweep-point"} | params})["id"]

    return start


@pytest.mark.slow  # about 130 s: make test-slow (make test prunes a sweep, and cancels a run from the UI)
def test_a_spread_sweep_prunes_a_weak_point_on_the_pool_and_a_cancel_stops_its_points(deployed, sweep_base, tmp_path):
    """A spread sweep pruned: with a point above finished, one far too low stops at its first validation, its flow
    run `Pruned` on the worker, read back by the sweep, which ends Completed. A point still training counts too, by
    its curve so far: a weak point is pruned against one that trains on the pool beside it. The UI's Cancel on a
    spread sweep cancels the points it queued: nothing trains on for a sweep that is gone."""
    from tasks.pruning import LIVE

    api, _, home = deployed
    start = _spread_sweep(api, sweep_base)
    assert api.wait(start({"train.learning_rate": [0.01], "train.eval_steps": [5]}))["state"]["type"] == "COMPLETED"
    sweep_id = start({"train.learning_rate": [0.01, 1e-5], "train.eval_steps": [5]}, prune=True, prune_min_points=1,
                     prune_warmup=0)
    assert api.wait(sweep_id)["state"]["type"] == "COMPLETED", _log_tail(home)
    weak = next(r for r in _point_runs(api, sweep_id) if r["name"] == "latest+learning_rate=1e-05+eval_steps=5")
    assert (weak["state"]["type"], weak["state"]["name"]) == ("COMPLETED", "Pruned"), (weak["state"], _log_tail(home))
    pruned = json.loads((tmp_path / weak["name"] / "pruned.json").read_text())
    assert pruned["prefect_flow_run_id"] == weak["id"] and pruned["step"] == 5
    table = " ".join(_artifact(api, sweep_id, "edgar-tune-sweep").split())
    assert f"pruned at step 5/{pruned['planned_steps']}:" in table, table

    # at_once=1: one point at a time, its first a long training under the rule, which keeps its curve so far.
    long = {"train.eval_steps": [5], "train.max_steps": [5000], "train.early_stopping_patience": [0]}
    sweep_id = start({"train.learning_rate": [0.01, 0.07]} | long, at_once=1, prune=True)
    name = "latest+learning_rate={}+eval_steps=5+max_steps=5000+early_stopping_patience=0"
    strong, slow, weak = (tmp_path / name.format(lr) for lr in ("0.01", "0.07", "1e-05"))
    deadline = time.monotonic() + 240
    while not (strong / LIVE).is_file() or not (strong / LIVE).read_text():
        assert time.monotonic() < deadline, _log_tail(home)
        time.sleep(0.5)
    # Another sweep over that point and a weak one, while it trains: the weak one, at its first validation, stands
    # behind the strong one's curve so far by the same tokens, and stops (its point there waits for the folder).
    beside = start({"train.learning_rate": [1e-5, 0.01]} | long, prune=True, prune_min_points=1, prune_warmup=0)
    while not (weak / "pruned.json").is_file():
        assert time.monotonic() < deadline + 240, _log_tail(home)
        time.sleep(0.5)
    pruned = json.loads((weak / "pruned.json").read_text())
    assert (pruned["step"], list(pruned["peers"]), pruned["training"]) == (5, [strong.name], [strong.name]), pruned
    api.post(f"/flow_runs/{beside}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
    assert api.wait(beside, timeout=120)["state"]["type"] == "CANCELLED", _log_tail(home)

    # The UI's Cancel of the first sweep while its first point trains: that point's flow run is cancelled too, the
    # sweep ends Cancelled, and its second point is never queued nor its folder made.
    (running,) = [r for r in _point_runs(api, sweep_id) if r["state"]["type"] == "RUNNING"]
    api.post(f"/flow_runs/{sweep_id}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
    assert api.wait(sweep_id, timeout=120)["state"]["type"] == "CANCELLED", _log_tail(home)
    point = api.wait(running["id"], timeout=120)
    assert point["state"]["type"] == "CANCELLED", (point["state"], _log_tail(home))
    assert [r["name"] for r in _point_runs(api, sweep_id)] == [strong.name]
    assert not slow.exists()


def _artifact(api: Api, run_id: str, key: str) -> str:
    found = api.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}}})
    assert len(found) == 1, found
    return found[0]["data"]
