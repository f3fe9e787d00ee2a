"""The Triton RMSNorm, SwiGLU and rotary embedding (kernels/triton_layers.py) on a GPU: correctness against
float64, and speed and memory against the eager PyTorch they replace.

    python bench/layer_kernels.py          # on a GPU: checks, a table, bench/results/<date>-layers-<device>.json

Checks: output and input gradients against a float64 reference, bf16/fp16/fp32, by ||ours - ref|| / ||ref||.
Timing: forward + backward (the norm's weight frozen, as under LoRA) at SmolLM2-135M's and Llama-2-7B's widths
(4 x 2048 tokens; hidden 576 / 4096, MLP 1536 / 11008, query/key-value heads 9/3 x 64 and 32/32 x 128), bf16.
Baseline: transformers' LlamaRMSNorm, `act_fn(gate) * up` as LlamaMLP computes it, and its apply_rotary_pos_emb on
q and k as attention passes them (transposed views of the projections). Median of triton.testing.do_bench.
`saved GB` is the memory the forward leaves for the backward (what every un-recomputed layer holds), `peak GB` the
peak above the inputs.
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
from bench.loss_kernel import _rel  # noqa: E402
from kernels.triton_layers import rms_norm, rope, swiglu  # noqa: E402

BATCH, SEQ = 4, 2048
TOKENS = BATCH * SEQ
WIDTHS = {"smollm2-135m": (576, 1536), "llama-2-7b": (4096, 11008)}  # hidden, MLP
HEADS = {"smollm2-135m": (9, 3, 64), "llama-2-7b": (32, 32, 128)}  # query heads, key/value heads, head size
KINDS = ("rms_norm", "swiglu", "rope")
LIMIT = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # relative norm error
EPS = 1e-5


def _op(kind: str, method: str, args: tuple):
    """The forward to time on `args`: the Triton kernel or the eager module/ops it replaces."""
    if kind == "rope":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k, cos, sin, heads = args
        fn = rope if method == "triton" else apply_rotary_pos_emb
        return lambda: fn(*_attention_layout(q, k, heads), cos, sin)
    if kind == "swiglu":
        gate, up = args
        return (lambda: swiglu(gate, up)) if method == "triton" else (lambda: F.silu(gate) * up)
    x, weight = args
    if method == "triton":
        return lambda: rms_norm(x, weight, EPS)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[-1], eps=EPS).to(x.device, weight.dtype)
    norm.weight = torch.nn.Parameter(weight, requires_grad=False)  # frozen, as under LoRA
    return lambda: norm(x)


def _attention_layout(q, k, heads):  # noqa: ANN001
    """batch x seq x heads·size projections as attention passes them to the rotation: batch x heads x seq x size."""
    nq, nk, size = heads
    b, s = q.shape[:2]
    return q.view(b, s, nq, size).transpose(1, 2), k.view(b, s, nk, size).transpose(1, 2)


def _rope_inputs(heads: tuple, dtype, batch: int, seq: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    nq, nk, size = heads
    q, k = [torch.randn(batch, seq, n * size, device="cuda").to(dtype).requires_grad_() for n in (nq, nk)]
    rot = LlamaRotaryEmbedding(LlamaConfig(hidden_size=nq * size, num_attention_heads=nq, num_key_value_heads=nk,
                                           head_dim=size, max_position_embeddings=seq)).to("cuda")  # fmt: skip
    cos, sin = rot(q, torch.arange(seq, device="cuda")[None])
    return q, k, cos, sin, heads


def _inputs(kind: str, hidden: int, mlp: int, dtype, tokens: int = TOKENS, heads: tuple = HEADS["llama-2-7b"]):
    if kind == "rope":
        return _rope_inputs(heads, dtype, max(1, tokens // SEQ), min(tokens, SEQ))
    if kind == "rms_norm":
        x = (torch.randn(tokens, hidden, device="cuda") * 3).to(dtype).requires_grad_()
        return x, torch.randn(hidden, device="cuda").to(dtype)
    return tuple((torch.randn(tokens, mlp, device="cuda") * 3).to(dtype).requires_grad_() for _ in range(2))


def check(kind: str, dtype) -> dict:
    args = _inputs(kind, 4096, 11008, dtype, tokens=257)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    wrt = [a for a in tensors if a.requires_grad]
    outs = _outputs(_op(kind, "triton", args))
    dys = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, wrt, dys)
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) for a in tensors]
    if kind == "rms_norm":
        x, w = ref_args
        refs = [w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))]
    elif kind == "rope":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k, cos, sin = ref_args
        refs = list(apply_rotary_pos_emb(*_attention_layout(q, k, args[-1]), cos, sin))
    else:
        refs = [F.silu(ref_args[0]) * ref_args[1]]
    ref_grads = torch.autograd.grad(refs, [a for a in ref_args if a.requires_grad], [d.double() for d in dys])
    errs = {f"out_{i}": _rel(o.detach(), r.detach()) for i, (o, r) in enumerate(zip(outs, refs, strict=True))}
    errs |= {f"grad_{i}": _rel(g, r) for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True))}
    return {"kernel": kind, "dtype": str(dtype).split(".")[1], **errs, "ok": max(errs.values()) < LIMIT[dtype]}


def _outputs(op) -> list:  # noqa: ANN001
    out = op()
    return list(out) if isinstance(out, tuple) else [out]


def time_op(model: str, kind: str, method: str) -> dict:
    from triton.testing import do_bench

    torch.cuda.empty_cache()
    hidden, mlp = WIDTHS[model]
    args = _inputs(kind, hidden, mlp, torch.bfloat16, heads=HEADS[model])
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    op = _op(kind, method, args)
    dys = [torch.randn_like(o) for o in _outputs(op)]

    def step():
        for a in tensors:
            a.grad = None
        torch.autograd.backward(_outputs(op), dys)

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = _outputs(op)
    saved = (torch.cuda.memory_allocated() - base - sum(o.numel() * o.element_size() for o in outs)) / 1e9
    torch.autograd.backward(outs, dys)
    del outs
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    ms = do_bench(step, warmup=50, rep=300, return_mode="median")
    return {"model": model, "kernel": kind, "method": method, "ms": ms, "saved_gb": saved, "peak_gb": peak}


def main() -> None:
    args = kernel_bench_args(__doc__, "layer_kernels.py")
    checks = [check(kind, dtype) for kind in KINDS for dtype in LIMIT]
    timings = [time_op(m, k, how) for m in WIDTHS for k in KINDS for how in ("eager", "triton")]
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}: {sum(c['ok'] for c in checks)}/{len(checks)} checks within limits")
    for c in checks:
        worst = max(v for k, v in c.items() if k.startswith(("out", "grad")))
        print(f"  {c['kernel']:<9} {c['dtype']:<9} worst relative error {worst:.2e}{'' if c['ok'] else '  FAILED'}")
    print(f"\n{'model':<14} {'kernel':<9} {'method':<7} {'ms fwd+bwd':>10} {'saved GB':>9} {'peak GB':>8}")
    for t in timings:
        print(f"{t['model']:<14} {t['kernel']:<9} {t['method']:<7} {t['ms']:>10.3f} {t['saved_gb']:>9.3f} "
              f"{t['peak_gb']:>8.3f}")
    write_result(args.out, "layers", device, {"date": dt.date.today().isoformat(), "device": device,
                                              "torch": torch.__version__, "checks": checks, "timings": timings})  # fmt: skip
    if not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
