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

DoRA (`train.use_dora` with `train.lean_lora`): peft's DoRA scales each adapted projection's output rows by
m / ||W + sBA|| (the norm detached, as the paper has it). To normalize, peft builds the whole weight in forward:
the identity through lora_A (in x in), BA, its scaled copy, W + sBA and, where the base is in another dtype than the
adapters, W cast to theirs (2 in^2 + 16 in out bytes at once under the Trainer's bf16 autocast); it keeps for backward
the base output and the LoRA output; and with dropout it multiplies the dropped input by W cast to fp32, which
autocast casts back to bf16 and keeps, a copy of every adapted weight in each layer kept. `dora_norm` computes the
norm without the weight: ||W_i||^2 (once: the base is frozen) + 2s B_i (W A^T)_i + s^2 B_i (A A^T) B_i^T, in fp32,
reading W a block of rows at a time (`NORM_BLOCK` values). `_DoraScale` and `_DoraMix` combine the outputs keeping
one output-wide tensor, y = base + s LoRA, from which the magnitude's gradient comes (in the output's dtype: the one
difference from peft's gradients, which read the two in that dtype before adding them in fp32). With dropout,
`dora_down` is `lora_down` with the base weight beside lora_A: the dropped input's two matmuls from one mask, x and a
seed kept, W as it is. The same values as peft's, to fp32's rounding (the norm's sum runs in another order).
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


@torch.library.custom_op("edgar_tune::dora_down_forward", mutates_args=())
def dora_down_forward(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, p: float, seed: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    with torch.autocast(x.device.type, enabled=False):
        xd = _dropout(x, _dropped(x, p, seed), p, a.dtype, dtype)
        return xd @ a.to(dtype).t(), xd @ w.to(dtype).t()


@dora_down_forward.register_fake
def _(x, a, w, p, seed, dtype):
    return (x.new_empty((*x.shape[:-1], a.shape[0]), dtype=dtype),
            x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dtype))  # fmt: skip


@torch.library.custom_op("edgar_tune::dora_down_backward", mutates_args=())
def dora_down_backward(grad_a: torch.Tensor, grad_w: torch.Tensor, x: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                       p: float, seed: torch.Tensor, need_x: bool, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """peft's: the dropped input's gradient from both matmuls (run in `dtype`), summed in the adapter's dtype,
    through dropout's backward, cast to the input's."""
    with torch.autocast(x.device.type, enabled=False):
        dropped = _dropped(x, p, seed)
        grad_a, grad_x = grad_a.to(dtype), x.new_empty(0)
        if need_x:
            grad_x = (grad_a @ a.to(dtype)).to(a.dtype) + (grad_w.to(dtype) @ w.to(dtype)).to(a.dtype)
            grad_x = _dropout(grad_x, dropped, p, a.dtype, x.dtype, True)
        xd = _dropout(x, dropped, p, a.dtype, dtype)
        return grad_x, (grad_a.reshape(-1, grad_a.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])).to(a.dtype)


@dora_down_backward.register_fake
def _(grad_a, grad_w, x, a, w, p, seed, need_x, dtype):
    return (torch.empty_like(x) if need_x else x.new_empty(0)), torch.empty_like(a)


class _DoraDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, p: float):
        seed = torch.randint(0, 2**62, (1,))
        ctx.save_for_backward(x, a, w, seed)
        device = x.device.type
        ctx.p = p
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
        return dora_down_forward(x, a, w, p, seed, ctx.dtype)

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor, grad_w: torch.Tensor):
        x, a, w, seed = ctx.saved_tensors
        grad_x, grad_a = dora_down_backward(grad_a, grad_w, x, a, w, ctx.p, seed, ctx.needs_input_grad[0], ctx.dtype)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_a, None, None


def dora_down(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`dropout(x) @ a.T`, `dropout(x) @ w.T`) with one dropout mask (0 < p < 1; `w`: the frozen base weight, out x
    in), keeping `x`, a seed, and `a` and `w` as they are."""
    if not 0 < p < 1:
        raise ValueError(f"dora_down's dropout probability must be in (0, 1), not {p}")
    return _DoraDown.apply(x, a, w, p)


NORM_BLOCK = 2**24  # values of W cast to fp32 at a time (64 MB) by dora_norm


def _row_blocks(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`w`'s rows in blocks of at most NORM_BLOCK values (one row at least)."""
    return w.split(max(1, NORM_BLOCK // w.shape[1]))


@torch.no_grad()
def dora_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
              row_sq: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """||W + scaling BA|| per output row in fp32 (`w`: out x in, `a`: r x in, `b`: out x r, `row_sq`: ||W_i||^2 in
    fp32), without forming W + sBA: ||W_i||^2 + 2s B_i (W A^T)_i + s^2 B_i (A A^T) B_i^T, W read NORM_BLOCK values
    at a time in fp32."""
    with torch.autocast(w.device.type, enabled=False):  # fp32 matmuls, not autocast's bf16 copies
        a32, b32 = a.float(), b.float()
        wa = torch.cat([block.float() @ a32.t() for block in _row_blocks(w)])  # out x r
        squared = row_sq + 2 * scaling * (b32 * wa).sum(1) + scaling**2 * ((b32 @ (a32 @ a32.t())) * b32).sum(1)
        return squared.clamp_min_(0).sqrt_()


def _dora_keep(ctx, y: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
               dtypes: tuple) -> torch.Tensor:  # fmt: skip
    """What `_DoraScale` and `_DoraMix` keep for backward: y in the dtype of the gradient it meets (`dtypes`: the
    base output's, the LoRA output's, the magnitude's), the scale m / norm and the norm. Returns the scale."""
    scale = magnitude.float() / norm
    ctx.save_for_backward(y.to(dtypes[0]), scale, norm)
    ctx.scaling, ctx.dtypes = scaling, dtypes
    return scale


def _dora_grads(ctx, grad: torch.Tensor) -> tuple:
    """What `_DoraScale` and `_DoraMix` share in backward: the output's gradient in fp32, the scale m / norm, and
    the LoRA output's and the magnitude's gradients (from the kept y = base + s * lora)."""
    y, scale, norm = ctx.saved_tensors
    g = grad.float()
    grad_lora = (ctx.scaling * scale * g).to(ctx.dtypes[1])
    grad_m = ((g * y.float()).reshape(-1, y.shape[-1]).sum(0) / norm).to(ctx.dtypes[2])
    return g, scale, grad_lora, grad_m


class _DoraScale(torch.autograd.Function):
    """DoRA without dropout: `(m / norm) * (result - bias + s * lora) + bias`, peft's `result + (m / norm - 1) *
    (result - bias) + (m / norm) * s * lora` in fp32, keeping y = result - bias + s * lora in result's dtype."""

    @staticmethod
    def forward(ctx, result, lora, magnitude, norm, scaling: float, bias):
        y = result.float() + scaling * lora.float() - (0 if bias is None else bias.float())
        scale = _dora_keep(ctx, y, magnitude, norm, scaling, (result.dtype, lora.dtype, magnitude.dtype))
        return (scale * y + (0 if bias is None else bias.float())).to(result.dtype)

    @staticmethod
    def backward(ctx, grad):
        g, scale, grad_lora, grad_m = _dora_grads(ctx, grad)
        return (scale * g).to(ctx.dtypes[0]), grad_lora, grad_m, None, None, None


class _DoraMix(torch.autograd.Function):
    """DoRA with dropout: peft's `result + (m / norm - 1) * base + (m / norm) * s * lora` (`base`, `lora`: the
    dropped input's base and LoRA outputs) in fp32, keeping y = base + s * lora in result's dtype."""

    @staticmethod
    def forward(ctx, result, base, lora, magnitude, norm, scaling: float):
        y = base.float() + scaling * lora.float()
        scale = _dora_keep(ctx, y, magnitude, norm, scaling, (base.dtype, lora.dtype, magnitude.dtype))
        return (result.float() - base.float() + scale * y).to(result.dtype)

    @staticmethod
    def backward(ctx, grad):
        g, scale, grad_lora, grad_m = _dora_grads(ctx, grad)
        return grad, ((scale - 1) * g).to(ctx.dtypes[0]), grad_lora, grad_m, None, None


def _lean_dora(self, name: str, x: torch.Tensor, result: torch.Tensor, p: float) -> torch.Tensor:
    """One DoRA adapter's output added to `result` (the base layer's output, and the adapters' before it)."""
    lora_A, lora_B, base = self.lora_A[name], self.lora_B[name], self.get_base_layer()
    weight = base.weight.t() if self.fan_in_fan_out else base.weight  # out x in (GPT-2's Conv1D keeps in x out)
    squares = self.__dict__.setdefault("_edgar_row_sq", {})  # W is frozen: its rows' squared norms, once per device
    if (row_sq := squares.get(name)) is None or row_sq.device != weight.device:
        with torch.no_grad():
            row_sq = squares[name] = torch.cat([b.float().square().sum(1) for b in _row_blocks(weight)])
    scaling = self.scaling[name]
    norm = dora_norm(weight, lora_A.weight, lora_B.weight, scaling, row_sq)
    magnitude = self.lora_magnitude_vector[name].weight
    if not p:
        return _DoraScale.apply(result, lora_B(lora_down(x, lora_A.weight, 0.0)), magnitude, norm, scaling,
                                base.bias)  # fmt: skip
    down, base_out = dora_down(x, lora_A.weight, weight, p)
    return _DoraMix.apply(result, base_out, lora_B(down), magnitude, norm, scaling)


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's `lora.Linear.forward` for plain LoRA and DoRA adapters, with the down projection from `lora_down`
    (DoRA's from `_lean_dora`)."""
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return self._edgar_peft_forward(x, *args, **kwargs)  # no adapter math to change: peft's own path
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        if name in getattr(self, "lora_variant", {}):  # DoRA: lean_lora takes no other variant
            result = _lean_dora(self, name, x, result, p)
        else:
            result = result + lora_B(lora_down(x, lora_A.weight, p)) * self.scaling[name]
    return result.to(dtype)


def lean_lora(model: nn.Module) -> int:
    """Route every plain LoRA linear layer of a peft `model` through `lora_down`; returns how many.

    Raises:
        ValueError: a LoRA variant other than DoRA, a bias on lora_A, or a dropout other than nn.Dropout, whose math
            this does not reproduce; or no LoRA linear layer at all.
    """
    from peft.tuners.lora import Linear
    from peft.tuners.lora.variants import DoraLinearVariant

    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        problems = [f"a LoRA variant ({type(v).__name__})" for v in getattr(module, "lora_variant", {}).values()
                    if not isinstance(v, DoraLinearVariant)]  # fmt: skip
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
