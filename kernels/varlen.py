"""Packed documents as variable-length sequences in PyTorch's flash kernel: `train.attention=varlen`.

With `train.document_mask` on sdpa, transformers hands sdpa a dense b x 1 x s x s mask. That costs sdpa its flash
kernel, keeps the mask again in every layer kept for backward, and repeats grouped keys and values to every head.
Here each batch carries where its documents start (`cu_seq_lens`, from the collator, as flash-attn's packing in
Axolotl and transformers' `DataCollatorWithFlattening` do), the b x s tokens run as one ragged batch through
`torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 in PyTorch >= 2.10, CUDA only), keys and values stay at
their own head count, and no mask is built. Rows are right-padded at most (the collator's instruction batches):
causal attention never lets a real token see the padding after it, and padding is out of the loss.
"""

from __future__ import annotations

import inspect
import logging

import torch

NAME = "varlen"


def available() -> str | None:
    """None when varlen attention can run here, else why not (for the config error)."""
    if not torch.cuda.is_available():
        return "it runs PyTorch's flash kernel, which needs a CUDA GPU"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch.nn.attention.varlen needs PyTorch >= 2.10 (this is {torch.__version__})"
    return None


def document_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Where each document of a b x s batch starts in its b*s tokens, as flash-attn's `cu_seqlens` (int32, with
    b*s last), and the longest document's length. A document starts where its position id is 0 and at every row's
    first token: [[0 1 2 0 1], [3 4 0 1 2]] -> [0 3 5 7 10], 3."""
    b, s = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    first = starts.flatten().nonzero().flatten()
    bounds = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


_CAUSAL: dict = {}  # varlen_attn's causal flag, read once by register(): window_size=(-1, 0) in 2.11 and later,
_SCALED = True      # is_causal in earlier signatures; and whether it takes `scale`


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: torch.Tensor, longest: int,
           scale: float | None) -> torch.Tensor:  # fmt: skip
    """Causal attention within each [bounds[i], bounds[i+1]) of total x heads x dim tensors, in PyTorch's flash
    kernel (keys and values may have fewer heads: grouped-query attention)."""
    from torch.nn.attention.varlen import varlen_attn

    if not _SCALED and scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-6:
        raise RuntimeError(f"varlen attention: this PyTorch's varlen_attn has no `scale`, and the model asks for "
                           f"{scale} (not 1/sqrt(head_dim)); set train.attention=sdpa")  # fmt: skip
    scaled = {"scale": scale} if _SCALED else {}
    return varlen_attn(query, key, value, bounds, bounds, longest, longest, **_CAUSAL, **scaled)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention interface: b x heads x s x dim in, b x s x heads x dim out. Document bounds come from
    the batch (`cu_seq_lens_q`, `max_length_q`, computed once a batch by the collator), else from `position_ids`,
    else each row is one sequence."""
    if dropout:
        raise ValueError("train.attention=varlen runs without attention dropout; set the model's attention_dropout "
                         "to 0 or train.attention=sdpa")  # fmt: skip
    b, heads, s, dim = query.shape
    bounds, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if bounds is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.shape == (b, s):
            bounds, longest = document_bounds(position_ids)
        else:
            bounds, longest = torch.arange(0, b * s + 1, s, dtype=torch.int32), s
    dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else None
    dtype = dtype or query.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"train.attention=varlen: the flash kernel takes bf16 or fp16, and this run computes "
                           f"attention in {dtype}; train in bf16 or fp16 (train.precision) or set "
                           "train.attention=sdpa")  # fmt: skip

    def ragged(t: torch.Tensor) -> torch.Tensor:  # b x h x s x d -> (b*s) x h x d
        return t.transpose(1, 2).reshape(b * s, t.shape[1], dim).to(dtype)

    out = _KERNEL(ragged(query), ragged(key), ragged(value), bounds.to(query.device), int(longest), scaling)
    return out.view(b, s, heads, dim), None


def mark_dynamic(inputs: dict) -> None:
    """Tell torch.compile, before a batch enters the model, that its document bounds' length changes from batch to
    batch. Without it, dynamo compiles the model for the first batch's count of documents, again for the second's
    (now as a dynamic size), and the collator's maximum length, were it the longest document's, again: each one
    a full compile of forward and backward (of the whole 7B: 2.5 minutes on an H200). Marked here, after the
    Trainer moved the batch to the GPU (a copy, which would not carry a mark made in the collator); a no-op unless
    compiled."""
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if torch.is_tensor(bounds := inputs.get(key)):
            torch._dynamo.maybe_mark_dynamic(bounds, 0)


_KERNEL = _flash  # tests on the CPU swap in a per-document sdpa to check everything around the kernel


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers. No mask function is registered with it:
    transformers then builds no mask at all for this implementation."""
    global _SCALED
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    if available() is None:  # read here, not in the traced forward (torch.compile)
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        _CAUSAL.clear()
        _CAUSAL.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
        _SCALED = "scale" in params
        logging.getLogger(varlen_attn.__module__).setLevel(logging.WARNING)  # an INFO line at every call
