"""One attention mask for all layers under sdpa in training: `shared_sdpa_mask()`.

transformers hands sdpa a dense boolean mask (b x 1 x s x s) whenever is_causal cannot do: packed documents
(`train.document_mask`) or padded instruction examples. PyTorch's sdpa turns a boolean mask into an additive one
in the query's dtype at every call, so every layer makes its own copy, and autograd keeps each layer's copy for
backward: at 4 x 2048 tokens in bf16, 34 MB a layer (1 GB over SmolLM2's 30 layers, a layer's worth of
activations on a 7B). Built additive once, in the dtype the layers compute in (autocast's, else the model's), the
one tensor passes through each layer's sdpa unchanged (autocast casts nothing that is already its dtype), and every
layer's backward keeps the same storage. The values are what PyTorch's own conversion makes (0 where a token may
attend, -inf where not), so attention computes the same. Checked by saved-tensor hooks in tests/test_memory.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def additive_sdpa_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' `sdpa_mask`, with a boolean mask returned as an additive one in the layers' compute dtype;
    None (is_causal does) and float masks are returned as they are."""
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if mask is None or mask.dtype != torch.bool:
        return mask
    kind = mask.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else kwargs.get("dtype", torch.float32)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


@contextlib.contextmanager
def shared_sdpa_mask() -> Iterator[None]:
    """Within: models with attn_implementation="sdpa" get `additive_sdpa_mask`'s mask (see the module's
    docstring). Set on transformers' mask interface for the block, and taken away after it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is additive_sdpa_mask:  # within another such block
        yield
        return
    ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] = additive_sdpa_mask  # an override on that instance, over the library's
    try:
        yield
    finally:
        del ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
