"""Triton RMSNorm, SwiGLU and rotary embeddings, forward and backward, for Llama-family blocks (`train.fused_layers`).

- `rms_norm(x, weight, eps)` is LlamaRMSNorm: `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, the statistics in
  fp32. One program per row; it saves x and the row's 1/rms (not the normalized copy), and the backward recomputes
  the rest: dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * weight.
- `swiglu(gate, up)` is `silu(gate) * up`, the MLP's activation. Eager PyTorch runs silu and the product as two
  kernels forward and three backward and keeps silu(gate) for the backward; this runs one kernel each way and keeps
  only gate and up.
- `rope(q, k, cos, sin)` is transformers' `apply_rotary_pos_emb`: `q * cos + rotate_half(q) * sin`, and the same
  for k. Eager PyTorch runs five kernels per tensor forward (two products, a slice-and-negate, a cat, a sum) and
  as many backward; this runs one for q and k together each way. The rotation is linear, so backward is the same
  kernel with the sine's halves swapped and negated, and nothing but cos and sin is kept (as eagerly).

All compute in fp32 and round once to the inputs' dtype. They run on CUDA tensors, or on CPU tensors under
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


@triton.jit
def _rope_rotate(X, Y, base, c1, c2, s1, s2, d, n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # one row's heads of x = [x1 | x2]: y1 = x1 * c1 - x2 * s1, y2 = x2 * c2 + x1 * s2
    h = tl.arange(0, BLOCK_H)[:, None]
    offs = base + h * (2 * HALF) + d[None, :]
    mask = (h < n_heads) & (d[None, :] < HALF)
    x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + offs + HALF, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope(Q, K, COS, SIN, QO, KO, seq, cos_batch_stride, n_q, n_k, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
          BLOCK_D: tl.constexpr, DO_Q: tl.constexpr, DO_K: tl.constexpr, BACKWARD: tl.constexpr):  # fmt: skip
    """One program per token (q and k laid out batch x seq x heads x head_dim; cos and sin batch x seq x head_dim).
    Forward: [x1 | x2] -> [x1 cos1 - x2 sin1 | x2 cos2 + x1 sin2]. Backward is its transpose, the same map with
    sin1 -> -sin2 and sin2 -> -sin1."""
    row = tl.program_id(0).to(tl.int64)
    cs = (row // seq) * cos_batch_stride + (row % seq) * (2 * HALF)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    c1 = tl.load(COS + cs + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + cs + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        s1, s2 = -s2, -s1
    if DO_Q:
        _rope_rotate(Q, QO, row * n_q * 2 * HALF, c1, c2, s1, s2, d, n_q, HALF, BLOCK_H)
    if DO_K:
        _rope_rotate(K, KO, row * n_k * 2 * HALF, c1, c2, s1, s2, d, n_k, HALF, BLOCK_H)


def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    """batch x heads x seq x head_dim (attention's layout, a transposed view of the projection's output) as a
    contiguous batch x seq x heads x head_dim: no copy for the usual view."""
    return x.transpose(1, 2).contiguous()


def _run_rope(q, k, cos, sin, backward: bool):  # noqa: ANN001
    """q, k (batch x heads x seq x head_dim, either may be None) rotated; cos and sin batch (or 1) x seq x head_dim."""
    ref = q if q is not None else k
    b, _, seq, dim = ref.shape
    if dim % 2:
        raise ValueError(f"rotary embeddings need an even head size, got {dim}")
    if q is not None and k is not None and (k.shape[0], k.shape[2], k.shape[3]) != (b, seq, dim):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, sequence or head size")
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape != sin.shape or cos.shape[1:] != (seq, dim) or cos.shape[0] not in (1, b):
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not match q/k of batch {b}, sequence {seq}, head size {dim}")
    outs, args, heads = [], [], []
    for x in (q, k):
        if x is None:
            outs.append(None)
            args += [ref, ref]  # unused (DO_Q/DO_K false)
            heads.append(1)
            continue
        xt = _tokens_major(x)
        out = torch.empty(xt.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
        outs.append(out)
        args += [xt, out]
        heads.append(x.shape[1])
    half = dim // 2
    _rope[(b * seq,)](args[0], args[2], cos, sin, args[1], args[3], seq, seq * dim if cos.shape[0] > 1 else 0,
                      heads[0], heads[1], HALF=half, BLOCK_H=triton.next_power_of_2(max(heads)),
                      BLOCK_D=triton.next_power_of_2(half), DO_Q=q is not None, DO_K=k is not None,
                      BACKWARD=backward)  # fmt: skip
    return tuple(None if o is None else o.transpose(1, 2) for o in outs)


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):  # noqa: ANN001
        _check_device(q, "rotary embedding")
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return _run_rope(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):  # noqa: ANN001
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise NotImplementedError("train.fused_layers: no gradient for trainable rotary cos/sin; set "
                                      "train.fused_layers=off")  # fmt: skip
        cos, sin = ctx.saved_tensors
        want_q, want_k = ctx.needs_input_grad[0] and dq is not None, ctx.needs_input_grad[1] and dk is not None
        if not (want_q or want_k):
            return None, None, None, None
        gq, gk = _run_rope(dq if want_q else None, dk if want_k else None, cos, sin, backward=True)
        gq = gq.to(ctx.dtypes[0]) if gq is not None else None
        gk = gk.to(ctx.dtypes[1]) if gk is not None else None
        return gq, gk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` for q, k of batch x heads x seq x head_dim."""
    if unsqueeze_dim != 1:
        raise ValueError(f"rope: q and k must be batch x heads x seq x head_dim (unsqueeze_dim=1), got {unsqueeze_dim}")
    return _RoPE.apply(q, k, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)
