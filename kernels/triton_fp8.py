"""The Triton row quantizer used by kernels/fp8.py on GPUs outside torch.compile.

One program per row: pass 1 streams the row (times an optional fp32 factor per column, the weight's scales that
backward folds into the output gradient) for its absolute maximum; pass 2 writes each value over the row's scale,
clamped to e4m3's range, as e4m3, and the scale. One read of the input per pass and one write of a byte a value,
where the same in eager PyTorch is six passes over fp32 copies, about as much memory traffic as the FP8 matmul it
feeds saves. The same values as `kernels.fp8.quantize_rows_torch` (IEEE division, round to nearest even). Runs on
CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ce import require_triton_device


@triton.jit
def _round_to_e4m3(v):
    """`v` (fp32, within e4m3's range) rounded to the nearest e4m3 value, ties to even, still in fp32: the cast that
    follows is then exact. Normal values keep 3 of fp32's 23 mantissa bits (rounded on the bits); below e4m3's
    smallest normal, 2^-6, values are multiples of 2^-9 (rounded by adding and taking away 1.5 x 2^14). Done here
    rather than by the cast: Triton's interpreter, which runs the tests without a GPU, rounds 127.9 to 64."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    magic = 24576.0  # 1.5 x 2^14: fp32's unit in the last place there is 2^-9
    small = (v + magic) - magic
    return tl.where(tl.abs(v) < 0.015625, small, normal)


@triton.jit
def _quantize_rows_kernel(x_ptr, col_ptr, q_ptr, s_ptr, n_cols, x_stride, q_stride, eps, fmax,
                          HAS_COL: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * x_stride
    q_ptr += row * q_stride
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if HAS_COL:
            v = v * tl.load(col_ptr + cols, mask=cols < n_cols, other=0.0)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, 0), eps) / fmax
    tl.store(s_ptr + row, scale)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if HAS_COL:
            v = v * tl.load(col_ptr + cols, mask=cols < n_cols, other=0.0)
        q = _round_to_e4m3(tl.clamp(tl.math.div_rn(v, scale), -fmax, fmax))
        tl.store(q_ptr + cols, q.to(tl.float8e4nv), mask=cols < n_cols)


def quantize_rows_triton(x: torch.Tensor, col: torch.Tensor | None, eps: float, fmax: float):
    """`kernels.fp8.quantize_rows`'s contract on the 2-D `x` (rows contiguous) and an optional fp32 `col`."""
    require_triton_device(x, "FP8 quantization", "on the CPU kernels.fp8 quantizes with PyTorch")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_rows, n_cols = x.shape
    q = torch.empty((n_rows, n_cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    col = col.reshape(-1).contiguous() if col is not None else None
    block = min(triton.next_power_of_2(n_cols), 4096 if x.is_cuda else 1024)
    _quantize_rows_kernel[(n_rows,)](x, col if col is not None else x, q, scale, n_cols, x.stride(0), q.stride(0),
                                     eps, fmax, HAS_COL=col is not None, BLOCK=block,
                                     num_warps=8 if block >= 2048 else 4)  # fmt: skip
    return q, scale
