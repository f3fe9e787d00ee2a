"""LoRA's down projection with dropout: peft's `lora_A(dropout(x))` against `train.lean_lora`'s (kernels/lora.py).

    python bench/lora_down.py           # a table and bench/results/<date>-lora-down-<device>.json

The adapted projections' input at Llama-2-7B's width (4096) and SmolLM2-135M's (576), 4 x 2048 tokens in bf16, LoRA
r=8 with fp32 adapters (`train.lora_half_base`), under bf16 autocast as the Trainer trains; forward, then backward
to the input and to lora_A's weight. Dropout 0.05 (JumpStart's default) and 0. `ms`: median of
triton.testing.do_bench on a GPU, of 5 calls on the CPU. `alloc MB`: what the pass allocates, by torch.profiler
(kernels' outputs and temporaries: the memory traffic that is not matmuls) on the CPU; `peak MB` on a GPU, over
what was allocated before. `kept MB`: what autograd keeps between the two (saved-tensor hooks); lean_lora keeps the
input, which the projections that read it share, peft a bf16 copy of the dropped input and the mask.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import cpu_host, write_result  # noqa: E402
from kernels.lora import lora_down  # noqa: E402

WIDTHS = {"llama-2-7b": 4096, "smollm2-135m": 576}
TOKENS, RANK = 4 * 2048, 8


def pass_fn(kind: str, hidden: int, p: float, device: str, tokens: int):
    """One forward and backward of the down projection; returns it and what autograd keeps between the two."""
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    a = nn.Linear(hidden, RANK, bias=False, device=device)  # fp32, as peft's adapters under lora_half_base
    dropout = nn.Dropout(p)
    grad = torch.randn(tokens, RANK, device=device, dtype=torch.bfloat16)

    def forward() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16):
            return a(dropout(x.to(a.weight.dtype))) if kind == "peft" else lora_down(x, a.weight, p)

    def step() -> None:
        x.grad = a.weight.grad = None
        forward().backward(grad)

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() != x.data_ptr() and t.data_ptr() != a.weight.data_ptr():  # held anyway
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return step, sum(storages.values()) / 1e6


def measure(step, device: str) -> tuple[float, float]:
    """(ms per pass, MB allocated by it on the CPU or its peak over what was there before on a GPU)."""
    step()
    if device == "cuda":
        from triton.testing import do_bench

        ms = do_bench(step, warmup=10, rep=100, return_mode="median")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return ms, (torch.cuda.max_memory_allocated() - before) / 1e6
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    return statistics.median(times), allocated / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--tokens", type=int, default=TOKENS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for model, hidden in WIDTHS.items():
        for p in (0.05, 0.0):
            base = None
            for kind in ("peft", "lean_lora"):
                step, kept = pass_fn(kind, hidden, p, device, args.tokens)
                ms, memory = measure(step, device)
                base = base or ms
                rows.append({"model": model, "hidden": hidden, "dropout": p, "kind": kind, "ms": ms,
                             "speed": base / ms, "memory_mb": memory, "kept_mb": kept})  # fmt: skip
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_host()
    memory = "peak MB" if device == "cuda" else "alloc MB"
    print(f"\n{name}, torch {torch.__version__}: LoRA r={RANK} down projection, {args.tokens} tokens, bf16 autocast, "
          "forward + backward")  # fmt: skip
    print(f"{'model':<13} {'dropout':>7} {'kind':<10} {'ms':>9} {'speed':>6} {memory:>9} {'kept MB':>8}")
    for r in rows:
        print(f"{r['model']:<13} {r['dropout']:>7} {r['kind']:<10} {r['ms']:>9.3f} {r['speed']:>5.2f}x "
              f"{r['memory_mb']:>9.1f} {r['kept_mb']:>8.1f}")  # fmt: skip
    record = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__,
              "tokens": args.tokens, "rank": RANK, "rows": rows}  # fmt: skip
    write_result(args.out, "lora-down", name, record)


if __name__ == "__main__":
    main()
