"""Stage 4: fine-tune the base model on the packed blocks, with LoRA (default) or in full."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from datasets import load_from_disk

from edgar_tune.config import DEEPSPEED_PRESETS, REPO_ROOT, TrainConfig
from tasks.blocks import base_model_path
from tasks.io import atomic_dir, atomic_write_json, read_json, write_jsonl
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


def deepspeed_config_path(name: str) -> Path:
    """`zero2`, `zero3`, `zero3-offload` (shipped in configs/deepspeed/) or a user's JSON file."""
    path = REPO_ROOT / "configs" / "deepspeed" / f"{name}.json" if name in DEEPSPEED_PRESETS else Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed={name!r}: no such DeepSpeed config file ({path})")
    return path


def resolve_precision(requested: str) -> str:
    """auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU. Half precision on CPU is refused."""
    on_gpu = device() == "cuda"
    if requested == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    if requested in ("bf16", "fp16") and not on_gpu:
        raise ValueError(f"train.precision={requested} needs a GPU; on CPU set train.precision=fp32 (or auto)")
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16: this GPU has no bf16; set train.precision=fp16 (or auto)")
    return requested


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_dist_env() -> None:
    """DeepSpeed wants a process group even for one process; without these variables it looks for MPI."""
    if "RANK" not in os.environ:
        port = str(_free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


def _prepare_deepspeed() -> None:
    import deepspeed.ops

    if device() == "cpu":  # the shared-memory comm op is compiled on first use (~76 s) and buys nothing here
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def write_train_stage(out: Path, tokenize_dir: Path, cfg: TrainConfig) -> dict:
    """Train and write the adapter (or full weights), the tokenizer and the loss history atomically.

    One process trains here; `train.nproc` > 1 or a hostfile runs `tasks.train_worker` under the DeepSpeed
    launcher, which writes into the same temp folder.
    """
    with atomic_dir(out) as tmp:
        if cfg.nproc > 1 or cfg.hostfile:
            _launch(tmp, tokenize_dir, cfg)
            stats = read_json(tmp / "stats.json")
        else:
            stats = train(tmp, tokenize_dir, cfg)
    return stats


def _launch(tmp: Path, tokenize_dir: Path, cfg: TrainConfig) -> None:
    import subprocess
    import sys

    port = _free_port()
    where = ["--hostfile", cfg.hostfile] if cfg.hostfile else ["--num_gpus", str(cfg.nproc)]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *where, "--master_port", str(port),
           "--module", "tasks.train_worker", "--out", str(tmp), "--tokenize-dir", str(tokenize_dir),
           "--config", cfg.model_dump_json()]  # fmt: skip
    log.info("launching %d training processes: %s", cfg.nproc, " ".join(cmd[:8]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not (tmp / "stats.json").exists():
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise RuntimeError(f"DeepSpeed launcher exited with {proc.returncode}; the last lines:\n{tail}")


def train(tmp: Path, tokenize_dir: Path, cfg: TrainConfig) -> dict:
    """Train in this process (one of `WORLD_SIZE` under a launcher); rank 0 writes the results into `tmp`."""
    from transformers import Trainer, TrainingArguments

    precision = resolve_precision(cfg.precision)
    ds_config = None
    if cfg.deepspeed:
        ds_config = str(deepspeed_config_path(cfg.deepspeed))
        _single_process_dist_env()
        _prepare_deepspeed()
    base = base_model_path(tokenize_dir)
    blocks = _select_blocks(tokenize_dir, cfg)
    args = TrainingArguments(
        output_dir=str(tmp / "trainer"),
        num_train_epochs=cfg.epoch,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        weight_decay=cfg.weight_decay,
        warmup_steps=round(cfg.warmup * total_steps(len(blocks), cfg, int(os.environ.get("WORLD_SIZE", "1")))),
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.train_data_split_seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        deepspeed=ds_config,  # before the model is built: ZeRO-3 then builds it sharded
        use_cpu=device() == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    torch.manual_seed(cfg.seed)
    # Under DeepSpeed bf16/fp16 the engine keeps fp32 master weights itself: load the base in half precision.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if cfg.deepspeed else None
    model = load_causal_lm(base, dtype=half or torch.float32)
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model.config.model_type, cfg.lora_target_modules)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=causal_lm_collate)
    if bool(cfg.deepspeed) != trainer.is_deepspeed_enabled:
        raise RuntimeError(f"train.deepspeed={cfg.deepspeed!r} but the Trainer's DeepSpeed is {trainer.is_deepspeed_enabled}")
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    zero_stage = trainer.model_wrapped.zero_optimization_stage() if cfg.deepspeed else None
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in history]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"training loss is not finite ({losses[-3:]}); lower `train.learning_rate`")
    weights = "adapter" if cfg.mode == "lora" else "model"
    trainer.save_model(str(tmp / weights))  # every rank: ZeRO-3 gathers the shards for rank 0 to write
    if not trainer.is_world_process_zero():
        return {}
    (tmp / weights / "training_args.bin").unlink(missing_ok=True)
    load_tokenizer(base).save_pretrained(tmp / weights)
    write_jsonl(tmp / "loss.jsonl", [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get(
        "learning_rate"), "epoch": h.get("epoch")} for h in history])  # fmt: skip
    world = trainer.args.world_size
    stats = {
        "mode": cfg.mode,
        "weights": weights,
        "steps": trainer.state.global_step,
        "train_blocks": len(blocks),
        "train_tokens_seen": trainer.state.global_step * cfg.per_device_train_batch_size
        * cfg.gradient_accumulation_steps * world * len(blocks[0]["input_ids"]),
        "trainable_parameters": trainable,
        "final_loss": losses[-1],
        "train_loss": result.training_loss,
        "seconds": seconds,
        "engine": "deepspeed" if cfg.deepspeed else "hf-trainer",
        "deepspeed_config": cfg.deepspeed,
        "zero_stage": zero_stage,
        "world_size": world,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "device": device(),
        "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision],
    }
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    atomic_write_json(tmp / "stats.json", stats)
    return stats
