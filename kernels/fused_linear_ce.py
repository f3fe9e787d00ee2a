"""Fused linear + cross-entropy: the loss of an LM head without the tokens x vocab logits.

`fused_linear_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy((hidden @ weight.T + bias).float().view(-1, V), labels.view(-1), ignore_index=..., reduction=...)`
but computes it `chunk_size` tokens at a time. The gradients for `hidden` (and `weight`/`bias` when they require
grad) are computed in the same pass, chunk by chunk, so neither the forward nor the backward ever holds more than
chunk_size x V logits: for 8 x 2048 tokens and a 128k vocabulary, 8.6 GB of fp32 logits (and as much again for
their gradient) become one chunk of about the size of the hidden states.

`replaced=(index, values)` computes the loss of a head whose rows at `index` are `values` (peft's trainable
tokens: a frozen head but for the rows of a few tokens) without a merged copy of the head: those logits come from
their own small matmul, and the gradient reaches `values` alone, k x hidden for k rows, where the merged head's
would be a dense V x hidden gradient and a matmul as large as the logits' for it.

Per chunk: the logits come from one matmul (fp32 accumulation, fp32 result); the loss rows and the gradient
(softmax - onehot, written over the logits in place) come from `rows`: the Triton kernel on GPUs
(kernels/triton_ce.py), or the plain-PyTorch `torch_rows` here, which is the CPU path and the reference.

Conventions:
- `shift=True` drops the last position's hidden state and the first label (logits at t predict token t+1), as
  HF causal LMs do inside their loss.
- Accumulation is in fp32 whatever the input dtype; gradients come back in the inputs' dtypes.
- `reduction="mean"` divides by the number of non-ignored targets (none: loss 0, not NaN); `"sum"` is what
  perplexity needs (a sum of NLL over windows, with the count kept apart).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

IGNORE_INDEX = -100
Rows = Callable[[torch.Tensor, torch.Tensor, int, float, bool], torch.Tensor]


def torch_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: float, grad: bool) -> torch.Tensor:
    """Summed NLL of the fp32 `logits` rows; with `grad`, overwrite `logits` with d(scale * sum)/d(logits)."""
    keep = labels != ignore_index
    target = torch.where(keep, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(keep, lse - logits.gather(1, target[:, None]).squeeze(1), 0.0).sum()
    if grad:
        logits.sub_(lse[:, None]).exp_()
        logits[torch.arange(len(labels), device=labels.device), target] -= 1.0
        logits.mul_((keep.float() * scale)[:, None])
    return loss


CHUNK_BYTES = 1 << 28  # fp32 logits of one chunk on a GPU: 256 MiB


def default_chunk_size(n_tokens: int, vocab: int, hidden_size: int, cuda: bool = True) -> int:
    """Tokens per chunk: on GPUs the largest power of two whose fp32 logits fit in 256 MiB (1024 tokens at
    SmolLM2's 49152 words, 2048 at Llama-2's 32000, 512 at Llama-3's 128256). Liger's rule (chunk logits as
    large as the hidden states) gave SmolLM2's head 128-token chunks and 64 launches of small matmuls: 21 ms for
    4 x 2048 tokens against 11 ms materialized on an H100. On the CPU 1024 tokens (SmolLM2's head, 4096
    tokens: 1024-token chunks 3.7 s a step and 1.0 GB peak, 64-token chunks 5.1 s and 0.5 GB, materialized
    logits 4.5 s and 2.7 GB)."""
    if not cuda:
        return max(1, min(n_tokens, 1024))
    fit = max(64, 1 << int(math.log2(max(1, CHUNK_BYTES // (4 * vocab)))))
    return max(1, min(n_tokens, fit))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, chunk_size, rows, grad, index,  # noqa: ANN001
                values):  # noqa: ANN001
        n = hidden.shape[0]
        valid = int((labels != ignore_index).sum())
        scale = 1.0 / max(valid, 1) if reduction == "mean" else 1.0
        # `grad`: autograd was on at the call (inside forward it is always off). Under no_grad (perplexity) a
        # model's head still has requires_grad, and its gradient would cost two more matmuls per chunk.
        want_h, want_w = grad and hidden.requires_grad, grad and weight.requires_grad
        want_b = grad and bias is not None and bias.requires_grad
        want_v = grad and values is not None and values.requires_grad
        if values is not None:  # as the matmul sees them, and what they change in the hidden states' gradient
            values_ = values.detach().to(weight.dtype)
            change = values_.float() - weight.detach()[index].float() if want_h else None
        grad_v = torch.zeros(values.shape, dtype=torch.float32, device=values.device) if want_v else None
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = chunk_size or default_chunk_size(n, weight.shape[0], weight.shape[1], hidden.is_cuda)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            logits = _logits(h, weight)
            if values is not None:
                logits[:, index] = _logits(h, values_)
            if bias is not None:
                logits += bias.float()
            # The reduction's scale (1 / tokens for a mean) is applied after the matmuls: softmax - onehot,
            # scaled first, underflows in fp16 (1e-5 probabilities / 3000 tokens).
            loss += rows(logits, labels[start : start + chunk], ignore_index, 1.0, want_h or want_w or want_b or want_v)
            g = logits  # now d sum / d logits
            if want_h:  # on GPUs in the weights' dtype (tensor cores), on the CPU in fp32
                gw_ = (g.to(weight.dtype), weight) if g.is_cuda else (g, weight.float())
                gh = torch.mm(*gw_).float()
                if values is not None:  # the replaced rows' part: g[:, index] @ (values - weight[index])
                    gh += torch.mm(g[:, index], change)
                grad_h[start : start + chunk] = (gh * scale).to(hidden.dtype)
            if want_w:
                grad_w.add_(torch.mm(g.T, h.float()), alpha=scale)
            if want_v:
                grad_v.add_(torch.mm(g[:, index].T, h.float()), alpha=scale)
            if want_b:
                grad_b.add_(g.sum(0), alpha=scale)
        if want_w and values is not None:
            grad_w[index] = 0.0  # the head's own rows there are not in the loss
        saved = [t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b, grad_v)]
        ctx.save_for_backward(*saved)
        ctx.wanted = (want_h, want_w, want_b, want_v)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None, values.dtype if want_v else None)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        grad_h, grad_w, grad_b, grad_v = ctx.saved_tensors
        want_h, want_w, want_b, want_v = ctx.wanted
        gh = grad_h * grad_out.to(grad_h.dtype) if want_h else None
        gw = (grad_w * grad_out).to(ctx.dtypes[0]) if want_w else None
        gb = (grad_b * grad_out).to(ctx.dtypes[1]) if want_b else None
        gv = (grad_v * grad_out).to(ctx.dtypes[2]) if want_v else None
        return gh, gw, gb, None, None, None, None, None, None, None, gv


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the chunk `h` against `weight`'s rows."""
    return torch.mm(h, weight.T).float() if h.dtype == torch.float32 else _mm_fp32(h, weight)


def _mm_fp32(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 matmul with fp32 accumulation and an fp32 result (no rounding of the logits to half)."""
    if h.is_cuda:
        return torch.mm(h, weight.T, out_dtype=torch.float32) if _has_out_dtype() else torch.mm(h, weight.T).float()
    return torch.mm(h.float(), weight.float().T)  # CPU half matmuls are slow and round: compute in fp32


@functools.cache
def _has_out_dtype() -> bool:  # asked once per chunk: cached
    import inspect

    try:
        return "out_dtype" in inspect.signature(torch.mm).parameters
    except (TypeError, ValueError):
        return False


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = IGNORE_INDEX,
                               reduction: str = "mean", shift: bool = False, chunk_size: int | None = None,
                               backend: str = "auto", replaced: tuple[torch.Tensor, torch.Tensor] | None = None
                               ) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, chunk by chunk (see the module doc).

    replaced: (index, values), the head's rows at `index` (a 1-D integer tensor of distinct ids) taken as `values`
    (k x hidden), which alone get a gradient for those rows.

    backend: "triton" (CUDA tensors, or any under TRITON_INTERPRET=1), "torch" (the chunked PyTorch rows), or
    "auto" (Triton on CUDA when it is installed, else torch). Asking for Triton where it cannot run raises; it
    never falls back.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the LM head's {weight.shape[-1]}")
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden states but {y.shape[0]} labels")
    index, values = replaced if replaced is not None else (None, None)
    if values is not None and (index.dim() != 1 or values.shape != (len(index), weight.shape[1])):
        raise ValueError(f"replaced rows: {tuple(values.shape)} values for {tuple(index.shape)} indices of a head "
                         f"of {tuple(weight.shape)}; give k indices and k x {weight.shape[1]} values")  # fmt: skip
    rows = resolve_rows(backend, h)
    return _LinearCrossEntropy.apply(h, weight, bias, y, ignore_index, reduction, chunk_size, rows,
                                     torch.is_grad_enabled(), index, values)  # fmt: skip


def resolve_rows(backend: str, sample: torch.Tensor) -> Rows:
    """The per-chunk loss/gradient function for `backend` on `sample`'s device."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, not {backend!r}")
    if backend == "torch" or (backend == "auto" and not (sample.is_cuda and triton_available())):
        return torch_rows
    from kernels.triton_ce import triton_rows  # raises ImportError without Triton: no silent fallback

    return triton_rows


def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
