"""Generation samples: JumpStart's prompts (and questions about the run's own companies), before and after.

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
from tasks.io import atomic_write_json
from tasks.models import device, load_tokenizer
from tasks.progress import OwnLine, Progress, clock, console_bars

log = logging.getLogger(__name__)


def prompts_for(cfg: GenerateConfig, companies: list[str]) -> list[str]:
    """The fixed prompts, then each ticker-aware question once per company of the run."""
    asked = [q.format(company=c) for q in cfg.company_questions for c in companies]
    return list(dict.fromkeys(cfg.prompts + asked))


def check_length(cfg: GenerateConfig, model) -> None:
    """Raises ConfigError for a `generate.max_length` past the model's context: positions it never saw, generated
    without an error on RoPE models, for minutes."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context and cfg.max_length > context:
        raise ConfigError(f"generate.max_length={cfg.max_length} is longer than the model's context ({context} "
                          f"positions); set it to {context} or less")  # fmt: skip


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: GenerateConfig, label: str) -> list[dict]:
    """One row per prompt and returned sequence: the prompt and the text generated after it (`write_eval` has
    checked `cfg.max_length` against the model's context, `check_length`, before its scoring)."""
    dev = device()
    model.to(dev).eval()
    rows = []
    beside_tqdm = OwnLine(log, {"open": None})
    beside_tqdm.info("generation samples (%s): %d prompt(s), %d sample(s) each, up to %d tokens with the prompt",
                     label, len(prompts), cfg.num_return_sequences, cfg.max_length)  # fmt: skip
    bar = Progress(f"generation samples ({label})", len(prompts), "prompts", logger=beside_tqdm, quiet_s=30)
    for i, prompt in enumerate(tqdm(prompts, desc=f"generate ({label})", unit="prompt", disable=not console_bars())):
        torch.manual_seed(cfg.sampling_seed + i)  # the same draws for the base and the fine-tuned model
        ids = tokenizer(prompt, return_tensors="pt").to(dev)
        out = model.generate(**ids, max_length=max(cfg.max_length, ids["input_ids"].shape[1] + 1),
                             do_sample=cfg.do_sample, top_k=cfg.top_k, top_p=cfg.top_p,
                             temperature=cfg.temperature, num_return_sequences=cfg.num_return_sequences,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        for n, seq in enumerate(out):
            text = tokenizer.decode(seq[ids["input_ids"].shape[1] :], skip_special_tokens=True)
            rows.append({"prompt": prompt, "sample": n, "text": text})
        bar.update(i + 1)
    bar.close()
    return rows


def write_samples(out_file: Path, model, tokenizer_dir: str, prompts: list[str], cfg: GenerateConfig, label: str) -> list[dict]:
    start = time.perf_counter()
    rows = generate(model, load_tokenizer(tokenizer_dir), prompts, cfg, label)
    seconds = time.perf_counter() - start
    atomic_write_json(out_file, {"settings": cfg.model_dump(), "seconds": seconds, "rows": rows})
    log.info("generation samples (%s): %d sample(s) in %s, written to %s", label, len(rows), clock(seconds), out_file)
    return rows


def side_by_side(base: list[dict], tuned: list[dict]) -> dict[str, list]:
    """Columns for `mlflow.log_table`: prompt, sample, base model, fine-tuned model."""
    keyed = {(r["prompt"], r["sample"]): r["text"] for r in tuned}
    return {
        "prompt": [r["prompt"] for r in base],
        "sample": [r["sample"] for r in base],
        "base_model": [r["text"] for r in base],
        "fine_tuned": [keyed.get((r["prompt"], r["sample"]), "") for r in base],
    }
