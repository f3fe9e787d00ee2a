"""The loss of a frozen LM head with a few trainable token rows (`train.trainable_tokens`, peft's trainable tokens):
the fused cross-entropy's replaced rows against the merged head peft hands it.

    python bench/token_rows.py          # a table and bench/results/<date>-token-rows-<device>.json

peft reads a head with trainable tokens as a merged copy (`weight.index_copy(0, index, values)`), whose gradient
is V x hidden; `replaced=(index, values)` (kernels/fused_linear_ce.py) computes those rows' logits apart and their
gradient alone. Rows: the frozen head with no token rows (what LoRA alone costs, the floor); the fused kernel on
peft's merged head (what `train.fused_linear_ce` did before it read the rows); the kernel's replaced rows; and the
materialized logits on the merged head (`train.fused_linear_ce=off`, peft's and HF's own loss). Forward and
backward to the hidden states and the rows, 8 rows, in fp32 on the CPU and bf16 on a GPU. `ms`: median of
triton.testing.do_bench on a GPU, of 5 calls on the CPU; `alloc MB` (CPU, torch.profiler) or `peak MB` (GPU) as in
bench/lora_down.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import cpu_host, write_result  # noqa: E402
from bench.lora_down import measure  # noqa: E402
from kernels.fused_linear_ce import fused_linear_cross_entropy  # noqa: E402

HEADS = {"smollm2-135m": (49152, 576), "llama-2-7b": (32000, 4096)}
KINDS = ("frozen head", "merged head", "replaced rows", "materialized")
ROWS = 8


def pass_fn(kind: str, vocab: int, hidden: int, tokens: int, device: str, dtype: torch.dtype):
    """One forward and backward of the loss for `kind`."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g)).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype)
    index = torch.arange(vocab - ROWS, vocab, device=device)  # added tokens sit at the vocabulary's end
    values = weight[index].clone().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)

    def step() -> None:
        h.grad = values.grad = None
        if kind == "frozen head":
            loss = fused_linear_cross_entropy(h, weight, labels)
        elif kind == "replaced rows":
            loss = fused_linear_cross_entropy(h, weight, labels, replaced=(index, values))
        elif kind == "merged head":
            loss = fused_linear_cross_entropy(h, weight.index_copy(0, index, values), labels)
        else:
            loss = F.cross_entropy(F.linear(h, weight.index_copy(0, index, values)).float(), labels)
        loss.backward()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--models", default=",".join(HEADS), help="of " + ", ".join(HEADS))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for model in args.models.split(","):
        vocab, hidden = HEADS[model]
        base = None
        for kind in KINDS:
            ms, memory = measure(pass_fn(kind, vocab, hidden, args.tokens, device, dtype), device)
            base = base or ms
            rows.append({"model": model, "vocab": vocab, "hidden": hidden, "kind": kind, "ms": ms,
                         "vs_frozen": ms / base, "memory_mb": memory})  # fmt: skip
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_host()
    memory = "peak MB" if device == "cuda" else "alloc MB"
    print(f"\n{name}, torch {torch.__version__}: an LM head's loss with {ROWS} trainable token rows, {args.tokens} "
          f"tokens, {str(dtype).removeprefix('torch.')}, forward + backward")  # fmt: skip
    print(f"{'model':<13} {'kind':<14} {'ms':>9} {'x frozen':>9} {memory:>9}")
    for r in rows:
        print(f"{r['model']:<13} {r['kind']:<14} {r['ms']:>9.1f} {r['vs_frozen']:>8.2f}x {r['memory_mb']:>9.1f}")
    record = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__,
              "tokens": args.tokens, "rows": ROWS, "dtype": str(dtype), "results": rows}  # fmt: skip
    write_result(args.out, "token-rows", name, record)


if __name__ == "__main__":
    main()
