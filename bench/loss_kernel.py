"""The fused linear + cross-entropy on a GPU: correctness against float64 and speed/memory against materialized logits.

    python bench/loss_kernel.py            # on a GPU: checks, then a table, and bench/results/<date>-loss-<device>.json

Checks: the Triton and chunked-PyTorch backends against a float64 reference (loss and gradients for hidden states
and the head), fresh random inputs per case, odd shapes, fp32/bf16/fp16, ignore_index, mean and sum, by
||ours - ref|| / ||ref||.

Timing: loss forward + backward (gradients for the hidden states; the head frozen, as in LoRA) at the LM-head
shapes of SmolLM2-135M (4 x 2048 tokens, hidden 576, vocabulary 49152) and Llama-2-7B (hidden 4096, 32000), bf16.
Baseline: `F.cross_entropy` on materialized `(hidden @ W.T).float()` logits, as the HF models compute their loss.
Median of triton.testing.do_bench; peak is `max_memory_allocated` above the inputs.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import write_result  # noqa: E402
from bench.gpu_engine import kernel_bench_args  # noqa: E402
from kernels.fused_linear_ce import IGNORE_INDEX, fused_linear_cross_entropy  # noqa: E402

CHECKS = [(3, 423, 32000, 64), (2, 1000, 49152, 576), (1, 257, 5003, 128), (2, 2048, 128256, 256)]  # B, T, V, d
LIMIT = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # relative norm error
TIMED = {"smollm2-135m": (4, 2048, 49152, 576), "llama-2-7b": (4, 2048, 32000, 4096)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(shape, dtype, weight_grad):
    b, t, v, d = shape
    hidden = (torch.randn(b, t, d, device="cuda") * 2).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda") / d**0.5).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (b, t), device="cuda")
    labels[torch.rand(b, t, device="cuda") < 0.2] = IGNORE_INDEX
    return hidden, weight, labels


def check(shape, dtype, reduction, backend) -> dict:
    hidden, weight, labels = _inputs(shape, dtype, weight_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, shift=True, backend=backend)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = (h64 @ w64.T)[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, shape[2]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction=reduction)  # fmt: skip
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    errs = {"loss": _rel(loss.detach(), ref.detach()), "grad_hidden": _rel(gh, rh), "grad_weight": _rel(gw, rw)}
    finite = all(torch.isfinite(x).all() for x in (loss, gh, gw))
    ok = finite and max(errs.values()) < LIMIT[dtype]
    return {"shape": list(shape), "dtype": str(dtype).split(".")[1], "reduction": reduction, "backend": backend,
            **errs, "ok": bool(ok)}  # fmt: skip


def _materialized(hidden, weight, labels):
    logits = (hidden @ weight.T).float()[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def time_loss(name: str, shape, method: str) -> dict:
    from triton.testing import do_bench

    torch.cuda.empty_cache()
    hidden, weight, labels = _inputs(shape, torch.bfloat16, weight_grad=False)

    def step():
        hidden.grad = None
        if method == "materialized":
            loss = _materialized(hidden, weight, labels)
        else:
            loss = fused_linear_cross_entropy(hidden, weight, labels, shift=True, backend=method)
        loss.backward()

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    ms = do_bench(step, warmup=100, rep=500, return_mode="median")
    tokens = shape[0] * shape[1]
    return {"model": name, "method": method, "ms": ms, "tokens_per_s": tokens / ms * 1e3, "peak_gb": peak}


def main() -> None:
    args = kernel_bench_args(__doc__, "loss_kernel.py")
    checks = [check(s, dt_, red, be) for s in CHECKS for dt_ in LIMIT for red in ("mean", "sum")
              for be in ("triton", "torch")]  # fmt: skip
    bad = [c for c in checks if not c["ok"]]
    worst = {}
    for c in checks:
        key = (c["backend"], c["dtype"])
        worst[key] = max(worst.get(key, 0.0), c["loss"], c["grad_hidden"], c["grad_weight"])
    timings = [time_loss(name, shape, m) for name, shape in TIMED.items() for m in ("materialized", "torch", "triton")]
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}: {len(checks) - len(bad)}/{len(checks)} checks within limits")
    for (backend, dtype), err in sorted(worst.items()):
        print(f"  worst relative error {backend:<6} {dtype:<9} {err:.2e} (limit {LIMIT[getattr(torch, dtype)]:.0e})")
    for c in bad:
        print(f"  FAILED {c}")
    print(f"\n{'model head':<14} {'method':<13} {'ms fwd+bwd':>10} {'tokens/s':>12} {'peak GB':>8}")
    for t in timings:
        print(f"{t['model']:<14} {t['method']:<13} {t['ms']:>10.2f} {t['tokens_per_s']:>12.0f} {t['peak_gb']:>8.3f}")
    record = {"date": dt.date.today().isoformat(), "device": device, "torch": torch.__version__, "checks": checks,
              "timings": timings}  # fmt: skip
    write_result(args.out, "loss", device, record)
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
