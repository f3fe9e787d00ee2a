"""Runs under an s3:// URL (moto's S3 server on loopback): the run folder and Prefect's results live in the
bucket, and a second worker with an empty disk finds every stage there, Cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_held


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


def test_an_s3_run_in_use_refuses_a_worker_on_another_host(s3, prefect_server, tmp_path):
    """Workers share an s3:// run through the bucket, each in its own working copy, so one host's lock file does
    not stop another host: the run's slot on the Prefect server does. A worker (its own cache: another host) is
    refused while the first holds the run, before it writes to the bucket, and takes it once the first lets go."""
    fs, aws = s3
    url = "s3://edgar-runs/runs/held"
    worker = {**aws, **prefect_server}
    with run_held(url, "worker-1", env=dict(worker, EDGAR_TUNE_CACHE=str(tmp_path / "worker1"))):
        env = dict(os.environ, **worker, EDGAR_TUNE_CACHE=str(tmp_path / "worker2"))
        proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out", url],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"run {url} is in use by a run on another worker" in proc.stderr and "423 Locked" in proc.stderr
        assert not fs.exists(url)
    with run_held(url, "worker-2", env=dict(worker, EDGAR_TUNE_CACHE=str(tmp_path / "worker2"))):
        pass
