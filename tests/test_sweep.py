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


def test_a_sample_draws_the_same_different_points_for_a_seed_from_ranges_and_lists(tmp_path):
    """`--sample N`: N different points drawn from the grid, the same ones for the same `--sample-seed` (so a sweep
    run again finds them), others for another; a list's values uniformly, `LOW..HIGH` uniformly within its ends,
    `log:LOW..HIGH` log-uniformly, whole numbers for a key that holds them, others to 3 significant digits. A range
    without --sample, ends out of order, and more points than the grid holds are refused."""
    from flows.sweep import check_grid, parse_grid, sweep_key, sweep_points

    base = _config_folder(tmp_path / "latest")
    grid = check_grid(parse_grid(["learning_rate=log:1e-5..1e-2", "lora_r=4..64", "lora_dropout=0,0.1",
                                  "max_grad_norm=0..2"]))  # fmt: skip
    assert grid == {"train.learning_rate": "log:1e-5..1e-2", "train.lora_r": "4..64", "train.lora_dropout": [0, 0.1],
                    "train.max_grad_norm": "0..2"}  # fmt: skip
    points = sweep_points(base, grid, 100, seed=7)
    drawn = [p["overrides"] for p in points]
    assert len({json.dumps(d, sort_keys=True) for d in drawn}) == 100
    assert drawn == [p["overrides"] for p in sweep_points(base, grid, 100, seed=7)]
    assert drawn != [p["overrides"] for p in sweep_points(base, grid, 100, seed=8)]
    rates = [d["train.learning_rate"] for d in drawn]
    assert all(1e-5 <= r <= 1e-2 and float(f"{r:.3g}") == r for r in rates)
    assert 25 < sum(r < 3.2e-4 for r in rates) < 75  # log-uniform: half below the ends' geometric mean
    assert {type(d["train.lora_r"]) for d in drawn} == {int} and {d["train.lora_dropout"] for d in drawn} == {0, 0.1}
    assert all(4 <= d["train.lora_r"] <= 64 for d in drawn)
    assert len({d["train.max_grad_norm"] for d in drawn}) > 50  # a float key: fractions, though its ends are whole
    assert all(p["name"].startswith(f"latest+learning_rate={p['overrides']['train.learning_rate']!r}")
               for p in points)  # fmt: skip
    assert sweep_key("b", grid, 100, 7) != sweep_key("b", grid, 100, 8) != sweep_key("b", grid)
    for items, sample, said in [
        (["learning_rate=log:1e-5..1e-2"], None, "`train.learning_rate` ranges over log:1e-5..1e-2: draw points from "
                                                 "it with --sample N"),
        (["learning_rate=1e-2..1e-5"], 2, "`train.learning_rate` ranges over 1e-2..1e-5: give LOW..HIGH with LOW "
                                          "below HIGH"),
        (["learning_rate=log:0..1e-5"], 2, "with LOW below HIGH and above 0 (a log range)"),
        (["lora_r=8,16"], 3, "sample=3, but 300 draws from the grid gave 2 different points"),
        (["lora_r=8,16"], 0, "sample=0: draw 1 or more points"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            sweep_points(base, check_grid(parse_grid(items)), sample)
        assert said in str(err.value), (items, str(err.value))
    from flows.sweep import edgar_tune_sweep

    ui = {"run": "latest", "grid": {"train.learning_rate": "log:1e-5..1e-2", "train.lora_r": [8, 16]}, "sample": 4}
    assert edgar_tune_sweep.validate_parameters(ui)["grid"] == ui["grid"]  # as the UI's form gives them to Prefect
    with pytest.raises(ConfigError, match=r"^--sample-seed seeds the draw of --sample: add --sample N"):
        _in_process("sweep", "--run", str(base), "--grid", "lora_r=8,16", "--sample-seed", "3")

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
    the base's stage folders are as they were. Then the same data, pruned, with a third point
    (`_a_weak_point_is_pruned_and_finished_later`): the point trained here trains nothing again, and the sweep run
    once more finds its MLflow run."""
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
    assert _in_process("sweep", "--run", "latest", "--grid", "learning_rate=log:1e-4..1e-2", "--sample", "3",
                       "--sample-seed", "7", "--dry-run") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("edgar-tune sweep --dry-run: 3 point(s) drawn at random (seed 7) beside latest")
    assert out.count("latest+learning_rate=") == 3
    assert " ".join(out.split()).count("train runs: train.learning_rate 0.003 ->") == 3, out

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

    with pytest.raises(ConfigError, match=r"^grid point train.profile_step=1000: train.profile_step=1000 but this "
                       "run trains 60 steps"):  # fmt: skip
        _in_process("sweep", "--run", "latest", "--grid", "profile_step=30,1000")
    assert not (tmp_path / "latest+profile_step=1000").exists()
    _a_weak_point_is_pruned_and_finished_later(tmp_path, prefect_server, client, point)


def _a_weak_point_is_pruned_and_finished_later(tmp_path: Path, env: dict, client, strong: Path) -> None:
    """`--prune` (after the sweep above, whose base and point finished): a point at a learning rate far too low
    validates at step 20 above their median and stops there: no weights published, no evaluation, no version
    registered; its checkpoint of step 20 kept and its curve so far beside it, its flow run `Pruned`, its training's
    MLflow run KILLED and nested under the sweep's, which ends FINISHED (a pruned point is not a failure). The
    decision stands for a sweep under the same rule; a sweep without pruning resumes the point at step 20 and
    finishes it."""
    from flows.sweep import check_grid, pruned_before, sweep_points
    from tasks.pruning import LIVE

    grid = ["--run", "latest", "--grid", "learning_rate=0.003,0.01,1e-5"]
    proc = _sweep(tmp_path, env, *grid, "--prune")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    weak = tmp_path / "latest+learning_rate=1e-05"
    # the point the sweep above trained trains nothing again: its row says so, and no version is added for it
    assert json.loads((strong / "summary.json").read_text())["stages"]["train"] == "Cached"
    rows = [" ".join(line.split()).lstrip("* ") for line in out[out.index("edgar-tune sweep of latest"):].splitlines()]
    assert next(r for r in rows if r.startswith("0.01 ")).endswith(" cached all cached"), rows
    pruned = json.loads((weak / "pruned.json").read_text())
    assert pruned["step"] == 20 and pruned["planned_steps"] == 60 and pruned["rule"] == {"min_points": 2,
                                                                                         "warmup": 0.25}  # fmt: skip
    assert set(pruned["peers"]) == {"latest", strong.name} and pruned["best_val_loss"] > pruned["median"]
    assert not (weak / "04_train").exists() and not (weak / "summary.json").exists()
    assert (weak / "04_train.checkpoints" / "checkpoint-20").is_dir()
    live = [json.loads(line) for line in (weak / LIVE).read_text().splitlines()]  # what points beside it judge by
    assert [(r["step"], r["tokens"], r["val_loss"]) for r in live] == [(20, pruned["tokens"], pruned["best_val_loss"])]
    assert "Finished in state Pruned(" in out
    row = next(" ".join(line.split()) for line in out.splitlines() if line.lstrip().startswith("1e-05 "))
    assert f"pruned at step 20/60: validation loss {pruned['best_val_loss']:.4f} > median" in row, row
    exp = client.get_experiment_by_name("edgar-tune")
    sweep = next(r for r in client.search_runs([exp.experiment_id], "tags.`edgar_tune.sweep.role` = 'sweep'")
                 if json.loads(r.data.tags["edgar_tune.sweep.prune"] or "null"))  # fmt: skip
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["pruned_points"] == 1
    killed = client.get_run(pruned["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["mlflow.parentRunId"] == sweep.info.run_id
    assert killed.data.tags["edgar_tune.pruned"].startswith("step 20 of 60: best validation loss")
    assert [h.step for h in client.get_metric_history(killed.info.run_id, "val_loss")] == [20]
    assert len(client.search_model_versions("name='edgar-tune-10k'")) == 1  # the 0.01 point's; none for the pruned
    point = next(p for p in sweep_points(tmp_path / "latest", check_grid({"learning_rate": [1e-5]})))
    assert pruned_before(point, pruned["rule"]) == pruned  # the sweep run again with --prune: no training
    assert pruned_before(point, pruned["rule"] | {"warmup": 0.5}) is None  # under another rule it trains on
    assert pruned_before(point, None) is None

    finish = _sweep(tmp_path, env, *grid)
    out = finish.stdout + finish.stderr
    assert finish.returncode == 0, out[-5000:]
    assert "training resumes at step 20 of 60" in out
    assert not (weak / "pruned.json").exists()
    assert not (weak / LIVE).exists()  # its whole curve is in 04_train now
    summary = json.loads((weak / "summary.json").read_text())
    assert summary["stages"]["train"] == "Completed" and summary["ppl_after"] > 0
    assert "pruned at" not in out[out.index("edgar-tune sweep of latest"):]
    assert len(client.search_model_versions("name='edgar-tune-10k'")) == 2
    # the same grid again (pruned or not: the same sweep) finds its MLflow run, no other
    sweeps = client.search_runs([exp.experiment_id], "tags.`edgar_tune.sweep.role` = 'sweep'")
    assert len(sweeps) == 2 and sweep.info.run_id in {r.info.run_id for r in sweeps}, sweeps
    assert client.get_run(sweep.info.run_id).data.tags["edgar_tune.sweep.prune"] == "null"


def _trained(folder: Path, tokens_per_step: int, curve: list[tuple[int, float]]) -> Path:
    """`folder` as a run folder whose training finished, as the train stage leaves it: its stats and its
    validation losses by step (`curve`)."""
    (folder / "04_train").mkdir(parents=True)
    steps = curve[-1][0]
    (folder / "04_train" / "stats.json").write_text(json.dumps({"steps": steps,
                                                                "train_tokens_seen": steps * tokens_per_step}))
    (folder / "04_train" / "val_loss.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n"
                                                                for s, v in curve))  # fmt: skip
    return folder


def test_the_median_rule_prunes_a_point_whose_best_is_above_the_other_points_median_by_the_same_tokens(tmp_path):
    """The rule a pruned sweep's trainings run under (tasks/pruning.py): at a validation, a point whose best
    validation loss so far is above the median of the other points' best by the same training tokens stops;
    not before `warmup` of its steps, not with fewer than `min_points` others, never at its last step. Tokens line
    the curves up: a point of twice the batch has read at its step 10 what the others read by step 20. The others
    are the points that finished and, by their curves so far, those still training that have validated as far (a
    spread sweep's points train at once); not one that was pruned."""
    from tasks.pruning import LIVE, PRUNED, describe, judge, live_curve, write_live

    a = _trained(tmp_path / "a", 1000, [(20, 3.0), (40, 2.5), (60, 2.4)])
    b = _trained(tmp_path / "b", 1000, [(20, 3.4), (40, 3.2), (60, 2.6)])
    c = _trained(tmp_path / "c", 2000, [(10, 3.1), (20, 2.2), (30, 2.0)])  # twice the tokens a step
    running = tmp_path / "d"  # its training has not finished, nor validated yet: not a reference
    (running / "04_train.checkpoints").mkdir(parents=True)
    rule = {"peers": [str(p) for p in (a, b, c, running)], "min_points": 2, "warmup": 0.25}
    by_20k = judge(3.2, 20, 60, 20_000, rule)  # by 20k tokens: a 3.0, b 3.4, c 3.1 (its step 10): median 3.1
    assert by_20k == {"step": 20, "planned_steps": 60, "tokens": 20_000, "best_val_loss": 3.2, "median": 3.1,
                      "peers": {"a": 3.0, "b": 3.4, "c": 3.1}, "training": [],
                      "rule": {"min_points": 2, "warmup": 0.25}}  # fmt: skip
    assert judge(3.1, 20, 60, 20_000, rule) is None  # at the median: goes on
    assert judge(2.6, 40, 60, 40_000, rule)["median"] == 2.5  # a 2.5, b 3.2, c 2.2 (its step 20)
    assert judge(float("inf"), 20, 60, 20_000, rule)["best_val_loss"] == float("inf")  # never finite: pruned
    assert judge(9.9, 10, 60, 10_000, rule) is None  # before a quarter of its steps
    assert judge(9.9, 60, 60, 60_000, rule) is None  # its last step: it has finished
    assert judge(9.9, 20, 60, 9_000, rule) is None  # no point had validated by 9k tokens
    assert judge(9.9, 20, 60, 20_000, rule | {"min_points": 4}) is None  # three have finished
    assert judge(9.9, 20, 60, 20_000, rule | {"warmup": 0.5}) is None

    # d trains on: its validations so far (as its training writes them, from its Trainer's log history) count by as
    # many tokens as they reach; e was pruned at 20k tokens, and f's curve is not one: neither counts
    history = [{"step": 5, "loss": 3.9}, {"step": 10, "eval_loss": 3.5}, {"step": 20, "eval_loss": 3.3}]
    write_live(running / LIVE, history, 1000)
    assert live_curve(running) == [(10_000, 3.5), (20_000, 3.3)]
    pruned, odd = tmp_path / "e", tmp_path / "f"
    for folder in (pruned, odd):
        folder.mkdir()
    write_live(pruned / LIVE, [{"step": 20, "eval_loss": 3.9}], 1000)
    (pruned / PRUNED).write_text("{}")
    (odd / LIVE).write_text('{"step": 20, "val_loss": 2.0}\n')  # no tokens
    rule["peers"] += [str(pruned), str(odd)]
    by_20k = judge(3.25, 20, 60, 20_000, rule)  # a 3.0, b 3.4, c 3.1, d 3.3: median 3.2
    assert (by_20k["median"], by_20k["peers"]["d"], by_20k["training"]) == (3.2, 3.3, ["d"]), by_20k
    assert describe(by_20k).endswith("> 3.2000, the median of 4 point(s) (1 still training) by the same tokens")
    assert judge(3.2, 20, 60, 20_000, rule) is None
    assert judge(9.9, 20, 60, 20_000, rule | {"min_points": 4})["peers"].keys() == {"a", "b", "c", "d"}
    by_40k = judge(2.6, 40, 60, 40_000, rule)  # d has not validated that far: it may yet do better by then
    assert (by_40k["median"], set(by_40k["peers"]), by_40k["training"]) == (2.5, {"a", "b", "c"}, [])
    assert describe(by_40k).endswith("the median of 3 finished point(s) by the same tokens")


def test_pruning_is_refused_where_the_points_validation_losses_would_not_compare(tmp_path):
    """`--prune` ranks points by their validation loss during training: refused where a point runs no validation,
    where the grid changes which held-out blocks are validated, and for a rule out of range; its settings alone,
    without --prune, are refused too."""
    from flows.sweep import check_grid, check_prune, sweep_points

    base = _config_folder(tmp_path / "latest")
    quiet = {"train.early_stopping_patience": 0, "train.eval_blocks": -1}  # what watches validations, off
    silent = _config_folder(tmp_path / "silent", **quiet, **{"train.eval_steps": 0})
    watched = _config_folder(tmp_path / "watched", **quiet)
    for folder, grid, said in [
        (silent, {"learning_rate": [1e-4, 3e-4]}, "pruning judges points by their validation loss during training, "
                                                  "and grid point train.learning_rate=0.0001 runs none"),
        (watched, {"eval_steps": [0, 20]}, "pruning judges points by their validation loss during training, and grid "
                                        "point train.eval_steps=0 runs none"),
        (base, {"eval_blocks": [16, 48]}, "the grid varies train.eval_blocks, so its points validate on other"),
        (base, {"eval.max_val_samples": [10, 20]}, "the grid varies eval.max_val_samples, so its points validate"),
        (base, {"tokenize.max_input_length": [64, 128]}, "grid point tokenize.max_input_length=64 makes its blocks "
                                                         "again, so it validates on other held-out blocks"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            check_prune(True, 2, 0.25, sweep_points(folder, check_grid(grid)))
        assert str(err.value).startswith(said), str(err.value)
    points = sweep_points(base, check_grid({"learning_rate": [1e-4, 3e-4], "eval_steps": [10, 20]}))
    assert check_prune(True, 2, 0.25, points) == {"min_points": 2, "warmup": 0.25}  # steps differ: tokens compare
    assert check_prune(False, 0, 7.0, points) is None
    with pytest.raises(ConfigError, match=r"^prune_min_points=0: give 1 or more"):
        check_prune(True, 0, 0.25, points)
    with pytest.raises(ConfigError, match=r"^prune_warmup=1.0: give a fraction from 0 to below 1"):
        check_prune(True, 2, 1.0, points)
    from edgar_tune.cli import PRUNE_MIN_POINTS, PRUNE_WARMUP
    from tasks.pruning import MIN_POINTS, WARMUP

    assert (PRUNE_MIN_POINTS, PRUNE_WARMUP) == (MIN_POINTS, WARMUP)  # the CLI's defaults are the flow's
    with pytest.raises(ConfigError, match=r"^--prune-warmup sets how --prune prunes: add --prune"):
        _in_process("sweep", "--run", str(base), "--grid", "learning_rate=1e-4,3e-4", "--prune-warmup", "0.5")

