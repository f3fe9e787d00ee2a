"""The Triton cross-entropy rows kernel used by kernels/fused_linear_ce.py on GPUs.

One program per row of a logits chunk: pass 1 streams the row in BLOCK-wide tiles with an online max and sum of
exponentials (fp32) and reads the target's logit; pass 2 writes the gradient softmax - onehot, times the
reduction's scale, over the logits in place. Ignored rows get zero loss and a zero gradient. The vocabulary need
not be a multiple of BLOCK (masked tails). Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1
(how the tests run it without a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_rows_kernel(logits_ptr, stride, labels_ptr, loss_ptr, n_cols, ignore_index, scale,
                    GRAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride
    y = tl.load(labels_ptr + row)
    if y == ignore_index:
        if GRAD:
            for off in range(0, n_cols, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                tl.store(logits_ptr + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < n_cols)
        tl.store(loss_ptr + row, 0.0)
        return
    x_y = tl.load(logits_ptr + y).to(tl.float32)
    m = -float("inf")
    d = 0.0
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    tl.store(loss_ptr + row, lse - x_y)
    if GRAD:
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(logits_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(cols == y, g - 1.0, g) * scale
            tl.store(logits_ptr + cols, g, mask=cols < n_cols)


def require_triton_device(t: torch.Tensor, what: str, fix: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests without a GPU)."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the Triton {what} kernel needs CUDA tensors (or TRITON_INTERPRET=1); {fix}")


def triton_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: float, grad: bool) -> torch.Tensor:
    """Same contract as kernels.fused_linear_ce.torch_rows: summed NLL; with `grad`, the gradient in place."""
    require_triton_device(logits, "cross-entropy", "on the CPU use the torch backend")
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError("the Triton rows kernel takes contiguous fp32 logits rows")
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(n_cols), 32768 if logits.is_cuda else 1024)
    _ce_rows_kernel[(n_rows,)](logits, logits.stride(0), labels.contiguous(), loss, n_cols, ignore_index, scale,
                               GRAD=grad, BLOCK=block, num_warps=32 if block >= 8192 else 8)  # fmt: skip
    return loss.sum()
