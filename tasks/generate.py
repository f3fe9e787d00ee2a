"""Generation samples, before and after: JumpStart's prompts (and questions about the run's own companies) for a
domain-adaptation run; for an instruction-tuned one, held-out examples beside the answers held out.

The same prompts, seed and sampling settings go through the base and the fine-tuned model, so the two columns of
the MLflow table differ only by the fine-tuning.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from edgar_tune.config import ConfigError, GenerateConfig
from kernels.fused_linear_ce import IGNORE_INDEX
from tasks.io import atomic_write_json
from tasks.models import device, load_tokenizer
from tasks.progress import OwnLine, Progress, clock, console_bars

log = logging.getLogger(__name__)


def prompts_for(cfg: GenerateConfig, companies: list[str]) -> list[dict]:
    """The fixed prompts, then each ticker-aware question once per company of the run: text to continue, each
    generated up to `cfg.max_length` tokens with the prompt."""
    asked = [q.format(company=c) for q in cfg.company_questions for c in companies]
    return [{"prompt": p} for p in dict.fromkeys(cfg.prompts + asked)]


def held_out_prompts(val, count: int) -> list[dict]:
    """An instruction-tuned run's first `count` held-out examples as the model is prompted when served: the tokens
    before its first trained one (the template filled without its completion, or the conversation up to the
    assistant's first turn, with the header that opens it), and the answer held out (that completion or turn).
    An example cut to nothing trained is passed over."""
    out = []
    for row in val:
        if len(out) == count:
            break
        labels = row["labels"]
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), 0)
        end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        if start:
            out.append({"ids": row["input_ids"][:start], "reference_ids": row["input_ids"][start:end]})
    return out


def turn_end(tokenizer) -> str | None:
    """The text a chat template closes the assistant's turn with (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama
    3's), which a model tuned on conversations writes where its answer ends (`tasks.blocks.chat_segments` trains
    it): generation stops there as at EOS. A base model's EOS is often another token (SmolLM2's `<|endoftext|>`,
    Llama 3's `<|end_of_text|>`), after which a chat-tuned one went on to write the user's next turn itself. None
    without a chat template, or for one that closes the turn with whitespace only."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    from jinja2 import TemplateError

    asked = [{"role": "user", "content": "Q"}]
    try:
        start = tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
        end = tokenizer.apply_chat_template([*asked, {"role": "assistant", "content": "A"}], tokenize=False)
    except TemplateError:
        return None
    if not end.startswith(start + "A"):
        return None
    return end[len(start) + 1 :].strip() or None


def stop_at(closing: str | None, tokenizer, model, stop: list[str] | tuple[str, ...] = ()) -> dict:
    """`generate`'s arguments that stop it where the turn ends (`turn_end`) as well as at the model's EOS, and at
    any of the texts `stop` (a request's own): one more EOS id where the turn ends in one token (a special one, as
    `<|im_end|>`), else stop strings (which cost about 0.35 s a call to set up, for a 49k vocabulary)."""
    strings, ids = list(stop), tokenizer.encode(closing, add_special_tokens=False) if closing else []
    args = {}
    if len(ids) == 1:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        args["eos_token_id"] = list(dict.fromkeys([*eos, ids[0]]))
    elif closing:
        strings.insert(0, closing)
    return args | ({"stop_strings": strings, "tokenizer": tokenizer} if strings else {})


def answer(text: str, closing: str | None, stop: list[str] | tuple[str, ...] = ()) -> str:
    """Generated text up to the end of the turn (`turn_end`), which decoding keeps where it is not a special token,
    or up to the first of the texts `stop`, whichever comes first (OpenAI's `stop`: the text it ends at is left
    out)."""
    for end in [closing, *stop] if closing else stop:
        text = text.split(end, 1)[0]
    return text


def check_length(cfg: GenerateConfig, model) -> None:
    """Raises ConfigError for a `generate.max_length` past the model's context: positions it never saw, generated
    without an error on RoPE models, for minutes."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context and cfg.max_length > context:
        raise ConfigError(f"generate.max_length={cfg.max_length} is longer than the model's context ({context} "
                          f"positions); set it to {context} or less")  # fmt: skip


@torch.no_grad()
def generate(model, tokenizer, prompts: list[dict], cfg: GenerateConfig, label: str) -> list[dict]:
    """One row per prompt and returned sequence: the prompt, the text generated after it, and for a held-out
    example (`held_out_prompts`) the answer held out as `reference`. Text to continue (`prompts_for`) is generated
    up to `cfg.max_length` tokens with the prompt (`write_eval` has checked it against the model's context,
    `check_length`, before its scoring); a held-out example `cfg.max_new_tokens` after its prompt, fewer where
    the context ends first, and up to the end of the chat template's assistant turn too (`turn_end`; where the
    model was tuned in another template, it never writes it). The samples are generated together, as a served
    version generates (`tasks.batching`): sample k of prompt i draws from its own seed, `cfg.sampling_seed + i` for
    the first, so the base and the fine-tuned model draw alike."""
    from tasks.batching import Answer, Generating

    dev = device()
    model.to(dev).eval()
    context = getattr(model.config, "max_position_embeddings", None) or float("inf")
    held = bool(prompts) and "ids" in prompts[0]
    closing = turn_end(tokenizer) if held else None
    beside_tqdm = OwnLine(log, {"open": None})
    beside_tqdm.info("generation samples (%s): %d %s, %d sample(s) each, %s", label, len(prompts),
                     "held-out example(s)" if held else "prompt(s)", cfg.num_return_sequences,
                     f"up to {cfg.max_new_tokens} tokens after the prompt" if held
                     else f"up to {cfg.max_length} tokens with the prompt")  # fmt: skip
    settings = {"do_sample": cfg.do_sample, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                "seed": cfg.sampling_seed, "stop": []}  # fmt: skip
    count = len(prompts) * cfg.num_return_sequences
    bar = Progress(f"generation samples ({label})", count, "samples", logger=beside_tqdm, quiet_s=30)
    shown = tqdm(total=count, desc=f"generate ({label})", unit="sample", disable=not console_bars())
    made = []

    def ended(_) -> None:
        made.append(1)
        shown.update(1)
        bar.update(len(made))

    asked = []
    for i, item in enumerate(prompts):
        if "ids" in item:  # as tokenized for training: the template's or chat template's special tokens included
            ids = torch.tensor([item["ids"]], device=dev)
            new = max(1, min(cfg.max_new_tokens, context - ids.shape[1]))
        else:
            ids = tokenizer(item["prompt"], return_tensors="pt").to(dev)["input_ids"]
            new = max(1, cfg.max_length - ids.shape[1])
        asked += [Answer({"input_ids": ids}, settings | {"max_new_tokens": new},
                         Answer.seed_of(cfg.sampling_seed, i, k), closing, ended=ended)
                  for k in range(cfg.num_return_sequences)]  # fmt: skip
    Generating(model, tokenizer).generate_batches(asked)
    shown.close()
    bar.close()
    rows = []
    for i, item in enumerate(prompts):
        prompt = item["prompt"] if "prompt" in item else tokenizer.decode(item["ids"])
        held_back = item.get("reference_ids")
        reference = {} if held_back is None else {"reference": tokenizer.decode(held_back, skip_special_tokens=True)}
        for n in range(cfg.num_return_sequences):
            rows.append({"prompt": prompt, "sample": n,
                         "text": asked[i * cfg.num_return_sequences + n].choice["text"]} | reference)  # fmt: skip
    return rows


def write_samples(out_file: Path, model, tokenizer_dir: str, prompts: list[dict], cfg: GenerateConfig,
                  label: str) -> list[dict]:  # fmt: skip
    start = time.perf_counter()
    rows = generate(model, load_tokenizer(tokenizer_dir), prompts, cfg, label)
    seconds = time.perf_counter() - start
    atomic_write_json(out_file, {"settings": cfg.model_dump(), "seconds": seconds, "rows": rows})
    log.info("generation samples (%s): %d sample(s) in %s, written to %s", label, len(rows), clock(seconds), out_file)
    return rows
