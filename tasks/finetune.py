"""Stage 4: fine-tune the base model on the packed blocks, with LoRA (default) or in full."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import load_from_disk

from edgar_tune.config import DEEPSPEED_PRESETS, REPO_ROOT, ConfigError, EvalConfig, StageFailed, TrainConfig
from edgar_tune.signals import signal_behind
from tasks import allocator, pruning
from tasks.checkpoints import (ValidationStopped, check_room_for_one, checkpoint_step, log_stop, resume_settings,
                               trainer_class)  # fmt: skip
from tasks.checkpoints import prepare as prepare_checkpoints
from tasks.io import atomic_dir, atomic_write_bytes, atomic_write_json, read_json, write_jsonl
from tasks.memory import recompute_all, recomputed_layers
from tasks.progress import EVENTS, Curves, OwnLine, Point, Progress, console_bars, whole_events
from tasks.profile import step_profiler, sync
from kernels.hf import causal_lm_of, fuse_layers, resolve_backend
from kernels import fp8, varlen
from kernels.lora import lean_lora
from kernels.masks import shared_sdpa_mask
from tasks.models import (base_model_path, building, building_alone, device, from_hub, load_causal_lm, load_tokenizer,
                          unpinned)  # fmt: skip

log = logging.getLogger(__name__)
_PLANS_LOGGED: set[tuple[str | None, str]] = set()  # (flow run id, message): the flow's early check, then the stage

# LoRA targets per architecture (config.model_type): attention and MLP projections, as JumpStart's scripts
# and the QLoRA paper adapt every linear layer of the blocks. Other architectures get that rule (`block_linears`).
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
_BLOCK = re.compile(r"\.\d+\.")  # a module inside one of the numbered transformer blocks: model.layers.3.mlp.up_proj


def _linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return isinstance(module, (torch.nn.Linear, Conv1D))  # bitsandbytes' 8- and 4-bit layers are nn.Linear too


def _adaptable(module: torch.nn.Module) -> bool:
    """A module type peft's LoRA adapts (by type, so ZeRO-3's partitioned weights, which are empty here, pass)."""
    nn = torch.nn
    return _linear(module) or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention))


def targeted(name: str, target: str) -> bool:
    """peft's rule for a list of target modules: a module's full name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def block_linears(model: torch.nn.Module) -> list[str]:
    """The names of the linear layers inside the transformer blocks, in the model's order: `LORA_TARGETS`' rule."""
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _BLOCK.search(f".{n}") and _linear(m)]
    return list(dict.fromkeys(names))


def lora_targets(model: torch.nn.Module, override: list[str] | None, key: str = "train.lora_target_modules"
                 ) -> list[str]:  # fmt: skip
    """The modules LoRA adapts in `model` (loaded, or built on the meta device): `override`, each name checked, or
    the architecture's in `LORA_TARGETS`, or every linear layer of its transformer blocks.

    Raises:
        ConfigError: a name in `override` that names no layer LoRA adapts (a typo adapts fewer layers than asked,
            or fails in peft once the base has loaded), saying the model's linear layers; a model without numbered
            blocks of linear layers and no `override`.
    """
    model_type = model.config.model_type
    default = LORA_TARGETS.get(model_type) or block_linears(model)
    linears = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _linear(m)))
    for target in override or ():
        hits = [m for n, m in model.named_modules() if targeted(n, target)]
        if not any(_adaptable(m) for m in hits):
            what = (f"names {type(hits[0]).__name__} modules, which LoRA does not adapt" if hits else
                    f"names no module of this {model_type} model")  # fmt: skip
            unset = f"; unset, it adapts {', '.join(default)}" if default else ""
            raise ConfigError(f"{key}: {target!r} {what}; its linear layers are {', '.join(linears)}{unset}")
    if override:
        return list(override)
    if not default:
        raise ConfigError(f"no LoRA targets for this {model_type} model: it has no numbered blocks of linear layers; "
                          f"set {key} (its linear layers are {', '.join(linears) or 'none'})")  # fmt: skip
    return default


def trainable_tokens(tokenize_dir: Path, cfg: TrainConfig, tokenizer=None) -> dict[str, int]:  # noqa: ANN001
    """`train.trainable_tokens` as the tokens whose rows this run trains beside LoRA, each with its id: the named
    ones, or under "auto" the tokenizer's added tokens that are not special and that the training split holds
    (none under full fine-tuning, which trains every row).

    Raises:
        ConfigError: a named token that is not one token of the tokenizer's vocabulary (saying its added tokens);
            rows to train under ZeRO-3 or FSDP, which shard the embedding matrix peft's trainable tokens read whole.
    """
    if cfg.mode != "lora" or cfg.trainable_tokens == []:
        return {}
    tokenizer = tokenizer or load_tokenizer(base_model_path(tokenize_dir))
    if cfg.trainable_tokens == "auto":
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
        chosen = {added[i]: i for i in sorted(_held(tokenize_dir / "train", set(added)))}
    else:
        vocab = tokenizer.get_vocab()
        for token in cfg.trainable_tokens:
            if token not in vocab:
                pieces = tokenizer.tokenize(token)
                added = ", ".join(t.content for t in tokenizer.added_tokens_decoder.values()) or "none"
                raise ConfigError(f"train.trainable_tokens: {token!r} is not one token of this tokenizer (it reads "
                                  f"as {len(pieces)}: {pieces[:6]}); name tokens of its vocabulary, such as its "
                                  f"added tokens ({added}); quote one that YAML reads as a list")  # fmt: skip
        chosen = {token: vocab[token] for token in cfg.trainable_tokens}
    if chosen and (option := engine_option(cfg)) in ("zero3", "zero3-offload", "fsdp"):
        engine = "train.enable_fsdp" if option == "fsdp" else f"train.deepspeed={cfg.deepspeed}"
        named = "auto" if cfg.trainable_tokens == "auto" else ",".join(cfg.trainable_tokens)
        raise ConfigError(f"train.trainable_tokens={named} trains the rows of {', '.join(chosen)} beside LoRA, and "
                          f"{engine} shards the embedding matrix whose rows peft reads whole (not tried): set "
                          "train.trainable_tokens=none (the rows stay as the base has them), train.deepspeed=zero2, or "
                          "train.mode=full")  # fmt: skip
    return chosen


def token_rows(model: torch.nn.Module, ids: list[int]) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices` for `ids`: the input embedding's rows, and the LM head's (its own when the
    head is not tied to the embedding; peft ties a tied one's to the embedding's rows itself). None for no ids."""
    if not ids:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[id(embedding)]: ids}
    if head is not None and head.weight is not embedding.weight:
        rows[names[id(head)]] = ids
    return rows


def untrained_special(model: torch.nn.Module, tokenizer, split: Path,  # noqa: ANN001
                      trained: dict[str, int]) -> dict[str, int]:  # fmt: skip
    """The tokenizer's special added tokens that the training split at `split` holds, but for those `trained`,
    whose input embedding or LM head row in `model` (the base, before training) is zero, or within a millionth of
    the matrix's largest value: tokens its pretraining never trained (as Llama-3 8B base's chat tokens are reported
    to be), which `train.trainable_tokens=auto` does not choose (it takes the non-special ones). Rows sharded away
    (ZeRO-3) are not read."""
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    held = _held(split, set(special) - set(trained.values()))
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    zero = set()
    for w in (w.detach() for w in weights if not hasattr(w, "ds_id")):
        rows = [i for i in held if i < w.shape[0]]
        if rows:
            low, high = torch.aminmax(w)  # no copy of the matrix
            small = w[rows].float().abs().amax(dim=1) <= 1e-6 * max(-float(low), float(high))
            zero.update(i for i, z in zip(rows, small.tolist(), strict=True) if z)
    return {special[i]: i for i in sorted(zero)}


def _held(split: Path, ids: set[int]) -> set[int]:
    """Which of `ids` the `input_ids` of the dataset saved at `split` hold (read a chunk of its column at a time)."""
    import numpy as np

    found: set[int] = set()
    if not ids:
        return found
    wanted = np.array(sorted(ids))
    for chunk in load_from_disk(str(split)).data.column("input_ids").chunks:
        values = chunk.flatten().to_numpy()
        found.update(int(i) for i in np.unique(values[np.isin(values, wanted)]))
        if found == ids:
            break
    return found


def total_steps(n_blocks: int, cfg: TrainConfig, world_size: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    return max(1, math.ceil(math.ceil(n_blocks / per_step) * cfg.epoch))


def check_profile_step(n_blocks: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """`total_steps`, refusing a `train.profile_step` beyond them (the train stage checks it before the model loads)."""
    if cfg.profile_step > (steps := total_steps(n_blocks, cfg, world_size)):
        raise ConfigError(f"train.profile_step={cfg.profile_step} but this run trains {steps} steps; profile one of "
                          "them (after the first few: warm-up and compilation) or set train.profile_step=0")  # fmt: skip
    return steps


def _select_blocks(tokenize_dir: Path, cfg: TrainConfig):
    blocks = load_from_disk(str(tokenize_dir / "train"))
    if cfg.max_train_samples > 0 and cfg.max_train_samples < len(blocks):
        # keep_in_memory: otherwise datasets writes the shuffle's index into 03_tokenize, changing the folder (and
        # the cache key) of a stage that has finished, so every later run would train again
        blocks = blocks.shuffle(seed=cfg.train_data_split_seed, keep_in_memory=True)
        blocks = blocks.select(range(cfg.max_train_samples), keep_in_memory=True)
    return blocks


def validation_blocks(tokenize_dir: Path, max_val_samples: int, most: int = -1):
    """The held-out text as blocks (or instruction examples) for the validation loss during training: the first
    `max_val_samples` (eval.max_val_samples, as the final perplexity takes them), then `most` of those
    (train.eval_blocks) evenly spaced, so that each document keeps its share."""
    val = load_from_disk(str(tokenize_dir / "val_blocks"))
    if 0 < max_val_samples < len(val):
        val = val.select(range(max_val_samples), keep_in_memory=True)
    if 0 < most < len(val):
        val = val.select([i * len(val) // most for i in range(most)], keep_in_memory=True)
    return val


VALIDATION_SHARE = 0.25  # above this share of training's time spent validating, a run says how to validate less


def validation_cost(held_out: int, cfg: TrainConfig, world: int, steps: int) -> str | None:
    """A warning when the validations during training would take over `VALIDATION_SHARE` of its time, else None.

    Held-out and trained blocks are alike (packed blocks of one length, or instruction examples from one source), so
    their counts compare the work, in forward passes: a training step is its forward, a backward of one more (LoRA:
    the frozen weights get no gradient) or two (full), and one more with activations recomputed."""
    if cfg.eval_steps <= 0 or steps < cfg.eval_steps:
        return None
    trained = cfg.eval_steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    passes = 1 + (1 if cfg.mode == "lora" else 2) + (cfg.gradient_checkpointing is True)
    share = held_out / passes / trained
    if share <= VALIDATION_SHARE:
        return None
    tenth = max(1, int(0.1 * trained * passes))
    return (f"each validation during training scores {held_out:,} held-out blocks every {cfg.eval_steps} steps, "
            f"{held_out / trained:.1f}x the {trained:,} blocks those steps train on: about {share:.1f}x their time "
            f"(a validation forward costs about {['half', 'a third', 'a quarter'][passes - 2]} of a training step "
            f"here). train.eval_blocks={tenth} scores {tenth:,} of them, evenly spaced (about a tenth of the "
            "training's time); a larger train.eval_steps validates less often. The final perplexity is not affected.")


class CausalLMCollator:
    """Packed blocks are stacked (labels = inputs; the model shifts them). Instruction examples come with
    labels (-100 on the prompt) and different lengths: they are right-padded, padding masked out of the loss."""

    def __init__(self, pad_token_id: int, document_eos: int | None = None, ragged: bool = False):
        self.pad = pad_token_id
        self.eos = document_eos
        self.ragged = ragged

    def __call__(self, features: list[dict]) -> dict:
        batch = self._collate(features)
        if self.ragged:  # train.attention=varlen: where each document (or row) starts, once a batch, off the GPU
            ids = batch["input_ids"]
            positions = batch.get("position_ids", torch.arange(ids.shape[1]).expand_as(ids))
            bounds, _ = varlen.document_bounds(positions)
            # The row's length, not the longest document's: an upper bound is all the kernel needs, and one that
            # changes from batch to batch would make torch.compile compile the model again (see varlen.mark_dynamic)
            width = ids.shape[1]
            batch |= {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": width, "max_length_k": width}
        return batch

    def _collate(self, features: list[dict]) -> dict:
        if "labels" not in features[0]:
            input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
            batch = {"input_ids": input_ids, "labels": input_ids.clone()}
            if self.eos is not None:
                batch["position_ids"] = document_positions(input_ids, self.eos)
            return batch
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def document_positions(input_ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Position ids that restart at 0 after every `eos`: [a a eos b b] -> [0 1 2 0 1]. Given position ids and no
    attention mask, transformers' causal LMs mask attention to each packed document."""
    n = input_ids.shape[-1]
    idx = torch.arange(n).expand_as(input_ids)
    after_eos = torch.zeros_like(input_ids, dtype=torch.bool)
    after_eos[:, 1:] = input_ids[:, :-1] == eos
    start = torch.where(after_eos, idx, 0).cummax(-1).values
    return idx - start


def step_timer():
    """A Trainer callback that times each optimizer step, end to end (data loading included), for a steady-state
    tokens/s that leaves out the first steps' warm-up and compilation. One device synchronization per step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._last = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            self.seconds.append(now - self._last)
            self._last = now

    return StepTimer()


class Stopped(SystemExit):
    """The training process stopped on SIGTERM, with a checkpoint at the step it was in (`stop_on_sigterm`)."""


def stop_on_sigterm():
    """A Trainer callback that is, while training runs (`handling()`), the process's SIGTERM handler: SIGTERM (the
    flow run ending: a cancel in the Prefect UI, `kill`, `timeout`, a spot machine's notice) ends training at the
    end of the optimizer step it is in, with a checkpoint of that step, so the next run resumes there rather than
    from the last `train.save_steps`. During a validation inside training (minutes on a 7B) it ends at the end of
    the batch it is in: the validation is dropped, and the step checkpointed. Under a launcher every rank has it,
    and the ranks agree at each step's end (and each validation batch's) whether any of them was asked, by one
    all-reduce of a flag: they stop after the same step and save its checkpoint together, also when the signal
    reaches them at different steps, or reaches the ranks of one node only. Before the first step and after the
    last, the process ends at once (status 143), as SIGTERM's default would."""
    from transformers import TrainerCallback

    class StopOnSigterm(TrainerCallback):
        def __init__(self) -> None:
            self.asked = self.training = False

        def handler(self, signum, frame) -> None:
            if not self.training:
                raise Stopped(128 + signum)
            self.asked = True

        def on_train_begin(self, args, state, control, **kwargs):
            self.training = True

        def on_step_end(self, args, state, control, **kwargs):
            if args.world_size > 1:
                self.asked = _any_rank(self.asked, args.device)
            if self.asked and not control.should_training_stop:
                log_stop("SIGTERM:", state, args.world_size)
                control.should_save = control.should_training_stop = True

        def on_prediction_step(self, args, state, control, **kwargs):  # a validation inside training
            if self.training and (_any_rank(self.asked, args.device) if args.world_size > 1 else self.asked):
                self.asked = True
                raise ValidationStopped  # the trainer checkpoints the step without it (tasks.checkpoints)

        def on_save(self, args, state, control, **kwargs):
            if self.asked:  # the checkpoint holds it: load_best_model_at_end's reload would be work for nobody
                state.best_model_checkpoint = None

        def on_train_end(self, args, state, control, **kwargs):
            self.training = False

        @contextlib.contextmanager
        def handling(self):
            before = signal.signal(signal.SIGTERM, self.handler)
            try:
                yield
            finally:
                signal.signal(signal.SIGTERM, before)

    return StopOnSigterm()


def _any_rank(flag: bool, device) -> bool:
    """Whether `flag` is set on any rank: one all-reduce of one number (NCCL wants it on the GPU), read back."""
    import torch.distributed as dist

    both = torch.tensor([int(flag)], device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool(both.item())


STAGE_PID = "EDGAR_TUNE_STAGE_PID"  # PID@HOST: the train stage's process, which training processes end with
RANKS = "EDGAR_TUNE_RANKS"  # the folder where each training process on the stage's host leaves its PID


def end_with_the_stage() -> None:
    """In a training process (every rank) on the stage's host: leave its PID where the stage looks for the
    processes to ask to stop (`_stop_training`), and end this process when the train stage's process that
    launched it ends, however it ends. The stage stops its training processes itself when it can; a stage killed
    by SIGKILL cannot, and under a launcher only the launcher dies with it (PR_SET_PDEATHSIG reaches a direct
    child only), so the ranks would train on, on their GPUs, for nobody. Each rank then ends by SIGKILL, as the
    stage did: not by a stop request, whose checkpoint could still be being written when the rerun resumes."""
    import socket

    from edgar_tune.reaper import wait_for_end

    pid, _, host = os.environ.get(STAGE_PID, "").partition("@")
    if not pid or host != socket.gethostname() or not hasattr(os, "pidfd_open"):
        return  # a rank on another node of a hostfile (should its launcher pass the variable on) has no such PID
    if ranks := os.environ.get(RANKS):
        with contextlib.suppress(OSError):  # the stage has ended already: the watch below ends this process
            Path(ranks, str(os.getpid())).touch()

    def watch() -> None:
        wait_for_end(int(pid))
        log.warning("the train stage's process (pid %s) ended: this training process stops", pid)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-the-stage", daemon=True).start()


VALIDATION_QUIET_S = 30.0  # a validation inside training shorter than this shows only its loss, after it


def progress_events(path: Path, tokens_per_step: int):
    """A Trainer callback that appends the start of training and each of the Trainer's logs (loss, learning rate,
    validation loss) to `path` as JSON lines, on rank 0, for the train stage to show (`follow_progress`). A
    validation longer than `VALIDATION_QUIET_S` (a 7B model over a year's MD&A: minutes) logs its progress by
    batches meanwhile, as the stage's other long work does; its lines reach the stage as the process's own."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import has_length

    class ProgressEvents(TrainerCallback):
        def __init__(self) -> None:
            self.validating: Progress | None = None  # the validation running now, and its batches so far
            self.batches = 0

        def _write(self, state, **event) -> None:
            if state.is_world_process_zero:
                event = {"step": state.global_step, "max_steps": state.max_steps, "time": time.time(),
                         "tokens_per_step": tokens_per_step} | event  # fmt: skip
                with path.open("a") as f:
                    f.write(json.dumps(event) + "\n")

        def on_train_begin(self, args, state, control, **kwargs):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write(state, begin=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            keep = {k: v for k, v in (logs or {}).items()
                    if k in ("loss", "eval_loss", "eval_runtime", "learning_rate", "grad_norm")}  # fmt: skip
            if keep:
                self._write(state, **keep)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if not state.is_world_process_zero or not has_length(eval_dataloader):  # a stream: no total to show
                return
            if self.validating is None:
                what = f"training step {state.global_step:,} of {state.max_steps:,}: validation"
                self.validating = Progress(what, len(eval_dataloader), "batches", logger=log,
                                           quiet_s=VALIDATION_QUIET_S)  # fmt: skip
                self.batches = 0
            self.batches += 1
            self.validating.update(self.batches)

        def on_evaluate(self, args, state, control, **kwargs):
            self.validating = None

    return ProgressEvents()


class EventLog(logging.Handler):
    """In the training process: this project's log records as events (`{"time", "log": {...}}`) in the train
    stage's events file, for the stage to log again where the run's log is (`follow_progress`). The training
    process has no run context of its own: its lines would reach a console at most, never the Prefect UI."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = {"time": record.created, "log": {"name": record.name, "level": record.levelno,
                                                     "message": self.format(record)}}  # fmt: skip
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(event) + "\n")
        except Exception:  # noqa: BLE001 (logging's own convention: report on stderr, go on)
            self.handleError(record)


def log_to_the_stage(events: Path) -> None:
    """The training process's logging: this project's INFO lines and up go to the train stage through `events`
    on rank 0; other ranks print theirs, marked with their rank (the launcher forwards their console)."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        handler: logging.Handler = EventLog(events)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    for name in ("tasks", "kernels", "edgar_tune"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)


def follow_progress(path: Path, stop, poll_s: float = 2.0, metrics=None, open_line=None,
                    pace: dict | None = None) -> None:  # fmt: skip
    """The training process's events (`progress_events`, `EventLog`) as lines in the run's log and a progress bar
    in the Prefect UI, until `stop` (a threading.Event) is set, and, given `metrics` (tasks.registry.Metrics), as
    MLflow metrics. Runs in a thread of the train stage, in a copy of its context (Prefect's run context
    included). `open_line` (a threading.Event) says when the training process's console output ends mid-line.

    Its points, and the tokens/s and time left of its lines, are `Curves`'. `pace` (a dict) gets the seconds a
    step has taken so far (`step_s`), which a stop waits for (`stop_grace_s`)."""
    open_line = open_line or threading.Event()
    log = OwnLine(logging.getLogger(__name__), {"open": open_line})
    bar: Progress | None = None
    curves = Curves()
    pos = 0
    while True:
        rows: list[Point] = []
        stopping = stop.wait(poll_s)
        try:
            with path.open("rb") as f:
                f.seek(pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        data = data[: data.rfind(b"\n") + 1]  # whole lines only
        pos += len(data)
        for event in whole_events(data):
            if "log" in event:
                record = event["log"]
                OwnLine(logging.getLogger(record["name"]), {"open": open_line}).replay(record["level"],
                                                                                        record["message"],
                                                                                        event["time"])  # fmt: skip
                continue
            points = curves.points(event)
            if pace is not None and curves.rate:
                pace["step_s"] = 1 / curves.rate
            if event.get("begin"):
                bar = Progress("training", event["max_steps"], "steps", logger=log)
                if event["step"]:
                    log.info("training resumes at step %d of %d", event["step"], event["max_steps"])
            elif bar is None:
                continue
            elif "eval_loss" in event:
                log.info("training step %d of %d: validation loss %.4f", event["step"], event["max_steps"],
                         event["eval_loss"])  # fmt: skip
            elif "loss" in event:
                got = {key: value for key, value, *_ in points}
                detail = f"loss {got['train_loss']:.4f}"
                if "learning_rate" in got:
                    detail += f", learning rate {got['learning_rate']:.2e}"
                if "tokens_per_s" in got:
                    detail += f", {got['tokens_per_s']:,.0f} tokens/s"
                bar.update(event["step"], detail, rate=curves.rate, elapsed=curves.elapsed(event))
            rows += points
        if rows and metrics:
            metrics(rows)
        if stopping:
            if bar:
                bar.close()
            return


def select_checkpointed_layers(model: torch.nn.Module, fraction: float) -> tuple[int, int]:
    """Keep gradient checkpointing on `fraction` of the transformer layers, evenly spaced, and turn it off on the
    rest (whose activations then stay in memory through backward). Returns (checkpointed layers, layers). Newer
    transformers (5.2x) take `every_n_layers`, which only gives 1/n of the layers; this takes any fraction, and
    runs on every transformers with per-layer checkpointing (GradientCheckpointingLayer).

    Raises:
        ValueError: when checkpointing is not on, or the model has no per-layer checkpointing to choose from.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not any(m.gradient_checkpointing for m in layers):
        raise ValueError(f"train.checkpoint_layers={fraction}: gradient checkpointing is not on in "
                         f"{type(model).__name__}'s layers (train.gradient_checkpointing=true turns it on)")
    for layer, recomputed in zip(layers, recomputed_layers(len(layers), fraction)):
        layer.gradient_checkpointing = recomputed
    return sum(m.gradient_checkpointing for m in layers), len(layers)


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each transformer layer in place (`train.compile_scope=layers`), as torchtune does and
    accelerate's regional compilation: the layers run the same code on their own weights, which dynamo takes as
    inputs, so one compile serves them all (two under LoRA: the first layer's input needs no gradient). A 7B's
    whole-model compile took about 150 s on an H200 (2026-11-30), most of it tracing and compiling the same layer
    32 times. The module tree and its state dict stay as they were (no `_orig_mod` in the keys), gradient
    checkpointing wraps each compiled layer (decided outside it, so recomputed layers and kept ones share the
    graphs), and the loss, the embeddings and the LM head run eagerly around them (the fused loss is its own
    kernel). Returns the count.

    Raises:
        ConfigError: when the model has no per-layer modules to compile (transformers' GradientCheckpointingLayer).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"train.compile_scope=layers: {type(model).__name__} has no transformer layers to "
                          "compile one by one (transformers' GradientCheckpointingLayer); set "
                          "train.compile_scope=model")  # fmt: skip
    for layer in layers:
        layer.compile()
    return len(layers)


def selective_checkpointing(fraction: float):
    """A Trainer callback that applies `select_checkpointed_layers` once the Trainer has turned checkpointing on
    for every layer (at the start of training, before the first forward)."""
    from transformers import TrainerCallback

    class SelectiveCheckpointing(TrainerCallback):
        checkpointed: tuple[int, int] | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.checkpointed = select_checkpointed_layers(model, fraction)
            log.info("gradient checkpointing on %d of %d layers (train.checkpoint_layers=%s)",
                     *self.checkpointed, fraction)

    return SelectiveCheckpointing()


def dataloader_workers(requested: int) -> int:
    """-1: 2 worker processes on GPUs (reading and collating 4 x 2048 ids takes about 2 ms a step, 2% of
    SmolLM2's step on an H100, moved off the critical path), none on the CPU."""
    return requested if requested >= 0 else 2 if device() == "cuda" else 0


def steady_step_seconds(seconds: list[float], warmup: int = 3) -> float | None:
    """Median step time after the first `warmup` steps (all steps when there are too few)."""
    import statistics

    rest = seconds[warmup:] if len(seconds) > warmup + 1 else seconds
    return statistics.median(rest) if rest else None


def deepspeed_config_path(name: str) -> Path:
    """`zero2`, `zero3`, `zero3-offload` (shipped in configs/deepspeed/) or a user's JSON file.

    Raises:
        ConfigError: a file that is not there.
    """
    path = REPO_ROOT / "configs" / "deepspeed" / f"{name}.json" if name in DEEPSPEED_PRESETS else Path(name)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed={name!r}: no such DeepSpeed config file ({path}); give zero2, zero3, "
                          "zero3-offload or the path of a DeepSpeed JSON config")  # fmt: skip
    return path


def deepspeed_config(name: str) -> dict:
    """The DeepSpeed config `train.deepspeed` names (`deepspeed_config_path`), read.

    Raises:
        ConfigError: a file that is not there, or not a JSON object (DeepSpeed would say so once the model loaded).
    """
    path = deepspeed_config_path(name)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"train.deepspeed={name!r}: {path} is not a JSON file ({err}); give a DeepSpeed config "
                          "(configs/deepspeed/zero2.json is one)") from None  # fmt: skip
    if not isinstance(config, dict):
        raise ConfigError(f"train.deepspeed={name!r}: {path} holds a JSON {type(config).__name__}, not the object "
                          "of a DeepSpeed config (configs/deepspeed/zero2.json is one)")  # fmt: skip
    return config


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(requested: str) -> str:
    """auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU. Half precision on CPU is refused."""
    on_gpu = device() == "cuda"
    if requested == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    if requested in ("bf16", "fp16") and not on_gpu:
        raise ValueError(f"train.precision={requested} needs a GPU; on CPU set train.precision=fp32 (or auto)")
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16: this GPU has no bf16; set train.precision=fp16 (or auto)")
    return requested


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_dist_env() -> None:
    """DeepSpeed wants a process group even for one process; without these variables it looks for MPI."""
    if "RANK" not in os.environ:
        port = str(_free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


def _prepare_deepspeed() -> None:
    import deepspeed.ops

    if device() == "cpu":  # the shared-memory comm op is compiled on first use (~76 s) and buys nothing here
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def preflight(cfg: TrainConfig) -> str:
    """Check, before anything runs, that this machine can run the engine asked for; return the precision.

    Raises:
        ConfigError: naming the key to change. Nothing else is ever run under the requested engine's name.
    """
    on_gpu = device() == "cuda"
    if cfg.lean_lora:
        sharded = "train.enable_fsdp" if cfg.enable_fsdp else (
            f"train.deepspeed={cfg.deepspeed}" if cfg.deepspeed and engine_option(cfg).startswith("zero3") else None)
        if sharded or cfg.quantization:  # ZeRO-3 and FSDP gather lora_A's weight around the module's own call,
            what = sharded or "a quantized base (peft's 8-bit/4-bit LoRA layers)"  # which lean_lora does not make
            raise ConfigError(f"train.lean_lora is not supported with {what}; set train.lean_lora=false "
                              "(ZeRO-2 and a single process work)")  # fmt: skip
    if cfg.mode == "lora" and cfg.lora_start_moves_base() and engine_option(cfg).startswith("zero3"):
        raise ConfigError(f"train.lora_init={cfg.lora_init} decomposes each adapted weight of the base as it is "
                          f"built, and train.deepspeed={cfg.deepspeed} (ZeRO-3) builds it sharded, each process "
                          "holding a slice: set train.deepspeed=zero2 (or train.enable_fsdp=true on GPUs), or "
                          "train.lora_init=default")  # fmt: skip
    if cfg.quantization:
        key = "train.int8_quantization" if cfg.int8_quantization else "train.int4_quantization"
        if not on_gpu:
            raise ConfigError(
                f"{key}=true loads the base through bitsandbytes, which needs a CUDA GPU, and this machine has none. "
                f"Set {key}=false to train unquantized in fp32 on the CPU."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{key}=true needs bitsandbytes: `pip install 'bitsandbytes>=0.45'`, or set {key}=false")
    if cfg.enable_fsdp and not on_gpu:
        raise ConfigError(
            "train.enable_fsdp=true needs CUDA GPUs (on the CPU the Trainer would run plain data parallel under the "
            "FSDP name). On the CPU set train.deepspeed=zero3, which shards the same states."
        )
    if cfg.attention == "flash_attention_2" and not (on_gpu and importlib.util.find_spec("flash_attn")):
        raise ConfigError("train.attention=flash_attention_2 needs a CUDA GPU and the flash-attn package (`pip "
                          "install flash-attn`); set train.attention=sdpa, or flex_attention for document masks")
    if cfg.attention == "flex_attention" and not on_gpu:
        raise ConfigError("train.attention=flex_attention: PyTorch's FlexAttention has no backward on the CPU; "
                          "set train.attention=sdpa (document_mask works with it too)")  # fmt: skip
    if cfg.attention == "varlen":
        if why := varlen.available():
            raise ConfigError(f"train.attention=varlen: {why}; set train.attention=sdpa (document_mask works with it "
                              "too)")  # fmt: skip
        if cfg.precision == "fp32":
            raise ConfigError("train.attention=varlen runs the flash kernel in bf16 or fp16, not fp32; set "
                              "train.precision=auto (or bf16/fp16), or train.attention=sdpa")  # fmt: skip
    if cfg.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"train.deepspeed={cfg.deepspeed} needs DeepSpeed: `pip install deepspeed` (see README)")
    if cfg.deepspeed:
        deepspeed_config(cfg.deepspeed)
    if cfg.hostfile:
        hostfile_slots(cfg.hostfile)
    if on_gpu and not cfg.hostfile and cfg.nproc > torch.cuda.device_count():
        raise ConfigError(f"train.nproc={cfg.nproc} but this node has {torch.cuda.device_count()} GPU(s); lower it")
    try:
        resolve_backend(cfg.fused_linear_ce, "train.fused_linear_ce", cfg.enable_fsdp)
        resolve_backend(cfg.fused_layers, "train.fused_layers")
        precision = resolve_precision(cfg.precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.fp8_base and (why := fp8.available(device(), DTYPES[precision])):
        raise ConfigError(f"train.fp8_base: {why}; set train.fp8_base=false")
    allocator.resolve(cfg.cpu_allocator, on_gpu)
    return precision


def engine_option(cfg: TrainConfig) -> str:
    """The memory plan's row for this config: none, zero2, zero3, zero3-offload or fsdp."""
    if cfg.enable_fsdp:
        return "fsdp"
    if not cfg.deepspeed:
        return "none"
    if cfg.deepspeed in DEEPSPEED_PRESETS:
        return cfg.deepspeed
    zero = deepspeed_config(cfg.deepspeed).get("zero_optimization", {})
    if zero.get("stage", 0) >= 3:
        return "zero3-offload" if zero.get("offload_param") else "zero3"
    return "zero2"


def world_size(cfg: TrainConfig) -> int:
    """Processes over all nodes: `nproc`, or the slots of the hostfile's hosts."""
    if not cfg.hostfile:
        return cfg.nproc
    return sum(hostfile_slots(cfg.hostfile).values())


_HOST = re.compile(r"^(\S+)\s+slots=(\d+)")  # DeepSpeed's launcher's rule (deepspeed/launcher/runner.py)


def hostfile_slots(path: str) -> dict[str, int]:
    """A DeepSpeed hostfile's hosts and their slots (`HOST slots=N` a line; `#` lines and empty ones skipped), read
    as DeepSpeed's launcher reads it.

    Raises:
        ConfigError: a file that cannot be read (the launcher would train on this node alone, with a warning, under
            the hostfile's name), a line it would refuse, a host twice, or no host, saying where.
    """
    example = "a line `HOST slots=GPUS` per node, e.g. `worker-1 slots=8`"
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not text"
        raise ConfigError(f"train.hostfile={path}: cannot read it ({why}); give DeepSpeed's hostfile, {example}"
                          ) from None  # fmt: skip
    hosts: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not (match := _HOST.search(line)):
            raise ConfigError(f"train.hostfile={path}, line {number}: {line!r} is not `HOST slots=N`; {example}")
        if match[1] in hosts:
            raise ConfigError(f"train.hostfile={path}, line {number}: {match[1]} is there twice; give each node once")
        hosts[match[1]] = int(match[2])
    if not sum(hosts.values()):
        raise ConfigError(f"train.hostfile={path} names no slots; {example}")
    return hosts


def plan_inputs(tokenize_dir: Path, cfg: TrainConfig, precision: str) -> tuple:
    """The memory plan's model shape, this run's budget per device (GB, and where it came from) and its keywords."""
    from tasks import memory

    stats = read_json(tokenize_dir / "stats.json")
    shape = memory.model_shape(base_model_path(tokenize_dir), cfg.mode, cfg.lora_r, cfg.lora_target_modules,
                               dora=cfg.use_dora)  # fmt: skip
    budget, where = (cfg.memory_budget_gb, "train.memory_budget_gb") if cfg.memory_budget_gb else memory.device_budget_gb(cfg.nproc)
    fused = resolve_backend(cfg.fused_linear_ce, "train.fused_linear_ce", cfg.enable_fsdp) != "off"
    kw = dict(nproc=world_size(cfg), seq=stats["block_length"], batch=cfg.per_device_train_batch_size, mode=cfg.mode,
              precision=precision, quantization=cfg.quantization, gradient_checkpointing=cfg.gradient_checkpointing,
              checkpoint_layers=cfg.checkpoint_layers, half_base=cfg.lora_half_base, fused_loss=fused,
              compiled=cfg.torch_compile or resolve_backend(cfg.fused_layers, "train.fused_layers") == "triton",
              lean_lora=cfg.lean_lora, lora_dropout=cfg.lora_dropout,
              dense_mask=cfg.document_mask and cfg.attention == "sdpa", fp8_base=cfg.fp8_base,
              token_rows=cfg.trainable_tokens not in ("auto", []), on_cpu=device() == "cpu",
              allocator=allocator.resolve(cfg.cpu_allocator, device() == "cuda")[0])  # fmt: skip
    return shape, budget, where, kw


FIT_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "checkpoint_layers")


def fit_memory(tokenize_dir: Path, cfg: TrainConfig, precision: str) -> tuple[TrainConfig, dict | None]:
    """`train.memory_fit`: the config with the micro-batch, gradient accumulation and recomputed layers that the
    memory plan fits in the budget, fastest first by its count of work (`tasks.memory.fit`), and what was chosen.
    The optimizer batch per device (micro-batch x accumulation) stays what the config asked for. Without
    memory_fit: the config as is.

    Raises:
        ConfigError: when nothing fits, not even micro-batch 1 with every layer recomputed (with memory_check=refuse;
            otherwise that setting runs, with a warning).
    """
    if not cfg.memory_fit:
        return cfg, None
    from tasks import memory

    shape, budget, where, kw = plan_inputs(tokenize_dir, cfg, precision)
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    rows = memory.fit(shape, budget_gb=budget * memory.HEADROOM, **dict(kw, batch=batch, option=engine_option(cfg)))
    if rows:
        best = rows[0]
    else:
        message = (f"train.memory_fit: nothing fits {budget:.1f} GB per device ({where}, {memory.HEADROOM:.0%} usable) "
                   f"by the memory plan, not even micro-batch 1 with every layer recomputed; try "
                   f"{memory.unfit_advice(shape, budget_gb=budget, options=memory.OPTIONS, **kw)}")  # fmt: skip
        if cfg.memory_check == "refuse":
            raise ConfigError(message)
        log.warning("%s. Running at micro-batch 1 with every layer recomputed (train.memory_check=%s).", message,
                    cfg.memory_check)  # fmt: skip
        best = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": batch,
                "gradient_checkpointing": True, "checkpoint_layers": 1.0, "recomputed_layers": shape.layers,
                "planned_gb": None, "work": None, "time": None}  # fmt: skip
    log.info("train.memory_fit: micro-batch %d x %d accumulated, %d of %d layers recomputed; planned %s GB of %.1f GB "
             "per device (%s, %.0f%% usable)", best["per_device_train_batch_size"], best["gradient_accumulation_steps"],
             best["recomputed_layers"], shape.layers, best["planned_gb"] and round(best["planned_gb"], 2), budget,
             where, 100 * memory.HEADROOM)  # fmt: skip
    chosen = dict(best, layers=shape.layers, budget_gb=budget, budget_from=where)
    return cfg.model_copy(update={k: best[k] for k in FIT_KEYS}), chosen


def resolve_checkpointing(tokenize_dir: Path, cfg: TrainConfig, precision: str) -> TrainConfig:
    """`train.gradient_checkpointing=auto` made true or false: on GPUs, on; on the CPU, off when the memory plan fits
    the run without it, in this host's RAM (there recomputing costs a third more time per step and buys memory
    that is rarely short), on otherwise. A config that says true or false is returned as it is."""
    if cfg.gradient_checkpointing != "auto":
        return cfg
    on, why = True, ", as on every GPU"
    if device() != "cuda":
        from tasks import memory

        shape, budget, where, kw = plan_inputs(tokenize_dir, cfg, precision)
        need = memory.estimate(shape, option=engine_option(cfg), **dict(kw, gradient_checkpointing=False)).total
        on = need > budget * memory.HEADROOM
        why = (f": without it the memory plan on this CPU needs {need:.1f} GB per process of {budget:.1f} GB "
               f"({where}, {memory.HEADROOM:.0%} usable)")  # fmt: skip
    _log_once(f"train.gradient_checkpointing=auto: {'on' if on else 'off'}{why}")
    return cfg.model_copy(update={"gradient_checkpointing": on})


def resolve_allocator(cfg: TrainConfig) -> TrainConfig:
    """`train.cpu_allocator=auto` made the allocator found (tasks/allocator.py), said once; the memory plan on the
    CPU counts what it keeps."""
    name, path = allocator.resolve(cfg.cpu_allocator, device() == "cuda")
    if name == allocator.SYSTEM and device() == "cpu":
        how = (f"{allocator.in_this_process()}, whose heap keeps much of freed tensors' memory: the memory plan counts "
               f"it. tcmalloc trains in 0.3x to 0.85x the memory (bench/RESULTS.md): {allocator.INSTALL['tcmalloc']}")
    elif name != allocator.SYSTEM:
        how = f"{name}, preloaded from {path}" if path else f"{name}, preloaded already (LD_PRELOAD)"
    else:
        how = None  # a GPU's memory is the CUDA allocator's
    if how:
        _log_once(f"train.cpu_allocator={cfg.cpu_allocator}: {how}")
    return cfg.model_copy(update={"cpu_allocator": name})


def plan_training(tokenize_dir: Path, cfg: TrainConfig, precision: str) -> tuple[TrainConfig, dict]:
    """`check_profile_step`, `resolve_allocator`, `resolve_checkpointing` and `fit_memory`, then `memory_plan` for
    the config they return: the config to train, and the plan (what memory_fit chose under "fit")."""
    blocks = read_json(tokenize_dir / "stats.json")["train_blocks"]
    check_profile_step(min(blocks, cfg.max_train_samples) if cfg.max_train_samples > 0 else blocks, cfg, world_size(cfg))
    if tokens := trainable_tokens(tokenize_dir, cfg):
        why = (" (the tokenizer's added tokens, not special, that the training split holds: their rows may never have "
               "trained, and LoRA alone leaves them as they are)" if cfg.trainable_tokens == "auto" else "")
        _log_once(f"train.trainable_tokens={'auto' if cfg.trainable_tokens == 'auto' else ','.join(tokens)}: the "
                  f"embedding and LM head rows of {', '.join(f'{t} ({i})' for t, i in tokens.items())} train beside "
                  f"LoRA{why}")  # fmt: skip
    cfg = cfg.model_copy(update={"trainable_tokens": list(tokens)})
    cfg = resolve_checkpointing(tokenize_dir, resolve_allocator(cfg), precision)
    cfg, fitted = fit_memory(tokenize_dir, cfg, precision)
    plan = memory_plan(tokenize_dir, cfg, precision) | {"fit": fitted}
    shape = plan["shape"]
    check_room_for_one(tokenize_dir.parent, shape["lora_params"] if cfg.mode == "lora" else shape["params"],
                       cfg.save_plan()[0] != "no")  # fmt: skip
    return cfg, plan


def memory_plan(tokenize_dir: Path, cfg: TrainConfig, precision: str) -> dict:
    """Estimate peak memory per device for every engine option; refuse (or warn) when this run's cannot fit."""
    from tasks import memory

    shape, budget, where, kw = plan_inputs(tokenize_dir, cfg, precision)
    world = kw["nproc"]
    chosen = engine_option(cfg)
    options = memory.OPTIONS + (("fsdp",) if chosen == "fsdp" else ())
    rows = memory.plan(shape, budget_gb=budget, options=options, **kw)
    context = memory.describe(shape, mode=cfg.mode, lora_r=cfg.lora_r, batch=kw["batch"], seq=kw["seq"],
                              precision=precision, nproc=world) + f", {where}"  # fmt: skip
    table = memory.format_plan(rows, chosen, budget, context)
    _log_once(f"\n{table}", again="memory plan per device: as above")
    mine = next(r for r in rows if r.option == chosen)
    if not mine.fits and cfg.memory_check != "off":
        advice = memory.suggestion(rows, shape, budget_gb=budget, options=options, **kw)
        message = (f"{table}\nthis run needs about {mine.total:.1f} GB per device and {budget:.1f} GB is there "
                   f"({memory.HEADROOM:.0%} usable). Try {advice}; or set train.memory_check=warn to run anyway.")  # fmt: skip
        if cfg.memory_check == "refuse":
            raise ConfigError(message)
        log.warning(message)
    return {"budget_gb": budget, "budget_from": where, "engine": chosen, "estimate_gb": mine.total,
            "rows": memory.as_json(rows), "shape": vars(shape)}  # fmt: skip


def _log_once(message: str, again: str | None = None) -> None:
    """Log what planning found once per flow run: the flow plans the run before its first model stage and the train
    stage plans it again. `again`: what to say the next times."""
    shown = (_flow_run_id(), message)
    if shown not in _PLANS_LOGGED:
        log.info("%s", message)
        _PLANS_LOGGED.add(shown)
    elif again:
        log.info(again)


def _flow_run_id() -> str | None:
    if "prefect" not in sys.modules:  # no flow run without it (a benchmark, a notebook): not imported for nothing
        return None
    from prefect.runtime import flow_run

    return flow_run.get_id()


def checkpoints_dir(out: Path) -> Path:
    return out.with_name(f"{out.name}.checkpoints")


def write_train_stage(out: Path, tokenize_dir: Path, cfg: TrainConfig, eval_cfg: EvalConfig,
                      live=None, prune: dict | None = None) -> dict:  # fmt: skip
    """Train and publish the adapter (or full weights), tokenizer, loss history and stats atomically.

    Checkpoints go to `04_train.checkpoints/`; a rerun after a crash resumes from the last complete one. One
    process trains here; `train.nproc` > 1 or a hostfile runs `tasks.train_worker` under the DeepSpeed launcher
    (torchrun for FSDP), writing into the same temp folder. `live`, called once the run is checked and planned,
    gives a context of (MLflow run id, metrics logger) for the curves as they come (tasks.registry). `prune`, a
    sweep's rule (tasks/pruning.py), may stop a weak training at a validation: `PointPruned`, its checkpoint kept.
    """
    precision = preflight(cfg)
    asked = cfg  # resuming compares what was asked for: memory_fit may split the batch otherwise on another device
    cfg, plan = plan_training(tokenize_dir, cfg, precision)
    ckpts = checkpoints_dir(out)
    tokenized, world = read_json(tokenize_dir / "stats.json"), world_size(cfg)
    settings = resume_settings(asked.model_dump(), eval_cfg.model_dump(), tokenized, world)
    defaults = resume_settings(TrainConfig().model_dump(), EvalConfig().model_dump(), tokenized, world)
    try:
        resume_from = prepare_checkpoints(ckpts, settings, cfg.resume, defaults)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    with atomic_dir(out) as tmp, (live() if live else contextlib.nullcontext((None, None))) as (run_id, metrics):
        try:
            _launch(tmp, tokenize_dir, cfg, eval_cfg, ckpts, resume_from, plan, metrics, prune)
        except pruning.PointPruned as err:
            err.decision["mlflow_run_id"] = run_id  # its curves so far, which the sweep nests under its own run
            raise
        stats = read_json(tmp / "stats.json")
        stats["memory_plan"] = plan
        if device() == "cpu" and stats.get("peak_rss_gb"):
            log.info("the training process peaked at %.2f GB resident (%s); the memory plan said %.2f GB",
                     stats["peak_rss_gb"], stats["cpu_allocator"], plan["estimate_gb"])  # fmt: skip
        stats["mlflow_run_id"] = run_id  # the register stage logs the rest into it
        atomic_write_json(tmp / "stats.json", stats)
    (out.parent / pruning.LIVE).unlink(missing_ok=True)  # a sweep's points read its whole curve in `out` now
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpts, ignore_errors=True)
    return stats


class TrainingCrashed(StageFailed):
    """The training process died; the message says how, and where the next run resumes."""


def _launch(tmp: Path, tokenize_dir: Path, cfg: TrainConfig, eval_cfg: EvalConfig, ckpts: Path,
            resume_from: Path | None, plan: dict | None = None, metrics=None,
            prune: dict | None = None) -> None:  # fmt: skip
    """Train in child processes: one plain process, or `train.nproc` under the DeepSpeed launcher (torchrun
    for FSDP). A child of its own, so that a crash (the OOM killer's SIGKILL, a segfault in a kernel) fails
    this stage with a message instead of taking the flow run down with it."""
    import collections
    import contextvars
    import socket
    import subprocess

    module = ["--module", "tasks.train_worker"]
    if cfg.enable_fsdp:
        port = str(_free_port())
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(cfg.nproc), "--master_port", port, *module]
    elif cfg.nproc > 1 or cfg.hostfile:
        where = ["--hostfile", cfg.hostfile] if cfg.hostfile else ["--num_gpus", str(cfg.nproc)]
        launcher = ["-m", "deepspeed.launcher.runner", *where, "--master_port", str(_free_port()), *module]
    else:
        launcher = ["-m", "tasks.train_worker"]
    cmd = [sys.executable, *launcher, "--out", str(tmp), "--tokenize-dir", str(tokenize_dir), "--checkpoints",
           str(ckpts), "--config", cfg.model_dump_json(), "--eval-config", eval_cfg.model_dump_json()]  # fmt: skip
    if resume_from:
        cmd += ["--resume-from", str(resume_from)]
    if prune is not None:
        cmd += ["--prune", json.dumps(prune)]
    log.info("launching %d training process(es): %s", cfg.nproc, " ".join(cmd[: cmd.index("--out")]))
    ranks = tmp / ".ranks"  # each training process leaves its PID there (gone before the stage publishes `tmp`)
    ranks.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               **{STAGE_PID: f"{os.getpid()}@{socket.gethostname()}", RANKS: str(ranks)},
               **allocator.preload_env(*allocator.resolve(cfg.cpu_allocator, device() == "cuda")))  # fmt: skip
    tail: collections.deque[bytes] = collections.deque(maxlen=400)
    stop, open_line, pace = threading.Event(), threading.Event(), {}
    follower = threading.Thread(target=contextvars.copy_context().run, name="training-progress", daemon=True,
                                args=(follow_progress, tmp / EVENTS, stop, 2.0, metrics, open_line, pace))  # fmt: skip
    follower.start()

    def relay(chunk: bytes) -> None:  # progress bars pass through as they are
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        if chunk.endswith(b"\n"):
            open_line.clear()
        else:
            open_line.set()
        tail.append(chunk)

    try:
        with subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              preexec_fn=_die_with_parent, process_group=0) as proc:  # fmt: skip
            try:
                for chunk in iter(lambda: proc.stdout.read1(1 << 14), b""):
                    relay(chunk)
            except BaseException:  # the flow run is ending (SIGTERM, Ctrl-C): not while training runs on
                _stop_training(proc, relay, [int(p.name) for p in ranks.iterdir()], pace.get("step_s"),
                               lambda: next_run(ckpts, cfg))  # fmt: skip
                raise
    finally:
        stop.set()
        follower.join(timeout=60)
        shutil.rmtree(ranks, ignore_errors=True)
    if proc.returncode == 0 and (tmp / pruning.PRUNED).exists():
        raise pruning.PointPruned(read_json(tmp / pruning.PRUNED))
    if proc.returncode != 0 or not (tmp / "stats.json").exists():
        lines = b"".join(tail).decode("utf-8", "replace").replace("\r", "\n").splitlines()
        failed = (tmp / FAILURE).read_text() if (tmp / FAILURE).exists() else None
        raise TrainingCrashed(crash_message(proc.returncode, ckpts, cfg, plan, [x for x in lines if x.strip()][-25:],
                                            failed))  # fmt: skip


FAILURE = "failure.txt"  # what a training process that failed for a reason it can name says of it (`DiskFull`)


STOP_GRACE_S = 60.0  # how long a training process asked to stop may take to save its checkpoint, at least


def stop_grace_s(step_s: float | None) -> float:
    """How long a stop waits for the training to finish the step it is in and checkpoint it: `STOP_GRACE_S`, or
    one and a half steps (at the pace so far, `step_s`) and 30 s to save, where steps are longer. An 8192-token
    step of SmolLM2 on 2 CPU cores takes 2.5 to 3 min: 60 s lost the step, and the checkpoint with it."""
    return max(STOP_GRACE_S, 1.5 * step_s + 30.0) if step_s else STOP_GRACE_S


def _stop_training(proc, relay, ranks: list[int], step_s: float | None = None,
                   then: Callable[[], str] = lambda: "") -> None:  # fmt: skip
    """The flow run is ending while its training processes work (a SIGTERM: a cancel in the Prefect UI, `kill`,
    `timeout`; Ctrl-C): SIGTERM them, and wait while they save a checkpoint of the step they are in
    (`stop_on_sigterm`), relaying what they print, for `stop_grace_s` at most; then SIGKILL what is left of the
    process group. Before, leaving the `with Popen` waited for the training to finish, however long that took,
    and threw it away.

    A second Ctrl-C (or signal) during the wait kills them at once, without that checkpoint, and says what the next
    run resumes from (`then`). Before, it left the wait with the training still at work, unannounced: the training
    died with the CLI's process (PR_SET_PDEATHSIG) wherever it was, and in a notebook, which goes on, it saved its
    checkpoint unwatched after the stage had ended.

    The signal goes to the training processes that said they run (`ranks`, their PIDs), not to a launcher between
    them and the stage: DeepSpeed's launch process would SIGKILL its ranks 30 s after passing the SIGTERM on,
    whatever they were saving, and torchrun's agent does the same; a rank that stops ends with status 143, and its
    launcher then ends the rest. Before any process said it runs (the launcher starting, the model loading), the
    whole group gets it: nothing there has a step to finish."""
    import select
    import subprocess

    if proc.poll() is not None:
        return
    grace = stop_grace_s(step_s)
    log.warning("stopping the training (pid %s): a checkpoint of the step it is in, then it ends (%.0f s at most%s; "
                "Ctrl-C again to kill it now, without that checkpoint)",
                ", ".join(map(str, ranks)) if ranks else f"{proc.pid} and its group", grace,
                f": a step takes {step_s:.0f} s" if grace > STOP_GRACE_S else "")  # fmt: skip
    if ranks:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
    else:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        while time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                if not (chunk := proc.stdout.read1(1 << 14)):
                    break
                relay(chunk)
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log.warning("the training process (pid %d) did not end within %.0f s of SIGTERM: SIGKILL", proc.pid,
                    grace)  # fmt: skip
    except BaseException as err:  # a second Ctrl-C or signal: now
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        sig = signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal_behind(err)
        why = {signal.SIGINT: "Ctrl-C again"}.get(sig, f"{signal.Signals(sig).name} again" if sig else
                                                      f"{type(err).__name__} while stopping")  # fmt: skip
        log.warning("%s: the training is killed (SIGKILL), without a checkpoint of the step it was in. %s", why,
                    then())  # fmt: skip
        raise
    _signal_group(proc, signal.SIGKILL)  # what is left of it: a launcher's ranks outlive it otherwise


def _signal_group(proc, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _oom_advice(cfg: TrainConfig) -> str:
    """What to change after the OOM killer ended a training: it guards the host's RAM, which on the CPU holds the
    whole training and on a GPU machine what each process keeps on the host (a GPU's own memory running out raises
    `CUDA out of memory` instead). Before, a CPU run was told to use a ZeRO offload engine (which keeps its states in
    the same RAM) and never to recompute."""
    if device() == "cuda":
        return ("on a GPU machine that is the host's RAM (a GPU's memory running out raises `CUDA out of memory` "
                "instead): train fewer processes per node (train.nproc), with fewer DataLoader workers "
                "(train.dataloader_num_workers), or leave out the offload engine (train.deepspeed=zero3-offload keeps "
                "the states in host RAM)")  # fmt: skip
    recompute = recompute_all(cfg.gradient_checkpointing, cfg.checkpoint_layers)
    fixes = [f"set {recompute}"] if recompute else []
    if cfg.cpu_allocator == allocator.SYSTEM:
        fixes.append(f"set {allocator.TRY_TCMALLOC}")
    fixes.append("lower train.per_device_train_batch_size or tokenize.max_input_length")
    return ", ".join(fixes[:-1]) + (", or " if len(fixes) > 1 else "") + fixes[-1]


def crash_message(returncode: int, ckpts: Path, cfg: TrainConfig, plan: dict | None, tail: list[str],
                  failed: str | None = None) -> str:  # fmt: skip
    """What happened to the training process (`failed`: what it said of it, `FAILURE`), and what the next run will
    do about it."""
    if failed:
        how = failed
    elif returncode < 0:
        name = signal.Signals(-returncode).name
        how = f"the training process was killed by {name} (signal {-returncode})"
        if -returncode == signal.SIGKILL:
            estimate = f"; this run's memory plan estimated {plan['estimate_gb']} GB per device" if plan else ""
            how += " - on Linux usually the out-of-memory killer (see `dmesg`)" + estimate + "; " + _oom_advice(cfg)
    elif returncode == 128 + signal.SIGTERM:  # `Stopped`: asked by a signal to it, not to this run
        how = ("the training process stopped on a SIGTERM sent to it, not to this run (a spot machine's notice to "
               "its node, a `kill` of one rank): it stops after the step it is in, with a checkpoint of it")
    else:
        how = f"the training process exited with status {returncode}"
    return f"{how}. {next_run(ckpts, cfg)}\nIts last output lines:\n" + "\n".join(tail)


def next_run(ckpts: Path, cfg: TrainConfig) -> str:
    """What the next run of a training that ended unfinished resumes from."""
    from tasks.checkpoints import latest_checkpoint

    last = latest_checkpoint(ckpts) if ckpts.exists() else None
    if last is not None:
        return f"The next run (or Retry in the Prefect UI) resumes from {last.name} in {ckpts}."
    how, every = cfg.save_plan()
    saves = {"steps": f"every {every} steps", "epoch": "at each epoch's end", "no": "none"}[how]
    return (f"No checkpoint was complete (train.save_steps={cfg.save_steps}: {saves}, and one when stopped), so the "
            "next run starts over.")  # fmt: skip


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the parent dies, so a killed run leaves no orphaned trainer (a
    launcher's ranks end with the stage by `end_with_the_stage`). SIGKILL, not a stop request: with no stage left
    to wait for it, a trainer saving one more checkpoint could still be writing when the rerun resumes."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the child outlives a SIGKILLed parent, as any process would
        pass


def half_base(cfg: TrainConfig) -> bool:
    """Whether the base loads in the training precision when that is bf16/fp16: under DeepSpeed (the engine keeps
    fp32 master weights itself), and for LoRA's frozen base (`train.lora_half_base`; FSDP needs one dtype per
    flat parameter, so not under FSDP). Otherwise fp32 weights under autocast."""
    return bool(cfg.deepspeed) or (cfg.mode == "lora" and cfg.lora_half_base and not cfg.enable_fsdp)


def _load_model(base: str, cfg: TrainConfig, precision: str):
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if cfg.attention == "varlen":
        varlen.register()
    if not cfg.quantization:
        return load_causal_lm(base, dtype=half if half and half_base(cfg) else torch.float32, attention=cfg.attention)
    with building:  # transformers' lazy names, imported on one thread at a time
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if cfg.int8_quantization:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=half)  # fmt: skip
    local = int(os.environ.get("LOCAL_RANK", "0"))
    with building_alone(base), from_hub(base) as (named, hub):
        model = AutoModelForCausalLM.from_pretrained(named, quantization_config=quant, dtype=half,
                                                     device_map={"": local}, attn_implementation=cfg.attention, **hub)
    kinds = {type(m).__name__ for m in model.modules()}
    if not kinds & {"Linear8bitLt", "Linear4bit"}:
        raise RuntimeError(f"asked for {cfg.quantization} but bitsandbytes quantized no layer of {base}")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip


def lora_start(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The adapters' A and B as peft started them, keyed as peft saves them (on the CPU, in fp32)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in get_peft_model_state_dict(model).items()
            if ".lora_A." in k or ".lora_B." in k}  # fmt: skip


def as_plain_lora(adapter: Path, start: dict[str, torch.Tensor]) -> None:
    """Rewrite the adapter folder of a training that started from PiSSA or OLoRA (`train.lora_init`) as a plain LoRA
    on the unchanged base, as peft's `path_initial_model_for_weight_conversion` does: the base trained as W - s B0 A0,
    so the trained W - s B0 A0 + s B A is W + s [B, -B0] [A; A0], a LoRA of twice the rank at the same scale s
    (lora_alpha doubled; times sqrt 2 under rsLoRA). Unlike peft's, DoRA's magnitudes and trained token rows are
    kept as they are (peft's drops every other tensor): DoRA normalizes the same W + s B A."""
    from safetensors.torch import load_file, save

    weights = load_file(adapter / "adapter_model.safetensors")
    if missing := sorted(set(start) - set(weights)):
        raise RuntimeError(f"the saved adapter lacks {len(missing)} of the tensors it started with ({missing[0]}, ...)")
    for key, first in start.items():
        trained = weights[key]
        if ".lora_A." in key:
            weights[key] = torch.cat([trained, first.to(trained.dtype)], dim=0)
        else:
            weights[key] = torch.cat([trained, -first.to(trained.dtype)], dim=1)
    config = read_json(adapter / "adapter_config.json")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise RuntimeError("a PiSSA/OLoRA adapter with per-module ranks or alphas: edgar-tune writes none")
    config |= {"init_lora_weights": True, "r": 2 * config["r"],
               "lora_alpha": config["lora_alpha"] * (math.sqrt(2) if config.get("use_rslora") else 2)}  # fmt: skip
    atomic_write_bytes(adapter / "adapter_model.safetensors", save(weights, metadata={"format": "pt"}))
    atomic_write_json(adapter / "adapter_config.json", config)


def _checkpointing_args(on: bool) -> dict:
    """Gradient checkpointing under its name in this transformers (`activation_checkpointing` from 5.2x)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)} else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def _check_engine(trainer, cfg: TrainConfig) -> None:
    """What runs is what was asked for: never plain training under DeepSpeed's or FSDP's name."""
    if bool(cfg.deepspeed) != trainer.is_deepspeed_enabled:
        raise RuntimeError(f"train.deepspeed={cfg.deepspeed!r} but the Trainer's DeepSpeed is {trainer.is_deepspeed_enabled}")
    if cfg.enable_fsdp:
        from accelerate.utils import DistributedType

        kind = trainer.accelerator.state.distributed_type
        if not trainer.is_fsdp_enabled or kind != DistributedType.FSDP:
            raise RuntimeError(f"train.enable_fsdp=true but the Trainer runs {kind}; refusing to train under FSDP's name")


def train(tmp: Path, tokenize_dir: Path, cfg: TrainConfig, eval_cfg: EvalConfig, ckpts: Path,
          resume_from: Path | None = None, prune: dict | None = None) -> dict:  # fmt: skip
    """Train in this process (one of `WORLD_SIZE` under a launcher); rank 0 writes the results into `tmp`. Under a
    sweep's `prune` rule (tasks/pruning.py) a weak training stops at a validation, and rank 0 writes only why
    (`PRUNED`)."""
    from transformers import EarlyStoppingCallback, TrainingArguments

    precision = resolve_precision(cfg.precision)
    cfg = resolve_checkpointing(tokenize_dir, cfg, precision)  # the train stage resolved it; a direct call may not
    cpu_allocator = allocator.check(cfg.cpu_allocator)
    ds_config = None
    if cfg.deepspeed:
        ds_config = str(deepspeed_config_path(cfg.deepspeed))
        _single_process_dist_env()
        _prepare_deepspeed()
    if cfg.enable_fsdp:
        _single_process_dist_env()
    base = base_model_path(tokenize_dir)
    blocks = _select_blocks(tokenize_dir, cfg)
    evaluate = cfg.eval_steps > 0
    eval_set = validation_blocks(tokenize_dir, eval_cfg.max_val_samples, cfg.eval_blocks) if evaluate else None
    save_strategy, save_steps = cfg.save_plan()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = check_profile_step(len(blocks), cfg, world)
    warning = validation_cost(len(eval_set), cfg, world, steps) if evaluate else None
    if warning and os.environ.get("RANK", "0") == "0":
        log.warning(warning)
    workers = dataloader_workers(cfg.dataloader_num_workers)
    args = TrainingArguments(
        output_dir=str(ckpts),
        num_train_epochs=cfg.epoch,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=eval_cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        warmup_steps=round(cfg.warmup * total_steps(len(blocks), cfg, world)),
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy=save_strategy,
        save_steps=save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=evaluate and cfg.load_best_model_at_end,
        metric_for_best_model="eval_loss" if evaluate else None,
        greater_is_better=False if evaluate else None,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.train_data_split_seed,
        **_checkpointing_args(cfg.gradient_checkpointing),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        deepspeed=ds_config,  # before the model is built: ZeRO-3 then builds it sharded
        fsdp="full_shard auto_wrap" if cfg.enable_fsdp else "",
        fsdp_config={"use_orig_params": True} if cfg.enable_fsdp else None,
        use_cpu=device() == "cpu",
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        torch_compile=cfg.compiled_scope() == "model",
        disable_tqdm=not console_bars(),  # a file or a pipe: the train stage's log lines say it (follow_progress)
    )
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    tokens = trainable_tokens(tokenize_dir, cfg, tokenizer)  # the train stage resolved them; a direct call may not
    model = _load_model(base, cfg, precision)
    first = None  # PiSSA's or OLoRA's adapters as they started (rank 0), to publish the training as plain LoRA
    if cfg.mode == "lora" and os.environ.get("RANK", "0") == "0" and (
            zero := untrained_special(model, tokenizer, tokenize_dir / "train", tokens)):  # fmt: skip
        log.warning("the training examples hold %s: special tokens whose embedding or LM head rows are zero in the "
                    "base, never trained; LoRA leaves those rows so. To train them beside it: "
                    "train.trainable_tokens=%s", ", ".join(f"{t} ({i})" for t, i in zero.items()),
                    ",".join([*tokens, *zero]))  # fmt: skip
    # Training never reads a KV cache; building one costs memory and stops transformers from masking packed
    # documents (it reads position ids as packing only without a cache).
    model.config.use_cache = False
    fused_layers = "off"
    if resolve_backend(cfg.fused_layers, "train.fused_layers") == "triton":
        fused_layers = fuse_layers(model)
        log.info("train.fused_layers: Triton RMSNorm x%(rms_norm)d, SwiGLU x%(swiglu)d, rotary embedding x%(rope)d",
                 fused_layers)
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, cfg.lora_target_modules)
        rows = token_rows(model, list(tokens.values()))
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, target_modules=targets,
                          init_lora_weights=True if cfg.lora_init == "default" else cfg.lora_init,
                          task_type="CAUSAL_LM", trainable_token_indices=rows,
                          revision=unpinned(base)[1].get("revision"))  # peft's AutoPeftModel* loads that commit
        decomposing = time.perf_counter()
        model = get_peft_model(model, lora)  # PiSSA's and OLoRA's decompositions run here, the same on a resume
        if cfg.lora_start_moves_base() and os.environ.get("RANK", "0") == "0":
            first = lora_start(model)
            log.info("train.lora_init=%s: %d adapted weights decomposed in %.1f s; the adapter is published as a "
                     "plain LoRA of r=%d on the unchanged base", cfg.lora_init, len(first) // 2,
                     time.perf_counter() - decomposing, 2 * cfg.lora_r)  # fmt: skip
        if cfg.lean_lora:
            log.info("train.lean_lora: %d LoRA projections keep their input once%s", lean_lora(model),
                     "; DoRA's norms come without building the weights" if cfg.use_dora else "")  # fmt: skip
    fp8_layers = 0
    if cfg.fp8_base:  # on the GPU it trains on: quantizing a 7B base on the CPU takes minutes
        try:
            fp8_layers = fp8.fp8_base(model, "cuda" if device() == "cuda" else None)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        log.info("train.fp8_base: %d frozen linear layers run FP8 matmuls (e4m3, a scale per row)", fp8_layers)
    if cfg.compiled_scope() == "layers":  # the final modules: peft's, lean_lora's and the FP8 layers are traced
        log.info("train.torch_compile: %d transformer layers compiled in place, sharing their compiled code",
                 compile_layers(model))  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    timer, callbacks = step_timer(), []
    early_stopping = bool(evaluate and cfg.early_stopping_patience)
    if early_stopping:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
    selective = None
    if cfg.gradient_checkpointing and cfg.checkpoint_layers < 1:
        callbacks.append(selective := selective_checkpointing(cfg.checkpoint_layers))
    profiler = None
    if cfg.profile_step:
        callbacks.append(profiler := step_profiler(cfg.profile_step, tmp / "profile"))
    stopper = None
    if threading.current_thread() is threading.main_thread():
        callbacks.append(stopper := stop_on_sigterm())
    collator = CausalLMCollator(tokenizer.pad_token_id, tokenizer.eos_token_id if cfg.document_mask else None,
                                ragged=cfg.attention == "varlen")  # fmt: skip
    trainer = trainer_class()(model=model, args=args, train_dataset=blocks, eval_dataset=eval_set,
                              data_collator=collator, callbacks=[timer, *callbacks])  # fmt: skip
    tokens_per_step = (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * trainer.args.world_size
                       * len(blocks[0]["input_ids"]))  # fmt: skip
    trainer.add_callback(progress_events(tmp / EVENTS, tokens_per_step))
    pruner = None
    if prune is not None and evaluate:
        trainer.add_callback(pruner := pruning.prune_weak(prune, tokens_per_step, tmp.parent / pruning.LIVE))
    if args.disable_tqdm:  # instead of the bar, transformers prints each loss dict: the log lines have them
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.fused_linear_ce = resolve_backend(cfg.fused_linear_ce, "train.fused_linear_ce", cfg.enable_fsdp)
    trainer.loraplus_lr_ratio = cfg.loraplus_lr_ratio
    _check_engine(trainer, cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    # sdpa's dense masks (packed documents, padded examples): one additive mask for all layers (kernels/masks.py)
    with (shared_sdpa_mask() if cfg.attention == "sdpa" else contextlib.nullcontext(),
          stopper.handling() if stopper else contextlib.nullcontext()):
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stopper is not None and stopper.asked:  # stopped early, with a checkpoint: nothing here is the stage's output
        raise Stopped(128 + signal.SIGTERM)
    if pruner is not None and pruner.decision is not None:  # likewise: the stage fails, saying why
        if trainer.is_world_process_zero():
            atomic_write_json(tmp / pruning.PRUNED, pruner.decision)
        return {}
    seconds = time.perf_counter() - start
    zero_stage = trainer.model_wrapped.zero_optimization_stage() if cfg.deepspeed else None
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in history]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"training loss is not finite ({losses[-3:]}); lower `train.learning_rate`")
    weights = "adapter" if cfg.mode == "lora" else "model"
    trainer.save_model(str(tmp / weights))  # every rank: ZeRO-3 and FSDP gather the shards for rank 0 to write
    if not trainer.is_world_process_zero():
        return {}
    (tmp / weights / "training_args.bin").unlink(missing_ok=True)
    if first is not None:
        as_plain_lora(tmp / weights, first)
    tokenizer.save_pretrained(tmp / weights)
    write_jsonl(tmp / "loss.jsonl", [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get(
        "learning_rate"), "epoch": h.get("epoch")} for h in history])  # fmt: skip
    val_history = [{"step": h["step"], "val_loss": h["eval_loss"]} for h in trainer.state.log_history if "eval_loss" in h]
    write_jsonl(tmp / "val_loss.jsonl", val_history)
    state = trainer.state
    steady = steady_step_seconds(timer.seconds)
    planned = total_steps(len(blocks), cfg, trainer.args.world_size)
    stats = {
        "mode": cfg.mode,
        "weights": weights,
        "steps": state.global_step,
        "planned_steps": planned,
        "stopped_early": early_stopping and state.global_step < planned,
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else None,
        "best_step": state.best_global_step,
        "best_val_loss": state.best_metric,
        "published": "best" if args.load_best_model_at_end and state.best_global_step else "last",
        "train_blocks": len(blocks),
        "validation_blocks": len(eval_set) if evaluate else 0,  # scored at each validation during training
        "train_tokens_seen": state.global_step * tokens_per_step,
        "step_seconds": steady,
        "tokens_per_s": tokens_per_step / steady if steady else None,
        "trainable_parameters": trainable,
        "trainable_tokens": list(tokens),  # their embedding and LM head rows, trained beside LoRA
        "final_loss": losses[-1],
        # The Trainer's own average divides a resumed run's loss by all steps; the logged history is whole.
        "train_loss": sum(losses) / len(losses) if resume_from else result.training_loss,
        "seconds": seconds,
        "engine": "deepspeed" if cfg.deepspeed else "fsdp" if cfg.enable_fsdp else "hf-trainer",
        "deepspeed_config": cfg.deepspeed,
        "zero_stage": zero_stage,
        "world_size": trainer.args.world_size,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "checkpointed_layers": "{}/{}".format(*selective.checkpointed) if selective
        else "all" if cfg.gradient_checkpointing else "none",
        "loss_kernel": trainer.fused_linear_ce,
        "torch_compile": cfg.torch_compile,
        "compile_scope": cfg.compiled_scope(),
        "fused_layers": fused_layers,
        "lean_lora": cfg.lean_lora and cfg.mode == "lora",
        "lora_init": cfg.lora_init if cfg.mode == "lora" else None,  # PiSSA's and OLoRA's published at twice the rank
        "fp8_base_layers": fp8_layers,
        # the frozen blocks' weights: FP8 buffers under fp8_base (the embeddings and norms stay in the base's dtype)
        "base_dtype": None if cfg.mode != "lora" else "float8_e4m3fn" if fp8_layers else
        str(next(p for p in model.parameters() if not p.requires_grad).dtype).split(".")[-1],
        "document_mask": cfg.document_mask,
        "attention": causal_lm_of(model).config._attn_implementation,
        "dataloader_num_workers": workers,
        "cpu_allocator": cpu_allocator,
        "quantization": cfg.quantization,
        "device": device(),
        "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision],
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "peak_rss_gb": allocator.peak_rss_gb(),  # this process's RAM: what the memory plan is for on the CPU
        "profile": profiler.summary if profiler else None,
    }
    atomic_write_json(tmp / "stats.json", stats)
    return stats
