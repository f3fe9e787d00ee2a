"""Promotion is gated on a real MLflow store (sqlite): `champion` moves only to a version with lower perplexity
on the same validation tokens; otherwise the new version is the `challenger`. A champion scored on other
validation text (last year's MD&A) is scored again, for real, on the new run's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import mlflow
import pytest

from tests.conftest import REPO, free_port, kill_group, lines_until, lock_holder, migrated_prefect_home, run_cli


def test_champion_moves_only_on_lower_perplexity_on_the_same_validation_data(tmp_path):
    from tasks.registry import CHALLENGER, CHAMPION, promote

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")

    def version(ppl: float, val_sha: str, how: str = "window 128") -> str:
        v = client.create_model_version("m", source=(tmp_path / "weights").as_uri()).version
        for key, value in {"val_sha256": val_sha, "val_perplexity": repr(ppl), "val_scoring": how}.items():
            client.set_model_version_tag("m", v, key, value)
        return str(v)

    def alias(v: str, ppl: float, val_sha: str, how: str = "window 128", rescore=None) -> str:
        return promote(client, "m", v, ppl, val_sha, how, rescore)["alias"]

    v1 = version(10.0, "mdna-a")
    assert alias(v1, 10.0, "mdna-a") == CHAMPION
    v2 = version(12.0, "mdna-a")  # worse: challenger, the champion stays
    assert alias(v2, 12.0, "mdna-a") == CHALLENGER
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == v1
    v3 = version(8.0, "mdna-a")  # better on the same data: takes the champion alias
    assert alias(v3, 8.0, "mdna-a") == CHAMPION
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == v3
    v4 = version(2.0, "mdna-b")  # lower, but on other validation text and nothing rescores: challenger
    assert alias(v4, 2.0, "mdna-b") == CHALLENGER
    compared = json.loads(client.get_model_version("m", v4).tags["champion_comparison"])
    assert compared == {"version": v3, "perplexity": None,
                        "basis": "it was scored on other validation data, and registry.rescore_champion is false"}
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == v3
    assert alias(v3, 8.0, "mdna-a") == CHAMPION  # a retry of the champion keeps it
    assert str(client.get_model_version_by_alias("m", CHALLENGER).version) == v4
    # The same text scored another way (a longer window) is rescored too; the score is kept on the champion.
    calls = []

    def rescore(champion) -> tuple[float, str]:
        calls.append(str(champion.version))
        return 7.5, "rescored on this run's validation data"

    v5 = version(7.0, "mdna-a", "window 256")
    assert alias(v5, 7.0, "mdna-a", "window 256", rescore) == CHAMPION and calls == [v3]
    v6 = version(7.2, "mdna-a", "window 256")  # v5 was scored that way: compared directly, no rescoring
    assert alias(v6, 7.2, "mdna-a", "window 256", rescore) == CHALLENGER and calls == [v3]
    assert alias(v6, 7.2, "mdna-c", "window 256", lambda c: (None, "its tokenizer is not this run's")) == CHALLENGER


def test_a_person_promotes_a_version_by_hand_and_the_registry_records_who_and_why(tmp_path, monkeypatch, capsys):
    """`edgar-tune promote` on a real sqlite store: a rollback to an older version, a challenger made champion (it
    loses the challenger alias), each version tagged with who did it, why, and which version held the alias; a
    note when the promoted version scored worse on the data they share; clear errors for what does not exist."""
    from tasks.registry import CHALLENGER, CHAMPION, PROMOTED, promote, rescored_key, versions

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("m")
    for ppl, val in ((9.0, "mdna-a"), (8.0, "mdna-b"), (8.5, "mdna-b")):  # v1 champion, v2 champion, v3 challenger
        v = client.create_model_version("m", source=(tmp_path / "weights").as_uri()).version
        for key, value in {"val_sha256": val, "val_perplexity": repr(ppl), "val_scoring": "window 128"}.items():
            client.set_model_version_tag("m", v, key, value)
        if str(v) == "3":  # tuned on conversations: served from `messages`, not a `prompt`
            client.set_model_version_tag("m", v, "chat", "true")
        promote(client, "m", str(v), ppl, val, "window 128", lambda champion: (9.5, "rescored"))
    assert client.get_model_version("m", "1").tags[rescored_key("mdna-b", "window 128")] == "9.5"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgar_tune.cli", *args, "--name", "m", "--tracking-uri", uri],
                              cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip

    def refused(*args: str) -> str:
        """What `edgar-tune ARGS --tracking-uri URI` refuses with, run in this process (status 2 and its line, or a
        ConfigError, which the CLI prints as `edgar-tune: error: ...` with status 2, no traceback): the imports a
        subprocess pays cost 3 s a call."""
        from edgar_tune.cli import build_parser
        from edgar_tune.config import ConfigError

        parsed = build_parser().parse_args([*args, "--tracking-uri", uri])
        capsys.readouterr()
        try:
            status = parsed.fn(parsed)
        except ConfigError as err:
            return str(err)
        assert status == 2, status
        return capsys.readouterr().err

    listed = cli("models")
    rows = {line.split()[0]: line.split()[1:5] for line in listed.stdout.splitlines() if line.startswith("  v")}
    assert rows.pop("version") == ["aliases", "validation", "perplexity", "on"]
    assert rows == {"v3": ["challenger", "A", "8.5000", "-"],  # the columns: perplexity on A, on B
                    "v2": ["champion", "A", "8.0000", "-"],
                    "v1": ["-", "B", "9.5000*", "9.0000"]}, listed.stdout  # fmt: skip
    assert "validation A: first held out by v2 (-); sha256 mdna-b, window 128" in listed.stdout
    assert "3 version(s); perplexity on held-out validation data" in listed.stdout  # none trained on 10-Ks
    lines = [line.split() for line in listed.stdout.splitlines() if line.startswith("  v")]
    assert lines[0][-2:] == ["takes", "registered"]  # before the date and time the version was registered
    assert {row[0]: row[-3] for row in lines[1:]} == {"v3": "messages", "v2": "prompt", "v1": "prompt"}
    assert "the versions differ, so moving an alias between two that differ changes what its clients must send" in (
        listed.stdout)
    newest = cli("models", "--last", "1")  # the newest, and the champion, whatever its age
    assert [line.split()[0] for line in newest.stdout.splitlines() if line.startswith("  v")] == ["version", "v3", "v2"]
    assert "1 older version(s) without an alias not shown (--last 1); --last 0 shows them all" in newest.stdout
    assert "* scored later" in listed.stdout and "* scored later" not in newest.stdout  # said where a * is shown
    assert [r["version"] for r in json.loads(cli("models", "--last", "1", "--json").stdout)] == ["3", "2"]
    rolled = cli("promote", "1", "--reason", "v2 misreads segment tables")
    assert rolled.returncode == 0, rolled.stderr
    assert "m v1 is now @champion (was v2)" in rolled.stdout
    assert "note: v1's perplexity 9.5000 is higher than v2's 8.0000 on v2's validation data" in rolled.stdout
    assert "note: no edgar-tune.model.promoted event sent: no Prefect server is configured (PREFECT_API_URL)" in (
        rolled.stdout)  # automations on the champion run on a server (the next test has one)
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == "1"
    record = json.loads(client.get_model_version("m", "1").tags[PROMOTED])
    assert record["alias"] == CHAMPION and record["before"] == "2" and record["reason"] == "v2 misreads segment tables"
    kept = cli("promote", "3")  # the challenger becomes champion and is no longer the challenger
    assert kept.returncode == 0 and "m v3 is now @champion (was v1)" in kept.stdout and "higher" not in kept.stdout
    assert ("note: v3 is prompted with messages where v1 was with prompt: the alias's clients must send those "
            "instead") in kept.stdout  # fmt: skip
    assert client.get_registered_model("m").aliases == {CHAMPION: 3}, CHALLENGER
    again = cli("promote", "v3")  # as `edgar-tune models` shows it
    assert "m v3 is already @champion" in again.stdout and "event" not in again.stdout  # nothing moved: no event
    assert "m has no version 7; it has 1, 2, 3" in refused("promote", "7", "--name", "m")
    # An alias MLflow refuses, or the champion's in other case (MLflow's aliases are case-sensitive): refused before
    # the version is tagged as promoted (MLflow refused the first after the tag, in a traceback; took the second).
    for alias, said in (("bad alias", "--alias 'bad alias': an alias is letters, digits, _ and -"),
                        ("v2", "nor a version's name such as v3"),
                        ("Champion", "--alias 'Champion': aliases are case-sensitive, and the model's is `champion`; "
                                     "give --alias champion")):  # fmt: skip
        assert said in refused("promote", "2", "--alias", alias, "--name", "m")
    assert PROMOTED not in client.get_model_version("m", "2").tags
    assert client.get_registered_model("m").aliases == {CHAMPION: 3}
    assert "no registered model 'n' (registry.model_name); this store has m" in refused("models", "--name", "n")
    for command, model, said in (("generate", "models:/m@best", "m has no version @best; its aliases are @champion "
                                                             "(v3) (`edgar-tune models --name m` lists its versions)"),
                                 ("export", "models:/m/7", "m has no version 7; it has 1, 2, 3"),
                                 ("generate", "m", "--model m: give a registered version, models:/NAME@ALIAS or "
                                                   "models:/NAME/N (e.g. models:/m@champion if m is the registered "
                                                   "model")):  # fmt: skip
        assert said in refused(command, "--model", model, *(["--prompt", "x"] if command == "generate" else
                                                              ["--out", str(tmp_path / "export")]))  # fmt: skip
    # Where no store is, nothing is made: MLflow would create an empty one, which holds no models.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(REPO)}
    lost = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "models"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert lost.returncode == 2 and f"no MLflow store at {tmp_path / 'runs' / 'mlflow.db'}: run this where" in lost.stderr
    assert lost.stderr.strip().endswith(f"; there is one at {uri}")  # where a run with --out elsewhere keeps it
    assert not (tmp_path / "runs").exists()
    # The store's file given as a path, as $MLFLOW_TRACKING_URI, or a folder: MLflow 3 refused them in a traceback
    # (its file store); they are refused saying the URI to give.
    db = uri.removeprefix("sqlite:///")
    for given, said in ((["--tracking-uri", db], f"the MLflow store '{db}' is a path, not a store's URI: give {uri}"),
                        ([], f"$MLFLOW_TRACKING_URI '{db}' is a path, not a store's URI: give {uri}"),
                        (["--tracking-uri", "mlruns"], f"is MLflow's file store (a folder, as ./mlruns), which MLflow "
                                                       f"3 refuses: give an sqlite store, such as sqlite:///{tmp_path}"
                                                       f"/mlruns/mlflow.db")):  # fmt: skip
        path = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "models", *given], cwd=tmp_path, timeout=120,
                              env=env | ({} if given else {"MLFLOW_TRACKING_URI": db}), capture_output=True,
                              text=True)  # fmt: skip
        assert path.returncode == 2 and said in path.stderr and "Traceback" not in path.stderr, path.stderr[-2000:]
    assert not (tmp_path / "mlruns").exists()
    # A tracking server that does not answer (a port mistyped): said at once; MLflow's client retried four minutes.
    dead = f"http://127.0.0.1:{free_port()}"
    for command in (["models"], ["promote", "1"], ["generate", "--model", "models:/m@champion", "--prompt", "x"]):
        start = time.monotonic()
        gone = subprocess.run([sys.executable, "-m", "edgar_tune.cli", *command, "--tracking-uri", dead], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert gone.returncode == 2 and gone.stderr.splitlines()[-1].startswith(
            f"edgar-tune: error: the MLflow tracking server at {dead} does not answer (ConnectionError): start it, "
            "or run this where `runs/` is"), gone.stderr[-2000:]
        assert time.monotonic() - start < 60

    from edgar_tune.config import ConfigError
    from flows.export import edgar_tune_export
    from flows.promote import edgar_tune_promote

    monkeypatch.chdir(tmp_path)  # where a worker runs the deployments, and their default store is runs/mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for deployed in (lambda: edgar_tune_promote.fn("1"), lambda: edgar_tune_export.fn()):
        with pytest.raises(ConfigError, match=r"no MLflow store at .*/runs/mlflow\.db: set tracking_uri to the store"):
            deployed()
    assert not (tmp_path / "runs").exists()
    # A version being registered, its tags not all set yet, is listed all the same (the relay lists as it comes).
    v = client.create_model_version("m", source=(tmp_path / "weights").as_uri()).version
    client.set_model_version_tag("m", v, "val_sha256", "mdna-b")  # as v2 and v3, whose scoring is known
    assert [r["scores"] for r in versions(client, "m") if r["version"] == str(v)] == [[]]


def test_a_rollback_by_hand_is_a_prefect_event_that_the_readme_trigger_acts_on(prefect_server, tmp_path):
    """A promotion by hand makes a new champion as a registration does, so automations on the champion (a serving
    deployment) must hear of it: `edgar-tune promote` sends `edgar-tune.model.promoted` to the Prefect server
    configured (a real one), on the registered model's resource labelled with the version and its new alias, with
    who, why and the version before; the README's deployment trigger covers it, and not a promotion to another
    alias. (Without a server the console says none was sent: the test before.)"""
    from tasks.registry import promote
    from tests.conftest import export_trigger_acts_on_a_new_champion_only, promoted_events

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "edgar-tune-10k"  # the model of the README's trigger
    client = mlflow.MlflowClient(uri)
    client.create_registered_model(name)
    for ppl in (9.0, 8.0):  # v1 champion, then v2
        v = client.create_model_version(name, source=(tmp_path / "weights").as_uri()).version
        for key, value in {"val_sha256": "mdna-a", "val_perplexity": repr(ppl), "val_scoring": "window 128"}.items():
            client.set_model_version_tag(name, v, key, value)
        promote(client, name, str(v), ppl, "mdna-a", "window 128")
    env = dict(os.environ, **prefect_server)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgar_tune.cli", "promote", *args, "--tracking-uri", uri],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip

    rolled = cli("1", "--reason", "v2 misreads segment tables")
    assert rolled.returncode == 0 and f"{name} v1 is now @champion (was v2)" in rolled.stdout, rolled.stderr
    assert "event" not in rolled.stdout + rolled.stderr  # it was sent: nothing to say
    assert cli("2", "--alias", "production").returncode == 0
    ours = promoted_events(prefect_server["PREFECT_API_URL"], name, uri, 2)
    by_alias = {e["resource"]["edgar-tune.alias"]: e for e in ours}
    assert set(by_alias) == {"champion", "production"}, ours
    champion = by_alias["champion"]
    assert champion["resource"]["edgar-tune.version"] == "1" and champion["resource"]["prefect.resource.name"] == name
    payload = champion["payload"]
    assert (payload["model_version"], payload["before"], payload["reason"]) == ("1", "2", "v2 misreads segment tables")
    assert payload["by"] and payload["note"].startswith("v1's perplexity 9.0000 is higher than v2's 8.0000")
    assert by_alias["production"]["payload"]["before"] is None  # nothing held that alias
    export_trigger_acts_on_a_new_champion_only(champion)
    # A server that is gone: the alias moves all the same, and the console says no automation saw it.
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"
    unheard = cli("2")
    assert unheard.returncode == 0 and f"{name} v2 is now @champion (was v1)" in unheard.stdout, unheard.stderr
    assert "warning: Prefect did not take the edgar-tune.model.promoted event (" in unheard.stderr
    assert "); no automation saw this promotion" in unheard.stderr


def test_the_before_after_plot_stays_readable_from_one_filing_to_hundreds_of_companies(tmp_path):
    """A pair of bars per MD&A while they are few; per company (its years' tokens pooled) up to 24 companies; past
    that, a histogram of the companies' change. Each drawn, for real, by matplotlib."""
    import math

    from tasks.registry import _plots, per_document_table, perplexity_groups

    def scores(companies: int, years: int, shift: float) -> dict:
        docs = [{"ticker": f"T{c:03d}", "fiscal_year": 2015 + y, "accession": f"{c}-{y}", "tokens": 1000,
                 "nll": 1000 * (2.0 + c / 100 - shift)} for c in range(companies) for y in range(years)]  # fmt: skip
        for d in docs:
            d["perplexity"] = math.exp(d["nll"] / d["tokens"])
        nll, tokens = sum(d["nll"] for d in docs), sum(d["tokens"] for d in docs)
        return {"perplexity": math.exp(nll / tokens), "documents": docs}

    kind, names, before, after = perplexity_groups(scores(2, 2, 0), scores(2, 2, 0.5))
    assert kind == "filings" and names == ["T000 FY2015", "T000 FY2016", "T001 FY2015", "T001 FY2016", "overall"]
    kind, names, before, after = perplexity_groups(scores(10, 3, 0), scores(10, 3, 0.5))
    assert kind == "companies" and names[:2] == ["T000", "T001"] and len(names) == 11
    assert before[1] == pytest.approx(math.exp(2.01)) and after[1] == pytest.approx(math.exp(1.51))
    kind, names, _, _ = perplexity_groups(scores(300, 2, 0), scores(300, 2, 0.5))
    assert kind == "spread" and len(names) == 301
    assert perplexity_groups({"perplexity": 9.0, "documents": [{"file": "a.txt", "row": 0, "tokens": 5, "nll": 1.0,
                                                                "perplexity": 1.2}]},  # fmt: skip
                             {"perplexity": 8.0, "documents": [{"file": "a.txt", "row": 0, "tokens": 5, "nll": 0.9,
                                                                "perplexity": 1.1}]})[0] == "text"  # fmt: skip
    for n, (companies, years) in enumerate(((2, 2), (10, 3), (300, 2))):
        folder = tmp_path / str(n)
        folder.mkdir()
        losses = [{"step": i, "loss": 3.0 - i / 10} for i in range(1, 11)]
        for png in _plots(folder, losses, scores(companies, years, 0), scores(companies, years, 0.5), []):
            head = png.read_bytes()[:24]
            assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") <= 800  # pixels wide
    table = per_document_table(scores(2, 2, 0), scores(2, 2, 0.5))
    assert list(table) == ["ticker", "fiscal_year", "accession", "tokens", "perplexity_before", "perplexity_after",
                           "change_pct"]  # fmt: skip
    assert table["change_pct"][0] == pytest.approx(100 * (math.exp(-0.5) - 1), abs=0.01)


def test_tokenizers_compare_equal_only_when_they_make_the_same_ids(tiny_run, tmp_path):
    from edgar_tune.config import ModelConfig
    from tasks.models import build_tiny_llama, load_tokenizer
    from tasks.registry import same_tokenizer

    runs, _ = tiny_run
    ours = runs / "latest" / "03_tokenize" / "tiny-llama"
    shutil.copytree(ours, tmp_path / "copy")
    assert same_tokenizer(load_tokenizer(str(ours)), load_tokenizer(str(tmp_path / "copy")))
    texts = ["Net sales increased 22% to $470.0 billion, driven by North America and AWS."] * 50
    other = build_tiny_llama(tmp_path / "other", texts, ModelConfig(name="tiny-llama", tiny_vocab_size=300), seed=0)
    assert not same_tokenizer(load_tokenizer(str(ours)), load_tokenizer(str(other)))


def test_a_registered_version_is_downloaded_once_and_the_two_newest_used_stay(tmp_path, monkeypatch, caplog):
    """Rescoring the champion (every run on new validation data) and `edgar-tune generate` downloaded a version's
    whole artifacts every time: GBs for a full fine-tune. A copy in the cache serves again (even with the store's
    files gone); the two newest used stay; another store's v1 is another model."""
    import logging

    from tasks.registry import registered_files, registered_version

    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, "tasks.registry")

    def store(db: str, contents: list[str]) -> mlflow.MlflowClient:
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / db}")
        client.create_registered_model("m")
        for i, text in enumerate(contents, 1):
            (folder := tmp_path / f"{db}-v{i}").mkdir()
            (folder / "MLmodel").write_text(text)
            client.create_model_version("m", source=folder.as_uri())
        return client

    def read(client, version: str) -> str:
        with registered_files(client, "m", version, "champion") as local:
            return (local / "MLmodel").read_text()

    client = store("a.db", ["first", "second", "third"])
    client.set_registered_model_alias("m", "champion", "1")
    assert registered_version(client, "models:/m@champion") == ("m", "1") == registered_version(client, "models:/m/1")
    assert registered_version(client, "models:/m/latest") is None and registered_version(client, "runs:/x/y") is None
    assert read(client, "1") == "first"
    shutil.rmtree(tmp_path / "a.db-v1")  # what the tracking server holds: the cache serves without it
    assert read(client, "1") == "first"
    said = [r.getMessage() for r in caplog.records if r.name == "tasks.registry"]
    assert len(said) == 2 and said[0].startswith("downloaded champion m v1 (0.0 MB) in 0:00:00 into "), said
    assert said[1].startswith("champion m v1: its copy downloaded before, 0.0 MB in "), said
    assert (read(client, "2"), read(client, "3")) == ("second", "third")
    (home,) = (tmp_path / "cache" / "registry").iterdir()
    assert sorted(p.name.split("-")[0] for p in home.iterdir() if p.is_dir()) == ["v2", "v3"]
    assert "removed the download of m v1 (the newest 2 are kept)" in caplog.text
    assert read(store("b.db", ["another store's"]), "1") == "another store's"


@pytest.mark.slow
def test_a_new_10k_rescores_the_champion_on_the_new_mdna(tiny_run, prefect_server, tmp_path):
    """The scheduled run's case: a new fiscal year changes the held-out MD&A, so the champion's recorded perplexity
    (on last year's) says nothing about the new version. The register stage downloads the champion from MLflow,
    scores it on this run's validation blocks and promotes whichever is lower; a retry reuses that score."""
    from datasets import load_from_disk

    from edgar_tune.config import EvalConfig
    from tasks.perplexity import evaluate_model
    from tasks.registry import tracking_at

    runs, _ = tiny_run
    base = tmp_path / "base"  # a local base model folder with a fixed tokenizer, as a user's own checkpoint would be
    shutil.copytree(runs / "latest" / "03_tokenize" / "tiny-llama", base)
    common = ("--set", f"model.name={base}", "--set", "data.fiscal_years=[2020]")
    first = run_cli(tmp_path, *common, "--set", "max_steps=2", env=prefect_server)
    assert first["model_alias"] == "champion" and first["champion_comparison"] == {"basis": "no champion before"}
    # Next year: same folder (as the scheduled deployment's), FY2021 alone, trained for longer.
    common = ("--set", f"model.name={base}", "--set", "data.fiscal_years=[2021]")
    second = run_cli(tmp_path, *common, "--set", "max_steps=30", env=prefect_server)
    compared = second["champion_comparison"]
    assert compared["version"] == first["model_version"] and compared["basis"] == "rescored on this run's validation data"
    log = (tmp_path / "run.log").read_text()  # a large champion takes minutes to fetch: the log says what it took
    assert re.search(rf"downloaded champion edgar-tune-10k v{first['model_version']} \([\d.]+ MB\) in 0:0", log), log[-3000:]
    # The champion's score, recomputed here through MLflow's own loader on the new run's validation blocks.
    with tracking_at(second["mlflow_tracking_uri"]):
        champion = mlflow.pyfunc.load_model(f"models:/{first['registered_model']}/{first['model_version']}")
    tokenize = tmp_path / "latest" / "03_tokenize"
    block = json.loads((tokenize / "stats.json").read_text())["block_length"]
    eval_cfg = EvalConfig(max_length=128, stride=64, per_device_eval_batch_size=8)
    again = evaluate_model(champion.unwrap_python_model().model, load_from_disk(str(tokenize / "val")), eval_cfg,
                           block, "champion")  # fmt: skip
    assert compared["perplexity"] == pytest.approx(again["perplexity"], rel=1e-6)
    assert again["tokens"] == second["val_tokens"]
    # 30 steps on FY2021's text beat 2 steps on FY2020's, on FY2021's MD&A: the new version takes the alias.
    assert second["ppl_after"] < compared["perplexity"] and second["model_alias"] == "champion"
    client = mlflow.MlflowClient(second["mlflow_tracking_uri"])
    first_tags = client.get_model_version(first["registered_model"], first["model_version"]).tags
    assert [k for k in first_tags if k.startswith("val_perplexity.")], first_tags
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.metrics["champion_ppl_on_this_val"] == pytest.approx(compared["perplexity"])
    # A retried registration compares nothing again and reports the same comparison.
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "stage", "register", "--run",
                           str(tmp_path / "latest")], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    retry = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert retry["model_version"] == second["model_version"] and retry["champion_comparison"] == compared
    assert "scoring it on this run's" not in proc.stdout + proc.stderr
    assert len(client.get_metric_history(second["mlflow_run_id"], "champion_ppl_on_this_val")) == 1
    # `edgar-tune models` shows both years side by side, each on the champion's (FY2021's) validation data.
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "models", "--tracking-uri",
                           second["mlflow_tracking_uri"]], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith("  v")}
    v1, v2 = f"v{first['model_version']}", f"v{second['model_version']}"
    assert rows[v2][1:5] == ["champion", "A", f"{second['ppl_after']:.4f}", "-"]
    assert rows[v1][1:5] == ["-", "B", f"{compared['perplexity']:.4f}*", f"{first['ppl_after']:.4f}"]
    # data, what it takes, registered (a date and a time)
    assert rows[v1][-5:-2] == ["AMZN", "FY2020", "prompt"] and rows[v2][-5:-2] == ["AMZN", "FY2021", "prompt"]


def test_a_registration_leaves_mlflow_tracking_uri_as_it_was(tiny_run, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which a run reads as the user's store: a registration in
    this process (a notebook's) must not leave it set, or the next run here would register into this run's store."""
    from edgar_tune.config import load_run_config
    from tasks.registry import register_run

    runs, s = tiny_run
    run = runs / "latest"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    again = register_run(run, runs, load_run_config(run), None)  # a retry: finds the version it registered
    assert again["model_version"] == s["model_version"] and "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s["mlflow_tracking_uri"])
    assert register_run(run, runs, load_run_config(run), None)["model_version"] == s["model_version"]
    assert os.environ["MLFLOW_TRACKING_URI"] == s["mlflow_tracking_uri"]


def test_two_runs_registering_into_a_new_sqlite_store_at_once_both_register(tiny_run, tmp_path):
    """Two runs beside each other share `runs/mlflow.db` (the scheduled and the on-demand deployment do). Two
    processes creating its tables at once both run MLflow's migrations, and one failed (`duplicate column name:
    step`, seen here); the registrations now take turns on a lock file beside the database, and both register."""
    runs, _ = tiny_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = []
    for name in ("a", "b"):
        shutil.copytree(runs / "latest", tmp_path / name)
        # a copy is its run, with the same run key, but without the name recorded in it: another key, another version
        (tmp_path / name / ".stages" / "run.json").unlink()
        procs.append(subprocess.Popen([sys.executable, "-m", "edgar_tune.cli", "stage", "register", "--run",
                                       str(tmp_path / name), "--set", f"registry.tracking_uri={uri}"], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err[-3000:] for _, err in outs)
    versions = {json.loads(out)["model_version"] for out, _ in outs}
    assert versions == {"1", "2"}
    assert len(mlflow.MlflowClient(uri).search_model_versions("name = 'edgar-tune-10k'")) == 2
    # The log says what each was compared with, in words (the first: nothing; the second: the first, same tokens)
    said = sorted(re.search(r"registered edgar-tune-10k (v\d) as \w+ \(perplexity [\d.]+; (.*)\)$", err, re.M).groups()
                  for _, err in outs)  # fmt: skip
    assert said[0] == ("v1", "no champion before"), said
    assert re.fullmatch(r"champion v1's [\d.]+, same validation data", said[1][1]) and said[1][0] == "v2", said


_OPEN_AS_TRAINING = """
import sys, time
from pathlib import Path

from edgar_tune.config import load_config
from tasks.registry import live_training_run

run_dir, uri, go, after = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
registry = load_config("tiny", {"registry.tracking_uri": uri}).registry
(run_dir / "ready").touch()
while not go.exists():  # imported: now, each `after` s later
    time.sleep(0.005)
time.sleep(after)
with live_training_run(run_dir, registry, "tiny", None) as (run_id, _):
    print(run_id)
"""


def test_trainings_opening_a_new_sqlite_store_at_once_all_open_it_and_leave_it_whole(tmp_path):
    """Three train stages starting at once into a new sqlite store (the points of a spread sweep): MLflow makes and
    migrates its tables on each process's first call, and two at once left it broken for good (`table
    _alembic_tmp_experiments already exists` for every later call, the registrations failing). They take turns on
    a lock file while the store is made: each opens its run for the curves, and no migration is left half done.
    The later two start while the first makes the store (the file there, its tables not yet), which the lock taken
    only where the file was missing let through."""
    import sqlite3

    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    procs = []
    for name, after in (("a", 0), ("b", 0.3), ("c", 0.6)):
        (tmp_path / name).mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", _OPEN_AS_TRAINING, str(tmp_path / name), uri, str(go),
                                       str(after)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    deadline = time.monotonic() + 120
    while not all((tmp_path / name / "ready").exists() for name in "abc"):  # each has imported MLflow, and waits
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(err[-3000:] for _, err in outs)
    assert all(len(out.strip()) == 32 for out, _ in outs), outs  # a run id each, not None after a warning
    assert not any("opened no run" in err for _, err in outs), [err[-2000:] for _, err in outs]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        tables = [t for (t,) in db.execute("select name from sqlite_master where type = 'table'")]
    assert not [t for t in tables if t.startswith("_alembic_tmp")], tables
    assert len(mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name(
        "edgar-tune").experiment_id])) == 3  # fmt: skip


def test_training_starts_at_once_when_the_tracking_server_does_not_answer(tmp_path, caplog):
    """MLflow's client retries a refused connection for about four minutes; the train stage's run for the live
    curves asks once, says so, and trains (the registration later logs the curves, or says what is wrong)."""
    import logging
    import time

    from edgar_tune.config import RegisterConfig
    from tasks.registry import live_training_run
    from tests.conftest import free_port

    caplog.set_level(logging.WARNING, logger="tasks.registry")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with live_training_run(tmp_path / "run", RegisterConfig(tracking_uri=uri), "tiny", None) as live:
        assert live == (None, None)
    assert time.monotonic() - start < 10
    assert f"MLflow at {uri} opened no run for training's curves (ConnectionError" in caplog.text


def test_a_training_ends_the_runs_its_folder_left_running_when_their_process_died(tmp_path, caplog):
    """A training whose process was killed (SIGKILL, a machine gone) leaves its MLflow run RUNNING for ever. The
    next training in the same folder (the Retry, a rerun) marks it FAILED; another folder's running one stands. One
    that finished while the tracking server was down (its weights are the folder's) is marked FINISHED."""
    import logging
    import time

    from edgar_tune.config import RegisterConfig
    from tasks.registry import live_training_run

    caplog.set_level(logging.INFO, logger="tasks.registry")
    registry = RegisterConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient(registry.tracking_uri)
    left = {}
    for name in ("run", "other"):
        with live_training_run(tmp_path / name, registry, "tiny", None) as (run_id, send):
            send([("train_loss", 2.0, 1, time.time())])
        client.update_run(run_id, status="RUNNING")  # as a process killed before its `finally` leaves it
        left[name] = run_id
    with live_training_run(tmp_path / "run", registry, "tiny", None) as (again, _):
        assert client.get_run(left["run"]).info.status == "FAILED"
        assert client.get_run(left["other"]).info.status == "RUNNING"
        assert client.get_run(again).info.status == "RUNNING"
    assert client.get_run(again).info.status == "FINISHED"
    assert f"MLflow run {left['run']} (an earlier training in this folder) still showed RUNNING" in caplog.text
    assert len(client.get_metric_history(left["run"], "train_loss")) == 1  # its curves stay
    (tmp_path / "run" / "04_train").mkdir(parents=True)
    (tmp_path / "run" / "04_train" / "stats.json").write_text(json.dumps({"mlflow_run_id": again}))
    client.update_run(again, status="RUNNING")
    with live_training_run(tmp_path / "run", registry, "tiny", None):
        assert client.get_run(again).info.status == "FINISHED"


def test_unfinished_model_uploads_leave_no_files_or_entries_in_the_run(tmp_path, caplog):
    """A registration killed while it uploads the model leaves MLflow a PENDING logged model holding the files it
    got; one whose upload raised (a full disk), a FAILED one. Each is removed, files and entry, before the next
    upload (in its run, and in another run an earlier registration of the same run folder opened) and once an
    upload raises; a finished one stays, and another run folder's upload under way."""
    import logging

    from tasks.registry import RUN_KEY, tracking_at, unfinished_uploads_removed

    caplog.set_level(logging.WARNING, logger="tasks.registry")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"w" * 300_000)

    def upload(status: str | None, run: str = run_id):  # what mlflow.pyfunc.log_model did when killed, raised, ended
        model = mlflow.initialize_logged_model(name="model", source_run_id=run, experiment_id=exp)
        client.log_model_artifacts(model.model_id, str(weights))
        if status:
            mlflow.finalize_logged_model(model.model_id, status)
        return model

    def models(run: str = run_id) -> dict[str, str]:
        found = client.search_logged_models([exp], filter_string=f"source_run_id = '{run}'")
        return {m.model_id: str(m.status) for m in found}

    with tracking_at(uri):
        done, killed = upload("READY"), upload(None)
        other_run = client.create_run(exp, tags={RUN_KEY: "other folder"}).info.run_id  # its upload under way
        other = upload(None, other_run)
        attempt = client.create_run(exp, tags={RUN_KEY: "this folder"}).info.run_id  # a killed registration's own run
        killed_there = upload(None, attempt)
        assert models() == {done.model_id: "READY", killed.model_id: "PENDING"}
        with pytest.raises(OSError, match="No space left"):
            with unfinished_uploads_removed(client, exp, run_id, "this folder"):
                assert models() == {done.model_id: "READY"} and models(attempt) == {}  # killed ones', before
                failed = upload("FAILED")
                raise OSError(28, "No space left on device")
    assert models() == {done.model_id: "READY"} and models(other_run) == {other.model_id: "PENDING"}
    left = sorted(str(p) for p in (tmp_path / "artifacts").rglob("model.safetensors"))
    held = {m.model_id for m in (done, other) if any(m.model_id in p for p in left)}
    assert len(left) == 2 and held == {done.model_id, other.model_id}  # the failed and killed ones' files are gone
    for model, status, run in ((killed, "PENDING", run_id), (failed, "FAILED", run_id),
                               (killed_there, "PENDING", attempt)):  # fmt: skip
        assert (f"removed an unfinished upload of the model from MLflow run {run}: logged model {model.model_id} "
                f"({status}, 0.3 MB)") in caplog.text  # fmt: skip
    assert other_run not in caplog.text and other.model_id not in caplog.text


def test_a_writer_without_a_prefect_server_says_it_takes_no_turn_on_a_tracking_server(tmp_path, monkeypatch, caplog):
    """Registrations into a tracking server take turns on a Prefect server's concurrency limit. A promotion from a
    machine with no Prefect server configured cannot take turns with other hosts, and says so rather than pass for
    safe; this host's registrations still take turns (the next test)."""
    import logging

    from tasks.registry import one_writer

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.WARNING, logger="tasks.registry")
    with one_writer("http://mlflow.internal:5000", tmp_path):
        pass
    assert "no Prefect server is configured (PREFECT_API_URL), so registrations into http://mlflow.internal:5000 " \
           "from other hosts, which may be deciding the champion now, are not waited for; this host's take turns " \
           f"through {tmp_path / 'cache' / 'locks'}" in caplog.text
    caplog.clear()
    with one_writer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path):  # a sqlite store: its lock file, always
        pass
    assert caplog.text == ""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_without_a_prefect_server_a_killed_registration_does_not_hold_the_next_one(tmp_path):
    """CLI runs (no PREFECT_API_URL: an embedded Prefect server) registering into one tracking server took turns on
    the embedded server's concurrency limit. Its slot stays taken after a kill: the embedded server runs no lease
    reaper, so after an OOM kill every later registration waited an hour, then failed. They take turns through a
    lock file, which the kernel frees however its holder ends: a second waits while the first holds, and goes on
    at once when the first is SIGKILLed."""
    uri = "http://127.0.0.1:9/mlflow"  # never reached: the turn is named after it
    assert "PREFECT_API_URL" not in os.environ  # (tests/conftest.py): each holder starts an embedded server
    home = migrated_prefect_home(tmp_path / "prefect")
    env = {"PREFECT_HOME": str(home), "EDGAR_TUNE_CACHE": str(tmp_path / "cache")}

    def registration() -> subprocess.Popen:  # a flow run that holds the store's turn until its stdin closes
        return lock_holder("registry", uri, env=env)

    def until(proc: subprocess.Popen, *starts: str) -> str:
        return lines_until(proc, *starts)[-1]

    first = registration()
    assert until(first, "held") == "held\n"
    second = registration()
    try:
        waiting = until(second, "waiting for", "held")
        assert waiting.startswith(f"waiting for {tmp_path / 'cache' / 'locks'}/edgar-tune-registry-"), waiting
        assert f"pid {first.pid} on " in waiting
        first.kill()  # what the OOM killer does
        first.wait(timeout=30)
        assert until(second, "held") == "held\n"
    finally:
        second.stdin.close()
        second.wait(timeout=60)
        kill_group(first)  # and the embedded Prefect server the SIGKILL left behind
        kill_group(second)

