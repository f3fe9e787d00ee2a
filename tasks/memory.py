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
recomputed in full, and one layer's activations for each layer kept whole (`train.checkpoint_layers` < 1, or no
checkpointing; then one more layer's worth is backward's working space). A layer's activations are about
17·b·s·h values (Korthikanti et al. 2022, with fused attention), except for LoRA on a Llama-style base in the
compute dtype, where `lora_layer_bytes` counts what autograd keeps tensor by tensor: a frozen projection keeps
no input, and what the adapters keep depends on `train.lean_lora`; counted against saved-tensor hooks in
tests/test_memory.py. The loss: with materialized logits,
which the loss upcasts to fp32, b·s·V values in the compute dtype plus about 10 bytes each for the fp32
log-softmax and its gradient; with the fused loss (kernels/), the hidden states' gradient and one chunk of fp32
logits with its compute-dtype copy. ZeRO-3 also holds the gathered weights of the layer being computed and the
one being prefetched. Quantized bases run their hidden states and logits in fp32 (peft upcasts the unquantized
weights). A LoRA base is in the compute dtype under DeepSpeed and with `train.lora_half_base`, fp32 otherwise.

Measured against this on an H100 and an H200 (bench/RESULTS.md): from -4% to +14% of the measured peak, except
8-bit bases, which bitsandbytes' LLM.int8 makes about 22% heavier than this model says (known gap), and SmolLM2,
whose every row peaked 0.25 to 0.31 GB above the plan (small models' fixed costs, such as the CUDA libraries'
workspaces, are not modelled). tests/test_memory.py checks the plan against bench/results' measured peaks.
A training on the CPU also counts its process's own memory and what the C allocator keeps of freed activations
(CPU_PROCESS_GB, CPU_FREED_KEPT, CPU_ALLOCATOR_GB), checked against the peaks bench/cpu_memory.py measured.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

GB = 1e9
_ADAM_K = {"mixed": 12, "fp32": 8}
_WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1, "nf4": 0.5625}  # NF4: 4 bits + block scales
# Per logit, beyond the logits in the compute dtype: the fp32 log-softmax the loss saves and, in backward, its
# gradient, partly overlapping (10 bytes matched the measured peak of SmolLM2's 49k vocabulary within 1%).
_LOGIT_EXTRA_BYTES = 10
HEADROOM = 0.92  # CUDA context, allocator fragmentation and temporary buffers take the rest
# What a micro-batch's size costs in throughput per FLOP, for `fit`: t tokens per micro-batch run at efficiency
# t / (t + small), where `small` is SMALL_BATCH_TOKENS for a layer of SMALL_BATCH_LAYER_PARAMS parameters. One
# measurement sets it: the Llama-2-7B shape's micro-batch 1 (2048 tokens) did 0.79x the work per second of
# micro-batch 4 (8192 tokens) (bench/RESULTS.md: 41.7% against 52.7% of the peak in work done, an H200 and an H100),
# which gives 800 tokens. What a small micro-batch loses is each layer pass's fixed cost (kernel launches, the
# small matmuls' lower occupancy), on the 7B the time of 800 tokens' matmuls. A smaller layer does less work a token
# for about the same fixed cost, so `small` grows as the layer's parameters shrink: about 46k tokens for
# SmolLM2-135M's 3.5M, whose eager step was kernel launches (5% MFU on the H200, where ours at micro-batch 2 ran
# 0.68x the baseline at 4; the document mask's dense sdpa is the other suspect). `bench/train_throughput.py
# --checkpoint-sweep` measures it in one run.
SMALL_BATCH_TOKENS = 800
SMALL_BATCH_LAYER_PARAMS = 202_383_488  # a Llama-2-7B block (with its share of the final norm), as model_shape counts
# A training on the CPU: resident memory beyond the tensors (bench/cpu_memory.py; bench/RESULTS.md, "Memory on the
# CPU"). The training process's own (Python, PyTorch's and transformers' code, the Trainer), and the share of the
# activations computed in forward (each layer's, kept or recomputed later) whose memory the C allocator keeps once
# they are freed (tasks/allocator.py): glibc's heap does not reuse it for tensors of the same size. Fitted to 26
# peaks of SmolLM2 (512 to 4096 tokens, layers kept or recomputed); with the two rules below, the plan lands at
# 0.98x to 1.13x of the 22 peaks bench/cpu_memory.py measured from 512 to 8192 tokens.
# glibc serves an allocation larger than its mmap threshold from a mapping of its own, which a free unmaps whole:
# the threshold starts at 128 KiB and rises to the size of each such block freed, up to 32 MiB (64-bit Linux), so
# once training runs, tensors up to 32 MiB come from the heap and larger ones keep nothing when freed: counted so,
# the plan is 0.98x to 1.06x of the peaks at 6144 and 8192 tokens, where the MLP's activations pass 32 MiB (1.17x
# to 1.62x counting every tensor); recomputed, 6144 tokens peaked lower than 4096 (7.10 against 7.47 GB).
# tcmalloc and jemalloc keep a few hundred MB however long the blocks: tcmalloc 0.09 GB at 512 tokens, 0.29 at 2048,
# nothing measurable at 6144 and 8192 (a share of the activations, 0.12, planned it 1.58x and 1.76x of the peak
# there, recomputed), jemalloc 0.02 to 0.12 GB.
CPU_PROCESS_GB = 0.67
CPU_FREED_KEPT = {"system": 0.7}  # of the activations computed in forward, in tensors up to 32 MiB
CPU_ALLOCATOR_GB = {"tcmalloc": 0.3, "jemalloc": 0.12}  # whatever the activations
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


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
    # for lora_layer_bytes (0 / empty: not a Llama-style block, the 17-values rule applies)
    intermediate: int = 0  # the MLP's width
    kv_hidden: int = 0  # key/value heads x head size
    heads: int = 0
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ()  # the adapted projections of one layer
    dora_widths: tuple[tuple[int, int], ...] = ()  # DoRA (`train.use_dora`): (in, out) of each adapted projection


# Which tensor each Llama-style projection reads: projections that read the same one share what they keep of it.
_INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
             "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}  # fmt: skip


def lora_layer_bytes(shape: ModelShape, **kw) -> float | None:
    """Bytes per token one Llama-style layer keeps for backward under LoRA (`lora_layer_tensors`, summed)."""
    tensors = lora_layer_tensors(shape, **kw)
    return None if tensors is None else sum(tensors)


def lora_layer_tensors(shape: ModelShape, *, act_bytes: int, compiled: bool, lean: bool, dropout: float,
                       mask_bytes: int = 1, matmul_bytes: int = 2, cast: bool = True) -> list[float] | None:
    """Bytes per token of each tensor one Llama-style layer keeps for backward under LoRA with a frozen base in the
    compute dtype (None where the shape is not one). Frozen projections keep no input. Tensor by tensor:

    - each RMSNorm: its input (eager LlamaRMSNorm keeps the fp32 copy it normalizes; compiled or Triton-fused,
      the input itself) and 1/rms per token;
    - attention: q, k, v and the output, and the log-sum-exp per head;
    - the MLP: gate and up (and eagerly silu(gate) too);
    - with DoRA (the shape's `dora_widths`), each adapted projection's outputs: `dora_outputs`;
    - each adapter: lora_A's output (r values). With `lean` (kernels/lora.py), each input once per group of
      projections reading it, in the compute dtype (o_proj's is the attention output, kept already). With peft,
      per projection lora_A's input in its matmul's dtype (`matmul_bytes`: the compute dtype under the Trainer's
      autocast and DeepSpeed, 4 for fp32 adapters without autocast) and, with dropout, the mask (`mask_bytes`: 1
      for CUDA's bool mask; 4 for eager PyTorch's on the CPU). `cast`: peft casts the input to the adapters'
      dtype (fp32 adapters on a half base; false under DeepSpeed and in fp32), so without dropout each projection
      still keeps a copy of its own.
    """
    if not shape.intermediate or any(t not in _INPUT_OF for t in shape.lora_targets):
        return None
    h, inter = shape.hidden, shape.intermediate
    norm = [(act_bytes if compiled else 4) * h, 4]
    attention = [act_bytes * h, act_bytes * shape.kv_hidden, act_bytes * shape.kv_hidden, act_bytes * h,
                 4 * shape.heads]  # fmt: skip
    mlp = [act_bytes * inter] * (2 if compiled else 3)
    width = {"attn_in": h, "attn_out": h, "mlp_in": h, "mlp_mid": inter}
    adapters = [matmul_bytes * shape.lora_r] * len(shape.lora_targets)
    if lean or not (cast or dropout):  # peft without a cast or dropout keeps the input itself too
        # the input itself, once per group of projections reading it (o_proj's is the attention output, kept already)
        adapters += [act_bytes * width[g] for g in sorted({_INPUT_OF[t] for t in shape.lora_targets} - {"attn_out"})]
    else:  # per projection: lora_A's own input (a cast copy or dropout's output), and the mask
        adapters += [matmul_bytes * width[_INPUT_OF[t]] for t in shape.lora_targets]
        adapters += [mask_bytes * width[_INPUT_OF[t]] for t in shape.lora_targets] if dropout else []
    return 2 * norm + attention + mlp + adapters + dora_outputs(shape, act_bytes, lean)


def dora_outputs(shape: ModelShape, act_bytes: int, lean: bool = False) -> list[float]:
    """Bytes per token DoRA's adapted projections keep beyond LoRA's (`train.use_dora`): each one's base output
    and LoRA output, which its magnitude's gradient reads; with `lean` (kernels/lora.py) their sum alone."""
    return [act_bytes * out for _, out in shape.dora_widths] * (1 if lean else 2)


def dora_weight_bytes(shape: ModelShape, *, act_bytes: float, adapter_bytes: int, cast_base: bool,
                      lean: bool = False) -> float:  # fmt: skip
    """The most that peft's DoRA holds at once, beyond what is kept for backward, while one projection builds its
    weight to normalize it (`train.use_dora`): the identity matrix through lora_A (in x in, in the compute dtype,
    kept by lora_A's graph while the weight exists), and in the adapters' dtype BA, its scaled copy and W + sBA,
    and W itself cast to that dtype where the base is another (a half or quantized base under fp32 adapters), all
    in x out. The largest projection's; measured on the CPU's PyTorch (tests/test_memory.py): at 4096 x 4096, fp32,
    256 MiB; a bf16 base under autocast, 288 MiB. `lean` (train.lean_lora, kernels/lora.py `dora_norm`): a block of
    W's rows in fp32 at a time, NORM_BLOCK values."""
    if lean:
        from kernels.lora import NORM_BLOCK

        return max((4 * min(i * o, max(1, NORM_BLOCK // i) * i) for i, o in shape.dora_widths), default=0)
    copies = 4 if cast_base else 3
    return max((act_bytes * i * i + adapter_bytes * copies * i * o for i, o in shape.dora_widths), default=0)


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


def recomputed_layers(layers: int, fraction: float) -> list[bool]:
    """Which of `layers` layers gradient checkpointing recomputes at `train.checkpoint_layers=fraction`:
    round(fraction x layers) of them, evenly spaced, in integers (k/n in floating point can fall short of a
    whole layer). The one rule for the plan and the engine."""
    k = round(layers * fraction)
    return [(i + 1) * k // layers > i * k // layers for i in range(layers)]


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
    process: float = 0.0  # on the CPU: the process's own memory and what its allocator keeps of freed tensors


def estimate(shape: ModelShape, *, option: str, nproc: int, seq: int, batch: int, mode: str, precision: str,
             quantization: str | None = None, gradient_checkpointing: bool = True, checkpoint_layers: float = 1.0,
             fused_loss: bool = False, half_base: bool = True, compiled: bool = False, lean_lora: bool = False,
             lora_dropout: float = 0.0, dense_mask: bool = False, fp8_base: bool = False, token_rows: bool = False,
             on_cpu: bool = False, allocator: str = "system") -> Estimate:  # fmt: skip
    """Peak memory per device for one engine option: `none`, `zero2`, `zero3`, `zero3-offload` or `fsdp`.

    checkpoint_layers: the fraction of layers recomputed (the others keep their activations); fused_loss: the
    loss from kernels/ (one chunk of logits instead of all); half_base: a LoRA base in the compute dtype (false:
    fp32 weights under autocast, as `train.lora_half_base=false` loads it; DeepSpeed's engines always hold it in
    the compute dtype, FSDP always in fp32); compiled: torch.compile or the Triton layers (`train.torch_compile`,
    `train.fused_layers`), whose norms and MLPs keep less; lean_lora and lora_dropout: see `lora_layer_bytes`
    (on_cpu: a training on the CPU, whose eager dropout keeps a 4-byte mask a value where CUDA's keeps 1, and
    whose RAM also holds the process's code and what `allocator` keeps of freed tensors: CPU_FREED_KEPT and
    CPU_ALLOCATOR_GB);
    dense_mask: the document mask reaches sdpa as a dense b x 1 x s x s mask (`train.document_mask` with
    `train.attention=sdpa`): one additive mask in the compute dtype that every layer keeps (kernels/masks.py; left
    to PyTorch, each layer kept its own copy), and, with grouped-query attention, in every layer kept whole the keys
    and values repeated to every head (transformers passes GQA to sdpa only without a mask): counted against
    saved-tensor hooks in tests/test_memory.py. On an H200, SmolLM2 (30 layers, 9 heads on 3 key-value heads) at 2 x
    2048 tokens, its mask copied per layer, peaked 1.0 GB higher than planned without this; the count was 0.69 GB.
    fp8_base: LoRA's frozen block layers as e4m3 weights (kernels/fp8.py, `train.fp8_base`): 1 byte a weight (the
    scales, 4 bytes per output row, and the norms' weights are rounding), the embeddings and LM head as before; a
    layer keeps for backward what a frozen bf16 layer keeps. Backward's transient: one projection's output gradient
    in e4m3 (on GPUs one Triton pass or inductor's fused code writes nothing else; the CPU's PyTorch ops take fp32
    copies on the way, RAM the CPU is rarely short of), and one weight transposed.
    token_rows: LoRA trains some tokens' embedding and head rows (`train.trainable_tokens`, peft's trainable
    tokens). Under the model's own loss, peft's merged copy of the head is kept for backward with the final hidden
    states (a frozen head keeps neither), and gets a dense gradient: two head matrices and the hidden states more
    (counted against saved-tensor hooks in tests/test_memory.py). The fused loss reads the rows apart (kernels/hf.py
    `head_rows`), and the input embedding's merged copy and dense gradient come and go outside the peak (at
    forward's start, backward's end).
    DoRA (`train.use_dora`, the shape's `dora_widths`): each adapted projection keeps its base output and its LoRA
    output for its magnitude's gradient (counted against saved-tensor hooks in tests/test_memory.py), and one
    projection at a time builds its whole weight (`dora_weight_bytes`). With LoRA dropout, peft's DoRA multiplies
    the dropped input by the base weight cast to the adapters' dtype, which autocast casts again to its own and
    keeps for backward: where the base is in another dtype than the adapters (the Trainer's bf16 on a half base),
    each layer kept holds a compute-dtype copy of every adapted weight."""
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
    fp8 = fp8_base and mode == "lora" and not quantization and stage == 0
    if fp8:
        weights = (frozen - shape.embedding_params) + shape.embedding_params * base_bytes
    if stage == 3:  # gathered working set: the layer being computed and the one being prefetched
        weights += 2 * shape.largest_layer_params * base_bytes
    tokens = batch * seq
    recomputed = sum(recomputed_layers(shape.layers, checkpoint_layers)) if gradient_checkpointing else 0
    whole = shape.layers - recomputed  # layers whose activations stay through backward
    tensors = None
    dora = bool(shape.dora_widths) and mode == "lora"
    if mode == "lora" and half and not quantization:
        # the Trainer trains bf16/fp16 under autocast, adapters in fp32; DeepSpeed casts the adapters instead
        tensors = lora_layer_tensors(shape, act_bytes=act_bytes, compiled=compiled, lean=lean_lora,
                                     dropout=lora_dropout, mask_bytes=4 if on_cpu else 1, matmul_bytes=act_bytes,
                                     cast=mixed and not option.startswith("zero"))  # fmt: skip
    if tensors is None:
        tensors = [shape.hidden * act_bytes] * 17 + dora_outputs(shape, act_bytes, lean_lora)
    layer = sum(tensors)
    # recomputed layers keep their input; one layer at a time is recomputed, or is backward's working space
    acts = tokens * (shape.hidden * act_bytes * recomputed + layer * (1 + whole))
    if fp8:
        widest = max(shape.intermediate, shape.hidden)
        acts += tokens * widest + widest * shape.hidden
    if dora:  # in forward (and in each recompute) one projection at a time builds its whole weight
        adapter_bytes = 2 if mixed and option.startswith("zero") else 4  # DeepSpeed casts the adapters too
        cast_base = quantization is not None or base_bytes != adapter_bytes
        acts += dora_weight_bytes(shape, act_bytes=act_bytes, adapter_bytes=adapter_bytes, cast_base=cast_base,
                                  lean=lean_lora)  # fmt: skip
        if lora_dropout and cast_base and not lean_lora:  # peft's base matmul on the dropped input: autocast's W
            acts += (1 + whole) * act_bytes * sum(i * o for i, o in shape.dora_widths)
    if dense_mask:  # the one mask; GQA's repeated heads in each layer kept whole, and in the one being recomputed
        repeated_kv = 2 * max(shape.hidden - shape.kv_hidden, 0) if shape.kv_hidden else 0
        acts += tokens * act_bytes * (seq + repeated_kv * (whole + (1 if recomputed else 0)))
    if fused_loss:  # the hidden states' gradient, and one chunk of fp32 logits with its compute-dtype copy
        from kernels.fused_linear_ce import default_chunk_size

        chunk = default_chunk_size(tokens, shape.vocab, shape.hidden)
        logits = tokens * shape.hidden * act_bytes + chunk * shape.vocab * (4 + act_bytes)
    else:
        logits = tokens * shape.vocab * (act_bytes + _LOGIT_EXTRA_BYTES)
        if token_rows and mode == "lora":
            logits += 2 * shape.vocab * shape.hidden * base_bytes + tokens * shape.hidden * act_bytes
    process = 0.0
    if on_cpu:  # forward computes every layer's activations once, whether kept or recomputed in backward
        if allocator == "system":  # glibc maps the larger ones on their own and unmaps them whole when freed
            tensors = [b for b in tensors if tokens * b <= GLIBC_MMAP_THRESHOLD_MAX]
        process = ((CPU_PROCESS_GB + CPU_ALLOCATOR_GB.get(allocator, 0.0)) * GB
                   + CPU_FREED_KEPT.get(allocator, 0.0) * tokens * sum(tensors) * shape.layers)  # fmt: skip
    total = weights + states + acts + logits + process
    if on_cpu:  # offloading to the host moves nothing out of the CPU's RAM
        total += host
    return Estimate(option, weights / GB, states / GB, acts / GB, logits / GB, total / GB, host / GB,
                    process=process / GB)


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
    lora = (f" r={lora_r}{' DoRA' if shape.dora_widths else ''} ({shape.lora_params / 1e6:.2f}M trained)"
            if mode == "lora" else "")  # fmt: skip
    return f"{shape.params / 1e6:,.1f}M params, {mode}{lora}, {batch}x{seq} tokens, {precision}, {nproc} process(es)"


def format_plan(rows: list[Estimate], chosen: str, budget_gb: float, context: str) -> str:
    process = any(r.process for r in rows)  # a training on the CPU
    lines = [
        f"memory plan per device ({context}; budget {budget_gb:.1f} GB, {HEADROOM:.0%} usable)",
        f"  {'engine':<15}{'frozen':>9}{'trained':>12}{'activations':>13}{'logits':>9}"
        + (f"{'process':>9}" if process else "") + f"{'total':>9}{'host':>9}  fits",
    ]  # fmt: skip
    for r in rows:
        mark = "  <- this run" if r.option == chosen else ""
        lines.append(f"  {r.option:<15}{r.frozen_weights:>9.2f}{r.trained_states:>12.2f}{r.activations:>13.2f}"
                     f"{r.logits:>9.2f}" + (f"{r.process:>9.2f}" if process else "")
                     + f"{r.total:>9.2f}{r.host:>9.2f}  {'yes' if r.fits else 'NO'}{mark}")  # fmt: skip
    if process:
        lines.append("  process: the training process's code and what its C allocator keeps of freed tensors "
                     "(train.cpu_allocator); total: host included, the same RAM on the CPU")  # fmt: skip
    return "\n".join(lines)


def model_shape(model_dir: str, mode: str, lora_r: int, targets: list[str] | None,
                key: str = "train.lora_target_modules", dora: bool = False) -> ModelShape:  # fmt: skip
    """Count parameters on the meta device (no memory, no weights read) and the adapters LoRA would add (with
    `dora`, DoRA's magnitudes too: one per output of each adapted projection).

    Raises:
        ConfigError: LoRA `targets` (`key`) that name no layer of the model LoRA adapts (`tasks.finetune.lora_targets`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.models import building, load_config

    config = load_config(model_dir)
    with torch.device("meta"), building:
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    lora, adapted, widths = 0, set(), []
    if mode == "lora":
        from tasks.finetune import lora_targets, targeted

        wanted = set(lora_targets(model, targets, key))
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if any(targeted(name, t) for t in wanted) and weight is not None and weight.dim() == 2:
                out, width_in = weight.shape[::-1] if type(module).__name__ == "Conv1D" else weight.shape  # GPT-2's
                lora += lora_r * (width_in + out) + (out if dora else 0)
                if ".layers.0." in name:
                    adapted.add(name.rsplit(".", 1)[-1])
                if re.search(r"\.(layers|h|blocks)\.0\.", name):  # the first block (GPT-2's and GPT-J's are h)
                    widths.append((width_in, out))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    embed = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    tied = output is None or output.weight is model.get_input_embeddings().weight
    embeddings = embed + (0 if tied else output.weight.numel())
    per_layer = (params - embeddings) // max(1, layers)
    heads = getattr(text, "num_attention_heads", 0) or 0
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
    return ModelShape(params, lora, layers, hidden, config.vocab_size, per_layer, embeddings,
                      intermediate=getattr(text, "intermediate_size", 0) or 0,
                      kv_hidden=(getattr(text, "num_key_value_heads", None) or heads) * head_dim, heads=heads,
                      lora_r=lora_r if mode == "lora" else 0, lora_targets=tuple(sorted(adapted)),
                      dora_widths=tuple(widths) if dora and mode == "lora" else ())  # fmt: skip


def device_budget_gb(nproc: int) -> tuple[float, str]:
    """Memory one training process may use: the GPU's, or this host's RAM shared by its processes."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GB, props.name
    return host_ram_gb(nproc), "cpu"


def host_ram_gb(nproc: int = 1) -> float:
    """This host's RAM, shared by `nproc` training processes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB / max(1, nproc)


def recompute_all(gradient_checkpointing: bool | str, checkpoint_layers: float) -> str | None:
    """The settings that recompute every layer, where not every layer is (None where every layer is)."""
    if gradient_checkpointing is True and checkpoint_layers >= 1.0:
        return None
    return "train.gradient_checkpointing=true" + (" with train.checkpoint_layers=1.0"
                                                   if gradient_checkpointing is True else "")  # fmt: skip


def suggestion(rows: list[Estimate], shape: ModelShape, **kw) -> str:
    """The cheapest change that fits: another engine; then, one on top of the other, for DoRA lean_lora's (which
    neither builds the weights nor keeps two outputs, and runs on one process or ZeRO-2), every layer recomputed,
    on the CPU tcmalloc, and a smaller micro-batch with gradient accumulation; else what is left (on GPUs more of
    them or a 4-bit base; shorter blocks). kw: `plan`'s keywords."""
    fitting = [r.option for r in rows if r.fits]
    if fitting:
        key = "train.deepspeed" if fitting[0] != "none" else "train.deepspeed (unset)"
        return f"{key}={fitting[0]}" if fitting[0] != "none" else key
    steps: list[tuple[str, dict, str]] = []
    if shape.dora_widths and not kw.get("lean_lora") and not kw.get("quantization"):
        steps.append(("lean", {"lean_lora": True}, "train.lean_lora=true (DoRA's norms without building the weights)"))
    if recompute := recompute_all(kw["gradient_checkpointing"], kw.get("checkpoint_layers", 1.0)):
        steps.append(("recompute", {"gradient_checkpointing": True, "checkpoint_layers": 1.0}, recompute))
    if kw.get("on_cpu") and kw.get("allocator", "system") == "system":
        from tasks.allocator import TRY_TCMALLOC

        steps.append(("allocator", {"allocator": "tcmalloc"}, TRY_TCMALLOC))
    batch = kw["batch"]
    while batch > 1:
        batch //= 2
        accumulate = f"train.gradient_accumulation_steps x{kw['batch'] // batch}"
        steps.append(("batch", {"batch": batch}, f"train.per_device_train_batch_size={batch} with {accumulate}"))
    changes: dict = {}
    said: dict[str, str] = {}  # one text per kind of change, the latest micro-batch replacing the one before
    for kind, change, text in steps:
        changes |= change
        said[kind] = text
        ok = [r.option for r in plan(shape, **dict(kw, **changes)) if r.fits
              and not (changes.get("lean_lora") and r.option.startswith(("zero3", "fsdp")))]  # lean_lora refuses them
        if ok:
            return " and ".join([*said.values()] + ([f"train.deepspeed={ok[0]}"] if ok[0] != "none" else []))
    if kw.get("on_cpu"):
        return "a shorter tokenize.max_input_length, or a machine with more RAM"
    return "more devices (train.nproc), train.int4_quantization=true, or a shorter tokenize.max_input_length"


def unfit_advice(shape: ModelShape, *, budget_gb: float, options=OPTIONS, **kw) -> str:
    """What to try when `fit` finds nothing for one engine: an engine that fits at micro-batch 1 with every layer
    recomputed, else more devices, a 4-bit base or shorter blocks. kw: `plan`'s other keywords."""
    kw = dict(kw, batch=1, gradient_checkpointing=True, checkpoint_layers=1.0)
    return suggestion(plan(shape, budget_gb=budget_gb, options=options, **kw), shape, budget_gb=budget_gb, **kw)


def small_batch_tokens(shape: ModelShape) -> float:
    """The micro-batch, in tokens, at which `shape`'s layers run at half their large-batch efficiency."""
    return SMALL_BATCH_TOKENS * SMALL_BATCH_LAYER_PARAMS / max(shape.largest_layer_params, 1)


def fit(shape: ModelShape, *, budget_gb: float, batch: int, **kw) -> list[dict]:
    """The settings that fit `budget_gb` (in full: apply HEADROOM first for a device's memory), fastest first.

    For each micro-batch that divides `batch` (the rest becomes gradient accumulation: the same optimizer steps),
    the fewest recomputed layers that fit. `work` per token is forward 2 + backward (2 with a frozen LoRA base, 4
    in full) + 2 for each recomputed share; `time` is the work over the micro-batch's efficiency (see
    SMALL_BATCH_TOKENS; on a small model's layers, a larger micro-batch with more recomputed can come first; on
    the CPU a micro-batch's size buys little, so time is the work): ranked by time, then by the larger micro-batch.
    kw: `estimate`'s other keywords, engine option and `seq` included."""
    kw = {k: v for k, v in kw.items() if k not in ("gradient_checkpointing", "checkpoint_layers")}
    # On the CPU, SmolLM2 at 2 x 512 tokens took 7.7 to 8.2 s a step against 3.9 to 4.6 s at 1 x 512 (bench/results'
    # cpu-memory rows): 0.97x to 1.12x the tokens/s of micro-batch 1, where a GPU's kernel launches dominate.
    small = 0.0 if kw.get("on_cpu") else small_batch_tokens(shape)
    rows = []
    for micro in (m for m in range(batch, 0, -1) if batch % m == 0):
        for k in range(shape.layers + 1):
            fraction = k / shape.layers
            row = estimate(shape, batch=micro, gradient_checkpointing=k > 0, checkpoint_layers=fraction or 1.0, **kw)
            if row.total <= budget_gb:
                work = 2 + (2 if kw.get("mode") == "lora" else 4) + 2 * fraction
                tokens = micro * kw["seq"]
                rows.append({"per_device_train_batch_size": micro, "gradient_accumulation_steps": batch // micro,
                             "gradient_checkpointing": k > 0, "checkpoint_layers": fraction if k else 1.0,
                             "recomputed_layers": k, "planned_gb": row.total, "work": work,
                             "time": work * (tokens + small) / tokens})  # fmt: skip
                break
    return sorted(rows, key=lambda r: (r["time"], -r["per_device_train_batch_size"]))


def as_json(rows: list[Estimate]) -> list[dict]:
    return [asdict(r) for r in rows]
