"""Triton RMSNorm and SwiGLU, forward and backward, for the Llama-family blocks (`train.fused_layers`).

- `rms_norm(x, weight, eps)` is LlamaRMSNorm: `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, the statistics in
  fp32. One program per row; it saves x and the row's 1/rms (not the normalized copy), and the backward recomputes
  the rest: dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * weight.
- `swiglu(gate, up)` is `silu(gate) * up`, the MLP's activation. Eager PyTorch runs silu and the product as two
  kernels forward and three backward and keeps silu(gate) for the backward; this runs one kernel each way and keeps
  only gate and up.

Both compute in fp32 and round once to the inputs' dtype. They run on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (how the tests run them without a GPU). `kernels.hf.fuse_layers(model)` puts them in a model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ce import require_triton_device


def _check_device(t: torch.Tensor, what: str) -> None:
    require_triton_device(t, what, "on the CPU set train.fused_layers=off")


@triton.jit
def _rms_fwd(X, W, Y, RSTD, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    x_hat = (xf * rstd).to(x.dtype).to(tl.float32)  # LlamaRMSNorm rounds the normalized row to x's dtype
    tl.store(Y + row * n_cols + cols, (w * x_hat).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_bwd(DY, X, W, RSTD, DX, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    g = dy * w
    x_hat = x * rstd
    dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / n_cols))
    tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    return block, min(max(block // 256, 1), 16)  # BLOCK, num_warps


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: ANN001
        _check_device(x, "RMSNorm")
        shape, n = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block, warps = _block(n)
        _rms_fwd[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, n, eps, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001
        x2, weight, rstd = ctx.saved_tensors
        n = x2.shape[-1]
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        block, warps = _block(n)
        _rms_bwd[(x2.shape[0],)](dy2, x2, weight.contiguous(), rstd, dx, n, BLOCK=block, num_warps=warps)
        dw = None
        if ctx.needs_input_grad[1]:  # full fine-tuning: the norm's weight trains (LoRA freezes it)
            x_hat = (x2.float() * rstd[:, None]).to(x2.dtype).float()
            dw = (dy2.float() * x_hat).sum(0).to(weight.dtype)
        return dx.view(dy.shape), dw, None


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


SWIGLU_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # noqa: ANN001
        _check_device(gate, "SwiGLU")
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
        n = g.numel()
        _swiglu_fwd[(triton.cdiv(n, SWIGLU_BLOCK),)](g, u, y, n, BLOCK=SWIGLU_BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        _swiglu_bwd[(triton.cdiv(n, SWIGLU_BLOCK),)](dy.contiguous(), g, u, dg, du, n, BLOCK=SWIGLU_BLOCK)
        return dg, du


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)
