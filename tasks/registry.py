"""Stage 6: log the run to MLflow and register the model, with a gated alias.

The registered version holds the LoRA adapter and tokenizer plus a reference to the base model (a hub id or
a built-in name), not a copy of the base weights; a full fine-tune registers its weights; the tiny test model
ships whole because it exists only inside its run folder.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import yaml

from edgar_tune.config import REPO_ROOT, EvalConfig, PipelineConfig, RegisterConfig, flat_params, tracking_uri
from tasks.io import (
    DOWNLOAD, EVALUATE, PARSE, TOKENIZE, TRAIN, Busy, answers, cache_dir, held, holder_info, joined, megabytes,
    not_answering, read_json, read_jsonl, size,
)  # fmt: skip
from tasks.batching import Answer, Generation
from tasks.textdata import data_locations, template_fields
from tasks.progress import CURVES, Point, clock, training_points
from tasks.pruning import PointPruned, describe
from tasks.storage import folder_identity, run_identity

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
# The registered model's code (MLflow models-from-code); its version carries `tasks/` and `edgar_tune/` beside it.
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


def existing_store(given: str | None, runs_root: Path, change: str) -> str:
    """`tracking_uri`, for a command that reads what runs registered: a sqlite store that does not exist is refused
    (MLflow would make an empty one, and report no models), `change` saying how to name the right one, as is a
    tracking server that does not answer (MLflow's client would retry for four minutes: a port mistyped)."""
    uri = tracking_uri(given, runs_root, "the MLflow store")
    if gone := not_answering(uri, "the MLflow tracking server"):
        from edgar_tune.config import ConfigError

        raise ConfigError(f"{gone}: start it, or {change}")
    if (db := sqlite_file(uri)) is not None and not db.is_file():
        from edgar_tune.config import ConfigError

        here = Path.cwd()  # a run with --out elsewhere keeps its store beside its folder: one level down, or here
        near = [p for p in (here / "mlflow.db", *sorted(here.glob("*/mlflow.db"))) if p.is_file()]
        found = f"; there is one at {joined([f'sqlite:///{p}' for p in near[:3]], 'and one at')}" if near else ""
        raise ConfigError(f"no MLflow store at {db}: {change}{found}")
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite store's URI (`sqlite:///PATH`); None for a tracking server."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class EdgarTuneLM(mlflow.pyfunc.PythonModel, Generation):
    """pyfunc: base model + adapter (or full weights); input a DataFrame with a `prompt` column, or for a version
    instruction-tuned since its model config holds `prompt_template`, the template's fields as columns, and for one
    tuned on conversations (`chat`), `messages`.

    Registered as source through `MODEL_CODE`. Versions registered before that hold a pickle of this class by
    its name here, so it stays in this module."""

    def load_context(self, context) -> None:
        from tasks.models import load_tokenizer

        import torch

        device, dtype = placement(context.model_config or {})
        # an adapter merged in float32 (its product added to the base's weights), then rounded once to `dtype`;
        # full weights read in `dtype` at once (a 7B one in float32 first would take 28 GB more)
        merged = torch.float32 if context.model_config["weights"] == "adapter" else dtype
        self.model = load_registered(context.artifacts, context.model_config, merged).to(device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(context.artifacts["weights"])
        self.template = (context.model_config or {}).get("prompt_template")
        self.chat = bool((context.model_config or {}).get("chat"))  # tuned on conversations: served from `messages`
        from tasks.generate import turn_end

        self.closing = turn_end(self.tokenizer) if self.chat else None  # its answers end there, as at EOS
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Generate a completion for each request: a row's `prompt`, or the prompt the template makes of its
        fields or the chat template of its `messages` (`request_prompt`); a plain string, a list of strings or a
        dict also works when called directly."""
        settings = generation_settings(params)
        rows = _requests(model_input)
        if (self.template or self.chat) and hasattr(model_input, "columns") and not len(model_input.columns):
            # MLflow dropped the columns the signature does not name
            other = (f"the fields of the prompt template it was instruction-tuned with "
                     f"({', '.join(template_fields(self.template))})" if self.template else "`messages`")  # fmt: skip
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"the input has no column the model reads: give each request a `prompt`, or {other}")
        chat = (lambda value, which: chat_prompt(self.tokenizer, value, which)) if self.chat else None
        prompts = [request_prompt(row, self.template, _which(n, len(rows)), chat) for n, row in enumerate(rows, 1)]
        return [done["choices"][0]["text"] for done in self.complete(prompts, settings, closing=self.closing)]

    def encode(self, prompts: list[tuple[str | list[int], bool]], max_new_tokens: int) -> list:
        """Each prompt (its text, and whether it is whole: written in a chat template, with its special tokens, to
        which the tokenizer adds none, as in training; or its token ids, taken as they are) tokenized, all checked
        against the context before any is generated (`_check_context`)."""
        import torch

        encoded = [{"input_ids": torch.tensor([text], device=self.model.device)} if isinstance(text, list) else
                   self.tokenizer(text, return_tensors="pt", add_special_tokens=not whole).to(self.model.device)
                   for text, whole in prompts]  # fmt: skip
        self._check_context(encoded, max_new_tokens)
        return encoded

    def complete(self, prompts: list[tuple[str | list[int], bool]], settings: dict, n: int = 1, *,
                 closing: str | None, heard: Callable | None = None, cancelled: threading.Event | None = None,
                 run: Callable[[list[Answer]], None] | None = None, logprobs: int | None = None,
                 echo: bool = False, encoded: list | None = None) -> list[dict]:  # fmt: skip
        """Answer each prompt (`encode`) `n` times with `settings` (`generation_settings`), each answer ending at
        EOS, at `closing` (the chat template's end of turn, `turn_end`) and at the `stop` texts: per prompt, its
        `prompt_tokens` and its `choices`, each the `text`, its `completion_tokens` and why it ended
        (`finish_reason`: "stop" there, "length" at max_new_tokens), as OpenAI's API reports them.

        The answers are generated together, a batch at a time (`run`: `generate_batches`, or a server's, which
        batches them with other requests'). Each draws from its own generator, seeded from `settings["seed"]`, the
        prompt's place and the answer's (`Answer.seed`), so what it samples does not depend on what it was batched
        with, and the first answer is the one `n=1` gives.

        With `logprobs` (`Answer.logprobs`), each choice's `scored` are its tokens' scores (`Scored`), and with
        `echo`, its `prompt_scored` its prompt's. `heard(i, k, text, choice, scored)`, where given, hears answer k of
        prompt i as it is generated: its text piece by piece (`choice` None; the pieces make the answer's text) with
        the scores of the tokens taken since the last piece, then its choice (`text` None). Generation of an answer
        stops at its next token once `cancelled` is set (a streaming client gone). `encoded`: the prompts as `encode`
        gave them already (a server checks them before its stream begins), not tokenized again."""
        for name in ("logit_bias", "stop_token_ids"):
            if (ids := settings.get(name)) and max(ids) >= (vocab := self.vocabulary):
                raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                    f"{name} names token {max(ids)}, past the model's vocabulary of {vocab} tokens (ids 0 to "
                    f"{vocab - 1})")  # fmt: skip
        if settings.get("response_format"):
            try:
                self.grammar_tokens  # noqa: B018 (made here, to refuse the request before any answer begins)
            except ValueError as err:
                raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(err)) from None
        encoded = self.encode(prompts, settings["max_new_tokens"]) if encoded is None else encoded
        asked = [Answer(ids, settings, Answer.seed_of(settings["seed"], i, k), closing, cancelled=cancelled,
                        logprobs=logprobs, echo=echo) for i, ids in enumerate(encoded) for k in range(n)]  # fmt: skip
        if heard:
            for j, a in enumerate(asked):
                a.heard = lambda text, choice, i=j // n, k=j % n, a=a: heard(i, k, text, choice, a.fresh())
        (run or self.generate_batches)(asked)
        scores = lambda a: {"scored": a.scored, "prompt_scored": a.prompt_scored} if logprobs is not None else {}  # noqa: E731
        return [{"prompt_tokens": ids["input_ids"].shape[1],
                 "choices": [a.choice | scores(a) for a in asked[i * n : (i + 1) * n]]}
                for i, ids in enumerate(encoded)]  # fmt: skip

    def _check_context(self, encoded: list, new_tokens: int) -> None:
        """Refuses a prompt that, with `new_tokens` generated after it, runs past the model's context: positions it
        never saw, which a RoPE model fills with text it was not made to give, and GPT-2's learned positions with an
        IndexError. A served request's mistake, so MLflow answers 400 with this message."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        for i, ids in enumerate(encoded):
            n = ids["input_ids"].shape[1]
            if context and n + new_tokens > context:
                which = f"prompt {i + 1} of {len(encoded)}" if len(encoded) > 1 else "the prompt"
                fix = (f"shorten it, or lower max_new_tokens to {context - n} or less" if n < context
                       else f"shorten it to fewer than {context} tokens")  # fmt: skip
                raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                    f"{which} is {n} tokens, and {new_tokens} more (max_new_tokens) make {n + new_tokens}, past the "
                    f"model's context of {context} positions: {fix}")  # fmt: skip


# A request's generation settings (its `params`) and their defaults: greedy decoding unless `do_sample`.
# The penalties (OpenAI's presence and frequency, vLLM's and transformers' repetition) shape greedy decoding too.
# vLLM's `min_tokens` (EOS and `stop_token_ids` held back until that many are generated) and `ignore_eos` (the
# answer runs to max_new_tokens whatever EOS it generates), which fixed-length benchmarks send.
GENERATION = {"max_new_tokens": 40, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
              "seed": 0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
              "min_tokens": 0, "ignore_eos": False}  # fmt: skip


def generation_settings(params: dict | None) -> dict:
    """The settings a predict call generates with: its `params` over `GENERATION`, each checked, OpenAI's
    `max_tokens` as `max_new_tokens`, `stop`, the texts to end each answer at (a list; none by default), and
    OpenAI's `logit_bias` (token id -> a number from -100 to 100 added to its logit; {} by default), whose ids the
    model's vocabulary is checked for when it generates (`EdgarTuneLM.complete`). An MLflow signature's parameters
    hold no mapping, so a version's signature takes `logit_bias` as its JSON text too (`mlflow models serve`,
    `pyfunc.load_model(...).predict`: '{"50256": -100}'); a mapping there is refused by MLflow, not dropped.

    Raises:
        MlflowException (INVALID_PARAMETER_VALUE: a served request's mistake, answered 400 with this message, not
            500 and a traceback): a value out of its range, or a sampling setting given without `do_sample`.
    """
    given = {k: v for k, v in (params or {}).items() if k in GENERATION}
    whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)  # noqa: E731
    number = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)  # noqa: E731
    if (openai := (params or {}).get("max_tokens")) is not None:  # OpenAI's name for it
        if not (whole(openai) and openai >= 1):
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"max_tokens must be a whole number of at least 1, got {openai!r}")
        if given.get("max_new_tokens", GENERATION["max_new_tokens"]) not in (GENERATION["max_new_tokens"], openai):
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"max_tokens={openai!r} and max_new_tokens={given['max_new_tokens']!r} are two names for the tokens "
                "to generate: give one")  # fmt: skip
        given["max_new_tokens"] = openai
    enders = (params or {}).get("stop_token_ids")
    enders = [] if enders is None else list(enders) if isinstance(enders, list | tuple | np.ndarray) else enders
    if not isinstance(enders, list) or not all(whole(t) and t >= 0 for t in enders):
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"stop_token_ids must be a list of token ids (vLLM's: the answer ends at any of them), got {enders!r}")
    stop = (params or {}).get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(text, str) and text for text in stop):  # OpenAI's: texts to end the answer at
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"stop must be a list of texts, none empty, got {stop!r}")
    bias = _mapping_param((params or {}).get("logit_bias"), {})
    ids = {k: int(k) if whole(k) else int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else None
           for k in bias} if isinstance(bias, dict) else {}  # fmt: skip
    if not isinstance(bias, dict) or any(i is None or i < 0 for i in ids.values()) or not all(
            number(v) and -100 <= v <= 100 for v in bias.values()):  # fmt: skip
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"logit_bias must map token ids to numbers from -100 (never that token) to 100 (only it), as "
            f'{{"50256": -100}}, got {str(bias)[:80]}')  # fmt: skip
    fmt = response_format((params or {}).get("response_format"))
    settings = GENERATION | given
    checks = {
        "max_new_tokens": (lambda v: whole(v) and v >= 1, "a whole number of at least 1"),
        "do_sample": (lambda v: isinstance(v, bool | np.bool_), "true or false"),
        "temperature": (lambda v: number(v) and v > 0, "a number above 0"),
        "top_k": (lambda v: whole(v) and v >= 0, "a whole number (0: no limit)"),
        "top_p": (lambda v: number(v) and 0 < v <= 1, "a number above 0 and at most 1"),
        "min_p": (lambda v: number(v) and 0 <= v <= 1, "a number from 0 to 1 (0: none; a token less likely than it "
                  "times the likeliest's is not drawn)"),
        "seed": (lambda v: whole(v) and 0 <= v < 2**32, "a whole number from 0 to 2**32 - 1"),
        "repetition_penalty": (lambda v: number(v) and v > 0, "a number above 0 (1: none; above 1, a token of the "
                               "prompt or the answer so far is less likely again)"),
        "presence_penalty": (lambda v: number(v) and -2 <= v <= 2, "a number from -2 to 2 (0: none; above 0, a token "
                             "the answer has taken is less likely again)"),
        "frequency_penalty": (lambda v: number(v) and -2 <= v <= 2, "a number from -2 to 2 (0: none; above 0, a "
                              "token is less likely the more often the answer has taken it)"),
        "min_tokens": (lambda v: whole(v) and 0 <= v <= settings["max_new_tokens"], "a whole number from 0 to "
                       f"max_new_tokens ({settings['max_new_tokens']}): the tokens before EOS may end the answer"),
        "ignore_eos": (lambda v: isinstance(v, bool | np.bool_), "true or false"),
    }
    for name, (ok, what) in checks.items():
        if not ok(settings[name]):
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"{name} must be {what}, got {settings[name]!r}")
    # MLflow fills in a served request's defaults: a setting that differs from its default was asked for
    unused = [f"{k}={settings[k]!r}" for k in ("temperature", "top_k", "top_p", "min_p")
              if settings[k] != GENERATION[k]]  # fmt: skip
    if unused and not settings["do_sample"]:
        shape = "shapes" if len(unused) == 1 else "shape"
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"{', '.join(unused)} only {shape} sampling, and do_sample is false (greedy decoding takes the likeliest "
            "token each step): set do_sample to true, or leave them out")  # fmt: skip
    return {k: type(GENERATION[k])(v) for k, v in settings.items()} | {"stop": stop, "logit_bias": {
        ids[k]: float(v) for k, v in bias.items()}, "response_format": fmt, "stop_token_ids": [int(t) for t in enders]}


# vLLM's structured outputs besides JSON, as a `response_format` type (`edgar-tune serve` takes them as vLLM's
# `structured_outputs`), and what each holds.
VLLM_KINDS = {"regex": "a regular expression the answer matches whole", "choice": "a list of texts, none empty, the "
              "answer one of them", "grammar": "a context-free grammar, in Lark's syntax or GBNF"}


def response_format(given: Any) -> dict | None:
    """OpenAI's `response_format` (a mapping, or its JSON text, as a version's signature takes it), checked: None
    for text (`{"type": "text"}`, or none given); `{"type": "json_object"}`, an answer that is a JSON object; or
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`, a JSON value of that schema; or one
    of vLLM's other structured outputs (`VLLM_KINDS`: `{"type": "choice", "choice": ["up", "down"]}`). Each step's
    tokens are kept to those the format allows next (llguidance's grammar of it: `tasks.batching.grammar`).

    Raises:
        MlflowException (INVALID_PARAMETER_VALUE): another shape, or a schema llguidance cannot follow.
    """
    from tasks.batching import grammar

    fmt = _mapping_param(given, None)
    kinds = ("text", "json_object", "json_schema", *VLLM_KINDS)
    example = '{"type": "json_schema", "json_schema": {"name": "figures", "schema": {"type": "object", ...}}}'
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in kinds):
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"response_format must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or {example} (or "
            f"vLLM's structured outputs: {{\"type\": \"regex\", \"regex\": ...}}, \"choice\" or \"grammar\" "
            f"likewise), got {str(given)[:80]}")  # fmt: skip
    if fmt is None or fmt["type"] == "text":
        return None
    inner = fmt.get("json_schema")
    if fmt["type"] == "json_schema" and not (isinstance(inner, dict) and isinstance(inner.get("schema", {}), dict)):
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"response_format's json_schema must be an object whose `schema` is a JSON schema, as {example}, got "
            f"{str(inner)[:80]}")  # fmt: skip
    kind, value = fmt["type"], fmt.get(fmt["type"])
    if kind in VLLM_KINDS and not (isinstance(value, str) and value if kind != "choice" else isinstance(
            value, list) and value and all(isinstance(c, str) and c for c in value)):  # fmt: skip
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"response_format's {kind} must be {VLLM_KINDS[kind]}, got {str(value)[:80]}")
    try:
        import llguidance
    except ImportError:
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            "response_format needs llguidance where the model is served (pip install llguidance)") from None
    try:
        problem = llguidance.LLMatcher.validate_grammar(grammar(fmt))
    except Exception as err:  # noqa: BLE001 (a GBNF grammar llguidance's converter cannot read, said as it says it)
        problem = f"{type(err).__name__}: {err}"
    if problem:
        what = "schema" if kind.startswith("json") else kind
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"response_format's {what} is not one this server can follow: {problem.strip()}")
    return fmt


def _mapping_param(value: Any, empty: Any) -> Any:
    """A request parameter that is a mapping, given as one or as its JSON text (an MLflow signature's parameters
    hold no mapping): the mapping, `empty` where none is given, or the value as sent where it is not JSON (for its
    check to refuse as it was sent)."""
    if value is None or value == "":
        return empty
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return value


def _which(n: int, count: int) -> str:
    return f"request {n} of {count}" if count > 1 else "the request"


def _requests(model_input) -> list[dict]:
    """The requests of a predict call's input, a dict of column -> value each: a DataFrame's rows, a dict's, a
    string's or a list of strings' (as `prompt`).

    MLflow's schema makes `{"prompt": ["a", "b"]}` (and a served `{"inputs": {"prompt": [...]}}`) one row whose
    cells are lists: its requests are taken one by one (a cell that is not a list goes with each), not as the text
    of the list. A `messages` list of turns ({"role", "content"} objects) is one conversation, and so are rows that
    each hold one turn: MLflow makes a row of each turn of OpenAI's chat request, `{"messages": [...]}`."""
    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, dict):
        model_input = pd.DataFrame([model_input])
    elif not hasattr(model_input, "columns"):
        items = list(model_input)
        model_input = pd.DataFrame(items if all(isinstance(x, dict) for x in items) else {"prompt": items})
    records = model_input.to_dict("records")
    turns = [r.get("messages") for r in records]
    if len(records) > 1 and all(isinstance(t, dict) for t in turns):
        # MLflow makes a row of each turn of `{"messages": [turn, ...]}`, OpenAI's chat request: one conversation
        records = [{**records[0], "messages": turns}]
    rows = []
    for record in records:
        # a list of turns is one conversation's `messages`, not a list of requests
        listed = {k for k, v in record.items() if isinstance(v, _LISTED) and not (k == "messages" and _turns(v))}
        lengths = {len(record[k]) for k in listed}
        if len(lengths) > 1:
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"the columns' lists are of different lengths ({', '.join(map(str, sorted(lengths)))}); give one "
                "value a column for each request")  # fmt: skip
        count = lengths.pop() if lengths else None
        if count == 0:  # `{"messages": []}`: answered `[]` before, as if nothing were asked
            empty = ", ".join(f"`{k}`" for k in sorted(listed))
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"{empty} {'is an empty list' if len(listed) == 1 else 'are empty lists'}: give a conversation (a list "
                "of {\"role\", \"content\"} turns) as `messages`, or a prompt (or a list of prompts)")  # fmt: skip
        if count is None:
            rows.append(record)
        else:
            rows += [{k: v[i] if k in listed else v for k, v in record.items()} for i in range(count)]
    return rows


_LISTED = (list, tuple, np.ndarray)


def _turns(value) -> bool:
    """Whether `value` is a conversation's turns: a non-empty list of {"role", "content"} objects."""
    return isinstance(value, _LISTED) and len(value) > 0 and all(isinstance(t, dict) for t in value)


def filled_prompt(template: str, given: dict[str, str]) -> str:
    """The prompt `template` makes of the fields `given`, a field not given as empty text (as a null one trained)."""
    return template.format(**{name: given.get(name, "") for name in template_fields(template)})


def request_prompt(row: dict, template: str | None, which: str,
                   chat: Callable[[str, str], str] | None = None) -> tuple[str, bool]:  # fmt: skip
    """The prompt of one request: its `prompt`; for an instruction-tuned version (`template`, the prompt template
    it trained with) the prompt the template makes of the request's fields (a template with a field named
    `prompt` takes that column as the field); for one tuned on conversations, the prompt `chat` makes of its
    `messages` (`chat_prompt`). With whether it is whole: written in a chat template, with its special tokens.

    Raises:
        MlflowException (INVALID_PARAMETER_VALUE, 400 when served): a request with none of these, or with two.
    """
    given = {k: v if k == "messages" and not isinstance(v, str) else str(v) for k, v in row.items()
             if v is not None and not (isinstance(v, float) and math.isnan(v))}  # fmt: skip
    fields = template_fields(template) if template else []
    filled = {k: v for k, v in given.items() if k in fields}
    raw = given.get("prompt") if "prompt" not in fields else None
    messages = given.get("messages") if chat else None
    if raw is not None and (filled or messages is not None):
        made = f"the template's fields ({', '.join(filled)})" if filled else "messages"
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"{which} has both a prompt and {made}; give one: the prompt as the model is to see it, or the "
            f"{'fields the template' if filled else 'messages the chat template'} makes it of")  # fmt: skip
    if filled:
        return filled_prompt(template, filled), False
    if messages is not None:
        return chat(messages, which), True
    if raw is None:
        said = (f"neither a prompt nor any of the template's fields ({', '.join(fields)})" if fields else
                "neither a prompt nor messages" if chat else "no prompt")  # fmt: skip
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"{which} has {said}; it gives {', '.join(map(str, given)) or 'nothing'}")
    return raw, False


def chat_prompt(tokenizer, value: str | dict | list, which: str, tools: list[dict] | None = None,
                options: dict | None = None) -> str:  # fmt: skip
    """The prompt a request's `messages` make in the model's chat template, with the header that opens the
    assistant's turn: a list of {"role", "content"} objects (system, user and assistant turns), as OpenAI's chat
    requests send it or as JSON text; one such object; or plain text, one user message. `tools` (OpenAI's function
    tools) go to the template as transformers passes them, for a template that writes them (one that does not
    leaves them out); so do `options`, variables the template reads (Qwen3's `enable_thinking`).

    Raises:
        MlflowException (INVALID_PARAMETER_VALUE): messages that are not such a list, or that the template refuses.
    """
    from edgar_tune.config import ConfigError
    from tasks.textdata import chat_messages, unwritten_tool_turn

    messages: Any = [{"role": "user", "content": value}]
    if not isinstance(value, str):
        messages = [value] if isinstance(value, dict) else [dict(t) if isinstance(t, dict) else t for t in value]
    elif value.lstrip().startswith("["):
        try:
            messages = json.loads(value)
        except json.JSONDecodeError as err:
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"{which}: messages is not valid JSON ({err.msg}); give a JSON list of {{\"role\", \"content\"}} "
                "objects, or plain text for one user message") from None  # fmt: skip
    # a tool call (an assistant's `tool_calls`) and its result (a `tool` turn), for a template that writes them
    if called := unwritten_tool_turn(messages, tokenizer):
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"{which}, turn {called}: a tool call or its result, which the model's chat template does not write (it "
            "has no `tool_calls`): send the conversation without tool turns")  # fmt: skip
    try:  # each turn checked as a training record's are
        messages = chat_messages({"messages": messages}, which, to_train=False)
    except ConfigError as err:
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(err)) from None
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **({"tools": tools} if tools else {}), **(options or {}))  # fmt: skip
    except TemplateError as err:  # the template's own refusal (Gemma's: no system role)
        raise mlflow.exceptions.MlflowException.invalid_parameter_value(
            f"{which}: the model's chat template refuses these messages: {err}") from None


def version_artifacts(local: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A downloaded version's artifacts (name -> local path: `weights`, and `base` where it carries its base) and
    its model config (`base_model`, `weights`: adapter or model, `base_revision` for a hub base whose commit its
    run recorded), from its MLmodel file."""
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    return {k: str(local / v["path"]) for k, v in flavor["artifacts"].items()}, flavor["config"]


DTYPES = ("float32", "bfloat16", "float16")


def placement(config: dict) -> tuple[str, Any]:
    """Where a loaded version generates, and in what dtype: `config`'s `device` and `dtype` (a load's model_config,
    `mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`), else $EDGAR_TUNE_SERVE_DEVICE and
    $EDGAR_TUNE_SERVE_DTYPE (for `mlflow models serve`), else auto: the GPU in bfloat16 where CUDA is (float16 on
    one without bfloat16), the CPU in float32 elsewhere. Every version before 2026-12-05 generated on the CPU in
    float32, a GPU beside it or not (a 7B one: 28 GB of weights, at the CPU's speed).

    Raises:
        ValueError: a device or dtype it does not know, or `cuda` where torch has no CUDA: never the CPU instead.
    """
    import torch

    device = config.get("device") or os.environ.get("EDGAR_TUNE_SERVE_DEVICE") or "auto"
    dtype = config.get("dtype") or os.environ.get("EDGAR_TUNE_SERVE_DTYPE") or "auto"
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"device {device!r}: give auto, cpu, cuda or cuda:N")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype {dtype!r}: give auto, {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}, and this torch ({torch.__version__}) sees no CUDA GPU: give cpu (or "
                         "auto), or serve where a GPU is")  # fmt: skip
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, getattr(torch, dtype)


def loaded_version(local: Path, **placed: str | None) -> EdgarTuneLM:
    """A version (its folder: MLmodel beside its artifacts) loaded with this checkout's `EdgarTuneLM`, not the
    copy of the code it was registered with: what it generates with, whenever it was registered; `placed`: its
    `device` and `dtype` where given (`placement`)."""
    from types import SimpleNamespace

    artifacts, config = version_artifacts(local)
    lm = EdgarTuneLM()
    lm.load_context(SimpleNamespace(artifacts=artifacts, model_config=config | {k: v for k, v in placed.items() if v}))
    return lm


def load_registered(artifacts: dict[str, str], config: dict[str, str], dtype=None):
    """A registered version's model from its artifacts' local paths and its model config: the base (carried, else
    by its `base_model` name, at its `base_revision` where its run recorded the hub commit) plus the adapter, or
    the full weights; in `dtype` (default float32)."""
    import torch

    from tasks.models import load_causal_lm, resolve_base_ref

    dtype = dtype or torch.float32
    if config["weights"] == "adapter":
        base = artifacts.get("base") or resolve_base_ref(config["base_model"], config.get("base_revision"))
        return load_causal_lm(base, adapter=artifacts["weights"], dtype=dtype)
    return load_causal_lm(artifacts["weights"], dtype=dtype)


# What the pyfunc imports when it loads and generates; pinned to the versions that trained and registered it.
SERVING_PACKAGES = ("torch", "transformers", "peft", "safetensors", "mlflow", "pyyaml", "pydantic", "llguidance")


def pip_requirements() -> list[str]:
    """`name==version` for each serving package as installed here, without local labels such as `+cpu`:
    a served copy loads the adapter with the transformers and peft it was saved with."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def _signature(template: str | None = None, chat: bool = False):
    """A `prompt` column in, generated text out, `GENERATION`'s settings as request parameters (also when served),
    OpenAI's `max_tokens` for `max_new_tokens`, its `stop` texts, and its `logit_bias` and `response_format` as JSON
    text; for a version instruction-tuned with the prompt `template`, its fields too, and for one tuned on
    conversations (`chat`), `messages` (any type: a list of turns, or text); each column then optional
    (`request_prompt`)."""
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    signature = infer_signature(pd.DataFrame({"prompt": ["This Form 10-K report shows that"]}), ["text"],
                                params=GENERATION)  # fmt: skip
    # OpenAI's name for max_new_tokens, which its clients send, unset unless given; its texts to stop at; and its
    # logit_bias and response_format, as JSON text (a signature's parameters hold no mapping)
    signature.params = ParamSchema([*signature.params.params, ParamSpec("max_tokens", "long", None),
                                    ParamSpec("stop", "string", [], shape=(-1,)),
                                    ParamSpec("logit_bias", "string", ""),
                                    ParamSpec("response_format", "string", ""),
                                    ParamSpec("stop_token_ids", "long", [], shape=(-1,))])  # fmt: skip
    if template or chat:
        columns = list(dict.fromkeys(["prompt", *(template_fields(template) if template else ["messages"])]))
        # `messages` as OpenAI's chat requests send it (a list of turns) or as text: a string column would have
        # MLflow write each turn of `{"inputs": {"messages": [...]}}` as the text of a Python dict
        signature.inputs = Schema([ColSpec(AnyType() if name == "messages" and chat else "string", name,
                                           required=False) for name in columns])  # fmt: skip
    return signature


def _plots(tmp: Path, losses: list[dict], before: dict, after: dict, val_losses: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, values = [r["step"] for r in losses], [r["loss"] for r in losses]
    ax.plot(steps, values, alpha=0.35, label="training loss (per step)")
    window = max(1, len(values) // 10)  # blocks differ a lot (tables vs prose): show the trend too
    smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
              for i in range(len(values))]  # fmt: skip
    ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    if val_losses:
        ax.plot([r["step"] for r in val_losses], [r["val_loss"] for r in val_losses], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(tmp / "loss_curve.png", dpi=110)
    plt.close(fig)

    kind, names, b, a = perplexity_groups(before, after)
    fig, ax = plt.subplots(figsize=(7.0 if kind == "spread" else max(7.0, 0.45 * len(names)), 4.5))
    unit = "perplexity on held-out MD&A" if kind != "text" else "perplexity on held-out text"
    if kind == "spread":  # too many companies for bars: how their perplexity changed, and overall
        change = [100 * (y / x - 1) for x, y in zip(b[:-1], a[:-1], strict=True)]
        spread = max(change) - min(change) > 1e-6  # equal changes: one bar (numpy cannot split a zero range)
        ax.hist(change, bins=min(40, max(10, len(change) // 5)) if spread else 1)
        ax.axvline(100 * (a[-1] / b[-1] - 1), color="black", linestyle="--",
                   label=f"overall: {b[-1]:.3f} -> {a[-1]:.3f} ({100 * (a[-1] / b[-1] - 1):+.1f}%)")  # fmt: skip
        ax.set_xlabel("change in perplexity by fine-tuning (%)")
        ax.set_ylabel("companies")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(f"Validation perplexity (Item 7, MD&A) of {len(change)} companies")
        ax.legend()
    else:
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], b, width=0.4, label="before fine-tuning")
        ax.bar([i + 0.2 for i in x], a, width=0.4, label="after fine-tuning")
        ax.set_xticks(list(x), names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
        ax.set_ylabel(unit)
        by = {"filings": "", "companies": ", by company", "text": ""}[kind]
        ax.set_title(("Validation perplexity (Item 7, MD&A)" if kind != "text" else "Validation perplexity") + by)
        ax.set_ylim(0, max(b + a) * 1.25)
        ax.legend(loc="upper center", ncols=2)
    fig.tight_layout()
    fig.savefig(tmp / "perplexity_before_after.png", dpi=110)
    plt.close(fig)
    return [tmp / "loss_curve.png", tmp / "perplexity_before_after.png"]


def data_plot(tmp: Path, report: dict) -> Path | None:
    """`data_by_item.png`: the tokens each Item adds over all filings, coloured by its set, with how many filings
    have it as text (the data report's table of Items, at a glance). None for users' own text, and for a report
    from before that table."""
    from tasks.datareport import ITEM_TITLES

    rows = [row for row in report.get("items", []) if row["tokens"]]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours, filings = {"train": "tab:blue", "val": "tab:orange"}, len(report["filings"])
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.3 * len(rows)))
    ax.barh(range(len(rows)), [row["tokens"] for row in rows], color=[colours[row["set"]] for row in rows])
    titles = [re.sub(r"; before [^,]+, ", " / ", ITEM_TITLES[row["item"]]) for row in rows]  # now / then
    names = [f"{row['item']}  {t if len(t) <= 40 else t[:39] + '…'}" for row, t in zip(rows, titles, strict=True)]
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()  # Item 1 on top
    for i, row in enumerate(rows):
        ax.annotate(f" {row['ok']}/{filings}", (row["tokens"], i), va="center", fontsize=7)
    totals = {s: sum(row["tokens"] for row in rows if row["set"] == s) for s in colours}
    ax.legend(handles=[Patch(color=colours[s], label=f"{s}: {totals[s]:,} tokens") for s in colours],
              loc="lower right")  # fmt: skip
    ax.set_xlabel("tokens (at each bar: the filings that have the Item as text, of all)")
    ax.set_title(f"Tokens per Item of Form 10-K, {filings} filing{'s' * (filings != 1)}")
    fig.tight_layout()
    fig.savefig(tmp / "data_by_item.png", dpi=110)
    plt.close(fig)
    return tmp / "data_by_item.png"


def perplexity_groups(before: dict, after: dict, most: int = 24) -> tuple[str, list[str], list[float], list[float]]:
    """What the before/after plot compares, "overall" last: (kind, names, perplexity before, after).

    kind "filings": a pair of bars per held-out MD&A (AMZN FY2021) while there are at most `most`; "companies": per
    company, over all its years (exp of its total NLL over its tokens) while there are at most `most`; "spread":
    per company too, for a histogram of the change; "text": users' own text, overall only."""
    overall = (["overall"], [before["perplexity"]], [after["perplexity"]])
    docs = list(zip(before["documents"], after["documents"], strict=True))
    if not docs or not all("ticker" in d for d, _ in docs):
        return ("text", *overall)
    if len(docs) <= most:
        names = [f"{d['ticker']} FY{d['fiscal_year']}" for d, _ in docs]
        return ("filings", names + overall[0], [d["perplexity"] for d, _ in docs] + overall[1],
                [d["perplexity"] for _, d in docs] + overall[2])  # fmt: skip
    totals: dict[str, list[float]] = {}  # ticker: [nll before, nll after, tokens]
    for d, e in docs:
        t = totals.setdefault(d["ticker"], [0.0, 0.0, 0])
        t[0], t[1], t[2] = t[0] + d["nll"], t[1] + e["nll"], t[2] + d["tokens"]
    names = sorted(totals)
    b = [math.exp(totals[n][0] / totals[n][2]) if totals[n][2] else float("nan") for n in names]
    a = [math.exp(totals[n][1] / totals[n][2]) if totals[n][2] else float("nan") for n in names]
    return ("companies" if len(names) <= most else "spread", names + overall[0], b + overall[1], a + overall[2])


def side_by_side(base: list[dict], tuned: list[dict]) -> dict[str, list]:
    """Columns for `mlflow.log_table`: prompt, sample, base model, fine-tuned model, and the answer held out
    (`reference`) for held-out examples."""
    keyed = {(r["prompt"], r["sample"]): r["text"] for r in tuned}
    columns = {
        "prompt": [r["prompt"] for r in base],
        "sample": [r["sample"] for r in base],
        "base_model": [r["text"] for r in base],
        "fine_tuned": [keyed.get((r["prompt"], r["sample"]), "") for r in base],
    }
    if any("reference" in r for r in base):
        columns["reference"] = [r.get("reference", "") for r in base]
    return columns


def per_document_table(before: dict, after: dict) -> dict[str, list]:
    """Columns for `mlflow.log_table`: each held-out document (a filing's MD&A, or a file's row), its tokens, and
    its perplexity before and after fine-tuning, to sort in the MLflow UI."""
    skip = {"tokens", "nll", "perplexity", "scored_tokens"}
    keys = [k for k in before["documents"][0] if k not in skip] if before["documents"] else []
    table: dict[str, list] = {k: [d.get(k) for d in before["documents"]] for k in keys}
    table["tokens"] = [d["tokens"] for d in before["documents"]]
    table["perplexity_before"] = [d["perplexity"] for d in before["documents"]]
    table["perplexity_after"] = [d["perplexity"] for d in after["documents"]]
    table["change_pct"] = [round(100 * (y / x - 1), 2) if x else None
                           for x, y in zip(table["perplexity_before"], table["perplexity_after"], strict=True)]  # fmt: skip
    return table


def _experiment_id(client, name: str, runs_root: Path, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (runs_root / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


def scoring(result: dict) -> str:
    """How a perplexity was scored, beside the validation text it was scored on: two scores compare only if both
    match (a longer window or a cap on the tokens scored changes the number)."""
    return f"window {result['max_length']}, stride {result['stride']}, {result['tokens']} tokens"


def promote(client, name: str, version: str, ppl: float, val_sha: str, how: str = "",
             rescore: Callable[[Any], tuple[float | None, str]] | None = None) -> dict:  # fmt: skip
    """Set `champion` on `version` if its perplexity is lower than the champion's on the same validation tokens,
    scored the same way (`how`); else `challenger`. Returns the alias and what was compared.

    A champion scored on other validation text (last year's MD&A, before a new 10-K came) is scored again on this
    run's by `rescore(champion_version) -> (perplexity or None, why)`; that score is kept as a tag of the champion
    version, so a retry does not score it twice. Without `rescore` such a version stays the challenger."""
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):  # a retried registration of the champion itself
        mine = client.get_model_version(name, version).tags.get(COMPARISON)
        return {"alias": CHAMPION, "compared": json.loads(mine) if mine else {"basis": "already the champion"}}
    if current is None:
        alias, compared = CHAMPION, {"basis": "no champion before"}
    else:
        score, basis = _champion_score(client, name, current, val_sha, how, rescore)
        compared = {"version": str(current.version), "perplexity": score, "basis": basis}
        alias = CHAMPION if score is not None and ppl < score else CHALLENGER
    client.set_model_version_tag(name, version, COMPARISON, json.dumps(compared))
    move_alias(client, name, alias, version)
    return {"alias": alias, "compared": compared}


MOVED = "edgar_tune.alias_moved"  # version tag: the alias edgar-tune gave it last, when, and the Prefect server told


def move_alias(client, name: str, alias: str, version: str) -> None:
    """Give `version` the alias, tagged as edgar-tune's move and the Prefect server its own event goes to (the
    registration's or the promotion's): `edgar-tune relay` leaves to that event the webhook MLflow sends for it."""
    from tasks.limits import prefect_api

    moved = {"alias": alias, "time": time.time(), "told": prefect_api()}
    client.set_model_version_tag(name, version, MOVED, json.dumps(moved))
    client.set_registered_model_alias(name, alias, version)


COMPARISON = "champion_comparison"  # version tag: the champion it was compared with, and on what
RESCORED = "rescored on this run's validation data"
CHAMPION_METRIC = "champion_ppl_on_this_val"  # the new run's metric: the champion's perplexity on its validation data


def _champion_score(client, name: str, current, val_sha: str, how: str,
                    rescore: Callable[[Any], tuple[float | None, str]] | None) -> tuple[float | None, str]:  # fmt: skip
    tags = current.tags
    if tags.get("val_sha256") == val_sha and tags.get("val_scoring", how) == how:
        return float(tags.get("val_perplexity", "inf")), "same validation data"
    key = rescored_key(val_sha, how)
    if key in tags:
        return float(tags[key]), RESCORED
    if rescore is None:
        return None, "it was scored on other validation data, and registry.rescore_champion is false"
    log.info("champion %s v%s was scored on other validation data; scoring it on this run's (%s)", name,
             current.version, how)  # fmt: skip
    score, why = rescore(current)
    if score is not None:
        client.set_model_version_tag(name, current.version, key, repr(score))
    return score, why


def rescored_key(val_sha: str, how: str) -> str:
    """The champion's tag that keeps its perplexity on other validation data (`val_sha`, scored `how`)."""
    return "val_perplexity." + hashlib.sha256(f"{val_sha}|{how}".encode()).hexdigest()[:16]


PROMOTED = "promoted_by_hand"  # version tag: who gave it an alias by hand, when, why, and which version had it


def versions(client, name: str) -> list[dict]:
    """Every version of registered model `name`, newest first: its aliases, its validation data (`validation`:
    sha256 and scoring) and its perplexities (`scores`: on its own validation data, and on others' where it was
    rescored as a champion), for side-by-side comparison.

    Raises:
        LookupError: no registered model `name` in the store.
    """
    model = registered_model(client, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in client.search_model_versions(f"name = '{name}'"):
        tags = v.tags
        rows.append({"version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                     "validation": {"sha256": tags.get("val_sha256"), "scoring": tags.get("val_scoring")},
                     "perplexity": float(tags["val_perplexity"]) if "val_perplexity" in tags else None,
                     "base_model": tags.get("base_model"), "base_revision": tags.get("base_revision"),
                     "filings": json.loads(tags.get("filings", "[]")),
                     "data_files": json.loads(tags.get("data_files", "[]")),
                     "run_id": v.run_id, "registered": v.creation_timestamp,
                     "promoted_by_hand": json.loads(tags.get(PROMOTED, "null")), "takes": takes(tags),
                     "tags": tags})  # fmt: skip
    rows.sort(key=lambda r: int(r["version"]), reverse=True)
    known = {(r["validation"]["sha256"], r["validation"]["scoring"]) for r in rows if r["validation"]["sha256"]}
    known = sorted(known, key=lambda k: (k[0], k[1] or ""))  # a version being registered may lack its scoring yet
    for row in rows:
        tags = row.pop("tags")
        row["scores"] = [{"sha256": sha, "scoring": how, "perplexity": float(tags[rescored_key(sha, how)]),
                          "rescored": True} for sha, how in known if rescored_key(sha, how) in tags]  # fmt: skip
        if row["perplexity"] is not None:
            row["scores"].insert(0, row["validation"] | {"perplexity": row["perplexity"], "rescored": False})
    return rows


def takes(tags: dict) -> list[str]:
    """What a version (its tags) is prompted with, loaded or served: `messages` for one tuned on conversations, its
    template's fields for one instruction-tuned (a written-out `prompt` also works), else a `prompt`."""
    if tags.get("chat") == "true":
        return ["messages"]
    if "prompt_template" in tags:
        return template_fields(json.loads(tags["prompt_template"])["prompt"])
    return ["prompt"]


def registered_model(client, name: str):
    """`name`'s registered model in `client`'s store.

    Raises:
        LookupError: there is none, naming the models the store has.
    """
    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        known = sorted(m.name for m in client.search_registered_models())
        raise LookupError(f"no registered model {name!r} (registry.model_name); this store has "
                          f"{', '.join(known) or 'none'}") from err  # fmt: skip


def resolve_version(client, name: str, version: str | None = None, alias: str | None = None) -> str:
    """The version of `name` that `version` (a number) or `alias` names, checked against the registry.

    Raises:
        LookupError: no such model, version or alias, naming those there are.
    """
    if alias is None:
        try:
            return str(client.get_model_version(name, str(version)).version)
        except mlflow.exceptions.MlflowException:
            registered_model(client, name)  # no such model, or no such version of it
            have = [str(v.version) for v in client.search_model_versions(f"name = '{name}'")]
            raise no_version(name, str(version), have) from None
    model = registered_model(client, name)
    if alias in model.aliases:
        return str(model.aliases[alias])
    held = [f"@{a} (v{v})" for a, v in sorted(model.aliases.items())]
    raise LookupError(f"{name} has no version @{alias}; its aliases are {joined(held) if held else 'none'} "
                      f"(`edgar-tune models --name {name}` lists its versions)")  # fmt: skip


def no_version(name: str, version: str, have: Iterable[str]) -> LookupError:
    """The error for a version of `name` that is not among those it has (`have`)."""
    return LookupError(f"{name} has no version {version}; it has {', '.join(sorted(have, key=int)) or 'none'} "
                       f"(`edgar-tune models --name {name}` lists them)")  # fmt: skip


def score_on(row: dict, validation: dict) -> float | None:
    """A version's perplexity (a row of `versions`) on `validation` ({sha256, scoring}), if known."""
    return next((s["perplexity"] for s in row["scores"]
                 if (s["sha256"], s["scoring"]) == (validation["sha256"], validation["scoring"])), None)  # fmt: skip


def promote_by_hand(client, name: str, version: str, alias: str = CHAMPION, reason: str = "", by: str = "") -> dict:
    """Give `version` ("3", or "v3" as `edgar-tune models` shows it) the alias `alias` (default champion), as a
    person decided: a rollback, or a challenger that did better on a check of one's own. The version is tagged with
    who (`by`, else this process's user), when, why and which version held the alias.
    A version promoted to champion loses the challenger alias. Returns {"version", "alias", "before", "note",
    "record"}: the note says when the version scored worse than the one it replaces on the same validation data;
    the record (the `promoted_by_hand` tag's) is None when the version held the alias already.

    Raises:
        LookupError: no such registered model or version.
        ConfigError: an alias MLflow refuses, or one that differs from the model's only in case (`check_alias`).
    """
    import getpass

    rows = {r["version"]: r for r in versions(client, name)}
    version = str(version)
    if version[:1] in ("v", "V") and version[1:].isdigit():  # as `edgar-tune models` shows it
        version = version[1:]
    if version not in rows:
        raise no_version(name, version, rows)
    check_alias(alias, {a for r in rows.values() for a in r["aliases"]})  # before the version's tag is written
    before = next((v for v, r in rows.items() if alias in r["aliases"]), None)
    note, record = promotion_note(rows, version, before), None
    if before != version:
        record = hand_record(alias, before, by or getpass.getuser(), reason)
        client.set_model_version_tag(name, version, PROMOTED, json.dumps(record))
        move_alias(client, name, alias, version)
    if alias == CHAMPION and CHALLENGER in rows[version]["aliases"]:
        client.delete_registered_model_alias(name, CHALLENGER)
    return {"version": version, "alias": alias, "before": before, "note": note, "record": record}


def check_alias(alias: str, held: set[str]) -> None:
    """Refuse an alias MLflow refuses (letters, digits, _ and - only; not `latest`, not a version's name as v3),
    which it did after `promote_by_hand` had tagged the version as promoted, in its traceback; and one that differs
    only in case from an alias the model holds (`held`) or from champion and challenger: MLflow's aliases are
    case-sensitive, and a `Champion` stood beside the champion that registrations decide by.

    Raises:
        ConfigError: saying which alias to give.
    """
    from edgar_tune.config import ConfigError

    if not re.fullmatch(r"[\w-]{1,255}", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ConfigError(f"--alias {alias!r}: an alias is letters, digits, _ and - (up to 255), and neither `latest` "
                          "nor a version's name such as v3")  # fmt: skip
    if twins := [a for a in sorted({CHAMPION, CHALLENGER} | held) if a.lower() == alias.lower() and a != alias]:
        raise ConfigError(f"--alias {alias!r}: aliases are case-sensitive, and the model's is `{twins[0]}`; give "
                          f"--alias {twins[0]}")  # fmt: skip


def hand_record(alias: str, before: str | None, by: str, reason: str) -> dict:
    """The `promoted_by_hand` tag's record: the alias, the version that held it, who, why, and when."""
    return {"alias": alias, "before": before, "by": by, "reason": reason,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


def promotion_note(rows: dict[str, dict], version: str, before: str | None) -> str:
    """A line when `version` scored worse than `before`, the version that held the alias, on before's validation
    data, or is prompted with other columns (`takes`: the alias's clients must send others); else "". `rows`:
    `versions` by version number."""
    if not before or before == version or version not in rows or before not in rows:
        return ""
    notes = []
    mine, theirs = score_on(rows[version], rows[before]["validation"]), rows[before]["perplexity"]
    if mine is not None and theirs is not None and mine > theirs:
        notes.append(f"v{version}'s perplexity {mine:.4f} is higher than v{before}'s {theirs:.4f} on v{before}'s "
                     "validation data")  # fmt: skip
    now, was = rows[version].get("takes"), rows[before].get("takes")
    if now and was and now != was:
        notes.append(f"v{version} is prompted with {', '.join(now)} where v{before} was with {', '.join(was)}: the "
                     "alias's clients must send those instead")  # fmt: skip
    return "; ".join(notes)


def promotion_lines(name: str, done: dict) -> list[str]:
    """What `promote_by_hand` did, as `edgar-tune promote` and the promote flow say it."""
    if done["before"] == done["version"]:
        lines = [f"{name} v{done['version']} is already @{done['alias']}"]
    else:
        lines = [f"{name} v{done['version']} is now @{done['alias']}"
                 + (f" (was v{done['before']})" if done["before"] else "")]  # fmt: skip
    return lines + ([f"note: {done['note']}"] if done["note"] else [])


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers turn text into the same ids: the same vocabulary and, for fast tokenizers, the same
    normalizer, pre-tokenizer and model (merges). Perplexities per token compare only then."""
    if a.get_vocab() != b.get_vocab():
        return False
    fast_a, fast_b = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    if fast_a is None or fast_b is None:
        return type(a) is type(b)
    ja, jb = json.loads(fast_a.to_str()), json.loads(fast_b.to_str())
    return all(ja.get(k) == jb.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens"))


def score_version(name: str, version: str, tokenize_dir: Path, eval_cfg: EvalConfig) -> tuple[float | None, str]:
    """Perplexity of registered version `version` on a run's validation blocks, scored as the run scored its own
    model (tasks.perplexity.evaluate_model, `eval_cfg`); None and why when its tokenizer is not the run's."""
    try:
        return _score_version(name, version, tokenize_dir, eval_cfg)
    except Exception as e:  # the new version is registered, without an alias, until this works or is switched off
        raise RuntimeError(
            f"could not score champion {name} v{version} on this run's validation data: {type(e).__name__}: {e}. "
            "Fix that and rerun the register stage, or set registry.rescore_champion=false to register this run's "
            "model as the challenger without comparing it"
        ) from e


def _score_version(name: str, version: str, tokenize_dir: Path, eval_cfg: EvalConfig) -> tuple[float | None, str]:
    from datasets import load_from_disk

    from tasks.models import base_model_path, load_tokenizer
    from tasks.perplexity import evaluate_model

    with registered_files(mlflow.MlflowClient(), name, version, "champion") as local:
        artifacts, config = version_artifacts(local)
        if not same_tokenizer(load_tokenizer(artifacts["weights"]), load_tokenizer(base_model_path(tokenize_dir))):
            return None, (f"its tokenizer (base {config['base_model']}) is not this run's, so their perplexities per "
                          "token are in different units")  # fmt: skip
        model = load_registered(artifacts, config)
    block_length = read_json(tokenize_dir / "stats.json")["block_length"]
    val = load_from_disk(str(tokenize_dir / "val"))
    result = evaluate_model(model, val, eval_cfg, block_length, f"champion v{version}")
    return result["perplexity"], RESCORED


def registered_version(client, uri: str) -> tuple[str, str] | None:
    """(name, version) of `models:/NAME/N` or `models:/NAME@ALIAS` (the alias read from `client`'s registry);
    None for any other model URI.

    Raises:
        LookupError: no such model, version or alias (`resolve_version`).
    """
    if not (m := re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([^/@]+))", uri)):
        return None
    name, version, alias = m.groups()
    return name, resolve_version(client, name, version, alias)


KEEP_DOWNLOADS = 2  # versions of a model kept downloaded: the champion, and the one before it (a rollback)


@contextmanager
def registered_files(client, name: str, version: str, what: str = "") -> Iterator[Path]:
    """The artifacts of version `version` of registered model `name` on `client`'s tracking server: downloaded
    once into $EDGAR_TUNE_CACHE/registry, then read from there. A full fine-tune's weights are GBs, and every
    rescoring of the champion (each run on new validation data) and every `edgar-tune generate` downloaded them
    again. The `with` block holds the model's lock shared: processes that read copies of the model's versions (an
    export merging the champion, a registration rescoring it) do so at once, and none evicts or half-downloads a
    copy meanwhile (a download and an eviction hold it alone). Afterwards, unless another process still reads, the
    newest `KEEP_DOWNLOADS` versions used stay and older copies go. A copy is known by its version's run and
    creation time too: a tracking store made again, whose v1 is another model, never reads the old store's v1.
    `what` names it in the log ("champion")."""
    mv = client.get_model_version(name, version)
    store = hashlib.sha256(f"{client.tracking_uri}\0{name}".encode()).hexdigest()[:12]
    home = cache_dir() / "registry" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{store}"
    made = hashlib.sha256(f"{mv.run_id}\0{mv.creation_timestamp}".encode()).hexdigest()[:8]
    local = home / f"v{version}-{made}"
    label = f"{what} {name} v{version}".strip()
    lock, info = home / ".lock", holder_info(reading=f"models:/{name}/{version}")
    fetched = False
    for _ in range(3):  # a copy evicted between the download and the shared lock (two more downloads) is fetched again
        with held(lock, info, wait=True, shared=True):
            if (local / "MLmodel").is_file():
                if not fetched:
                    log.info("%s: its copy downloaded before, %.1f MB in %s", label, megabytes(local), local)
                os.utime(local)  # the newest used
                yield local
                break
        with held(lock, info, wait=True):  # alone: no reader of any copy, no other download
            if not (local / "MLmodel").is_file():
                _download(client, name, version, local, label)
                fetched = True
            os.utime(local)
    else:
        raise RuntimeError(f"the download of {label} in {local} was removed three times before it could be read: "
                           f"other processes download this model's versions faster than {KEEP_DOWNLOADS} are kept")
    try:
        with held(lock, info):  # alone, or not at all: whoever reads now cleans up after
            for half in home.glob(".*.tmp"):  # a download killed half-way (its lock went with its process)
                shutil.rmtree(half, ignore_errors=True)
            for old in sorted((p for p in home.iterdir() if p.is_dir() and not p.name.startswith(".")),
                              key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_DOWNLOADS:]:  # fmt: skip
                shutil.rmtree(old, ignore_errors=True)
                log.info("removed the download of %s %s (the newest %d are kept)", name, old.name.split("-")[0],
                         KEEP_DOWNLOADS)  # fmt: skip
    except Busy:
        pass


def _download(client, name: str, version: str, local: Path, label: str) -> None:
    """Download the version's artifacts into `local`, whole or not at all (the caller holds the model's lock)."""
    start = time.monotonic()
    source = client.get_model_version_download_uri(name, version)  # where this client's registry keeps it
    with tempfile.TemporaryDirectory(dir=local.parent, prefix=".", suffix=".tmp", ignore_cleanup_errors=True) as tmp:
        got = mlflow.artifacts.download_artifacts(source, dst_path=tmp, tracking_uri=client.tracking_uri)
        shutil.rmtree(local, ignore_errors=True)  # a copy without its MLmodel: not one this wrote
        os.replace(got, local)  # whole, or not there
    log.info("downloaded %s (%.1f MB) in %s into %s", label, megabytes(local), clock(time.monotonic() - start), local)


RUN_KEY = "edgar_tune.run_key"


def run_key(run_dir: Path) -> str:
    """What identifies one registration: the run (`run_identity`, which a moved folder keeps) and the training that
    published its weights (the train stage's stats.json is written once per training, so a retrained stage gets a
    new key)."""
    stats = (run_dir / TRAIN / "stats.json").read_bytes()
    return hashlib.sha256(run_identity(run_dir).encode() + b"\0" + stats).hexdigest()


def _registered_before(client, exp_id: str, name: str, key: str) -> tuple[str, str] | None:
    """(run id, version) of an earlier registration of the same weights, e.g. by a retried task."""
    for run in client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY}` = '{key}'"):
        for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
            if version.name == name:
                return run.info.run_id, str(version.version)
    return None


def register_run(run_dir: Path, runs_root: Path, cfg: PipelineConfig, flow_run_id: str | None) -> dict:
    """Log params, metrics, plots and the data report; register the model; set its alias.

    Idempotent: a retry that finds a version registered from the same run and weights (the run key tag)
    returns that version instead of creating a second one.
    """
    uri = tracking_uri(cfg.registry.tracking_uri, runs_root)
    with one_writer(uri, run_dir), tracking_at(uri):
        return _register(run_dir, cfg, flow_run_id, runs_root, uri)


def run_name(preset: str, run_dir: Path) -> str:
    """The MLflow run's name: the preset and the run folder's name (`demo-latest`)."""
    return f"{preset}-{run_dir.name}"


TRAINING_TAG = "edgar_tune.training"  # on the MLflow run that the train stage opened for its curves
FOLDER_TAG = "edgar_tune.run_folder"  # on it too: the run folder it trained in (tasks.storage.folder_identity)
PRUNED_TAG = "edgar_tune.pruned"  # on it, where a sweep's rule stopped the training: why (tasks/pruning.py)
Metrics = Callable[[list[Point]], None]


@contextmanager
def live_training_run(run_dir: Path, registry: RegisterConfig, preset: str,
                      flow_run_id: str | None) -> Iterator[tuple[str | None, Metrics | None]]:  # fmt: skip
    """The MLflow run that the train stage opens for training's curves as they come (`train_loss`, `val_loss`,
    `learning_rate`, `tokens_per_s` by step), so that the MLflow UI draws a run that is still training, or one that
    crashed. Yields (run id, a function that logs metrics). The run ends FINISHED or FAILED with the training
    (KILLED, tagged `edgar_tune.pruned`, where a sweep's rule pruned it: tasks/pruning.py); the register stage then
    logs the rest into it (`_continued_run`).

    MLflow out of reach does not stop training: it yields (None, None) after a warning, and the curves are logged
    at registration instead; one that stops answering later holds the points until it is back (`LiveMetrics`)."""
    uri = tracking_uri(registry.tracking_uri, run_dir.parent)
    try:
        answers(uri)
        with store_made(uri, run_dir):
            client = mlflow.MlflowClient(uri)
            exp_id = _experiment_id(client, registry.experiment, run_dir.parent, uri)
        folder = folder_identity(run_dir)
        published = run_dir / TRAIN / "stats.json"  # the training this one replaces, if it finished
        _end_stale_trainings(client, exp_id, folder, read_json(published).get("mlflow_run_id") if published.exists()
                             else None)  # fmt: skip
        run_id = client.create_run(exp_id, run_name=run_name(preset, run_dir), tags={TRAINING_TAG: "true",
                                   FOLDER_TAG: folder, "prefect_flow_run_id": str(flow_run_id)}).info.run_id  # fmt: skip
    except Exception as err:  # noqa: BLE001 (hours of training do not wait on a tracking server)
        log.warning("MLflow at %s opened no run for training's curves (%s: %s); they are logged at registration",
                    uri, type(err).__name__, err)  # fmt: skip
        yield None, None
        return
    log.info("training's curves go to MLflow as they come: run %s of experiment %r at %s", run_id,
             registry.experiment, uri)  # fmt: skip
    sender = LiveMetrics(client, run_id, uri)
    status = "FAILED"
    try:
        yield run_id, sender
        status = "FINISHED"
    except PointPruned as err:  # stopped by a sweep's rule: not a failure; the tag says why
        status = "KILLED"
        with suppress(Exception):
            client.set_tag(run_id, PRUNED_TAG, describe(err.decision))
        raise
    finally:
        if sender.close():  # else the registration, if it can, ends the run (a call now would wait on retries)
            try:
                client.set_terminated(run_id, status)
            except Exception as err:  # noqa: BLE001
                log.warning("MLflow run %s could not be marked %s (%s: %s)", run_id, status, type(err).__name__,
                            err)  # fmt: skip


def _end_stale_trainings(client, exp_id: str, folder: str, finished: str | None) -> None:
    """End the runs of this run folder's trainings (`folder`) that MLflow still shows RUNNING: their
    process died without ending them (a SIGKILL, a machine gone), or the tracking server was down when they ended.
    One training works in a folder at a time (the folder's lock), so a new one in it means they are over. They end
    FAILED, except `finished`, the run of the training whose weights the folder holds, which ends FINISHED."""
    stale = client.search_runs([exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{TRAINING_TAG}` = "
                               "'true'", max_results=1000)  # fmt: skip
    for run in stale:
        if run.data.tags.get(FOLDER_TAG) == folder:
            status = "FINISHED" if run.info.run_id == finished else "FAILED"
            client.set_terminated(run.info.run_id, status)
            log.info("MLflow run %s (an earlier training in this folder) still showed RUNNING; its process ended "
                     "without ending it, so it is marked %s", run.info.run_id, status)  # fmt: skip


class LiveMetrics:
    """Sends metric points to an MLflow run from a thread of its own, so that a tracking server that is slow or
    gone never holds up the caller (the progress lines of training). A server that stops answering is asked again
    every `retry_s` with a quick probe, and the points held meanwhile go when it is back: a restarted server keeps
    its curves whole. Call it with points (key, value, step, unix time); `close` sends what is left."""

    def __init__(self, client, run_id: str, uri: str, retry_s: float = 30.0) -> None:
        self.client, self.run_id, self.uri, self.retry_s = client, run_id, uri, retry_s
        self.pending: list[Point] = []
        self.lock, self.wake, self.stop = threading.Lock(), threading.Event(), threading.Event()
        self.down_since: float | None = None  # the time the server stopped taking points
        # In a copy of the caller's context: its lines reach the Prefect run's log, as the caller's do
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,), name="mlflow-metrics",
                                       daemon=True)  # fmt: skip
        self.thread.start()

    def __call__(self, rows: list[Point]) -> None:
        with self.lock:
            self.pending.extend(rows)
        self.wake.set()

    def close(self, timeout: float = 30.0) -> bool:
        """Send what is held (waiting `timeout` s at most); whether the server took every point."""
        self.stop.set()
        self.wake.set()
        self.thread.join(timeout)
        with self.lock:
            left = len(self.pending)
        if left or self.thread.is_alive():
            log.warning("MLflow at %s did not take the last %d point(s) of training's curves; the register stage "
                        "logs the points it lacks", self.uri, left)  # fmt: skip
            return False
        return True

    def _run(self) -> None:
        while True:
            self.wake.wait(self.retry_s if self.down_since else None)
            self.wake.clear()
            stopping = self.stop.is_set()
            if self._send() and stopping or stopping and self.down_since:
                return

    def _send(self) -> bool:
        """Send what is pending; whether all of it went."""
        with self.lock:
            rows, self.pending = self.pending, []
        sending = bool(rows)
        try:
            if sending:
                answers(self.uri, timeout=5)  # a server gone: a quick no, not MLflow's four minutes of retries
            log_points(self.client, self.run_id, rows)
        except Exception as err:  # noqa: BLE001 (training goes on; the points wait for the server)
            with self.lock:
                self.pending[:0] = rows
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("MLflow at %s took no points of training's curves (%s: %s); holding them, and asking "
                            "again every %.0f s", self.uri, type(err).__name__, err, self.retry_s)  # fmt: skip
            return False
        if self.down_since is not None and sending:  # only points sent say that the server is back
            log.info("MLflow at %s takes training's curves again, after %s; the points held meanwhile are sent",
                     self.uri, clock(time.monotonic() - self.down_since))  # fmt: skip
            self.down_since = None
        return True


def log_points(client, run_id: str, points: list[Point]) -> None:
    """Log curve points to an MLflow run, at their own times, in MLflow's batches of 1000 (one request each, where
    a point at a time is one request per point). Sent points leave `points`: when a batch fails, it holds the
    rest."""
    from mlflow.entities import Metric

    while points:
        batch = points[:1000]
        client.log_batch(run_id, metrics=[Metric(k, float(v), int(t * 1000), int(step)) for k, v, step, t in batch])
        del points[: len(batch)]


@contextmanager
def store_made(uri: str, run_dir: Path) -> Iterator[None]:
    """A sqlite store made and migrated by one process at a time, and inside, what is done first with it (its
    experiment made): a lock file of its own beside the database, held for as long as that takes (under a second),
    never for a registration's length. MLflow makes a new database's tables, then migrates them, on the first call
    of each process; two processes at once both migrated and left it broken for good (`table _alembic_tmp_experiments
    already exists` on every later call: two points of a sweep, spread over a pool, training at once into a new
    store, 2026-12-06). Before, the lock was taken only where the database file was not there yet, and the second
    process found the file the first had just made, and migrated beside it."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    with held(db.with_name(db.name + ".init.lock"), holder_info(run=str(run_dir)), wait=True):
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)  # the tracking store's tables, made or migrated now
        client.search_registered_models(max_results=1)  # the registry's (a store of its own)
        yield


def _sqlite_lock(uri: str, run_dir: Path):
    """The lock file beside a sqlite store, waited for."""
    db = sqlite_file(uri)
    return held(db.with_name(db.name + ".lock"), holder_info(run=str(run_dir)), wait=True)


def _continued_run(client, run_id: str | None, exp_id: str) -> str | None:
    """The train stage's MLflow run, when the registration can log into it: it is in this store and experiment
    (the tracking URI may have changed since), and no version was registered from it (the same training registered
    again from a copy of its run folder gets a run of its own)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    if run.info.experiment_id != exp_id or TRAINING_TAG not in run.data.tags:
        return None
    return None if client.search_model_versions(f"run_id = '{run_id}'") else run_id


REGISTRY_WAIT_S = 3600  # a registration waits this long for the one before it into the same tracking server


@contextmanager
def one_writer(uri: str, run_dir: Path) -> Iterator[None]:
    """Registrations into one store, one at a time. Two registering at once would both read the same champion
    (and rescore it, for minutes on a large model) before either moves the alias, and the later one could take
    `champion` from a better version. Into a new sqlite store, two processes at once both ran its migrations and
    one failed (`duplicate column name`).

    A sqlite store: a lock file beside the database. Another store (a tracking server), wherever a Prefect server
    is configured (PREFECT_API_URL: flow runs on workers, `edgar-tune promote`, `edgar-tune stage register`): the one
    slot of a Prefect global concurrency limit named after the URI, which every worker shares. Without one, a lock
    file in the cache: this host's registrations take turns. Each waits for the one before it (`REGISTRY_WAIT_S` at
    most for a Prefect slot)."""
    if sqlite_file(uri) is not None:
        with _sqlite_lock(uri, run_dir):
            with store_made(uri, run_dir):  # a training starting at once into a new store makes it after, not beside
                pass
            yield
        return
    from tasks.limits import in_prefect_run, shared_server, slot, slot_name

    name = slot_name("edgar-tune-registry", uri)
    if not shared_server():  # an embedded Prefect server's slot would stay taken after a kill (tasks.limits)
        lock = cache_dir() / "locks" / f"{name}.lock"
        say = log.info if in_prefect_run() else log.warning
        say("no Prefect server is configured (PREFECT_API_URL), so registrations into %s from other hosts, which may "
            "be deciding the champion now, are not waited for; this host's take turns through %s. Set PREFECT_API_URL "
            "to the server the registrations run on to take turns with them", uri, lock)  # fmt: skip
        with held(lock, holder_info(run=str(run_dir)), wait=True):
            yield
        return
    log.info("writing to the registry at %s: taking the Prefect global concurrency limit %s", uri, name)
    with ExitStack() as stack:
        try:
            stack.enter_context(slot(name, wait_s=REGISTRY_WAIT_S))
        except TimeoutError as err:
            raise RuntimeError(f"waited {REGISTRY_WAIT_S} s for another registration into {uri} to end (it holds "
                               f"the Prefect global concurrency limit {name}); try again once it has, or free its "
                               "slot in the UI (Concurrency -> Global) if it is gone") from err  # fmt: skip
        yield


@contextmanager
def tracking_at(uri: str) -> Iterator[None]:
    """MLflow's fluent API on `uri`, then as it was. `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI,
    which `tracking_uri` reads as the user's choice: left set, the next run in this process (a notebook's, a test's)
    would register into this run's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets it again


def _register(run_dir: Path, cfg: PipelineConfig, flow_run_id: str | None, runs_root: Path, uri: str) -> dict:
    client = mlflow.MlflowClient(uri)
    report = read_json(run_dir / PARSE / "report.json")
    tok_stats = read_json(run_dir / TOKENIZE / "stats.json")
    train_stats = read_json(run_dir / TRAIN / "stats.json")
    before = read_json(run_dir / EVALUATE / "base.json")
    after = read_json(run_dir / EVALUATE / "finetuned.json")
    losses = read_jsonl(run_dir / TRAIN / "loss.jsonl")
    filings = [{k: f[k] for k in ("ticker", "form", "fiscal_year", "accession")} for f in report.get("filings", [])]
    # a text run's own files, for `edgar-tune models` to name
    data_files = [] if filings else data_locations(read_json(run_dir / DOWNLOAD / "manifest.json"))
    exp_id = _experiment_id(client, cfg.registry.experiment, runs_root, uri)
    weights_dir = run_dir / TRAIN / train_stats["weights"]
    base_ref, base_revision = cfg.model.name, tok_stats["base_model"].get("revision")
    artifacts = {"weights": str(weights_dir)}
    if tok_stats["base_model"]["kind"] == "run_local" and train_stats["weights"] == "adapter":
        artifacts["base"] = str(run_dir / TOKENIZE / tok_stats["base_model"]["path"])
    key = run_key(run_dir)
    template = report.get("prompt_template", {}).get("prompt")  # an instruction-tuned run's: served from its fields
    chat = bool(report.get("chat"))  # a run on conversations: served from messages, in the model's chat template
    # data_sha256 covers the training and the validation text; val_sha256 alone is what the promotion gate compares.
    data_sha = hashlib.sha256(f"{report['train_sha256']}:{report['val_sha256']}".encode()).hexdigest()
    tags = {"base_model": base_ref, **({"base_revision": base_revision} if base_revision else {}),
            "data_sha256": data_sha, "train_sha256": report["train_sha256"],
            "val_sha256": report["val_sha256"],
            "git_commit": git_commit(), "filings": json.dumps(filings),
            **({"data_files": json.dumps(data_files)} if data_files else {}),
            **({"prompt_template": json.dumps(report["prompt_template"])} if "prompt_template" in report else {}),
            **({"chat": "true"} if chat else {}),
            "val_perplexity": repr(after["perplexity"]), "val_scoring": scoring(after),
            "prefect_flow_run_id": str(flow_run_id), RUN_KEY: key}  # fmt: skip
    name = cfg.registry.model_name
    rescore = None
    if cfg.registry.rescore_champion:
        rescore = lambda champion: score_version(name, str(champion.version), run_dir / TOKENIZE, cfg.eval)  # noqa: E731
    earlier = _registered_before(client, exp_id, name, key)
    if earlier is not None:
        run_id, version = earlier
        log.info("already registered as %s version %s (run %s); not registering again", name, version, run_id)
        return _finish(client, name, version, tags, after, uri, run_id, rescore, again=True)
    continued = _continued_run(client, train_stats.get("mlflow_run_id"), exp_id)
    logged = {k: {m.step for m in client.get_metric_history(continued, k)} if continued else set() for k in CURVES}
    with mlflow.start_run(run_id=continued, experiment_id=exp_id, run_name=run_name(cfg.preset, run_dir)) as run:
        mlflow.set_tags({k: v for k, v in tags.items() if k != "val_perplexity"} | {"mlflow.source.git.commit": tags["git_commit"]})
        mlflow.log_params({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in flat_params(cfg).items()})
        fitted = train_stats.get("memory_plan", {}).get("fit")
        if fitted:  # what train.memory_fit chose, beside what the run asked for
            keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "recomputed_layers", "planned_gb",
                    "budget_gb")  # fmt: skip
            mlflow.log_params({f"memory_fit.{k}": fitted[k] for k in keys})
        if train_stats.get("trainable_tokens"):  # what train.trainable_tokens (auto, say) trained in this run
            mlflow.log_param("trainable_tokens.trained", json.dumps(train_stats["trainable_tokens"]))
        mlflow.log_metrics({"ppl_before": before["perplexity"], "ppl_after": after["perplexity"],
                            "train_tokens": tok_stats["train_tokens"], "val_tokens": after["tokens"],
                            "train_seconds": train_stats["seconds"]})  # fmt: skip
        # The curves' points the train stage's run lacks: all (a tracking server that was not there), those it
        # never took (one down at the end), or the steps before a resumed training's.
        log_points(client, run.info.run_id, [p for p in training_points(run_dir / TRAIN) if p[2] not in logged[p[0]]])
        val_file = run_dir / TRAIN / "val_loss.jsonl"
        val_losses = read_jsonl(val_file) if val_file.exists() else []
        data_report = read_json(run_dir / TOKENIZE / "data_report.json")
        with tempfile.TemporaryDirectory() as tmp:
            for png in [*_plots(Path(tmp), losses, before, after, val_losses), data_plot(Path(tmp), data_report)]:
                if png is not None:
                    mlflow.log_artifact(str(png), artifact_path="plots")
        mlflow.log_dict(data_report, "data/report.json")
        mlflow.log_text((run_dir / TOKENIZE / "data_report.md").read_text(), "data/report.md")
        mlflow.log_dict({"before": before, "after": after}, "eval/perplexity.json")
        if (run_dir / TRAIN / "profile").is_dir():  # train.profile_step's trace and summary
            mlflow.log_artifacts(str(run_dir / TRAIN / "profile"), artifact_path="profile")
        mlflow.log_table(per_document_table(before, after), artifact_file="eval/per_document.json")
        samples = [run_dir / EVALUATE / f"{n}.samples.json" for n in ("base", "finetuned")]
        if all(p.exists() for p in samples):
            base_rows, tuned_rows = (read_json(p)["rows"] for p in samples)
            mlflow.log_table(side_by_side(base_rows, tuned_rows), artifact_file="eval/generations.json")
        upload_mb, start = megabytes(*map(Path, artifacts.values())), time.monotonic()
        what = {"adapter": "LoRA adapter", "model": "full weights"}[train_stats["weights"]]
        log.info("uploading the model (%s%s and tokenizer, %.1f MB) to the artifact store of MLflow run %s", what,
                 " with its base" if "base" in artifacts else "", upload_mb, run.info.run_id)  # fmt: skip
        with warnings.catch_warnings(), unfinished_uploads_removed(client, exp_id, run.info.run_id, key):
            # an input example would make MLflow load the model and generate with it now, at every run
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),  # logged as source: loading a version unpickles nothing
                artifacts=artifacts,
                model_config={"base_model": base_ref, "weights": train_stats["weights"],
                              **({"base_revision": base_revision} if base_revision else {}),
                              **({"prompt_template": template} if template else {}),
                              **({"chat": True} if chat else {})},
                code_paths=[str(REPO_ROOT / "tasks"), str(REPO_ROOT / "edgar_tune")],
                pip_requirements=pip_requirements(),
                registered_model_name=cfg.registry.model_name,
                signature=_signature(template, chat),
            )
        version = str(info.registered_model_version)
        log.info("uploaded and registered it as %s v%s in %s", name, version, clock(time.monotonic() - start))
    return _finish(client, name, version, tags, after, uri, run.info.run_id, rescore)


@contextmanager
def unfinished_uploads_removed(client, exp_id: str, run_id: str, key: str) -> Iterator[None]:
    """Around the model's upload into MLflow run `run_id`: remove the logged models whose upload did not finish,
    before it, in that run and in the others that registrations of the same run folder and weights opened (`key`,
    the RUN_KEY tag: a registration killed while it uploaded, whose retry may log into a run of its own), and in that
    run when it raises. Their files may be a model's weights (GBs, and on a disk that has just filled, which the
    retry needs that room on), and the runs' Models tab would list them, FAILED or PENDING, beside the one that
    worked. Registrations into one store take turns (`one_writer`), so no other upload is under way there."""
    earlier = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY}` = '{key}'")
    for run in dict.fromkeys([run_id] + [r.info.run_id for r in earlier]):
        _remove_unfinished(client, exp_id, run)
    try:
        yield
    except Exception:
        _remove_unfinished(client, exp_id, run_id)
        raise


def _remove_unfinished(client, exp_id: str, run_id: str) -> None:
    """Delete the FAILED and PENDING logged models of `run_id`: their files, then their entries. Where the store
    refuses (unreachable, read-only), say what is left, and where, rather than fail over it."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        models = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'")
    except Exception as err:  # noqa: BLE001 (the error that brought us here is the one to raise)
        log.warning("could not look for unfinished model uploads in MLflow run %s: %s", run_id, err)
        return
    for model in models:
        if model.status not in (LoggedModelStatus.FAILED, LoggedModelStatus.PENDING):
            continue
        try:
            repo = get_artifact_repository(model.artifact_location)
            held = _artifact_bytes(repo)
            repo.delete_artifacts()
        except Exception as err:  # noqa: BLE001
            log.warning("could not remove the unfinished upload of logged model %s (%s) at %s: %s; delete it "
                        "there", model.model_id, model.status, model.artifact_location, err)  # fmt: skip
            continue
        try:
            client.delete_logged_model(model.model_id)
        except Exception as err:  # noqa: BLE001
            log.warning("removed the files of an unfinished upload of the model (logged model %s, %s), but not its "
                        "entry in MLflow run %s: %s", model.model_id, size(held), run_id, err)  # fmt: skip
            continue
        log.warning("removed an unfinished upload of the model from MLflow run %s: logged model %s (%s, %s)", run_id,
                    model.model_id, model.status, size(held))  # fmt: skip


def _artifact_bytes(repo, path: str | None = None) -> int:
    """What the files under `path` of an artifact repository take."""
    return sum(_artifact_bytes(repo, f.path) if f.is_dir else f.file_size or 0 for f in repo.list_artifacts(path))


def _against(compared: dict) -> str:
    """The registration's log line's words for `promote`'s comparison (its dict is the summary's and the tag's)."""
    if "version" not in compared:
        return compared["basis"]  # no champion before; already the champion
    if compared["perplexity"] is None:
        return f"champion v{compared['version']} not compared: {compared['basis']}"
    return f"champion v{compared['version']}'s {compared['perplexity']:.4f}, {compared['basis']}"


def _finish(client, name: str, version: str, tags: dict, after: dict, uri: str, run_id: str, rescore,
            again: bool = False) -> dict:  # fmt: skip
    """Tag the version, give it its alias against the champion, and say so (`again`: registered before)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    promoted = promote(client, name, version, after["perplexity"], tags["val_sha256"], tags["val_scoring"], rescore)
    compared = promoted["compared"]
    if compared.get("perplexity") is not None and CHAMPION_METRIC not in client.get_run(run_id).data.metrics:
        client.log_metric(run_id, CHAMPION_METRIC, compared["perplexity"])  # once: a retry finds it logged
    said = f"{name} v{version} is" if again else f"registered {name} v{version} as"
    log.info("%s %s (perplexity %.4f; %s)", said, promoted["alias"], after["perplexity"], _against(compared))
    return {"tracking_uri": uri, "registered_model": name, "model_version": version, "model_alias": promoted["alias"],
            "champion_comparison": compared, "mlflow_run_id": run_id, "model_uri": f"models:/{name}/{version}"}  # fmt: skip
