"""Stage 3: tokenize the split and pack training text into fixed-length blocks (`datasets`)."""

from __future__ import annotations

import hashlib
import logging
from itertools import chain
from pathlib import Path

from datasets import Dataset

from edgar_tune.config import ConfigError, PipelineConfig
from tasks.datareport import data_report, report_markdown
from tasks.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, read_jsonl, sha256_file
from tasks.models import TINY, load_config, load_tokenizer, resolve_base_model
from tasks.progress import OwnLine, Progress
from tasks.textdata import row_text

log = logging.getLogger(__name__)
QUIET_S = 30.0  # tokenizing shorter than this keeps datasets' tqdm bars only


def block_length(requested: int, model_dir: str) -> int:
    """JumpStart's rule: -1 means min(1024, the model's maximum context).

    Raises:
        ConfigError: a length past the model's context (`max_position_embeddings`): positions it was never trained
            on, which train and score without an error but not as the model was made to.
    """
    max_pos = getattr(load_config(model_dir), "max_position_embeddings", None)
    if requested == -1:
        return min(1024, max_pos or 1024)
    if max_pos and requested > max_pos:
        raise ConfigError(f"tokenize.max_input_length={requested} is longer than the model's context ({max_pos} "
                          f"positions, max_position_embeddings of {model_dir}); set it to {max_pos} or less, or -1 "
                          "for min(1024, the context)")  # fmt: skip
    return requested


def _fingerprint(key: str, rows: list[dict]) -> str:
    digest = hashlib.sha256(key.encode())
    for row in rows:
        digest.update(row["text"].encode("utf-8"))
    return digest.hexdigest()[:32]


def pack(token_lists: list[list[int]], length: int) -> tuple[list[list[int]], int]:
    """Concatenate documents (each already ending in EOS) and cut into blocks; return (blocks, tokens dropped)."""
    flat = list(chain.from_iterable(token_lists))
    n = len(flat) // length
    return [flat[i * length : (i + 1) * length] for i in range(n)], len(flat) - n * length


def chat_segments(messages: list[dict], tokenizer, where: str, tools: list[dict] | None = None
                  ) -> list[tuple[str, bool]]:  # fmt: skip
    """A conversation in the tokenizer's chat template, as (text, trained) pieces in order: each assistant turn,
    from its content to the template's end of turn, trains (unless its `weight` is 0, OpenAI's); the rest (system,
    user, the template's markup and the header that opens each assistant turn, which generation is prompted with)
    does not.

    Each assistant turn is found as the text between the conversation before it, rendered with the generation
    prompt, and the conversation up to it: a template must render a conversation as a continuation of its start.
    `tools` (the record's) go to the template as transformers passes them; an assistant's tool calls train as the
    template writes them, the tool's results do not.

    Raises:
        ConfigError: a tokenizer without a chat template, a conversation its template refuses (a system turn,
            for Gemma's), a template that renders a turn differently once later turns follow it (one that drops
            earlier turns' reasoning, Qwen3's: `chat_examples` trains such a conversation a turn at a time), or
            tool calls to a template that does not write them (it would train the call's turn empty).
    """
    pieces = _chat_pieces(messages, tokenizer, where, tools)
    if pieces is None:
        raise ConfigError(f"{where}: {tokenizer.name_or_path}'s chat template writes an assistant turn differently "
                          "once later turns follow it, so its assistant turns cannot be told apart in the "
                          "conversation as written; train it a turn at a time (`chat_examples`)")  # fmt: skip
    return pieces


def chat_examples(messages: list[dict], tokenizer, where: str, tools: list[dict] | None = None
                  ) -> list[list[tuple[str, bool]]]:  # fmt: skip
    """A conversation's training examples, as (text, trained) pieces each: one (`chat_segments`) where the chat
    template writes the conversation as a continuation of its start; where it writes an assistant turn differently
    once later turns follow it (Qwen3's leaves out the reasoning of the turns before the last user message), one
    per assistant turn that trains, each the conversation before it as the template writes it (the prompt the
    version is given at that turn), then the turn. The second is what the version sees when served; it costs each
    turn's history again.

    Raises:
        ConfigError: as `chat_segments`; a template that does not write an assistant turn as a continuation of its
            own prompt (its generation prompt), even alone.
    """
    pieces = _chat_pieces(messages, tokenizer, where, tools)
    if pieces is not None:
        return [pieces]
    examples = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        start, end = _render(messages[:i], tokenizer, where, tools, True), _render(messages[: i + 1], tokenizer,
                                                                                   where, tools)  # fmt: skip
        if not i or not end.startswith(start):
            raise ConfigError(f"{where}: {tokenizer.name_or_path}'s chat template does not write assistant message "
                              f"{i + 1} as a continuation of its prompt, so what it trains cannot be told from the "
                              "prompt; start each conversation with a system or user message, or give records fields "
                              "and a template.json")  # fmt: skip
        examples.append([(start, False), (end[len(start) :], True)])
    return examples


def _render(turns: list[dict], tokenizer, where: str, tools: list[dict] | None, prompt: bool = False) -> str:
    """`turns` in `tokenizer`'s chat template (`prompt`: with the header that opens the assistant's turn).

    Raises:
        ConfigError: the template's own refusal (Gemma's: no system role), or a mistake in it."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt,
                                             **({"tools": tools} if tools else {}))  # fmt: skip
    except TemplateError as err:
        raise ConfigError(f"{where}: {tokenizer.name_or_path}'s chat template refuses the conversation: {err}; "
                          "change the conversation to what the template takes") from None


def _chat_pieces(messages: list[dict], tokenizer, where: str, tools: list[dict] | None
                 ) -> list[tuple[str, bool]] | None:  # fmt: skip
    """`chat_segments`' pieces; None where the template writes an assistant turn differently once later turns
    follow it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{tokenizer.name_or_path} has no chat template, which conversations (`messages`) are "
                          "written in: use a chat model (its tokenizer_config.json or chat_template.jinja has one), "
                          "or give records fields and a template.json")  # fmt: skip
    from tasks.textdata import unwritten_tool_turn

    if called := unwritten_tool_turn(messages, tokenizer):
        raise ConfigError(f"{where}, turn {called}: a tool call or its result, which {tokenizer.name_or_path}'s "
                          "chat template does not write (it has no `tool_calls`): the call's turn would train empty. "
                          "Tune a base whose template writes tool calls (Qwen2.5's, Llama 3.1's, Hermes'), or leave "
                          "the tool turns out")  # fmt: skip
    full, pieces, at = _render(messages, tokenizer, where, tools), [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(messages[:i], tokenizer, where, tools, True) if i else None
        end = _render(messages[: i + 1], tokenizer, where, tools)
        if start is not None and end.startswith(start) and len(start) >= at and not full.startswith(end):
            return None  # the turn written otherwise once later turns follow it
        if start is None or not end.startswith(start) or len(start) < at:
            raise ConfigError(f"{where}: {tokenizer.name_or_path}'s chat template does not write the conversation "
                              f"as a continuation of its start (at assistant message {i + 1}), so its assistant turns "
                              "cannot be told from the rest; start each conversation with a system or user message, "
                              "or give records fields and a template.json")  # fmt: skip
        pieces += [(full[at : len(start)], False), (full[len(start) : len(end)], message.get("weight", 1) != 0)]
        at = len(end)
    return [(text, trained) for text, trained in [*pieces, (full[at:], False)] if text]


def _examples(row: dict, tokenizer) -> list[list[tuple[str, bool]]]:
    if "messages" in row:
        return chat_examples(row["messages"], tokenizer, f"{row['source']}, record {row['row']}", row.get("tools"))
    return [[(row["prompt"], False), (row["completion"], True)]]


def encode_instructions(rows: list[dict], tokenizer, length: int, done=None,
                        origin: list[int] | None = None) -> tuple[dict, int]:  # fmt: skip
    """Prompt + completion + EOS per example, the prompt's labels -100 (no loss); a conversation (`messages`) in
    the model's chat template, its assistant turns trained (`chat_examples`, no EOS: the template ends each turn;
    a turn at a time, an example each, where the template writes a turn otherwise once later ones follow); cut to
    `length` tokens. `done` (a function) hears the number of rows just tokenized, a thousand at a time (the last
    part fewer); `origin`, where given, is filled with each example's row (its index in `rows`).

    Returns the columns and the number of examples whose completion was cut.
    """
    ids, labels, cut, split = [], [], 0, [0, 0]
    eos = [tokenizer.eos_token_id]
    for i in range(0, len(rows), 1000):
        part = [_examples(r, tokenizer) for r in rows[i : i + 1000]]
        texts = [text for examples in part for pieces in examples for text, _ in pieces]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter([])
        for j, (row, examples) in enumerate(zip(rows[i : i + 1000], part, strict=True), i):
            if len(examples) > 1:  # a conversation a turn at a time
                split[0], split[1] = split[0] + 1, split[1] + len(examples)
            for pieces in examples:
                full, label = [], []
                for _, trained in pieces:
                    piece = next(encoded)
                    full += piece
                    label += piece if trained else [-100] * len(piece)
                if "messages" not in row:
                    full, label = full + eos, label + eos
                cut += len(full) > length
                ids.append(full[:length])
                labels.append(label[:length])
                if origin is not None:
                    origin.append(j)
        if done:
            done(len(part))
    if split[0]:
        log.info("%d conversation(s) trained a turn at a time (%d examples): the chat template writes a turn "
                 "otherwise once later turns follow it (Qwen3's leaves out their reasoning), so each assistant turn is "
                 "an example of its own, after the conversation before it as the template writes it", *split)
    if all(all(x == -100 for x in lab) for lab in labels):
        raise ConfigError(f"every prompt fills the {length}-token window; raise `tokenize.max_input_length`")
    return {"input_ids": ids, "labels": labels}, cut


# a row's content, not its identity
_CONTENT = ("text", "prompt", "completion", "messages", "tools", "input_ids", "labels")


def row_meta(row: dict) -> dict:
    """What identifies a document or example in reports (ticker/FY/accession/Item, or file/row)."""
    return {k: v for k, v in row.items() if k not in _CONTENT}


def write_tokenize_stage(out: Path, parse_dir: Path, cfg: PipelineConfig) -> dict:
    """Write `train/` (packed blocks, or instruction examples), `val/` (one token list per held-out document)
    and `val_blocks/` (the held-out text as blocks, for the validation loss during training), plus stats."""
    train_rows, val_rows = read_jsonl(parse_dir / "train.jsonl"), read_jsonl(parse_dir / "val.jsonl")
    instruction = cfg.train.instruction_tuned
    with atomic_dir(out) as tmp:
        # The tiny model's tokenizer is trained on this run's training text (never on the validation text).
        texts = (row_text(r) for r in train_rows)
        base, commit = resolve_base_model(cfg.model, tmp, texts, cfg.train.seed)
        if cfg.model.name == TINY:
            base_ref = {"kind": "run_local", "path": TINY}
        elif commit:  # a hub id, at the commit every later stage loads
            base_ref = {"kind": "path_or_hub", "path": cfg.model.name, "revision": commit}
        else:
            base_ref = {"kind": "path_or_hub", "path": base}
        tokenizer = load_tokenizer(base)
        length = block_length(cfg.tokenize.max_input_length, base)
        eos = tokenizer.eos_token_id
        # A corpus of hundreds of companies takes minutes: lines in the run's log and a bar in the UI
        bar = Progress("tokenize", len(train_rows) + len(val_rows), "examples" if instruction else "documents",
                       logger=OwnLine(log, {"open": None}), quiet_s=QUIET_S)  # fmt: skip
        done = 0

        def tokenized(n: int) -> None:
            nonlocal done
            done += n
            bar.update(done)

        def encode(batch: dict) -> dict:
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            tokenized(len(ids))
            return {"input_ids": [x + [eos] for x in ids]}

        # An explicit fingerprint: hashing the closure (and the tokenizer in it) is slow and prints bytecode. The tiny
        # model is built in this stage's temporary folder: named by its tokenizer, not by where it was built (by that,
        # the saved datasets' state.json differed on each tokenize, and the same blocks trained again).
        named = f"{TINY}:{sha256_file(Path(base) / 'tokenizer.json')}" if cfg.model.name == TINY else base
        key = f"{named}|{length}|{len(tokenizer)}"
        extra = {}
        if instruction:
            train_cols, cut = encode_instructions(train_rows, tokenizer, length, tokenized)
            origin: list[int] = []  # each held-out example's row (a conversation may be several)
            val_cols, val_cut = encode_instructions(val_rows, tokenizer, length, tokenized, origin)
            bar.close()
            Dataset.from_dict(train_cols).save_to_disk(tmp / "train")
            scored_rows = [val_rows[j] for j in origin]
            val_tok = Dataset.from_list([row_meta(r) for r in scored_rows]).add_column("input_ids",
                                                                                      val_cols["input_ids"])
            val_tok = val_tok.add_column("labels", val_cols["labels"])
            val_tok.save_to_disk(tmp / "val")
            val_tok.select_columns(["input_ids", "labels"]).save_to_disk(tmp / "val_blocks")
            n_train, train_tokens, dropped = len(train_cols["input_ids"]), sum(map(len, train_cols["input_ids"])), 0
            extra = {"examples_cut_to_length": {"train": cut, "val": val_cut},
                     "completion_tokens_train": sum(sum(x != -100 for x in lab) for lab in train_cols["labels"])}  # fmt: skip
            train_ids, val_ids = train_cols["input_ids"], val_cols["input_ids"]
            val_scored = [{"scored_tokens": sum(x != -100 for x in lab)} for lab in val_cols["labels"]]
            val_tokens = sum(d["scored_tokens"] for d in val_scored)  # the prompts are not scored
        else:
            train_tok = Dataset.from_list(train_rows).map(
                encode, batched=True, desc="tokenize train", new_fingerprint=_fingerprint(key, train_rows)
            )
            blocks, dropped = pack(train_tok["input_ids"], length)
            Dataset.from_dict({"input_ids": blocks}).save_to_disk(tmp / "train")
            val_tok = Dataset.from_list(val_rows).map(
                encode, batched=True, desc="tokenize validation", new_fingerprint=_fingerprint(key, val_rows)
            )
            bar.close()
            val_tok = val_tok.remove_columns(["text"])
            val_tok.save_to_disk(tmp / "val")
            val_blocks, _ = pack(val_tok["input_ids"], length)
            if not val_blocks:  # less held-out text than one block: validate on all of it
                val_blocks = [list(chain.from_iterable(val_tok["input_ids"]))]
            Dataset.from_dict({"input_ids": val_blocks}).save_to_disk(tmp / "val_blocks")
            n_train, train_tokens = len(blocks), len(blocks) * length
            val_tokens = sum(len(x) for x in val_tok["input_ids"])
            train_ids, val_ids = list(train_tok["input_ids"]), list(val_tok["input_ids"])
            val_scored, scored_rows = [{}] * len(val_ids), val_rows  # every token is scored
        stats = {
            "base_model": base_ref,
            "block_length": length,
            "kind": "instruction" if instruction else "text",
            "train_blocks": n_train,
            "train_tokens": train_tokens,
            "train_tokens_dropped_at_end": dropped,
            "val_documents": len(val_rows),
            "val_tokens": val_tokens,
            "val_tokens_per_document": [
                row_meta(r) | {"tokens": len(ids)} | scored
                for r, ids, scored in zip(scored_rows, val_ids, val_scored, strict=True)
            ],
            "tokenizer_vocab": len(tokenizer),
        } | extra
        if not n_train:
            raise ConfigError(
                f"training text has {dropped} tokens, fewer than one block of {length}; lower "
                "`tokenize.max_input_length` or add data"
            )
        atomic_write_json(tmp / "stats.json", stats)
        parse_report = read_json(parse_dir / "report.json")
        if "filings" in parse_report:
            packed = {"blocks": n_train, "block_length": length, "tokens": train_tokens, "dropped": dropped}
            report = data_report(parse_report, train_rows + val_rows, train_ids + val_ids, packed)
            markdown = report_markdown(report)
        else:
            report = parse_report | {"train_tokens": train_tokens, "val_tokens": val_tokens}
            markdown = "| set | rows | chars | tokens |\n|---|---:|---:|---:|\n" + "".join(
                f"| {s} | {report[f'{s}_documents']:,} | {report[f'{s}_chars']:,} | {report[f'{s}_tokens']:,} |\n"
                for s in ("train", "val")
            ) + f"\nFiles: {', '.join(report['files'])}\nValidation: {report['validation']}\n"
        atomic_write_json(tmp / "data_report.json", report)
        atomic_write_text(tmp / "data_report.md", markdown)
    return stats

