"""One training process under the DeepSpeed launcher (`train.nproc` > 1 or a hostfile).

    deepspeed --num_gpus N --module tasks.train_worker --out TMP --tokenize-dir DIR --config JSON

Every rank trains; rank 0 writes the weights, tokenizer, loss history and stats into `--out`, the temp folder
that the parent's stage publishes atomically once the launcher exits cleanly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgar_tune.config import TrainConfig
from tasks.finetune import train

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenize-dir", type=Path, required=True)
    ap.add_argument("--config", required=True, help="TrainConfig as JSON")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the launcher; LOCAL_RANK is read instead")
    args = ap.parse_args()
    train(args.out, args.tokenize_dir, TrainConfig.model_validate_json(args.config))
