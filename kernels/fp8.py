"""LoRA's frozen base as FP8 matmuls: `train.fp8_base`.

With LoRA the base's weights never change, so each linear layer of the transformer blocks is quantized once, to
float8 e4m3 with one fp32 scale per output row, and its bf16 (or fp32) weight is dropped: 1 byte a weight instead
of 2. Each call quantizes its input per token (row) and runs `torch._scaled_mm`, the FP8 tensor-core matmul
(Hopper and Ada: twice bf16's peak rate), with both scales applied to the fp32 accumulator:

    forward    y  = (x_q * s_x) @ (W_q * s_w)^T            x_q: e4m3 per token, W_q: e4m3 per output row
    backward   dx = quant(dy * s_w) @ W_q                   dy scaled by s_w along the contraction, then per token

The weight gradient is never needed (the base is frozen), so nothing is kept for backward but the FP8 weight and
its scales, which the layer holds anyway: what autograd keeps is what a frozen bf16 layer keeps. Backward needs
W_q with its rows along the contraction (the FP8 matmul takes both operands K-major), so it transposes W_q on the
fly, one layer at a time (4096 x 11008 bytes for a Llama-2-7B MLP projection: under 0.2 ms on an H100), rather
than holding a second copy.

Inputs and gradients are quantized by one Triton kernel per call on GPUs (kernels/triton_fp8.py; eager PyTorch
would make six passes over fp32 copies, about as much memory traffic as the FP8 matmul saves), by inductor's fused
code under torch.compile, and by PyTorch's ops on the CPU: the same values each way.

This is lossy: e4m3 keeps 3 mantissa bits, about 2-3% relative error per matmul after accumulation. The adapters,
their matmuls, the norms, attention, the embeddings, the LM head and the loss stay in the training precision, and
the saved adapter is applied to the original weights when the pipeline evaluates and serves it. The forward
accumulates with Hopper's fast FP8 accumulation, backward without, as torchao's float8 training does.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.fused_linear_ce import triton_available

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
_EPS = 1e-12  # an all-zero row gets scale 1e-12 / 448 and quantizes to zeros
# The forward's matmul accumulates with Hopper's fast FP8 accumulation (as torchao's forward does; backward never
# does). bench/fp8_linear.py measures it off too, for what it costs in speed and error.
FAST_ACCUM = True


def quantize_rows(x: torch.Tensor, col: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): the 2-D `x` (times `col`, an fp32 factor per column, if given) over one fp32 scale per row
    (shape rows x 1), in e4m3. On CUDA outside torch.compile the Triton kernel (kernels/triton_fp8.py) computes
    it in one pass; compiled, inductor fuses these PyTorch ops itself; on the CPU they run as they are."""
    if x.is_cuda and not torch.compiler.is_compiling() and triton_available():
        from kernels.triton_fp8 import quantize_rows_triton

        return quantize_rows_triton(x, col, _EPS, E4M3_MAX)
    return quantize_rows_torch(x, col)


def quantize_rows_torch(x: torch.Tensor, col: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` in PyTorch ops: the reference, and what torch.compile fuses."""
    if col is not None:
        x = x.float() * col
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=_EPS) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def _out_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """What a frozen linear layer of weight dtype `dtype` returns for `x` here: the autocast dtype under autocast."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else dtype


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        xq, sx = quantize_rows(rows)
        y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=scale, out_dtype=dtype,
                             use_fast_accum=x.is_cuda and FAST_ACCUM)  # fmt: skip
        ctx.save_for_backward(weight, scale)
        ctx.dtype = dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        rows = grad.reshape(-1, grad.shape[-1])
        gq, sg = quantize_rows(rows, scale)  # the weight's row scales sit on the contraction
        ones = torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device)
        dx = torch._scaled_mm(gq, weight.t().contiguous().t(), scale_a=sg, scale_b=ones, out_dtype=ctx.dtype)
        return dx.reshape(*grad.shape[:-1], weight.shape[1]), None, None, None


class Fp8Linear(nn.Module):
    """A frozen `nn.Linear` as an e4m3 weight with per-output-row fp32 scales; see the module's docstring."""

    def __init__(self, linear: nn.Linear, device: torch.device | str | None = None) -> None:
        super().__init__()
        weight = linear.weight.detach().to(device or linear.weight.device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = weight.dtype  # what the layer returned: it returns the same
        q, scale = quantize_rows_torch(weight)  # once per layer: PyTorch's ops, not a kernel, need no speed
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale.t().contiguous())  # 1 x out_features
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _out_dtype(x, self.dtype)
        y = _Fp8Matmul.apply(x, self.weight_fp8, self.weight_scale, dtype)
        return y if self.bias is None else y + self.bias.to(dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in fp32."""
        return self.weight_fp8.float() * self.weight_scale.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rows, returns {self.dtype}"


def available(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why FP8 matmuls returning `dtype` cannot run on `device`, or None. On a GPU from its compute capability alone:
    the processes that ask (the CLI, the flow) launch the training process and would otherwise hold a CUDA context
    and cached blocks of its memory for the whole run. On the CPU the op itself is tried on a tiny input."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"FP8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper), and this one "
                    f"is {major}.{minor} ({torch.cuda.get_device_name(device)})")  # fmt: skip
        if dtype != torch.bfloat16:
            return f"PyTorch's row-scaled FP8 matmul on CUDA returns bf16, and this run computes in {dtype}"
        return None
    try:
        layer = Fp8Linear(nn.Linear(32, 16, bias=False, dtype=dtype, device=device))
        x = torch.randn(4, 32, dtype=dtype, device=device, requires_grad=True)
        layer(x).sum().backward()
    except (RuntimeError, NotImplementedError) as err:
        return f"torch._scaled_mm failed on {device}: {str(err).splitlines()[0]}"
    return None


def fp8_base(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Replace every frozen `nn.Linear` of `model` but its LM head (peft's LoRA layers' base layers included) by an
    `Fp8Linear` quantized on `device` (default: where the weight is); returns how many.

    Raises:
        ValueError: a frozen linear layer with a width that is not a multiple of 16 (the FP8 matmul's tile), or
            none at all.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_parts = {id(m) for m in head.modules()} if head is not None else set()  # peft's trainable tokens wrap it
    found = [(name, module) for name, module in model.named_modules()
             if type(module) is nn.Linear and id(module) not in head_parts
             and not module.weight.requires_grad]  # fmt: skip
    odd = [f"{name} ({m.in_features} -> {m.out_features})" for name, m in found
           if m.in_features % 16 or m.out_features % 16]  # fmt: skip
    if odd:
        raise ValueError(f"train.fp8_base: FP8 matmuls need widths that are multiples of 16, and {len(odd)} frozen "
                         f"layers have others: {', '.join(odd[:3])}; set train.fp8_base=false")  # fmt: skip
    if not found:
        raise ValueError("train.fp8_base: the model has no frozen linear layers; set train.fp8_base=false")
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(module, device))
        module.weight = None  # the high-precision copy goes now, not when the last reference does
    return len(found)
