"""Loading and serving registered versions: `edgar-tune generate`, `mlflow models serve` on loopback, and the
whole pipeline against a real `mlflow server` reached through MLFLOW_TRACKING_URI."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, held_elsewhere, run_cli, wait_http

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_generate_command_loads_base_and_adapter_from_the_registry(tiny_run, tmp_path):
    _, s = tiny_run
    uri = f"models:/{s['registered_model']}@{s['model_alias']}"
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "generate", "--model", uri, "--prompt",
                           "Net sales increased", "--prompt", "We serve consumers through", "--max-new-tokens", "6",
                           "--json", "--tracking-uri", s["mlflow_tracking_uri"]], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, EDGAR_TUNE_CACHE=str(tmp_path)))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["Net sales increased", "We serve consumers through"]
    assert all(isinstance(r["generated"], str) and r["generated"] for r in rows)
    assert f"downloaded {s['registered_model']} v{s['model_version']} (" in proc.stderr  # into the cache: once
    end = rows[0]["generated"].strip().split()[-1]  # OpenAI's `stop`: the answer ends before the text
    stopped = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "generate", "--model", uri, "--prompt",
                              "Net sales increased", "--max-new-tokens", "6", "--stop", end, "--json",
                              "--tracking-uri", s["mlflow_tracking_uri"]], cwd=REPO, capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, EDGAR_TUNE_CACHE=str(tmp_path)))  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert json.loads(stopped.stdout.splitlines()[-1])["generated"] == rows[0]["generated"].split(end, 1)[0]
    missing = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "generate", "--model", "models:/nope@champion",
                              "--prompt", "x", "--tracking-uri", s["mlflow_tracking_uri"]],
                             cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert missing.returncode == 2 and "cannot load models:/nope@champion" in missing.stderr
    none = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "generate", "--model", uri, "--prompt", "x",
                           "--max-new-tokens", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert none.returncode == 2 and none.stderr.splitlines()[-1] == (
        "edgar-tune generate: error: argument --max-new-tokens: must be at least 1 (got 0)")  # before loading
    greedy = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "generate", "--model", uri, "--prompt", "x",
                             "--temperature", "0.5"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert greedy.returncode == 2 and greedy.stderr.splitlines()[-1] == (
        "edgar-tune generate: error: temperature=0.5 only shapes sampling, and do_sample is false (greedy decoding "
        "takes the likeliest token each step): set do_sample to true, or leave them out")  # before loading too
    long = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "generate", "--model", uri, "--prompt", "Net sales",
                           "--prompt", "Net sales increased. " * 1000, "--tracking-uri", s["mlflow_tracking_uri"]],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, EDGAR_TUNE_CACHE=str(tmp_path)))  # fmt: skip
    said = long.stderr.splitlines()[-1]  # both checked before either is generated: no output, no minutes lost
    assert long.returncode == 2 and not long.stdout and re.fullmatch(
        r"edgar-tune generate: error: prompt 2 of 2 is \d+ tokens, and 60 more \(max_new_tokens\) make \d+, past the "
        r"model's context of 2048 positions: shorten it to fewer than 2048 tokens", said), said


def test_a_request_is_a_prompt_a_templates_fields_or_messages_and_never_two():
    """What each request of a loaded or served version generates from (no model needed): its prompt as given
    (the tokenizer adds its special tokens), the template filled (a field not given is empty text, as a null one
    trained), or its messages in the chat template (whole: the tokenizer adds none, as in training)."""
    import mlflow

    from tasks.registry import request_prompt
    from tasks.textdata import JUMPSTART_TEMPLATE

    template = JUMPSTART_TEMPLATE["prompt"]
    chat = lambda value, which: f"<|im_start|>user\n{value}<|im_end|>\n<|im_start|>assistant\n"  # noqa: E731
    assert request_prompt({"prompt": "Net sales"}, None, "the request") == ("Net sales", False)
    assert request_prompt({"instruction": "Sum up.", "context": float("nan")}, template, "the request") == (
        template.format(instruction="Sum up.", context=""), False)
    assert request_prompt({"prompt": None, "messages": "Hi"}, None, "the request", chat) == (chat("Hi", ""), True)
    for row, kw, said in (({"prompt": "x", "instruction": "y"}, {"template": template}, "request 2 of 3 has both a "
                           "prompt and the template's fields (instruction); give one"),
                          ({"prompt": "x", "messages": "y"}, {"template": None, "chat": chat}, "has both a prompt and "
                           "messages; give one: the prompt as the model is to see it, or the messages the chat"),
                          ({"other": "x"}, {"template": None, "chat": chat}, "request 2 of 3 has neither a prompt "
                           "nor messages; it gives other"),
                          ({}, {"template": None}, "request 2 of 3 has no prompt; it gives nothing")):  # fmt: skip
        with pytest.raises(mlflow.exceptions.MlflowException, match=re.escape(said)):
            request_prompt(row, which="request 2 of 3", **kw)


def test_an_openai_chat_request_is_one_conversation_and_its_max_tokens_is_max_new_tokens():
    """MLflow hands OpenAI's chat request, `{"messages": [turn, ...], "max_tokens": N}`, to predict as a row per
    turn. Before, each turn was a request of its own whose text was the Python dict's (a system and a user turn
    were answered `["'Be brief.'", "Revenue grew 2% in 2000"]`), and max_tokens was dropped with a warning in the
    server's log only."""
    import mlflow
    import pandas as pd

    from tasks.registry import _requests, generation_settings

    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Net sales?"}
    other = {"role": "user", "content": "Costs?"}
    assert _requests(pd.DataFrame({"messages": [system, user]})) == [{"messages": [system, user]}]
    assert _requests({"messages": [system, user]}) == [{"messages": [system, user]}]  # called without a schema
    both = [{"messages": [system, user]}, {"messages": [other]}]  # conversations, a list of turns each
    assert _requests(pd.DataFrame({"messages": [[system, user], [other]]})) == both
    assert _requests(pd.DataFrame([{"messages": [[system, user], [other]]}])) == both
    assert _requests(pd.DataFrame([{"messages": ["Net sales?", "Costs?"]}])) == [{"messages": "Net sales?"},
                                                                                 {"messages": "Costs?"}]  # fmt: skip
    with pytest.raises(mlflow.exceptions.MlflowException, match=re.escape(  # answered `[]` before: nothing asked
            '`messages` is an empty list: give a conversation (a list of {"role", "content"} turns)')):
        _requests(pd.DataFrame([{"messages": []}]))  # as MLflow makes `{"messages": []}`
    assert _requests(pd.DataFrame({"prompt": []})) == []  # no rows (an empty batch): no answers
    assert generation_settings({"max_tokens": 7})["max_new_tokens"] == 7
    served = {"max_new_tokens": 40, "max_tokens": 7}  # MLflow fills in the defaults a served request leaves out
    assert generation_settings(served)["max_new_tokens"] == 7
    assert generation_settings({"max_tokens": None, "max_new_tokens": 9})["max_new_tokens"] == 9
    assert generation_settings({})["stop"] == [] and generation_settings({"stop": ["\n\n", "Q:"]})["stop"] == [
        "\n\n", "Q:"]  # fmt: skip
    assert generation_settings({"stop": "Q:"})["stop"] == ["Q:"]  # OpenAI's takes one text too
    # OpenAI's logit_bias, its keys token ids as JSON's texts (or whole numbers, called from Python)
    assert generation_settings({"logit_bias": {"50256": -100, 7: 2.5}})["logit_bias"] == {50256: -100.0, 7: 2.5}
    assert generation_settings({})["logit_bias"] == {} and generation_settings({})["repetition_penalty"] == 1.0
    from tasks.generate import answer

    assert answer("Net sales grew.\n\nQ: and", None, ["\n\n", "Q:"]) == "Net sales grew."
    assert answer("Net sales<|im_end|> grew", "<|im_end|>", ["grew"]) == "Net sales"
    for params, said in (({"max_tokens": 7, "max_new_tokens": 5}, "max_tokens=7 and max_new_tokens=5 are two names "
                          "for the tokens to generate: give one"),
                         ({"max_tokens": 0}, "max_tokens must be a whole number of at least 1, got 0"),
                         ({"stop": ["Q:", ""]}, "stop must be a list of texts, none empty, got ['Q:', '']"),
                         ({"logit_bias": {"-5": 1}}, "logit_bias must map token ids to numbers from -100"),
                         ({"logit_bias": {"5": 101}}, "logit_bias must map token ids to numbers from -100"),
                         ({"logit_bias": [5]}, "logit_bias must map token ids to numbers from -100"),
                         ({"repetition_penalty": 0}, "repetition_penalty must be a number above 0 (1: none"),
                         ({"frequency_penalty": -2.5}, "frequency_penalty must be a number from -2 to 2"),
                         ({"min_p": 0.1}, "min_p=0.1 only shapes sampling, and do_sample is false"),
                         ):  # fmt: skip
        with pytest.raises(mlflow.exceptions.MlflowException, match=re.escape(said)):
            generation_settings(params)


def test_a_version_holds_source_not_a_pickle_and_pickled_older_versions_still_load(tiny_run, tmp_path, capsys):
    import mlflow
    import pandas as pd
    import yaml

    from tasks.registry import EdgarTuneLM

    runs, s = tiny_run
    mlflow.set_tracking_uri(s["mlflow_tracking_uri"])
    uri = f"models:/{s['registered_model']}/{s['model_version']}"
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "v")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and (local / "pyfunc_model.py").exists()
    assert not list(local.rglob("*.pkl"))
    # Versions registered before held a cloudpickle of tasks.registry.EdgarTuneLM: they load with today's code.
    run = runs / "latest"
    artifacts = {"weights": str(run / "04_train" / "adapter"), "base": str(run / "03_tokenize" / "tiny-llama")}
    exp = mlflow.MlflowClient().create_experiment("pickled", artifact_location=(tmp_path / "pickled").as_uri())
    with mlflow.start_run(experiment_id=exp):
        old = mlflow.pyfunc.log_model(name="model", python_model=EdgarTuneLM(), artifacts=artifacts,
                                      model_config={"base_model": "tiny-llama", "weights": "adapter"},
                                      pip_requirements=["mlflow"])  # fmt: skip
    assert list(Path(mlflow.artifacts.download_artifacts(old.model_uri, dst_path=str(tmp_path / "o"))).rglob("*.pkl"))
    prompts = ["Net sales increased", "We serve consumers through"]
    for model_uri in (uri, old.model_uri):
        model = mlflow.pyfunc.load_model(model_uri)
        one_by_one = [model.predict(pd.DataFrame({"prompt": [p]}), {"max_new_tokens": 4})[0] for p in prompts]
        assert all(isinstance(text, str) and text for text in one_by_one)
        # MLflow makes a dict of lists one row holding the list: each prompt is still generated from, as itself
        assert model.predict({"prompt": prompts}, {"max_new_tokens": 4}) == one_by_one
        assert model.predict([{"prompt": p} for p in prompts], {"max_new_tokens": 4}) == one_by_one
    # Sampling, when asked for: the same seed draws the same text. A version from before sampling settings is
    # refused them by `generate` (MLflow would drop them with a warning, and the text would be greedy's).
    model = mlflow.pyfunc.load_model(uri)
    asked = {"max_new_tokens": 4, "do_sample": True, "temperature": 1.5, "top_k": 0, "seed": 7}
    sampled = [model.predict({"prompt": prompts}, asked) for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 2
    from edgar_tune.cli import main

    penalized = {"max_new_tokens": 4, "repetition_penalty": 1.5, "frequency_penalty": 1.0}  # in the signature
    assert model.predict({"prompt": prompts[:1]}, penalized) != model.predict({"prompt": prompts[:1]}, {
        "max_new_tokens": 4})  # fmt: skip
    assert main(["generate", "--model", uri, "--prompt", prompts[0], "--max-new-tokens", "4", "--repetition-penalty",
                 "1.5", "--frequency-penalty", "1", "--json", "--tracking-uri", s["mlflow_tracking_uri"]]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["generated"] == model.predict(
        {"prompt": prompts[:1]}, penalized)[0]  # fmt: skip
    assert main(["generate", "--model", old.model_uri, "--prompt", "x", "--presence-penalty", "1", "--tracking-uri",
                 s["mlflow_tracking_uri"]]) == 2  # fmt: skip
    assert (f"{old.model_uri} was registered before versions took presence_penalty (it takes no settings): it would "
            "not be penalized; leave out --presence-penalty, or generate with a version registered since "
            "2026-12-05") in capsys.readouterr().err
    (schema := tmp_path / "segment.json").write_text(json.dumps(SEGMENTS))  # each answer JSON of it
    assert main(["generate", "--model", uri, "--prompt", prompts[0], "--max-new-tokens", "40", "--json-schema",
                 str(schema), "--json", "--tracking-uri", s["mlflow_tracking_uri"]]) == 0  # fmt: skip
    generated = json.loads(capsys.readouterr().out.splitlines()[-1])["generated"]
    assert generated == model.predict({"prompt": prompts[:1]}, {"max_new_tokens": 40, "response_format": json.dumps(
        {"type": "json_schema", "json_schema": {"name": "segment", "schema": SEGMENTS}})})[0]  # fmt: skip
    assert set(json.loads(generated)) == {"segment", "year", "grew"}, generated
    assert main(["generate", "--model", uri, "--prompt", prompts[0], "--choice", "rose", "--choice", "fell", "--json",
                 "--tracking-uri", s["mlflow_tracking_uri"]]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["generated"] in ("rose", "fell")
    assert main(["generate", "--model", old.model_uri, "--prompt", "x", "--json-schema", str(schema),
                 "--tracking-uri", s["mlflow_tracking_uri"]]) == 2  # fmt: skip
    assert ("it would not keep to the schema; leave out --json-schema, or generate with a version registered since "
            "2026-12-05") in capsys.readouterr().err
    (schema := tmp_path / "bad.json").write_text('{"type": "objectx"}')
    assert main(["generate", "--model", uri, "--prompt", "x", "--json-schema", str(schema)]) == 2  # before loading
    assert capsys.readouterr().err.startswith("edgar-tune generate: error: response_format's schema is not one this "
                                              "server can follow: ")  # fmt: skip
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())  # as a version registered before min_p was taken
    mlmodel["signature"]["params"] = json.dumps([p for p in json.loads(mlmodel["signature"]["params"])
                                                 if p["name"] != "min_p"])  # fmt: skip
    (local / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    assert main(["generate", "--model", str(local), "--prompt", "x", "--do-sample", "--min-p", "0.1"]) == 2
    assert "min_p (it takes do_sample, " in (said := capsys.readouterr().err) and said.endswith(
        "it would draw without min_p; leave out --min-p, or generate with a version registered since 2026-12-05\n")

    assert main(["generate", "--model", old.model_uri, "--prompt", "x", "--do-sample", "--tracking-uri",
                 s["mlflow_tracking_uri"]]) == 2  # fmt: skip
    assert (f"edgar-tune generate: error: {old.model_uri} was registered before versions took do_sample (it takes no "
            "settings): it generates greedily; leave out --do-sample") in capsys.readouterr().err
    assert main(["generate", "--model", uri, "--message", "Hi", "--tracking-uri", s["mlflow_tracking_uri"]]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"edgar-tune generate: error: {uri} was not tuned on "
                                                        "conversations (it takes prompt): give --prompt TEXT")


def test_mlflow_models_serve_answers_a_prompt(tiny_run, tmp_path):
    _, s = tiny_run
    port = free_port()
    # mlflow starts `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv.
    env = dict(os.environ, MLFLOW_TRACKING_URI=s["mlflow_tracking_uri"], PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{s['registered_model']}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        url = f"http://127.0.0.1:{port}/invocations"
        body = {"dataframe_records": [{"prompt": "Net sales increased"}], "params": {"max_new_tokens": 5}}
        answer = _post(url, body)
        inputs = _post(url, {"inputs": {"prompt": ["Net sales increased", "We serve"]}, "params": body["params"]})
        # the request's mistakes: 400 saying so, not the model's 500 (or text from positions it never saw)
        refused = [_refused(url, {**body, "params": {"max_new_tokens": 0}}),
                   _refused(url, {**body, "params": {"max_new_tokens": 2100}}),
                   _refused(url, {**body, "params": {"temperature": 0.7}})]  # fmt: skip
        sampling = {"max_new_tokens": 5, "do_sample": True, "temperature": 2, "top_p": 0.9, "seed": 11}
        sampled = [_post(url, {**body, "params": sampling}) for _ in range(2)]
        end = answer["predictions"][0].strip().split()[-1]  # OpenAI's `stop`, in its unwrapped form too
        stopped = _post(url, {"prompt": "Net sales increased", "max_tokens": 5, "stop": [end]})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0], str)
    assert inputs["predictions"][0] == answer["predictions"][0] and len(inputs["predictions"]) == 2, inputs
    assert all(code == 400 and said["error_code"] == "INVALID_PARAMETER_VALUE" for code, said in refused), refused
    assert "max_new_tokens must be a whole number of at least 1, got 0" in refused[0][1]["message"], refused
    assert re.search(r"the prompt is \d+ tokens, and 2100 more \(max_new_tokens\) make \d+, past the model's context "
                     r"of 2048 positions: shorten it, or lower max_new_tokens to \d+ or less", refused[1][1]["message"])
    assert "temperature=0.7 only shapes sampling, and do_sample is false" in refused[2][1]["message"], refused
    assert sampled[0] == sampled[1] and len(sampled[0]["predictions"]) == 1, sampled  # the same seed, the same text
    assert stopped == [answer["predictions"][0].split(end, 1)[0]], (stopped, answer)


@contextlib.contextmanager
def edgar_tune_serve(model: str, tmp_path: Path, *args: str, **env: str) -> Iterator[str]:
    """`edgar-tune serve --model MODEL ARGS` on loopback, with `env` set: yields its OpenAI base URL (`.../v1`)."""
    port = free_port()
    log = open(tmp_path / f"serve-{port}.log", "w")  # noqa: SIM115 (read when it fails)
    proc = subprocess.Popen([str(BIN / "edgar-tune"), "serve", "--model", model, "--port", str(port), *args],
                            cwd=tmp_path, env=dict(os.environ, EDGAR_TUNE_CACHE=str(tmp_path / "cache"), **env),
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=300)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_edgar_tune_serve_answers_openais_sdk_as_the_versions_predict_does(tiny_run, tmp_path):
    """The `openai` SDK, pointed at `edgar-tune serve`, gets the text the version's own `predict` generates, with
    OpenAI's usage and finish_reason; a chat version's `messages` are written in its chat template, its answer's
    log probabilities in OpenAI's chat shape; what the server does not do (logit_bias, greedy n > 1) and a model it
    does not serve are refused, not dropped; a streamed answer is the same text, in OpenAI's server-sent events."""
    import mlflow
    import openai
    import pandas as pd

    _, s = tiny_run
    name, uri = s["registered_model"], f"models:/{s['registered_model']}@champion"
    mlflow.set_tracking_uri(s["mlflow_tracking_uri"])
    prompts = ["Net sales increased", "We serve consumers through"]
    loaded = mlflow.pyfunc.load_model(uri)
    said = loaded.predict(pd.DataFrame({"prompt": prompts}), {"max_new_tokens": 6})
    drawn = loaded.predict(pd.DataFrame({"prompt": prompts[:1]}),
                           {"max_new_tokens": 6, "do_sample": True, "temperature": 0.9, "top_k": 0, "seed": 7})
    tokenizer = loaded.unwrap_python_model().tokenizer
    with edgar_tune_serve(uri, tmp_path, "--tracking-uri", s["mlflow_tracking_uri"]) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        listed = [m.id for m in client.models.list().data]
        done = client.completions.create(model=name, prompt=prompts, max_tokens=6)
        sampled = [client.completions.create(model=name, prompt=prompts[0], max_tokens=6, temperature=0.9, n=2,
                                             seed=7) for _ in range(2)]  # fmt: skip
        streamed = list(client.completions.create(model=name, prompt=prompts, max_tokens=6, stream=True,
                                                  stream_options={"include_usage": True}))  # fmt: skip
        banned = str(tokenizer(said[0])["input_ids"][0])  # the first token greedy decoding says after prompt 1
        penalized = client.completions.create(model=name, prompt=prompts, max_tokens=6, logit_bias={banned: -100},
                                              frequency_penalty=1.5, presence_penalty=0.5,
                                              extra_body={"repetition_penalty": 1.3})  # fmt: skip
        ending = {str(tokenizer.eos_token_id): 100}  # EOS the likeliest: vLLM's fixed-length fields hold it off
        fixed = [client.completions.create(model=name, prompt=prompts[0], max_tokens=8, logit_bias=ending,
                                           extra_body=kw) for kw in ({"ignore_eos": True}, {"min_tokens": 3})]
        refused = {}
        for why, kw in {"best_of": {"best_of": 2}, "greedy n": {"n": 2}, "options": {"stream_options": {}},
                        "presence": {"presence_penalty": 3}, "bias": {"logit_bias": {"x": 1}},
                        "bias past": {"logit_bias": {"99999999": 1}},
                        "model": {"model": "gpt-4o"}, "unknown": {"extra_body": {"beam_width": 4}},
                        "too long": {"prompt": "Net sales increased. " * 1000}}.items():  # fmt: skip
            with pytest.raises(openai.APIStatusError) as err:
                client.completions.create(**{"model": name, "prompt": prompts[0], "max_tokens": 6, **kw})
            refused[why] = (err.value.status_code, err.value.body["message"])
        with pytest.raises(openai.BadRequestError) as responses:  # a text version: no conversations
            client.responses.create(model=name, input="Net sales increased")
        with pytest.raises(openai.NotFoundError) as fetched:  # a response this server never answered
            client.responses.retrieve("resp_1")
        with pytest.raises(openai.NotFoundError) as elsewhere:  # a path not served
            client.embeddings.create(model=name, input="Net sales")
        with pytest.raises(openai.BadRequestError) as stored:
            client.completions.create(model=name, prompt=prompts[0], max_tokens=2, extra_body={"store": True})
        with pytest.raises(openai.BadRequestError) as no_template:  # a text version, its tokenizer without one
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert listed == [name]
    assert [c.text for c in done.choices] == said and [c.index for c in done.choices] == [0, 1]
    assert [c.finish_reason for c in done.choices] == ["length", "length"] and done.model == name
    assert done.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert done.usage.completion_tokens == 12 and done.usage.total_tokens == done.usage.prompt_tokens + 12
    # sampled as OpenAI samples (the whole vocabulary at the temperature), from the seed: drawn again the same
    assert sampled[0].choices[0].text == drawn[0] and [c.text for c in sampled[0].choices] == [
        c.text for c in sampled[1].choices]  # fmt: skip
    # streamed, piece by piece: the same texts, each answer's end, then the usage
    pieces = {0: "", 1: ""}
    for chunk in streamed[:-1]:
        pieces[chunk.choices[0].index] += chunk.choices[0].text
    assert [pieces[0], pieces[1]] == said and streamed[-1].usage == done.usage and not streamed[-1].choices
    assert [c.choices[0].finish_reason for c in streamed[:-1] if c.choices[0].finish_reason] == ["length", "length"]
    assert refused["options"] == (400, 'stream_options={}: it is {"include_usage": true} (or false), with "stream": '
                                  'true')  # fmt: skip
    assert refused["best_of"] == (400, "best_of=2 is not served: this server does not do it; leave it out")
    # logit_bias and the penalties shape the answer as the version's own predict does with them (through MLflow's
    # schema, whose parameters hold no mapping: logit_bias as its JSON text there, a mapping refused, not dropped)
    shaped = {"max_new_tokens": 6, "frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}
    assert [c.text for c in penalized.choices] == loaded.predict(pd.DataFrame({"prompt": prompts}), shaped | {
        "logit_bias": json.dumps({banned: -100})})  # fmt: skip
    assert penalized.choices[0].text != said[0]
    assert [(f.usage.completion_tokens, f.choices[0].finish_reason) for f in fixed] == [(8, "length"), (4, "stop")]
    with pytest.raises(mlflow.exceptions.MlflowException, match="Failed to validate type and shape for 'logit_bias'"):
        loaded.predict(pd.DataFrame({"prompt": prompts}), {"logit_bias": {banned: -100}})
    assert refused["presence"] == (400, "presence_penalty must be a number from -2 to 2 (0: none; above 0, a token "
                                   "the answer has taken is less likely again), got 3")  # fmt: skip
    assert refused["bias"] == (400, "logit_bias must map token ids to numbers from -100 (never that token) to 100 "
                               "(only it), as {\"50256\": -100}, got {'x': 1}")  # fmt: skip
    assert refused["bias past"] == (400, f"logit_bias names token 99999999, past the model's vocabulary of "
                                    f"{len(tokenizer)} tokens (ids 0 to {len(tokenizer) - 1})")  # fmt: skip
    assert refused["greedy n"] == (400, "n=2 answers of greedy decoding (temperature 0 or left out) are one answer 2 "
                                   "times: set temperature above 0 to sample them")  # fmt: skip
    assert refused["model"] == (404, f"the model `gpt-4o` does not exist: this server serves `{name}` ({uri})")
    unknown = ("unrecognized request argument supplied: beam_width (/v1/completions takes echo, frequency_penalty, "
               "ignore_eos, logit_bias, logprobs, max_tokens, ")  # fmt: skip
    assert refused["unknown"][0] == 400 and unknown in refused["unknown"][1], refused["unknown"]
    assert refused["too long"][0] == 400 and "past the model's context of 2048 positions" in refused["too long"][1]
    assert "has no chat template to write messages in: send a prompt to /v1/completions" in no_template.value.message
    assert responses.value.body["message"] == (f"{name}'s tokenizer has no chat template to write messages in: send "
                                               "a prompt to /v1/completions")  # fmt: skip
    assert fetched.value.body["message"] == ('Response with id "resp_1" not found: this server keeps the last 1000 '
                                             "responses of its own, in its memory, none from before it started or "
                                             "from another replica, and none answered with store=false")
    assert elsewhere.value.body["message"] == (
        "POST /v1/embeddings is not served: this server answers POST /v1/chat/completions, POST /v1/completions, POST "
        "/v1/responses (GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items for those it keeps) "
        "and GET /v1/models")  # fmt: skip
    assert stored.value.body["message"] == ("store=true is not served: completions are not kept (the Responses API's "
                                            "responses are); leave it out")
    # A version tuned on conversations (its folder, as MLflow downloads it): messages in its chat template
    folder, tokenizer = _chat_version(s, tmp_path / "chat", tokenizer)
    chat = mlflow.pyfunc.load_model(str(folder))
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Net sales grew."}]
    answered = chat.predict({"messages": asked}, {"max_new_tokens": 4})
    with edgar_tune_serve(str(folder), tmp_path) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=4)
        parts = client.chat.completions.create(model=folder.name, max_tokens=4, messages=[  # OpenAI's newer forms
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Net sales "}, {"type": "text", "text": "grew."}]}])
        chunks = list(client.chat.completions.create(model=folder.name, messages=asked, max_tokens=4, stream=True))
        scored = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=4, logprobs=True,
                                                top_logprobs=2)  # fmt: skip
        with pytest.raises(openai.BadRequestError) as tool:
            client.chat.completions.create(model=folder.name, messages=[*asked, {"role": "tool", "content": "1"}])
        # OpenAI's Responses API: the same conversation as instructions and input, whole and streamed
        response = client.responses.create(model=folder.name, instructions="Be brief.", input="Net sales grew.",
                                           max_output_tokens=4)  # fmt: skip
        as_items = client.responses.create(model=folder.name, max_output_tokens=4, input=[
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Net sales grew."}]}])
        events = list(client.responses.create(model=folder.name, instructions="Be brief.", input="Net sales grew.",
                                              max_output_tokens=4, stream=True))  # fmt: skip
        included = {"model": folder.name, "instructions": "Be brief.", "input": "Net sales grew.",
                    "max_output_tokens": 4, "include": ["message.output_text.logprobs"], "top_logprobs": 2}
        scored_response = client.responses.create(**included)
        scored_events = list(client.responses.create(**included, stream=True))
        with client.responses.stream(model=folder.name, instructions="Be brief.", input="Net sales grew.",
                                     max_output_tokens=4) as helped:  # the SDK's helper, which checks each event
            helped = list(helped)  # (its get_final_response wants response.completed, as with OpenAI's own cut)
        not_served = {}
        for why, kw in {"tools": {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
                        "call output": {"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]},
                        "image": {"input": [{"role": "user", "content": [{"type": "input_image",
                                                                          "image_url": "http://x/y.png"}]}]},
                        "top without include": {"top_logprobs": 2},
                        "include": {"include": ["file_search_call.results"]}}.items():  # fmt: skip
            with pytest.raises(openai.BadRequestError) as err:
                client.responses.create(**{"model": folder.name, "input": "Net sales grew.", **kw})
            not_served[why] = err.value.body["message"]
    assert reply.choices[0].message.content == answered[0] and reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant" and reply.model == folder.name
    prompt = tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert parts.choices[0].message.content == answered[0]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answered[0]
    assert ("turn 3: a tool call or its result, which the model's chat template does not write (it has no "
            "`tool_calls`)") in tool.value.message, tool.value.message  # ChatML's writes none  # fmt: skip
    content = scored.choices[0].logprobs.content  # each token's text, bytes and logprob, the two likeliest beside
    assert scored.choices[0].message.content == answered[0] and len(content) == scored.usage.completion_tokens
    assert bytes(b for t in content for b in t.bytes).decode().startswith(answered[0])
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= max(t.logprob, t.top_logprobs[1].logprob)
               for t in content)  # fmt: skip
    for said in (response, as_items):
        assert said.output_text == answered[0] and said.object == "response" and said.model == folder.name
        assert (said.status, said.incomplete_details.reason) == ("incomplete", "max_output_tokens")  # cut at 4
        assert (said.usage.input_tokens, said.usage.output_tokens) == (reply.usage.prompt_tokens, 4)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answered[0]
    assert events[-1].response.output_text == answered[0] and events[-1].response.usage == response.usage
    assert "".join(e.delta for e in helped if e.type == "response.output_text.delta") == answered[0]
    assert helped[-1].type == "response.incomplete" and helped[-1].response.output_text == answered[0]
    assert [type(e).__name__ for e in events[:2]] == ["ResponseCreatedEvent", "ResponseInProgressEvent"]
    assert not_served == {
        "tools": 'tool_choice left out ("auto"): the version\'s chat template does not write tool calls (it has no '
                 "`tool_calls`), so how the version would call one is not known. Name one (tool_choice={\"type\": "
                 '"function", "name": ...}, one of f) for a call of it, its arguments kept to its parameters, or send '
                 '"required" or "none"',
        "call output": "input, turn 1: a tool call or its result, which the model's chat template does not write (it "
                       "has no `tool_calls`): send the conversation without tool turns",
        "image": "input item 1 has a part of type input_image; the version reads text only",
        "top without include": "top_logprobs is the likeliest tokens beside each token's logprob: add "
                               '"message.output_text.logprobs" to include',
        "include": 'include=["file_search_call.results"]: this server includes "message.output_text.logprobs" only '
                   "(no tool runs here, and nothing is encrypted)"}  # fmt: skip
    # log probabilities, as include asks: chat's for the same conversation, whole and at the stream's end
    chat_scored = [(t.token, t.logprob, [x.logprob for x in t.top_logprobs]) for t in content]
    text = scored_response.output[0].content[0]
    assert [(t.token, t.logprob, [x.logprob for x in t.top_logprobs]) for t in text.logprobs] == chat_scored
    streamed_done = next(e for e in scored_events if e.type == "response.output_text.done")
    assert [(t.token, t.logprob) for t in streamed_done.logprobs] == [(t, lp) for t, lp, _ in chat_scored]
    deltas = [t.token for e in scored_events if e.type == "response.output_text.delta" for t in e.logprobs]
    assert deltas == [t for t, _, _ in chat_scored][: len(deltas)] and deltas  # a delta's tokens with its text


def test_a_kept_response_is_continued_by_its_id_as_the_conversation_sent_whole(tiny_run, tmp_path):
    """OpenAI's Responses API keeps a response unless `store` is false, and a client continues it by its id
    (`previous_response_id`), sending only what is new, as OpenAI's own examples and the Agents SDK's
    `previous_response_id` do: `edgar-tune serve` keeps its last responses in memory (`--keep-responses`), and
    a continuation is answered as the conversation sent whole (instructions not carried over, as OpenAI's), whole
    or streamed; a kept response is fetched, its input listed, and deleted by its id. Before, `store: true` and
    `previous_response_id` were refused, and such a client could not hold a conversation with the server."""
    import openai

    _, s = tiny_run
    folder, _ = _chat_version(s, tmp_path / "chat")
    asked = {"model": folder.name, "instructions": "Be brief.", "max_output_tokens": 4}
    with edgar_tune_serve(str(folder), tmp_path) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        first = client.responses.create(**asked, input="Net sales grew.", metadata={"desk": "credit"})
        then = client.responses.create(**asked, input="Why?", previous_response_id=first.id)
        whole = client.responses.create(**asked, store=False, input=[
            {"role": "user", "content": "Net sales grew."}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Why?"}])  # fmt: skip
        events = list(client.responses.create(**asked, input="Why?", previous_response_id=first.id, stream=True))
        streamed = events[-1].response
        fetched = [client.responses.retrieve(r.id) for r in (first, then, streamed)]
        listed = list(client.responses.input_items.list(then.id))
        paged = client.responses.input_items.list(first.id, order="asc", limit=1)
        third = client.responses.create(**{**asked, "instructions": None}, input="And costs?",
                                        previous_response_id=then.id)  # fmt: skip
        third_whole = client.responses.create(**{**asked, "instructions": None}, store=False, input=[
            {"role": "user", "content": "Net sales grew."}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": then.output_text},
            {"role": "user", "content": "And costs?"}])  # fmt: skip
        missing = {}
        for why, rid in {"never kept": whole.id, "unknown": "resp_0"}.items():
            with pytest.raises(openai.NotFoundError) as err:
                client.responses.create(**asked, input="Why?", previous_response_id=rid)
            missing[why] = err.value.body
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(whole.id)
        client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError) as gone:
            client.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError) as broken:  # `then` continued the response deleted
            client.responses.create(**asked, input="Why?", previous_response_id=then.id)
        with pytest.raises(openai.BadRequestError) as metadata:
            client.responses.create(**asked, input="Hi", metadata={"desk": 1})
        with pytest.raises(openai.BadRequestError) as numbered:  # not an id: OpenAI's 400, not a 404
            client.responses.create(**asked, input="Hi", previous_response_id=7)
    assert numbered.value.body["message"] == 'previous_response_id=7 is a response\'s id, a string (resp_...)'
    assert (first.store, then.store, whole.store, streamed.store) == (True, True, False, True)
    assert (first.previous_response_id, then.previous_response_id) == (None, first.id)
    assert first.metadata == {"desk": "credit"} and fetched[0].metadata == {"desk": "credit"}
    # the continuation is the conversation sent whole: the same prompt, the same (greedy) answer
    assert then.output_text == whole.output_text == streamed.output_text and then.output_text
    assert then.usage.input_tokens == whole.usage.input_tokens == streamed.usage.input_tokens
    assert then.usage.input_tokens > first.usage.input_tokens
    assert (third.output_text, third.usage.input_tokens) == (third_whole.output_text, third_whole.usage.input_tokens)
    assert [f.model_dump() for f in fetched] == [r.model_dump() for r in (first, then, streamed)]
    assert [(i.role, i.content[0].text) for i in listed] == [("user", "Why?")] and listed[0].id.startswith("msg_")
    assert [(i.role, i.content[0].type, i.content[0].text) for i in paged.data] == [
        ("user", "input_text", "Net sales grew.")] and paged.has_more is False  # fmt: skip
    kept = ("this server keeps the last 1000 responses of its own, in its memory, none from before it started or "
            "from another replica, and none answered with store=false")
    assert missing["never kept"] == {"message": f'Previous response with id "{whole.id}" not found: {kept}',
                                     "type": "invalid_request_error", "param": "previous_response_id",
                                     "code": "previous_response_not_found"}  # fmt: skip
    assert missing["unknown"]["message"] == f'Previous response with id "resp_0" not found: {kept}'
    assert gone.value.body["message"] == f'Response with id "{first.id}" not found: {kept}'
    assert broken.value.body["message"] == (f'previous_response_id="{then.id}" continues {first.id}, which this '
                                            "server no longer keeps (it keeps the last 1000 responses used): send the "
                                            "conversation whole as `input`, or raise `edgar-tune serve "
                                            "--keep-responses`")  # fmt: skip
    assert metadata.value.body["param"] == "metadata"


def test_a_conversation_past_the_context_drops_its_earliest_exchanges_with_truncation_auto(tiny_run, tmp_path):
    """A conversation continued by `previous_response_id` grows until it no longer fits the context. The Responses
    API's `truncation: "auto"` (the Agents SDK's `ModelSettings(truncation="auto")`) drops its earliest exchanges
    until it fits, keeping the instructions: the answer is the one the conversation without them gets; left out
    ("disabled", OpenAI's default), such a request is refused with its length, as before, and so is one whose last
    exchange alone is too long. Before, `truncation` was refused."""
    import openai

    _, s = tiny_run
    folder, _ = _chat_version(s, tmp_path / "chat")
    long = "Net sales increased. " * 300  # its exchange about 1,500 of the context's 2,048 positions
    asked = {"model": folder.name, "instructions": "Be brief.", "max_output_tokens": 600}
    with edgar_tune_serve(str(folder), tmp_path) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        first = client.responses.create(**{**asked, "max_output_tokens": 4}, input=long)
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**asked, input="Why?", previous_response_id=first.id)
        dropped = client.responses.create(**asked, input="Why?", previous_response_id=first.id, truncation="auto")
        streamed = list(client.responses.create(**asked, input="Why?", previous_response_id=first.id,
                                                truncation="auto", stream=True))[-1].response  # fmt: skip
        alone = client.responses.create(**asked, input="Why?", store=False)
        with pytest.raises(openai.BadRequestError) as too_long:
            client.responses.create(**asked, input=long * 2, truncation="auto")
        with pytest.raises(openai.BadRequestError) as bad:
            client.responses.create(**asked, input="Why?", extra_body={"truncation": "middle"})
    log = _newest_log(tmp_path)
    assert "past the model's context of 2048 positions" in refused.value.body["message"]
    assert (dropped.output_text, dropped.usage.input_tokens) == (alone.output_text, alone.usage.input_tokens)
    assert (streamed.output_text, streamed.usage.input_tokens) == (alone.output_text, alone.usage.input_tokens)
    assert dropped.truncation == "auto" and first.truncation == "disabled"
    assert log.count("the conversation's first 2 message(s) dropped to fit its 2048-position context with 600 new "
                     "tokens (truncation auto)") == 2, log[-3000:]  # fmt: skip
    assert "past the model's context of 2048 positions" in too_long.value.body["message"]
    assert bad.value.body["message"] == ('truncation="middle" is "auto" (the conversation\'s earliest exchanges '
                                         'dropped to fit the context) or "disabled"')  # fmt: skip


def test_truncation_drops_the_fewest_exchanges_that_fit_and_keeps_the_instructions():
    """`fitted` searches the exchanges to drop (a user's message up to the next): the fewest that make the prompt
    fit the context with the answer's tokens after it, whatever the conversation's length; the system messages
    stay; where none fits, the last exchange alone (which the context check then refuses)."""
    from types import SimpleNamespace

    from edgar_tune.serve import fitted

    def words(text, add_special_tokens):  # a token a word
        return {"input_ids": text.split()}

    lm = SimpleNamespace(tokenizer=words, model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100)))
    turns = [{"role": "system", "content": "be brief"}]
    for k in range(9):  # exchange k: a user's message and an answer, 12 words, the third with a call's result
        turns += [{"role": "user", "content": f"q{k} " * 5}, {"role": "assistant", "content": f"a{k} " * 5}]
        turns += [{"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}] if k == 2 else []
    rendered = []

    def render(kept: list[dict]) -> str:
        rendered.append(len(kept))
        return " ".join(t["content"] for t in kept)

    for new_tokens, first in ((10, "q1"), (40, "q4"), (77, "q7"), (87, "q8"), (90, None)):  # of 94 words
        rendered.clear()
        prompt = fitted(turns, render, lm, new_tokens, "v")
        assert prompt.startswith("be brief "), prompt
        said = prompt.split()[2] if first else None
        assert said == first or (first is None and prompt.split()[2:7] == ["q8"] * 5), (new_tokens, prompt)
        assert len(rendered) <= 5, rendered  # a binary search: not a render for each exchange dropped
    assert fitted(turns[:3], render, lm, 10, "v") == render(turns[:3])  # it fits: as it is


def test_the_responses_kept_are_the_last_used_and_a_conversation_keeps_its_first():
    """`Kept` holds the `most` responses used last: keeping one more drops the one used longest ago, and a
    continuation uses each response it continues, so the first of a long conversation is not the first dropped.
    A server that keeps none refuses `store: true` rather than answer as if it had kept it."""
    from edgar_tune.serve import Kept, Refused, Server

    def said(rid: str, text: str) -> dict:
        return {"id": rid, "output": [{"type": "message", "role": "assistant",
                                       "content": [{"type": "output_text", "text": text}]}]}  # fmt: skip

    kept = Kept(3)
    kept.keep(said("r1", "one"), "first?", None)
    kept.keep(said("r2", "two"), [{"role": "user", "content": "second?"}], "r1")
    kept.keep(said("other", "x"), "other?", None)
    assert [i.get("content") for i in kept.conversation("r2")] == [
        "first?", [{"type": "output_text", "text": "one"}], "second?", [{"type": "output_text", "text": "two"}]]
    kept.keep(said("r3", "three"), "third?", "r2")  # drops `other`, used before r1 and r2 were
    assert list(kept.held) == ["r1", "r2", "r3"]
    with pytest.raises(Refused) as err:
        kept.response("other")
    assert err.value.status == 404 and err.value.code == "not_found"
    server = Server([], 16, keep_responses=0)
    try:
        assert server._stored({}) is False  # OpenAI's default, where none is kept: not kept, not refused
        with pytest.raises(Refused, match=r"store=true: this server keeps no responses \(`edgar-tune serve "
                                          r"--keep-responses 0`\)"):  # fmt: skip
            server._stored({"store": True})
    finally:
        server.engine.stop()


def test_edgar_tune_serve_follows_its_alias_to_the_version_promoted(tiny_run, tmp_path):
    """Served as `models:/NAME@champion`, the server asks where the alias points; a promotion (here, a version
    made from the same run's model) is served from the next request on, and each answer names its version; a
    version served beside it by number stays. Started with a key (EDGAR_TUNE_API_KEY), it answers only clients that
    send it."""
    import mlflow
    import openai

    _, s = tiny_run
    mlflow.set_tracking_uri(s["mlflow_tracking_uri"])  # where the registry finds the logged model of a new version
    client = mlflow.MlflowClient(s["mlflow_tracking_uri"])
    made = client.get_model_version(s["registered_model"], s["model_version"])
    client.create_registered_model("serve-follow")
    for _ in range(2):
        client.create_model_version("serve-follow", made.source, run_id=made.run_id)
    client.set_registered_model_alias("serve-follow", "champion", "1")
    with edgar_tune_serve("models:/serve-follow@champion", tmp_path, "--model", "models:/serve-follow/1",
                          "--tracking-uri", s["mlflow_tracking_uri"], "--check-every", "0.5",
                          EDGAR_TUNE_API_KEY="sk-edgar") as base_url:  # fmt: skip
        openai_client = openai.OpenAI(base_url=base_url, api_key="sk-edgar", max_retries=0)
        listed = [m.id for m in openai_client.models.list().data]
        first = openai_client.completions.create(model="serve-follow@champion", prompt="Net sales", max_tokens=3)
        with pytest.raises(openai.BadRequestError) as unnamed:  # two served: which?
            openai_client.completions.create(model=None, prompt="Net sales", max_tokens=3)
        with pytest.raises(openai.AuthenticationError) as keyless:  # started with a key: only with it
            openai.OpenAI(base_url=base_url, api_key="sk-other", max_retries=0).models.list()
        tokenizer_keyless = _refused(base_url.removesuffix("/v1") + "/tokenize", {"prompt": "Net sales"})[0]
        client.set_registered_model_alias("serve-follow", "champion", "2")
        deadline = time.monotonic() + 120
        while openai_client.models.list().data[0].version != "2" and time.monotonic() < deadline:
            time.sleep(0.5)
        second = openai_client.completions.create(model="serve-follow@champion", prompt="Net sales", max_tokens=3)
        pinned = openai_client.completions.create(model="models:/serve-follow/1", prompt="Net sales", max_tokens=3)
    assert listed == ["serve-follow@champion", "serve-follow/1"]
    assert (first.system_fingerprint, second.system_fingerprint, pinned.system_fingerprint) == ("v1", "v2", "v1")
    assert pinned.model == "serve-follow/1"  # named by the URI it was served from too
    said = unnamed.value.body["message"]
    assert said == "name the model to answer with: this server serves `serve-follow@champion`, `serve-follow/1`", said
    assert keyless.value.status_code == 401 and keyless.value.body["code"] == "invalid_api_key"
    assert keyless.value.body["message"].startswith("the API key given is not this server's: send the key")
    assert tokenizer_keyless == 401  # vLLM's tokenizer paths too
    assert second.choices[0].text == first.choices[0].text  # the same weights, another version
    log = next(tmp_path.glob("serve-*.log")).read_text()
    assert "models:/serve-follow@champion now points at v2 (serving v1): loading it" in log, log[-3000:]
    assert "serving serve-follow@champion v2 (was v1), loaded in" in log, log[-3000:]
    assert re.search(r"serve-follow@champion v2: \d+ prompt and 3 generated tokens in [\d.]+ s \([\d.]+ s in line, "
                     r"then [\d.]+ tokens/s\), 1 answer\(s\) ending at length", log), log[-3000:]  # fmt: skip


def test_a_follower_whose_tracking_server_is_down_logs_it_once_and_says_when_it_is_back(tiny_run, tmp_path, caplog,
                                                                                         monkeypatch):  # fmt: skip
    """Following an alias, a check that fails (here MLflow's client asking a tracking server that is down, then a
    version whose load fails) is logged with its traceback once; the same failure again is counted, not logged, and
    the first check that works again says how many failed. Before, every check logged a traceback: a server down
    for an hour, asked every minute, made sixty."""
    import threading

    import mlflow

    from edgar_tune.serve import Model, Served
    from tasks.registry import loaded_version, resolve_version

    _, s = tiny_run
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = mlflow.MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    up = mlflow.MlflowClient(s["mlflow_tracking_uri"])
    checks, stopped = [], threading.Event()

    def points_at() -> str:
        checks.append(1)
        client = down if len(checks) <= 5 else up
        return resolve_version(client, s["registered_model"], None, s["model_alias"])  # as `edgar-tune serve` asks

    with caplog.at_level(logging.INFO, logger="edgar_tune.serve"):
        served = Served(None, resolve_version(up, s["registered_model"], None, s["model_alias"]), None)
        Model("m", "models:/m@champion", served, (points_at, None), 0.05, stopped)
        deadline = time.monotonic() + 60
        while len(checks) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped.set()
    said = [r for r in caplog.records if r.name == "edgar_tune.serve"]
    failed = [r for r in said if r.getMessage().startswith("could not follow models:/m@champion")]
    assert len(failed) == 1 and failed[0].exc_info, [r.getMessage() for r in said]
    back = [r.getMessage() for r in said if r.getMessage().startswith("following models:/m@champion again")]
    assert len(back) == 1 and re.fullmatch(rf"following models:/m@champion again after 5 failed check\(s\) \(Mlflow"
                                           rf"Exception: .+\); serving v{s['model_version']}", back[0]), back
    # a version that fails to load (its download cut, say) is loaded again after waits that double (0.05, 0.1, then
    # 0.2 s here), the alias still asked each check; said once
    tries, asked, stopped = [], [], threading.Event()

    def load(version: str):
        tries.append(version)
        if len(tries) <= 3:
            raise OSError(f"the download of v{version} was cut")
        return loaded_version(_version_folder(s, tmp_path / "again"), device="cpu")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgar_tune.serve"):
        moving = Model("m", "models:/m@champion", Served(None, "0", None), (lambda: asked.append(1) or "7", load),
                       0.05, stopped)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(r.getMessage().startswith("following models:/m@champion again")
                                                      for r in caplog.records):  # fmt: skip
            time.sleep(0.05)  # the line that says so comes just after v7 is served: wait for it, not for v7
        stopped.set()
    said = [r.getMessage() for r in caplog.records if r.name == "edgar_tune.serve"]
    assert moving.served.version == "7" and len(tries) == 4, said
    assert len(asked) > len(tries), asked  # checks between the loads that did not load (3 or more, unless slow)
    assert [m for m in said if "loading it" in m] == ["models:/m@champion now points at v7 (serving v0): loading it"]
    assert [m for m in said if m.startswith("could not follow")] == [
        "could not follow models:/m@champion; still serving v0, asking again every 0.05 s (the same failure again is "
        "counted, not logged); v7 loaded again after a wait that doubles with each failure, up to 3600 s, or at once "
        "if the alias moves"], said  # fmt: skip
    assert "following models:/m@champion again after 3 failed check(s) (OSError: the download of v7 was cut); " \
           "serving v7" in said, said


def _version_folder(s: dict, into: Path) -> Path:
    """The tiny run's registered version, downloaded as MLflow lays it out (MLmodel beside its artifacts)."""
    import mlflow

    mlflow.set_tracking_uri(s["mlflow_tracking_uri"])  # and its registry, which models:/ URIs are read from
    return Path(mlflow.artifacts.download_artifacts(f"models:/{s['registered_model']}/{s['model_version']}",
                                                    dst_path=str(into)))


def test_a_version_generates_on_the_gpu_where_cuda_is_and_never_elsewhere_by_surprise(tiny_run, tmp_path, monkeypatch,
                                                                                       capsys):  # fmt: skip
    """A loaded version goes where it is asked (model_config, else EDGAR_TUNE_SERVE_DEVICE/_DTYPE), else to the GPU
    in bfloat16 where CUDA is and the CPU in float32 elsewhere; a GPU asked for where there is none is refused
    before anything loads, not served from the CPU. Before 2026-12-05 every version generated on the CPU. A run
    folder given as the model is the version its run registered (`generate` and `serve` looked for an MLmodel in it)."""
    import torch

    from edgar_tune.cli import main
    from tasks.registry import loaded_version, placement

    gpu = torch.cuda.is_available()
    assert placement({}) == (("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32))
    assert placement({"device": "cpu", "dtype": "bfloat16"}) == ("cpu", torch.bfloat16)
    monkeypatch.setenv("EDGAR_TUNE_SERVE_DTYPE", "float16")
    assert placement({"device": "cpu"}) == ("cpu", torch.float16)
    assert placement({"device": "cpu", "dtype": "float32"}) == ("cpu", torch.float32)  # a load's own config first
    with pytest.raises(ValueError, match="device 'tpu': give auto, cpu, cuda or cuda:N"):
        placement({"device": "tpu"})
    _, s = tiny_run
    folder = _version_folder(s, tmp_path / "v")
    lm = loaded_version(folder, device="cpu", dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16 and lm.model.device.type == "cpu"
    settings = {"max_new_tokens": 3, "do_sample": False, "seed": 0, "stop": []}
    done = lm.complete([("Net sales increased", False)], settings, closing=None)
    assert done[0]["choices"][0]["completion_tokens"] == 3
    for a, b in [("a", "b"), ("a/v", "b/v")]:  # several models, each to be named once: said before any loads
        (tmp_path / a).mkdir(parents=True), (tmp_path / b).mkdir(parents=True)
    capsys.readouterr()
    assert main(["serve", "--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"), "--name", "x"]) == 2
    assert capsys.readouterr().err.strip() == ("edgar-tune serve: error: 1 --name for 2 --model: give one --name per "
                                               "--model, each its own")  # fmt: skip
    assert main(["serve", "--model", str(tmp_path / "a/v"), "--model", str(tmp_path / "b/v")]) == 2
    assert "error: two models would both be `v`: give one --name per --model" in capsys.readouterr().err
    # A run folder (`runs/latest`) is the version its run registered, in the store it registered in
    run, version = s["run_dir"], f"models:/{s['registered_model']}/{s['model_version']}"
    assert main(["serve", "--model", run, "--model", run]) == 2
    said = capsys.readouterr().err
    assert f"edgar-tune: {run} is a run: {version}, the version it registered" in said, said
    assert f"two models would both be `{s['registered_model']}/{s['model_version']}`" in said, said
    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "--model", run, "--prompt", "Net sales", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["prompt"] == "Net sales"
    (tmp_path / "unregistered" / "summary.json").parent.mkdir()
    (tmp_path / "unregistered" / "summary.json").write_text(json.dumps({"preset": "tiny"}))
    assert main(["serve", "--model", str(tmp_path / "unregistered")]) == 2
    assert "is a run folder whose run registered no version (its summary.json names none)" in capsys.readouterr().err
    if not gpu:
        capsys.readouterr()
        assert main(["serve", "--model", str(folder), "--device", "cuda"]) == 2
        said = capsys.readouterr().err.strip()
        assert said.endswith(f"device 'cuda', and this torch ({torch.__version__}) sees no CUDA GPU: give cpu (or "
                             "auto), or serve where a GPU is"), said  # fmt: skip


def test_answers_generated_together_are_the_answers_generated_alone(tiny_run, tmp_path):
    """A request's answers are generated in one batch, the prompts left-padded, each answer ending by its own
    length, stop texts and EOS, and handed on as it ends while the others go on: greedy, they are what one at a
    time gives; sampled, what transformers' own `generate(do_sample=True)` draws from the answer's seed, batched
    or not; streamed, pieces that make its text."""
    import torch

    from tasks.batching import Answer, fit
    from tasks.registry import loaded_version

    _, s = tiny_run
    lm = loaded_version(_version_folder(s, tmp_path / "v"), device="cpu")
    prompts = [("Net sales increased", False), ("We", False), ("Operating income in the fourth quarter was", False)]
    greedy = {"max_new_tokens": 10, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 3,
              "stop": []}  # fmt: skip
    alone = lambda asked: lm.generate_batches(asked, batch=1)  # noqa: E731
    said = lm.complete(prompts, greedy, closing=None)
    assert said == lm.complete(prompts, greedy, closing=None, run=alone)
    assert len({len(lm.tokenizer(p)["input_ids"]) for p, _ in prompts}) == 3  # padded: the prompts' lengths differ
    first = said[0]["choices"][0]["text"]
    stop = first[len(first) // 2 :][:3]
    stopped = lm.complete(prompts, greedy | {"stop": [stop]}, closing=None)
    assert stopped == lm.complete(prompts, greedy | {"stop": [stop]}, closing=None, run=alone)
    assert stopped[0]["choices"][0] == {"text": first.split(stop)[0], "finish_reason": "stop",
                                        "completion_tokens": stopped[0]["choices"][0]["completion_tokens"]}
    assert stopped[0]["choices"][0]["completion_tokens"] < 10
    sampled = greedy | {"do_sample": True, "temperature": 0.8, "top_p": 0.9}
    drawn = lm.complete(prompts, sampled, 2, closing=None)
    assert drawn == lm.complete(prompts, sampled, 2, closing=None, run=alone)
    assert any(d["choices"][0] != d["choices"][1] for d in drawn)  # each of n answers from a seed of its own
    assert [d["choices"][0] for d in drawn] == [d["choices"][0] for d in lm.complete(prompts, sampled, closing=None)]
    for i, (text, _) in enumerate(prompts):
        ids = lm.tokenizer(text, return_tensors="pt")
        torch.manual_seed(sampled["seed"] + i)
        out = lm.model.generate(**ids, do_sample=True, temperature=0.8, top_k=0, top_p=0.9, max_new_tokens=10,
                                pad_token_id=lm.tokenizer.pad_token_id)  # fmt: skip
        new = out[0][ids["input_ids"].shape[1] :]
        assert drawn[i]["choices"][0]["text"] == lm.tokenizer.decode(new, skip_special_tokens=True)
        assert drawn[i]["choices"][0]["completion_tokens"] == len(new)
    # each answer is handed on as it ends, the shorter while the longer goes on, its pieces its text
    pieces, order = {3: [], 9: []}, []
    short, long = (Answer(lm.encode([prompts[0]], n)[0], greedy | {"max_new_tokens": n}, 0, None,
                          heard=lambda text, choice, n=n: pieces[n].append(text if choice is None else choice),
                          ended=order.append) for n in (3, 9))  # fmt: skip
    lm.generate_batch([long, short])
    assert order == [short, long]
    assert [short.choice["completion_tokens"], long.choice["completion_tokens"]] == [3, 9]
    assert long.choice["text"].startswith(short.choice["text"])
    assert long.choice["text"] == first[: len(long.choice["text"])]
    for n, answer in ((3, short), (9, long)):
        assert pieces[n][-1] == answer.choice and "".join(pieces[n][:-1]) == answer.choice["text"]
    # a batch holds answers while their count times the longest's prompt and max_new_tokens fits its tokens
    span = short.ids["input_ids"].shape[1] + 9
    assert fit([long]) and fit([long], tokens=1) and fit([short, long], tokens=2 * span)
    assert not fit([short, long], tokens=2 * span - 1)


def test_an_answer_joins_a_batch_between_two_of_its_tokens_and_is_the_answer_it_is_alone(tiny_run, tmp_path):
    """An answer that joins a batch midway (`join`: its prompt read on its own, what the model made of it set
    beside the batch's cache, both left-padded to one length) is the answer it is generated alone, and so are the
    answers it joins, greedy and sampled, a one-token prompt's too, in GPT-2's, Llama's and Qwen2's layouts. A
    model whose cache keeps a sliding window (Mistral's, Gemma 2's layers) is not joined midway by the server (its
    answers join between batches); paused and joined all the same, its rows are read again whole, and are what
    they are alone."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from tasks.batching import Answer
    from tasks.registry import EdgarTuneLM, loaded_version

    _, s = tiny_run
    tokenizer = loaded_version(_version_folder(s, tmp_path / "v"), device="cpu").tokenizer
    vocab = len(tokenizer)
    small = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": vocab}  # fmt: skip
    layouts = {"gpt2": GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab), "llama": LlamaConfig(**small),
               "qwen2": Qwen2Config(**small), "mistral": MistralConfig(**small, sliding_window=8),
               "gemma2": Gemma2Config(**small, head_dim=16, sliding_window=8)}  # fmt: skip
    prompts = [tokenizer(p, return_tensors="pt") for p in ("Net sales increased", "Operating income in the fourth "
               "quarter of the year was", "We")] + [{"input_ids": torch.tensor([[tokenizer("Cash")["input_ids"][0]]])}]
    greedy = {"max_new_tokens": 12, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 5,
              "stop": []}  # fmt: skip
    sampled = greedy | {"do_sample": True, "temperature": 0.9}
    for name, config in layouts.items():
        torch.manual_seed(0)
        lm = EdgarTuneLM()
        lm.model, lm.tokenizer = AutoModelForCausalLM.from_config(config).eval(), tokenizer
        assert lm.joins_midway == (name not in ("mistral", "gemma2")), name
        for settings in (greedy, sampled):
            alone = [Answer(ids, settings, settings["seed"] + i, None) for i, ids in enumerate(prompts)]
            for a in alone:
                lm.generate_batch([a])
            pieces = {i: [] for i in range(len(prompts))}
            together = [Answer(ids, settings, settings["seed"] + i, None,
                               heard=lambda text, _, i=i, pieces=pieces: text is not None and pieces[i].append(text))
                        for i, ids in enumerate(prompts)]  # fmt: skip
            first, third = together[0], together[2]
            sliding = not lm.joins_midway
            batch = lm.advance(lm.join(None, together[:2]), lambda going, first=first: len(first.tokens) >= 4)
            assert [len(a.tokens) for a in together] == [4, 4, 0, 0]
            # paused all the same (the server never pauses it), a sliding window's cache is not cut: read again
            assert batch.cache is None if sliding else batch.cache.get_seq_length() > 0, name
            batch = lm.advance(lm.join(batch, together[2:3]), lambda going, third=third: len(third.tokens) >= 3)
            batch = lm.join(batch, together[3:])
            while batch is not None:
                batch = lm.advance(batch)
            assert [a.choice for a in together] == [a.choice for a in alone], (name, settings["do_sample"])
            assert ["".join(pieces[i]) for i in range(len(prompts))] == [a.choice["text"] for a in together]
            assert all(a.choice["completion_tokens"] for a in together)


def test_logit_bias_and_penalties_shape_each_step_as_openai_vllm_and_transformers_define_them(tiny_run, tmp_path):
    """OpenAI's `logit_bias`, `presence_penalty` and `frequency_penalty`, and the repetition penalty, shape each
    step's logits, greedy decoding's too: the tokens are a plain loop's over the model that adds the bias, applies
    the repetition penalty (over the prompt's and the answer's tokens) and subtracts OpenAI's frequency x count +
    presence x [count > 0] (over the answer's), in vLLM's order; the repetition penalty alone gives what
    transformers' own `generate(repetition_penalty=...)` does. Generated together with answers of other settings,
    or joining a batch midway, each is the answer it is alone, and its log probabilities stay the model's own."""
    import torch

    from tasks.batching import Answer
    from tasks.registry import EdgarTuneLM, generation_settings, loaded_version

    _, s = tiny_run
    tok = loaded_version(_version_folder(s, tmp_path / "v"), device="cpu").tokenizer
    model = _random_llama(len(tok))  # the tuned tiny model says one token over and over, whatever shapes it
    lm, n = EdgarTuneLM(), 12
    lm.model, lm.tokenizer = model, tok
    eos = set(lm._eos)
    prompts = [tok(p, return_tensors="pt") for p in ("Net sales increased", "Our segments", "We")]

    def loop(ids, st: dict) -> tuple[list[int], list[float]]:  # a token at a time, nothing batched or cached
        prompt, out, raw = ids["input_ids"][0].tolist(), [], []
        while len(out) < n and not (out and out[-1] in eos):
            with torch.no_grad():
                x = model(input_ids=torch.tensor([prompt + out])).logits[0, -1].float()
            logprobs = torch.log_softmax(x, dim=-1)
            for t, b in st["logit_bias"].items():
                x[t] += b
            r = st["repetition_penalty"]
            for t in set(prompt + out):
                x[t] = x[t] / r if x[t] > 0 else x[t] * r
            for t in set(out):
                x[t] -= st["frequency_penalty"] * out.count(t) + st["presence_penalty"]
            out.append(int(x.argmax()))
            raw.append(float(logprobs[out[-1]]))
        return out, raw

    plain = [loop(ids, generation_settings({"max_new_tokens": n}))[0] for ids in prompts]
    cases = {"bias": {"logit_bias": {str(plain[0][0]): -100, str(plain[1][1]): 4}},
             "frequency": {"frequency_penalty": 2}, "presence": {"presence_penalty": 2},
             "repetition": {"repetition_penalty": 1.5},
             "all": {"logit_bias": {plain[2][0]: -3}, "repetition_penalty": 1.2, "presence_penalty": -1,
                     "frequency_penalty": 1.5}}  # fmt: skip
    settings = {name: generation_settings({"max_new_tokens": n} | kw) for name, kw in cases.items()}
    settings["sampled"] = generation_settings({"max_new_tokens": n, "do_sample": True, "temperature": 0.8,
                                               "top_k": 0, "frequency_penalty": 1.0, "seed": 3})  # fmt: skip
    settings["plain"] = generation_settings({"max_new_tokens": n})
    asked, alone, by = _alone(lm, settings, prompts)
    for name in cases:
        expected = [loop(ids, settings[name]) for ids in prompts]
        got = [by[name, i] for i in range(len(prompts))]
        assert [a.tokens for a in got] == [tokens for tokens, _ in expected], name
        assert [a.tokens for a in got] != plain, name  # each shapes what is said
        for a, (_, raw) in zip(got, expected, strict=True):  # the model's own log probabilities, unshaped
            assert [x.logprob for x in a.scored] == pytest.approx(raw, abs=1e-4), name
    hf = [model.generate(**ids, do_sample=False, max_new_tokens=n, repetition_penalty=1.5,
                         pad_token_id=tok.pad_token_id or next(iter(eos)))[0, ids["input_ids"].shape[1] :].tolist()
          for ids in prompts]  # fmt: skip
    assert [by["repetition", i].tokens for i in range(len(prompts))] == hf
    # vLLM's min_p draws as transformers' own generate(min_p=...) does from the answer's seed
    min_p = generation_settings({"max_new_tokens": n, "do_sample": True, "temperature": 0.9, "top_k": 0, "min_p": 0.5,
                                 "seed": 11})  # fmt: skip
    drawn, unnarrowed = ([Answer(ids, st, st["seed"] + i, None) for i, ids in enumerate(prompts)]
                         for st in (min_p, min_p | {"min_p": 0.0}))  # fmt: skip
    lm.generate_batch(drawn)
    lm.generate_batch(unnarrowed)
    for i, ids in enumerate(prompts):
        torch.manual_seed(min_p["seed"] + i)
        out = model.generate(**ids, do_sample=True, temperature=0.9, top_k=0, min_p=0.5, max_new_tokens=n,
                             pad_token_id=tok.pad_token_id or next(iter(eos)))  # fmt: skip
        assert drawn[i].tokens == out[0, ids["input_ids"].shape[1] :].tolist()
    assert [a.tokens for a in drawn] != [a.tokens for a in unnarrowed]
    _each_as_alone(lm, asked, alone)


# A chat template that writes tool calls and their results (as Qwen's and Llama 3's do, shortened)
TOOL_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    "<tool_call>{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


def test_a_conversations_tool_calls_and_results_go_to_a_template_that_writes_them(tiny_run, tmp_path):
    """An agent's next request holds the call it was answered with (an assistant's `tool_calls`, OpenAI's form:
    arguments as JSON text) and the tool's result (a `tool` turn): a chat template that writes tool calls gets
    them as transformers' templates take them (arguments a mapping), so the model reads what it called and what
    came back; one that does not (ChatML's, which would leave the call out) refuses them, as does a turn not of
    that form. Before, every tool turn was refused."""
    import mlflow
    from transformers import AutoTokenizer

    from tasks.registry import chat_prompt

    _, s = tiny_run
    folder, _ = _chat_version(s, tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(next(folder.rglob("tokenizer.json")).parent)
    arguments = '{"segment": "AWS", "year": 2023, "grew": true}'
    asked = [{"role": "user", "content": "Which segment grew?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "Segment", "arguments": arguments}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "AWS sales grew 13%."}]  # fmt: skip
    with pytest.raises(mlflow.exceptions.MlflowException, match="turn 2: a tool call or its result, which the "
                       "model's chat template does not write"):  # fmt: skip
        chat_prompt(tok, asked, "messages")  # ChatML's
    tok.chat_template = TOOL_CHATML
    prompt = chat_prompt(tok, asked, "messages")
    assert prompt == ("<|im_start|>user\nWhich segment grew?<|im_end|>\n<|im_start|>assistant\n<tool_call>"
                      '{"name": "Segment", "arguments": {"segment": "AWS", "year": 2023, "grew": true}}</tool_call>'
                      "<|im_end|>\n<|im_start|>tool\nAWS sales grew 13%.<|im_end|>\n<|im_start|>assistant\n"), prompt
    for wrong in ({"role": "assistant", "tool_calls": [{"function": {"name": "Segment", "arguments": "{"}}]},
                  {"role": "tool", "content": None}, {"role": "user", "tool_calls": [{}]}):  # fmt: skip
        with pytest.raises(mlflow.exceptions.MlflowException, match="turn 2: .* is not an assistant's"):
            chat_prompt(tok, [asked[0], wrong], "messages")


# Llama 3.1's: a call as bare JSON, one a turn (its template refuses two)
TOOL_LLAMA = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{% if m.tool_calls %}"
    "{% if m.tool_calls | length != 1 %}{{ raise_exception('This model only supports single tool-calls at once!') }}"
    "{% endif %}{% set c = m.tool_calls[0].function %}{{ '{\"name\": \"' + c.name + '\", \"parameters\": ' }}"
    "{{ c.arguments | tojson }}}<|eot_id|>{% else %}{{ m.content }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")  # fmt: skip


def test_auto_tool_choice_answers_text_or_calls_as_the_chat_template_writes_them(tiny_run, tmp_path):
    """With `tools` and `tool_choice` "auto" (or left out: OpenAI's default, and what LangChain's `bind_tools` and
    the Agents SDK send), the version chooses: text, or calls written as its chat template writes an assistant's
    `tool_calls` (`CallForm`, read from the template: Qwen's and Hermes' `<tool_call>` tags, tokens of their own or
    text, Llama 3.1's bare JSON, one a turn), which once begun are kept to the tools' parameters and read back as
    OpenAI's `tool_calls` (finish_reason "tool_calls", the text before them as content). Here a random model calls
    where `<tool_call>` is made its likeliest token (logit_bias), and answers text where not; streamed, its text
    comes as it is generated, then each call as OpenAI streams one (its id and name, then its arguments piece by
    piece); with a response_format, the answer is its JSON or calls; "none" shows the tools in the prompt all the
    same and answers text, whatever the model would call. The Responses API calls the same tools (its flat form):
    each call a `function_call` item, a named one's arguments streamed as they come, and the call and its output
    sent back as input items make the prompt chat's turns make. A call asked for (named, "required") is written in
    the same form, its trigger first, as a version tuned on calls was taught: streamed as "auto"'s, cut by
    max_tokens a named call's arguments as far as they got. Before, "auto" was refused with a 400, the Responses API
    refused tools and function calls' items, and a call asked for was vLLM's bare JSON whatever the template."""
    from typing import Literal

    import llguidance
    import openai
    import yaml
    from pydantic import BaseModel, ConfigDict

    from edgar_tune.serve import CallForm, Refused
    from tasks.batching import grammar_tokenizer
    from tasks.generate import turn_end
    from tasks.registry import version_artifacts
    from tests.test_textdata import TOOL_QWEN

    class Segment(BaseModel):
        segment: Literal["AWS", "North America", "International"]
        grew: bool

    class Lookup(BaseModel):  # JSON without free whitespace, where a random model could loop in it
        model_config = ConfigDict(json_schema_extra={"x-guidance": {"whitespace_flexible": False}})
        item: Literal["7", "7A", "8"]

    _, s = tiny_run
    folder, tok = _chat_version(s, tmp_path / "chat")
    parameters = {m.__name__: openai.pydantic_function_tool(m)["function"]["parameters"] for m in (Segment, Lookup)}
    calls = [{"type": "function", "function": {"name": "Segment", "arguments": {"segment": "AWS", "grew": True}}},
             {"type": "function", "function": {"name": "Lookup", "arguments": {"item": "7A"}}}]  # fmt: skip
    with pytest.raises(Refused, match=r"does not write tool calls \(it has no `tool_calls`\)"):
        CallForm.of(tok, turn_end(tok))  # ChatML's
    tags = tok.__class__.from_pretrained(version_artifacts(folder)[0]["weights"])
    tags.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"])  # as Qwen3's tokenizer holds them
    for template, tokenizer, most in ((TOOL_QWEN, tags, 2), (TOOL_CHATML, tok, 2), (TOOL_LLAMA, tok, 1)):
        tokenizer.chat_template = template
        form = CallForm.of(tokenizer, turn_end(tokenizer))
        asked = [{"role": "user", "content": "Which segment grew?"}]
        opened = tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
        written = tokenizer.apply_chat_template([*asked, {"role": "assistant", "content": "",
                                                          "tool_calls": calls[:most]}], tokenize=False)  # fmt: skip
        written = written[len(opened) :].removesuffix("\n").removesuffix(turn_end(tokenizer))
        before = "<think>\nA segment.\n</think>\n\nLet me look." if tokenizer is tags else "Let me look."
        answer = before + "\n" + written  # some text (a thinking block's tags too), then calls as the template writes
        matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, len(tokenizer)),
                                       llguidance.LLMatcher.grammar_from_lark(form.grammar(parameters, True)))
        ids = tokenizer.encode(answer, add_special_tokens=False)
        assert matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting(), (template[:20], answer)
        said = tokenizer.decode(ids, skip_special_tokens=True)
        assert form.read(said, list(parameters)) == (before, [(c["function"]["name"], json.dumps(
            c["function"]["arguments"])) for c in calls[:most]], True), said  # fmt: skip
        cut = form.read(said[: said.index("{", said.index(form.trigger) + len(form.trigger) + 2) + 3],
                        list(parameters))  # a call cut short: as far as it got  # fmt: skip
        assert cut[0] == before and cut[2] is False and [name for name, _ in cut[1]] == ["Segment"], cut
        assert json.dumps(calls[0]["function"]["arguments"]).startswith(cut[1][0][1]) and len(cut[1][0][1]) == 3
        assert form.read("No call: " + said[: said.index(form.trigger)], list(parameters))[1:] == ([], True)
        for wrong in (f"Text, then {form.trigger} and not a call", answer.replace("Segment", "Segments", 1)):
            matcher.reset()
            ids = tokenizer.encode(wrong, add_special_tokens=False)
            assert matcher.try_consume_tokens(ids) < len(ids), wrong
        if form.trigger.startswith("<"):  # with a response_format: its JSON, or calls alone; no free text
            matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, len(tokenizer)), llguidance.LLMatcher.
                                           grammar_from_lark(form.grammar(parameters, True, parameters["Lookup"])))
            for text, whole in (('{"item":"7A"}', True), (written, True), (answer, False)):  # (compact: its x-guidance)
                matcher.reset()
                ids = tokenizer.encode(text, add_special_tokens=False)
                assert (matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()) == whole, text
        # a call asked for ("required", or named): calls alone, in the form, from the answer's start
        for chosen, text, whole in ((parameters, written, True), (parameters, answer, False),
                                    ({"Segment": parameters["Segment"]}, written, most == 1),
                                    ({"Lookup": parameters["Lookup"]}, written, False)):  # fmt: skip
            grammar = form.grammar(chosen, len(chosen) > 1, forced=True)
            matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, len(tokenizer)),
                                           llguidance.LLMatcher.grammar_from_lark(grammar))  # fmt: skip
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert (matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()) == whole, (chosen, text)
    assert (form.apart, form.trigger) == (None, '{"name": "')  # Llama 3.1's: one call a turn, opened by its JSON

    # a version whose template writes calls in Qwen's tags, served: a random model over the tagged tokenizer
    weights = Path(version_artifacts(folder)[0]["weights"])
    shutil.rmtree(weights)
    tags.chat_template = TOOL_QWEN
    _random_llama(len(tags), eos_token_id=tags.eos_token_id, bos_token_id=tags.bos_token_id).save_pretrained(weights)
    tags.save_pretrained(weights)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["config"]["weights"] = "model"
    mlmodel["flavors"]["python_function"]["artifacts"].pop("base", None)
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    tools = [openai.pydantic_function_tool(Segment), openai.pydantic_function_tool(Lookup)]
    asked = [{"role": "user", "content": "Which segment grew?"}]
    call = {"logit_bias": {str(tags.convert_tokens_to_ids("<tool_call>")): 100}, "parallel_tool_calls": False}
    with edgar_tune_serve(str(folder), tmp_path) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        text = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=12, tools=tools)
        pieces = list(client.chat.completions.create(model=folder.name, messages=asked, max_tokens=12, tools=tools,
                                                     tool_choice="auto", stream=True))  # fmt: skip
        called = client.chat.completions.parse(model=folder.name, messages=asked, max_tokens=60, tools=tools, **call)
        shown = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=4, tools=tools,
                                               tool_choice="none", logit_bias=call["logit_bias"])  # fmt: skip
        plain = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=4)
        with client.chat.completions.stream(model=folder.name, messages=asked, max_tokens=60, tools=tools,
                                            **call) as stream:  # fmt: skip
            streamed = stream.get_final_completion()
        chunks = list(client.chat.completions.create(model=folder.name, messages=asked, max_tokens=60, tools=tools,
                                                     stream=True, **call))  # fmt: skip
        # the Responses API: its function tools (flat), a call as a function_call item, and the call and its
        # output sent back as input items (what the Agents SDK sends), as chat's assistant and tool turns
        bias = {"extra_body": {"logit_bias": call["logit_bias"]}, "parallel_tool_calls": False}
        response = client.responses.parse(model=folder.name, input="Which segment grew?", tools=tools,
                                          max_output_tokens=60, **bias)  # fmt: skip
        with client.responses.stream(model=folder.name, input="Which segment grew?", tools=tools,
                                     max_output_tokens=60, **bias) as stream:  # fmt: skip
            events = list(stream)
        flat = [{"type": "function", **t["function"]} for t in tools]  # the Responses API's form (parse makes it)
        named = list(client.responses.create(model=folder.name, input="Which item?", tools=flat, stream=True,
                                             tool_choice={"type": "function", "name": "Lookup"}))  # fmt: skip
        item = response.output[0]
        back = [{"role": "user", "content": "Which segment grew?"}, item.model_dump(exclude={"parsed_arguments"}),
                {"type": "function_call_output", "call_id": item.call_id, "output": "AWS sales grew 13%."}]
        answered = client.responses.create(model=folder.name, input=back, tools=flat, max_output_tokens=4)
        called_back = {"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                            "arguments": item.arguments}}
        as_chat = client.chat.completions.create(model=folder.name, max_tokens=4, tools=tools, messages=[
            back[0], {"role": "assistant", "content": None, "tool_calls": [called_back]},
            {"role": "tool", "tool_call_id": item.call_id, "content": "AWS sales grew 13%."}])  # fmt: skip
        # "auto" with a response format (an Agents SDK agent with an output_type and tools): its JSON, or calls
        formatted = client.chat.completions.parse(model=folder.name, messages=asked, max_tokens=60, tools=tools,
                                                  response_format=Lookup)  # fmt: skip
        formatted_call = client.chat.completions.parse(model=folder.name, messages=asked, max_tokens=60, tools=tools,
                                                       response_format=Lookup, **call)  # fmt: skip
        output = client.responses.parse(model=folder.name, input="Which item?", tools=tools, text_format=Lookup,
                                        max_output_tokens=60)  # fmt: skip
        # a call asked for, named or "required": written in the version's own form (its trigger first), as tuned
        lookup = {"type": "function", "function": {"name": "Lookup"}}
        named_call = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=60, tools=tools,
                                                    tool_choice=lookup, logprobs=True)  # fmt: skip
        required = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=60, tools=tools,
                                                  tool_choice="required", parallel_tool_calls=False, logprobs=True)
        named_chunks = list(client.chat.completions.create(model=folder.name, messages=asked, max_tokens=60,
                                                           tools=tools, tool_choice=lookup, stream=True))  # fmt: skip
        whole = named_call.choices[0].message.tool_calls[0].function.arguments  # cut a token before its end
        tokens = [t.token for t in named_call.choices[0].logprobs.content]
        upto = next(k for k in range(len(tokens)) if whole in "".join(tokens[: k + 1]))
        named_cut = client.chat.completions.create(model=folder.name, messages=asked, tools=tools, tool_choice=lookup,
                                                   max_tokens=upto)  # fmt: skip
        # "auto" cut inside its call: the call as far as it got (OpenAI's), whole or streamed, finish_reason "length"
        chosen = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=60, tools=tools,
                                                logprobs=True, **call)  # fmt: skip
        whole = chosen.choices[0].message.tool_calls[0].function.arguments
        tokens = [t.token for t in chosen.choices[0].logprobs.content]
        upto = next(k for k in range(len(tokens)) if whole in "".join(tokens[: k + 1]))
        chosen_cut = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=upto, tools=tools,
                                                    **call)  # fmt: skip
        cut_chunks = list(client.chat.completions.create(model=folder.name, messages=asked, max_tokens=upto,
                                                         tools=tools, stream=True, **call))  # fmt: skip
        cut_response = client.responses.create(model=folder.name, input="Which segment grew?", tools=flat,
                                               max_output_tokens=upto, **bias)  # fmt: skip
        with pytest.raises(openai.BadRequestError) as forced:
            client.chat.completions.create(model=folder.name, messages=asked, max_tokens=4, tools=tools,
                                           tool_choice="required", response_format={"type": "json_object"})
        with pytest.raises(openai.BadRequestError) as hosted:
            client.responses.create(model=folder.name, input="Hi", tools=[{"type": "web_search"}])
        with pytest.raises(openai.BadRequestError) as nested:
            client.responses.create(model=folder.name, input="Hi", tools=tools)
    said = formatted.choices[0].message
    assert isinstance(said.parsed, Lookup) and said.tool_calls is None, formatted  # the format's JSON
    assert formatted_call.choices[0].message.tool_calls and formatted_call.choices[0].finish_reason == "tool_calls"
    assert isinstance(output.output_parsed, Lookup), output
    assert forced.value.body["message"].startswith("a tool call's form is its function's parameters, and an answer "
                                                   "besides one can be kept to JSON"), forced  # fmt: skip
    for answer, finish in ((named_call, "stop"), (required, "tool_calls")):
        said = answer.choices[0].message
        assert answer.choices[0].finish_reason == finish and said.content is None and len(said.tool_calls) == 1
        assert answer.choices[0].logprobs.content[0].token == "<tool_call>", answer  # the form's, not bare JSON
        function = said.tool_calls[0].function
        assert {"Lookup": Lookup, "Segment": Segment}[function.name].model_validate_json(function.arguments)
    assert named_call.choices[0].message.tool_calls[0].function.name == "Lookup"
    opened = named_chunks[1].choices[0].delta.tool_calls[0]  # streamed: its id and name once whole, as "auto"'s
    assert named_chunks[0].choices[0].delta.content is None and opened.function.name == "Lookup" and opened.id
    argued = "".join(c.choices[0].delta.tool_calls[0].function.arguments for c in named_chunks[2:]
                     if c.choices[0].delta.tool_calls)  # fmt: skip
    assert Lookup.model_validate_json(argued) and named_chunks[-1].choices[0].finish_reason == "stop"
    said = named_cut.choices[0].message  # cut by max_tokens: the call, its arguments as far as they got
    assert named_cut.choices[0].finish_reason == "length" and said.tool_calls[0].function.name == "Lookup", named_cut
    assert whole.startswith(said.tool_calls[0].function.arguments) and '{"item' in said.tool_calls[0].function.arguments
    assert said.tool_calls[0].function.arguments != whole
    said, whole = chosen_cut.choices[0].message, chosen.choices[0].message.tool_calls[0].function
    cut = said.tool_calls[0].function
    assert chosen_cut.choices[0].finish_reason == "length" and said.content is None and len(said.tool_calls) == 1
    assert cut.name == whole.name and whole.arguments.startswith(cut.arguments) and cut.arguments != whole.arguments
    streamed_cut = "".join(c.choices[0].delta.tool_calls[0].function.arguments for c in cut_chunks
                           if c.choices and c.choices[0].delta.tool_calls)  # fmt: skip
    assert streamed_cut == cut.arguments and cut_chunks[-1].choices[0].finish_reason == "length"  # as the stream's
    cut_item = cut_response.output[-1]
    assert cut_response.status == "incomplete" and (cut_item.type, cut_item.status, cut_item.arguments) == (
        "function_call", "incomplete", cut.arguments), cut_response  # fmt: skip
    said = text.choices[0].message
    assert said.tool_calls is None and said.content and text.choices[0].finish_reason == "length", text
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == said.content
    assert pieces[-1].choices[0].finish_reason == "length"
    said = shown.choices[0].message  # "none": the tools in the prompt, and text, whatever the model would call
    assert said.tool_calls is None and said.content.startswith("<tool_call>"), shown
    assert shown.usage.prompt_tokens == text.usage.prompt_tokens > plain.usage.prompt_tokens
    said = called.choices[0].message
    assert called.choices[0].finish_reason == "tool_calls" and said.content is None and len(said.tool_calls) == 1
    function = said.tool_calls[0].function
    assert isinstance(function.parsed_arguments, Segment | Lookup) and function.name == type(
        function.parsed_arguments).__name__, said  # fmt: skip
    again = streamed.choices[0].message.tool_calls[0].function
    assert (again.name, again.arguments, again.parsed_arguments) == (function.name, function.arguments,
                                                                     function.parsed_arguments)  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None
    opened = chunks[1].choices[0].delta.tool_calls[0]  # the call's id and name once its name is whole
    assert opened.id.startswith("call_") and (opened.function.name, opened.function.arguments) == (function.name, "")
    pieces = [c.choices[0].delta.tool_calls[0].function.arguments for c in chunks[2:] if c.choices[0].delta.tool_calls]
    assert len(pieces) > 3 and "".join(pieces) == function.arguments  # then its arguments as they are written
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["tool_calls"]
    assert [i.type for i in response.output] == ["function_call"] and response.status == "completed"
    assert (item.name, item.arguments) == (function.name, function.arguments) and item.parsed_arguments == (
        function.parsed_arguments) and item.call_id.startswith("call_") and item.id.startswith("fc_")  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"] and kinds[-3:] == [
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]  # fmt: skip
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"} and len(kinds) > 9  # as they come
    assert "".join(e.delta for e in events[3:-3]) == item.arguments
    assert events[-1].response.output[0].arguments == item.arguments
    assert events[2].item.id == events[-1].response.output[0].id  # one item, from its first event to the response
    kinds = [e.type for e in named]
    pieces = [e.delta for e in named if e.type == "response.function_call_arguments.delta"]
    assert kinds[2] == "response.output_item.added" and named[2].item.name == "Lookup" and len(pieces) > 3
    assert Lookup.model_validate_json("".join(pieces)) and named[-1].response.output[0].arguments == "".join(pieces)
    assert answered.usage.input_tokens == as_chat.usage.prompt_tokens  # the same prompt: the call, and its output
    assert answered.output_text == as_chat.choices[0].message.content and answered.tool_choice == "auto"
    assert nested.value.body["message"].startswith('tools[0] is chat\'s form of a function tool ({"type": "function", '
                                                   '"function": {...}}); the Responses API\'s is flat'), nested
    assert hosted.value.body["message"].startswith("tools[0] is of type web_search: this server calls function "
                                                   "tools only")  # fmt: skip


def test_reasoning_is_split_from_an_answer_as_it_comes_as_from_the_whole():
    """`Thinking` reads the tags a chat template writes reasoning between (Qwen3's `<think>`; none in ChatML's),
    where an answer begins from its prompt (before a block, inside one the prompt opened as DeepSeek-R1's does,
    after one it closed as Qwen3's does with `enable_thinking` false), and splits the answer into reasoning and
    content, newlines at the block's edges left out, a block never closed (cut) all reasoning. Streamed a few
    characters at a time, the parts sent (`_Thought`) join into what the whole answer's split gives: a tag's start
    and the newlines that may end the block are held back till they can no longer change. An answer kept to a
    format may begin with a block (`Reasoning.formed`), the format holding after it."""
    from edgar_tune.serve import Reasoning, Thinking
    from tasks.models import load_tokenizer, smollm2_dir
    from tests.test_textdata import CHATML, THINK_QWEN

    tok = load_tokenizer(str(smollm2_dir()))
    tok.chat_template = CHATML
    assert Thinking.of(tok) is None
    tok.chat_template = THINK_QWEN
    thinking = Thinking.of(tok)
    assert thinking == Thinking("<think>", "</think>")
    asked = [{"role": "user", "content": "Which segment grew?"}]
    prompts = {k: tok.apply_chat_template(asked, tokenize=False, add_generation_prompt=True, **kw)
               for k, kw in (("before", {}), ("after", {"enable_thinking": False}))}  # fmt: skip
    prompts["inside"] = prompts["before"] + "<think>\n"  # DeepSeek-R1's generation prompt opens the block
    assert {k: thinking.state(p) for k, p in prompts.items()} == {k: k for k in prompts}
    answers = [("<think>\nAWS grew.\n</think>\n\nAWS, by 13%.", "before", ("AWS grew.", "AWS, by 13%.")),
               ("\n<think>AWS</think>AWS.", "before", ("AWS", "AWS.")),
               ("AWS, by 13%.\n", "before", (None, "AWS, by 13%.\n")),
               ("<thin", "before", (None, "<thin")),
               ("<think>\nAWS grew, and then\n\n", "before", ("AWS grew, and then", None)),
               ("<think>\n\n</think>\n\nAWS.", "before", (None, "AWS.")),
               ("AWS grew.\n</think>\n\nAWS.", "inside", ("AWS grew.", "AWS.")),
               ("AWS grew.", "inside", ("AWS grew.", None)),
               ("<think>AWS.", "after", (None, "<think>AWS."))]  # fmt: skip
    for text, state, split in answers:
        assert thinking.split(text, state) == split, (text, state)
        for size in (1, 2, 3, 7):
            reader = Reasoning(thinking, state, include=True).reader()
            parts = [p for i in range(0, len(text), size) for p in reader.heard(text[i : i + size])]
            parts += reader.heard("", last=True)
            joined = tuple("".join(t for k, t in parts if k == kind) or None for kind in ("reasoning", "content"))
            assert joined == split, (text, state, size, parts)
    reader = Reasoning(thinking, "before", include=False).reader()  # vLLM's include_reasoning false
    assert reader.heard(answers[0][0], last=True) == [("content", "AWS, by 13%.")]
    # an answer kept to a format may think first (a block, a newline or two), the format holding after it; the
    # tags text (a lazy lexeme) or tokens of their own (Qwen3's tokenizer holds them)
    import llguidance

    from tasks.batching import grammar, grammar_tokenizer

    schema = {"type": "object", "properties": {"item": {"enum": ["7", "8"]}}, "required": ["item"]}
    for tokens in (False, True):
        if tokens:
            tok.add_tokens(["<think>", "</think>"])
        thinking = Thinking.of(tok)
        assert (thinking.ids != (None, None)) == tokens
        cases = {"before": [('<think>\nItem 7, {"item": "8"}.\n</think>\n\n{"item": "7"}', True),
                            ('{"item": "7"}', True), ('Item 7: {"item": "7"}', False),
                            ('<think>\nItem 7.\n</think>\n\n\n{"item": "7"}', False)],
                 "inside": [('Item 7.\n</think>\n\n{"item": "7"}', True), ('{"item": "7"}', False)]}  # fmt: skip
        for state, texts in cases.items():
            fmt = Reasoning(thinking, state, True).formed({"response_format": {
                "type": "json_schema", "json_schema": {"schema": schema}}})["response_format"]  # fmt: skip
            matcher = llguidance.LLMatcher(grammar_tokenizer(tok, len(tok)), grammar(fmt))
            for text, whole in texts:
                matcher.reset()
                ids = tok.encode(text, add_special_tokens=False)
                assert (matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()) == whole, (text, state)
        assert Reasoning(thinking, "after", True).formed({"response_format": {"type": "json_object"}}) == {
            "response_format": {"type": "json_object"}}  # the prompt closed the block: the format from the start
        # every kind of format, a Lark grammar (a tool call's form is one) as a JSON schema
        for fmt, text in (({"type": "regex", "regex": "AWS|AMZN"}, "AMZN"), ({"type": "choice", "choice": ["up",
                          "down"]}, "down"), ({"type": "grammar", "grammar": '%llguidance {}\nstart: "yes" | "no"'},
                          "no")):  # fmt: skip
            wrapped = Reasoning(thinking, "before", True).formed({"response_format": fmt})["response_format"]
            matcher = llguidance.LLMatcher(grammar_tokenizer(tok, len(tok)), grammar(wrapped))
            for given, whole in ((f"<think>\nAWS.\n</think>\n\n{text}", True), (text, True), (f"x{text}", False)):
                matcher.reset()
                ids = tok.encode(given, add_special_tokens=False)
                assert (matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()) == whole, (fmt, given)


def test_vllms_min_tokens_ignore_eos_and_stop_token_ids_end_answers_as_vllm_defines_them(tiny_run, tmp_path):
    """vLLM's `min_tokens` holds the answer's ends (EOS, the turn's end, `stop_token_ids`) back until that many
    tokens are generated, `ignore_eos` runs it to max_tokens whatever EOS it generates (what fixed-length
    benchmarks send: `vllm bench serve --ignore-eos`), and `stop_token_ids` end it at any of those ids, beside
    EOS. Here EOS is made the likeliest token (logit_bias), so that every answer would end at once: greedy, sampled,
    batched together with a plain one, or joining a batch midway, each is the answer it is alone."""
    from tasks.registry import EdgarTuneLM, generation_settings, loaded_version

    _, s = tiny_run
    tok = loaded_version(_version_folder(s, tmp_path / "v"), device="cpu").tokenizer
    model = _random_llama(len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    lm, n, eos = EdgarTuneLM(), 12, tok.eos_token_id
    lm.model, lm.tokenizer = model, tok
    prompts = [tok(p, return_tensors="pt") for p in ("Net sales increased", "Our segments")]
    plain = generation_settings({"max_new_tokens": n})
    other = next(t for t in range(3, 100) if t != eos)  # a token the model would not say
    ending = {"max_new_tokens": n, "logit_bias": {str(eos): 100}}
    settings = {"ends": generation_settings(ending), "least": generation_settings(ending | {"min_tokens": 5}),
                "ignored": generation_settings(ending | {"ignore_eos": True}),
                "sampled": generation_settings(ending | {"ignore_eos": True, "do_sample": True, "seed": 4}),
                "own": generation_settings({"max_new_tokens": n, "stop_token_ids": [other],
                                            "logit_bias": {str(other): 100}, "ignore_eos": True}),
                "plain": plain}  # fmt: skip
    asked, alone, by = _alone(lm, settings, prompts)
    for i in range(len(prompts)):
        assert by["ends", i].tokens == [eos] and by["ends", i].choice["finish_reason"] == "stop"
        least = by["least", i].tokens
        assert len(least) == 6 and least[-1] == eos and eos not in least[:-1], least  # 5, then EOS
        assert by["least", i].choice["finish_reason"] == "stop"
        assert by["ignored", i].tokens == [eos] * n and by["ignored", i].choice["finish_reason"] == "length"
        assert len(by["sampled", i].tokens) == n and by["sampled", i].choice["finish_reason"] == "length"
        assert by["own", i].tokens == [other] and by["own", i].choice["finish_reason"] == "stop"
        assert len(by["plain", i].tokens) == n  # the random model says no EOS by itself
    _each_as_alone(lm, asked, alone)
    with pytest.raises(Exception, match=r"min_tokens must be a whole number from 0 to max_new_tokens \(12\)"):
        generation_settings({"max_new_tokens": n, "min_tokens": 13})
    with pytest.raises(Exception, match=r"stop_token_ids must be a list of token ids"):
        generation_settings({"stop_token_ids": ["x"]})


SEGMENTS = {"type": "object", "properties": {"segment": {"enum": ["AWS", "North America", "International"]},
                                            "year": {"type": "integer", "minimum": 2000, "maximum": 2030},
                                            "grew": {"type": "boolean"}},
            "required": ["segment", "year", "grew"], "additionalProperties": False,
            "x-guidance": {"whitespace_flexible": False}}  # llguidance's: no whitespace between tokens  # fmt: skip


def test_response_format_keeps_each_step_to_what_its_json_schema_allows_next(tiny_run, tmp_path):
    """`response_format` (OpenAI's JSON mode and JSON schema) keeps each step's tokens to those llguidance's grammar
    of it allows next, and to the answer's ends once the JSON may end: greedy answers are a plain loop's that takes
    the likeliest token the grammar allows (nothing batched or cached), each answer ends once its JSON is whole
    (finish_reason "stop"), and parses. Generated together with unformatted and sampled answers, or joining a batch
    midway, each is the answer it is alone, and its log probabilities stay the model's own."""
    import llguidance
    import torch

    from tasks.registry import EdgarTuneLM, generation_settings, loaded_version

    _, s = tiny_run
    tok = loaded_version(_version_folder(s, tmp_path / "v"), device="cpu").tokenizer
    model = _random_llama(len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)  # (2 is a quote)
    lm, n = EdgarTuneLM(), 40
    lm.model, lm.tokenizer = model, tok
    eos = set(lm._eos)
    prompts = [tok(p, return_tensors="pt") for p in ("Net sales increased", "Our segments", "We")]
    schema = {"type": "json_schema", "json_schema": {"name": "segment", "schema": SEGMENTS}}

    def loop(ids, fmt: dict) -> tuple[list[int], list[float]]:  # a token at a time, nothing batched or cached
        from tasks.batching import grammar

        matcher = llguidance.LLMatcher(lm.grammar_tokens, grammar(fmt))
        prompt, out, raw = ids["input_ids"][0].tolist(), [], []
        while len(out) < n and not (out and out[-1] in eos) and not matcher.is_stopped():
            with torch.no_grad():
                x = model(input_ids=torch.tensor([prompt + out])).logits[0, -1].float()
            allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8) > 0
            allowed[sorted(eos)] |= matcher.is_accepting()
            out.append(int(x.masked_fill(~allowed[: len(x)], float("-inf")).argmax()))
            raw.append(float(torch.log_softmax(x, dim=-1)[out[-1]]))
            if out[-1] not in eos:
                assert matcher.consume_token(out[-1])
        return out, raw

    settings = {"schema": generation_settings({"max_new_tokens": n, "response_format": json.dumps(schema)}),
                "object": generation_settings({"max_new_tokens": n, "response_format": {"type": "json_object"}}),
                "sampled": generation_settings({"max_new_tokens": n, "do_sample": True, "temperature": 0.8,
                                                "top_k": 0, "seed": 3, "response_format": schema}),
                "plain": generation_settings({"max_new_tokens": n})}  # fmt: skip
    asked, alone, by = _alone(lm, settings, prompts)
    for i, ids in enumerate(prompts):
        for name in ("schema", "object"):
            tokens, raw = loop(ids, settings[name]["response_format"])
            a = by[name, i]
            assert a.tokens == tokens, (name, i)
            assert [x.logprob for x in a.scored] == pytest.approx(raw, abs=1e-4), name
        said = [json.loads(by[name, i].choice["text"]) for name in ("schema", "sampled")]
        assert all(set(x) == {"segment", "year", "grew"} and x["segment"] in SEGMENTS["properties"]["segment"]["enum"]
                   and 2000 <= x["year"] <= 2030 and isinstance(x["grew"], bool) for x in said), said  # fmt: skip
        assert by["schema", i].choice["finish_reason"] == "stop" and by["sampled", i].choice["finish_reason"] == "stop"
        assert by["object", i].choice["text"].startswith("{")
        with contextlib.suppress(json.JSONDecodeError):  # cut at max_tokens, or whole
            assert isinstance(json.loads(by["object", i].choice["text"]), dict)
    assert [by["plain", i].choice["text"][:1] for i in range(3)] != ["{"] * 3  # unformatted, it says other things
    _each_as_alone(lm, asked, alone)


def test_openais_sdk_parses_structured_outputs_of_a_served_chat_version(tiny_run, tmp_path):
    """OpenAI's SDK asks for structured outputs with a Pydantic model (`chat.completions.parse`, its stream, and
    the Responses API's `responses.parse`): `edgar-tune serve` answers JSON of its schema, which the SDK parses into
    the model, and the version's own `predict` says the same with the same `response_format` (JSON text, through
    MLflow's schema). `/v1/completions` takes it too, and vLLM's `structured_outputs` (a choice of texts, a regular
    expression, a grammar in GBNF or Lark's syntax, JSON without whitespace), as vLLM does; a format or schema it
    cannot follow is refused with what to send. Chat's `tools` with a named `tool_choice`, or "required", answer
    with calls whose arguments are kept to the function's parameters (the SDK's `pydantic_function_tool`, parsed;
    "auto" is refused where the chat template writes no calls: the version was not tuned to choose). Before,
    `response_format` and `tools` were refused with a 400 (`response_format` dropped by `predict`), and
    `structured_outputs` as a field OpenAI does not have."""
    from typing import Annotated, Literal

    import mlflow
    import openai
    from openai.lib._parsing._completions import type_to_response_format_param
    from pydantic import BaseModel, ConfigDict, Field

    class Segment(BaseModel):
        model_config = ConfigDict(json_schema_extra={"x-guidance": {"whitespace_flexible": False}})
        segment: Literal["AWS", "North America", "International"]
        year: Annotated[int, Field(ge=2000, le=2030)]
        grew: bool

    _, s = tiny_run
    folder, _ = _chat_version(s, tmp_path / "chat")
    asked = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Which segment grew?"}]
    fmt = type_to_response_format_param(Segment)  # what the SDK sends for it
    chat = mlflow.pyfunc.load_model(str(folder))
    answered = chat.predict({"messages": asked}, {"max_new_tokens": 60, "response_format": json.dumps(fmt)})
    with edgar_tune_serve(str(folder), tmp_path) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        parsed = client.chat.completions.parse(model=folder.name, messages=asked, response_format=Segment,
                                               max_tokens=60)  # fmt: skip
        with client.chat.completions.stream(model=folder.name, messages=asked, response_format=Segment,
                                            max_tokens=60) as stream:  # fmt: skip
            streamed = stream.get_final_completion()
        response = client.responses.parse(model=folder.name, instructions="Answer in JSON.",
                                          input="Which segment grew?", text_format=Segment, max_output_tokens=60)
        completed = client.completions.create(model=folder.name, prompt="Net sales", max_tokens=60,
                                              extra_body={"response_format": fmt})  # fmt: skip
        flexible = {k: v for k, v in fmt["json_schema"]["schema"].items() if k != "x-guidance"}
        vllm = {kind: client.completions.create(model=folder.name, prompt="Net sales", max_tokens=60, extra_body={
            "structured_outputs": asked}).choices[0] for kind, asked in {  # vLLM's kinds  # fmt: skip
                "choice": {"choice": ["increased", "decreased", "was flat"]}, "regex": {"regex": r"FY20[0-9]{2}"},
                "gbnf": {"grammar": 'root ::= "Q" [1-4] " " ("up" | "down")'},
                "lark": {"grammar": 'start: "Item " /[0-9]{1,2}[A-C]?/'},
                "json": {"json": json.dumps(flexible), "disable_any_whitespace": True}}.items()}  # fmt: skip
        # a tool call, named or required: its arguments kept to the function's parameters (the SDK parses them)
        named = {"type": "function", "function": {"name": "Segment"}}
        called = client.chat.completions.parse(model=folder.name, messages=asked, max_tokens=60, tool_choice=named,
                                               tools=[openai.pydantic_function_tool(Segment)])  # fmt: skip
        with client.chat.completions.stream(model=folder.name, messages=asked, max_tokens=60, tool_choice=named,
                                            tools=[openai.pydantic_function_tool(Segment)]) as stream:  # fmt: skip
            called_streamed = stream.get_final_completion()
        chunks = list(client.chat.completions.create(model=folder.name, messages=asked, max_tokens=60, stream=True,
                                                     tool_choice=named, tools=[openai.pydantic_function_tool(Segment)]))
        other = {"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"item": {"enum": ["7", "7A", "8"]}}, "required": ["item"],
            "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}}}  # fmt: skip
        required = client.chat.completions.create(model=folder.name, messages=asked, max_tokens=80,
                                                  tools=[openai.pydantic_function_tool(Segment), other],
                                                  tool_choice="required", parallel_tool_calls=False)  # fmt: skip
        refused = {}
        for why, kw in {"auto": {"tools": [other]},
                        "unknown tool": {"tools": [other], "tool_choice": named},
                        "xml": {"response_format": {"type": "xml"}},
                        "schema": {"response_format": {"type": "json_schema", "json_schema": {
                            "name": "x", "schema": {"type": "objectx"}}}},
                        "both": {"response_format": fmt, "extra_body": {"structured_outputs": {"regex": "a"}}},
                        "two kinds": {"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}},
                        "grammar": {"extra_body": {"structured_outputs": {"grammar": "start: yes"}}}}.items():
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model=folder.name, messages=asked, max_tokens=4, **kw)
            refused[why] = err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as verbose:
            client.responses.create(model=folder.name, input="Hi", text={"verbosity": "low"})
    said = parsed.choices[0].message
    assert said.content == answered[0] and isinstance(said.parsed, Segment), said
    assert parsed.choices[0].finish_reason == "stop" and said.parsed == Segment.model_validate_json(answered[0])
    assert streamed.choices[0].message.parsed == said.parsed
    assert response.output_parsed == said.parsed and response.output_text == answered[0]
    assert response.text.format.type == "json_schema" and response.text.format.name == "Segment"
    assert Segment.model_validate_json(completed.choices[0].text) and completed.choices[0].finish_reason == "stop"
    assert refused["xml"].startswith('response_format must be {"type": "text"}, {"type": "json_object"} or '), refused
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].message.content is None and called.choices[0].finish_reason == "stop"
    assert call.function.name == "Segment" and isinstance(call.function.parsed_arguments, Segment), call
    assert called_streamed.choices[0].message.tool_calls[0].function.parsed_arguments == call.function.parsed_arguments
    assert called_streamed.choices[0].message.tool_calls[0].id.startswith("call_")
    pieces = [c.choices[0].delta.tool_calls[0].function.arguments for c in chunks if c.choices[0].delta.tool_calls]
    assert chunks[0].choices[0].delta.tool_calls[0].function.name == "Segment" and pieces[0] == ""  # named first
    assert len(pieces) > 3 and "".join(pieces) == call.function.arguments  # then its arguments as they come
    assert chunks[-1].choices[0].finish_reason == "stop"
    calls = required.choices[0].message.tool_calls
    assert required.choices[0].finish_reason == "tool_calls" and len(calls) == 1, required
    assert (calls[0].function.name, set(json.loads(calls[0].function.arguments))) in (
        ("Segment", {"segment", "year", "grew"}), ("lookup", {"item"})), calls  # fmt: skip
    assert refused["auto"].startswith('tool_choice left out ("auto"): the version\'s chat template does not write '
                                      "tool calls (it has no `tool_calls`)"), refused  # fmt: skip
    assert refused["unknown tool"].endswith("one of lookup), or send \"auto\", \"required\" or \"none\""), refused
    assert refused["schema"].startswith("response_format's schema is not one this server can follow: "), refused
    assert vllm["choice"].text in ("increased", "decreased", "was flat") and vllm["choice"].finish_reason == "stop"
    assert re.fullmatch(r"FY20[0-9]{2}", vllm["regex"].text) and vllm["regex"].finish_reason == "stop", vllm
    assert re.fullmatch(r"Q[1-4] (up|down)", vllm["gbnf"].text), vllm
    assert re.fullmatch(r"Item [0-9]{1,2}[A-C]?", vllm["lark"].text), vllm
    assert " " not in vllm["json"].text.replace("North America", "") and Segment.model_validate_json(vllm["json"].text)
    assert refused["both"] == "response_format and structured_outputs each say what the answer's form is: give one"
    assert refused["two kinds"].startswith('structured_outputs={"regex": "a", "choice": ["b"]}: give one of json, ')
    assert refused["grammar"].startswith("response_format's grammar is not one this server can follow: "), refused
    assert verbose.value.body["message"].startswith('text={"verbosity": "low"}: this server reads its `format` only')


def _chat_version(s: dict, into: Path, tokenizer=None) -> tuple[Path, Any]:
    """The tiny run's version (its folder, as MLflow downloads it into `into`) made a version tuned on
    conversations: its MLmodel says so, with a chat signature, and its tokenizer (`tokenizer`, else its own) has
    ChatML's template. The folder, and the tokenizer."""
    import mlflow
    import yaml
    from transformers import AutoTokenizer

    from tasks.registry import _signature, version_artifacts
    from tests.test_textdata import CHATML

    mlflow.set_tracking_uri(s["mlflow_tracking_uri"])
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{s['registered_model']}/{s['model_version']}",
                                                      dst_path=str(into)))  # fmt: skip
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["config"]["chat"] = True
    mlmodel["signature"] = _signature(chat=True).to_dict()
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    weights = version_artifacts(folder)[0]["weights"]
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(weights)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(weights)
    return folder, tokenizer


def _random_llama(vocab: int, **config):
    """A two-layer Llama of random weights (seed 0) over `vocab` tokens, `config` over LlamaConfig's."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                                        **config)).eval()  # fmt: skip


def _alone(lm, settings: dict[str, dict], prompts: list) -> tuple[Callable[[], list], list, dict]:
    """An answer to each prompt with each of `settings` (scored: `logprobs` 0): a function that makes them afresh,
    them generated one at a time, and those by (settings' name, prompt's place)."""
    from tasks.batching import Answer

    def asked() -> list[Answer]:
        return [Answer(ids, st, st["seed"] + i, None, logprobs=0) for st in settings.values()
                for i, ids in enumerate(prompts)]  # fmt: skip

    alone = asked()
    for a in alone:
        lm.generate_batch([a])
    return asked, alone, dict(zip([(k, i) for k in settings for i in range(len(prompts))], alone, strict=True))


def _each_as_alone(lm, asked: Callable[[], list], alone: list) -> None:
    """`asked()`'s answers generated all in one batch, then half of them joining a batch of the other half midway
    (paused after the first's 4th token), are each the answer it is `alone`."""
    together = asked()
    lm.generate_batch(together)
    assert [a.tokens for a in together] == [a.tokens for a in alone]
    joined = asked()
    half = len(joined) // 2
    batch = lm.advance(lm.join(None, joined[:half]), lambda going, first=joined[0]: len(first.tokens) >= 4)
    batch = lm.join(batch, joined[half:])
    while batch is not None:
        batch = lm.advance(batch)
    assert [a.tokens for a in joined] == [a.tokens for a in alone]


def test_requests_that_come_together_are_generated_together_each_answered_as_alone(tiny_run, tmp_path):
    """Requests sent at once to `edgar-tune serve` are generated together, those that come while a batch runs
    joining it (its log says so), and each gets the answer it gets sent alone; with `--max-batch 1`, one at a
    time. A request whose client leaves while it waits in line, streamed or not (an SDK's timeout), is dropped
    unread: before, it was read and generated for nobody when its turn came (its log line said 35 tokens generated
    for the stream, not 0; the plain request was generated whole)."""
    import threading

    import httpx

    _, s = tiny_run
    uri = f"models:/{s['registered_model']}/{s['model_version']}"
    prompts = ["Net sales increased", "We", "Operating income in the fourth quarter was", "Our segments",
               "Cash provided by operating activities"]  # fmt: skip
    for batch in ("4", "1"):
        with edgar_tune_serve(uri, tmp_path, "--tracking-uri", s["mlflow_tracking_uri"], "--max-batch", batch) as url:
            alone = [_post(f"{url}/completions", {"prompt": p, "max_tokens": 200}) for p in prompts]
            together, start = {}, threading.Barrier(len(prompts))

            def send(i: int, url=url, start=start, together=together) -> None:
                start.wait()
                together[i] = _post(f"{url}/completions", {"prompt": prompts[i], "max_tokens": 200})

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if batch == "1":  # one at a time: a stream sent behind five answers, its client gone before its turn
                first = threading.Thread(target=_post, args=(f"{url}/completions", {"prompt": prompts,
                                                                                    "max_tokens": 1000}))  # fmt: skip
                first.start()
                time.sleep(1)
                with httpx.stream("POST", f"{url}/completions", json={"prompt": "Our segments", "max_tokens": 50,
                                                                      "stream": True}, timeout=30) as left:  # fmt: skip
                    assert left.status_code == 200
                with pytest.raises(httpx.ReadTimeout):  # a client that gives up waiting, as an SDK's timeout does
                    httpx.post(f"{url}/completions", json={"prompt": "We", "max_tokens": 50}, timeout=0.5)
                first.join()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not re.search(_PLAIN_LEFT, _newest_log(tmp_path)):
                    time.sleep(0.2)
        log = _newest_log(tmp_path)
        assert [together[i]["choices"] for i in range(len(prompts))] == [a["choices"] for a in alone]
        batched = re.findall(r"(\d+) answers together( \(\d+ joining\))?: \d+ tokens in", log)
        if batch == "4":
            assert batched and max(int(n) for n, _ in batched) <= 4, log[-3000:]
            assert any(joined for _, joined in batched), log[-3000:]
        else:
            assert not batched, log[-3000:]
            # one at a time: the last of the five sent together waited in line for the four before it, and its
            # line says so apart from its time generating (before, its tokens/s was of both)
            timed = [(float(total), float(wait)) for total, wait in re.findall(
                r": \d+ prompt and 200 generated tokens in ([\d.]+) s \(([\d.]+) s in line, then", log)]  # fmt: skip
            assert len(timed) >= 2 * len(prompts) and all(wait <= total for total, wait in timed), log[-3000:]
            together_timed = timed[len(prompts) : 2 * len(prompts)]  # the first five: each sent alone, in turn
            assert max(w for _, w in together_timed) >= min(t - w for t, w in together_timed), together_timed
            # the stream: dropped from the line (its log line says 0 tokens), or, closed before its response began,
            # never sent to generation (no line); the plain request: dropped from the line
            gone = [line for line in log.splitlines() if "client left" in line or ", streamed" in line]
            assert gone and all(re.search(r": \d+ prompt and 0 generated tokens in", x) for x in gone), log[-3000:]
            # both may be dropped in one round, their lines in either order
            assert re.search(_PLAIN_LEFT, log), log[-3000:]


# the log line of a request not streamed whose client left before its answer ended
_PLAIN_LEFT = r"(?m)ending at stop \(the client left: stopped early\)$"


def _newest_log(folder: Path) -> str:
    """The log of the server `edgar_tune_serve` started last in `folder`."""
    return max(folder.glob("serve-*.log"), key=lambda p: p.stat().st_mtime).read_text()


def test_an_answer_read_as_it_grows_is_decoded_a_token_at_a_time_into_the_text_decoding_it_whole_gives(
        tiny_run, tmp_path, caplog):  # fmt: skip
    """A streamed answer, or one with `stop` texts, has its text read at every step; decoding it whole each time
    cost a step 0.9 ms at an answer's 4,096th token (SmolLM2's tokenizer), 29 ms for 32 such rows. It is decoded a
    token at a time now (tokenizers' DecodeStream), which must give the text decoding it whole gives: after every
    token of the held-out MD&A and of characters that take several bytes and tokens, what is read is what decoding
    whole gives but for a last character whose bytes are not all in, with tiny-llama's byte-level BPE (SmolLM2's
    and GPT-2's kind) and a SentencePiece model trained as Llama-2's (byte fallback, its leading space); at the
    end, the same text. A tokenizer whose decode cleans up spaces after the backend's (a WordPiece one) is
    decoded whole; and where the two ever differ, the answer ends with the whole decoding, says so, and the
    tokenizer's later answers are decoded whole."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tasks.batching import Answer, Generating, streams

    runs, _ = tiny_run
    run = runs / "latest"
    text = "\n".join(json.loads(line)["text"] for line in (run / "02_parse" / "val.jsonl").open())[:20000]
    text += "\nnaïve café — 10–K ‘quoted’ 日本語 😀 ½ \u00a0 two  spaces\n\n\ttab"
    _sentencepiece_model(run, tmp_path / "sp")
    for tok in (AutoTokenizer.from_pretrained(run / "03_tokenize" / "tiny-llama"),
                AutoTokenizer.from_pretrained(tmp_path / "sp")):  # fmt: skip
        assert streams(tok), type(tok)
        ids = [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        assert len(ids) > 4000
        lm, a = Generating(None, tok), Answer(ids=None, settings={}, seed=0, closing=None)
        for i, token in enumerate(ids):
            a.tokens.append(token)
            said = lm.said(a)
            if i % 50 == 0 or i == len(ids) - 1:
                whole = tok.decode(a.tokens, skip_special_tokens=True)
                pending = whole[len(said) :]  # a last character's bytes not all in (with a space its token holds)
                assert whole.startswith(said) and set(pending) <= {" ", "\ufffd"}, (i, said[-20:], whole[-20:])
        assert said == lm.ended(a) == tok.decode(ids, skip_special_tokens=True)
        assert "日本語 😀 ½" in said

    vocab = {"[UNK]": 0, "[PAD]": 1, "a": 2, ",": 3, "b": 4}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cleaned = PreTrainedTokenizerFast(tokenizer_object=wordpiece, clean_up_tokenization_spaces=True)
    assert not streams(cleaned)  # "a , b" decoded whole is "a, b"; token at a time it would keep the space
    lm, a = Generating(None, cleaned), Answer(ids=None, settings={}, seed=0, closing=None)
    a.tokens += [2, 3, 4]
    assert lm.said(a) == "a, b" and a.stream is False

    tok = AutoTokenizer.from_pretrained(run / "03_tokenize" / "tiny-llama")
    lm, a = Generating(None, tok), Answer(ids=None, settings={}, seed=0, closing=None)
    a.tokens += tok("Net sales increased", add_special_tokens=False)["input_ids"]
    lm.said(a)
    a.text = "Net sales decreased"  # as a decoder that gives otherwise token by token would have it
    with caplog.at_level("WARNING", logger="tasks.batching"):
        assert lm.ended(a) == "Net sales increased"
    assert "decoding a token at a time gave 'Net sales decreased' where decoding the answer whole gives" in caplog.text
    assert not streams(tok)


def test_logprobs_are_the_models_own_and_echo_scores_a_prompt_as_lm_eval_reads_it(tiny_run, tmp_path):
    """`logprobs` on `edgar-tune serve` are the model's own: each generated token's is its log-softmax where it
    stands, read again by one forward pass over prompt and answer, greedy or sampled (the raw distribution, before
    temperature), batched or alone, streamed or not; `echo` with `max_tokens` 0 scores the prompt, its sum the
    negative of the cross-entropy a plain forward pass gives; prompts of token ids, as lm-evaluation-harness sends
    them, with `/tokenize`, `/detokenize` and `/tokenizer_info` as vLLM answers them."""
    import openai
    import torch

    from edgar_tune.serve import Refused, scoring
    from tasks.registry import loaded_version

    _, s = tiny_run
    folder = _version_folder(s, tmp_path / "v")
    lm = loaded_version(folder, device="cpu")
    tok = lm.tokenizer
    text = "Net sales increased 9% to $574.8 billion in 2023, compared with $514.0 billion in 2022."
    prompts = ["Net sales increased", "Operating income in the fourth quarter was"]

    def generated(i: int, **sampling) -> tuple[list[int], torch.Tensor]:  # transformers' own, alone
        ids = tok(prompts[i], return_tensors="pt")
        torch.manual_seed(5 + i)
        out = lm.model.generate(**ids, max_new_tokens=8, pad_token_id=tok.pad_token_id, output_logits=True,
                                return_dict_in_generate=True, **sampling)  # fmt: skip
        new = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
        return new, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)  # the raw logits' (no temperature)

    with edgar_tune_serve(str(folder), tmp_path, "--max-batch", "4") as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        scored = client.completions.create(model=folder.name, prompt=text, max_tokens=0, echo=True, logprobs=2)
        greedy = client.completions.create(model=folder.name, prompt=prompts, max_tokens=8, logprobs=3)
        sampled = client.completions.create(model=folder.name, prompt=prompts, max_tokens=8, logprobs=1,
                                            temperature=0.7, seed=5)  # fmt: skip
        streamed = list(client.completions.create(model=folder.name, prompt=prompts[1], max_tokens=8, logprobs=3,
                                                  stream=True))  # fmt: skip
        ids = [tok(p)["input_ids"] for p in (text, prompts[0])]
        harness = client.completions.create(model=folder.name, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                            temperature=0, seed=1234)  # lm-evaluation-harness's loglikelihood
        base = url.removesuffix("/v1")
        tokenized = _post(f"{base}/tokenize", {"prompt": text, "add_special_tokens": False})
        detokenized = _post(f"{base}/detokenize", {"tokens": tokenized["tokens"]})
        info = json.loads(urllib.request.urlopen(f"{base}/tokenizer_info", timeout=30).read())
        refused = {why: _refused(f"{url}/completions", {"prompt": p, **body}) for why, (p, body) in {
            "count": (text, {"logprobs": 21}), "scored, not generated": (text, {"max_tokens": 0}),
            "echo streamed": (text, {"echo": True, "stream": True}), "no such id": ([[5, 10**9]], {})}.items()}
    # echo, nothing generated: the prompt's tokens, the first unscored, summing to a forward pass's
    lp = scored.choices[0].logprobs
    ids_text = tok(text)["input_ids"]
    assert scored.choices[0].text == text and scored.usage.completion_tokens == 0
    assert lp.tokens == tok.batch_decode([[i] for i in ids_text]) and lp.token_logprobs[0] is None
    nll = torch.nn.functional.cross_entropy(lm.model(input_ids=torch.tensor([ids_text])).logits[0, :-1].float(),
                                            torch.tensor(ids_text[1:]), reduction="sum").item()  # fmt: skip
    assert sum(lp.token_logprobs[1:]) == pytest.approx(-nll, rel=1e-5)
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(lp.tokens))]
    assert lp.top_logprobs[0] is None and all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    # generated, greedy and sampled: each token's log probability where it stands, as the model gives it
    for answer, sampling in ((greedy, {"do_sample": False}), (sampled, {"do_sample": True, "temperature": 0.7,
                                                                       "top_k": 0})):  # fmt: skip
        for i, choice in enumerate(answer.choices):
            new, logprobs = generated(i, **sampling)
            assert choice.logprobs.tokens == tok.batch_decode([[t] for t in new])
            assert choice.logprobs.token_logprobs == pytest.approx(
                [float(logprobs[k, t]) for k, t in enumerate(new)], abs=1e-4)  # fmt: skip
            if answer is greedy:  # the likeliest each time, the likeliest first
                pairs = zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs, strict=True)
                assert all(max(top.values()) == chosen for top, chosen in pairs)
                assert all(list(top.values()) == sorted(top.values(), reverse=True)
                           for top in choice.logprobs.top_logprobs)  # fmt: skip
    assert any(a.text != b.text for a, b in zip(greedy.choices, sampled.choices, strict=True))  # sampled, scored too
    # streamed: the pieces' scores are the answer's
    chunks = [c.choices[0] for c in streamed if c.choices[0].logprobs]
    assert sum((c.logprobs.token_logprobs for c in chunks), []) == pytest.approx(
        greedy.choices[1].logprobs.token_logprobs, abs=1e-5)  # fmt: skip
    assert sum((c.logprobs.text_offset for c in chunks), []) == greedy.choices[1].logprobs.text_offset
    # lm-evaluation-harness's request: token ids, echo, one token generated; its slice [ctxlen:-1] is the prompt's
    assert [len(c.logprobs.token_logprobs) for c in harness.choices] == [len(i) + 1 for i in ids]
    prompt_scores = harness.choices[0].logprobs.token_logprobs[:-1]
    assert prompt_scores[0] is None and prompt_scores[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert harness.choices[1].text.startswith(prompts[0]) and harness.choices[1].text[len(prompts[0]) :] == (
        greedy.choices[0].text[: len(harness.choices[1].text) - len(prompts[0])])  # fmt: skip
    assert tokenized == {"count": len(tokenized["tokens"]), "max_model_len": lm.model.config.max_position_embeddings,
                         "tokens": tok(text, add_special_tokens=False)["input_ids"], "token_strs": None}  # fmt: skip
    assert detokenized == {"prompt": text} and info["eos_token"] == tok.eos_token
    assert info["model_max_length"] == lm.model.config.max_position_embeddings
    assert refused["count"] == (400, {"error": {"message": "logprobs must be a whole number from 0 to 20, got 21",
                                                "type": "invalid_request_error", "param": "logprobs", "code": None}})
    assert "max_tokens=0 generates nothing: it is taken with echo=true" in refused["scored, not generated"][1][
        "error"]["message"]  # fmt: skip
    assert refused["echo streamed"][1]["error"]["message"].startswith("echo is not streamed")
    assert "has token id 1000000000, not one of the model's (0 to" in refused["no such id"][1]["error"]["message"]
    # chat's fields: logprobs true or false, top_logprobs only beside it
    assert scoring({"logprobs": True, "top_logprobs": 3}, chat=True) == (3, False)
    assert scoring({"logprobs": True}, chat=True) == (0, False) and scoring({}, chat=True) == (None, False)
    assert scoring({"logprobs": False, "top_logprobs": 0}, chat=True) == (None, False)  # nothing asked, as SDKs send
    with pytest.raises(Refused, match="top_logprobs is the likeliest tokens beside each token's logprob: set"):
        scoring({"top_logprobs": 2}, chat=True)
    with pytest.raises(Refused, match="logprobs must be true or false, got 2"):
        scoring({"logprobs": 2}, chat=True)


def test_a_prompt_that_begins_as_one_read_lately_is_read_from_where_they_part(tiny_run, tmp_path):
    """With `Prefixes` (the server's `--prefix-cache-tokens`), a prompt that begins as one read lately takes what
    was read of the tokens they share and reads the rest: lm-evaluation-harness's choices after one question read a
    token or two each, not the question again, and answer and score as read whole (up to float rounding). Scores
    are taken only from a prompt scored with as many likeliest tokens; the least lately used is given up first."""
    import torch

    from tasks.batching import Answer, Prefixes, Scored
    from tasks.registry import loaded_version

    _, s = tiny_run
    lm = loaded_version(_version_folder(s, tmp_path / "v"), device="cpu")
    reads: list[int] = []
    lm.model.model.register_forward_pre_hook(lambda _, __, kw: reads.append(kw["input_ids"].shape[1]),
                                             with_kwargs=True)  # fmt: skip
    question = lm.tokenizer("Net sales increased 9% to $574.8 billion in 2023. The passage is from the section:")[
        "input_ids"]  # fmt: skip
    choices = [lm.tokenizer(c, add_special_tokens=False)["input_ids"] for c in (" Risk Factors", " Legal Proceedings",
                                                                                 " Properties of the company")]
    greedy = {"max_new_tokens": 3, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0,
              "stop": []}  # fmt: skip

    def asked(prefixes: Prefixes | None, top: int | None = 2, ids: list[list[int]] | None = None) -> list[Answer]:
        lm.prefixes, said = prefixes, []
        for prompt in ids or [question + c for c in choices]:  # one request at a time, as lm-eval's come
            said.append(Answer({"input_ids": torch.tensor([prompt])}, greedy, 0, None, logprobs=top, echo=True))
            lm.generate_batch(said[-1:])
        return said

    reads.clear()
    whole = asked(None)
    assert reads[::4] == [len(question) + len(c) - 1 for c in choices]  # all but its last token, then 3 steps
    reads.clear()
    kept = Prefixes()
    shared = asked(kept)
    assert reads[0] == len(question) + len(choices[0]) - 1 and reads[4::4] == [len(c) for c in choices[1:]]
    for a, b in zip(whole, shared, strict=True):
        assert a.tokens == b.tokens and [x.token for x in a.prompt_scored] == [x.token for x in b.prompt_scored]
        assert [x.logprob for x in a.prompt_scored[1:]] == pytest.approx([x.logprob for x in b.prompt_scored[1:]],
                                                                         abs=1e-4)  # fmt: skip
        assert [[t for t, _ in x.top] for x in a.prompt_scored] == [[t for t, _ in x.top] for x in b.prompt_scored]
        assert [x.logprob for x in a.scored] == pytest.approx([x.logprob for x in b.scored], abs=1e-4)
    # a prompt scored, nothing generated (`max_tokens` 0), read before: one token read again, scored as read whole
    reads.clear()
    lm.prefixes, alone = kept, Answer({"input_ids": torch.tensor([question + choices[2]])}, greedy | {
        "max_new_tokens": 0}, 0, None, logprobs=2, echo=True)  # fmt: skip
    lm.generate_batch([alone])
    assert reads == [1] and alone.tokens == [] and alone.choice["completion_tokens"] == 0
    assert [x.logprob for x in alone.prompt_scored[1:]] == pytest.approx(
        [x.logprob for x in whole[2].prompt_scored[1:]], abs=1e-4)  # fmt: skip
    one = Answer({"input_ids": torch.tensor([question[:1]])}, greedy | {"max_new_tokens": 0}, 0, None, logprobs=2,
                 echo=True)  # a prompt of one token: nothing to score it by
    lm.generate_batch([one])
    assert one.prompt_scored == [Scored(question[0], None)] and one.choice["completion_tokens"] == 0
    # scores asked of more likeliest tokens than were kept: the prompt is read whole
    reads.clear()
    more = asked(kept, top=5, ids=[question + choices[1]])
    assert reads[0] == len(question) + len(choices[1]) - 1 and len(more[0].prompt_scored[-1].top) == 5
    # kept up to its tokens, the least lately used given up: another prompt read, the question is read whole again
    small = Prefixes(tokens=len(question) + 4)
    asked(small, ids=[question + choices[0]])
    asked(small, ids=[lm.tokenizer("Operating income was")["input_ids"] * 3])
    reads.clear()
    asked(small, ids=[question + choices[2]])
    assert reads[0] == len(question) + len(choices[2]) - 1


def test_a_stopped_server_gives_the_requests_it_answers_its_grace_then_cuts_them(tiny_run, tmp_path):
    """SIGTERM (or Ctrl-C) stops `edgar-tune serve` taking requests; those being answered get `--shutdown-grace`
    seconds, then their generation ends at the next token, each is answered 503 (`server_stopping`, which OpenAI's
    clients send again), a stream with that error as its last event, and the process exits with the signal's code.
    Before, it waited for every answer being generated to end (98 s for a 1,500-token SmolLM2 answer), and for ever
    for one that never did; then, cut at the grace's end, a request had its connection closed unanswered."""
    import threading

    import httpx

    _, s = tiny_run
    port = free_port()
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}/v1/completions"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "edgar-tune"), "serve", "--model", f"models:/{s['registered_model']}/"
                                 f"{s['model_version']}", "--tracking-uri", s["mlflow_tracking_uri"], "--port",
                                 str(port), "--shutdown-grace", "1"], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, EDGAR_TUNE_CACHE=str(tmp_path / "c")))
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=300)
            said = {}

            def ask() -> None:  # 8 answers, a full batch (--max-batch 8)
                said["generated"] = _refused(url, {"prompt": "Net sales", "max_tokens": 2000, "temperature": 1,
                                                   "n": 8, "seed": 1})  # fmt: skip

            def stream() -> None:  # behind them, in line
                with httpx.stream("POST", url, json={"prompt": "Our segments", "max_tokens": 50, "stream": True},
                                  timeout=60) as r:  # fmt: skip
                    said["streamed"] = (r.status_code, [line for line in r.iter_lines() if line])

            asking = [threading.Thread(target=ask, daemon=True), threading.Thread(target=stream, daemon=True)]
            asking[0].start()
            time.sleep(1)
            asking[1].start()
            time.sleep(1)
            start = time.monotonic()
            proc.terminate()
            proc.wait(timeout=60)
            stopped = time.monotonic() - start
            for t in asking:
                t.join(10)
        finally:
            proc.kill()
    text = log.read_text()
    assert proc.returncode in (-15, 143) and stopped < 10, (proc.returncode, stopped, text[-3000:])
    status, error = said["generated"]  # 8 x 2,000 tokens take this model about 30 s
    assert status == 503 and error["error"]["code"] == "server_stopping", (said, text[-3000:])
    cut = re.fullmatch(r"the server is stopping: this request's answers were cut at the end of its --shutdown-grace "
                       r"\(8: (?:(\d) ended, )?(\d) being generated, (\d) waiting in line\); send it again",
                       error["error"]["message"])  # fmt: skip
    assert cut and int(cut[1] or 0) + int(cut[2]) + int(cut[3]) == 8 and int(cut[3]) > 0, error  # not 8 of 2,000
    # tokens fit --max-batch-tokens; an answer may end by itself first
    status, events = said["streamed"]  # behind them
    last = json.loads(events[-1].removeprefix("data: "))["error"]
    assert status == 200 and last["code"] == "server_stopping" and "(1: 1 waiting in line)" in last["message"], events
    assert "timeout graceful shutdown exceeded" not in text and "terminate called" not in text, text[-3000:]


@pytest.mark.gpu
def test_a_version_is_served_from_the_gpu_in_bfloat16_and_answers_as_on_the_cpu(tiny_run, tmp_path):
    """On a GPU machine a loaded version goes to the GPU in bfloat16 by itself, and greedy answers begin as the
    CPU's in float32 do (bfloat16 rounds the logits: the first tokens, not every token, are compared)."""
    import torch

    from tasks.registry import loaded_version

    _, s = tiny_run
    folder = _version_folder(s, tmp_path / "v")
    settings = {"max_new_tokens": 8, "do_sample": False, "seed": 0, "stop": []}
    gpu, cpu = loaded_version(folder), loaded_version(folder, device="cpu")
    assert (gpu.model.device.type, gpu.model.dtype) == ("cuda", torch.bfloat16)
    on_gpu, on_cpu = (lm.complete([("Net sales increased", False)], settings, closing=None) for lm in (gpu, cpu))
    assert on_gpu[0]["choices"][0]["text"][:8] == on_cpu[0]["choices"][0]["text"][:8]


def test_openais_sampling_fields_mean_what_they_mean_to_openai():
    """temperature 0 is greedy whatever top_p says; left out, greedy; top_p alone samples at 1.0 over its nucleus;
    max_tokens and max_completion_tokens are one setting."""
    from edgar_tune.serve import Refused, request_settings

    greedy, n = request_settings({"temperature": 0, "top_p": 0.5}, 256)
    assert (greedy["do_sample"], greedy["max_new_tokens"], n) == (False, 256, 1)
    assert request_settings({}, 256)[0]["do_sample"] is False
    nucleus, _ = request_settings({"top_p": 0.5, "max_completion_tokens": 9, "stop": "\n"}, 256)
    assert (nucleus["do_sample"], nucleus["temperature"], nucleus["top_p"], nucleus["top_k"]) == (True, 1.0, 0.5, 0)
    assert nucleus["max_new_tokens"] == 9 and nucleus["stop"] == ["\n"]
    with pytest.raises(Refused, match="max_tokens=5 and max_completion_tokens=9 are two names"):
        request_settings({"max_tokens": 5, "max_completion_tokens": 9}, 256)
    with pytest.raises(Refused, match="n must be a whole number of at least 1, got True"):
        request_settings({"n": True, "temperature": 1}, 256)
    with pytest.raises(Refused, match="temperature must be a number above 0, got -1"):
        request_settings({"temperature": -1}, 256)
    narrowed, _ = request_settings({"min_p": 0.1}, 256)  # vLLM's min_p alone samples at 1.0 too, as top_p does
    assert (narrowed["do_sample"], narrowed["temperature"], narrowed["min_p"]) == (True, 1.0, 0.1)
    assert request_settings({"min_p": 0.1, "temperature": 0}, 256)[0]["do_sample"] is False


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _refused(url: str, body: dict) -> tuple[int, dict]:
    """The status and JSON of a request the server refuses."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        _post(url, body)
    return refused.value.code, json.loads(refused.value.read())


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None, **env: str) -> Iterator[str]:
    """A real `mlflow server` on loopback with its store and artifacts in `folder`, and `env` set: yields its URI."""
    port = port or free_port()
    server_env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **env)
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
           "--artifacts-destination", str(folder / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=folder, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", server)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_training_curves_wait_out_a_tracking_server_restart(tmp_path, caplog):
    """A team tracking server restarted mid-training: the points logged while it is down are held and sent once it
    is back, and the caller (the training's progress lines) never waits on it."""
    import logging
    import time

    import mlflow

    from tasks.registry import LiveMetrics

    caplog.set_level(logging.INFO, "tasks.registry")
    port = free_port()

    def steps(client, run_id: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))

    def until(what, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, caplog.text[-2000:]
            time.sleep(0.2)

    with mlflow_server(tmp_path, port) as uri:
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("curves")).info.run_id
        send = LiveMetrics(client, run_id, uri, retry_s=1.0)
        send([("train_loss", 3.0, 1, time.time())])
        until(lambda: steps(client, run_id) == [1])
    began = time.monotonic()
    send([("train_loss", 2.5, 2, time.time()), ("train_loss", 2.0, 3, time.time())])
    assert time.monotonic() - began < 0.5
    until(lambda: "took no points of training's curves" in caplog.text)
    with mlflow_server(tmp_path, port):  # the same store, back on the same address
        until(lambda: "takes training's curves again" in caplog.text)
        send([("train_loss", 1.5, 4, time.time())])
        assert send.close()
        assert steps(client, run_id) == [1, 2, 3, 4]


def test_pipeline_registers_on_a_remote_tracking_server(tmp_path, prefect_server, monkeypatch):
    import mlflow
    from transformers import AutoModelForCausalLM

    from edgar_tune.config import ConfigError
    from tasks.export import export_version

    with mlflow_server(tmp_path) as uri:
        # A full fine-tune this time: the version must hold the trained weights themselves. memory_fit chooses the
        # micro-batch and checkpointing (in this host's RAM: all 8 blocks at once, nothing recomputed).
        s = run_cli(tmp_path, "--set", "max_steps=10", "--set", "mode=full", "--set", "generate.enabled=false",
                    "--set", "memory_fit=true", env={"MLFLOW_TRACKING_URI": uri} | prefect_server)  # fmt: skip
        assert s["mlflow_tracking_uri"] == uri and s["mode"] == "full"
        assert (s["micro_batch"], s["gradient_accumulation_steps"], s["gradient_checkpointing"]) == (8, 1, False)
        client = mlflow.MlflowClient(uri)
        run = client.get_run(s["mlflow_run_id"])  # the train stage opened it on the server, for its curves
        assert run.data.tags["edgar_tune.training"] == "true" and run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "tokens_per_s")) == 10
        params = run.data.params
        assert params["train.memory_fit"] == "True" and params["memory_fit.recomputed_layers"] == "0"
        assert params["memory_fit.per_device_train_batch_size"] == "8"
        version = client.get_model_version_by_alias(s["registered_model"], s["model_alias"])
        assert str(version.version) == s["model_version"] and version.tags["base_model"] == "tiny-llama"
        names = {a.path for a in client.list_artifacts(s["mlflow_run_id"], "plots")}
        assert "plots/loss_curve.png" in names
        # The run's card in the Prefect UI links to the run and the version in this server's UI (routes its page has)
        query = {"flow_run_id": {"any_": [s["prefect_flow_run_id"]]}, "key": {"any_": ["edgar-tune-10k-summary"]}}
        api = prefect_server["PREFECT_API_URL"]
        card = httpx.post(f"{api}/artifacts/filter", json={"artifacts": query}, timeout=60).json()[0]["data"]
        assert f"[run {s['mlflow_run_id'][:8]}]({uri}/#/runs/{s['mlflow_run_id']})" in card, card
        assert f"({uri}/#/models/edgar-tune-10k/versions/{s['model_version']})" in card, card
        script = re.search(r'src="([^"]*/main\.[0-9a-f]+\.js)"', httpx.get(uri).text).group(1)
        routes = httpx.get(f"{uri}/{script}").text
        assert '"/runs/:runUuid"' in routes and '"/models/:modelName/versions/:version"' in routes
        assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to a local store
        stored = tmp_path / "server-artifacts"
        assert list(stored.rglob("MLmodel")), "the model went to the server's artifact store"
        assert list(stored.rglob("model.safetensors")) and not list(stored.rglob("adapter_model.safetensors"))
        # exported from the server: the trained weights as they are, scoring what they were registered with
        monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
        with pytest.raises(ConfigError, match="is a full fine-tune: it has no adapter"):
            export_version(client, s["registered_model"], s["model_version"], tmp_path / "lora", adapter=True)
        done = export_version(client, s["registered_model"], s["model_version"], tmp_path / "export")
        assert (done["trained"], done["dtype"], done["perplexity_after"]) == ("full", "float32", s["ppl_after"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert _perplexity(model, tmp_path / "latest") == pytest.approx(s["ppl_after"], rel=1e-6)


@pytest.mark.slow
def test_a_registration_waits_for_the_one_before_it_on_a_tracking_server(tiny_run, tmp_path, prefect_server):
    """Two registrations into one tracking server at once would both read the same champion (and rescore it, for
    minutes on a large model) before either moves the alias: the later could take `champion` from a better version.
    From Prefect runs they take turns on a global concurrency limit named after the URI. Here another flow run holds
    it: the rerun of `register` reaches it and waits, creating nothing in MLflow, and registers once it is free."""
    import mlflow

    runs, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(runs / "latest", run)
    with mlflow_server(tmp_path) as uri:
        env = dict(os.environ, **prefect_server, MLFLOW_TRACKING_URI=uri)
        with held_elsewhere("registry", uri, env=env):
            proc = subprocess.Popen([sys.executable, "-m", "edgar_tune.cli", "rerun", "register", "--run", str(run)],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "taking the Prefect global concurrency limit edgar-tune-registry-" in line:
                    break
            else:
                raise AssertionError("".join(lines)[-3000:])
            time.sleep(10)  # a registration without the wait is done in 3-5 s here
            assert proc.poll() is None and mlflow.MlflowClient(uri).search_registered_models() == []
            released = time.time()
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-3000:]
        client = mlflow.MlflowClient(uri)
        version = client.get_model_version("edgar-tune-10k", "1")
        assert version.creation_timestamp / 1000 >= released
        # The training's curves went to another store: this server gets them all, at the times training made them.
        steps = json.loads((run / "04_train" / "stats.json").read_text())["steps"]
        for key in ("train_loss", "learning_rate", "tokens_per_s"):
            history = client.get_metric_history(version.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, steps + 1)), key
            assert max(m.timestamp for m in history) / 1000 < released, key
        assert len(client.get_metric_history(version.run_id, "val_loss")) == 3
        # A promotion by hand takes the same turn: it moves no alias while a registration may be deciding one.
        with held_elsewhere("registry", uri, env=env):
            proc = subprocess.Popen([sys.executable, "-m", "edgar_tune.cli", "promote", "1", "--alias", "production"],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            time.sleep(15)  # a promotion without the wait is done in 3-5 s here
            assert proc.poll() is None and "production" not in mlflow.MlflowClient(uri).get_registered_model(
                "edgar-tune-10k").aliases  # fmt: skip
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0 and "edgar-tune-10k v1 is now @production" in out, out[-3000:]
        assert "taking the Prefect global concurrency limit edgar-tune-registry-" in out
        # Its files, which this server keeps and serves (proxied artifacts), come down whole into the cache.
        import yaml

        from tasks.registry import registered_files

        with registered_files(client, "edgar-tune-10k", "1") as local:
            flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
            assert all((local / a["path"]).exists() for a in flavor["artifacts"].values()), flavor


def test_an_alias_moved_in_the_mlflow_ui_reaches_prefect_through_the_relay(prefect_server, tmp_path):
    """A champion moved in the MLflow UI (a rollback there, the registry's own page for it) moved without
    edgar-tune, so the export-champion deployment never ran. `edgar-tune relay` installs MLflow's alias webhook on
    a real tracking server and turns each signed delivery into `edgar-tune.model.promoted` on a real Prefect server,
    with the version before and the perplexity note as `edgar-tune promote` sends them; the moves edgar-tune made
    itself (a registration's) are left to its own events, a version edgar-tune did not register is not relayed,
    and a request MLflow did not sign is refused. A relay MLflow cannot reach, or without a secret, does not start.
    Started again, the relay relays the moves made while none ran (MLflow gave up on their deliveries), a person's,
    and leaves edgar-tune's own to its event."""
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from edgar_tune.relay import SECRET_ENV, WEBHOOK, signed
    from edgar_tune.relay import HELD, RECONCILE_ENV
    from tasks.registry import MOVED, PROMOTED, move_alias, promote
    from tests.conftest import export_trigger_acts_on_a_new_champion_only, promoted_events

    secret = "relay-secret-of-the-test-0123456789"
    env = dict(os.environ, **prefect_server, EDGAR_TUNE_BARS="0")
    allow = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
             "MLFLOW_WEBHOOK_CACHE_TTL": "1"}  # a webhook disabled (below) is so within a second, not a minute
    with mlflow_server(tmp_path, **allow) as uri:

        def relay(*args: str, **more: str) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "edgar_tune.cli", "relay", "--tracking-uri", uri, *args],
                                    cwd=REPO, env=env | more, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)  # fmt: skip

        unsigned = relay("--listen", f"127.0.0.1:{free_port()}")
        assert unsigned.wait(timeout=120) == 2 and f"set {SECRET_ENV} to a secret" in unsigned.stdout.read()
        portless = relay("--listen", "relay-host", **{SECRET_ENV: secret})
        assert portless.wait(timeout=120) == 2 and "--listen relay-host: give HOST:PORT" in portless.stdout.read()
        # Servers that are not there: said at once (MLflow's client retried for four minutes); a port taken, in a line
        dead = f"http://127.0.0.1:{free_port()}"
        taken = f"127.0.0.1:{uri.rsplit(':', 1)[1]}"  # the MLflow server's
        for args, more, says in (
                (["--tracking-uri", dead], {}, f"the MLflow tracking server at {dead} does not answer (Connection"),
                ([], {"PREFECT_API_URL": f"{dead}/api"}, f"the Prefect server at {dead}/api does not answer"),
                (["--url", "ftp://relay"], {}, "--url ftp://relay: MLflow posts its deliveries over HTTP"),
                (["--listen", taken], {}, f"cannot listen on {taken} (Address already in use); give another --listen"),
        ):  # fmt: skip
            refused = relay("--listen", f"127.0.0.1:{free_port()}", *args, **{SECRET_ENV: secret}, **more)
            assert refused.wait(timeout=60) == 2, refused.stdout.read()
            said = refused.stdout.read()
            assert says in said and "Traceback" not in said, said
        astray = relay("--listen", f"127.0.0.1:{free_port()}", "--url", f"http://127.0.0.1:{free_port()}/",
                       **{SECRET_ENV: secret})  # fmt: skip
        assert astray.wait(timeout=120) == 2, astray.stdout.read()
        said = astray.stdout.read()
        assert "could not deliver to http://127.0.0.1:" in said and f"webhook {WEBHOOK} is left disabled" in said, said
        port = free_port()
        proc = relay("--listen", f"127.0.0.1:{port}", **{SECRET_ENV: secret})
        # The Prefect server edgar-tune tells of the moves it makes (in this process: Prefect reads its env once).
        tells = temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]})
        try:
            with tells:
                started = _lines_with(proc, "relaying alias moves in", "edgar-tune: error")
                assert "edgar-tune: error" not in started[-1], "".join(started)
                assert "a delivery failed" not in "".join(started), "".join(started)  # MLflow's test delivery
                name, client = "edgar-tune-10k", mlflow.MlflowClient(uri)
                client.create_registered_model(name)
                run = client.create_run("0").info  # a tracking server takes a version's files from a run's
                source = f"{run.artifact_uri}/model"
                # Each move told before the next is made, as a person's in the UI: one made a moment after another
                # can have its delivery come first, and the other's is then a late one (the test below).
                told = lambda line: "".join(_lines_with(proc, line))  # noqa: E731
                said = ""
                for ppl in (9.0, 8.0):  # registrations: v1 champion, then v2
                    v = client.create_model_version(name, source=source, run_id=run.run_id).version
                    tags = {"val_sha256": "mdna-a", "val_perplexity": repr(ppl), "val_scoring": "window 128"}
                    for key, value in tags.items():
                        client.set_model_version_tag(name, v, key, value)
                    promote(client, name, str(v), ppl, "mdna-a", "window 128")
                    said += told(f"{name} v{v} @champion")
                client.create_model_version(name, source=source, run_id=run.run_id)  # v3: not one a run registered
                client.set_registered_model_alias(name, "champion", "1")  # the UI's rollback: the same REST call
                said += told(f"{name} v1 @champion (was")
                client.set_registered_model_alias(name, "champion", "3")
                said += told(f"{name} v3 @champion")
                client.delete_registered_model_alias(name, "champion")
                said += told(f"{name} @champion removed")
                client.set_registered_model_alias(name, "champion", "2")
                said += told(f" relayed: {name} v2 @champion (was")
                assert f"not relayed: {name} v1 @champion: moved by edgar-tune, which tells" in said, said
                assert f"not relayed: {name} v2 @champion: moved by edgar-tune" in said, said
                assert f"relayed: {name} v1 @champion (was v2); v1's perplexity 9.0000 is higher than v2's" in said
                assert f"not relayed: {name} v3 @champion: a version edgar-tune did not register" in said, said
                assert f"not relayed: {name} @champion removed (from v3)" in said, said
                assert said.endswith(f"relayed: {name} v2 @champion (was on no version)\n"), said
                body = json.dumps({"entity": "model_version_alias", "action": "created",
                                   "data": {"name": name, "alias": "champion", "version": "2"}}).encode()  # fmt: skip
                now = int(time.time())
                for key, stamp, why in ((None, now, "unsigned"), ("not-the-secret", now, "its signature does not"),
                                        (secret, now - 3600, f"signed at {now - 3600}, more than")):  # fmt: skip
                    headers = {"X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": str(stamp)}
                    if key:
                        headers["X-MLflow-Signature"] = signed(key, "d1", str(stamp), body)
                    answer = httpx.post(f"http://127.0.0.1:{port}/", content=body, headers=headers)
                    assert answer.status_code == 401, answer.text
                    assert answer.json()["said"].startswith(f"refused: {why}"), answer.text
        finally:
            proc.terminate()
            out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 143, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        record = json.loads(client.get_model_version(name, "1").tags[PROMOTED])
        assert record["before"] == "2" and "MLflow UI" in record["by"]
        assert MOVED not in client.get_model_version(name, "1").tags  # spent: a later move back to v1 is relayed
        assert json.loads(client.get_registered_model(name).tags[HELD])["aliases"] == {"champion": "2"}
        # While no relay runs: edgar-tune's move (it tells Prefect itself), then a person's rollback.
        with temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
            move_alias(client, name, "challenger", "1")
        client.set_registered_model_alias(name, "champion", "1")
        client.create_registered_model("other-team")  # not edgar-tune's: the relay writes nothing on it
        client.create_model_version("other-team", source=source, run_id=run.run_id)
        client.set_registered_model_alias("other-team", "prod", "1")
        again = relay("--listen", f"127.0.0.1:{free_port()}", **{SECRET_ENV: secret, RECONCILE_ENV: "2"})
        try:
            said = "".join(_lines_with(again, "relaying alias moves in", "edgar-tune: error"))
            # A delivery MLflow never makes (the webhook off): the relay's next comparison, 2 s on, tells the move.
            hook = next(w for w in client.list_webhooks() if w.name == WEBHOOK)
            client.update_webhook(hook.webhook_id, status="DISABLED")
            time.sleep(1.5)  # MLFLOW_WEBHOOK_CACHE_TTL
            client.set_registered_model_alias(name, "champion", "2")
            lost = "".join(_lines_with(again, f"relayed: {name} v2 @champion", "Traceback"))
        finally:
            again.terminate()
            again.communicate(timeout=60)
        assert lost.endswith(f"relayed: {name} v2 @champion (was v1) (no delivery told it)\n"), lost
        assert "a delivery failed" not in said + lost, said + lost
        assert (f"not relayed: {name} v1 @challenger: moved by edgar-tune, which tells "
                f"{prefect_server['PREFECT_API_URL']} itself (moved while no relay ran)") in said, said
        assert f"relayed: {name} v1 @champion (was v2); v1's perplexity 9.0000 is higher than v2's" in said, said
        assert said.index("(moved while no relay ran)") < said.index("relaying alias moves in"), said
        held = json.loads(client.get_registered_model(name).tags[HELD])["aliases"]
        assert held == {"champion": "2", "challenger": "1"}, held
        assert HELD not in client.get_registered_model("other-team").tags
    ours = promoted_events(prefect_server["PREFECT_API_URL"], name, uri, 4)
    moves = sorted((e["resource"]["edgar-tune.version"], e["payload"]["before"] or "") for e in ours)
    assert moves == [("1", "2"), ("1", "2"), ("2", ""), ("2", "1")], ours
    export_trigger_acts_on_a_new_champion_only(next(e for e in ours if e["resource"]["edgar-tune.version"] == "1"))


def test_a_relay_started_again_tells_edgar_tunes_moves_from_a_persons_by_their_tags_times(tmp_path):
    """Found on starting again, a move is edgar-tune's when the version's MOVED tag names the alias and the relay's
    Prefect server, is newer than the relay's last record, and no later move of edgar-tune's gave the alias to
    another version; else a person's (a rollback by hand to a version edgar-tune once moved it to)."""
    import mlflow

    from edgar_tune.relay import Relay
    from tasks.registry import MOVED

    api = "http://prefect-host:4200/api"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "m"
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=str(tmp_path))
    relay = Relay(client.tracking_uri, api)
    since = 1000.0  # the relay's last record

    def tag(version: str, at: float, alias: str = "champion", told: str = api) -> dict:
        moved = {"alias": alias, "time": at, "told": told}
        client.set_model_version_tag(name, version, MOVED, json.dumps(moved))
        return moved

    assert relay._ours(name, "champion", tag("1", 1100), since)
    assert not relay._ours(name, "champion", tag("1", 900), since)  # before the record: seen (or none ran then)
    assert not relay._ours(name, "challenger", tag("1", 1100), since)
    assert not relay._ours(name, "champion", tag("1", 1100, told="http://other:4200/api"), since)
    v1 = tag("1", 1100)
    tag("2", 1200)  # edgar-tune moved it on to v2: v1 holding it now is a person's rollback
    assert not relay._ours(name, "champion", v1, since) and relay._ours(name, "champion", tag("2", 1200), since)


def test_a_move_prefect_did_not_take_is_told_at_the_relays_next_comparison(tmp_path, monkeypatch):
    """A move found by the relay's comparison (no delivery told it) that the Prefect server did not take stays out
    of the relay's record, so the next comparison tells it again; a model of another team's gets no record."""
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from edgar_tune.relay import HELD, Relay
    from tasks.registry import COMPARISON

    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name, ours in (("m", True), ("theirs", False)):
        client.create_registered_model(name)
        for _ in range(2):
            v = client.create_model_version(name, source=str(tmp_path)).version
            if ours:
                client.set_model_version_tag(name, v, COMPARISON, "{}")
        client.set_registered_model_alias(name, "champion", "1")
    api = f"http://127.0.0.1:{free_port()}/api"  # a Prefect server that does not answer
    with temporary_settings(updates={PREFECT_API_URL: api}):
        relay = Relay(client.tracking_uri, api)
        assert relay.catch_up("x") == []  # the first start: recorded, nothing to compare
        recorded = lambda name: json.loads(client.get_registered_model(name).tags[HELD])["aliases"]  # noqa: E731
        assert recorded("m") == {"champion": "1"} and HELD not in client.get_registered_model("theirs").tags
        assert relay.theirs == {("theirs", "1")}  # not asked again at each comparison
        client.set_registered_model_tag("m", HELD, "edited by hand")
        assert relay.catch_up("x") == [] and recorded("m") == {"champion": "1"}  # recorded afresh
        client.set_registered_model_alias("m", "champion", "2")
        for _ in range(2):
            (status, said), = relay.catch_up("no delivery told it")
            assert status == 502 and said.startswith("not relayed: m v2 @champion: "), said
            assert recorded("m") == {"champion": "1"}


def test_a_delivery_that_comes_after_the_next_moves_is_not_told(prefect_server, tmp_path, monkeypatch):
    """MLflow delivers webhooks from 10 threads, so the delivery of one move can reach the relay after the next
    move's. Each is checked against the alias's holder now: a late one is not told (no event for a champion that
    is not one, nor the relay's record left on it), an edgar-tune move's late delivery spends its tag (a rollback to
    that version later is a person's), and the move to where the alias is now is told once, from where the relay
    last told it. The deliveries are MLflow's payloads, handed to the relay in the reverse of the moves' order."""
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from edgar_tune.relay import HELD, Relay
    from tasks.registry import COMPARISON, MOVED, move_alias
    from tests.conftest import promoted_events

    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "late-deliveries"
    client.create_registered_model(name)
    for ppl in (9.0, 8.0, 7.0):
        v = client.create_model_version(name, source=str(tmp_path)).version
        for key, value in {COMPARISON: "{}", "val_sha256": "mdna-a", "val_perplexity": repr(ppl),
                           "val_scoring": "window 128"}.items():  # fmt: skip
            client.set_model_version_tag(name, v, key, value)
    client.set_registered_model_alias(name, "champion", "1")

    def delivery(action: str, version: str | None = None) -> dict:
        data = {"name": name, "alias": "champion"} | ({"version": version} if version else {})
        return {"entity": "model_version_alias", "action": action, "timestamp": "", "data": data}

    api = prefect_server["PREFECT_API_URL"]
    with temporary_settings(updates={PREFECT_API_URL: api}):
        relay = Relay(client.tracking_uri, api)
        assert relay.catch_up("started") == []  # recorded: champion on v1
        move_alias(client, name, "champion", "2")  # a registration's
        client.set_registered_model_alias(name, "champion", "3")  # then a person's, a moment apart
        client.delete_registered_model_alias(name, "champion")
        client.set_registered_model_alias(name, "champion", "3")
        moves = [delivery("created", "2"), delivery("created", "3"), delivery("deleted"), delivery("created", "3")]
        said = [relay.handle(payload) for payload in reversed(moves)]
        assert said == [(200, f"relayed: {name} v3 @champion (was v1)"),
                        (200, f"not relayed: {name} @champion removed: a late delivery, the alias is on v3 now"),
                        (200, f"not relayed: {name} v3 @champion: it held that alias already"),
                        (200, f"not relayed: {name} v2 @champion: a late delivery, the alias is on v3 now")], said
        assert json.loads(client.get_registered_model(name).tags[HELD])["aliases"] == {"champion": "3"}
        assert MOVED not in client.get_model_version(name, "2").tags  # spent: a rollback to v2 is a person's
        assert relay.catch_up("no delivery told it") == []  # the record holds where the alias is
        client.set_registered_model_alias(name, "champion", "2")
        assert relay.handle(delivery("created", "2"))[1].startswith(f"relayed: {name} v2 @champion (was v3)")
    events = promoted_events(api, name, client.tracking_uri, 2)
    told = sorted((e["resource"]["edgar-tune.version"], e["payload"]["before"]) for e in events)
    assert told == [("2", "3"), ("3", "1")], events


def _lines_with(proc: subprocess.Popen, *parts: str) -> list[str]:
    """The lines `proc` printed up to the first that holds one of `parts`; fails with them if it ends before."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if any(part in line for part in parts):
            return seen
    raise AssertionError("".join(seen)[-3000:])


def test_nan_perplexity_fails_before_anything_is_registered(tiny_run, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    runs, _ = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(runs / "latest" / "config.yaml", run / "config.yaml")
    for stage in ("01_download", "03_tokenize", "04_train"):
        shutil.copytree(runs / "latest" / stage, run / stage)
    weights = run / "04_train" / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights)
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "stage", "evaluate", "--run", str(run)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "fine-tuned perplexity is nan" in proc.stderr and "nothing registered" in proc.stderr
    assert not (run / "05_evaluate" / "finetuned.json").exists()


def _export(s: dict, out: Path, *args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgar_tune.cli", "export", "--model",
                           f"models:/{s['registered_model']}@{s['model_alias']}", "--out", str(out), "--json",
                           "--tracking-uri", s["mlflow_tracking_uri"], *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, EDGAR_TUNE_CACHE=str(cache)))  # fmt: skip


def _perplexity(model, run: Path) -> float:
    from datasets import load_from_disk

    from edgar_tune.config import load_run_config
    from tasks.io import read_json
    from tasks.perplexity import evaluate_model

    val = load_from_disk(str(run / "03_tokenize" / "val"))
    block = read_json(run / "03_tokenize" / "stats.json")["block_length"]
    return evaluate_model(model.eval(), val, load_run_config(run).eval, block, "export")["perplexity"]


def test_export_writes_a_merged_model_that_plain_transformers_scores_as_the_registry_did(tiny_run, tmp_path,
                                                                                          monkeypatch):
    """`edgar-tune export`: the champion as a plain transformers folder (no peft, no MLflow, no edgar-tune loader)
    that scores the perplexity the version was registered with; a folder with anything in it is never written
    over, an earlier export only with --replace."""
    import mlflow
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM

    from edgar_tune.config import ConfigError
    from tasks.export import export_version

    runs, s = tiny_run
    out = tmp_path / "export"
    proc = _export(s, out, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (done["version"], done["adapter"], done["trained"], done["dtype"]) == (s["model_version"], False, "LoRA",
                                                                                  "float32")  # fmt: skip
    assert json.loads((out / "edgar_tune.json").read_text()) == done
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists() and not list(tmp_path.glob(".export.*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not [n for n, _ in model.named_parameters() if "lora" in n]
    assert _perplexity(model, runs / "latest") == pytest.approx(s["ppl_after"], rel=1e-6)
    card = (out / "README.md").read_text()
    assert f"| this model | {s['ppl_after']:.4f} |" in card and f"models:/{s['registered_model']}/" in card
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in card

    weights = (out / "model.safetensors").read_bytes()
    fp32 = safetensors.torch.load(weights)
    again = _export(s, out, "--dtype", "bfloat16", cache=tmp_path / "cache")
    assert again.returncode == 2 and "holds an earlier export" in again.stderr and "--replace" in again.stderr
    assert (out / "model.safetensors").read_bytes() == weights  # untouched
    # the rest in this process: the CLI's way in and out is shown above
    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    client = mlflow.MlflowClient(s["mlflow_tracking_uri"])
    version = (s["registered_model"], s["model_version"])
    export_version(client, *version, out, dtype="bfloat16", replace=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    bf16 = safetensors.torch.load_file(out / "model.safetensors")
    assert bf16.keys() == fp32.keys() and all(bf16[k].dtype == torch.bfloat16 for k in bf16)
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in bf16)  # merged in fp32, rounded once
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    same = export_version(client, *version, out, dtype="bfloat16")  # the same command again: done already
    assert same["written"] is False and same["dtype"] == "bfloat16"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not an earlier export"):
        export_version(client, *version, other, replace=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match=f"is under {other / 'notes.txt'}, which is a file; name a new"):
        export_version(client, *version, other / "notes.txt" / "export")  # was a FileExistsError's traceback
    with pytest.raises(ConfigError, match="built inside its run"):  # tiny-llama's base is in the version
        export_version(client, *version, tmp_path / "adapter", adapter=True)
    assert not (tmp_path / "adapter").exists()


def test_the_champion_folder_follows_the_alias_and_the_newer_champion_wins(tiny_run, tmp_path, monkeypatch):
    """The export-champion flow's work (`export_alias`): the folder gets the version holding the alias, is left as
    it is while that holds, follows the alias when it moves; the alias is read once the folder's lock is held, so
    an export that waited for another ends with the champion of when it ran, not of when it was started."""
    import threading

    from flows.export import edgar_tune_export
    from tasks.export import export_alias
    from tasks.io import held
    from tests.conftest import two_versions

    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    client, name, first, second = two_versions(tiny_run, tmp_path)
    out = tmp_path / "exports" / name / "champion"
    done = export_alias(client, name, "champion", out)
    assert (done["version"], done["written"]) == (first, True)
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert export_alias(client, name, "champion", out)["written"] is False  # it holds the champion already
    assert (out / "model.safetensors").stat().st_mtime_ns == written
    client.set_registered_model_alias(name, "champion", second)
    done = edgar_tune_export.fn(name, "champion", str(tmp_path / "exports" / "{model}" / "{alias}"),
                                client.tracking_uri)  # the flow's own function, as the deployment runs it
    assert (done["version"], done["written"]) == (second, True)
    assert json.loads((out / "edgar_tune.json").read_text())["version"] == second
    # An export that waits for the folder (another one writes it), during which a rollback moves the alias back.
    results: list[dict] = []
    with held(out.parent / ".champion.lock", {"test": "another export"}):
        waiting = threading.Thread(target=lambda: results.append(export_alias(client, name, "champion", out)))
        waiting.start()
        time.sleep(1)
        client.set_registered_model_alias(name, "champion", first)
    waiting.join(timeout=120)
    assert [r["version"] for r in results] == [first]
    assert json.loads((out / "edgar_tune.json").read_text())["version"] == first
    with pytest.raises(LookupError, match=rf"{name} has no version @production; its aliases are @champion \(v"):
        export_alias(client, name, "production", tmp_path / "prod")


def test_readers_of_a_downloaded_version_read_at_once_and_a_download_waits_for_them(tiny_run, tmp_path, monkeypatch):
    """The champion's export (minutes of merging on a 7B) and a registration rescoring that champion both read its
    downloaded copy: they hold the model's cache lock shared, so neither waits for the other. A download of another
    version waits until they are done (no copy is evicted or half-written under a reader), then goes on."""
    import threading

    from tasks.registry import registered_files
    from tests.conftest import two_versions

    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    client, name, first, second = two_versions(tiny_run, tmp_path)
    done: dict[str, Path] = {}

    def read(version: str, key: str) -> None:
        with registered_files(client, name, version) as local:
            done[key] = local

    with registered_files(client, name, first) as reading:
        other = threading.Thread(target=read, args=(first, "same"), daemon=True)
        other.start()
        other.join(timeout=60)  # held exclusively, it waited for the first reader for good
        assert done.get("same") == reading
        download = threading.Thread(target=read, args=(second, "download"), daemon=True)
        download.start()
        time.sleep(2)
        assert "download" not in done  # it waits for the reader
    download.join(timeout=60)
    assert (done["download"] / "MLmodel").is_file() and done["download"] != reading


def _register_own_base(tiny_run, tmp_path, monkeypatch, versions) -> tuple[object, str, Path]:
    """The tiny run's adapter registered on a base model folder of one's own (`tmp_path/base`, the run's base),
    as (name, base_model, weights[, base_revision]) `versions` (weights "adapter", or a folder of full weights;
    base_revision: the hub commit its run loaded); returns the MLflow client, its store's URI and the base folder."""
    import mlflow

    from tasks.registry import MODEL_CODE, tracking_at

    runs, _ = tiny_run
    run = runs / "latest"
    base = tmp_path / "base"
    if not base.exists():
        shutil.copytree(run / "03_tokenize" / "tiny-llama", base)
    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_at(uri):
        exp = mlflow.get_experiment_by_name("own-base")
        exp = exp.experiment_id if exp else mlflow.create_experiment("own-base", (tmp_path / "artifacts").as_uri())
    for name, base_model, weights, *revision in versions:
        folder = run / "04_train" / "adapter" if weights == "adapter" else weights
        with tracking_at(uri), mlflow.start_run(experiment_id=exp):  # its artifacts in tmp_path, not ./mlruns
            mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE),  # export never runs its code
                                    artifacts={"weights": str(folder)},
                                    model_config={"base_model": base_model,
                                                  "weights": "adapter" if weights == "adapter" else "model",
                                                  **({"base_revision": revision[0]} if revision else {})},
                                    registered_model_name=name, pip_requirements=["mlflow"])  # fmt: skip
    assert list((tmp_path / "artifacts").rglob("MLmodel"))
    return mlflow.MlflowClient(uri), uri, base


def test_export_adapter_names_its_base_and_loads_with_peft(tiny_run, tmp_path, monkeypatch):
    """A version whose base is a folder or a hub id exports as its adapter alone; peft loads it on the base its
    adapter_config.json names (a hub id at the commit its run loaded), and it computes what the merged export
    computes."""
    import safetensors.torch
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from edgar_tune.config import ConfigError
    from tasks.export import export_version, form
    from tests.hub_server import Hub, client_env, serve

    shutil.copytree(tiny_run[0] / "latest" / "03_tokenize" / "tiny-llama", tmp_path / "base")
    hub = Hub({"edgar-tune/tiny": tmp_path / "base"})
    client, uri, base = _register_own_base(tiny_run, tmp_path, monkeypatch, [
        ("own-base", str(tmp_path / "base"), "adapter"), ("hub-base", "edgar-tune/tiny", "adapter"),
        ("hub-commit", "edgar-tune/tiny", "adapter", hub.commit("edgar-tune/tiny", tmp_path / "base"))])  # fmt: skip
    done = export_version(client, "own-base", "1", tmp_path / "adapter", adapter=True)
    assert done["base_model_path"] == str(base) and done["perplexity_after"] is None  # no run metrics: none shown
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    assert "this model |" not in (tmp_path / "adapter" / "README.md").read_text()
    export_version(client, "own-base", "1", tmp_path / "merged")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.arange(3, 67).reshape(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="--dtype is for a merged export"):
        export_version(client, "own-base", "1", tmp_path / "x", adapter=True, dtype="bfloat16")
    assert "`edgar-tune export --model models:/own-base/1 --base --out base`" in (tmp_path / "adapter" /
                                                                                  "README.md").read_text()

    # Its base, for a host that has neither the folder nor the hub (`edgar-tune export --base`): the same weights,
    # and peft loads the adapter onto it
    proc = subprocess.run([sys.executable, "-m", "edgar_tune.cli", "export", "--model", "models:/own-base/1", "--base",
                           "--out", str(tmp_path / "its-base"), "--tracking-uri", uri, "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, EDGAR_TUNE_CACHE=str(tmp_path / "cache")))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(proc.stdout)
    assert (form(done), done["base_model_path"]) == ("its base, float32", str(base))
    saved = safetensors.torch.load_file(tmp_path / "its-base" / "model.safetensors")
    trained_on = safetensors.torch.load_file(base / "model.safetensors")
    assert saved.keys() == trained_on.keys() and all(torch.equal(saved[k], trained_on[k]) for k in saved)
    assert (tmp_path / "its-base" / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")
    onto = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "its-base"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(onto.eval()(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="export each to its own folder"):
        export_version(client, "own-base", "1", tmp_path / "x", adapter=True, base=True)
    _register_own_base(tiny_run, tmp_path, monkeypatch, [("full", str(base), tmp_path / "merged")])
    with pytest.raises(ConfigError, match="full fine-tune: its weights are the whole model"):
        export_version(client, "full", "1", tmp_path / "x", base=True)
    with pytest.raises(ConfigError, match="written to a local folder"):
        export_version(client, "own-base", "1", "s3://bucket/exports/10k")
    assert not (REPO / "s3:").exists() and not (tmp_path / "x").exists()

    # The same adapter on a hub id (a loopback hub serving the base): the adapter names the id, and at the commit
    # its run loaded where the version records it. The hub's `main` has moved on since: the merged export of the
    # version with the commit loads the base the adapter was trained on (the weights of the one from the folder);
    # one without (registered before commits were recorded) loads `main`.
    export_version(client, "hub-base", "1", tmp_path / "hub-adapter", adapter=True)
    assert json.loads((tmp_path / "hub-adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "edgar-tune/tiny"
    assert (tmp_path / "hub-adapter" / "README.md").read_text().startswith("---\nbase_model: edgar-tune/tiny\n")
    commit = hub.commit("edgar-tune/tiny")
    export_version(client, "hub-commit", "1", tmp_path / "commit-adapter", adapter=True)
    assert json.loads((tmp_path / "commit-adapter" / "adapter_config.json").read_text())["revision"] == commit
    card, repo = (tmp_path / "commit-adapter" / "README.md").read_text(), "edgar-tune/tiny"
    assert f'base = AutoModelForCausalLM.from_pretrained("{repo}", revision="{commit}")' in card  # the card's code
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    weights = safetensors.torch.load_file(base / "model.safetensors")
    safetensors.torch.save_file({k: v + 0.05 for k, v in weights.items()}, moved / "model.safetensors",
                                metadata={"format": "pt"})  # fmt: skip
    hub.move("edgar-tune/tiny", moved)
    server, url = serve(hub)
    code = ("from edgar_tune.cli import main; import sys; sys.exit(max(main(['export', '--model', f'models:/{m}/1', "
            "'--out', f'{m}-merged', '--tracking-uri', sys.argv[1]]) for m in ('hub-base', 'hub-commit')))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, uri], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=client_env(url, tmp_path / "hub-cache", PYTHONPATH=str(REPO),
                                                          EDGAR_TUNE_CACHE=str(tmp_path / "cache")))  # fmt: skip
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loading edgar-tune/tiny from the Hugging Face Hub" in proc.stderr
    assert f"loading edgar-tune/tiny at commit {commit} from the Hugging Face Hub" in proc.stderr
    on_main = safetensors.torch.load_file(tmp_path / "hub-base-merged" / "model.safetensors")
    from_hub = safetensors.torch.load_file(tmp_path / "hub-commit-merged" / "model.safetensors")
    from_folder = safetensors.torch.load_file(tmp_path / "merged" / "model.safetensors")
    assert not torch.equal(on_main["model.embed_tokens.weight"], from_folder["model.embed_tokens.weight"])
    assert from_hub.keys() == from_folder.keys() and all(torch.equal(from_hub[k], from_folder[k]) for k in from_hub)

    # An export of the base that follows an alias is held by a version trained on the same commit, not another's
    from tasks.export import _holds

    _register_own_base(tiny_run, tmp_path, monkeypatch, [("hub-commit", "edgar-tune/tiny", "adapter", "f" * 40)] * 2)
    for version, revision in (("1", commit), ("2", hub.commit("edgar-tune/tiny")), ("3", commit)):
        client.set_model_version_tag("hub-commit", version, "base_model", "edgar-tune/tiny")
        client.set_model_version_tag("hub-commit", version, "base_revision", revision)
    was = {"registered_model": "hub-commit", "version": "1", "adapter": False, "tracking_uri": uri, "gguf": "q8_0",
           "base": True, "base_model": "edgar-tune/tiny", "base_revision": commit}  # fmt: skip
    assert [_holds(was, client, "hub-commit", v, False, "auto", "q8_0", True) for v in "123"] == [True, False, True]


def test_export_gguf_writes_one_file_that_transformers_reads_back_to_the_registered_perplexity(tiny_run, tmp_path,
                                                                                             monkeypatch):
    """`edgar-tune export --gguf TYPE`: the champion merged into one GGUF file, its card and provenance, and no
    transformers folder. Read back by transformers' own GGUF loader (another reader than the writer: it undoes the
    query/key permutation and rebuilds the tokenizer from the file), the f32 file scores the registered perplexity
    and tokenizes the held-out text as the run did; q8_0 rounds the weights and stays within 1%. What the writer does
    not know is refused before anything is merged or written."""
    import gguf
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgar_tune.config import ConfigError
    from tasks.export import export_version

    runs, s = tiny_run
    run = runs / "latest"
    out = tmp_path / "gguf"
    proc = _export(s, out, "--gguf", "f32", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(proc.stdout[proc.stdout.index("{"):])
    file = f"{s['registered_model']}-v{s['model_version']}-f32.gguf"
    assert (done["gguf"], done["gguf_file"], done["gguf_pre_tokenizer"], done["dtype"]) == ("f32", file, "gpt-2", None)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", file, "edgar_tune.json"]
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and f"GGUF f32 (`{file}`)" in card and f"FROM ./{file}" in card
    assert f'from_pretrained("{out}", gguf_file="{file}")' in card
    fields = gguf.GGUFReader(out / file).fields
    assert fields["general.architecture"].contents() == "llama" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["edgar_tune.model_uri"].contents() == done["model_uri"]

    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=file)
    assert _perplexity(model, run) == pytest.approx(s["ppl_after"], rel=1e-6)
    text = "\n".join(json.loads(line)["text"] for line in (run / "02_parse" / "val.jsonl").open())
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=file)
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(run / "03_tokenize" / "tiny-llama")(text)[
        "input_ids"]  # fmt: skip

    monkeypatch.setenv("EDGAR_TUNE_CACHE", str(tmp_path / "cache"))
    client = mlflow.MlflowClient(s["mlflow_tracking_uri"])
    version = (s["registered_model"], s["model_version"])
    done = export_version(client, *version, out, replace=True, gguf="q8_0")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", done["gguf_file"], "edgar_tune.json"]
    assert {t.tensor_type.name for t in gguf.GGUFReader(out / done["gguf_file"]).tensors} == {"Q8_0", "F32"}
    q8 = AutoModelForCausalLM.from_pretrained(out, gguf_file=done["gguf_file"])
    assert _perplexity(q8, run) == pytest.approx(s["ppl_after"], rel=1e-2)
    for kw, said in (({"adapter": True}, "exists only in the version"), ({"dtype": "bfloat16"}, "drop --dtype"),
                     ({"gguf": "q4_k_m"}, "one of f32, f16, bf16, q8_0")):  # fmt: skip
        with pytest.raises(ConfigError, match=said):
            export_version(client, *version, tmp_path / "refused", **({"gguf": "f16"} | kw))
    assert not (tmp_path / "refused").exists()


def _sentencepiece_model(run: Path, folder: Path, vocab_size: int = 1000):
    """A SentencePiece BPE model trained as Llama-2's was (byte fallback, digits split, whitespace kept, no
    normalization) on the run's training text, in `folder` as a hub repository holds one: tokenizer.model and a
    tokenizer_config.json naming its special tokens. Returns the sentencepiece processor of it."""
    import io

    import sentencepiece

    lines = [line for row in (run / "02_parse" / "train.jsonl").open() for line in json.loads(row)["text"].split("\n")]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines if line.strip()]), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 20, num_threads=2, minloglevel=2)  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    special = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "added_tokens_decoder": special}))  # fmt: skip
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def test_gguf_writes_a_sentencepiece_tokenizer_saved_without_its_model_as_its_model_scores_it(tiny_run, tmp_path,
                                                                                              caplog):
    """Llama-2's and Mistral's tokenizers are SentencePiece models, and transformers 5 saves them without
    tokenizer.model (so do a run and an export), where llama.cpp's converter reads their scores: the writer scores
    the pieces from tokenizer.json's merges. A SentencePiece model trained as Llama-2's was, loaded and saved by
    transformers: the file holds the pieces and types llama.cpp's converter reads from tokenizer.model with
    sentencepiece (its _create_vocab_sentencepiece, here in four lines), and scores that rank the merged pieces as
    the model's own scores do; transformers' GGUF reader rebuilds from the file's pieces and scores a tokenizer
    that splits the held-out text into SentencePiece's ids, and from its tensors a Llama and a Mistral model whose
    logits are the models'. And a Mistral with a sliding window says past what context llama.cpp differs."""
    import gguf
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)  # fmt: skip

    from tasks.gguf import write_gguf

    runs, _ = tiny_run
    run = runs / "latest"
    sp = _sentencepiece_model(run, tmp_path / "hub")
    saved = tmp_path / "saved"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hub")
    tokenizer.save_pretrained(saved)
    assert not (saved / "tokenizer.model").exists()
    text = "\n".join(json.loads(line)["text"] for line in (run / "02_parse" / "val.jsonl").open())
    ids = sp.encode(text)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids

    small = {"vocab_size": sp.vocab_size(), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip
    for model_class, config in ((LlamaForCausalLM, LlamaConfig(**small)),
                                (MistralForCausalLM, MistralConfig(**small, sliding_window=None))):  # fmt: skip
        torch.manual_seed(0)
        model = model_class(config).eval()
        file = tmp_path / f"{config.model_type}.gguf"
        written = write_gguf(model, saved, file, "f32", {"name": f"tiny-{config.model_type}"})
        assert (written["tokenizer"], written["pre_tokenizer"]) == ("llama", "default")
        fields = gguf.GGUFReader(file).fields
        assert fields["tokenizer.ggml.model"].contents() == "llama"
        assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
        tokens, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
        types = fields["tokenizer.ggml.token_type"].contents()
        kinds = [gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                 else gguf.TokenType.BYTE if sp.IsByte(i) else gguf.TokenType.NORMAL for i in range(sp.vocab_size())]
        kinds[:3] = [gguf.TokenType.CONTROL] * 3  # tokenizer_config.json's added_tokens_decoder: special, so control
        assert tokens == [sp.IdToPiece(i) for i in range(sp.vocab_size())] and types == kinds
        merged = [i for i in range(sp.vocab_size()) if kinds[i] == gguf.TokenType.NORMAL and len(tokens[i]) > 1]
        assert len(merged) > 500
        assert sorted(merged, key=lambda i: -scores[i]) == sorted(merged, key=lambda i: -sp.GetScore(i))

        back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
        assert back(text, add_special_tokens=False)["input_ids"] == ids
        read = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name).eval()
        window = torch.tensor([ids[:256]])
        with torch.no_grad():
            assert torch.allclose(read(window).logits, model(window).logits, atol=1e-5)

    caplog.set_level(logging.WARNING, "tasks.gguf")
    write_gguf(MistralForCausalLM(MistralConfig(**small, sliding_window=128)), saved, tmp_path / "windowed.gguf",
               "q8_0", {"name": "windowed"})  # fmt: skip
    assert "attends over the last 128 tokens only" in caplog.text


def test_gguf_adapter_applied_to_the_bases_gguf_export_is_the_merged_gguf(tiny_run, tmp_path, monkeypatch):
    """The adapter alone as a GGUF adapter (`export --adapter --gguf`), and the base it was trained on as one GGUF file
    (`export --base --gguf`, one for every version on that base): llama.cpp adds alpha / r x B.A to each adapted
    tensor of the base's file. Done here with the exports' files alone, that sum is the merged export's tensor, the
    query and key projections included (B permuted as their weights are). The adapter names its base
    (general.base_model.*) and its card the command that writes the base's file; an export of the champion's base
    writes it again only for a champion on another base. An adapter llama.cpp cannot apply as trained (DoRA,
    per-module alphas) is refused; rsLoRA's scale is carried in its alpha."""
    import gguf
    import numpy as np
    from transformers import AutoConfig

    from edgar_tune.config import ConfigError
    from tasks.export import export_alias, export_version, form
    from tasks.gguf import write_lora_gguf

    client, _, base_dir = _register_own_base(tiny_run, tmp_path, monkeypatch,
                                             [("own-base", str(tmp_path / "base"), "adapter")] * 2)  # fmt: skip
    for version in ("1", "2"):  # as a run's registration tags it
        client.set_model_version_tag("own-base", version, "base_model", str(base_dir))
    client.set_registered_model_alias("own-base", "champion", "1")
    done = export_alias(client, "own-base", "champion", tmp_path / "base-gguf", gguf="f32", base=True)
    assert done["written"] and done["gguf_file"] == "base-f32.gguf" and form(done) == "its base, GGUF f32"
    lora_done = export_version(client, "own-base", "1", tmp_path / "lora", adapter=True, gguf="f32")
    export_version(client, "own-base", "1", tmp_path / "merged", gguf="f32")
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "`edgar-tune export --model models:/own-base/1 --base --gguf f32 --out base`" in card
    assert "llama-completion -m base/base-f32.gguf --lora " in card

    run = tiny_run[0] / "latest"
    adapter_dir = run / "04_train" / "adapter"
    config = AutoConfig.from_pretrained(base_dir)
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (lora_done["lora_rank"], lora_done["lora_alpha"]) == (lora["r"], lora["lora_alpha"])
    adapter = gguf.GGUFReader(tmp_path / "lora" / "own-base-v1-lora-f32.gguf")
    assert (adapter.fields["general.type"].contents(), adapter.fields["adapter.type"].contents()) == ("adapter", "lora")
    assert adapter.fields["adapter.lora.alpha"].contents() == lora["lora_alpha"]
    assert adapter.fields["general.base_model.0.name"].contents() == "base"  # a folder: no repo_url
    assert "general.base_model.0.repo_url" not in adapter.fields
    base_file = gguf.GGUFReader(tmp_path / "base-gguf" / "base-f32.gguf")
    assert base_file.fields["general.name"].contents() == "base"
    assert "general.base_model.count" not in base_file.fields
    pairs = {t.name: np.asarray(t.data) for t in adapter.tensors}
    base = {t.name: np.asarray(t.data) for t in base_file.tensors}
    want = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "merged" / "own-base-v1-f32.gguf").tensors}
    adapted = sorted(name.removesuffix(".lora_a") for name in pairs if name.endswith(".lora_a"))
    assert len(adapted) == 7 * config.num_hidden_layers and any("attn_q" in n for n in adapted)
    for name in adapted:
        a, b = pairs[name + ".lora_a"], pairs[name + ".lora_b"]  # [r, in] and [out, r], as llama.cpp reads them
        applied = base[name] + lora["lora_alpha"] / a.shape[0] * (b @ a)
        assert np.allclose(applied, want[name], atol=1e-5), name
    for name in set(want) - set(adapted):
        assert np.array_equal(want[name], base[name]), name
    assert not np.allclose(want[adapted[0]], base[adapted[0]])  # trained: B is not zero

    # The champion moves to v2, trained on the same base: the base's file stays as it was, while the adapter's
    # folder takes v2's
    written = (tmp_path / "base-gguf" / "base-f32.gguf").stat().st_mtime_ns
    client.set_registered_model_alias("own-base", "champion", "2")
    again = export_alias(client, "own-base", "champion", tmp_path / "base-gguf", gguf="f32", base=True)
    assert (again["written"], again["version"]) == (False, "1")
    assert (tmp_path / "base-gguf" / "base-f32.gguf").stat().st_mtime_ns == written
    assert export_alias(client, "own-base", "champion", tmp_path / "lora", adapter=True, gguf="f32")["written"]

    for change, said in (({"use_dora": True}, "DoRA's magnitudes"), ({"alpha_pattern": {"q_proj": 4}}, "per-module"),
                         ({"trainable_token_indices": [5]}, r"token rows trained beside it \(train\.trainable_")):
        folder = tmp_path / next(iter(change))
        shutil.copytree(adapter_dir, folder)
        (folder / "adapter_config.json").write_text(json.dumps(lora | change))
        with pytest.raises(ConfigError, match=said):
            write_lora_gguf(folder, config, tmp_path / "refused.gguf", "f32", {})
    (folder / "adapter_config.json").write_text(json.dumps(lora | {"use_rslora": True}))
    rs = write_lora_gguf(folder, config, tmp_path / "rs.gguf", "q8_0", {})
    assert rs["alpha"] / rs["rank"] == pytest.approx(lora["lora_alpha"] / lora["r"] ** 0.5)


def test_gguf_names_the_splits_llama_cpp_knows_from_tokenizer_json():
    """A tokenizer whose hash llama.cpp's table lacks (trained for a run, or rebuilt from a GGUF) is named from its
    tokenizer.json: GPT-2's byte-level split alone is `gpt-2`, Llama-3's split before a plain byte-level mapping
    `llama-bpe`; another split, or Llama-3's with the mapping splitting again, has no name."""
    from tasks.gguf import LLAMA3_SPLIT, _split_named

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        byte_level | {"use_regex": False}]}  # fmt: skip
    assert _split_named(byte_level) == "gpt-2" and _split_named(llama3) == "llama-bpe"
    assert _split_named({"type": "Sequence", "pretokenizers": [llama3["pretokenizers"][0], byte_level]}) is None
    assert _split_named({"type": "Metaspace", "replacement": "\u2581"}) is None


def test_gguf_refuses_what_it_would_write_wrong(tmp_path):
    """Another architecture, rope scaling, a tokenizer of neither kind (byte fallback under a normalizer that is not
    SentencePiece's), merges learned by a BPE trainer in a SentencePiece-style tokenizer (llama.cpp would split by
    scores that cannot say them), and a split llama.cpp has no name for are each refused, naming llama.cpp's
    converter as the way."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, LlamaConfig, MistralConfig, PreTrainedTokenizerFast

    from edgar_tune.config import ConfigError
    from tasks.gguf import check_model, pre_tokenizer

    check_model(LlamaConfig())
    check_model(MistralConfig())
    for config, said in ((GPT2Config(), "this model is 'gpt2'"),
                         (LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                          r"rope scaling \(llama3\)"),
                         (LlamaConfig(attention_bias=True), "biases in its projections")):  # fmt: skip
        with pytest.raises(ConfigError, match=said) as err:
            check_model(config)
        assert "convert_hf_to_gguf.py" in str(err.value)

    vocab = {c: i for i, c in enumerate(["a", "b", "c", "\u2581", "ab", "abc"])}
    lower = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")], byte_fallback=True))
    lower.normalizer = normalizers.Lowercase()
    learned = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")], byte_fallback=True))
    learned.pre_tokenizer = pre_tokenizers.Metaspace(split=False)  # abc: ab + c; a + bc no split, bc no piece
    split = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    split.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel()])
    folder = tmp_path / "complete"
    PreTrainedTokenizerFast(tokenizer_object=learned).save_pretrained(folder)
    assert pre_tokenizer(None, folder) == "default"  # every split of every piece is a merge
    learned.model = models.BPE(vocab=vocab | {"bc": 6}, merges=[("a", "b"), ("ab", "c"), ("b", "c")],
                               byte_fallback=True)  # fmt: skip
    for name, tok, said in (("lower", lower, "with byte fallback with a normalizer"),
                            ("learned", learned, r"'abc' is in its vocabulary, the merge \('a', 'bc'\) is not"),
                            ("split", split, "would not know how to split")):  # fmt: skip
        folder = tmp_path / name
        fast = PreTrainedTokenizerFast(tokenizer_object=tok)
        fast.save_pretrained(folder)
        with pytest.raises(ConfigError, match=said):
            pre_tokenizer(fast, folder)
    (tmp_path / "lower" / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="has none"):
        pre_tokenizer(fast, tmp_path / "lower")


LLAMA_CPP = os.environ.get("EDGAR_TUNE_LLAMA_CPP")  # a llama.cpp checkout, its tools built in build/bin


def _llama_perplexity(tools: Path, *args: str) -> float:
    """llama-perplexity's final estimate. In two of five runs of this test its log ended early, exit status 0 (one
    mid-line, at chunk 76 of 203): llama.cpp writes its log from a thread of its own, and the tail was lost. Such a
    run is run again, up to three times; what it printed is in the failure."""
    for _ in range(3):
        proc = subprocess.run([str(tools / "llama-perplexity"), *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if said := re.search(r"Final estimate: PPL = ([\d.]+)", proc.stderr + proc.stdout):
            return float(said[1])
    raise AssertionError(f"no final estimate in three runs: {proc.stdout[-1000:]} {proc.stderr[-2000:]}")


@pytest.mark.skipif(not LLAMA_CPP, reason="set EDGAR_TUNE_LLAMA_CPP to a llama.cpp checkout with build/bin built")
def test_llama_cpp_reads_the_gguf_export_as_its_own_converter_writes_it(tiny_run, tmp_path):
    """Against llama.cpp itself (not in CI: it is built from source). For each type, the GGUF writer's tensors and
    tokenizer for SmolLM2 are those llama.cpp's convert_hf_to_gguf.py writes, to the byte (its converter refuses
    tiny-llama's tokenizer, whose hash it does not know: the writer names its split `gpt-2` from tokenizer.json).
    The tiny run's `export --gguf f32`: llama-tokenize splits the held-out text into the ids the run's tokenizer
    gives, and llama-perplexity scores it as transformers scores the merged model the same way (windows of 128, the
    second half of each scored); its adapter alone as a GGUF adapter holds convert_lora_to_gguf.py's tensors, and
    llama-perplexity scores the base's GGUF (`export --base --gguf f32`) with it as the merged file. A SentencePiece
    tokenizer (Llama-2's kind) in the writer's file and in the converter's from tokenizer.model: llama.cpp splits the
    held-out text into SentencePiece's ids from both. And llama.cpp's own tokenizer test vectors for Llama-3's,
    GPT-2's and Llama-2's vocabularies come out of the writer's files as llama.cpp says they must."""
    import math

    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.gguf import write_gguf
    from tasks.models import smollm2_dir

    llama_cpp = Path(LLAMA_CPP)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama_cpp / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    if subprocess.run([sys.executable, "-c", "import sentencepiece"], env=env).returncode:
        pytest.skip("llama.cpp's converter imports sentencepiece: pip install sentencepiece")
    smollm2 = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    for kind in ("f32", "f16", "bf16", "q8_0"):
        ours, theirs = tmp_path / f"ours-{kind}.gguf", tmp_path / f"llama-cpp-{kind}.gguf"
        write_gguf(model, smollm2, ours, kind, {"name": "SmolLM2"})
        convert = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(smollm2), "--outtype",
                                  kind, "--outfile", str(theirs)], env=env, capture_output=True, text=True)  # fmt: skip
        assert convert.returncode == 0, convert.stderr[-3000:]
        a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
        mine, its = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
        assert mine.keys() == its.keys()
        for name, t in mine.items():
            assert (t.tensor_type, list(t.shape)) == (its[name].tensor_type, list(its[name].shape)), name
            assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(its[name].data).view(np.uint8)), name
        for key in [k for k in b.fields if k.startswith(("tokenizer.", "llama."))]:
            assert a.fields[key].contents() == b.fields[key].contents(), key
        ours.unlink()
        theirs.unlink()

    runs, s = tiny_run
    merged, exported = tmp_path / "merged", tmp_path / "gguf"
    assert _export(s, merged, cache=tmp_path / "cache").returncode == 0
    assert _export(s, exported, "--gguf", "f32", cache=tmp_path / "cache").returncode == 0
    text = tmp_path / "val.txt"
    text.write_text("\n".join(json.loads(line)["text"] for line in (runs / "latest" / "02_parse" / "val.jsonl").open()))
    f32, tools = next(exported.glob("*.gguf")), llama_cpp / "build" / "bin"
    said = subprocess.run([str(tools / "llama-tokenize"), "-m", str(f32), "-f", str(text), "--ids", "--log-disable"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    ids = AutoTokenizer.from_pretrained(merged)(text.read_text())["input_ids"]
    assert json.loads(said.strip().splitlines()[-1]) == ids
    theirs = _llama_perplexity(tools, "-m", str(f32), "-f", str(text), "-c", "128", "-b", "128")
    model, nll, n = AutoModelForCausalLM.from_pretrained(merged).eval(), 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) // 128 * 128, 128):
            window = torch.tensor([ids[start:start + 128]])
            logp = torch.log_softmax(model(window).logits[0].double(), -1)
            nll -= sum(logp[j, window[0, j + 1]].item() for j in range(64, 127))
            n += 63
    assert theirs == pytest.approx(math.exp(nll / n), rel=1e-3)

    # The adapter alone as a GGUF adapter: convert_lora_to_gguf.py's tensors, and llama-perplexity scores a GGUF of
    # the base with it (--lora) as it scores the merged file.
    from tasks.gguf import write_lora_gguf

    base_dir, adapter_dir = runs / "latest" / "03_tokenize" / "tiny-llama", runs / "latest" / "04_train" / "adapter"
    for kind in ("f32", "q8_0"):
        ours, theirs_lora = tmp_path / f"lora-{kind}.gguf", tmp_path / f"lora-llama-cpp-{kind}.gguf"
        write_lora_gguf(adapter_dir, AutoConfig.from_pretrained(base_dir), ours, kind, {"name": "lora"})
        convert = subprocess.run([sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), str(adapter_dir),
                                  "--base", str(base_dir), "--outtype", kind, "--outfile", str(theirs_lora)], env=env,
                                 capture_output=True, text=True)  # fmt: skip
        assert convert.returncode == 0, convert.stderr[-3000:]
        a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs_lora)
        assert {t.name: (t.tensor_type, bytes(np.asarray(t.data).view(np.uint8))) for t in a.tensors} == {
            t.name: (t.tensor_type, bytes(np.asarray(t.data).view(np.uint8))) for t in b.tensors}  # fmt: skip
        for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
            assert a.fields[key].contents() == b.fields[key].contents(), key
    assert _export(s, tmp_path / "base", "--base", "--gguf", "f32", cache=tmp_path / "cache").returncode == 0
    assert _llama_perplexity(tools, "-m", str(tmp_path / "base" / "tiny-llama-f32.gguf"), "--lora",
                             str(tmp_path / "lora-f32.gguf"), "-f", str(text), "-c", "128",
                             "-b", "128") == pytest.approx(theirs, rel=1e-4)  # fmt: skip

    # A SentencePiece model trained as Llama-2's was: llama.cpp's converter reads the hub-style folder (with
    # tokenizer.model), the writer the folder transformers saves (without it). The same tensors, pieces and types, and
    # llama.cpp splits the held-out text into SentencePiece's ids from either file.
    sp = _sentencepiece_model(runs / "latest", tmp_path / "spm-hub")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "spm-hub")
    tokenizer.save_pretrained(tmp_path / "spm-saved")
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    tiny.save_pretrained(tmp_path / "spm-hub")
    ours, theirs = tmp_path / "spm-ours.gguf", tmp_path / "spm-llama-cpp.gguf"
    write_gguf(tiny, tmp_path / "spm-saved", ours, "f32", {"name": "spm"})
    convert = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(tmp_path / "spm-hub"),
                              "--outtype", "f32", "--outfile", str(theirs)], env=env, capture_output=True, text=True)
    assert convert.returncode == 0, convert.stderr[-3000:]
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    assert {t.name: bytes(np.asarray(t.data).view(np.uint8)) for t in a.tensors} == {
        t.name: bytes(np.asarray(t.data).view(np.uint8)) for t in b.tensors}  # fmt: skip
    for key in [k for k in b.fields if k.startswith(("tokenizer.", "llama.")) and k != "tokenizer.ggml.scores"]:
        assert a.fields[key].contents() == b.fields[key].contents(), key
    for file in (ours, theirs):
        said = subprocess.run([str(tools / "llama-tokenize"), "-m", str(file), "-f", str(text), "--ids", "--no-bos",
                               "--log-disable"], capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert json.loads(said.strip().splitlines()[-1]) == sp.encode(text.read_text()), file.name

    # llama.cpp's own tokenizer test vectors (models/ggml-vocab-NAME.gguf.inp, .out) through a GGUF of the writer's:
    # Llama-3's, GPT-2's and Llama-2's vocabularies, rebuilt by transformers from llama.cpp's vocab files (so their
    # hashes are not the hub tokenizers': the writer names their splits from tokenizer.json, and reads Llama-2's
    # scores off its merges), on a one-layer llama.
    for name, pre in (("llama-bpe", "llama-bpe"), ("gpt-2", "gpt-2"), ("llama-spm", "default")):
        vocab = AutoTokenizer.from_pretrained(llama_cpp / "models", gguf_file=f"ggml-vocab-{name}.gguf")
        vocab.save_pretrained(tmp_path / name)
        tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
        file = tmp_path / f"{name}.gguf"
        assert write_gguf(tiny, tmp_path / name, file, "f32", {"name": name})["pre_tokenizer"] == pre
        texts = (llama_cpp / "models" / f"ggml-vocab-{name}.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
        wanted = (llama_cpp / "models" / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
        for i, (text, ids) in enumerate(zip(texts, wanted, strict=False)):
            (tmp_path / "text.txt").write_text(text)
            said = subprocess.run([str(tools / "llama-tokenize"), "-m", str(file), "-f", str(tmp_path / "text.txt"),
                                   "--ids", "--no-bos", "--log-disable"], capture_output=True, text=True).stdout
            assert json.loads(said.strip().splitlines()[-1]) == [int(x) for x in ids.split()], (name, i, text)


def test_export_card_says_what_was_held_out_and_how_it_was_tuned():
    """The card names the held-out Items the run chose (parse.val_items), and does not speak of 10-Ks or MD&A for a
    run on one's own text or of domain adaptation for instruction tuning."""
    from tasks.export import model_card

    p = {"registered_model": "m", "version": "3", "aliases": [], "adapter": False, "trained": "LoRA",
         "dtype": "bfloat16", "base_model": "meta-llama/Llama-2-7b-hf", "perplexity_before": 8.0,
         "perplexity_after": 2.5, "val_tokens": 1000, "val_scoring": "window 2048, stride 1024",
         "filings": [{"ticker": "AMZN", "fiscal_year": 2021}, {"ticker": "AMZN", "fiscal_year": 2020}],
         "lora_target_modules": ["q_proj", "v_proj"], "model_uri": "models:/m/3", "tracking_uri": "sqlite:///x.db",
         "mlflow_run_id": "r", "git_commit": "c", "train_sha256": None, "val_sha256": None}  # fmt: skip
    card = model_card(p, {"parse.val_items": '["7", "7A"]', "train.lora_r": "16"}, False, Path("/srv/m"))
    assert card.startswith("---\nbase_model: meta-llama/Llama-2-7b-hf\n")  # a hub id: the hub links it
    assert "tags: [edgar-tune, finance, sec-10k]" in card
    assert "domain-adapted to SEC 10-K filings" in card and "held-out Item 7, 7A, 1,000 tokens" in card
    assert "validated on their Item 7, 7A: AMZN FY2020, FY2021." in card and "MD&A" not in card
    assert "| `train.lora_target_modules` | q_proj, v_proj |" in card and "| `train.lora_r` | 16 |" in card
    own = model_card(p | {"filings": []}, {"train.instruction_tuned": "True"}, False, Path("/srv/m"))
    assert "instruction-tuned on prompt/completion pairs" in own and "held-out text, 1,000 tokens" in own
    assert "10-K" not in own and "Item" not in own and "tags: [edgar-tune, finance]" in own
    assert "use_dora" not in card and "use_rslora" not in card and "loraplus" not in card  # plain LoRA says nothing
    adapter = p | {"adapter": True, "base_model_path": "/srv/base", "base_revision": None}
    said = {"train.use_dora": "True", "train.use_rslora": "False", "train.loraplus_lr_ratio": "16.0"}
    dora = model_card(adapter, said, False, Path("/srv/m"))
    assert "| `train.use_dora` | true |" in dora and "use_rslora" not in dora
    assert "| `train.loraplus_lr_ratio` | 16.0 |" in dora
    assert "vLLM's `--lora-modules` refuses it" in dora and "`edgar-tune export --model models:/m/3` writes it" in dora
    assert "lora_init" not in dora and "lora_init" not in model_card(adapter, {"train.lora_init": "default"}, False,
                                                                  Path("/srv/m"))  # fmt: skip
    pissa = model_card(adapter, {"train.lora_init": "pissa_niter_4", "train.lora_r": "8"}, False, Path("/srv/m"))
    assert "| `train.lora_init` | pissa_niter_4 |" in pissa and "| `train.lora_r` | 8 |" in pissa
    assert "published as a plain LoRA of twice `lora_r` on the unchanged base" in pissa
