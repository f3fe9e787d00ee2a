"""GPU check of the training engine (issue 4): `tasks.finetune.train`, as the pipeline's stage 4 runs it, with
DeepSpeed on random-weight models of real shapes (speed and memory do not depend on the weight values).

    python bench/gpu_engine.py                       # both checks below, a table, and bench/results/*.json
    python bench/gpu_engine.py --only smollm2-135m

- SmolLM2-135M (Llama, 30 layers, hidden 576) LoRA r=8, ZeRO-2, bf16, gradient checkpointing, 2048 tokens;
- Llama-2-7B shape (32 layers, hidden 4096) LoRA r=8, ZeRO-3, bf16, gradient checkpointing, 2048 tokens, one step.

Token ids are random (uniform over the vocabulary): the loss is meaningless, the work is the real work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=False),
}  # fmt: skip
CHECKS = {  # name: (shape, deepspeed, steps, batch)
    "smollm2-135m": ("smollm2-135m", "zero2", 20, 4),
    "llama-2-7b": ("llama-2-7b", "zero3", 1, 1),
}


def tokenize_dir(root: Path, shape: str, seq: int, n_blocks: int) -> Path:
    """A stage-3 folder as the pipeline writes it: random-weight base model, tokenizer, packed blocks."""
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    base = root / "base"
    config = LlamaConfig(**SHAPES[shape])
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base)
    del model
    vocab = {"<unk>": 0, "</s>": 1}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), eos_token="</s>")
    tok.save_pretrained(base)
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, config.vocab_size, (n_blocks, seq), generator=gen).tolist()
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(root / "tok" / "train")
    (root / "tok" / "stats.json").write_text(json.dumps({"base_model": {"kind": "path_or_hub", "path": str(base)}}))
    return root / "tok"


def run_check(name: str, seq: int) -> dict:
    from edgar_tune.config import TrainConfig
    from tasks.finetune import train

    shape, ds, steps, batch = CHECKS[name]
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tok = tokenize_dir(Path(tmp), shape, seq, max(steps * batch, 8))
        cfg = TrainConfig(mode="lora", lora_r=8, lora_alpha=16, max_steps=steps, per_device_train_batch_size=batch,
                          learning_rate=1e-4, deepspeed=ds, precision="bf16", logging_steps=1)  # fmt: skip
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        stats = train(Path(tmp) / "out", tok, cfg)
        wall = time.perf_counter() - start
    return {
        "check": name, "shape": shape, "seq_len": seq, "batch": batch, "steps": stats["steps"],
        "engine": stats["engine"], "zero_stage": stats["zero_stage"], "dtype": stats["dtype"],
        "gradient_checkpointing": stats["gradient_checkpointing"], "trainable_parameters": stats["trainable_parameters"],
        "train_seconds": stats["seconds"], "wall_seconds_with_load": wall,
        "tokens_per_s": stats["train_tokens_seen"] / stats["seconds"],
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "final_loss": stats["final_loss"],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=list(CHECKS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    rows = [run_check(name, args.seq) for name in CHECKS if args.only in (None, name)]
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}")
    print(f"{'check':<14} {'engine':<10} {'ZeRO':>4} {'dtype':<9} {'steps':>5} {'tokens/s':>9} {'peak GB':>8} {'s/step':>7}")
    for r in rows:
        print(f"{r['check']:<14} {r['engine']:<10} {r['zero_stage']:>4} {r['dtype']:<9} {r['steps']:>5} "
              f"{r['tokens_per_s']:>9.0f} {r['peak_mem_gb']:>8.2f} {r['train_seconds'] / r['steps']:>7.2f}")  # fmt: skip
    record = {"date": dt.date.today().isoformat(), "device": device, "torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = device.lower().replace(" ", "-")
    path = args.out / f"{record['date']}-engine-{slug}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
