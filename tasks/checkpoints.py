"""Atomic, resumable training checkpoints.

A checkpoint is written whole into `tmp-checkpoint-N` beside the others, fsynced, renamed to `checkpoint-N`,
and only then given its `COMPLETE` marker. A folder without the marker is what a killed process left: it is
never resumed from, and the next run removes it (`remove_unfinished`). A save that fails on a full disk removes its
unfinished copy and says what takes the disk (`DiskFull`); after each save, a run whose disk will not hold the rest
of its checkpoints and final model is warned, once (`room_needed`). Weights are uncompressed safetensors (the
Trainer's `save_model`); optimizer, scheduler and RNG state are the Trainer's (or DeepSpeed's) own files next to them.

The checkpoints folder of a stage (`04_train.checkpoints/`) also holds `run.json`, the settings the
checkpoints were made with; resuming under different settings is refused, naming the keys that differ.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

from edgar_tune.config import TRAINING_EVAL_KEYS, StageFailed
from tasks.io import TRAIN, atomic_write_json, megabytes, out_of_space, read_json, size, umask_modes

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
RUN_META = "run.json"
CHECKPOINTS = f"{TRAIN}.checkpoints"  # a run's, beside its 04_train
_STEP = re.compile(r"^checkpoint-(\d+)$")
# Settings a resumed run may change: they leave the trajectory as it was (recomputing activations gives the same
# numbers, RNG state included, so a run that ran out of memory can resume with more of them recomputed).
RESUME_NEUTRAL = {"logging_steps", "resume", "keep_checkpoints", "memory_check", "memory_budget_gb", "save_total_limit",
                  "gradient_checkpointing", "checkpoint_layers", "dataloader_num_workers", "lean_lora",
                  "cpu_allocator"}  # fmt: skip
# Settings that choose only what the validations during training score (not when they run: each validation draws
# one number from the RNG, its DataLoader's seed, whatever it scores). Neutral too while the validation loss steers
# nothing (no early stopping, the last checkpoint published): the advice to score fewer blocks
# (`finetune.validation_cost`) then applies to a stopped run's rerun as well.
VALIDATION_SET = ("train.eval_blocks", "eval.max_val_samples", "eval.per_device_eval_batch_size")


def checkpoint_step(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(folder: Path) -> list[Path]:
    """`checkpoint-N` folders with their marker, oldest first; incomplete ones are skipped with a warning."""
    found = sorted((p for p in Path(folder).glob("checkpoint-*") if checkpoint_step(p) is not None), key=checkpoint_step)
    complete = []
    for path in found:
        if (path / MARKER).is_file():
            complete.append(path)
        else:
            log.warning("skipping %s: no %s marker (its writer was interrupted)", path, MARKER)
    for tmp in Path(folder).glob("tmp-checkpoint-*"):
        log.warning("skipping %s: a checkpoint that was never finished", tmp)
    return complete


def remove_unfinished(folder: Path) -> None:
    """Remove what interrupted writers left (`tmp-checkpoint-N`, `checkpoint-N` without its marker): never resumed
    from, each as large as a checkpoint (a full fine-tune's: weights and optimizer state). Before, they stayed until
    a run saved that same step again; one left by a full disk kept the disk full for the rerun."""
    for path in sorted(Path(folder).glob("*checkpoint-*")):
        step = checkpoint_step(path) if path.name.startswith("checkpoint-") else None
        staging = path.name.startswith("tmp-checkpoint-")
        if path.is_dir() and (staging or (step is not None and not (path / MARKER).is_file())):
            log.warning("removing %s (%s): %s, never resumed from", path, size(megabytes(path) * 1e6),
                        "a checkpoint that was never finished" if staging else
                        f"no {MARKER} marker (its writer was interrupted)")  # fmt: skip
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_checkpoint(staging: Path, final: Path, step: int) -> None:
    """Rename a fully written staging folder into place, then write its completion marker last. Its files get the
    umask's permissions (`umask_modes`: safetensors writes weights 0600), so kept checkpoints read as the run does."""
    umask_modes(staging)
    _fsync_tree(staging)
    if final.exists():  # a leftover of an interrupted run at this same step
        shutil.rmtree(final)
    os.replace(staging, final)
    (final / MARKER).write_text(f"step {step}\n")


def prepare(folder: Path, settings: dict, resume: bool, defaults: dict | None = None) -> Path | None:
    """Get the checkpoints folder ready; return the checkpoint to resume from, if any.

    `defaults`: each setting's default. A setting the checkpoints' record lacks (one added to edgar-tune since they
    were written) was at its default then: a new setting's default does what the releases before it did.

    Raises:
        ValueError: resuming under settings other than the checkpoints' own; names the keys that differ.
    """
    folder = Path(folder)
    meta = folder / RUN_META
    if folder.exists() and not resume:
        aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(folder, aside)  # nothing already written is lost
        log.warning("train.resume=false: earlier checkpoints moved to %s", aside)
    if folder.exists():
        remove_unfinished(folder)
    last = latest_checkpoint(folder) if folder.exists() else None
    if last is not None and meta.exists():
        # settings made neutral since those checkpoints were written do not count either
        recorded = (defaults or {}) | read_json(meta)
        before = {k: v for k, v in recorded.items() if k.removeprefix("train.") not in RESUME_NEUTRAL
                  and (k in settings or k not in VALIDATION_SET)}  # fmt: skip
        differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if differ:
            changes = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in differ)
            raise ValueError(
                f"{folder} holds checkpoints of an interrupted run made with other settings ({changes}). Set them "
                "back to resume, or set train.resume=false to start over (the checkpoints are kept aside)."
            )
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta, settings)
    if last is not None:
        log.info("resuming from %s", last)
    return last


def resume_settings(train: dict, eval_: dict, tokenize_stats: dict, world_size: int) -> dict:
    """What must match for a resumed run to continue the same trajectory: the settings of what its validations score
    (`VALIDATION_SET`) only while their loss steers the training (early stopping, the best checkpoint published)."""
    settings = {f"train.{k}": v for k, v in train.items() if k not in RESUME_NEUTRAL}
    settings |= {f"eval.{k}": v for k, v in eval_.items() if k in TRAINING_EVAL_KEYS}
    settings |= {"data.train_blocks": tokenize_stats["train_blocks"], "data.block_length": tokenize_stats["block_length"],
                 "data.base_model": tokenize_stats["base_model"], "world_size": world_size}  # fmt: skip
    steers = train.get("eval_steps") and (train.get("early_stopping_patience") or train.get("load_best_model_at_end"))
    return settings if steers else {k: v for k, v in settings.items() if k not in VALIDATION_SET}


def _worker_ignores_sigterm(init, worker_id: int) -> None:
    """A DataLoader worker's init: SIGTERM is not for it. A stopped run signals its training processes (and a
    launcher, each rank's process tree), workers included: PyTorch's worker handler ends a worker that its own
    process did not signal, and the training process then fails on "DataLoader worker ... is killed by signal"
    in the middle of the step it should finish and checkpoint (`stop_on_sigterm`). The worker still ends with its
    process: PyTorch's workers watch it, and the stage SIGKILLs what is left of the process group."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if init is not None:
        init(worker_id)


def log_stop(how: str, state, world_size: int) -> None:
    """On rank 0: the line that says where a stop request ends training (`stop_on_sigterm`), after `how`."""
    if state.is_world_process_zero:
        ranks = f" on all {world_size} ranks" if world_size > 1 else ""
        log.warning("%s training stops after step %d of %d%s, with a checkpoint of it, which the next run resumes "
                    "from", how, state.global_step, state.max_steps, ranks)  # fmt: skip


class DiskFull(StageFailed):
    """A checkpoint cannot be written: the disk holding the checkpoints is full."""


NEARLY_FULL_BYTES = 64 << 20  # free space under which a failed write is put down to a full disk


def disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a write to `folder` failed for want of space: `out_of_space`, or next to nothing free there (torch's
    zip writer reports only `unexpected pos` or `iostream error`)."""
    return out_of_space(err) is not None or shutil.disk_usage(folder).free < NEARLY_FULL_BYTES


def disk_use(folder: Path) -> str:
    """What the checkpoints take on their disk: the complete ones, and the folders `train.resume=false` set aside
    beside them (kept, never deleted by a run)."""
    done = complete_checkpoints(folder)
    said = [f"the complete checkpoints take {size(megabytes(*done) * 1e6)} ({', '.join(p.name for p in done)})"
            if done else "no checkpoint is complete yet"]  # fmt: skip
    aside = sorted(folder.parent.glob(f"{folder.name}.old-*"))
    if aside:
        said.append(f"{len(aside)} folder(s) of checkpoints set aside by train.resume=false take "
                    f"{size(megabytes(*aside) * 1e6)} ({', '.join(p.name for p in aside)}; delete what you no longer "
                    "need)")  # fmt: skip
    return "; ".join(said)


def room_needed(latest: Path, complete: int, keep: int, saves_left: int) -> tuple[int, int, int, int]:
    """(bytes, checkpoints, bytes of each, final model bytes) the rest of a training still writes on the
    checkpoints' disk, from the size of the checkpoint just saved (`latest`), with `complete` checkpoints there now
    and `saves_left` saves to come: up to `keep` complete ones kept (train.save_total_limit) and the one being
    written beside them; then, with the last ones kept, the final model (the weights files of a checkpoint)."""
    each = round(megabytes(latest) * 1e6)
    weights = [f for f in latest.iterdir() if f.suffix in (".safetensors", ".bin") and f.name != "training_args.bin"]
    model = round(megabytes(*weights) * 1e6)
    peak = min(complete + saves_left - 1, keep) + 1 if saves_left else complete  # while the next is written
    last = min(complete + saves_left, keep)  # once the last is saved and the oldest rotated out
    need = max(peak * each, last * each + model) - complete * each
    return max(0, need), max(0, peak - complete), each, model


LEAST_BYTES = 2  # a trained parameter's weight and each of AdamW's two moments take this much at the least (bf16)


def check_room_for_one(run_dir: Path, trained: int, checkpoints: bool) -> None:
    """Refuse, before any model loads, a training whose disk cannot hold even one checkpoint (its weights and the
    optimizer's two moments of each trained parameter, `LEAST_BYTES` each: a bound, not an estimate; SmolLM2's LoRA
    checkpoints held 2.0x that plain, 2.7x under ZeRO-3 and 11x under ZeRO-2, whose model states keep the frozen
    embedding too) or, checkpointing nothing, its final weights: it would fail at its first save, after
    train.save_steps of work. What a run will really need is measured from its first checkpoint (`room_needed`).

    Raises:
        DiskFull: the disk holding `run_dir` has less free than that bound.
    """
    least = trained * LEAST_BYTES * (3 if checkpoints else 1)
    free = shutil.disk_usage(run_dir).free
    if free < least:
        what = "a checkpoint of this training" if checkpoints else "this training's final weights"
        raise DiskFull(f"the disk holding {run_dir} has {size(free)} free, and {what} takes {size(least)} at the "
                       f"least ({trained / 1e6:,.2f}M trained parameters{' and their optimizer state' * checkpoints}, "
                       f"{LEAST_BYTES} bytes each at the least): free space on that disk; "
                       f"{disk_use(run_dir / CHECKPOINTS) if (run_dir / CHECKPOINTS).exists() else ''}".rstrip("; "))


def saves_left(args, state) -> int:
    """How many checkpoints the Trainer still saves: every save_steps and at the last step, or once per epoch."""
    if args.save_strategy == "steps" and args.save_steps:
        return math.ceil((state.max_steps - state.global_step) / args.save_steps)
    if args.save_strategy == "epoch":
        return math.ceil(args.num_train_epochs - (state.epoch or 0))
    return 0


class ValidationStopped(Exception):
    """Raised between a validation's batches when training is asked to stop (`stop_on_sigterm`): the trainer
    drops that validation and checkpoints the step."""


def trainer_class():
    """The Trainer, with checkpoints written atomically, DataLoader workers a SIGTERM does not end, and a stop
    request that cuts a validation inside training short."""
    from transformers import Trainer
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import rotate_checkpoints

    class AtomicCheckpointTrainer(Trainer):
        fused_linear_ce = "off"  # set per run from train.fused_linear_ce
        loraplus_lr_ratio = None  # set per run from train.loraplus_lr_ratio

        def create_optimizer(self, model=None):
            """The Trainer's optimizer; with LoRA+ its parameter groups split again, by peft's rule: LoRA's B
            matrices and every 1-D trained tensor (DoRA's magnitudes, biases) at loraplus_lr_ratio times the
            learning rate, the rest at it, each with the Trainer's weight decay or none as it decides."""
            if self.optimizer is None and self.loraplus_lr_ratio:
                opt_model = self.model if model is None else model
                decay = set(self.get_decay_parameter_names(opt_model))
                groups: dict[tuple[bool, bool], list] = {}
                for name, param in opt_model.named_parameters():
                    if param.requires_grad:
                        fast = "lora_B" in name or param.ndim == 1
                        groups.setdefault((fast, name in decay), []).append(param)
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                lr = kwargs.pop("lr", self.args.learning_rate)
                self.optimizer = cls([{"params": params, "lr": lr * (self.loraplus_lr_ratio if fast else 1.0),
                                       "weight_decay": self.args.weight_decay if decayed else 0.0}
                                      for (fast, decayed), params in sorted(groups.items())],
                                     lr=lr, **kwargs)  # fmt: skip
            return super().create_optimizer(model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """With the fused kernel: the Trainer's causal-LM loss, same normalisation, without the logits. The
            validation loss during training (eval_steps) asks for outputs too; it only keeps the loss (no
            compute_metrics: the Trainer's evaluate passes prediction_loss_only), so it gets the loss alone."""
            from kernels import varlen

            varlen.mark_dynamic(inputs)
            wants_logits = return_outputs and self.compute_metrics is not None
            if self.fused_linear_ce == "off" or wants_logits or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from kernels.hf import causal_lm_loss

            inputs = dict(inputs)
            labels = inputs.pop("labels")
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = causal_lm_loss(model, labels=labels, reduction="sum", backend=self.fused_linear_ce, **inputs)
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
            else:
                loss = causal_lm_loss(model, labels=labels, backend=self.fused_linear_ce, **inputs)
            return (loss, {"loss": loss}) if return_outputs else loss

        def _get_dataloader(self, *args, **kwargs):  # the training's and the validation's
            import functools

            loader = super()._get_dataloader(*args, **kwargs)
            base = getattr(loader, "base_dataloader", loader)  # accelerate's shard wraps the DataLoader
            if base.num_workers:
                base.worker_init_fn = functools.partial(_worker_ignores_sigterm, base.worker_init_fn)
            return loader

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, *args, **kwargs) -> None:
            try:
                super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kwargs)
            except ValidationStopped:  # asked to stop while validating this step: minutes on a 7B, a big MD&A
                log_stop(f"SIGTERM during the validation of step {self.state.global_step}: the validation is "
                         "dropped;", self.state, self.args.world_size)  # fmt: skip
                self._save_checkpoint(model, trial)
                self.control = self.callback_handler.on_save(self.args, self.state, self.control)
                # and not again at the epoch's end, which the loop reaches next
                self.control.should_evaluate = self.control.should_save = self.control.should_log = False
                self.control.should_training_stop = True

        def _save_checkpoint(self, model, trial) -> None:
            # Trainer._save_checkpoint, with every file written into a staging sibling first.
            step = self.state.global_step
            run_dir = Path(self._get_output_dir(trial=trial))
            final, staging = run_dir / f"checkpoint-{step}", run_dir / f"tmp-checkpoint-{step}"
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            try:
                self._write_checkpoint(model, trial, staging)
            except Exception as err:
                if not self.args.should_save:
                    raise
                full, usage = disk_full(err, run_dir), shutil.disk_usage(run_dir)
                written = megabytes(staging) * 1e6 if staging.exists() else 0
                shutil.rmtree(staging, ignore_errors=True)  # unfinished: never resumed from, and it holds the space
                if not full:
                    raise
                copy = f"Its unfinished copy ({size(written)})" if written else "Its unfinished copy"
                raise DiskFull(
                    f"checkpoint-{step} could not be written: the disk holding {run_dir} is full ({size(usage.free)} "
                    f"free of {size(usage.total)}). {copy} is removed; {disk_use(run_dir)}. Free space on that disk, "
                    f"or keep fewer checkpoints (train.save_total_limit={self.args.save_total_limit})"
                ) from err  # fmt: skip
            self.accelerator.wait_for_everyone()  # every rank's shards are in staging
            if self.args.should_save:
                publish_checkpoint(staging, final, step)
            self.accelerator.wait_for_everyone()
            if self.state.best_global_step:
                best = run_dir / f"checkpoint-{self.state.best_global_step}"
                if best.exists():
                    self.state.best_model_checkpoint = str(best)
            if self.args.should_save:
                rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)  # fmt: skip
                self._check_room(run_dir, final)

        def _write_checkpoint(self, model, trial, staging: Path) -> None:
            if self.hp_search_backend is None and trial is None:
                self.store_flos()
            self.save_model(str(staging), _internal_call=True)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(str(staging))
                self._save_scaler(str(staging))
                self._save_rng_state(str(staging))
            if self.args.should_save:
                callbacks = [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]
                for cb in callbacks:
                    name = cb.__class__.__name__
                    if isinstance(self.state.stateful_callbacks[name], list):
                        self.state.stateful_callbacks[name].append(cb.state())
                    else:
                        self.state.stateful_callbacks[name] = cb.state()
                self.state.save_to_json(str(staging / TRAINER_STATE_NAME))

        def _check_room(self, run_dir: Path, latest: Path) -> None:
            """Warn, once a run, when the checkpoints' disk has less room than the rest of the training will write
            there, measured from the checkpoint just saved: the run fails when the disk fills, at a checkpoint, and
            is better told now, while there is time to free space, than hours on."""
            if getattr(self, "_warned_room", False):
                return
            keep = self.args.save_total_limit
            if self.args.load_best_model_at_end and keep == 1:
                keep = 2  # the best and the latest (the Trainer's rule)
            need, more, each, model = room_needed(latest, len(complete_checkpoints(run_dir)), keep,
                                            saves_left(self.args, self.state))  # fmt: skip
            free = shutil.disk_usage(run_dir).free
            if need <= free:
                return
            self._warned_room = True
            log.warning("the disk holding %s has %s free, and the rest of this training needs about %s there: %d more "
                        "checkpoint(s) of %s (train.save_total_limit=%d kept, and the one being written) and the final "
                        "model (%s); %s. Free space on that disk, or lower train.save_total_limit: where it fills, the "
                        "run fails at that checkpoint, and the next run resumes from the one before", run_dir,
                        size(free), size(need), more, size(each),
                        self.args.save_total_limit, size(model), disk_use(run_dir))  # fmt: skip

    return AtomicCheckpointTrainer
