"""An FP8 base layer (kernels/fp8.py, `train.fp8_base`) against the bf16 frozen linear layer it replaces, on a GPU.

    python bench/fp8_linear.py             # on a GPU: a table and bench/results/<date>-fp8-<device>.json
    python bench/fp8_linear.py --smoke     # the same code at tiny widths on the CPU (measures nothing)

The seven projections of one Llama-2-7B layer (q, k, v, o: 4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 ->
4096), forward and the input's gradient (the weights frozen, as under LoRA), at 2048, 4096 and 8192 tokens (micro-
batches 1, 2 and 4 of 2048), bf16. `eager` runs the layer's PyTorch ops as they are, `compiled` the same under
torch.compile, which fuses the quantization of inputs and gradients into the matmuls' neighbours (8192 tokens only:
each shape compiles anew); `exact` is eager without the forward's fast FP8 accumulation (kernels.fp8.FAST_ACCUM),
at 8192 tokens. Median of triton.testing.do_bench. TFLOP/s counts 2 matmuls of 2·M·N·K FLOPs per
projection. `plain` is the bf16 nn.Linear (fp32 with --smoke), `error` ||fp8 - plain|| / ||plain|| of the outputs
and of the input gradients, the worst projection's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import cpu_host, write_result  # noqa: E402
from bench.loss_kernel import _rel  # noqa: E402
from kernels import fp8 as fp8_kernels  # noqa: E402
from kernels.fp8 import Fp8Linear  # noqa: E402

HIDDEN, MLP = 4096, 11008
TOKENS = (2048, 4096, 8192)


def projections(hidden: int, mlp: int) -> list[tuple[int, int]]:
    """(in, out) of one Llama layer's q, k, v, o, gate, up and down."""
    return [(hidden, hidden)] * 4 + [(hidden, mlp)] * 2 + [(mlp, hidden)]


def layer(kind: str, shapes: list[tuple[int, int]], device: str, dtype: torch.dtype) -> list[nn.Module]:
    torch.manual_seed(0)
    linears = [nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False) for k, n in shapes]
    if kind == "plain":
        return linears
    return [Fp8Linear(m) for m in linears]


def step_fn(modules: list[nn.Module], tokens: int, device: str, dtype: torch.dtype, compiled: bool):
    """One forward + input-gradient pass over every projection, each on its own random input (drawn from torch's
    global seed: the same seed, the same inputs for every kind of layer)."""
    xs = [torch.randn(tokens, m.in_features, device=device, dtype=dtype, requires_grad=True) for m in modules]
    dys = [torch.randn(tokens, m.out_features, device=device, dtype=dtype) for m in modules]
    calls = [torch.compile(m, dynamic=False) if compiled else m for m in modules]

    def step():
        outs = [f(x) for f, x in zip(calls, xs, strict=True)]
        return outs, torch.autograd.grad(outs, xs, dys)

    return step


def timed(step, smoke: bool) -> float:
    """Milliseconds per call: do_bench's median on a GPU, a few calls' mean on the CPU."""
    step()  # warm-up, compilation
    if smoke:
        start = time.perf_counter()
        for _ in range(3):
            step()
        return (time.perf_counter() - start) / 3 * 1e3
    from triton.testing import do_bench

    return do_bench(step, warmup=25, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--smoke", action="store_true", help="tiny widths on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/fp8_linear.py measures a GPU; on the CPU run it with --smoke, or `pytest -k fp8`")
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16  # the CPU's FP8 matmul returns fp32 as well
    shapes = projections(64, 128) if args.smoke else projections(HIDDEN, MLP)
    token_counts = (32, 64) if args.smoke else TOKENS
    plain, fp8 = layer("plain", shapes, device, dtype), layer("fp8", shapes, device, dtype)
    rows = []
    for tokens in token_counts:
        flops = sum(2 * 2 * tokens * k * n for k, n in shapes)
        torch.manual_seed(1)
        want_outs, want_grads = step_fn(plain, tokens, device, dtype, False)()
        runs = [("plain", plain, "eager"), ("fp8", fp8, "eager")]
        if tokens == token_counts[-1]:
            runs.append(("fp8", fp8, "exact"))
            if not args.smoke:  # the CPU compiles for minutes; tests compile the layer
                runs.append(("fp8", fp8, "compiled"))
        base_ms = None
        for kind, modules, mode in runs:
            torch.manual_seed(1)
            fp8_kernels.FAST_ACCUM = mode != "exact"
            step = step_fn(modules, tokens, device, dtype, mode == "compiled")
            outs, grads = step()
            ms = timed(step, args.smoke)
            fp8_kernels.FAST_ACCUM = True
            base_ms = base_ms or ms
            rows.append({"tokens": tokens, "kind": kind, "mode": mode, "ms": ms,
                         "tflops": flops / ms / 1e9, "speed": base_ms / ms,
                         "out_error": max(_rel(o, w) for o, w in zip(outs, want_outs, strict=True)),
                         "grad_error": max(_rel(g, w) for g, w in zip(grads, want_grads, strict=True))})  # fmt: skip
    name = f"{cpu_host()} (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"\n{name}, torch {torch.__version__}: one Llama layer's 7 projections, forward + input gradient")
    print(f"{'tokens':>7} {'base':<5} {'mode':<9} {'ms':>8} {'TFLOP/s':>8} {'speed':>6} {'out err':>8} {'grad err':>9}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['kind']:<5} {r['mode']:<9} {r['ms']:>8.3f} {r['tflops']:>8.1f} {r['speed']:>5.2f}x "
              f"{r['out_error']:>8.4f} {r['grad_error']:>9.4f}")  # fmt: skip
    record = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__, "shapes": shapes,
              "rows": rows}  # fmt: skip
    write_result(args.out, "fp8", "smoke-" + cpu_host() if args.smoke else name, record)


if __name__ == "__main__":
    main()
