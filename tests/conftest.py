"""Shared fixtures: an isolated environment per test session and the loopback EDGAR server."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="edgar-tune-tests-"))
# Registered before Prefect is imported, so it runs after Prefect's own exit handlers stop its server.
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)

# Set before anything imports Prefect or MLflow: no telemetry, no hub, state kept out of the user's home.
os.environ.update(
    PREFECT_HOME=str(_SESSION_TMP / "prefect"),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="1",
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    EDGAR_TUNE_CACHE=str(_SESSION_TMP / "cache"),
)
# `make test` runs two pytest-xdist workers: each one's torch (and every process it starts) takes its share of the
# cores, or two workers training at once would run twice as many threads as there are cores.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
# SmolLM2 converted from its wheel's GGUF (25 to 35 s of CPU) once for the whole suite, not once per xdist worker:
# each worker's cache keeps it in a folder of the first process's session (the controller's, which the workers'
# environment comes from), where the conversion's own lock has a second taker wait for the first. Nothing else of
# the cache is shared.
_SHARED = Path(os.environ.setdefault("EDGAR_TUNE_TEST_SHARED", str(_SESSION_TMP / "shared")))
(_SHARED / "models").mkdir(parents=True, exist_ok=True)
(_SESSION_TMP / "cache").mkdir()
(_SESSION_TMP / "cache" / "models").symlink_to(_SHARED / "models")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("EDGAR_IDENTITY", None)

# A suite started in the background by a non-interactive shell (`make test &`, some CI runners) has SIGINT ignored,
# and every server and worker it starts would inherit that: the Prefect worker, stopped with SIGINT, then ignores
# it and is killed after its grace period. A caught signal is back to its default in a child after exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# Seconds each test file took on 2 cores (its tests' setup and calls, from a fresh clone's `make test` with
# --junitxml on 2026-12-06, 2206 s in all, the spread sweep's test and those added after it estimated), for
# `make test`'s order: pytest-xdist's `--dist loadfile` hands each worker a whole file when it is almost done with
# the one before, and by default takes the files with the most tests first. That left the 6 tests of
# test_prefect_server.py (9 minutes) for last, on one worker, while the other had nothing left: pytest took 28
# minutes where an even split of the work was 25 minutes a worker. The Makefile turns xdist's order off
# (--no-loadscope-reorder) and this one takes its place: the longest files first. A file not listed yet goes first
# (it may be long: a long file handed out last costs minutes, a short one handed out first nothing); the figures
# need only be roughly right.
FILE_SECONDS = {
    "test_serving": 442, "test_pipeline_e2e": 400, "test_prefect_server": 380, "test_resume": 190, "test_textdata": 168,
    "test_storage": 156, "test_registry": 112, "test_memory": 86, "test_speed_options": 86, "test_config": 78,
    "test_kernels": 60, "test_sweep": 100, "test_deepspeed": 38, "test_download": 21, "test_sections": 15,
    "test_lora_targets": 9, "test_io": 6, "test_perplexity": 6, "test_progress": 2, "test_datareport": 2,
    "test_makefile": 2, "test_prefect_yaml": 1, "test_cache": 1, "test_blocks": 1, "test_allocator": 1,
}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest test files first (FILE_SECONDS; one not listed before them all), each file's tests in their
    own order."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.stem, float("inf")))


@pytest.fixture(scope="session")
def edgar_server():
    """The loopback EDGAR: (FakeEdgar, base URL). Started once per test session."""
    from tests import edgar_server as es

    server, edgar, base = es.start()
    yield edgar, base
    server.shutdown()


@pytest.fixture
def edgar(edgar_server, monkeypatch):
    """Point sec-edgar-downloader's base URLs (and only those) at the loopback EDGAR."""
    from sec_edgar_downloader import _orchestrator, _sec_gateway

    fake, base = edgar_server
    fake.reset()
    monkeypatch.setattr(_sec_gateway, "URL_CIK_MAPPING", f"{base}/files/company_tickers_exchange.json")
    monkeypatch.setattr(_orchestrator, "URL_SUBMISSIONS", f"{base}/submissions/{{submission}}")
    monkeypatch.setattr(_orchestrator, "URL_FILING", f"{base}/Archives/edgar/data/{{cik}}/{{acc_num_no_dash}}/{{document}}")
    yield fake
    fake.reset()


@pytest.fixture(scope="session")
def amzn_files() -> list[Path]:
    root = REPO / "data" / "sec-edgar-filings" / "AMZN" / "10-K"
    return sorted(root.glob("*/primary-document.html.gz"))


_MIGRATED = _SESSION_TMP / "prefect-migrated"
_migrating = threading.Lock()


def migrated_prefect_home(home: Path) -> Path:
    """`home`, made, as a PREFECT_HOME whose database is a copy of one this test process migrated once: a Prefect
    server's first start in a new home migrates its database (an embedded server took 29.8 s to answer in a new home
    here, 10.3 s in a migrated one), and the suite starts a server in a new home about ten times. The migration is
    Prefect's own (`prefect server database upgrade`); `make demo` on a new machine runs the one a first start makes."""
    with _migrating:
        if not (_MIGRATED / "prefect.db").exists():
            tmp = _SESSION_TMP / ".prefect-migrating"
            shutil.rmtree(tmp, ignore_errors=True)
            prefect = str(Path(sys.executable).parent / "prefect")
            proc = subprocess.run([prefect, "server", "database", "upgrade", "-y"], capture_output=True, text=True,
                                  env=dict(os.environ, PREFECT_HOME=str(tmp)), timeout=600)  # fmt: skip
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            tmp.rename(_MIGRATED)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():
        shutil.copy(_MIGRATED / "prefect.db", home / "prefect.db")
    return home


def run_cli(runs: Path, *args: str, timeout: int = 900, env: dict | None = None) -> dict:
    """`edgar-tune run --preset tiny ARGS` in a subprocess with its own Prefect home; returns summary.json, and
    leaves what it printed in `runs/run.log`.

    Without PREFECT_API_URL in `env` the run starts its own embedded Prefect (as `make demo` does, ~10 s);
    tests that only need a Prefect pass the session's server (`env=prefect_server`)."""
    env = {**os.environ, "PREFECT_HOME": str(runs / ".prefect"), **(env or {})}
    if "PREFECT_API_URL" not in env:
        migrated_prefect_home(runs / ".prefect")
    proc = subprocess.run(
        [sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out", str(runs / "latest"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    (runs / "run.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "edgar-tune run summary" in proc.stdout + proc.stderr
    assert "LOAD_GLOBAL" not in proc.stdout + proc.stderr, "a library's captured bytecode reached the run's log"
    assert (proc.stdout + proc.stderr).count("memory plan per device (") <= 1, "the same plan printed twice"
    assert "in the folders it only reads" not in proc.stdout + proc.stderr, "a stage changed its inputs"
    return json.loads((runs / "latest" / "summary.json").read_text())


def free_port() -> int:
    from tasks.finetune import _free_port

    return _free_port()


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll `url` until it answers 200; fail early if the server process died."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


OUR_PACKAGES = ("tasks", "edgar_tune", "kernels", "flows")


@pytest.fixture(autouse=True)
def _process_as_it_was():
    """What a test changes in this process and later tests would inherit, put back:
    - mlflow.set_tracking_uri (a test reading a run's store) also exports MLFLOW_TRACKING_URI, which the runs later
      tests start would take for the user's store;
    - mlflow.pyfunc.load_model of a registered version puts the version's copy of `tasks/` and `edgar_tune/` first
      on sys.path and drops these modules from sys.modules, so later imports load the copies, whose REPO_ROOT has
      no presets."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    path = list(sys.path)
    ours = {k: m for k, m in sys.modules.items() if k.split(".")[0] in OUR_PACKAGES}  # the repo's own, by now
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != uri:
        import mlflow

        mlflow.set_tracking_uri(uri)
    if sys.path != path:
        sys.path[:] = path
        copies = [k for k, m in sys.modules.items() if k.split(".")[0] in OUR_PACKAGES
                  and not Path(getattr(m, "__file__", None) or REPO).resolve().is_relative_to(REPO)]  # fmt: skip
        for name in copies:
            del sys.modules[name]
        sys.modules.update(ours)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, prefect_server) -> tuple[Path, dict]:
    """The plain (no DeepSpeed) tiny run, shared by the end-to-end and DeepSpeed tests; it profiles its step 30.
    On the session's Prefect server (which its worker starts anyway): an embedded one costs about 10 s more, and
    the tests that start one say what they check of it."""
    runs = tmp_path_factory.mktemp("runs")
    return runs, run_cli(runs, "--set", "train.profile_step=30", env=prefect_server)


@contextlib.contextmanager
def running_prefect_server(home: Path, **settings: str) -> Iterator[dict]:
    """A real Prefect server on loopback, its state in `home`, with `settings` (PREFECT_... variables) over those
    of `make server`: yields the env its clients need."""
    from tasks.limits import LEASE_STORAGE

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_UI_API_URL=api,
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")  # fmt: skip
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASE_STORAGE)  # as `make server` keeps them
    env.update(settings)
    migrated_prefect_home(home)
    log = open(home / "server.log", "wb")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        wait_http(f"{api}/health", proc, timeout=180)
        yield {"PREFECT_API_URL": api}
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # the whole group: SIGTERM to the parent leaves a child on the port
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on loopback, started once per test session: yields the env its clients need."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as env:
        yield env


def promoted_events(api: str, model: str, tracking_uri: str, count: int) -> list[dict]:
    """The `edgar-tune.model.promoted` events of `model` in the MLflow store `tracking_uri` (other tests' promote on
    the same server too) that the Prefect server at `api` holds, once it holds `count` of them (within 60 s)."""
    import time

    import httpx

    from flows.artifacts import HAND_PROMOTED

    ours: list[dict] = []
    deadline = time.monotonic() + 60
    while len(ours) < count and time.monotonic() < deadline:  # events reach the server's store in batches
        time.sleep(0.5)
        query = {"filter": {"event": {"name": [HAND_PROMOTED]}, "resource": {"id": [f"edgar-tune.model.{model}"]}}}
        found = httpx.post(f"{api}/events/filter", json=query | {"limit": 50}).json()
        ours = [e for e in found["events"] if e["payload"]["mlflow_tracking_uri"] == tracking_uri]
    return ours


def export_trigger_acts_on_a_new_champion_only(champion: dict) -> None:
    """The trigger of prefect.yaml's export-champion deployment (the one the README shows), read by Prefect's own
    models, covers this event of a new champion (as a Prefect server's events API returns it; Prefect's
    server-side matching) and not the same event of another alias, and renders the model and the MLflow store as
    the flow's parameters."""
    import re

    import yaml
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    spec = next(d for d in deployments if d["name"] == "export-champion")["triggers"][0]
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"prefect.yaml's `export-champion` deployment:\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    assert yaml.safe_load(snippet)["triggers"][0] == spec  # the README shows what is deployed
    deployment_only = {"name", "description", "enabled", "parameters", "job_variables", "schedule_after"}
    dumped = DeploymentEventTrigger.model_validate(spec).model_dump(exclude=deployment_only)
    trigger = EventTrigger.model_validate(dumped)
    seen = ReceivedEvent.model_validate(champion)
    assert trigger.covers(seen), (spec, champion)
    for alias in ("challenger", "production"):
        other = champion | {"resource": champion["resource"] | {"edgar-tune.alias": alias}}
        assert not trigger.covers(ReceivedEvent.model_validate(other)), alias
    jinja = ImmutableSandboxedEnvironment()
    rendered = {k: jinja.from_string(v).render(event=seen) for k, v in spec["parameters"].items()}
    assert rendered == {"model": champion["resource"]["prefect.resource.name"],
                        "tracking_uri": champion["payload"]["mlflow_tracking_uri"]}  # fmt: skip


def two_versions(tiny_run, tmp_path: Path) -> tuple:
    """A copy of the tiny run's MLflow store in `tmp_path` (its aliases may move there), its registered model with
    a second version of the same weights: (client, model name, the run's version, the second one)."""
    import sqlite3

    import mlflow

    from tasks.registry import tracking_at

    _, s = tiny_run
    with contextlib.closing(sqlite3.connect(s["mlflow_tracking_uri"].removeprefix("sqlite:///"))) as db:
        with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as copy:
            db.backup(copy)  # what the WAL holds too; the artifacts stay the run's
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name, first = s["registered_model"], s["model_version"]
    mv = client.get_model_version(name, first)
    with tracking_at(client.tracking_uri):  # MLflow finds the logged model of `mv.source` in the fluent API's store
        second = str(client.create_model_version(name, mv.source, run_id=mv.run_id, tags=mv.tags).version)
    return client, name, first, second


def train_variants(tiny_run, tmp_path: Path, variants: dict[str, dict], steps: int = 6,
                   max_val_samples: int = 16) -> dict:  # fmt: skip
    """The train stage's function (`tasks.finetune.train`, in this process) for `steps` steps on the tiny run's
    blocks that span documents, once per variant of train settings: {name: (stats, losses)}. Validation
    (eval_steps in a variant) scores `max_val_samples` held-out blocks."""
    from edgar_tune.config import EvalConfig, TrainConfig
    from tasks.finetune import train

    runs, _ = tiny_run
    tok = tmp_path / "03_tokenize"
    _blocks_that_span_documents(runs / "latest" / "03_tokenize", tok)
    out = {}
    for name, settings in variants.items():
        defaults = dict(mode="lora", max_steps=steps, logging_steps=1, eval_steps=0, early_stopping_patience=0,
                        load_best_model_at_end=False, save_steps=0, memory_check="off")  # fmt: skip
        cfg = TrainConfig(**defaults | settings)
        stats = train(tmp_path / name, tok, cfg, EvalConfig(max_val_samples=max_val_samples), tmp_path / f"{name}.ckpt")
        losses = [json.loads(x)["loss"] for x in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
        out[name] = stats, losses
    return out


def _blocks_that_span_documents(src: Path, dst: Path) -> None:
    """A copy of a tokenize stage keeping only the blocks with an end-of-document inside (most of the tiny run's
    128-token blocks lie inside one Item), so that the document mask has something to mask."""
    from datasets import load_from_disk

    from tasks.models import base_model_path
    from tasks.models import load_tokenizer

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train"))
    eos = load_tokenizer(str(base_model_path(src))).eos_token_id
    # kept in memory: datasets would write the filter's cache file into the shared tiny run's 03_tokenize
    blocks = load_from_disk(str(src / "train")).filter(lambda row: eos in row["input_ids"][:-1], keep_in_memory=True)
    assert len(blocks) >= 8
    blocks.save_to_disk(str(dst / "train"))
    stats = json.loads((dst / "stats.json").read_text())
    (dst / "stats.json").write_text(json.dumps(stats | {"train_blocks": len(blocks)}))


def lock_holder(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start `tests/lock_holder.py ARGS` (a run, or a store's registrations), its output on a pipe; it lets go of
    what it holds when its stdin closes. It leads a process group of its own (`kill_group`)."""
    return subprocess.Popen([sys.executable, "-m", "tests.lock_holder", *args], cwd=REPO,
                            env=dict(os.environ, **(env or {})), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of `proc`'s process group: a SIGKILLed flow run's embedded Prefect server (a uvicorn
    child) outlives it, holding its port, until then."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def lines_until(proc: subprocess.Popen, *starts: str) -> list[str]:
    """The lines `proc` printed up to the first that starts with one of `starts`, that one included (a
    `lock_holder`'s: this project's log lines, Prefect's when it holds from a flow run, then `held`); fails with
    what it printed if it ends before."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(starts):
            return seen
    raise AssertionError("".join(seen)[-3000:])


@contextlib.contextmanager
def held_elsewhere(*args: str, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """Another process holds what `tests/lock_holder.py ARGS` names until the block ends."""
    proc = lock_holder(*args, env=env)
    try:
        assert lines_until(proc, "held")[-1] == "held\n"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def run_held(run: str, flow_run: str, env: dict | None = None) -> contextlib.AbstractContextManager[subprocess.Popen]:
    """Another process holds the run (a folder or s3:// URL) as a run in it would."""
    return held_elsewhere("run", run, flow_run, env=env)
