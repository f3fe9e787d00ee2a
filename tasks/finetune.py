"""Stage 4: fine-tune the base model on the packed blocks, with LoRA (default) or in full."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch
from datasets import load_from_disk

from edgar_tune.config import TrainConfig
from tasks.blocks import base_model_path
from tasks.io import atomic_dir, atomic_write_json, write_jsonl
from tasks.models import device, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)

# LoRA targets per architecture (config.model_type): attention and MLP projections, as JumpStart's scripts
# and the QLoRA paper adapt every linear layer of the blocks.
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def lora_targets(model_type: str, override: list[str] | None) -> list[str]:
    if override:
        return override
    if model_type not in LORA_TARGETS:
        raise ValueError(
            f"no default LoRA targets for architecture `{model_type}`; set `train.lora_target_modules` "
            f"(known: {', '.join(sorted(LORA_TARGETS))})"
        )
    return LORA_TARGETS[model_type]


def total_steps(n_blocks: int, cfg: TrainConfig, world_size: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    return max(1, math.ceil(math.ceil(n_blocks / per_step) * cfg.epoch))


def _select_blocks(tokenize_dir: Path, cfg: TrainConfig):
    blocks = load_from_disk(str(tokenize_dir / "train"))
    if cfg.max_train_samples > 0 and cfg.max_train_samples < len(blocks):
        blocks = blocks.shuffle(seed=cfg.train_data_split_seed).select(range(cfg.max_train_samples))
    return blocks


def causal_lm_collate(features: list[dict]) -> dict:
    """Stack packed blocks; labels are the inputs (the model shifts them), no padding needed."""
    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def write_train_stage(out: Path, tokenize_dir: Path, cfg: TrainConfig) -> dict:
    """Train and write the adapter (or full weights), the tokenizer and the loss history atomically."""
    from transformers import Trainer, TrainingArguments

    base = base_model_path(tokenize_dir)
    blocks = _select_blocks(tokenize_dir, cfg)
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(base)
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model.config.model_type, cfg.lora_target_modules)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = total_steps(len(blocks), cfg)
    with atomic_dir(out) as tmp:
        args = TrainingArguments(
            output_dir=str(tmp / "trainer"),
            num_train_epochs=cfg.epoch,
            max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            weight_decay=cfg.weight_decay,
            warmup_steps=round(cfg.warmup * steps),
            lr_scheduler_type=cfg.lr_scheduler,
            logging_steps=cfg.logging_steps,
            save_strategy="no",
            report_to=[],
            seed=cfg.seed,
            data_seed=cfg.train_data_split_seed,
            gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
            use_cpu=device() == "cpu",
            dataloader_num_workers=0,
            disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=causal_lm_collate)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        history = [h for h in trainer.state.log_history if "loss" in h]
        losses = [h["loss"] for h in history]
        if not losses or not all(math.isfinite(x) for x in losses):
            raise FloatingPointError(f"training loss is not finite ({losses[-3:]}); lower `train.learning_rate`")
        weights = "adapter" if cfg.mode == "lora" else "model"
        model.save_pretrained(tmp / weights, safe_serialization=True)
        load_tokenizer(base).save_pretrained(tmp / weights)
        write_jsonl(tmp / "loss.jsonl", [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get(
            "learning_rate"), "epoch": h.get("epoch")} for h in history])  # fmt: skip
        stats = {
            "mode": cfg.mode,
            "weights": weights,
            "steps": trainer.state.global_step,
            "train_blocks": len(blocks),
            "train_tokens_seen": trainer.state.global_step * cfg.per_device_train_batch_size
            * cfg.gradient_accumulation_steps * len(blocks[0]["input_ids"]),
            "trainable_parameters": trainable,
            "final_loss": losses[-1],
            "train_loss": result.training_loss,
            "seconds": seconds,
            "engine": "hf-trainer",
            "zero_stage": None,
            "world_size": 1,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "device": device(),
            "dtype": "float32",
        }
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        atomic_write_json(tmp / "stats.json", stats)
    return stats
