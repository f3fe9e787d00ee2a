"""The fused linear + cross-entropy inside Hugging Face causal LMs, for training and perplexity.

`causal_lm_loss(model, input_ids, labels)` runs the model (through whatever wraps it: peft, DeepSpeed, DDP) with
its LM head swapped, for that one call, for a module that only records the final hidden states and returns empty
logits; the loss then comes from those hidden states and the head's weight through the chunked kernel. The
tokens x vocab logits never exist, in the forward or the backward.
"""

from __future__ import annotations

import contextlib
import inspect
import types

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
        raise ValueError(f"{key}=triton needs a CUDA GPU and Triton; use {key}=auto (PyTorch on the CPU) "
                         "or off")  # fmt: skip
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
    """The transformers causal LM inside torch.compile (`_orig_mod`), DeepSpeed/DDP (`.module`) and peft
    (`get_base_model()`) wrappers."""
    while True:
        if isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner  # torch.compile's, which the Trainer hands its loss under train.torch_compile
        elif isinstance(inner := getattr(model, "module", None), nn.Module):
            model = inner
        else:
            break
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
    head, replaced = head_rows(head)
    with _gathered(head.weight):
        return fused_linear_cross_entropy(hidden, head.weight, labels, getattr(head, "bias", None),
                                          ignore_index=ignore_index, reduction=reduction, shift=True,
                                          backend=backend, replaced=replaced)  # fmt: skip


def head_rows(head: nn.Module) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor] | None]:
    """The LM head's linear layer, and the rows peft's trainable tokens replace in it (index, values: the
    `train.trainable_tokens` rows, on the head itself or tied to the input embedding's), or None. peft's wrapper
    reads `.weight` as a merged copy of the whole head, whose gradient the loss would compute whole."""
    adapter = getattr(head, "token_adapter", None)
    if adapter is None:
        return head, None
    active = [] if adapter.disable_adapters or adapter.merged else adapter.active_adapters
    if len(active) > 1:
        raise ValueError(f"the fused cross-entropy takes one trainable-tokens adapter at a time, not {active}")
    if not active:
        return adapter.base_layer, None
    values = adapter.trainable_tokens_delta[active[0]]
    made = adapter.__dict__.setdefault("_edgar_row_index", {})  # made once: a copy to the GPU each step may wait on it
    if (key := (active[0], values.device)) not in made:
        made[key] = torch.tensor(adapter.token_indices[active[0]], device=values.device)
    return adapter.base_layer, (made[key], values)


_SILU = ("SiLU", "SiLUActivation")  # torch's, and transformers' ACT2FN["silu"]


def _same_code(a, b) -> bool:  # noqa: ANN001
    a, b = inspect.unwrap(a), inspect.unwrap(b)
    return all(getattr(a.__code__, f) == getattr(b.__code__, f) for f in ("co_code", "co_names", "co_varnames")) and (
        a.__defaults__ == b.__defaults__)  # fmt: skip


def _rope_forward(forward, rope):  # noqa: ANN001
    """An attention class's forward reading `rope` where it reads `apply_rotary_pos_emb`, or None when that forward
    does not call Llama's `apply_rotary_pos_emb` (other models' rotations differ: partial, interleaved)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

    if not inspect.isfunction(forward) or hasattr(forward, "__wrapped__"):
        return None
    original = forward.__globals__.get("apply_rotary_pos_emb")
    if "apply_rotary_pos_emb" not in forward.__code__.co_names or not inspect.isfunction(original) or not _same_code(
            original, llama_rope):  # fmt: skip
        return None
    # The same code with its module's globals but that one name: the module itself stays as it is.
    glob = dict(forward.__globals__, apply_rotary_pos_emb=rope)
    fused = types.FunctionType(forward.__code__, glob, forward.__name__, forward.__defaults__, forward.__closure__)
    fused.__kwdefaults__ = forward.__kwdefaults__
    return fused


def fuse_layers(model: nn.Module) -> dict[str, int]:
    """Swap the Triton RMSNorm, SwiGLU and rotary embedding (kernels/triton_layers.py) into the Llama-family
    modules of `model` (through peft and DeepSpeed wrappers; LoRA layers on the projections stay as they are).
    Matches `*RMSNorm` modules computing `weight * normalized` (a `variance_epsilon`, no offset: Gemma's
    `1 + weight` is left alone), MLPs with gate/up/down projections and a SiLU, and attention modules whose forward
    calls a rotation with the code of Llama's `apply_rotary_pos_emb` (Llama, Mistral, Qwen2, ...; the module's own
    function is untouched, the swap is per module). Returns how many of each it swapped.

    Raises:
        ValueError: when nothing matched: the model is not one this fuses, and nothing runs under its name.
    """
    from kernels.triton_layers import rms_norm, rope, swiglu  # imported here once, not in every forward

    def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    rope_forwards: dict = {}  # one fused forward per attention class
    for module in causal_lm_of(model).modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and "Gemma" not in kind:
            module.forward = _rms_norm_forward.__get__(module)
            counts["rms_norm"] += 1
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) and type(
                getattr(module, "act_fn", None)).__name__ in _SILU:  # fmt: skip
            module.forward = _swiglu_mlp_forward.__get__(module)
            counts["swiglu"] += 1
        elif all(hasattr(module, a) for a in ("q_proj", "k_proj", "o_proj")):
            cls = type(module)
            if cls not in rope_forwards:
                rope_forwards[cls] = _rope_forward(cls.forward, rope)
            if rope_forwards[cls] is not None:
                module.forward = rope_forwards[cls].__get__(module)
                counts["rope"] += 1
    if not any(counts.values()):
        raise ValueError(f"train.fused_layers: {type(causal_lm_of(model)).__name__} has no Llama-style RMSNorm, "
                         "SwiGLU MLP or rotary embedding to fuse; set train.fused_layers=off")  # fmt: skip
    return counts
