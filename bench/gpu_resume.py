"""GPU check of resume under ZeRO-3 (issue 4): LoRA on a random-weight SmolLM2-135M shape, DeepSpeed ZeRO-3,
bf16, gradient checkpointing. One run goes uninterrupted; another is SIGKILLed once checkpoint-10 is complete,
an unfinished checkpoint-20 is planted, and the rerun must resume from step 10 and log the same losses.

    python bench/gpu_resume.py            # prints the per-step comparison and writes bench/results/*.json

The CPU tests do the same for plain LoRA and ZeRO-2 (tests/test_resume.py); this covers ZeRO-3's sharded
checkpoints on CUDA, where bf16 kernels are not bitwise deterministic, so losses are compared to 1e-2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPS, SAVE_EVERY, SEQ, BATCH = 30, 10, 512, 4


def config():
    from edgar_tune.config import TrainConfig

    return TrainConfig(mode="lora", lora_r=8, lora_alpha=16, lora_dropout=0.1, max_steps=STEPS,
                       per_device_train_batch_size=BATCH, learning_rate=1e-3, precision="bf16", deepspeed="zero3",
                       eval_steps=0, early_stopping_patience=0, load_best_model_at_end=False, save_steps=SAVE_EVERY,
                       keep_checkpoints=True, memory_check="warn")  # fmt: skip


def worker(tok: Path, out: Path, ckpt: Path) -> None:
    from edgar_tune.config import EvalConfig
    from tasks.checkpoints import latest_checkpoint
    from tasks.finetune import train

    ckpt.mkdir(parents=True, exist_ok=True)
    train(out, tok, config(), EvalConfig(), ckpt, latest_checkpoint(ckpt))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=3, type=Path, metavar=("TOK", "OUT", "CKPT"))
    args = ap.parse_args()
    if args.worker:
        import faulthandler

        faulthandler.dump_traceback_later(150, exit=True)  # a hang shows where it is instead of a silent timeout
        worker(*args.worker)
        return
    import torch

    from bench.gpu_engine import tokenize_dir
    from tasks.checkpoints import MARKER

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        tok = tokenize_dir(root, "smollm2-135m", SEQ, STEPS * BATCH)
        cmd = lambda out, ck: [sys.executable, __file__, "--worker", str(tok), str(out), str(ck)]  # noqa: E731
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        logs = Path(os.environ.get("OUT", root))
        log = lambda name: open(logs / f"resume-{name}.log", "w")  # noqa: E731
        subprocess.run(cmd(root / "ref", root / "ref-ckpt"), check=True, env=env, stdout=log("reference"), stderr=subprocess.STDOUT)
        print("uninterrupted run done", flush=True)
        proc = subprocess.Popen(cmd(root / "run", root / "ckpt"), env=env, stdout=log("killed"), stderr=subprocess.STDOUT)
        while not (root / "ckpt" / f"checkpoint-{SAVE_EVERY}" / MARKER).exists():
            assert proc.poll() is None, "finished before the kill"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        killed_rc = proc.wait()
        planted = root / "ckpt" / f"checkpoint-{2 * SAVE_EVERY}"
        shutil.rmtree(planted, ignore_errors=True)
        shutil.copytree(root / "ckpt" / f"checkpoint-{SAVE_EVERY}", planted)
        (planted / MARKER).unlink()
        shutil.rmtree(root / "run", ignore_errors=True)
        print("killed; resuming", flush=True)
        subprocess.run(cmd(root / "run", root / "ckpt"), check=True, env=env, stdout=log("resumed"), stderr=subprocess.STDOUT)
        stats = json.loads((root / "run" / "stats.json").read_text())
        ref, ours = losses(root / "ref"), losses(root / "run")
    diffs = [abs(a - b) / abs(b) for a, b in zip(ours, ref, strict=True)]
    print(f"killed with exit {killed_rc}; resumed from step {stats['resumed_from_step']}, "
          f"engine {stats['engine']} ZeRO-{stats['zero_stage']} {stats['dtype']}")  # fmt: skip
    print(f"{'step':>4} {'uninterrupted':>14} {'resumed':>10} {'rel diff':>9}")
    for i, (a, b) in enumerate(zip(ref, ours, strict=True), 1):
        if i % 5 == 0 or i in (SAVE_EVERY, SAVE_EVERY + 1):
            print(f"{i:>4} {a:>14.5f} {b:>10.5f} {abs(a - b) / abs(a):>9.2e}")
    after = diffs[SAVE_EVERY:]
    ok = stats["resumed_from_step"] == SAVE_EVERY and max(after) < 1e-2
    print(f"max relative difference after the resume: {max(after):.2e} -> {'PASS' if ok else 'FAIL'}")
    record = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(), "killed_exit": killed_rc,
              "resumed_from_step": stats["resumed_from_step"], "zero_stage": stats["zero_stage"],
              "uninterrupted": ref, "resumed": ours, "max_rel_diff_after_resume": max(after), "pass": ok}  # fmt: skip
    out = REPO / "bench" / "results" / f"{record['date']}-resume-zero3-{record['device'].lower().replace(' ', '-')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
