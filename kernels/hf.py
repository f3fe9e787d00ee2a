"""The fused linear + cross-entropy inside Hugging Face causal LMs, for training and perplexity.

`causal_lm_loss(model, input_ids, labels)` runs the model (through whatever wraps it: peft, DeepSpeed, DDP) with
its LM head swapped, for that one call, for a module that only records the final hidden states and returns empty
logits; the loss then comes from those hidden states and the head's weight through the chunked kernel. The
tokens x vocab logits never exist, in the forward or the backward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kernels.fused_linear_ce import IGNORE_INDEX, fused_linear_cross_entropy

BACKENDS = ("off", "auto", "torch", "triton")


def resolve_backend(choice: str, key: str = "fused_linear_ce", fsdp: bool = False) -> str:
    """What `choice` runs on this machine: off, torch or triton; Triton where it cannot run is an error.

    Under FSDP the LM head's weight is a shard outside its own forward: `auto` means off there, and asking for
    the kernel by name is refused.
    """
    from kernels.fused_linear_ce import triton_available

    if choice not in BACKENDS:
        raise ValueError(f"{key} must be one of {', '.join(BACKENDS)}, not {choice!r}")
    if fsdp and choice != "off":
        if choice == "auto":
            return "off"
        raise ValueError(f"{key}={choice} is not supported with train.enable_fsdp (the LM head is sharded); "
                         f"set {key}=auto or off, or train with DeepSpeed")  # fmt: skip
    gpu = torch.cuda.is_available() and triton_available()
    if choice == "triton" and not gpu:
        raise ValueError(f"{key}=triton needs a CUDA GPU and Triton; use {key}=auto (the chunked PyTorch "
                         "kernel on the CPU) or off")  # fmt: skip
    if choice == "auto":
        return "triton" if gpu else "torch"
    return choice


class _RecordHidden(nn.Module):
    """Stands in for the LM head for one forward: keeps its input, returns (..., 0) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden.new_zeros((*hidden.shape[:-1], 0))


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside DeepSpeed/DDP (`.module`) and peft (`get_base_model()`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def check_supported(lm: nn.Module) -> None:
    """Refuse models whose logits are not a plain linear map of the hidden states."""
    cfg = getattr(lm, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, key, None) not in (None, 0, 1, 1.0):
            raise ValueError(f"{type(lm).__name__} scales its logits ({key}={getattr(cfg, key)}); the fused "
                             "cross-entropy does not: set train.fused_linear_ce=off and eval.fused_linear_ce=off")  # fmt: skip
    if lm.get_output_embeddings() is None:
        raise ValueError(f"{type(lm).__name__} has no LM head; set fused_linear_ce=off")


@contextlib.contextmanager
def _gathered(weight: torch.Tensor):
    """The full head weight under ZeRO-3 (a frozen head only: its gradient would bypass ZeRO's partitioning)."""
    if not hasattr(weight, "ds_id"):
        yield
        return
    if weight.requires_grad:
        raise ValueError("the fused cross-entropy with a trainable LM head under ZeRO-3 is not supported: "
                         "set train.fused_linear_ce=off, or train LoRA (the head stays frozen)")  # fmt: skip
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        yield


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean",
                   backend: str = "auto", ignore_index: int = IGNORE_INDEX, **inputs) -> torch.Tensor:  # fmt: skip
    """Next-token cross-entropy of `model` on `input_ids` against `labels` (HF convention: shifted inside)."""
    lm = causal_lm_of(model)
    check_supported(lm)
    head = lm.get_output_embeddings()
    name = next(n for n, m in lm.named_children() if m is head)
    record = lm.__dict__.setdefault("_edgar_record_hidden", _RecordHidden())  # one per model: torch.compile's
    record.hidden = None                                                        # guards see the same module
    setattr(lm, name, record)
    try:
        model(input_ids=input_ids, **inputs)
    finally:
        setattr(lm, name, head)
    hidden, record.hidden = record.hidden, None
    if hidden is None:
        raise RuntimeError(f"{type(lm).__name__}'s forward never called its LM head ({name})")
    with _gathered(head.weight):
        return fused_linear_cross_entropy(hidden, head.weight, labels, getattr(head, "bias", None),
                                          ignore_index=ignore_index, reduction=reduction, shift=True,
                                          backend=backend)  # fmt: skip
