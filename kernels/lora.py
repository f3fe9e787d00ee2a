"""LoRA's down projection that keeps less for backward: the input once, in its own dtype, and no dropout mask.

peft computes `lora_B(lora_A(dropout(x.to(fp32)))) * scaling` for each adapted projection. With a frozen base,
autograd then keeps, per projection, the input of lora_A (for its weight gradient: under the Trainer's bf16
autocast a bf16 copy of the dropped input, 2 bytes a value; fp32 without autocast) and the dropout mask (1 byte a
value on CUDA): q_proj and v_proj of one Llama layer keep 6 bytes per token per hidden unit under autocast
(bench/saved_activations.py measures it; tasks/memory.py counts it).

`lora_down(x, a, p)` is `dropout(x.to(a.dtype), p) @ a.T` (in the autocast dtype under autocast, as peft's
lora_A runs there) as one autograd function that keeps `x` itself (the
projections of a layer that read the same input share it: q, k and v read one tensor) and a seed: backward draws
the same dropout mask again from the seed. The values are peft's, exactly: the fp32 copy of a bf16 tensor is the
same numbers. So are the gradients: backward's matmuls run in the autocast dtype too, as peft's lora_A's do under
autocast, with no fp32 copy of the input. The masks differ from peft's only in which random numbers they are.

Forward and backward are custom ops (`edgar_tune::lora_down_forward`, `..._backward`), opaque to torch.compile, so
a compiled layer stays one graph (the compiler cannot trace a seeded generator) and keeps what this keeps.
"""

from __future__ import annotations

import torch
from torch import nn

_GENERATORS: dict[torch.device, torch.Generator] = {}


def _dropped(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The dropout mask (True: dropped, with probability p) for `x`'s shape, drawn from `seed`: the same seed gives
    the same mask. Drawn as booleans (a byte a value, one pass), not as fp32 uniforms compared to p."""
    gen = _GENERATORS.get(x.device)
    if gen is None:
        gen = _GENERATORS[x.device] = torch.Generator(device=x.device)
    gen.manual_seed(int(seed.item()))
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(p, generator=gen)


def _dropout(x: torch.Tensor, dropped: torch.Tensor, p: float, work: torch.dtype, dtype: torch.dtype,
             inplace: bool = False) -> torch.Tensor:  # fmt: skip
    """`dropout(x.to(work), p).to(dtype)`'s values (peft's: `work` is lora_A's dtype, `dtype` autocast's) in as few
    passes as give them. Where x is already in `dtype` (a bf16 input under the Trainer's bf16 autocast) it is scaled
    there: PyTorch multiplies a bf16 or fp16 tensor by a Python float in fp32 and rounds once, as the detour through
    fp32 does, without that detour's fp32 copies of the input (four times the memory traffic). `inplace`: x is a
    temporary of the caller's (backward's input gradient), scaled where it lies rather than into a new tensor."""
    scale = 1 / (1 - p)
    if x.dtype != dtype:
        xd = x.to(work) * scale
    else:
        xd = x.mul_(scale) if inplace else x * scale
    return xd.masked_fill_(dropped, 0).to(dtype)


@torch.library.custom_op("edgar_tune::lora_down_forward", mutates_args=())
def lora_down_forward(x: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    with torch.autocast(x.device.type, enabled=False):  # `dtype` says what autocast would have done
        xd = _dropout(x, _dropped(x, p, seed), p, a.dtype, dtype) if p else x.to(dtype)
        return xd @ a.to(dtype).t()


@lora_down_forward.register_fake
def _(x: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], a.shape[0]), dtype=dtype)


# Backward is one op of its own that reads the incoming gradient: the compiler then runs it in backward. Separate
# ops drawing the mask from x and the seed alone would be moved into the forward, and their results kept.
@torch.library.custom_op("edgar_tune::lora_down_backward", mutates_args=())
def lora_down_backward(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor,
                       need_x: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """peft's gradients: its lora_A runs in `dtype` (autocast's, else the adapter's), so both matmuls of its
    backward do too, and the input's gradient is scaled and masked as dropout's backward does it, in the adapter's
    dtype, then cast to the input's."""
    with torch.autocast(x.device.type, enabled=False):
        dropped = _dropped(x, p, seed) if p else None  # the forward's mask, drawn again
        grad = grad.to(dtype)
        grad_x = x.new_empty(0)
        if need_x:
            grad_x = grad @ a.to(dtype)
            grad_x = grad_x.to(x.dtype) if dropped is None else _dropout(grad_x, dropped, p, a.dtype, x.dtype, True)
        xd = x.to(dtype) if dropped is None else _dropout(x, dropped, p, a.dtype, dtype)
        grad_a = (grad.reshape(-1, grad.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])).to(a.dtype)
        return grad_x, grad_a


@lora_down_backward.register_fake
def _(grad, x, a, p, seed, need_x, dtype):
    return (torch.empty_like(x) if need_x else x.new_empty(0)), torch.empty_like(a)


class _LoraDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, p: float) -> torch.Tensor:
        # a seed per call from the default CPU generator: reproducible under torch.manual_seed, no device sync
        seed = torch.randint(0, 2**62, (1,)) if p else torch.zeros(1, dtype=torch.int64)
        ctx.save_for_backward(x, a, seed)
        # Under autocast (the Trainer's bf16/fp16) peft's lora_A runs in the autocast dtype: so does this
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
        ctx.p, ctx.dtype = p, dtype
        return lora_down_forward(x, a, p, seed, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, seed = ctx.saved_tensors
        grad_x, grad_a = lora_down_backward(grad, x, a, ctx.p, seed, ctx.needs_input_grad[0], ctx.dtype)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_a, None


def lora_down(x: torch.Tensor, a: torch.Tensor, p: float = 0.0) -> torch.Tensor:
    """`dropout(x.to(a.dtype), p) @ a.T` (`a`: lora_A's weight, r x in), keeping `x` and a seed for backward."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), not {p}")
    return _LoraDown.apply(x, a, p)


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's `lora.Linear.forward` for plain LoRA adapters, with the down projection from `lora_down`."""
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return self._edgar_peft_forward(x, *args, **kwargs)  # no adapter math to change: peft's own path
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        result = result + lora_B(lora_down(x, lora_A.weight, p)) * self.scaling[name]
    return result.to(dtype)


def lean_lora(model: nn.Module) -> int:
    """Route every plain LoRA linear layer of a peft `model` through `lora_down`; returns how many.

    Raises:
        ValueError: a LoRA variant (DoRA), a bias on lora_A, or a dropout other than nn.Dropout, whose math this
            does not reproduce; or no LoRA linear layer at all.
    """
    from peft.tuners.lora import Linear

    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        problems = [f"a LoRA variant ({type(v).__name__})" for v in getattr(module, "lora_variant", {}).values()]
        problems += [f"lora_A with a bias ({k})" for k, a in module.lora_A.items() if a.bias is not None]
        problems += [f"dropout {type(d).__name__}" for d in module.lora_dropout.values()
                     if not isinstance(d, (nn.Dropout, nn.Identity))]  # fmt: skip
        if problems:
            raise ValueError(f"train.lean_lora: {name} has {', '.join(problems)}, which lean_lora does not "
                             "compute; set train.lean_lora=false")  # fmt: skip
        module._edgar_peft_forward = module.forward
        module.forward = _lean_forward.__get__(module)
        count += 1
    if not count:
        raise ValueError("train.lean_lora: the model has no LoRA linear layers; set train.lean_lora=false")
    return count
