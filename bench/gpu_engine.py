"""GPU check of the training engine (issue 4): `tasks.finetune.train`, as the pipeline's stage 4 runs it, on
random-weight models of real shapes (speed and memory do not depend on the weight values), each check in its own
process, with the memory planner's estimate printed beside the measured peak.

    python bench/gpu_engine.py                       # every check below, a table, and bench/results/*.json
    python bench/gpu_engine.py --only smollm2-zero2

- smollm2-zero2: SmolLM2-135M shape (Llama, 30 layers, hidden 576) LoRA r=8, ZeRO-2, bf16, gradient checkpointing,
  4 x 2048 tokens per step;
- smollm2-fsdp: the same through PyTorch FSDP (one process) instead of DeepSpeed;
- smollm2-int8: the same with the base in 8-bit (bitsandbytes), no DeepSpeed;
- llama2-7b-zero3: Llama-2-7B shape (32 layers, hidden 4096) LoRA r=8, ZeRO-3, bf16, gradient checkpointing,
  2048 tokens, one optimizer step;
- llama2-7b-offload: the same with ZeRO-3 parameters and optimizer state offloaded to the host;
- llama2-7b-nf4: the same model with its base in 4-bit NF4 (QLoRA), no DeepSpeed, one step.

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

from bench.common import write_result  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=False),
}  # fmt: skip
CHECKS = {  # name: (shape, train settings, steps, batch)
    "smollm2-zero2": ("smollm2-135m", {"deepspeed": "zero2"}, 20, 4),
    "smollm2-fsdp": ("smollm2-135m", {"enable_fsdp": True}, 20, 4),
    "smollm2-int8": ("smollm2-135m", {"int8_quantization": True}, 20, 4),
    "llama2-7b-zero3": ("llama-2-7b", {"deepspeed": "zero3"}, 1, 1),
    "llama2-7b-offload": ("llama-2-7b", {"deepspeed": "zero3-offload"}, 1, 1),
    "llama2-7b-nf4": ("llama-2-7b", {"int4_quantization": True}, 1, 1),
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
    stats = {"base_model": {"kind": "path_or_hub", "path": str(base)}, "block_length": seq, "train_blocks": n_blocks}
    (root / "tok" / "stats.json").write_text(json.dumps(stats))
    return root / "tok"


def run_check(name: str, seq: int) -> dict:
    from edgar_tune.config import EvalConfig, TrainConfig
    from tasks.finetune import memory_plan, train

    shape, settings, steps, batch = CHECKS[name]
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tok = tokenize_dir(Path(tmp), shape, seq, max(steps * batch, 8))
        cfg = TrainConfig(mode="lora", lora_r=8, lora_alpha=16, max_steps=steps, per_device_train_batch_size=batch,
                          learning_rate=1e-4, precision="bf16", logging_steps=1, eval_steps=0,
                          early_stopping_patience=0, load_best_model_at_end=False, save_steps=0,
                          memory_check="warn", **settings)  # fmt: skip
        plan = memory_plan(tok, cfg, "bf16")
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        stats = train(Path(tmp) / "out", tok, cfg, EvalConfig(), Path(tmp) / "ckpt")
        wall = time.perf_counter() - start
    return {
        "check": name, "shape": shape, "seq_len": seq, "batch": batch, "steps": stats["steps"],
        "engine": stats["engine"], "zero_stage": stats["zero_stage"], "quantization": stats["quantization"],
        "dtype": stats["dtype"], "gradient_checkpointing": stats["gradient_checkpointing"],
        "trainable_parameters": stats["trainable_parameters"], "train_seconds": stats["seconds"],
        "wall_seconds_with_load": wall, "tokens_per_s": stats["train_tokens_seen"] / stats["seconds"],
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "planned_gb": plan["estimate_gb"],
        "plan_engine": plan["engine"], "final_loss": stats["final_loss"],
    }  # fmt: skip


def run_isolated(name: str, seq: int) -> dict:
    """One check per process: DeepSpeed, FSDP and bitsandbytes each set up process-wide state."""
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([sys.executable, __file__, "--only", name, "--seq", str(seq), "--row", f.name],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-25:])
            print(f"--- {name} failed (exit {proc.returncode}):\n{tail}")
            return {"check": name, "error": proc.stdout.splitlines()[-1] if proc.stdout else str(proc.returncode)}
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=list(CHECKS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--row", type=Path, help="(internal) write the one check's row here")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    if args.row:
        args.row.write_text(json.dumps(run_check(args.only, args.seq)))
        return
    rows = [run_isolated(name, args.seq) for name in CHECKS if args.only in (None, name)]
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}")
    print(f"{'check':<16} {'engine':<10} {'ZeRO':>4} {'quant':<5} {'steps':>5} {'tokens/s':>9} {'peak GB':>8} "
          f"{'plan GB':>8} {'s/step':>7}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['check']:<16} FAILED: {r['error'][:100]}")
            continue
        print(f"{r['check']:<16} {r['engine']:<10} {r['zero_stage'] or '-':>4} {r['quantization'] or '-':<5} "
              f"{r['steps']:>5} {r['tokens_per_s']:>9.0f} {r['peak_mem_gb']:>8.2f} {r['planned_gb']:>8.2f} "
              f"{r['train_seconds'] / r['steps']:>7.2f}")  # fmt: skip
    record = {"date": dt.date.today().isoformat(), "device": device, "torch": torch.__version__, "rows": rows}
    write_result(args.out, "engine", device, record)


def kernel_bench_args(doc: str, script: str) -> argparse.Namespace:
    """The command line of a GPU-only kernel benchmark (`--out`); exits where there is no GPU, seeds otherwise."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"bench/{script} measures a GPU; on the CPU run `pytest -k kernel`")
    torch.manual_seed(0)
    return args


if __name__ == "__main__":
    main()
