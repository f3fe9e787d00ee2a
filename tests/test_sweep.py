"""`edgar-tune sweep`: a finished run's data trained under a grid of settings, each point a run folder beside it, and
the results compared in one table and one MLflow run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgar_tune.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _config_folder(path: Path, **changes) -> Path:
    """A folder holding the tiny preset's config.yaml (with `changes`), as a run leaves it: enough to plan a grid."""
    from edgar_tune.config import load_config

    path.mkdir(parents=True)
    cfg = load_config("tiny", changes or None)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    return path


def test_a_grid_is_read_as_its_keys_values_and_refuses_what_would_not_compare(tmp_path):
    """`--grid KEY=a,b`: values split at commas and read as `--set` reads them, bare keys resolved; a list-valued key
    takes a YAML list of lists. Keys that change the held-out text or its units (data, parse, model), or where
    versions go (registry), are refused with what to do instead."""
    from flows.sweep import check_grid, parse_grid

    grid = check_grid(parse_grid(["learning_rate=1e-4,3e-4", "train.lora_r=8,16",
                                  "lora_target_modules=[[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]]"]))  # fmt: skip
    assert grid == {"train.learning_rate": [0.0001, 0.0003], "train.lora_r": [8, 16],
                    "train.lora_target_modules": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]]}
    for items, said in [
        (["data.tickers=AMZN,MSFT"], "`data.tickers` cannot be swept: the filings"),
        (["parse.val_items=7"], "`parse.val_items` cannot be swept: the parse decides the held-out text"),
        (["train_data_split_seed=1,2"], "`train.train_data_split_seed` cannot be swept: the parse reads it"),
        (["model.name=gpt2"], "`model.name` cannot be swept: another base model's perplexity is in other units"),
        (["registry.model_name=a,b"], "`registry.model_name` cannot be swept"),
        (["lr=1e-4,3e-4"], "unknown config key `lr`. Did you mean `train.learning_rate`?"),
        (["lora_r=8", "train.lora_r=16"], "gives `train.lora_r` twice"),
        (["train.lora_r"], "must look like key=value,value"),
        ([], "a sweep needs at least one key to vary"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=None) as err:
            check_grid(parse_grid(items))
        assert said in str(err.value), (items, str(err.value))


def test_spreading_points_over_a_work_pool_is_refused_where_no_worker_could_run_them(prefect_server):
    """`--spread` queues each point as a flow run of a sweep-point deployment: refused at once, before a point's
    folder is made, where there is no server to queue them on (none configured, or one that does not answer), no
    such deployment there, or a deployment of another flow; `--at-once` only with it, and 1 or more."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sweep import check_spread

    grid = ["sweep", "--run", "nowhere", "--grid", "learning_rate=1e-4,3e-4"]
    for argv, said in [
        ([*grid, "--spread"], "spreading a sweep over a work pool needs a Prefect server that its workers poll, and "
                              "PREFECT_API_URL is unset"),
        ([*grid, "--at-once", "2"], "at_once=2: at_once is for points spread over a work pool (spread)"),
        ([*grid, "--spread", "--at-once", "0"], "at_once=0: give 1 or more points at once"),
        ([*grid, "--spread", "edgar-tune/on-demand"], "spread='edgar-tune/on-demand' is a deployment of the flow "
                                                      "'edgar-tune'; the points run as flow runs of the sweep-point"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            _in_process(*argv)
        assert str(err.value).startswith(said), (argv, str(err.value))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # the discard port: nothing answers
        with pytest.raises(ConfigError, match=r"^PREFECT_API_URL: the Prefect server at http://127.0.0.1:9/api does "
                           r"not answer"):  # fmt: skip
            check_spread("sweep-point", None)
    url = prefect_server["PREFECT_API_URL"]
    with temporary_settings({PREFECT_API_URL: url}):  # a server with no deployment of it (make deploy not run)
        with pytest.raises(ConfigError, match=rf"^the Prefect server at {url} has no deployment "
                           r"edgar-tune-sweep-point/sweep-point-gpu: deploy"):  # fmt: skip
            check_spread("sweep-point-gpu", 4)


def test_each_grid_point_is_named_by_what_it_changes_and_makes_again_only_that(tmp_path):
    """A point is named by the keys whose value differs from the base's (the point that differs in none is the base
    itself); it makes again the stages that read those keys and what follows them, and a copy of the base leaves
    out only their folders. A value the key does not take, and two values the config reads alike, are refused."""
    from flows.sweep import check_grid, point_name, sweep_points

    base = _config_folder(tmp_path / "latest")  # tiny: learning rate 0.003, r 16
    points = sweep_points(base, check_grid({"train.learning_rate": [0.003, 1e-2], "lora_r": [16, 4],
                                            "eval.stride": [64, 32]}))  # fmt: skip
    names = [p["name"] for p in points]
    assert names[:4] == ["latest", "latest+stride=32", "latest+lora_r=4", "latest+lora_r=4+stride=32"]
    assert names[7] == "latest+learning_rate=0.01+lora_r=4+stride=32"
    assert all(p["folder"] == tmp_path / p["name"] for p in points)
    by = {p["name"]: p for p in points}
    assert by["latest"]["moved"] == {} and by["latest"]["remade"] == ["register"]
    assert by["latest+lora_r=4"]["remade"] == ["train", "evaluate", "register"]
    assert by["latest+stride=32"]["remade"] == ["evaluate-base", "evaluate", "register"]  # both scored alike
    assert by["latest+learning_rate=0.01+lora_r=4+stride=32"]["overrides"] == {
        "train.learning_rate": 0.01, "train.lora_r": 4, "eval.stride": 32}  # fmt: skip
    tokens = sweep_points(base, check_grid({"tokenize.max_input_length": [64]}))[0]
    assert tokens["remade"] == ["tokenize", "evaluate-base", "train", "evaluate", "register"]
    # two keys with one last name are named in full; a name past the limit ends in a digest
    assert point_name("b", {"train.x": 1, "eval.x": 2}) == "b+train.x=1+eval.x=2"
    assert point_name("b", {"eval.x": 2}, ["train.x", "eval.x"]) == "b+eval.x=2"  # not `b+x=2`, train.x's too
    long = point_name("b", {"train.lora_target_modules": ["q_proj"] * 60})
    assert len(long) == 200 and long.startswith("b+lora_target_modules=q_proj,q_proj")
    with pytest.raises(ConfigError, match=r"grid point train.lora_r=0: .*lora_r"):
        sweep_points(base, check_grid({"lora_r": [8, 0]}))
    with pytest.raises(ConfigError, match="are the same settings"):
        sweep_points(base, check_grid({"learning_rate": [1e-3, 0.001]}))
    with pytest.raises(ConfigError, match=r"would share the folder latest\+deepspeed=\S*a_b.json: give"):
        sweep_points(base, check_grid({"train.deepspeed": ["a/b.json", "a b.json"]}))


def test_a_point_folder_that_holds_something_else_is_refused_and_left_alone(tmp_path):
    """A folder where a point goes is taken only as that point's own (a sweep stopped before): anything else is
    refused before the first point trains, and nothing in it is touched."""
    from flows.sweep import check_grid, check_point_folder, sweep_points

    base = _config_folder(tmp_path / "latest")
    (base / ".stages").mkdir()
    (base / ".stages" / "run.json").write_text(json.dumps({"name": str(base)}))
    point = sweep_points(base, check_grid({"lora_r": [4]}))[0]
    folder = tmp_path / "latest+lora_r=4"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"latest\+lora_r=4 is not a run folder, where the sweep would put"):
        check_point_folder(point, base)
    shutil.rmtree(folder)
    _config_folder(folder, **{"train.lora_r": 8})
    (folder / ".stages").mkdir()
    (folder / ".stages" / "run.json").write_text(json.dumps({"name": str(base)}))
    with pytest.raises(ConfigError, match=r"holds the run with other settings \(train.lora_r=8\)"):
        check_point_folder(point, base)
    (folder / ".stages" / "run.json").write_text(json.dumps({"name": "/elsewhere/run"}))
    with pytest.raises(ConfigError, match="holds another run"):
        check_point_folder(point, base)
    shutil.rmtree(folder)
    _config_folder(folder, **{"train.lora_r": 4})
    (folder / ".stages").mkdir()
    (folder / ".stages" / "run.json").write_text(json.dumps({"name": str(base)}))
    check_point_folder(point, base)  # its own: the sweep goes on in it


def _sweep(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(cwd / ".prefect"), **env}
    return subprocess.run([sys.executable, "-m", "edgar_tune.cli", "sweep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def _stage_files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0][:2].isdigit()}  # fmt: skip


def _in_process(*argv: str) -> int:
    """`edgar-tune ARGV` in this process, for what runs before Prefect starts (a dry run, a refusal)."""
    from edgar_tune.cli import build_parser

    args = build_parser().parse_args(list(argv))
    return args.fn(args)


def test_a_sweep_trains_each_point_beside_the_base_and_compares_them(tiny_run, prefect_server, tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    """A sweep over the learning rate from a finished tiny run: the point at the base's value is the base itself;
    the other is a copy of it that parses, tokenizes and scores the base model no more (`Cached`) and trains,
    scores and registers; the table ranks them, one MLflow run holds it with the points' runs nested under it, and
    the base's stage folders are as they were. Run again, the sweep trains nothing and finds its MLflow run."""
    import mlflow

    runs, made = tiny_run
    base = tmp_path / "latest"
    shutil.copytree(runs / "latest", base)  # a copy is the same run; its registration stays in the tiny run's store
    before = _stage_files(base)
    monkeypatch.chdir(tmp_path)
    assert _in_process("sweep", "--run", "latest", "--grid", "learning_rate=0.003,0.01", "--dry-run") == 0
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert lines[1] == "latest (the base run)" and lines[9] == "latest+learning_rate=0.01 (new)", lines
    assert lines[10:17] == ["download kept as it is (not rerun)", "parse cached", "tokenize cached",
                            "evaluate-base cached", "train runs: train.learning_rate 0.003 -> 0.01",
                            "evaluate runs after `train`, whose outputs it reads",
                            "register runs: train.learning_rate 0.003 -> 0.01"]  # fmt: skip
    assert not (tmp_path / "latest+learning_rate=0.01").exists()

    proc = _sweep(tmp_path, prefect_server, "--run", "latest", "--grid", "learning_rate=0.003,0.01")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    point = tmp_path / "latest+learning_rate=0.01"
    summary = json.loads((point / "summary.json").read_text())
    assert summary["stages"] == {"download": "skipped", "parse": "Cached", "tokenize": "Cached",
                                 "evaluate-base": "Cached", "train": "Completed", "evaluate": "Completed",
                                 "register": "Completed"}, summary["stages"]  # fmt: skip
    assert yaml.safe_load((point / "config.yaml").read_text())["train"]["learning_rate"] == 0.01
    assert summary["ppl_before"] == made["ppl_before"] and summary["ppl_after"] != made["ppl_after"]
    assert _stage_files(base) == before
    table = out[out.index("edgar-tune sweep of latest"):].splitlines()
    rows = [line.split() for line in table[2:4]]
    best, other = sorted([(summary["ppl_after"], "0.01"), (made["ppl_after"], "0.003")])
    assert rows[0][:2] == ["*", best[1]] and rows[1][0] == other[1], table
    assert "base run" in next(line for line in table[2:4] if " 0.003 " in line)
    assert "(another store)" in out  # the base registered in the tiny run's store, not beside this copy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("edgar-tune")
    sweeps = client.search_runs([exp.experiment_id], "tags.`edgar_tune.sweep.role` = 'sweep'")
    assert len(sweeps) == 1
    sweep_id = sweeps[0].info.run_id
    assert sweeps[0].data.metrics["best_val_perplexity"] == pytest.approx(min(summary["ppl_after"],
                                                                             made["ppl_after"]))  # fmt: skip
    assert client.get_run(summary["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == sweep_id
    names = {a.path for a in client.list_artifacts(sweep_id)}
    assert names == {"sweep.json", "sweep.md", "sweep_perplexity.png"}
    recorded = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=sweep_id, artifact_path="sweep.json",
                                                                   tracking_uri=uri)).read_text())  # fmt: skip
    assert [p["name"] for p in recorded["points"]] == [p for _, p in sorted(
        [(summary["ppl_after"], point.name), (made["ppl_after"], "latest")])]  # fmt: skip
    assert len(client.search_model_versions("name='edgar-tune-10k'")) == 1

    again = _sweep(tmp_path, prefect_server, "--run", "latest", "--grid", "learning_rate=0.003,0.01")
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert json.loads((point / "summary.json").read_text())["stages"]["train"] == "Cached"
    assert "all cached" in again.stdout + again.stderr
    assert len(client.search_model_versions("name='edgar-tune-10k'")) == 1
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id],
                                                      "tags.`edgar_tune.sweep.role` = 'sweep'")] == [sweep_id]

    with pytest.raises(ConfigError, match=r"^grid point train.profile_step=1000: train.profile_step=1000 but this "
                       "run trains 60 steps"):  # fmt: skip
        _in_process("sweep", "--run", "latest", "--grid", "profile_step=30,1000")
    assert not (tmp_path / "latest+profile_step=1000").exists()
