"""Stage cache keys: each stage's key moves with what it reads, and only with that."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edgar_tune.config import REPO_ROOT, ConfigError, load_config
from tasks import cache
from tasks.cache import (
    CODE,
    OUTPUTS,
    STAGES,
    FileDigests,
    at_commit,
    changed,
    config_view,
    decide,
    folder_digest,
    forget,
    is_current,
    kept_otherwise,
    key_of,
    made_otherwise,
    read_stamps,
    record,
    rerun_refusal,
    rerun_stages,
    stage_inputs,
    stage_key,
    stage_overrides,
)
from tasks.io import DOWNLOAD, TOKENIZE, TRAIN, sha256_file


def _keys(run_dir: Path, name: str | None = None, **overrides) -> dict[str, str]:
    cfg = load_config("tiny", overrides)
    return {s: stage_key(s, name or str(run_dir), run_dir, cfg) for s in STAGES}


def test_a_training_hyperparameter_moves_only_the_training_keys(tmp_path):
    base, changed = _keys(tmp_path), _keys(tmp_path, **{"train.learning_rate": 1e-4})
    moved = [s for s in STAGES if base[s] != changed[s]]
    # evaluate's key moves too once train writes different weights (it hashes 04_train), not through the config
    assert moved == ["train", "register"]
    assert [s for s in STAGES if base[s] != _keys(tmp_path, **{"parse.val_items": ["7", "7A"]})[s]] == [
        "parse", "tokenize", "register"]  # fmt: skip
    # the perplexity's windows: both evaluations rescore, the training stands (its validations read two eval keys)
    assert [s for s in STAGES if base[s] != _keys(tmp_path, **{"eval.max_length": 64})[s]] == [
        "evaluate-base", "evaluate", "register"]  # fmt: skip
    assert "train" in [s for s in STAGES if base[s] != _keys(tmp_path, **{"eval.max_val_samples": 9})[s]]
    assert _keys(tmp_path / "other")["download"] != base["download"]  # another run folder, another key


def test_an_edited_deepspeed_config_or_hostfile_trains_again(tmp_path):
    """The config holds the names of the DeepSpeed JSON and the hostfile: an edit of either (offload on, a node more)
    left the training standing as cached. What they hold is in the train key; without either, the key has no such
    part, so the keys of runs without DeepSpeed are as they were."""
    ds, hosts = tmp_path / "ds.json", tmp_path / "hostfile"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    hosts.write_text("worker-1 slots=8\n")
    files = {"train.deepspeed": str(ds), "train.hostfile": str(hosts)}
    first = _keys(tmp_path, **files)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    second = _keys(tmp_path, **files)
    hosts.write_text("worker-1 slots=8\n# worker-2 is back\nworker-2 slots=8\n")
    third = _keys(tmp_path, **files)
    assert [s for s in STAGES if first[s] != second[s]] == ["train"] == [s for s in STAGES if second[s] != third[s]]
    assert "engine" not in stage_inputs("train", str(tmp_path), tmp_path, load_config("tiny"))
    shipped = json.loads((REPO_ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    zero2 = load_config("tiny", {"train.deepspeed": "zero2"})
    assert stage_inputs("train", str(tmp_path), tmp_path, zero2)["engine"] == {"deepspeed": shipped}


def test_the_task_sees_only_the_config_in_its_key():
    cfg = load_config("tiny", {"train.learning_rate": 1e-4, "train.seed": 7})
    view = config_view(cfg, "tokenize")
    assert view.train.seed == 7 and view.train.learning_rate == type(cfg.train)().learning_rate
    assert view.data == cfg.data and view.eval == type(cfg.eval)()
    # train.seed seeds tiny-llama's weights, which tokenize builds; another model's seed sweep keeps its blocks
    other = load_config("tiny", {"model.name": "smollm2-135m", "train.seed": 7})
    assert config_view(other, "tokenize").train.seed == 10


def test_a_rerun_refuses_a_change_it_would_record_without_making_it():
    """`rerun STAGE --set KEY=VALUE` writes the value into config.yaml and the registered version's params: a key
    that a stage the rerun does not run reads is refused, naming the rerun that would make it (the last stage whose
    rerun runs every stage that reads it). The two perplexities run together, the one not asked for through the
    cache."""
    assert rerun_stages("train") == (["evaluate-base", "train", "evaluate", "register"],
                                     ["train", "evaluate", "register"])  # fmt: skip
    assert rerun_stages("evaluate-base") == (["evaluate-base", "evaluate", "register"], ["evaluate-base", "register"])
    assert rerun_stages("register") == (["register"], ["register"])
    run = load_config("tiny")

    def refusal(stage: str, preset: str = "tiny", **changes) -> str | None:
        before = run if preset == "tiny" else load_config(preset)
        return rerun_refusal(stage, before, load_config(preset, changes), "runs/x")

    says = refusal("train", **{"data.tickers": ["MSFT"]})
    assert says.startswith("`data.tickers` is read by download, parse and tokenize, which `rerun train` does not "
                           "run: the run's config.yaml and registered version would say ['MSFT'] of outputs made "
                           "with ['AMZN']. Rerun from `download` with the same change (edgar-tune rerun download "
                           "--run runs/x --set ...)"), says  # fmt: skip
    assert "read by tokenize, which `rerun evaluate` does not run" in refusal("evaluate", **{"model.revision": "v1"})
    assert "Rerun from `train`" in refusal("evaluate", **{"train.learning_rate": 1e-4})
    assert "Rerun from `evaluate`" in refusal("register", **{"generate.top_k": 5})  # evaluate-base comes along
    assert "Rerun from `parse`" in refusal("train", **{"train.train_data_split_seed": 3})  # the split is parse's
    assert "Rerun from `tokenize`" in refusal("train", **{"train.seed": 3})  # tiny-llama's weights: tokenize's
    assert "is read by train, which `rerun evaluate` does not" in refusal("evaluate", **{"eval.max_val_samples": 9})
    assert refusal("train", "demo", **{"train.seed": 3}) is None  # a seed sweep of smollm2-135m
    assert refusal("train", **{"train.learning_rate": 1e-4, "eval.stride": 32}) is None
    assert refusal("evaluate", **{"eval.max_length": 64}) is None  # evaluate-base runs again with it
    assert refusal("register", **{"registry.experiment": "other"}) is None  # register reads it


def test_a_registration_vouches_only_for_outputs_made_as_the_run_says(tmp_path):
    """Each stage's stamp records the config and the folders it read; a registration (and a rerun that ends in one)
    compares them with config.yaml and the folders as they stand, so that a registered version's params and
    perplexities describe its weights: not after config.yaml was edited, a stage was run again by hand, or run
    with `--set` (which leaves no stamp)."""
    cfg = load_config("tiny")
    for stage in STAGES[:-1]:  # the outputs a registration reads
        (tmp_path / OUTPUTS[stage]).parent.mkdir(exist_ok=True)
        (tmp_path / OUTPUTS[stage]).write_text(json.dumps({"filings": [], "base_model": {}}))
    (tmp_path / TRAIN / "adapter.safetensors").write_bytes(b"before")
    for stage in STAGES[:-1]:
        inputs = stage_inputs(stage, str(tmp_path), tmp_path, cfg)
        record(tmp_path, stage, key_of(inputs), inputs)
    assert made_otherwise(tmp_path, cfg) is None
    assert made_otherwise(tmp_path, load_config("tiny", {"registry.model_name": "other"})) is None  # register's own
    edited = load_config("tiny", {"train.learning_rate": 0.01})  # config.yaml edited by hand
    says = made_otherwise(tmp_path, edited)
    assert says == ("this run cannot be registered as it stands: `train` ran with train.learning_rate=0.003, where "
                    "config.yaml says train.learning_rate=0.01. Its registered version would name settings, data or "
                    "perplexities its weights were not made with. Rerun from `train` (`edgar-tune rerun train --run "
                    "RUN`), which makes it and the stages after it again")  # fmt: skip
    # a rerun that remakes train registers; one that does not is refused before it runs anything
    assert kept_otherwise(tmp_path, edited, rerun_stages("train")[0]) is None
    assert kept_otherwise(tmp_path, edited, rerun_stages("evaluate")[0]) == says
    assert kept_otherwise(tmp_path, edited, ["train"]) is None  # no registration: nothing to vouch for
    stamp = json.loads((tmp_path / ".stages" / "train.json").read_text())
    del stamp["config"]["train"]["learning_rate"]  # a key this edgar-tune has and the one that ran lacked
    (tmp_path / ".stages" / "train.json").write_text(json.dumps(stamp))
    assert made_otherwise(tmp_path, edited) is None

    (tmp_path / TRAIN / "adapter.safetensors").write_bytes(b"after")  # `edgar-tune stage train` again
    says = made_otherwise(tmp_path, cfg)
    assert "`evaluate` read 04_train as it was before a later change (a stage run again by hand, or a file " \
           "written there since)" in says  # fmt: skip
    assert "Rerun from `evaluate` (`edgar-tune rerun evaluate --run RUN`)" in says
    forget(tmp_path, "evaluate-base")  # `stage evaluate-base --set eval.stride=32`: no stamp
    says = made_otherwise(tmp_path, cfg)
    assert says.startswith("this run cannot be registered as it stands: `evaluate-base`'s outputs carry no record of "
                           "what made them (`edgar-tune stage evaluate-base --set ...` leaves none, as does a stage "
                           "stopped part-way); `evaluate` read 04_train")  # fmt: skip
    assert "Rerun from `evaluate` " in says  # which runs both evaluations
    record(tmp_path, "evaluate-base", "key")  # a stamp from before stamps recorded what they read: as it is
    record(tmp_path, "evaluate", "key")
    assert made_otherwise(tmp_path, cfg) is None
    forget(tmp_path, "train")
    (tmp_path / OUTPUTS["train"]).unlink()  # an output that is not there: the stage that reads it says so
    assert made_otherwise(tmp_path, cfg) is None


def test_a_stage_run_by_hand_takes_only_the_keys_it_reads():
    """`edgar-tune stage STAGE --set KEY=VALUE` for a key the stage does not read changed nothing, silently; it is
    refused, naming the stages that read it. One it reads is returned: the outputs it makes are left unstamped."""
    run = load_config("tiny")

    def stage(name: str, **changes) -> dict:
        return stage_overrides(name, run, load_config("tiny", changes))

    assert stage("train", **{"train.learning_rate": 0.01, "eval.max_val_samples": 16}) == {
        "train.learning_rate": (0.003, 0.01), "eval.max_val_samples": (-1, 16)}  # fmt: skip
    assert stage("train", **{"registry.tracking_uri": "http://mlflow:5000"}) == {}  # its live curves: not its key
    assert stage("register", **{"registry.model_name": "other"}) == {"registry.model_name": ("edgar-tune-10k", "other")}
    with pytest.raises(ConfigError, match=r"^`train.learning_rate` is not read by `evaluate`, so --set would change "
                       r"nothing it does; train reads it \(`edgar-tune stage train --set \.\.\.`, or `edgar-tune "
                       r"rerun` to record the change in config.yaml\)$"):  # fmt: skip
        stage("evaluate", **{"train.learning_rate": 0.01})
    with pytest.raises(ConfigError, match="`train.learning_rate` is not read by `register`"):  # it records config.yaml
        stage("register", **{"train.learning_rate": 0.01})
    with pytest.raises(ConfigError, match="download, parse and tokenize read it"):
        stage("train", **{"data.tickers": ["MSFT"]})


def test_tokenize_is_compared_at_the_commit_it_recorded(tmp_path):
    """A hub id's revision (`main`) is keyed as the commit the run resolved; config.yaml keeps what was asked."""
    asked, commit = load_config("tiny", {"model.name": "org/model"}), "c" * 40
    (tmp_path / TOKENIZE).mkdir()
    (tmp_path / TOKENIZE / "stats.json").write_text(json.dumps({"base_model": {"revision": commit}}))
    for cfg in (at_commit(asked, commit), asked):  # as the flow keys it; as asked, where the hub named no commit
        inputs = stage_inputs("tokenize", str(tmp_path), tmp_path, cfg)
        record(tmp_path, "tokenize", key_of(inputs), inputs)
        assert made_otherwise(tmp_path, asked, ["tokenize"]) is None
    says = made_otherwise(tmp_path, load_config("tiny", {"model.name": "org/model", "model.revision": "v2"}),
                          ["tokenize"])  # fmt: skip
    assert "`tokenize` ran with model.revision=None, where config.yaml says model.revision='v2'" in says


def test_every_stage_module_is_in_some_stage_code_version():
    listed = {Path(p).name for paths in CODE.values() for p in paths}
    plumbing = {"__init__.py", "io.py", "stages.py", "cache.py", "storage.py", "limits.py", "progress.py",  # no output
                "export.py", "gguf.py",  # `edgar-tune export`, of a registered version: no stage runs them
                "pruning.py"}  # whether a sweep's training goes on, never what one that finishes makes
    modules = {p.name for p in (REPO_ROOT / "tasks").glob("*.py")} - plumbing
    assert modules <= listed, modules - listed


def test_triton_on_a_cpu_torch_moves_no_key():
    """`make test` installs Triton into the venv for the kernel tests; counted by version, it moved the keys of
    evaluate-base, train and evaluate, and the next `make demo` trained again (312 s) for kernels a CPU torch never
    runs. On such a torch the code version holds what it held before Triton came."""
    from importlib import metadata

    import torch

    if torch.version.cuda or torch.version.hip:
        pytest.skip("a torch built for GPUs runs Triton's kernels: its version counts there")
    try:
        metadata.version("triton")
    except metadata.PackageNotFoundError:
        pytest.skip("Triton is not installed here (make test installs it)")
    assert cache._lib_line("triton") == "triton absent"
    assert cache._lib_line("torch") == f"torch=={torch.__version__}"


def test_download_digest_ignores_where_this_machine_keeps_the_filings(tmp_path):
    def manifest(folder: Path, root: str) -> Path:
        (folder / DOWNLOAD).mkdir(parents=True)
        filing = {"ticker": "AMZN", "root": root, "files": {}, "sha256": {"primary_document": "ab"}}
        (folder / DOWNLOAD / "manifest.json").write_text(json.dumps({"filings": [filing], "skipped": []}))
        return folder / DOWNLOAD

    assert folder_digest(manifest(tmp_path / "a", "/home/a/.cache")) == folder_digest(manifest(tmp_path / "b", "/b"))


def test_a_look_at_the_tokenized_blocks_moves_no_key(tmp_path):
    """`load_from_disk(RUN/03_tokenize/train).filter(...)` in a notebook writes datasets' cache file beside the
    blocks; counted, it moved train's key, and the next run trained again on the same blocks and registered the same
    weights as a new version (seen on a tiny run). Only what `load_from_disk` reads counts now; new blocks do."""
    from datasets import Dataset, load_from_disk

    train = tmp_path / "03_tokenize" / "train"
    Dataset.from_dict({"input_ids": [[i] * 4 for i in range(50)]}).save_to_disk(str(train))
    keys, stamps = _keys(tmp_path), read_stamps(tmp_path, "train")
    assert len(load_from_disk(str(train)).filter(lambda row: row["input_ids"][0] % 2 == 0)) == 25
    assert [p.name for p in train.glob("cache-*.arrow")]  # as a notebook leaves it
    assert _keys(tmp_path) == keys and not changed(stamps, read_stamps(tmp_path, "train"))
    # nor what a Mac's Finder, Jupyter or Windows' Explorer leave in a folder someone opens (a .DS_Store in
    # 03_tokenize trained again and registered v3 of the same run's weights)
    for rel in (".DS_Store", "train/._data-00000-of-00001.arrow", ".ipynb_checkpoints/stats-checkpoint.json",
                "Thumbs.db"):  # fmt: skip
        (tmp_path / "03_tokenize" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "03_tokenize" / rel).write_bytes(b"\x00\x00\x00\x01Bud1")
    assert _keys(tmp_path) == keys and not changed(stamps, read_stamps(tmp_path, "train"))
    Dataset.from_dict({"input_ids": [[i] * 4 for i in range(49)]}).save_to_disk(str(train))  # new blocks
    assert _keys(tmp_path)["train"] != keys["train"]
    # beside files that are not a saved dataset's (here a state.json of another kind), every file counts
    (tmp_path / "04_train").mkdir()
    (tmp_path / "04_train" / "state.json").write_text("{}")
    before = folder_digest(tmp_path / "04_train")
    (tmp_path / "04_train" / "cache-0.arrow").write_bytes(b"x")
    assert folder_digest(tmp_path / "04_train") != before


def test_a_reworded_data_report_trains_and_scores_nothing_again(tmp_path):
    """Tokenize's data report (`data_report.json`/`.md`) says what each Item of each filing is and why; an upgrade
    that words a parse warning or an Item's reason otherwise writes new reports beside the same blocks. Only the
    registration reads them (it logs them): before, the train stage's key took the whole of 03_tokenize, so a
    reworded report trained again and scored again on the same blocks. A stage stamped under that earlier key
    stands under it (an upgrade is no reason to train again), until what it read moves."""
    from datasets import Dataset

    cfg = load_config("tiny")
    tok = tmp_path / TOKENIZE
    Dataset.from_dict({"input_ids": [[i] * 4 for i in range(50)]}).save_to_disk(str(tok / "train"))
    (tok / "stats.json").write_text(json.dumps({"base_model": {}}))
    (tok / "data_report.md").write_text("| AMZN | 2020 | 10 | incorporated_by_reference |\n")
    keys = _keys(tmp_path)
    (tok / "data_report.md").write_text("| AMZN | 2020 | 10 | ok |\n")  # a reason, a status: the same blocks
    assert {s for s in STAGES if _keys(tmp_path)[s] != keys[s]} == {"register"}
    Dataset.from_dict({"input_ids": [[i] * 4 for i in range(49)]}).save_to_disk(str(tok / "train"))
    assert {"train", "evaluate", "register"} <= {s for s in STAGES if _keys(tmp_path)[s] != keys[s]}

    # A training stamped before: its key took the whole folder, reports and all.
    (tmp_path / OUTPUTS["train"]).parent.mkdir()
    (tmp_path / OUTPUTS["train"]).write_text("{}")
    before = stage_inputs("train", str(tmp_path), tmp_path, cfg, (TOKENIZE,))
    record(tmp_path, "train", key_of(before), before)
    fresh, key, inputs = decide("train", str(tmp_path), tmp_path, cfg, force=False)
    assert (fresh, key, inputs["reads"]) == (False, key_of(before), before["reads"])  # Cached under its own key
    assert made_otherwise(tmp_path, cfg, ["train"]) is None  # and a registration vouches for it
    assert decide("train", str(tmp_path), tmp_path, cfg, force=True)[0] is True
    (tok / "data_report.md").write_text("| AMZN | 2020 | 10 | ok, reworded again |\n")  # moves that whole folder
    fresh, key, inputs = decide("train", str(tmp_path), tmp_path, cfg, force=False)
    assert fresh and key == stage_key("train", str(tmp_path), tmp_path, cfg) != key_of(before)
    record(tmp_path, "train", key, inputs)  # trained again, stamped under the key that leaves the reports out
    (tok / "data_report.md").write_text("| AMZN | 2020 | 10 | ok |\n")
    assert decide("train", str(tmp_path), tmp_path, cfg, force=False)[:2] == (False, key)
    assert made_otherwise(tmp_path, cfg, ["train"]) is None


def test_an_upgrade_that_adds_a_config_key_runs_no_stage_again(tmp_path):
    """A stage's key held the whole config, the sections it does not read at their defaults: a key added to any
    section (`generate.held_out`, 2026-12-04) moved every stage's key, and the demo's next run downloaded, parsed,
    tokenized, trained, scored and registered again (a version more, the same perplexity). Now the key holds only
    what the stage reads, and a stage stamped the old way stands under its key while the keys it reads are as it
    recorded them (one it ran without, at its default)."""
    from tasks.cache import why_it_runs

    cfg = load_config("tiny")
    for stage in STAGES:
        (tmp_path / OUTPUTS[stage]).parent.mkdir(exist_ok=True)
        (tmp_path / OUTPUTS[stage]).write_text(json.dumps({"filings": [], "base_model": {}}))

    def stamp_as_before(stage: str, without: tuple[str, ...] = ("generate.held_out", "generate.max_new_tokens"),
                        ) -> str:  # fmt: skip
        """Stamp `stage` as an edgar-tune before `without` did: its whole config view, lacking those keys."""
        inputs = stage_inputs(stage, str(tmp_path), tmp_path, cfg)
        inputs["config"] = config_view(cfg, stage).model_dump(mode="json")
        for key in without:
            section, name = key.split(".")
            del inputs["config"][section][name]
        record(tmp_path, stage, key_of(inputs), inputs)
        return key_of(inputs)

    stamped = {stage: stamp_as_before(stage) for stage in STAGES}
    for stage in STAGES:
        fresh, key, _ = decide(stage, str(tmp_path), tmp_path, cfg, force=False)
        assert (fresh, key) == (False, stamped[stage]), stage  # cached under the key it was stamped with
        assert stage_key(stage, str(tmp_path), tmp_path, cfg) != stamped[stage]
    # What it reads moved since: it runs, and says why
    faster = load_config("tiny", {"train.learning_rate": 0.01})
    assert decide("train", str(tmp_path), tmp_path, faster, force=False)[0] is True
    assert decide("evaluate", str(tmp_path), tmp_path, faster, force=False)[0] is False  # it reads 04_train only
    assert decide("train", str(tmp_path), tmp_path, cfg, force=True)[0] is True
    # A key it reads that the edgar-tune which ran it lacked: it ran as at the key's default
    stamp_as_before("train", ("train.learning_rate",))
    default = load_config("tiny", {"train.learning_rate": cache.PipelineConfig().train.learning_rate})
    assert decide("train", str(tmp_path), tmp_path, default, force=False)[0] is False
    fresh, _, inputs = decide("train", str(tmp_path), tmp_path, cfg, force=False)
    assert fresh and why_it_runs(tmp_path, "train", cfg, inputs) == (
        f"train.learning_rate {cache.PipelineConfig().train.learning_rate!r} -> {cfg.train.learning_rate!r}")
    # Stamped now: the key holds what the stage reads, so a key added elsewhere leaves it as it is
    inputs = stage_inputs("train", str(tmp_path), tmp_path, cfg)
    assert set(inputs["config"]) == {"train", "eval"} and set(inputs["config"]["eval"]) == set(
        cache.TRAINING_EVAL_KEYS)  # fmt: skip


def test_a_stamp_stands_only_with_its_outputs_and_its_key(tmp_path):
    record(tmp_path, "train", "k1")
    assert not is_current(tmp_path, "train", "k1")  # no 04_train/stats.json
    (tmp_path / "04_train").mkdir()
    (tmp_path / "04_train" / "stats.json").write_text("{}")
    assert is_current(tmp_path, "train", "k1") and not is_current(tmp_path, "train", "k2")


def test_the_digest_memo_rereads_a_file_that_changed_and_only_that(tmp_path, monkeypatch):
    run = tmp_path / "run"
    label = str(run)  # the run's name in its keys, which a move keeps (the next test)
    (run / "04_train").mkdir(parents=True)
    weights = run / "04_train" / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    (run / "04_train" / "stats.json").write_text("{}")
    memo = run / ".stages" / "digests.json"
    plain = folder_digest(run / "04_train")
    # a file written just now may still change within its timestamps' resolution: it is hashed but not remembered
    assert _keys(run, label)["evaluate"] and not memo.exists()
    monkeypatch.setattr(cache, "_SETTLED_NS", 0)
    first = _keys(run, label)
    entries = json.loads(memo.read_text())
    name = "04_train/model.safetensors"  # by its path in the run: a folder moved keeps what it remembers
    assert entries[name]["sha256"] == sha256_file(weights)
    assert folder_digest(run / "04_train", FileDigests(memo, run)) == plain  # the memo gives what reading gives
    # a remembered file whose stamps are unchanged is not read again: its remembered digest is what counts
    entries[name]["sha256"] = "0" * 64
    memo.write_text(json.dumps(entries))
    assert folder_digest(run / "04_train", FileDigests(memo, run)) != plain
    run = run.rename(tmp_path / "moved")  # nor after the run folder moved on its disk (a file's stamps stay)
    weights, memo = run / "04_train" / "model.safetensors", run / ".stages" / "digests.json"
    assert folder_digest(run / "04_train", FileDigests(memo, run)) != plain
    # a memo from before names were relative to the run reads the same
    memo.write_text(json.dumps({str(weights.resolve()): entries[name]}))
    assert folder_digest(run / "04_train", FileDigests(memo, run)) != plain
    memo.unlink()
    assert _keys(run, label) == first
    # an edit in place, same size, with the old mtime put back, still moves the key (ctime moves)
    stat = weights.stat()
    time.sleep(0.05)  # past the file system's timestamp tick (the memo's settling time does this outside tests)
    with open(weights, "r+b") as f:
        f.write(b"b")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    moved = _keys(run, label)
    assert moved["evaluate"] != first["evaluate"] and moved["register"] != first["register"]
    assert moved["train"] == first["train"]  # train reads 03_tokenize, not its own folder
    assert folder_digest(run / "04_train") == folder_digest(run / "04_train", FileDigests(memo, run)) != plain
    # a file that is gone leaves the memo at the next key, so it does not grow with every retrained run
    assert name in json.loads(memo.read_text())
    weights.unlink()
    _keys(run, label)
    assert name not in json.loads(memo.read_text())


def test_a_run_folder_moved_keeps_its_keys_and_its_registration_key(tmp_path):
    """A run was named in its keys by its folder's path: `mv runs/a runs/b` and the next run in it redid every
    stage, training included, and registered the same weights as a new version (seen on a tiny run: 43.6 s, v2).
    Its name is now the path it first ran at, recorded in the folder; a folder from before the record keeps the
    keys its path gave it."""
    from tasks.registry import run_key
    from tasks.storage import RUN_NAME, RunFolder

    old = RunFolder.open(str(tmp_path / "a"))
    (old.local / "04_train").mkdir()
    (old.local / "04_train" / "stats.json").write_text('{"steps": 10}')
    assert old.keyed_as == str(old.local)  # no record yet: its path, as before
    before = _keys(old.local, name=old.keyed_as)
    registered = run_key(old.local)
    old.name_run()
    assert json.loads((old.local / RUN_NAME).read_text()) == {"name": str(old.local)}
    assert _keys(old.local, name=old.keyed_as) == before  # recorded, the keys stay
    moved = RunFolder.open(str(old.local.rename(tmp_path / "b")))
    assert moved.keyed_as == str(tmp_path / "a")
    assert _keys(moved.local, name=moved.keyed_as) == before and run_key(moved.local) == registered
    moved.name_run()  # a record stands once written
    assert moved.keyed_as == str(tmp_path / "a")
    (moved.local / RUN_NAME).write_text('{"nam')  # damaged by hand: said, not guessed
    with pytest.raises(ConfigError, match=r"run.json does not name the run \(JSONDecodeError: .*\); put back the "):
        _ = moved.keyed_as
    (moved.local / RUN_NAME).unlink()  # without it, a folder is named by where it is
    assert _keys(moved.local, name=moved.keyed_as) != before and run_key(moved.local) != registered


def test_read_stamps_show_a_stage_that_changed_what_it_reads(tmp_path):
    (tmp_path / "03_tokenize" / "train").mkdir(parents=True)
    shard = tmp_path / "03_tokenize" / "train" / "data-00000-of-00001.arrow"
    shard.write_bytes(b"x" * 64)
    (tmp_path / "04_train").mkdir()
    before = read_stamps(tmp_path, "train")
    (tmp_path / "04_train" / "stats.json").write_text("{}")  # its own output: not an input
    assert changed(before, read_stamps(tmp_path, "train")) == []
    (tmp_path / "03_tokenize" / "train" / "cache-f161d2487399086b.arrow").write_bytes(b"index")  # what datasets did
    shard.unlink()
    shard.write_bytes(b"y" * 64)  # rewritten: another inode
    assert changed(before, read_stamps(tmp_path, "train")) == [
        "03_tokenize/train/cache-f161d2487399086b.arrow", "03_tokenize/train/data-00000-of-00001.arrow"]  # fmt: skip
