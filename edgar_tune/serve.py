"""`edgar-tune serve`: a version behind OpenAI's API, for the clients that speak it (the `openai` SDK, LangChain's
ChatOpenAI, chat UIs): `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

MLflow's own server (`mlflow models serve`) answers `/invocations` with a list of texts, which is what MLflow's AI
Gateway reads; OpenAI's clients send to other paths and read `choices`, `usage` and `finish_reason`. This one
generates with `EdgarTuneLM.complete`, as the version's `predict` does: the same prompts, stops and checks.

Where OpenAI's API and `generate` differ, a request means what it would mean to OpenAI: `temperature` 0 is greedy
(top_p and top_k then change nothing), above 0 samples over the whole vocabulary unless `top_p` or `top_k` narrow
it; left out, greedy (OpenAI's default samples at 1.0: here the same request gives the same answer). `stream`
sends the answer as OpenAI's server-sent events, piece by piece as it is generated. A field this server does not
do (`logprobs`, `tools`, penalties, ...) is refused with a 400 that says so, never dropped; so is a field OpenAI
does not know.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

if TYPE_CHECKING:
    from tasks.batching import Answer

log = logging.getLogger(__name__)

# Request fields read, by endpoint; `top_k` is not OpenAI's, and vLLM's and others' servers take it too.
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "user", "stream",
          "stream_options"}
CHAT = COMMON | {"messages", "max_completion_tokens"}
COMPLETIONS = COMMON | {"prompt"}
# What this server does not do, each with the values that ask for nothing (an SDK may send them as they are).
NOT_DONE = {
    "logprobs": (None, False), "top_logprobs": (None, 0),
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,), "service_tier": (None, "auto"),
    "store": (None, False), "metadata": (None, {}),
}  # fmt: skip
WHY_NOT = {"tools": "the version was not tuned to call tools", "store": "answers are not stored",
           "metadata": "it goes with store, and answers are not stored"}


class Refused(Exception):
    """A request's mistake: answered with OpenAI's error object and `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def check_fields(body: Any, read: set[str], endpoint: str) -> None:
    """Refuses a body that is not an object, a field this server does not do (set to more than nothing), and a
    field OpenAI's `endpoint` does not have (OpenAI's own answer to one: "Unrecognized request argument")."""
    if not isinstance(body, dict):
        raise Refused(f"the request body is {type(body).__name__}, not a JSON object of {endpoint}'s fields")
    for name, value in body.items():
        if name in NOT_DONE and value not in NOT_DONE[name]:
            why = WHY_NOT.get(name, "this server does not do it")
            raise Refused(f"{name}={json.dumps(value)[:60]} is not served: {why}; leave it out", param=name)
        if name not in read and name not in NOT_DONE:
            raise Refused(f"unrecognized request argument supplied: {name} ({endpoint} takes "
                          f"{', '.join(sorted(read))})", param=name)  # fmt: skip


def request_settings(body: dict, default_max_new_tokens: int) -> tuple[dict, int]:
    """The `generation_settings` of a request, from OpenAI's fields as OpenAI means them, and its `n`.

    Raises:
        Refused: a value out of its range, `max_tokens` and `max_completion_tokens` that differ, `n` above 1
            with greedy decoding (n copies of one answer).
    """
    import mlflow

    from tasks.registry import generation_settings

    given = {k: body.get(k) for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    if len(set(map(str, given.values()))) > 1:
        raise Refused(f"max_tokens={given['max_tokens']} and max_completion_tokens={given['max_completion_tokens']} "
                      "are two names for the tokens to generate: give one", param="max_tokens")  # fmt: skip
    temperature, top_p, top_k = body.get("temperature"), body.get("top_p"), body.get("top_k")
    sampled = temperature != 0 and (temperature is not None or top_p is not None or top_k is not None)
    n = 1 if body.get("n") is None else body["n"]
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise Refused(f"n must be a whole number of at least 1, got {n!r}", param="n")
    if n > 1 and not sampled:
        raise Refused(f"n={n} answers of greedy decoding (temperature 0 or left out) are one answer {n} times: set "
                      "temperature above 0 to sample them", param="n")  # fmt: skip
    if body.get("stream") not in (None, True, False):
        raise Refused(f"stream must be true or false, got {json.dumps(body['stream'])[:40]}", param="stream")
    options = body.get("stream_options")
    if options is not None and (not body.get("stream") or not isinstance(options, dict) or set(options) - {
            "include_usage"} or not isinstance(options.get("include_usage", False), bool)):  # fmt: skip
        raise Refused(f"stream_options={json.dumps(options)[:60]}: it is {{\"include_usage\": true}} (or false), "
                      "with \"stream\": true", param="stream_options")  # fmt: skip
    stop = body.get("stop")
    params = {"max_new_tokens": next(iter(given.values()), default_max_new_tokens), "do_sample": sampled,
              "seed": body.get("seed") if body.get("seed") is not None else 0,
              "stop": [] if stop is None else stop}  # fmt: skip
    if sampled:  # OpenAI samples over the whole vocabulary unless top_p (or top_k) narrows it
        params |= {"temperature": 1.0 if temperature is None else temperature,
                   "top_p": 1.0 if top_p is None else top_p, "top_k": 0 if top_k is None else top_k}  # fmt: skip
    try:
        return generation_settings(params), n
    except mlflow.exceptions.MlflowException as err:
        raise Refused(err.message) from None


def chat_turns(messages: Any) -> list[dict]:
    """OpenAI's `messages` as {"role", "content"} turns `chat_prompt` takes: a content given as parts
    ([{"type": "text", "text": ...}]) joined, the `developer` role (OpenAI's newer name for it) as system.

    Raises:
        Refused: no list of messages, a part that is not text (an image)."""
    if not isinstance(messages, list) or not messages:
        raise Refused("messages must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    turns = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            turns.append(message)  # chat_prompt says what is wrong with it
            continue
        content = message.get("content")
        if isinstance(content, list):
            kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
            if any(kind != "text" for kind in kinds):
                raise Refused(f"message {i} has a part of type {next(k for k in kinds if k != 'text')}; the "
                              "version reads text only", param="messages")  # fmt: skip
            content = "".join(p.get("text", "") for p in content)
        role = "system" if message.get("role") == "developer" else message.get("role")
        turns.append({"role": role, "content": content})
    return turns


@dataclass(frozen=True)
class Served:
    """A loaded version: its model (`EdgarTuneLM`), its number in the registry (None for a folder or a run's
    model), and where a chat answer ends in its tokenizer's chat template."""

    lm: Any
    version: str | None
    chat_end: str | None

    @classmethod
    def of(cls, lm, version: str | None) -> Served:
        from tasks.generate import turn_end

        return cls(lm, version, turn_end(lm.tokenizer))


class Model:
    """One model a server serves: its id in requests (`name`), the URI it was given, and the version it serves
    now (`served`).

    Serving an alias (`models:/NAME@champion`), `follow` (a function returning the version the alias points at,
    and one loading a version) is asked every `every` seconds until `stopped` is set; when the alias has moved,
    the version it points at is loaded beside the one served, then served from the next request on (one being
    answered finishes on the version it began with). Each answer names the version that gave it
    (`system_fingerprint`)."""

    def __init__(self, name: str, uri: str, served: Served,
                 follow: tuple[Callable[[], str], Callable[[str], Any]] | None = None, every: float = 60,
                 stopped: threading.Event | None = None) -> None:  # fmt: skip
        self.name, self.uri, self.served = name, uri, served
        if follow and every > 0:
            threading.Thread(target=self._follow, args=(*follow, every, stopped or threading.Event()),
                             name=f"follow {uri}", daemon=True).start()  # fmt: skip

    def _follow(self, points_at: Callable[[], str], load: Callable[[str], Any], every: float,
                stopped: threading.Event) -> None:  # fmt: skip
        while not stopped.wait(every):
            try:
                version = points_at()
                if version == self.served.version:
                    continue
                start = time.monotonic()
                log.info("%s now points at v%s (serving v%s): loading it", self.uri, version, self.served.version)
                served, before = Served.of(load(version), version), self.served.version
                self.served = served
                log.info("serving %s v%s (was v%s), loaded in %.1f s", self.name, version, before,
                         time.monotonic() - start)  # fmt: skip
            except Exception:  # noqa: BLE001 (the tracking server down, a download failed: asked again next time)
                log.exception("could not follow %s; still serving v%s, asking again in %g s", self.uri,
                              self.served.version, every)  # fmt: skip


class Engine:
    """Generates every request's answers, one batch at a time (one generation at once, whichever model: torch
    uses every core, or the GPU, for one). An answer that comes while a batch of its version runs joins it at
    the next token (`Generation.join`: its prompt read, its cache set beside the others'), up to `max_batch`
    answers and `max_tokens` (`fit`); one of another version waits for the batch to end, and none joins past it
    (first come, first served). A request is answered as soon as its own answers end, the others going on."""

    def __init__(self, max_batch: int, max_tokens: int) -> None:
        self.max_batch, self.max_tokens = max_batch, max_tokens
        self.waiting: deque[tuple[Any, Answer]] = deque()
        self.more, self.halted, self.idle = threading.Condition(), threading.Event(), threading.Event()
        threading.Thread(target=self._loop, name="generate", daemon=True).start()

    def stop(self) -> None:
        """Ends every answer being generated at its next token, and every one waiting at once (a server stopping:
        the requests they answer have had their time)."""
        with self.more:
            self.halted.set()
            waiting, self.waiting = list(self.waiting), deque()
        for _, a in waiting:
            a.error = RuntimeError("the server is stopping")
            a.ended(a)
        self.idle.wait(60)  # the batch being generated ends at its next token (torch torn down mid-step aborts)

    def run(self, lm, asked: list[Answer]) -> None:
        """Generates `asked` with `lm` (a loaded version), beside what else waits; returns once each has ended, or
        raises what generating it raised."""
        if not asked:
            return
        left, done, lock = [len(asked)], threading.Event(), threading.Lock()

        def ended(_: Answer) -> None:
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

        for a in asked:
            a.ended = ended
        with self.more:
            if self.halted.is_set():
                raise RuntimeError("the server is stopping")
            self.waiting.extend((lm, a) for a in asked)
            self.more.notify()
        done.wait()
        if failed := next((a.error for a in asked if a.error is not None), None):
            raise failed

    def _loop(self) -> None:
        lm, batch = None, None
        while True:
            with self.more:
                while batch is None and not self.waiting:
                    self.idle.set()
                    self.more.wait()
                self.idle.clear()
                lm = lm if batch is not None else self.waiting[0][0]
                joining, going = [], batch.asked if batch else []
                while self.waiting and self.waiting[0][0] is lm and self._room([*going, *joining]):
                    joining.append(self.waiting.popleft()[1])
            start, rows = time.monotonic(), (len(batch.asked) if batch else 0) + len(joining)
            try:
                if joining:
                    batch = lm.join(batch, joining)
                went = [len(a.tokens) for a in batch.asked]
                asked = batch.asked
                batch = lm.advance(batch, self._joinable(lm) if lm.joins_midway else None, self.halted)
            except Exception as err:  # noqa: BLE001 (each request waiting on it raises it)
                for a in [*(batch.asked if batch else []), *joining]:
                    if a.choice is None and a.error is None:
                        a.error = err
                        a.ended(a)
                batch = None
                continue
            if rows > 1:
                made = sum(len(a.tokens) - n for a, n in zip(asked, went, strict=True))
                seconds = time.monotonic() - start
                log.info("%d answers together%s: %d tokens in %.2f s (%.1f tokens/s)", rows,
                         f" ({len(joining)} joining)" if joining and rows > len(joining) else "", made, seconds,
                         made / max(seconds, 1e-9))  # fmt: skip

    def _joinable(self, lm) -> Callable[[list[Answer]], bool]:
        """`advance`'s pause: an answer of `lm`'s is next in line, and there is room for it."""
        return lambda going: bool(self.waiting) and self.waiting[0][0] is lm and self._room(going)

    def _room(self, going: list[Answer]) -> bool:
        """Whether the answer next in line fits beside `going`: fewer than `max_batch`, and within `max_tokens`."""
        from tasks.batching import fit

        return len(going) < self.max_batch and fit([*going, self.waiting[0][1]], self.max_tokens)


class Server:
    """The models served (`Model`: a champion and a challenger, say, each named by its request's `model`) and what
    their requests are answered with: generated by `engine`, which batches the answers of requests that come
    together."""

    def __init__(self, models: list[Model], default_max_new_tokens: int, max_batch: int | None = None,
                 max_batch_tokens: int | None = None) -> None:  # fmt: skip
        from tasks.batching import BATCH, BATCH_TOKENS

        self.models, self.default_max_new_tokens = models, default_max_new_tokens
        self.created = int(time.time())
        self.engine = Engine(max_batch or BATCH, max_batch_tokens or BATCH_TOKENS)

    def pick(self, body: dict) -> Model:
        """The model a request names (by its id or the URI it was served from); the one served, unnamed."""
        asked = body.get("model")
        ids = ", ".join(f"`{m.name}`" for m in self.models)
        if asked is None:
            if len(self.models) == 1:
                return self.models[0]
            raise Refused(f"name the model to answer with: this server serves {ids}", param="model")
        for model in self.models:
            if asked in (model.name, model.uri):
                return model
        served = f"`{self.models[0].name}` ({self.models[0].uri})" if len(self.models) == 1 else ids
        raise Refused(f"the model `{asked}` does not exist: this server serves {served}", status=404, param="model",
                      code="model_not_found")  # fmt: skip

    def chat(self, body: Any) -> dict | Iterator[str]:
        from tasks.registry import chat_prompt

        check_fields(body, CHAT, "/v1/chat/completions")
        model = self.pick(body)
        served = model.served  # the version this request is answered by, whatever the alias does meanwhile
        lm = served.lm
        if lm.template:
            raise Refused(f"{model.name} was instruction-tuned with a prompt template (fields: "
                          f"{', '.join(_fields(lm.template))}), not on conversations: send the prompt its "
                          "template makes to /v1/completions", param="messages")  # fmt: skip
        if not getattr(lm.tokenizer, "chat_template", None):
            raise Refused(f"{model.name}'s tokenizer has no chat template to write messages in: send a prompt to "
                          "/v1/completions", param="messages")  # fmt: skip
        settings, n = request_settings(body, self.default_max_new_tokens)
        prompt = _said(lambda: chat_prompt(lm.tokenizer, chat_turns(body.get("messages")), "messages"))
        if body.get("stream"):
            return self._stream(model, served, body, "chatcmpl", "chat.completion.chunk", [(prompt, True)], settings,
                                n, served.chat_end)  # fmt: skip
        done = self._complete(model, served, [(prompt, True)], settings, n, served.chat_end)
        choices = [{"index": k, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                    "finish_reason": c["finish_reason"]} for k, c in enumerate(done[0]["choices"])]  # fmt: skip
        return self._answer(model, served, "chatcmpl", "chat.completion", choices, done)

    def completions(self, body: Any) -> dict | Iterator[str]:
        check_fields(body, COMPLETIONS, "/v1/completions")
        model = self.pick(body)
        served = model.served
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
            raise Refused(f"prompt must be text or a list of texts, got {json.dumps(prompt)[:60]} (token ids are not "
                          "taken)", param="prompt")  # fmt: skip
        settings, n = request_settings(body, self.default_max_new_tokens)
        if body.get("stream"):
            return self._stream(model, served, body, "cmpl", "text_completion", [(p, False) for p in prompts],
                                settings, n, served.lm.closing)  # fmt: skip
        done = self._complete(model, served, [(p, False) for p in prompts], settings, n, served.lm.closing)
        choices = [{"index": i * n + k, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
                   for i, d in enumerate(done) for k, c in enumerate(d["choices"])]  # fmt: skip
        return self._answer(model, served, "cmpl", "text_completion", choices, done)

    def listed(self) -> dict:
        """OpenAI's list of models: each served, with the version it serves now."""
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": self.created,
                                            "owned_by": "edgar-tune", "root": m.uri,
                                            **({"version": m.served.version} if m.served.version else {})}
                                           for m in self.models]}  # fmt: skip

    def _complete(self, model: Model, served: Served, prompts: list[tuple[str, bool]], settings: dict, n: int,
                  closing: str | None) -> list[dict]:  # fmt: skip
        start = time.monotonic()
        done = _said(lambda: served.lm.complete(prompts, settings, n, closing=closing,
                                                run=lambda asked: self.engine.run(served.lm, asked)))
        self._generated(model, served, done, time.monotonic() - start,
                        " (cut: the server is stopping)" if self.engine.halted.is_set() else "")
        return done

    def _generated(self, model: Model, served: Served, done: list[dict], seconds: float, how: str = "") -> None:
        """A line in the server's log per request: what it cost, for whoever sizes the machine."""
        usage = self._usage(done)
        ends = sorted({c["finish_reason"] for d in done for c in d["choices"]})
        log.info("%s%s: %d prompt and %d generated tokens in %.2f s (%.1f tokens/s), %d answer(s) ending at %s%s",
                 model.name, f" v{served.version}" if served.version else "", usage["prompt_tokens"],
                 usage["completion_tokens"], seconds, usage["completion_tokens"] / max(seconds, 1e-9),
                 sum(len(d["choices"]) for d in done), "/".join(ends), how)  # fmt: skip

    def _stream(self, model: Model, served: Served, body: dict, prefix: str, kind: str, prompts: list[tuple[str, bool]],
                settings: dict, n: int, closing: str | None) -> Iterator[str]:
        """OpenAI's server-sent events of the answers, as they are generated: a chunk per piece of text (a chat
        answer's first says its role), one with each answer's finish_reason, then, where `stream_options` asks
        for it, one with the usage, and `[DONE]`. The prompts are checked against the context before the response
        starts (a 400, not an error inside a 200). The client gone, generation stops at the next token."""
        _said(lambda: served.lm.encode(prompts, settings["max_new_tokens"]))
        chat, usage = kind.startswith("chat"), bool((body.get("stream_options") or {}).get("include_usage"))
        ident, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        heard, cancelled = queue.Queue(), threading.Event()

        def work() -> None:
            try:
                start = time.monotonic()
                done = served.lm.complete(prompts, settings, n, closing=closing, cancelled=cancelled,
                                          heard=lambda *said: heard.put(said),
                                          run=lambda asked: self.engine.run(served.lm, asked))  # fmt: skip
                self._generated(model, served, done, time.monotonic() - start,
                                ", streamed" + (" (the client left: stopped early)" if cancelled.is_set() else ""))
                heard.put(("done", done))
            except Exception as err:  # noqa: BLE001 (said in the log, and the stream ends)
                log.exception("generation failed")
                heard.put(("failed", err))

        def event(choices: list[dict], **more) -> str:
            return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": model.name,
                                          "system_fingerprint": _fingerprint(served), "choices": choices,
                                          **more}) + "\n\n"  # fmt: skip

        def events() -> Iterator[str]:
            threading.Thread(target=work, name="generate", daemon=True).start()
            started = set()
            try:
                while True:
                    said = heard.get()
                    if said[0] == "done":
                        break
                    if said[0] == "failed":
                        yield "data: " + json.dumps({"error": {"message": f"generation failed: {said[1]}",
                                                               "type": "server_error"}}) + "\n\n"  # fmt: skip
                        return
                    i, k, text, choice = said
                    index = i * n + k
                    if chat and index not in started:
                        started.add(index)
                        yield event([{"index": index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])  # fmt: skip
                    if choice is None:
                        part = {"content": text} if chat else {"text": text}
                        yield event([{"index": index, **({"delta": part} if chat else part), "logprobs": None,
                                      "finish_reason": None}])  # fmt: skip
                    else:
                        end = {"delta": {}} if chat else {"text": ""}
                        yield event([{"index": index, **end, "logprobs": None,
                                      "finish_reason": choice["finish_reason"]}])  # fmt: skip
                if usage:
                    done = said[1]
                    yield event([], usage=self._usage(done))
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()

        return events()

    def _usage(self, done: list[dict]) -> dict:
        prompt_tokens = sum(d["prompt_tokens"] for d in done)
        completion_tokens = sum(c["completion_tokens"] for d in done for c in d["choices"])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    def _answer(self, model: Model, served: Served, prefix: str, kind: str, choices: list[dict],
                done: list[dict]) -> dict:  # fmt: skip
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model.name,
                "system_fingerprint": _fingerprint(served), "choices": choices, "usage": self._usage(done)}


def _fingerprint(served: Served) -> str | None:
    """OpenAI's name for what changes its answers behind one model name: here, the version (`v3`)."""
    return f"v{served.version}" if served.version else None


def _fields(template: str) -> list[str]:
    from tasks.textdata import template_fields

    return template_fields(template)


def _said(make):
    """`make()`, an MlflowException it raises for the request's mistake (a prompt past the context, messages the
    chat template refuses) as Refused."""
    import mlflow

    try:
        return make()
    except mlflow.exceptions.MlflowException as err:
        raise Refused(err.message) from None


def app(server: Server, api_key: str | None = None):
    """The FastAPI app of `server`: OpenAI's three paths, its errors as OpenAI writes them; with `api_key`, a
    request to them without it (`Authorization: Bearer KEY`, as OpenAI's clients send their key) is a 401."""
    import hmac

    api = FastAPI(title=f"edgar-tune: {', '.join(m.name for m in server.models)}")

    @api.middleware("http")
    async def keyed(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                said = "no API key given" if not given else "the API key given is not this server's"
                return JSONResponse({"error": {"message": f"{said}: send the key `edgar-tune serve` was started with "
                                               "(EDGAR_TUNE_API_KEY) as `Authorization: Bearer KEY`, the openai "
                                               "client's api_key", "type": "invalid_request_error", "param": None,
                                               "code": "invalid_api_key"}}, status_code=401)  # fmt: skip
        return await call_next(request)

    @api.exception_handler(Refused)
    async def refused(_: Request, err: Refused) -> JSONResponse:
        kind = "invalid_request_error"
        return JSONResponse({"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}},
                            status_code=err.status)  # fmt: skip

    async def body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError as err:
            raise Refused(f"the request body is not JSON: {err}") from None

    def answered(said: dict | Iterator[str]):
        return said if isinstance(said, dict) else StreamingResponse(said, media_type="text/event-stream")

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        return answered(await run_in_threadpool(server.chat, await body(request)))

    @api.post("/v1/completions")
    async def completions(request: Request):
        return answered(await run_in_threadpool(server.completions, await body(request)))

    @api.get("/v1/models")
    async def models() -> dict:
        return server.listed()

    @api.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def elsewhere(request: Request, path: str):  # OpenAI's newer /v1/responses, /v1/embeddings, ...
        raise Refused(f"{request.method} /v1/{path} is not served: this server answers POST /v1/chat/completions, "
                      "POST /v1/completions and GET /v1/models", status=404, code="not_found")  # fmt: skip

    @api.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": [m.name for m in server.models]}

    return api
