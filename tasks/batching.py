"""Generating answers together: a batch of prompts of one model, each answer with its own settings, seed, length
and ends, handed on as it ends while the others go on, and answers joining a batch between two of its tokens.

`EdgarTuneLM` (a registered version: `predict`, `edgar-tune serve`) and the evaluate stage's generation samples
generate through `Generation`, so what a version is shown to say in MLflow is what it says served.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Answers generated together at most (`Generation.generate_batches`), where the caller does not batch them itself,
# and the tokens of a batch at most (its answers times the longest's prompt and max_new_tokens): what the model
# keeps of them grows with it (a 7B model without grouped keys and values: 0.5 MB a token, 4.3 GB at 8,192).
BATCH, BATCH_TOKENS = 8, 8192
# The likeliest tokens an answer's `logprobs` may ask for at each place (vLLM's default bound; OpenAI's is 20 for
# chat and 5 for completions).
TOP_LOGPROBS = 20
# The prompt tokens whose keys and values a server keeps for later prompts that begin with them (`Prefixes`): a
# 7B model without grouped keys and values keeps 0.5 MB a token, 2.1 GB at 4,096.
PREFIX_TOKENS = 4096


@dataclass(frozen=True)
class Scored:
    """A token's log probability under the model where it stands (None for a prompt's first), and the likeliest
    tokens' there, most likely first (as many as the answer's `logprobs` asks; the token itself may be among them)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Answer:
    """One answer to generate: its prompt's token ids (`encode`), its request's `settings`, the `seed` it draws
    from, the `closing` it ends at besides EOS and `stop`, who hears it (`heard(text, None)` piece by piece, then
    `heard(None, choice)`; `ended(answer)`), and what stops it early (`cancelled`). Once it has ended, its
    `choice` (OpenAI's: `text`, `completion_tokens`, `finish_reason`), or the `error` generating it raised.

    With `logprobs` (a count, 0 to `TOP_LOGPROBS`), each token generated is `scored` as it is taken: its log
    probability under the model (the raw distribution, before temperature, top-k and top-p shape a draw from it)
    and the `logprobs` likeliest tokens' (`Scored`); with `echo` too, the prompt's tokens are (`prompt_scored`,
    the first token, which nothing precedes, without one). An answer of `max_new_tokens` 0 is its prompt scored."""

    ids: Any
    settings: dict
    seed: int
    closing: str | None
    heard: Callable[[str | None, dict | None], None] | None = None
    cancelled: threading.Event | None = None
    ended: Callable[[Answer], None] | None = None
    choice: dict | None = None
    error: BaseException | None = None
    tokens: list[int] = field(default_factory=list)  # generated so far
    sent: int = 0  # characters of its text `heard` has heard
    generator: Any = None  # what it samples from, seeded at its first sampled token
    logprobs: int | None = None
    echo: bool = False
    scored: list[Scored] = field(default_factory=list)  # a token generated's each, as it is taken
    prompt_scored: list[Scored] | None = None
    unsent: int = 0  # of `scored`, the first not yet handed on (`fresh`)
    text: str = ""  # its tokens' text so far, decoded a token at a time (`Generation.said`)
    decoded: int = 0  # of `tokens`, those `text` holds
    stream: Any = None  # the decoder that made `text` (tokenizers' DecodeStream); False: decoded whole
    halted: bool = False  # ended by the generation's `halt` (a server stopping), not by one of its own ends
    matcher: Any = None  # where its `response_format`'s grammar stands (`Generation.matcher`), from call to call

    def fresh(self) -> list[Scored]:
        """What of `scored` has not been handed on yet: a streamed answer's pieces carry their tokens' scores."""
        new, self.unsent = self.scored[self.unsent :], len(self.scored)
        return new

    @staticmethod
    def seed_of(seed: int, prompt: int, answer: int) -> int:
        """Answer `answer` of prompt `prompt`'s seed: the first's is `seed` plus the prompt's place, as one-at-a-time
        generation seeded it; the others' a hash of the three, within the 32 bits torch's CPU generator reads."""
        if answer == 0:
            return seed + prompt
        return int.from_bytes(hashlib.sha256(f"{seed}/{prompt}/{answer}".encode()).digest()[:4], "big")


class Generation:
    """Generating with `self.model` and `self.tokenizer`, answers together (a mixin: `EdgarTuneLM` is one, and
    `Generating` holds a model and tokenizer at hand)."""

    model: Any
    tokenizer: Any
    prefixes: Prefixes | None = None  # what was read of recent prompts, for those that begin as they did

    def said(self, a: Answer) -> str:
        """`a`'s text so far, as `tokenizer.decode(a.tokens, skip_special_tokens=True)` has it, less a last character
        whose bytes are not all in yet. A streamed answer, or one with `stop` texts, is read each step: decoded
        whole each time, a 4,096-token answer of SmolLM2's took 0.9 ms a step at its end, 29 ms for 32 such rows,
        a step's worth of a GPU's work. So it is decoded a token at a time, as it comes (tokenizers' DecodeStream),
        where that gives what decoding it whole does (`streams`); `ended` checks it did."""
        tok = self.tokenizer
        if a.stream is None:
            from tokenizers.decoders import DecodeStream

            a.stream = DecodeStream(skip_special_tokens=True) if streams(tok) else False
        if a.stream is False:
            return tok.decode(a.tokens, skip_special_tokens=True)
        backend = tok.backend_tokenizer
        for token in a.tokens[a.decoded :]:
            if piece := a.stream.step(backend, token):
                a.text += piece
        a.decoded = len(a.tokens)
        return a.text

    def ended(self, a: Answer) -> str:
        """`a`'s whole text, decoded whole, once it has ended. Where it was decoded a token at a time and the two
        differ (a tokenizer's decoder that `streams` does not know), a streamed answer's pieces were not its text:
        said once, and this tokenizer's later answers are decoded whole."""
        said = self.tokenizer.decode(a.tokens, skip_special_tokens=True)
        if a.stream and not said.startswith(a.text):
            import logging

            logging.getLogger(__name__).warning(
                "decoding a token at a time gave %r where decoding the answer whole gives %r (%s): its streamed "
                "pieces may differ from its text; this tokenizer's answers are decoded whole from now on, please "
                "report it", a.text[-40:], said[: len(a.text)][-40:], type(self.tokenizer).__name__)  # fmt: skip
            self.tokenizer.decoded_whole = True
        return said

    def generate_batches(self, asked: list[Answer], batch: int | None = None) -> None:
        """Generates `asked`, up to `batch` (`BATCH`) that `fit` at a time, those of like prompt length together
        (less padding)."""
        batch, taken = batch or BATCH, []
        for a in sorted(asked, key=lambda a: a.ids["input_ids"].shape[1]):
            if taken and (len(taken) == batch or not fit([*taken, a])):
                self.generate_batch(taken)
                taken = []
            taken.append(a)
        if taken:
            self.generate_batch(taken)

    def generate_batch(self, asked: list[Answer]) -> None:
        """Generates each of `asked` (prompts of one model) together until each has ended: the prompts left-padded
        (`join`), each answer sampled or chosen greedily by its own settings, ending by its own max_new_tokens, EOS,
        turn end and `stop` texts, and handed on (`Answer.heard`, `Answer.ended`) as it ends while the others go on
        (`advance`). Greedy answers are those one-at-a-time generation gives, up to float rounding, which can
        differ between batch shapes where two tokens are almost tied."""
        batch = self.join(None, asked)
        while batch is not None:
            batch = self.advance(batch)

    @property
    def vocabulary(self) -> int:
        """The tokens the model scores at each place (its output layer's width; a token id is below it)."""
        head = self.model.get_output_embeddings()
        return head.weight.shape[0] if head is not None else self.model.config.vocab_size

    def matcher(self, a: Answer):
        """llguidance's matcher of `a`'s `response_format` (`grammar`), its tokens so far taken (made once, kept on
        the answer from one `generate` call to the next): the tokens it allows next, each step. Over this
        tokenizer, read once (`llguidance.hf.from_tokenizer`, 0.3 s for SmolLM2's 49,152 tokens)."""
        if a.matcher is None:
            import llguidance

            a.matcher = llguidance.LLMatcher(self.grammar_tokens, grammar(a.settings["response_format"]))
            for token in a.tokens:
                a.matcher.consume_token(token)
            if a.matcher.is_error():
                raise ValueError(f"response_format's grammar: {a.matcher.get_error()}")
        return a.matcher

    @property
    def grammar_tokens(self):
        """This tokenizer as llguidance reads it, over the model's vocabulary (made once).

        Raises:
            ValueError: a tokenizer llguidance cannot read (not tokenizers-backed)."""
        if getattr(self, "_grammar_tokens", None) is None:
            self._grammar_tokens = grammar_tokenizer(self.tokenizer, self.vocabulary)
        return self._grammar_tokens

    @property
    def joins_midway(self) -> bool:
        """Whether answers can join a batch between two of its tokens (`join`): the model's cache is plain key and
        value tensors, row by row, that can be cut and set side by side (a sliding-window or recurrent layer's
        cannot: its answers join between batches)."""
        if getattr(self, "_joins", None) is None:
            from transformers import DynamicCache

            implementation = getattr(self.model.generation_config, "cache_implementation", None)
            self._joins = implementation in (None, "dynamic") and _plain(DynamicCache(config=self.model.config))
        return self._joins

    def join(self, batch: Batch | None, asked: list[Answer]) -> Batch:
        """`batch` (None: a new one) with `asked` added, each row's tokens so far right-aligned. A new answer's
        prompt is read on its own, all but its last token (which the next step reads with the other rows' last
        tokens), and what the model made of it set beside the batch's cache, both left-padded to one length; where
        the batch has no cache, `advance` reads every row whole. A prompt to be scored (`Answer.echo`) is scored from
        what reading it gave, and a new batch with one such is read so from the start: one pass over each prompt
        (lm-evaluation-harness's requests, scored and one token generated), not a pass to score it and another to
        generate."""
        import torch

        for a in (scored := [a for a in asked if a.settings["max_new_tokens"] == 0]):
            if _echoed(a) and self.joins_midway and a.ids["input_ids"].shape[1] > 1:
                self._read(a, None)  # what it shares with a prompt kept taken, and it kept in turn
            elif _echoed(a):
                a.prompt_scored = self.score(a.ids["input_ids"], a.logprobs)
            a.choice = {"text": "", "completion_tokens": 0, "finish_reason": "length"}
            if a.heard:
                a.heard(None, a.choice)
            if a.ended:
                a.ended(a)
        asked = [a for a in asked if a not in scored]
        old = batch.asked if batch is not None else []
        if not old and not asked:
            return Batch([], None, None)
        seqs = [batch.ids[r][batch.mask[r].bool()] for r in range(len(old))] if batch is not None else []
        seqs += [a.ids["input_ids"][0] for a in asked]
        width = max(len(s) for s in seqs)
        cached = batch is not None and batch.cache is not None
        cache = batch.cache if batch is not None and not asked else None
        if asked and (cached or batch is None and self.joins_midway
                      and all(a.ids["input_ids"].shape[1] > 1 for a in asked)
                      and any(_echoed(a) or self.prefixes and self.prefixes.find(a) for a in asked)):  # fmt: skip
            read = [[(layer.keys, layer.values) for layer in batch.cache.layers]] if cached else []
            read += [self._read(a, batch.cache if cached else None) for a in asked]
            width = max(width, batch.ids.shape[1]) if cached else width
            cache = _cache([(torch.cat([_left(layers[i][0], width - 1) for layers in read]),
                             torch.cat([_left(layers[i][1], width - 1) for layers in read]))
                            for i in range(len(read[0]))])  # fmt: skip
        else:
            for a in filter(_echoed, asked):
                a.prompt_scored = self.score(a.ids["input_ids"], a.logprobs)
        ids = torch.full((len(seqs), width), self._pad, dtype=torch.long, device=self.model.device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.model.device)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq) :], mask[row, width - len(seq) :] = seq, 1
        return Batch([*old, *asked], ids, mask, cache)

    def advance(self, batch: Batch, pause: Callable[[list[Answer]], bool] | None = None,
                halt: threading.Event | None = None) -> Batch | None:  # fmt: skip
        """Generates `batch` until each of its answers has ended, or `pause(going)` (asked after each token, with
        the answers still going) says to stop: the answers still going then, with what the model has read of them
        (their all-padding columns cut), to go on with or `join`; None once every answer has ended. Once `halt` is
        set (a server stopping), every answer ends at its next token."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if not batch.asked:
            return None
        rows = _Rows(self, batch.asked, self._eos, pause, halt)
        left = max(a.settings["max_new_tokens"] - len(a.tokens) for a in batch.asked)
        # each row's ends are its own (`_Rows`); generate's own EOS would end a row that ignores it (vLLM's
        # ignore_eos), so it is left out where one does
        unended = {"eos_token_id": None} if any(a.settings.get("ignore_eos") for a in batch.asked) else {}
        with torch.no_grad():
            out = self.model.generate(input_ids=batch.ids, attention_mask=batch.mask, past_key_values=batch.cache,
                                      do_sample=False, pad_token_id=self._pad, max_new_tokens=left, **unended,
                                      logits_processor=LogitsProcessorList([rows.pick]),
                                      stopping_criteria=StoppingCriteriaList([rows]),
                                      return_dict_in_generate=True)  # fmt: skip
        going = [row for row, done in enumerate(rows.done) if not done]
        if not rows.paused:
            rows.close()
            return None
        steps = out.sequences.shape[1] - batch.ids.shape[1]
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.asked), steps))], dim=1)[going]
        first = int(mask.any(dim=0).nonzero()[0])  # columns before it are padding in every row still going
        cache = out.past_key_values
        if _plain(cache):
            cache = _cache([(layer.keys[going][:, :, first:], layer.values[going][:, :, first:])
                            for layer in cache.layers])  # fmt: skip
        else:  # not to be cut: read again whole
            self._joins, cache = False, None
        return Batch([batch.asked[r] for r in going], out.sequences[going][:, first:], mask[:, first:], cache)

    @property
    def _eos(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @property
    def _pad(self) -> int:
        return next((t for t in (self.tokenizer.pad_token_id, *self._eos) if t is not None), 0)

    def _read(self, a: Answer, like) -> list[tuple]:
        """What the model makes of `a`'s prompt but its last token, layer by layer: keys and values (shaped as the
        cache `like`'s, of no columns for a one-token prompt); its prompt scored from the same pass, where asked.
        Where a prompt read lately began as this one does (`prefixes`), what was read of the tokens they share is
        taken, and only the rest read."""
        import inspect

        import torch
        from transformers import DynamicCache

        ids = a.ids["input_ids"]
        if ids.shape[1] == 1:
            a.prompt_scored = [Scored(int(ids[0, 0]), None)] if _echoed(a) else None
            return [(layer.keys[:1, :, :0], layer.values[:1, :, :0]) for layer in like.layers]
        last = {} if _echoed(a) or "logits_to_keep" not in inspect.signature(self.model.forward).parameters else {
            "logits_to_keep": 1}  # what is not scored needs no place's logits
        start, cache, before = 0, DynamicCache(config=self.model.config), []
        if self.prefixes and (kept := self.prefixes.find(a)):
            start, layers, scored = kept
            cache = _cache([(k[:, :, :start], v[:, :, :start]) for k, v in layers])
            before = scored[: start + 1] if _echoed(a) else []
        with torch.no_grad():
            out = self.model(input_ids=ids[:, start:-1], past_key_values=cache, use_cache=True, **last)
        read = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        if _echoed(a):
            top = a.logprobs
            a.prompt_scored = [Scored(x.token, x.logprob, x.top[:top]) for x in before] + _prompt_scored(
                ids[:, start:], out.logits[0], top)[1 if before else 0 :]  # fmt: skip
        if self.prefixes:
            self.prefixes.keep(a, read)
        return read

    def score(self, ids, top: int) -> list[Scored]:
        """Each token of `ids` (one prompt) but the first scored by what the model makes of those before it: its
        log probability and the `top` likeliest tokens' there."""
        import torch

        if ids.shape[1] == 1:  # nothing before it to score it by
            return [Scored(int(ids[0, 0]), None)]
        with torch.no_grad():
            return _prompt_scored(ids, self.model(input_ids=ids[:, :-1]).logits[0], top)


class Generating(Generation):
    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer


class _Rows:
    """The answers of one `generate` call (`Generation.advance`), row by row: `pick` (a logits processor) chooses
    each sampled row's next token from its answer's own generator, leaving greedy rows to `generate`'s argmax, and
    the call itself (stopping criteria) takes each row's new token, hands its text on and says which rows have
    ended, or that all stop for now (`paused`: `pause(going)` said so)."""

    def __init__(self, lm: Generation, asked: list[Answer], eos: list[int],
                 pause: Callable[[list[Answer]], bool] | None = None, halt: threading.Event | None = None) -> None:
        from tasks.generate import stop_at

        self.lm, self.asked, self.pause, self.halt, self.paused = lm, asked, pause, halt, False
        self.done = [False] * len(asked)
        self.logprobs: dict[int, Any] = {}  # row -> this step's log-softmax, for the rows whose answers score
        self.eos, self.ends, self.warpers = [], [], []
        for a in asked:
            stop = stop_at(a.closing, lm.tokenizer, lm.model, a.settings["stop"])  # a turn end of one token: an EOS
            own = set() if a.settings.get("ignore_eos") else set(stop.get("eos_token_id", eos))
            self.eos.append(own | set(a.settings.get("stop_token_ids") or ()))  # vLLM's: ends of the answer's own
            self.ends.append(stop.get("stop_strings", []))
            self.warpers.append(_warpers(a.settings) if a.settings["do_sample"] else None)
        self.shaped = [r for r, a in enumerate(asked) if _Shaping.asked(a.settings)]
        self.shaping: _Shaping | None = None  # built at the first step, for the rows in `shaped`
        self.formed = {r: lm.matcher(a) for r, a in enumerate(asked) if a.settings.get("response_format")}
        self.least = {r: a.settings["min_tokens"] for r, a in enumerate(asked) if a.settings.get("min_tokens")}
        self.bitmask = None  # the tokens each formed row's grammar allows next, 32 to an int32 (llguidance's)

    def pick(self, input_ids, scores):
        """Each row's scores shaped by its answer's logit bias and penalties (`_Shaping`), greedy or sampled, kept
        to what its `response_format` allows next (`_form`), and its ends held back before its `min_tokens`; then
        each sampled row's made the token drawn (its settings' warpers, softmax, a draw from its own generator) and
        nothing else, which `generate`'s greedy argmax then takes: what one-at-a-time generation with `do_sample`
        drew, from the same seed, whatever the row is batched with."""
        import torch

        scoring = [r for r, a in enumerate(self.asked) if a.logprobs is not None and not self.done[r]]
        if scoring:  # before any row's draw is made its scores: the model's own, before bias and penalties
            self.logprobs = dict(zip(scoring, torch.log_softmax(scores[scoring].float(), dim=-1), strict=True))
        if self.shaped:  # every shaped row at once (a row that has ended: its token is padding, whatever it is)
            if self.shaping is None:
                self.shaping = _Shaping(self.asked, self.shaped, scores.shape[-1], scores.device)
            else:  # the token each row took at the last step
                self.shaping.took(input_ids[self.shaped, -1])
            self.shaping(scores)
        if self.formed:
            self._form(scores)
        for row, least in self.least.items():  # vLLM's min_tokens: no end of the row's before that many
            if not self.done[row] and len(self.asked[row].tokens) < least and self.eos[row]:
                scores[row, sorted(self.eos[row])] = float("-inf")
        for row, warpers in enumerate(self.warpers):
            if warpers is None or self.done[row]:
                continue
            a = self.asked[row]
            if a.generator is None:
                a.generator = torch.Generator(device=scores.device).manual_seed(a.seed)
            warped = scores[row : row + 1]
            for warp in warpers:
                warped = warp(input_ids[row : row + 1], warped)
            token = torch.multinomial(torch.softmax(warped, dim=-1), 1, generator=a.generator)
            scores[row] = float("-inf")
            scores[row].index_fill_(0, token.view(-1), 0.0)  # the draw stays on the device: no wait on it per row
        return scores

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        for row, token in enumerate(input_ids[:, -1].tolist()):
            if not self.done[row]:
                self._take(row, token)
        going = [a for a, done in zip(self.asked, self.done, strict=True) if not done]
        self.paused = bool(going and self.pause and self.pause(going))
        return torch.tensor([True] * len(self.done) if self.paused else self.done, device=input_ids.device)

    def _form(self, scores) -> None:
        """Each formed row's scores kept to the tokens its grammar allows next (the others -inf), and to its ends
        (EOS, the turn's end) once the grammar may end there: what it generates is in `response_format`, as vLLM's
        and OpenAI's structured outputs are (cut only by max_tokens or a `stop` text)."""
        import llguidance.torch as lt
        import torch

        rows = [r for r in self.formed if not self.done[r]]
        if not rows:
            return
        if self.bitmask is None:
            self.bitmask = lt.allocate_token_bitmask(len(self.formed), scores.shape[-1])
            self.bits = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32,
                                     device=scores.device)  # an int32's bits, the last its sign  # fmt: skip
        mask = self.bitmask[: len(rows)]
        for i, row in enumerate(rows):  # 10 us a row for a JSON schema
            lt.fill_next_token_bitmask(self.formed[row], mask, i)
        # unpacked here, not by llguidance's torch.compile'd kernel: compiling it takes seconds, and a C compiler
        allowed = ((mask.to(scores.device, non_blocking=True)[:, :, None] & self.bits) != 0).view(len(rows), -1)
        allowed = allowed[:, : scores.shape[-1]]
        for i, row in enumerate(rows):
            if self.formed[row].is_accepting():  # its ends too, whichever the grammar's own EOS is
                allowed[i, sorted(self.eos[row])] = True
        which = torch.tensor(rows, device=scores.device)
        scores[which] = scores[which].masked_fill_(~allowed, float("-inf"))

    def close(self) -> None:
        """Ends the rows `generate` stopped without this hearing it (none, where it calls every step)."""
        for row, done in enumerate(self.done):
            if not done:
                self._end(row)

    def _take(self, row: int, token: int) -> None:
        a = self.asked[row]
        a.tokens.append(token)
        if (logprobs := self.logprobs.pop(row, None)) is not None:
            a.scored += _scored([token], [float(logprobs[token])], logprobs[None], a.logprobs)
        if a.matcher is not None and token not in self.eos[row] and not a.matcher.consume_token(token):
            raise RuntimeError(f"token {token} is not one response_format's grammar allows: {a.matcher.get_error()}")
        formed = a.matcher is not None and a.matcher.is_stopped()  # nothing more the grammar allows
        own = token in self.eos[row] or formed or len(a.tokens) >= a.settings["max_new_tokens"]
        halted = not own and self.halt is not None and self.halt.is_set()
        ended = own or halted or (a.cancelled is not None and a.cancelled.is_set())
        if self.ends[row] or a.heard:
            from tasks.generate import answer

            said = self.lm.said(a)
            text = answer(said, None, self.ends[row])
            ended = ended or text != said
            if a.heard and not (not ended and said.endswith("\ufffd")):  # a character whose bytes are not all in
                if text == said and not ended:  # hold back what may be the start of an end
                    text = said[: len(said) - max((n for e in self.ends[row] for n in range(1, len(e))
                                                   if said.endswith(e[:n])), default=0)]  # fmt: skip
                if len(text) > a.sent:
                    a.heard(text[a.sent :], None)
                    a.sent = len(text)
            halted = halted and text == said  # a `stop` text ended it too
        if ended:
            a.halted = halted
            self._end(row)

    def _end(self, row: int) -> None:
        from tasks.generate import answer

        a = self.asked[row]
        self.done[row] = True
        said = self.lm.ended(a)
        text = answer(said, a.closing, a.settings["stop"])
        ended = len(a.tokens) < a.settings["max_new_tokens"] or bool(a.tokens) and a.tokens[-1] in self.eos[row] or (
            a.matcher is not None and a.matcher.is_stopped())  # fmt: skip
        a.choice = {"text": text, "completion_tokens": len(a.tokens),
                    "finish_reason": "stop" if ended or text != said else "length"}  # fmt: skip
        if a.heard:
            if len(text) > a.sent:  # what was held back, where no end came
                a.heard(text[a.sent :], None)
                a.sent = len(text)
            a.heard(None, a.choice)
        if a.ended:
            a.ended(a)


def streams(tokenizer) -> bool:
    """Whether decoding `tokenizer`'s tokens a token at a time (tokenizers' DecodeStream) gives the text that
    `tokenizer.decode` gives of them all: a tokenizers-backed one (transformers' TokenizersBackend, its `_decode`
    not overridden) whose decode is the backend's alone, with no clean-up of spaces after it (which transformers
    skips for BPE)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if getattr(tokenizer, "decoded_whole", False) or type(tokenizer)._decode is not TokenizersBackend._decode:
        return False
    bpe = type(tokenizer.backend_tokenizer.model).__name__ == "BPE"
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return not tokenizer.clean_up_tokenization_spaces or (bpe and not forced)


def grammar(response_format: dict) -> str:
    """llguidance's grammar of a `response_format` (as `tasks.registry.response_format` checks it): OpenAI's
    `{"type": "json_object"}`, any JSON object, and `{"type": "json_schema", "json_schema": {"schema": ...}}`, a
    JSON value of that schema; and vLLM's structured outputs' other kinds: `{"type": "regex", "regex": ...}`, text
    the regular expression matches whole; `{"type": "choice", "choice": [...]}`, one of those texts; `{"type":
    "grammar", "grammar": ...}`, text of a context-free grammar, in Lark's syntax or GBNF (llama.cpp's and
    xgrammar's, converted). With `before` (a Lark grammar whose `@edgar_tune_answer` is the format's: a reasoning
    block the answer may begin with), that grammar."""
    import json

    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    if "before" in response_format:  # a reasoning block first (`edgar_tune.serve.Thinking.lark`), then the format
        given = grammar({k: v for k, v in response_format.items() if k != "before"})  # Lark's text, or a list's JSON
        inner = json.loads(given)["grammars"] if given.lstrip().startswith("{") else [{"lark_grammar": given}]
        inner[0] = inner[0] | {"name": "edgar_tune_answer"}  # the answer's grammar, which the block's refers to
        return json.dumps({"grammars": [{"lark_grammar": response_format["before"]}, *inner]})
    kind = response_format["type"]
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(response_format["regex"])
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(map(json.dumps,
                                                                               response_format["choice"])))
    if kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(response_format["grammar"]))
    schema = response_format["json_schema"].get("schema", {}) if kind == "json_schema" else {"type": "object"}
    return llguidance.LLMatcher.grammar_from_json_schema(schema)


def grammar_tokenizer(tokenizer, vocabulary: int):
    """`tokenizer` as llguidance reads it, over the model's `vocabulary` (its output layer's width)."""
    import llguidance.hf
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not isinstance(tokenizer, TokenizersBackend):
        raise ValueError(f"response_format needs a tokenizers-backed tokenizer (tokenizer.json); this version's is "
                         f"{type(tokenizer).__name__}: leave response_format out")  # fmt: skip
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocabulary)


def fit(asked: list[Answer], tokens: int = BATCH_TOKENS) -> bool:
    """Whether `asked` may be generated together: one answer always; more while their count times the longest's
    prompt and max_new_tokens is at most `tokens`."""
    return len(asked) <= 1 or len(asked) * max(a.ids["input_ids"].shape[1] + a.settings["max_new_tokens"]
                                               for a in asked) <= tokens  # fmt: skip


class Prefixes:
    """What the model made of the prompts read lately (`Generation._read`), up to `tokens` of them, the least
    lately used given up first: a prompt that begins as one of them (lm-evaluation-harness's choices after one
    question, a long system prompt or few-shot examples sent again) is read from where they part. Scores of a
    prompt (`echo`) are kept with it, to be taken by one asking for as many likeliest tokens or fewer."""

    def __init__(self, tokens: int = PREFIX_TOKENS) -> None:
        self.tokens, self.kept = tokens, OrderedDict()  # prompt read (token ids) -> (layers, scored or None)

    def find(self, a: Answer) -> tuple[int, list, list] | None:
        """The places of `a`'s prompt to take from a prompt kept (the tokens they share but the last, which is
        read again: its place's scores, and a token to read), with that prompt's layers and scores; None where
        none shares two tokens or more (or none scored as `a`'s prompt is to be)."""
        read = tuple(a.ids["input_ids"][0, :-1].tolist())
        top = a.logprobs if _echoed(a) else None
        best, shared = None, 1
        for key, (_, scored) in self.kept.items():
            if top is not None and (scored is None or len(scored[-1].top) < top):
                continue
            if (n := len(os.path.commonprefix([key, read]))) > shared:
                best, shared = key, n
        if best is None:
            return None
        self.kept.move_to_end(best)
        return shared - 1, *self.kept[best]

    def keep(self, a: Answer, layers: list) -> None:
        """Keeps what was read of `a`'s prompt (all but its last token), and its scores where it was scored."""
        read = tuple(a.ids["input_ids"][0, :-1].tolist())
        if len(read) > self.tokens or (read in self.kept and self.kept[read][1] is not None and
                                       a.prompt_scored is None):  # fmt: skip
            return
        self.kept[read] = (layers, a.prompt_scored)
        self.kept.move_to_end(read)
        while sum(map(len, self.kept)) > self.tokens:
            self.kept.popitem(last=False)


def _echoed(a: Answer) -> bool:
    """Whether `a`'s prompt is to be scored."""
    return a.echo and a.logprobs is not None


def _prompt_scored(ids, logits, top: int, chunk: int = 512) -> list[Scored]:
    """A prompt's tokens (`ids`, one row) scored by `logits`, what the model made of each but the last: the first
    token without a score, `chunk` places' log-softmax over the vocabulary at a time."""
    import torch

    out = [Scored(int(ids[0, 0]), None)]
    for begin in range(0, logits.shape[0], chunk):
        logprobs = torch.log_softmax(logits[begin : begin + chunk].float(), dim=-1)
        tokens = ids[0, begin + 1 : begin + 1 + chunk]
        out += _scored(tokens.tolist(), logprobs.gather(1, tokens[:, None])[:, 0].tolist(), logprobs, top)
    return out


def _scored(tokens: list[int], logprobs: list[float], rows, top: int) -> list[Scored]:
    """`tokens` with their `logprobs` and the `top` likeliest of each of `rows` (log-softmax over the vocabulary)."""
    if not top:
        return [Scored(t, lp) for t, lp in zip(tokens, logprobs, strict=True)]
    values, ids = rows.topk(top, dim=-1)
    return [Scored(t, lp, tuple(zip(i, v, strict=True)))
            for t, lp, i, v in zip(tokens, logprobs, ids.tolist(), values.tolist(), strict=True)]  # fmt: skip


class _Shaping:
    """What the logits of answers generated together (the `rows` of `_Rows` that ask for it) are shaped by before
    their next tokens are taken, in vLLM's order: OpenAI's `logit_bias` added; the repetition penalty
    (transformers' and vLLM's: a token of the answer's prompt or of what it has generated has a positive logit
    divided by it, a negative one multiplied); then OpenAI's frequency penalty times the times the answer has
    generated the token and its presence penalty once it has, subtracted. Counted from each answer's own tokens
    (`Answer.tokens`) when a `generate` call begins, then a token a step: the answer it is alone, whatever it joins.
    All rows at once, and only at the places a penalty touches (the tokens seen): a step's cost is a scan of a
    (rows, vocabulary) mask, not the dozen passes over (rows, vocabulary) floats that shaping every logit takes."""

    def __init__(self, asked: list[Answer], rows: list[int], vocab: int, device) -> None:
        import torch

        shaped = [asked[r] for r in rows]
        get = lambda key, none: torch.tensor([a.settings.get(key, none) for a in shaped], device=device)  # noqa: E731
        self.repetition, self.presence, self.frequency = (get("repetition_penalty", 1.0),
                                                          get("presence_penalty", 0.0), get("frequency_penalty", 0.0))
        self.rows = torch.tensor(rows, device=device)
        self.counts = torch.zeros(len(rows), vocab, device=device)  # of each token each answer has generated
        self.seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)  # where a penalty may touch
        bias = []  # (row of the batch, token, bias)
        for i, (row, a) in enumerate(zip(rows, shaped, strict=True)):
            if a.tokens:
                self.counts[i].index_add_(0, torch.tensor(a.tokens, device=device), torch.ones(
                    len(a.tokens), device=device))  # fmt: skip
            if a.settings.get("repetition_penalty", 1.0) != 1.0:
                ids = a.ids["input_ids"][0].to(device)
                self.seen[i, ids[ids < vocab]] = True
            bias += [(row, token, value) for token, value in (a.settings.get("logit_bias") or {}).items()]
        self.seen |= self.counts > 0
        self.bias = None
        if bias:
            r, t, v = zip(*bias, strict=True)
            self.bias = (torch.tensor(r, device=device), torch.tensor(t, device=device), torch.tensor(v, device=device))

    @staticmethod
    def asked(settings: dict) -> bool:
        """Whether `settings` shape the logits at all."""
        return bool(settings.get("logit_bias")) or settings.get("repetition_penalty", 1.0) != 1.0 or any(
            settings.get(k, 0.0) != 0.0 for k in ("presence_penalty", "frequency_penalty"))  # fmt: skip

    def took(self, tokens) -> None:
        """Counts the token each row took at the last step (`tokens`, one a row)."""
        tokens = tokens[:, None].to(self.counts.device)
        self.counts.scatter_add_(1, tokens, self.counts.new_ones(len(tokens), 1))
        self.seen.scatter_(1, tokens, True)

    def __call__(self, scores) -> None:
        """Shapes `scores`, the batch's logits over the vocabulary (a row each), in place for the rows' next tokens."""
        import torch

        if self.bias is not None:
            rows, tokens, values = self.bias
            scores.index_put_((rows, tokens), values.to(scores.dtype), accumulate=True)
        i, tokens = self.seen.nonzero(as_tuple=True)
        rows = self.rows[i]
        x = scores[rows, tokens].float()
        x = torch.where(x > 0, x / self.repetition[i], x * self.repetition[i])
        n = self.counts[i, tokens]
        scores[rows, tokens] = (x - self.frequency[i] * n - self.presence[i] * (n > 0)).to(scores.dtype)


def _warpers(settings: dict) -> list:
    """transformers' warpers for a sampled answer's settings, as `generate` builds them with `do_sample`, in its
    order."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    return [*([TemperatureLogitsWarper(settings["temperature"])] if settings["temperature"] != 1.0 else []),
            *([TopKLogitsWarper(settings["top_k"])] if settings["top_k"] != 0 else []),
            *([TopPLogitsWarper(settings["top_p"])] if settings["top_p"] < 1.0 else []),
            *([MinPLogitsWarper(settings["min_p"])] if settings.get("min_p", 0.0) > 0 else [])]  # fmt: skip


@dataclass(eq=False)
class Batch:
    """Answers being generated together (`Generation.join`, `Generation.advance`): each one's tokens so far (its
    prompt, then what it generated) right-aligned in a row of `ids`, `mask` 1 where a token is, and `cache`, what
    the model has read of every column but the last (None: nothing yet)."""

    asked: list[Answer]
    ids: Any
    mask: Any
    cache: Any = None


def _plain(cache) -> bool:
    """A cache of key and value tensors only, layer by layer, whose rows and columns can be cut and set side by
    side (transformers' DynamicCache of full-attention layers)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return type(cache) is DynamicCache and bool(cache.layers) and all(type(x) is DynamicLayer for x in cache.layers)


def _cache(layers: list[tuple]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def _left(tensor, width: int):
    """Keys or values (batch, heads, columns, head size) padded on the left to `width` columns."""
    import torch

    return torch.nn.functional.pad(tensor, (0, 0, width - tensor.shape[2], 0))
