"""One training process under a launcher (`train.nproc` > 1 or a hostfile): DeepSpeed's, or torchrun for FSDP.

    deepspeed --num_gpus N --module tasks.train_worker --out TMP --tokenize-dir DIR --checkpoints DIR \
        --config JSON --eval-config JSON [--resume-from CHECKPOINT] [--prune RULE]

Every rank trains; rank 0 writes the weights, tokenizer, loss history and stats into `--out`, the temp folder
that the parent's stage publishes atomically once the launcher exits cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from edgar_tune.config import EvalConfig, TrainConfig
from edgar_tune.signals import keep_signals
from tasks.checkpoints import DiskFull
from tasks.finetune import EVENTS, FAILURE, end_with_the_stage, log_to_the_stage, train
from tasks.progress import settle_console

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenize-dir", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, required=True)
    ap.add_argument("--config", required=True, help="TrainConfig as JSON")
    ap.add_argument("--eval-config", required=True, help="EvalConfig as JSON")
    ap.add_argument("--resume-from", type=Path)
    ap.add_argument("--prune", type=json.loads, help="a sweep's rule for weak points, as JSON (tasks/pruning.py)")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the launcher; LOCAL_RANK is read instead")
    args = ap.parse_args()
    settle_console()  # the bars as its flow decided them (EDGAR_TUNE_BARS), DeepSpeed's CPU notice dropped
    log_to_the_stage(args.out / EVENTS)
    end_with_the_stage()
    keep_signals()  # a SIGTERM before the first step or after the last that lands in a finalizer still ends it
    try:
        train(args.out, args.tokenize_dir, TrainConfig.model_validate_json(args.config),
              EvalConfig.model_validate_json(args.eval_config), args.checkpoints, args.resume_from,
              args.prune)  # fmt: skip
    except DiskFull as err:  # what the stage's message leads with
        with contextlib.suppress(OSError):
            (args.out / FAILURE).write_text(str(err))
        raise
