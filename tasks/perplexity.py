"""Stage 5: perplexity on the held-out MD&A, exp(total NLL / total predicted tokens).

Documents longer than the window are scored with a sliding window and a stride (the fixed-length-model
method): every token after the first is scored exactly once, with as much left context as the window allows.
Base and fine-tuned models go through the same function.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import load_from_disk
from tqdm.auto import tqdm

from edgar_tune.config import ConfigError, EvalConfig, GenerateConfig
from kernels.fused_linear_ce import IGNORE_INDEX
from kernels.hf import causal_lm_loss, resolve_backend
from tasks.io import atomic_write_json
from tasks.models import base_model_path, device, load_causal_lm
from tasks.progress import OwnLine, Progress, console_bars

log = logging.getLogger(__name__)


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for each window; positions 1..n-1 are each scored once.

    A window's first token has no context inside it, so consecutive windows overlap by at least one token
    (the stride is capped at max_length - 1); otherwise those tokens would silently go unscored.
    """
    stride = max(1, min(stride, max_length - 1))
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        if end == n_tokens:
            return out
        prev_end, begin = end, begin + stride


@torch.no_grad()
def document_nll(model, ids: list[int], max_length: int, stride: int, dev: str, batch_size: int = 1,
                 kernel: str = "off") -> tuple[float, int]:  # fmt: skip
    """Sum of negative log-likelihoods (nats) and number of tokens scored, for one document.

    Windows of equal length go through the model `batch_size` at a time; the sums do not depend on it.
    """
    total, count = 0.0, 0
    spans = windows(len(ids), max_length, stride)
    i = 0
    while i < len(spans):
        width = spans[i][1] - spans[i][0]
        group = [spans[i]]
        while len(group) < batch_size and i + len(group) < len(spans):
            nxt = spans[i + len(group)]
            if nxt[1] - nxt[0] != width:
                break
            group.append(nxt)
        i += len(group)
        batch = torch.tensor([ids[b:e] for b, e, _ in group], device=dev)
        if kernel != "off":  # the same sums from hidden states, without the window x vocab logits
            labels = batch.clone()
            for row, (begin, _, first) in enumerate(group):
                labels[row, : first - begin] = IGNORE_INDEX  # context only; scored from first on
            total += causal_lm_loss(model, batch, labels, reduction="sum", backend=kernel).item()
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
            continue
        logits = model(input_ids=batch).logits.float()
        for row, (begin, end, first) in enumerate(group):
            # logits at position t predict token t+1; score targets first..end-1.
            targets = batch[row, first - begin :]
            preds = logits[row, first - begin - 1 : end - begin - 1]
            total += F.cross_entropy(preds, targets, reduction="sum").item()
            count += targets.numel()
    return total, count


def cap_documents(docs: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Keep the first `max_tokens` tokens over the documents in order (-1: all)."""
    if max_tokens < 0:
        return docs
    out, left = [], max_tokens
    for ids in docs:
        if left < 2:
            break
        out.append(ids[:left])
        left -= len(out[-1])
    return out


@torch.no_grad()
def example_nll(model, ids: list[int], labels: list[int], dev: str, kernel: str = "off") -> tuple[float, int]:
    """NLL of an instruction example's completion tokens (labels != -100), the prompt as context only."""
    x = torch.tensor(ids, device=dev).unsqueeze(0)
    y = torch.tensor(labels, device=dev)
    if kernel != "off":
        nll = causal_lm_loss(model, x, y.unsqueeze(0), reduction="sum", backend=kernel).item()
        return nll, int((y[1:] != IGNORE_INDEX).sum())
    logits = model(input_ids=x).logits[0, :-1].float()
    targets = y[1:]
    keep = targets != -100
    return F.cross_entropy(logits[keep], targets[keep], reduction="sum").item(), int(keep.sum())


def evaluate_model(model, val, cfg: EvalConfig, block_length: int, label: str) -> dict:
    """Per-document (or per-example) and token-weighted overall perplexity.

    `eval.max_val_samples` caps the text scored: that many blocks of held-out tokens, or that many instruction
    examples, whose completions alone are scored.
    """
    from tasks.blocks import row_meta

    max_length = cfg.max_length if cfg.max_length > 0 else block_length
    stride = cfg.stride if cfg.stride > 0 else max(1, max_length // 2)
    if stride > max_length:  # eval.max_length=-1: the block length, known once tokenized
        raise ConfigError(f"eval.stride={stride} is longer than the window ({max_length} tokens, the block length); "
                          "tokens between windows would go unscored: set eval.stride to the window or less"
                          )  # fmt: skip
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max_length > context:  # positions the model never saw: scores it was not made to give
        raise ConfigError(f"eval.max_length={max_length} is longer than the model's context ({context} positions); "
                          f"set it to {context} or less, or -1 for the block length")  # fmt: skip
    kernel = resolve_backend(cfg.fused_linear_ce, "eval.fused_linear_ce")
    dev = device()
    model.to(dev).eval()
    instruction = "labels" in val.column_names
    if instruction:
        n = len(val) if cfg.max_val_samples < 0 else min(len(val), cfg.max_val_samples)
        docs = list(val["input_ids"][:n])
    else:
        cap = cfg.max_val_samples * block_length if cfg.max_val_samples > 0 else -1
        docs = cap_documents(list(val["input_ids"]), cap)
    per_doc, nll, count = [], 0.0, 0
    start = time.perf_counter()
    beside_tqdm = OwnLine(log, {"open": None})
    bar, fed = Progress(f"perplexity ({label})", sum(map(len, docs)), "tokens", logger=beside_tqdm, quiet_s=30), 0
    for i, ids in enumerate(tqdm(docs, desc=f"perplexity ({label})", unit="doc", disable=not console_bars())):
        if instruction:
            doc_nll, doc_count = example_nll(model, ids, val[i]["labels"], dev, kernel)
        else:
            doc_nll, doc_count = document_nll(model, ids, max_length, stride, dev, cfg.per_device_eval_batch_size,
                                              kernel)  # fmt: skip
        nll, count = nll + doc_nll, count + doc_count
        meta = row_meta(val[i])
        per_doc.append(meta | {"tokens": doc_count, "nll": doc_nll, "perplexity": _ppl(doc_nll, doc_count)})
        fed += len(ids)
        bar.update(fed, f"perplexity so far {_ppl(nll, count):.3f}")
    ppl = _ppl(nll, count)
    if not math.isfinite(ppl):
        raise FloatingPointError(f"{label} perplexity is {ppl}: the model produced NaN/inf; nothing registered")
    return {"perplexity": ppl, "nll": nll, "tokens": count, "max_length": max_length, "stride": stride,
            "scored": "completion tokens" if instruction else "all tokens", "loss_kernel": kernel, "documents": per_doc,
            "seconds": time.perf_counter() - start}  # fmt: skip


def _ppl(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")


def write_eval(out_file: Path, tokenize_dir: Path, cfg: EvalConfig, adapter_or_model: Path | None,
               gen: GenerateConfig | None = None, companies: list[str] | None = None) -> dict:  # fmt: skip
    """Score the base model (no weights given) or the fine-tuned one, and write the result atomically.

    With `gen`, the same model then generates the samples, written beside as `*.samples.json`: for text to
    continue (`prompts_for`), or for an instruction-tuned run, held-out examples (`held_out_prompts`).
    """
    stats = json.loads((tokenize_dir / "stats.json").read_text())
    base = base_model_path(tokenize_dir)
    if adapter_or_model is None:
        model, label = load_causal_lm(base), "base"
    elif adapter_or_model.name == "adapter":
        model, label = load_causal_lm(base, adapter=str(adapter_or_model)), "fine-tuned"
    else:
        model, label = load_causal_lm(str(adapter_or_model)), "fine-tuned"
    if gen is not None and gen.enabled:  # before the scoring, which takes longer
        from tasks.generate import check_length

        check_length(gen, model)
    val = load_from_disk(str(tokenize_dir / "val"))
    result = evaluate_model(model, val, cfg, stats["block_length"], label)
    atomic_write_json(out_file, result)
    if gen is not None and gen.enabled:
        from tasks.generate import held_out_prompts, prompts_for, write_samples

        # an instruction-tuned model answers prompts in its template: held-out ones, not text to continue
        instruction = "labels" in val.column_names
        prompts = held_out_prompts(val, gen.held_out) if instruction else prompts_for(gen, companies or [])
        if prompts:
            write_samples(out_file.with_suffix(".samples.json"), model, base, prompts, gen, label)
    return result
