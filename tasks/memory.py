"""Memory planning before a run: peak memory per device for each ZeRO stage, from the model's shape.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, section 5.1). For Ψ parameters trained with
mixed-precision Adam, a device holds 2Ψ bytes of half-precision weights, 2Ψ of gradients and KΨ of optimizer
state (K = 12: fp32 master weights, momentum and variance). Over N data-parallel devices:

    plain data parallel    (2 + 2 + K) Ψ
    ZeRO-1  (P_os)         2Ψ + 2Ψ + KΨ/N
    ZeRO-2  (P_os+g)       2Ψ + (2 + K)Ψ/N
    ZeRO-3  (P_os+g+p)     (2 + 2 + K)Ψ/N

LoRA freezes the base: its Ψ_base parameters cost only their weights (partitioned under ZeRO-3), and the
gradient and optimizer terms apply to the adapters' Ψ_lora. In fp32 (the CPU) weights and gradients take 4
bytes and K = 8 (the weights are the master copy). 8-bit and NF4 bases take 1 and about 0.56 bytes per weight.

Activations, with gradient checkpointing, are each recomputed layer's input (b·s·h per layer), one layer
recomputed in full (about 17·b·s·h values, Korthikanti et al. 2022, with fused attention), and 17·b·s·h for
each layer kept whole (`train.checkpoint_layers` < 1, or no checkpointing). The loss: with materialized logits,
which the loss upcasts to fp32, b·s·V values in the compute dtype plus about 10 bytes each for the fp32
log-softmax and its gradient; with the fused loss (kernels/), the hidden states' gradient and one chunk of fp32
logits with its compute-dtype copy. ZeRO-3 also holds the gathered weights of the layer being computed and the
one being prefetched. Quantized bases run their hidden states and logits in fp32 (peft upcasts the unquantized
weights). A LoRA base is in the compute dtype under DeepSpeed and with `train.lora_half_base`, fp32 otherwise.

Measured against this on an H100 (bench/RESULTS.md): from -4% to +14% of the measured peak, except 8-bit
bases, which bitsandbytes' LLM.int8 makes about 22% heavier than this model says (known gap), and SmolLM2 with
every speed option on (1.03 GB planned, 1.29 measured: small models' fixed costs, such as the CUDA libraries'
workspaces, are not modelled). tests/test_memory.py checks the plan against bench/results' measured peaks.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

GB = 1e9
_ADAM_K = {"mixed": 12, "fp32": 8}
_WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1, "nf4": 0.5625}  # NF4: 4 bits + block scales
# Per logit, beyond the logits in the compute dtype: the fp32 log-softmax the loss saves and, in backward, its
# gradient, partly overlapping (10 bytes matched the measured peak of SmolLM2's 49k vocabulary within 1%).
_LOGIT_EXTRA_BYTES = 10
HEADROOM = 0.92  # CUDA context, allocator fragmentation and temporary buffers take the rest


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    params: int  # all parameters (tied embeddings counted once)
    lora_params: int  # adapter parameters at the requested rank and targets (0 for full fine-tuning)
    layers: int
    hidden: int
    vocab: int
    largest_layer_params: int  # one transformer block: what ZeRO-3 gathers at a time
    embedding_params: int = 0  # input and output embeddings: bitsandbytes leaves them unquantized


def zero_model_states(psi: float, n: int, stage: int, k: int = 12, weight_bytes: float = 2, grad_bytes: float = 2) -> float:
    """Bytes of weights + gradients + optimizer state per device, the ZeRO paper's formulas (stage 0 = plain DP)."""
    weights, grads, optim = weight_bytes * psi, grad_bytes * psi, k * psi
    if stage == 0:
        return weights + grads + optim
    if stage == 1:
        return weights + grads + optim / n
    if stage == 2:
        return weights + (grads + optim) / n
    if stage == 3:
        return (weights + grads + optim) / n
    raise ValueError(f"ZeRO stage {stage} does not exist (0-3)")


@dataclass
class Estimate:
    """One row of the plan, in GB per device (and on the host, for offload)."""

    option: str
    frozen_weights: float  # the LoRA base (and ZeRO-3's gathered layers)
    trained_states: float  # weights, gradients and Adam state of what trains
    activations: float
    logits: float
    total: float
    host: float
    fits: bool | None = None


def estimate(shape: ModelShape, *, option: str, nproc: int, seq: int, batch: int, mode: str, precision: str,
             quantization: str | None = None, gradient_checkpointing: bool = True, checkpoint_layers: float = 1.0,
             fused_loss: bool = False, half_base: bool = True) -> Estimate:  # fmt: skip
    """Peak memory per device for one engine option: `none`, `zero2`, `zero3`, `zero3-offload` or `fsdp`.

    checkpoint_layers: the fraction of layers recomputed (the others keep their activations); fused_loss: the
    loss from kernels/ (one chunk of logits instead of all); half_base: a LoRA base in the compute dtype (false:
    fp32 weights under autocast, as `train.lora_half_base=false` loads it; DeepSpeed's engines always hold it in
    the compute dtype, FSDP always in fp32)."""
    mixed = precision in ("bf16", "fp16")
    # peft's prepare_model_for_kbit_training upcasts every unquantized weight (norms, embeddings) to fp32, so
    # a quantized model's hidden states and logits are fp32 whatever the training precision.
    act_bytes = 2 if mixed and not quantization else 4
    k = _ADAM_K["mixed" if mixed else "fp32"]
    grad_bytes = 2 if mixed else 4
    # DeepSpeed keeps the base in the compute dtype; FSDP needs fp32 (one dtype per flat parameter)
    half = option.startswith("zero") or (half_base and option != "fsdp")
    base_bytes = _WEIGHT_BYTES[quantization] if quantization else act_bytes if half else 4
    trainable = shape.lora_params if mode == "lora" else shape.params
    frozen = shape.params if mode == "lora" else 0  # the LoRA base: weights only
    stage = {"none": 0, "zero2": 2, "zero3": 3, "zero3-offload": 3, "fsdp": 3}[option]
    n = max(1, nproc)
    if option == "zero3-offload":  # parameters and optimizer state live on the host; the device works a layer at a time
        weights = 0.0
        states = 0.0
        host = (frozen * base_bytes + trainable * (act_bytes + grad_bytes + k)) / n
    else:
        weights = frozen * base_bytes / (n if stage == 3 else 1)
        if quantization:  # embeddings stay unquantized, in fp32
            weights += shape.embedding_params * (4 - base_bytes)
        # The adapters' (or full model's) weights, gradients and Adam state, partitioned as the paper says.
        states = zero_model_states(trainable, n, stage, k, act_bytes, grad_bytes)
        host = 0.0
    if stage == 3:  # gathered working set: the layer being computed and the one being prefetched
        weights += 2 * shape.largest_layer_params * base_bytes
    tokens = batch * seq
    recomputed = round(shape.layers * checkpoint_layers) if gradient_checkpointing else 0
    whole = shape.layers - recomputed  # layers whose activations stay through backward
    # recomputed layers keep their input; one of them is recomputed at a time
    acts = tokens * shape.hidden * act_bytes * (recomputed + (17 if recomputed else 0) + 17 * whole)
    if fused_loss:  # the hidden states' gradient, and one chunk of fp32 logits with its compute-dtype copy
        from kernels.fused_linear_ce import default_chunk_size

        chunk = default_chunk_size(tokens, shape.vocab, shape.hidden)
        logits = tokens * shape.hidden * act_bytes + chunk * shape.vocab * (4 + act_bytes)
    else:
        logits = tokens * shape.vocab * (act_bytes + _LOGIT_EXTRA_BYTES)
    total = weights + states + acts + logits
    return Estimate(option, weights / GB, states / GB, acts / GB, logits / GB, total / GB, host / GB)


OPTIONS = ("none", "zero2", "zero3", "zero3-offload")


def plan(shape: ModelShape, *, nproc: int, seq: int, batch: int, mode: str, precision: str, quantization: str | None,
         gradient_checkpointing: bool, budget_gb: float, options=OPTIONS, **kw) -> list[Estimate]:  # fmt: skip
    """`estimate` for each engine option (kw: its other keywords), with whether it fits the budget."""
    rows = []
    for option in options:
        if (quantization and option.startswith("zero3")) or (option == "none" and nproc > 1):
            continue  # refused by the config: ZeRO-3 cannot partition bitsandbytes weights
        row = estimate(shape, option=option, nproc=nproc, seq=seq, batch=batch, mode=mode, precision=precision,
                       quantization=quantization, gradient_checkpointing=gradient_checkpointing, **kw)  # fmt: skip
        row.fits = row.total <= budget_gb * HEADROOM
        rows.append(row)
    return rows


def describe(shape: ModelShape, *, mode: str, lora_r: int, batch: int, seq: int, precision: str, nproc: int) -> str:
    """The plan's heading: what is being planned for."""
    lora = f" r={lora_r} ({shape.lora_params / 1e6:.2f}M trained)" if mode == "lora" else ""
    return f"{shape.params / 1e6:,.1f}M params, {mode}{lora}, {batch}x{seq} tokens, {precision}, {nproc} process(es)"


def format_plan(rows: list[Estimate], chosen: str, budget_gb: float, context: str) -> str:
    lines = [
        f"memory plan per device ({context}; budget {budget_gb:.1f} GB, {HEADROOM:.0%} usable)",
        f"  {'engine':<15}{'frozen':>9}{'trained':>12}{'activations':>13}{'logits':>9}{'total':>9}{'host':>9}  fits",
    ]
    for r in rows:
        mark = "  <- this run" if r.option == chosen else ""
        lines.append(f"  {r.option:<15}{r.frozen_weights:>9.2f}{r.trained_states:>12.2f}{r.activations:>13.2f}"
                     f"{r.logits:>9.2f}{r.total:>9.2f}{r.host:>9.2f}  {'yes' if r.fits else 'NO'}{mark}")  # fmt: skip
    return "\n".join(lines)


def model_shape(model_dir: str, mode: str, lora_r: int, targets: list[str] | None) -> ModelShape:
    """Count parameters on the meta device (no memory, no weights read) and the adapters LoRA would add."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    lora = 0
    if mode == "lora":
        from tasks.finetune import lora_targets

        wanted = set(lora_targets(config.model_type, targets))
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if name.rsplit(".", 1)[-1] in wanted and weight is not None and weight.dim() == 2:
                lora += lora_r * (weight.shape[0] + weight.shape[1])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    embed = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    tied = output is None or output.weight is model.get_input_embeddings().weight
    embeddings = embed + (0 if tied else output.weight.numel())
    per_layer = (params - embeddings) // max(1, layers)
    return ModelShape(params, lora, layers, hidden, config.vocab_size, per_layer, embeddings)


def device_budget_gb(nproc: int) -> tuple[float, str]:
    """Memory one training process may use: the GPU's, or this host's RAM shared by its processes."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GB, props.name
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / GB / max(1, nproc), "cpu"


def suggestion(rows: list[Estimate], shape: ModelShape, **kw) -> str:
    """The cheapest change that fits: another engine, then a smaller micro-batch with gradient accumulation."""
    fitting = [r.option for r in rows if r.fits]
    if fitting:
        key = "train.deepspeed" if fitting[0] != "none" else "train.deepspeed (unset)"
        return f"{key}={fitting[0]}" if fitting[0] != "none" else key
    batch = kw["batch"]
    while batch > 1:
        batch //= 2
        smaller = plan(shape, **dict(kw, batch=batch))
        ok = [r.option for r in smaller if r.fits]
        if ok:
            accum = kw["batch"] // batch
            return (f"train.per_device_train_batch_size={batch} with train.gradient_accumulation_steps x{accum}"
                    + (f" and train.deepspeed={ok[0]}" if ok[0] != "none" else ""))  # fmt: skip
    return "more devices (train.nproc), train.int4_quantization=true, or a shorter tokenize.max_input_length"


def as_json(rows: list[Estimate]) -> list[dict]:
    return [asdict(r) for r in rows]
