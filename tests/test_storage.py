"""Runs under an s3:// URL (moto's S3 server on loopback): the run folder and Prefect's results live in the
bucket, and a second worker with an empty disk finds every stage there, Cached."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from edgar_tune.config import ConfigError, load_config
from tasks.sections import parse_filing
from tasks.stages import download_filings, extract_sections  # imports Prefect, which sets up logging, before caplog
from tasks.textdata import SourceChanged, data_files
from tests.conftest import REPO, lines_until, lock_holder, run_held


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir("edgar-runs")
    yield fs, env
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_s3_run_is_shared_by_workers_through_the_bucket(s3, prefect_server, tmp_path):
    fs, aws = s3
    url = "s3://edgar-runs/runs/amzn"
    first = dict(os.environ, **aws, **prefect_server, EDGAR_TUNE_CACHE=str(tmp_path / "worker1"))
    tiny = ("run", "--preset", "tiny", "--set", "max_steps=10", "--out", url)  # what is trained does not matter here
    proc = _run(first, *tiny)
    assert "memory plan per device" in proc.stdout + proc.stderr
    summary = json.loads(fs.cat_file(f"{url}/summary.json"))
    assert summary["run"] == url and set(summary["stages"].values()) == {"Completed"}
    pointer = json.loads(fs.cat_file(f"{url}/04_train.json"))
    assert fs.exists(f"{url}/04_train@{pointer['version']}/adapter/adapter_model.safetensors")
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(url)} >= {"config.yaml", "01_download.json", "05_evaluate.json",
                                                          "06_register.json", "summary.json", ".stages"}  # fmt: skip
    assert any(p.rsplit("/", 1)[-1].startswith("edgar-tune-train-") for p in fs.ls("edgar-runs/runs/.prefect-results"))
    assert not fs.exists(f"{url}/.lease.json")  # held while the run worked, let go of at its end

    # A second worker, nothing on its disk: every stage is found in the bucket and Prefect's S3 results.
    second = dict(first, EDGAR_TUNE_CACHE=str(tmp_path / "worker2"))
    proc = _run(second, *tiny)
    summary = json.loads(fs.cat_file(f"{url}/summary.json"))
    assert set(summary["stages"].values()) == {"Cached"}, summary["stages"]
    assert "memory plan per device" not in proc.stdout + proc.stderr  # training is cached: nothing to plan
    assert summary["run_dir"].startswith(str(tmp_path / "worker2"))  # its own working copy, pulled from S3

    # Rerunning one stage there publishes a new version of that folder and drops the old one.
    before = json.loads(fs.cat_file(f"{url}/05_evaluate.json"))["version"]
    _run(second, "rerun", "evaluate", "--run", url)
    after = json.loads(fs.cat_file(f"{url}/05_evaluate.json"))["version"]
    assert after != before  # the new scores carry new timings
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(url) if "/05_evaluate@" in p] == [f"05_evaluate@{after}"]
    assert json.loads(fs.cat_file(f"{url}/summary.json"))["stages"]["evaluate"] == "Completed"


def test_a_run_folder_has_one_name_on_every_worker(tmp_path, monkeypatch):
    """What tags a training's MLflow run with its folder (so that the next training there ends one a dead machine left
    RUNNING): an s3:// run's working copy is named after its URL, the same on every worker; a local folder is this
    host's path."""
    import socket

    from tasks.storage import RunFolder, folder_identity

    names = set()
    for worker in ("worker1", "worker2"):
        monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / worker))
        names.add(folder_identity(RunFolder.open("s3://edgar-runs/amzn/").local))
    assert len(names) == 1 and names.pop().startswith("s3-run:") and names == set()
    assert folder_identity(RunFolder.open("s3://edgar-runs/msft").local) != folder_identity(
        RunFolder.open("s3://edgar-runs/amzn").local)  # fmt: skip
    assert folder_identity(tmp_path / "run") == f"{socket.gethostname()}:{tmp_path / 'run'}"


def test_a_run_folder_that_cannot_be_made_says_what_to_give(tmp_path):
    """`--out` under a file, or a URL edgar-tune cannot write to: a one-line error naming it (they ended the run in
    a NotADirectoryError's or ValueError's traceback), and nothing made."""
    from tasks.storage import RunFolder

    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(ConfigError, match=re.escape(f"run folder {tmp_path}/notes.txt/run cannot be made (Not a "
                                                    "directory: ") + r".*\); give --out \(the flow's out_dir\)"):
        RunFolder.open(str(tmp_path / "notes.txt" / "run"))
    with pytest.raises(ConfigError, match="run folder 'http://host/runs/a': give a local folder or an s3:// URL"):
        RunFolder.open("http://host/runs/a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_folder_of_the_users_files_is_not_made_a_run_folder(tmp_path):
    """`--out .` in a project folder, or `--out ""` (an unset variable: the current folder), wrote config.yaml
    (over the user's own), summary.json and six stage folders among the files there: refused before Prefect starts,
    saying what the folder holds, with nothing written. The UI's out_dir is checked by the flow alike."""
    from tasks.storage import check_run_folder

    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine: true\n")
    for out, said in ((".", f"run folder {project} holds files of no run (config.yaml), which a run's config.yaml "
                            "and stage folders would land among; give --out (the flow's out_dir) a new or empty "
                            "folder, or a run's, as runs/NAME"),
                      ("", "--out (the flow's out_dir) is empty, which is the current folder; give the run a folder")):
        proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out", out],
                              cwd=project, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and f"edgar-tune: error: {said}" in proc.stderr, proc.stderr[-2000:]
        assert "prefect" not in proc.stderr.lower()
    assert [p.name for p in project.iterdir()] == ["config.yaml"] and (project / "config.yaml").read_text() == (
        "mine: true\n")  # fmt: skip
    (tmp_path / "empty").mkdir()
    for taken in (tmp_path / "empty", tmp_path / "new", "s3://bucket/runs/a"):  # as a run folder's: test_resume
        check_run_folder(str(taken))


def test_the_champion_exported_to_s3_is_whole_wherever_its_pointer_points(s3, tiny_run, tmp_path, monkeypatch):
    """export-champion with `out` an s3:// URL (workers on several hosts, serving from S3): each version under its
    own prefix, the provenance uploaded last; the pointer switched to it once it is whole; the same champion again
    uploads nothing; a rollback to the version before is a pointer switch; older prefixes are deleted. Each form
    (dtype, GGUF, the base) has a prefix of its own."""
    from flows.export import edgar_tune_export
    from tasks.export import export_alias
    from tests.conftest import two_versions

    fs, _ = s3
    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    client, name, first, second = two_versions(tiny_run, tmp_path)
    out = f"s3://edgar-runs/exports/{name}/champion"

    def pointer() -> dict:
        return json.loads(fs.cat_file(f"{out}.json"))

    done = edgar_tune_export.fn(name, "champion", "s3://edgar-runs/exports/{model}/{alias}", client.tracking_uri)
    assert (done["version"], done["written"], done["url"]) == (first, True, f"{out}@v{first}-merged")
    assert pointer()["url"] == done["url"] and pointer()["version"] == first
    files = {f.rsplit("/", 1)[-1] for f in fs.find(done["url"])}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "edgar_tune.json"} <= files
    card = fs.cat_file(f"{done['url']}/README.md").decode()
    assert f"aws s3 sync {done['url']} champion@v{first}-merged" in card
    assert f'AutoModelForCausalLM.from_pretrained("champion@v{first}-merged")' in card
    assert not list((tmp_path / "cache" / "exports").iterdir())  # the local copy is gone once uploaded
    assert export_alias(client, name, "champion", out)["written"] is False
    client.set_registered_model_alias(name, "champion", second)
    moved = export_alias(client, name, "champion", out)
    assert (moved["version"], moved["previous"]) == (second, f"{out}@v{first}-merged")
    assert sorted(fs.glob(f"{out}@*")) == [f"edgar-runs/exports/{name}/champion@v{v}-merged" for v in (first, second)]
    before = fs.info(f"{out}@v{first}-merged/model.safetensors")["LastModified"]
    client.set_registered_model_alias(name, "champion", first)  # a rollback: that prefix is there, whole
    back = export_alias(client, name, "champion", out)
    assert (back["version"], back["url"], pointer()["url"]) == (first, f"{out}@v{first}-merged", back["url"])
    assert fs.info(f"{out}@v{first}-merged/model.safetensors")["LastModified"] == before  # not uploaded again
    bf16 = export_alias(client, name, "champion", out, dtype="bfloat16")  # another form: its own prefix
    assert bf16["url"] == f"{out}@v{first}-bfloat16" and bf16["dtype"] == "bfloat16"
    kept = sorted(fs.glob(f"{out}@*"))  # this pointer's and the last one's
    assert kept == [f"edgar-runs/exports/{name}/champion@v{first}-{f}" for f in ("bfloat16", "merged")], kept
    gguf = export_alias(client, name, "champion", out, gguf="q8_0")  # one GGUF file, under a prefix of its own
    assert (gguf["url"], gguf["previous"]) == (f"{out}@v{first}-gguf-q8_0", f"{out}@v{first}-bfloat16")
    assert {f.rsplit("/", 1)[-1] for f in fs.find(gguf["url"])} == {gguf["gguf_file"], "README.md", "edgar_tune.json"}
    assert f"champion@v{first}-gguf-q8_0/{gguf['gguf_file']}" in fs.cat_file(f"{gguf['url']}/README.md").decode()
    assert export_alias(client, name, "champion", out, gguf="q8_0")["written"] is False
    base = export_alias(client, name, "champion", out, gguf="q8_0", base=True)  # its base, named after it
    assert (base["url"], base["gguf_file"]) == (f"{out}@v{first}-base-gguf-q8_0", "tiny-llama-q8_0.gguf")
    assert fs.exists(f"{base['url']}/tiny-llama-q8_0.gguf") and pointer()["base"] is True
    assert not fs.exists(f"{out}/.lease.json")  # let go of
    # `edgar-tune export` to S3: an alias, with the same pointer; a version number is refused, naming what to give.
    env = dict(os.environ, EDGAR_TUNE_CACHE=str(tmp_path / "cache"))

    def cli(model: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgar_tune.cli", "export", "--model", model, "--out",
                               "s3://edgar-runs/exports/cli", "--tracking-uri", client.tracking_uri],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

    made = cli(f"models:/{name}@champion")
    assert made.returncode == 0, made.stderr[-3000:]
    assert f"{name} v{first} (merged, float32) -> s3://edgar-runs/exports/cli@v{first}-merged (s3://edgar-runs/" in (
        made.stdout)
    assert json.loads(fs.cat_file("s3://edgar-runs/exports/cli.json"))["version"] == first
    refused = cli(f"models:/{name}/{second}")
    assert refused.returncode == 2 and "an export to S3 follows an alias, --model models:/NAME@ALIAS" in refused.stderr


@pytest.mark.slow
def test_an_s3_run_in_use_refuses_a_worker_on_another_host(s3, tmp_path):
    """Workers share an s3:// run through the bucket, each in its own working copy, so one host's lock file does
    not stop another host: the run's lease in the bucket does, with no Prefect server that the hosts share. A run
    on another host (its own cache) is refused while the first holds the run, before it writes to the bucket, and
    a run told to wait its turn takes it once the first lets go."""
    fs, aws = s3
    url = "s3://edgar-runs/runs/held"
    with run_held(url, "worker-1", env=dict(aws, EDGAR_TUNE_CACHE=str(tmp_path / "worker1"))):
        assert fs.find(url) == ["edgar-runs/runs/held/.lease.json"]
        env = dict(os.environ, **aws, EDGAR_TUNE_CACHE=str(tmp_path / "worker2"))
        proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out", url],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"run {url} is in use by a run on another host (flow run 'worker-1', pid " in proc.stderr
        assert f"its lease {url}/.lease.json was renewed " in proc.stderr
        assert "as when its holder was killed" in proc.stderr
        assert fs.find(url) == ["edgar-runs/runs/held/.lease.json"]  # nothing written beside it
        # A run told to wait its turn (`if_busy: wait`) waits for the lease, and takes it when the first lets go.
        waiting = lock_holder("run", url, "worker-2", "wait", env=env)
        seen = lines_until(waiting, "waiting for", "held")
        assert seen[-1].startswith(f"waiting for {url}, held by a run on another host (flow run 'worker-1', pid "), (
            "".join(seen)[-3000:])
    waiting.stdin.close()  # it lets go as soon as it holds
    waiting.wait(timeout=300)  # what it prints after this fits in the pipe
    out = "".join(seen) + waiting.stdout.read()
    assert waiting.returncode == 0 and "\nheld\n" in out, out[-3000:]
    assert not fs.exists(f"{url}/.lease.json")  # let go of


def test_an_s3_runs_lease_outlives_a_killed_or_stalled_holder_by_its_lease_time(s3, tmp_path):
    """A run SIGKILLed (the OOM killer) or stalled (SIGSTOP: a frozen VM) stops renewing its lease: the next run
    takes it over once it is `EDGAR_TUNE_S3_LEASE_S` old (3 s here), saying whose it was. The stalled one, woken,
    finds its lease gone and stops before its next upload, and leaves the new holder's lease alone as it ends."""
    fs, aws = s3
    url = "s3://edgar-runs/runs/leased"
    lease = f"{url}/.lease.json"

    def held_lines(proc: subprocess.Popen) -> str:
        return "".join(lines_until(proc, "held"))

    def holder(name: str) -> subprocess.Popen:  # on a host of its own (its own cache), waiting its turn
        return lock_holder("run", url, name, "wait", env=dict(aws, EDGAR_TUNE_CACHE=str(tmp_path / name),
                                                              EDGAR_TUNE_S3_LEASE_S="3"))  # fmt: skip

    stalled = holder("stalled")
    held_lines(stalled)
    os.kill(stalled.pid, signal.SIGSTOP)
    taker = holder("taker")
    out = held_lines(taker)
    assert re.search(rf"took over the lease of {url} from a run that stopped renewing it \d+ s ago \(flow run "
                     r"'stalled', pid \d+ on .+\): it ended without letting go, as a killed run does", out), out
    assert json.loads(fs.cat_file(lease))["flow_run"] == "taker"
    os.kill(stalled.pid, signal.SIGCONT)
    line = stalled.stdout.readline()  # its next renewal finds the lease taken
    assert line.startswith(f"the lease of {lease} was taken over by another run (flow run 'taker', pid "), line
    assert line.rstrip().endswith("after this one did not renew it for 3 s: this run stops before its next upload")
    stalled.stdin.close()
    assert stalled.wait(timeout=60) == 0
    assert json.loads(fs.cat_file(lease))["flow_run"] == "taker"  # the stalled one did not delete it

    taker.kill()  # SIGKILL: no renewal, no delete
    taker.wait()
    after = holder("after")
    out = held_lines(after)
    assert "took over the lease" in out and "(flow run 'taker', pid " in out, out
    after.stdin.close()
    assert after.wait(timeout=60) == 0
    assert not fs.exists(lease)


def test_an_s3_lease_outlives_a_store_that_stops_answering_for_less_than_its_lease_time(s3, free_tcp_port,
                                                                                        monkeypatch, caplog):
    """The store unreachable for a while (a network blip, a restarted MinIO): the renewals that fail are logged and
    tried again, and once it answers the run still holds its lease. Its own moto server on a port of its own,
    stopped and started again there (moto keeps the bucket in this process)."""
    import logging
    import time

    import s3fs
    from moto.server import ThreadedMotoServer

    from tasks.storage import BucketLease

    port = free_tcp_port
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, endpoint_url=f"http://127.0.0.1:{port}",
                           config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}})  # fmt: skip
    monkeypatch.setenv("EDGAR_TUNE_S3_LEASE_S", "10")  # renewed every 2 s
    url = "s3://edgar-runs/runs/blip"
    lease = BucketLease(fs, url, {"flow_run": "blip"})
    try:
        with caplog.at_level(logging.WARNING, logger="tasks.storage"), lease.held(wait=False):
            first = lease.etag
            server.stop()
            deadline = time.monotonic() + 30
            while "could not renew the lease" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.2)
            assert f"could not renew the lease of {url}/.lease.json" in caplog.text
            assert "trying again in 2 s" in caplog.text
            assert lease.etag == first  # no renewal went through
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            while lease.etag == first and time.monotonic() < deadline:  # each renewal writes a new body
                time.sleep(0.2)
            assert lease.etag != first and lease.lost is None  # renewed once the store answered
            lease.check()  # still its own: no error
            other = BucketLease(fs, url, {"flow_run": "other"})
            assert not other._take()  # held: renewed within its lease time
            assert json.loads(fs.cat_file(f"{url}/.lease.json"))["flow_run"] == "blip"
        assert not fs.exists(f"{url}/.lease.json")  # let go of at the end
    finally:
        server.stop()


def _conditionless_store(upstream: str, refuse: bool, headers: tuple[str, ...] = ("if-none-match", "if-match")):
    """A loopback S3 store that ignores conditional writes, or refuses them (501 NotImplemented, as some
    S3-compatible stores answer): moto's server behind a proxy that drops `headers`, or answers 501 to a request
    that has one of them. Returns the server (shutdown() when done) and an s3fs filesystem on it."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    import s3fs

    conditions, up = headers, urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if refuse and any(h.lower() in conditions for h in self.headers):
                error = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NotImplemented</Code><Message>A header "
                         b"you provided implies functionality that is not implemented</Message></Error>")  # fmt: skip
                self.send_response(501)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(error)))
                self.end_headers()
                self.wfile.write(error)
                return
            drop = (*conditions, "host", "expect")
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
            conn.request(self.command, self.path, body=body or None,
                         headers={k: v for k, v in self.headers.items() if k.lower() not in drop})  # fmt: skip
            answer = conn.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    return server, s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, endpoint_url=url)


@pytest.mark.parametrize("refuse", [False, True], ids=["ignores", "refuses"])
def test_a_store_without_conditional_writes_is_warned_about_and_the_run_goes_on(s3, refuse, caplog):
    """An S3-compatible store that ignores conditional writes takes a second `If-None-Match: *` PUT of the lease:
    the run's probe finds that out and warns that the lease keeps no other host out. One that refuses them (501)
    failed the run with `[Errno 38] A header you provided implies functionality that is not implemented`; now it is
    warned about the same way, and the run goes on without a lease there."""
    import logging

    from tasks.storage import BucketLease

    fs, env = s3
    server, store = _conditionless_store(env["AWS_ENDPOINT_URL"], refuse)
    run = f"s3://edgar-runs/runs/{'refusing' if refuse else 'ignoring'}"
    lease = BucketLease(store, run, {"flow_run": "no-conditions"})
    try:
        with caplog.at_level(logging.WARNING, logger="tasks.storage"), lease.held(wait=False):
            lease.check()
            assert fs.exists(f"{run}/.lease.json") is not refuse  # a store that refuses them took no lease
    finally:
        server.shutdown()
    says = "refuses conditional writes (If-None-Match: " if refuse else "ignores conditional writes (If-None-Match)"
    assert f"the S3 store of {run}/.lease.json {says}" in caplog.text
    assert "give each host's runs their own s3:// URLs there" in caplog.text
    assert not fs.exists(f"{run}/.lease.json")


def test_a_store_that_refuses_if_match_renews_and_hands_over_by_reading_the_etag_first(s3, monkeypatch, caplog):
    """A store that takes If-None-Match but refuses If-Match (501): every renewal failed ("could not renew"), so
    after its lease time another host took over a run that was still working, and both wrote it. Now the lease is
    renewed by reading its ETag before an unconditional PUT: renewals go through, a take-over by another run is
    still noticed (check() stops this one), and a stale lease is still taken over."""
    import logging
    import time

    from tasks.storage import BucketLease

    fs, env = s3
    monkeypatch.setenv("EDGAR_TUNE_S3_LEASE_S", "2")  # renewed every 0.4 s
    server, store = _conditionless_store(env["AWS_ENDPOINT_URL"], refuse=True, headers=("if-match",))
    run = "s3://edgar-runs/runs/no-if-match"
    lease = BucketLease(store, run, {"flow_run": "first"})
    try:
        with caplog.at_level(logging.WARNING, logger="tasks.storage"), lease.held(wait=False):
            first, deadline = lease.etag, time.monotonic() + 30
            while lease.renewals < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert lease.etag != first and lease.lost is None and "could not renew" not in caplog.text
            assert f"the S3 store of {run}/.lease.json refuses If-Match" in caplog.text
            # Another run's now. A real run takes over only a lease left unrenewed, never one being renewed; this
            # write, to a fresh lease, can land between a renewal's read of the ETag and its PUT (about 10 ms every
            # 0.4 s), which then overwrites it: written again until it holds.
            while lease.lost is None and time.monotonic() < deadline:
                if json.loads(fs.cat_file(f"{run}/.lease.json"))["flow_run"] != "other":
                    fs.pipe_file(f"{run}/.lease.json", json.dumps({"flow_run": "other"}).encode())
                time.sleep(0.1)
            with pytest.raises(RuntimeError, match="taken over by another run"):
                lease.check()
        stale = BucketLease(store, run, {"flow_run": "stale"})
        assert not stale._take()  # the other run's lease is fresh
        time.sleep(2.5)  # and now it is not: the other run stopped renewing it
        assert stale._take() and json.loads(fs.cat_file(f"{run}/.lease.json"))["flow_run"] == "stale"
        assert "took over the lease of" in caplog.text
        fs.rm_file(f"{run}/.lease.json")
    finally:
        server.shutdown()


def test_two_runs_taking_over_one_stale_lease_at_once_on_a_store_that_refuses_if_match_start_one(s3, monkeypatch,
                                                                                                   caplog):  # fmt: skip
    """On a store that refuses If-Match a take-over is an unconditional PUT after reading the ETag: two runs that
    found one stale lease at once both PUT it, and both started, writing one run. Each now reads the lease back a
    moment later (lease_s / 4 here): the later PUT holds it, and the other one is refused as by a held lease."""
    import logging
    import threading
    import time

    from tasks.storage import BucketLease, Busy

    fs, env = s3
    monkeypatch.setenv("EDGAR_TUNE_S3_LEASE_S", "2")
    server, store = _conditionless_store(env["AWS_ENDPOINT_URL"], refuse=True, headers=("if-match",))
    run = "s3://edgar-runs/runs/two-take-overs"
    try:
        fs.pipe_file(f"{run}/.lease.json", json.dumps({"flow_run": "killed"}).encode())  # its run was SIGKILLed
        time.sleep(2.5)
        leases = [BucketLease(store, run, {"flow_run": name}) for name in ("a", "b")]
        start, both_found_it_stale, held, refused = threading.Barrier(2), threading.Barrier(2, timeout=30), [], []
        for lease in leases:  # each one's first unconditional PUT (its take-over) waits for the other's: the race
            def put(put=lease._put, first=[True], **condition: str) -> str:  # noqa: B006 (one list per lease)
                if not condition and first:
                    first.clear()
                    both_found_it_stale.wait()
                return put(**condition)

            lease._put = put

        def take(lease: BucketLease) -> None:
            start.wait()
            try:
                with lease.held(wait=False):
                    held.append(lease.holder["flow_run"])
                    time.sleep(1.0)  # working, and renewing, while the other one decides
            except Busy as busy:
                refused.append(busy)

        with caplog.at_level(logging.INFO, logger="tasks.storage"):
            threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
        assert len(held) == 1 and len(refused) == 1, (held, refused, caplog.text)
        assert caplog.text.count("another run took over the lease of") == 1
        assert caplog.text.count("from a run that stopped renewing it") == 1
        assert "could not renew" not in caplog.text
        assert not fs.exists(f"{run}/.lease.json")  # let go of by the one that held it
    finally:
        server.shutdown()


def test_a_slot_on_a_server_that_keeps_its_leases_in_memory_says_so(prefect_server, tmp_path, monkeypatch, caplog):
    """A Prefect server keeps the leases of slots in memory unless told otherwise: a slot held across a restart of
    it stays taken for good, and every run into that s3:// run is refused (measured: README, Prefect in
    production). The first slot a process takes on such a server warns, naming the setting; `make server`'s (and
    this suite's) keeps them on disk and is not warned about."""
    import logging

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import limits
    from tests.conftest import running_prefect_server

    monkeypatch.setattr(limits, "_checked", set())
    caplog.set_level(logging.WARNING, logger="tasks.limits")
    memory = "prefect.server.concurrency.lease_storage.memory"
    with running_prefect_server(tmp_path, PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=memory) as default:
        for i, server in enumerate((default, prefect_server, default)):
            with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
                with limits.slot(f"edgar-tune-run-leases-{i}", wait_s=None):  # a slot is let go in the background
                    pass
    warned = [r.getMessage() for r in caplog.records if r.name == "tasks.limits"]
    assert len(warned) == 1, warned  # once per process and server
    assert warned[0].startswith(f"the Prefect server at {default['PREFECT_API_URL']}/ keeps the leases of "
                                f"concurrency slots in memory ({memory}, Prefect's default): a slot held across a "
                                "restart of it stays taken")  # fmt: skip
    assert f"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE={limits.LEASE_STORAGE}, as `make server` does" in warned[0]


def test_text_data_from_an_s3_prefix(s3, prefect_server, tmp_path, amzn_files, monkeypatch, caplog):
    """JumpStart's training channel: instruction JSONL and its template.json under an s3:// prefix. The download
    stage copies each object into the cache once (again only when its ETag changes) and records its sha256; a
    worker without the copy fetches it by URL and still reads only the recorded bytes."""
    fs, aws = s3
    doc = parse_filing(amzn_files[0], "drop")
    paragraphs = [p for p in doc.items["1A"].text.split("\n") if len(p) > 200]

    def jsonl(n: int) -> bytes:
        return "".join(json.dumps({"q": p[:100], "a": p[100:300]}) + "\n" for p in paragraphs[:n]).encode()

    fs.mkdir("edgar-data")
    fs.pipe_file("edgar-data/qa/train.jsonl", jsonl(20))
    fs.pipe_file("edgar-data/qa/template.json", json.dumps({"prompt": "Q: {q}\n", "completion": "A: {a}"}).encode())
    fs.pipe_file("edgar-data/qa/README.md", b"not data")
    fs.pipe_file("edgar-data/qa/old/train.jsonl", jsonl(3))  # one level deep, as a local folder

    # End to end through the CLI: the summary names the object, not the cache's copy.
    env = dict(os.environ, **aws, **prefect_server, EDGAR_TUNE_CACHE=str(tmp_path / "cli"))
    _run(env, "run", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", "data.source=s3://edgar-data/qa/",
         "--set", "instruction_tuned=true", "--set", "max_steps=4", "--set", "max_input_length=128")  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_files"] == ["s3://edgar-data/qa/train.jsonl"] and summary["val_tokens"] > 0
    report = json.loads((tmp_path / "run" / "02_parse" / "report.json").read_text())
    assert report["template"] == "s3://edgar-data/qa/template.json"
    assert (tmp_path / "cli" / "data" / "s3" / "edgar-data" / "qa" / "train.jsonl").is_file()  # the cache's copy
    assert report["train_documents"] + report["val_documents"] == 20

    # The stages themselves: fetched once, again when the object changes; another worker fetches by URL.
    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "worker1"))
    cfg = load_config("tiny", ["data.source=s3://edgar-data/qa/", "instruction_tuned=true"])
    run = tmp_path / "stages"
    with caplog.at_level("INFO", logger="tasks.textdata"):
        download_filings.fn(run, cfg.data)
        assert caplog.text.count("fetched s3://edgar-data/qa/") == 2  # train.jsonl and template.json
        assert "`data.source` = s3://edgar-data/qa/: old/ not read (a source is the data files directly" in caplog.text
        caplog.clear()
        download_filings.fn(run, cfg.data)
        assert "fetched" not in caplog.text  # unchanged ETags: the copies stand
        fs.pipe_file("edgar-data/qa/train.jsonl", jsonl(30))
        download_filings.fn(run, cfg.data)
        assert "fetched s3://edgar-data/qa/train.jsonl" in caplog.text and "train.jsonl changed since" in caplog.text
    files = json.loads((run / "01_download" / "manifest.json").read_text())["files"]
    assert [(f["url"], f["role"]) for f in files] == [("s3://edgar-data/qa/train.jsonl", "train"),
                                                      ("s3://edgar-data/qa/template.json", "template")]
    assert not any("path" in f for f in files)  # each worker keeps its copies elsewhere: the manifest is the same
    assert extract_sections.fn(run, cfg)["train_documents"] == 24

    shutil.rmtree(tmp_path / "worker1")  # another worker, with nothing in its cache, reruns the parse stage
    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "worker2"))
    assert extract_sections.fn(run, cfg)["train_documents"] == 24
    assert (tmp_path / "worker2" / "data" / "s3" / "edgar-data" / "qa" / "train.jsonl").is_file()
    fs.pipe_file("edgar-data/qa/train.jsonl", jsonl(10))  # changed in the bucket after the download stage
    shutil.rmtree(tmp_path / "worker2")
    with pytest.raises(SourceChanged, match="s3://edgar-data/qa/train.jsonl changed after the download stage"):
        extract_sections.fn(run, cfg)

    with pytest.raises(FileNotFoundError, match=r"has no \.txt, \.csv, \.json or \.jsonl objects directly under it"):
        data_files("s3://edgar-data/nothing/")
    with pytest.raises(FileNotFoundError, match="`data.validation` = .* is not an object in that bucket"):
        data_files("s3://edgar-data/qa/val.jsonl", "data.validation")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="`data.source` = 's3://edgar-data/qa/': NoCredentialsError: .* AWS_PROFILE"):
        data_files("s3://edgar-data/qa/")


def test_10k_filings_under_an_s3_prefix_are_read_as_a_local_folder_is(s3, tmp_path, monkeypatch, caplog):
    """A `sec-edgar-filings` folder copied to a bucket, which every worker of a pool reads (air-gapped GPU nodes
    reach no EDGAR): with edgar-tune's manifest, only the chosen filings' files are fetched; without one (as
    sec-edgar-downloader writes it), the company folders named by the tickers, each 10-K dated by its SEC header.
    Each object is copied into the cache once, again only when its ETag changes."""
    import gzip

    from edgar_tune.config import DataConfig
    from tasks.download import BUNDLED_DIR, gather_filings, primary_file, submission_file

    fs, _ = s3
    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    fs.mkdir("edgar-filings")
    for path in (p for p in BUNDLED_DIR.rglob("*") if p.is_file()):  # the bundled folder, its manifest included
        fs.pipe_file(f"edgar-filings/team/sec-edgar-filings/{path.relative_to(BUNDLED_DIR)}", path.read_bytes())
    mine = "edgar-filings/mine/sec-edgar-filings"  # sec-edgar-downloader's layout, no manifest: real submissions
    for file, company, acc in (("TGFIN_10-K_2009.txt.gz", "0000876134", "0001010412-10-000078"),
                               ("AAPL_10-K_1996.txt.gz", "AAPL", "0000320193-96-000023")):  # fmt: skip
        raw = gzip.decompress((REPO / "data" / "edgar" / "filings" / file).read_bytes())
        fs.pipe_file(f"{mine}/{company}/10-K/{acc}/full-submission.txt", raw)

    team = DataConfig(source="s3://edgar-filings/team/sec-edgar-filings/", tickers=["AMZN"], fiscal_years=[2021])
    assert not team.is_text  # filings, not text
    with caplog.at_level("INFO", logger="tasks.textdata"):
        filings, skipped = gather_filings(team)
    assert [(f["fiscal_year"], f["accession"]) for f in filings] == [(2021, "0001018724-22-000005")] and not skipped
    copy = tmp_path / "cache" / "data" / "s3" / "edgar-filings" / "team" / "sec-edgar-filings"
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.suffix not in (".etag", ".lock")) == [
        "AMZN", "AMZN/10-K", "AMZN/10-K/0001018724-22-000005",
        "AMZN/10-K/0001018724-22-000005/primary-document.html.gz", "manifest.json"]  # FY2020's not fetched
    assert caplog.text.count("fetched s3://edgar-filings/") == 2
    caplog.clear()
    with caplog.at_level("INFO", logger="tasks.textdata"):
        assert gather_filings(team)[0] == filings and "fetched s3://" not in caplog.text  # the copies stand

    theirs = DataConfig(source=f"s3://{mine}", tickers=["AAPL", "876134"], fiscal_years=[1996, 2009])
    filings, skipped = gather_filings(theirs)
    assert [(f["ticker"], f["fiscal_year"]) for f in filings] == [("0000876134", 2009), ("AAPL", 1996)]
    for f in filings:
        doc = parse_filing(primary_file(f), submission=submission_file(f))
        assert doc.items["7"].status == "ok", (f["ticker"], doc.warnings)
    with pytest.raises(FileNotFoundError, match=r"has no company folder named MSFT \(it has 0000876134, AAPL\)"):
        gather_filings(DataConfig(source=f"s3://{mine}", tickers=["MSFT"], fiscal_years=[2021]))
    with pytest.raises(FileNotFoundError, match="holds no object"):
        gather_filings(DataConfig(source="s3://edgar-filings/none/sec-edgar-filings", tickers=["AMZN"]))


def test_an_s3_copy_of_filings_follows_the_bucket(s3, tmp_path, monkeypatch, caplog):
    """Filings sec-edgar-downloader added beside edgar-tune's manifest in a bucket are fetched and read with what it
    lists; a filing, or the manifest, deleted from the bucket is removed from this machine's copy and not read."""
    import gzip

    from edgar_tune.config import DataConfig
    from tasks.download import BUNDLED_DIR, gather_filings

    fs, _ = s3
    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    prefix = "edgar-mixed/team/sec-edgar-filings"
    fs.mkdir("edgar-mixed")
    for path in (p for p in BUNDLED_DIR.rglob("*") if p.is_file()):
        fs.pipe_file(f"{prefix}/{path.relative_to(BUNDLED_DIR)}", path.read_bytes())
    aapl = f"{prefix}/AAPL/10-K/0000320193-96-000023/full-submission.txt"
    fs.pipe_file(aapl, gzip.decompress((REPO / "data" / "edgar" / "filings" / "AAPL_10-K_1996.txt.gz").read_bytes()))
    cfg = DataConfig(source=f"s3://{prefix}", tickers=["AMZN", "AAPL"], fiscal_years=[1996, 2021])
    filings, _ = gather_filings(cfg)
    assert [(f["ticker"], f["fiscal_year"]) for f in filings] == [("AAPL", 1996), ("AMZN", 2021)]
    copy = tmp_path / "cache" / "data" / "s3" / prefix
    fs.rm(aapl)
    with caplog.at_level("INFO", logger="tasks.download"):
        filings, _ = gather_filings(cfg)
    assert [(f["ticker"], f["fiscal_year"]) for f in filings] == [("AMZN", 2021)]
    assert sorted(p.name for p in copy.glob("AAPL/10-K/*/*")) == ["full-submission.txt.lock"]  # no copy, no ETag
    assert "removed 1 file(s) the bucket no longer holds (AAPL/10-K/0000320193-96-000023/full-submission.txt)" in (
        caplog.text)  # fmt: skip
    fs.pipe_file(aapl, gzip.decompress((REPO / "data" / "edgar" / "filings" / "AAPL_10-K_1996.txt.gz").read_bytes()))
    fs.rm(f"{prefix}/manifest.json")  # the team's folder is sec-edgar-downloader's now: AMZN's has no submission
    filings, skipped = gather_filings(cfg)
    assert [(f["ticker"], f["fiscal_year"]) for f in filings] == [("AAPL", 1996)]
    assert not (copy / "manifest.json").exists()
    assert sorted((s["ticker"], s["fiscal_year"]) for s in skipped) == [("AAPL", 2021), ("AMZN", 1996), ("AMZN", 2021)]


def test_an_unfinished_model_upload_is_removed_from_an_s3_artifact_store(s3, tmp_path):
    """The files of a model upload a killed registration left in an S3 artifact store (moto's server) are removed
    with its logged model before the next upload, as from a local store (tests/test_registry.py)."""
    import mlflow

    from tasks.registry import RUN_KEY, tracking_at, unfinished_uploads_removed

    fs, _ = s3
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location="s3://edgar-runs/mlflow")
    run_id = client.create_run(exp, tags={RUN_KEY: "this folder"}).info.run_id
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"w" * 300_000)
    with tracking_at(uri):
        killed = mlflow.initialize_logged_model(name="model", source_run_id=run_id, experiment_id=exp)
        client.log_model_artifacts(killed.model_id, str(tmp_path / "weights"))
        assert fs.find(f"edgar-runs/mlflow/models/{killed.model_id}")  # the files the killed upload got
        with unfinished_uploads_removed(client, exp, run_id, "this folder"):
            pass
    fs.invalidate_cache()
    assert fs.find(f"edgar-runs/mlflow/models/{killed.model_id}") == []
    assert client.search_logged_models([exp]) == []
