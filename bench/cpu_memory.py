"""Peak resident memory of a training on the CPU against its memory plan, per block length, allocator and
gradient checkpointing.

    python bench/cpu_memory.py --run runs/latest                       # after `make demo`; about 45 min on 2 cores
    LD_LIBRARY_PATH=/path/to/libtcmalloc/folder python bench/cpu_memory.py --run runs/latest --allocators tcmalloc
    python bench/cpu_memory.py --lengths 6144 8192 --allocators system --no-pairs --name cpu-memory-long

Each case copies the run folder, packs it again at the length (`edgar-tune stage tokenize`) and trains 2 steps
(`edgar-tune stage train --set train.max_steps=2`) with the allocator and checkpointing asked for; the peak is the
largest resident set of the stage's processes (the training process's: wait4), the plan the one that stage printed
and kept in its stats (`memory_plan.estimate_gb`). tests/test_memory.py checks the plan against these peaks. A
case the plan refuses is passed over; one that fails (the OOM killer: the plan let through what did not fit) is
recorded with `failed`, and the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cpu_host, write_result  # noqa: E402

CLI = [sys.executable, "-m", "edgar_tune.cli"]


def peak_rss_gb(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run `cmd`; its exit status, the largest resident set of it and its descendants (GB), and its seconds."""
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024 / 1e9, time.monotonic() - start


def measure(work: Path, seq: int, batch: int, allocator: str, checkpointing: bool) -> dict | None:
    case = work / f"{allocator}-{seq}x{batch}-{'ckpt' if checkpointing else 'whole'}"
    shutil.copytree(work / f"packed-{seq}", case)
    # the blocks' length is the tokenize stage's (packed above): train reads it from there, not from a --set
    sets = ["train.max_steps=2", "train.resume=false", "train.profile_step=0",
            f"train.per_device_train_batch_size={batch}", f"train.cpu_allocator={allocator}",
            f"train.gradient_checkpointing={str(checkpointing).lower()}"]  # fmt: skip
    cmd = [*CLI, "stage", "train", "--run", str(case)] + [a for s in sets for a in ("--set", s)]
    code, peak, seconds = peak_rss_gb(cmd, case / "train.log")
    if code and "train.memory_check=warn to run anyway" in (text := (case / "train.log").read_text()):
        print(f"{allocator:<9} {seq:>5}x{batch} {'recomputed' if checkpointing else 'kept':<10} refused: "
              f"{text[text.index('this run needs about'):].splitlines()[0]}", flush=True)  # fmt: skip
        shutil.rmtree(case)
        return None  # the plan says it cannot fit this host's RAM: not run, not recorded
    if code:  # recorded, not the end of the sweep: a run the plan let through that the OOM killer ended is a finding
        tail = "".join(text.splitlines(keepends=True)[-15:])
        print(f"{' '.join(cmd)} failed ({code}); its log ends:\n{tail}", flush=True)
        planned = next((float(line.split()[-6]) for line in text.splitlines() if line.endswith("<- this run")), None)
        shutil.rmtree(case)
        why = next((line for line in text.splitlines() if "the training process was killed" in line), f"exit {code}")
        return {"seq_len": seq, "batch": batch, "allocator": allocator, "gradient_checkpointing": checkpointing,
                "peak_rss_gb": round(peak, 3), "planned_gb": planned, "seconds": round(seconds, 1),
                "failed": why.strip()[:300]}  # fmt: skip
    stats = json.loads((case / "04_train" / "stats.json").read_text())
    plan = stats["memory_plan"]
    row = {"seq_len": seq, "batch": batch, "allocator": stats["cpu_allocator"], "gradient_checkpointing": checkpointing,
           "peak_rss_gb": round(peak, 3), "planned_gb": round(plan["estimate_gb"], 3),
           "plan_over_peak": round(plan["estimate_gb"] / peak, 3), "step_seconds": stats.get("step_seconds"),
           "seconds": round(seconds, 1), "peak_rss_training_gb": round(stats["peak_rss_gb"], 3),
           "trained": {k: stats[k] for k in ("mode", "dtype", "trainable_parameters", "loss_kernel")}}  # fmt: skip
    shutil.rmtree(case)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "latest", help="a finished run folder (make demo's)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--allocators", nargs="+", default=["system", "tcmalloc"])
    ap.add_argument("--layers", nargs="+", choices=["kept", "recomputed"], default=["kept", "recomputed"],
                    help="train with every layer's activations kept, recomputed (gradient checkpointing), or both")
    ap.add_argument("--pairs", action=argparse.BooleanOptionalAction, default=True,
                    help="also train 2 blocks of the first length a step, kept (the same tokens as twice the length)")
    ap.add_argument("--name", default="cpu-memory", help="the results file: bench/results/<date>-<name>-<host>.json")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    if not (args.run / "03_tokenize").is_dir():
        raise SystemExit(f"{args.run} has no tokenize stage: run `make demo` first, or pass --run")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpu-memory-") as tmp:
        work = Path(tmp)
        for seq in args.lengths:
            packed = work / f"packed-{seq}"
            shutil.copytree(args.run, packed, ignore=shutil.ignore_patterns("04_train*", "05_*", "06_*", "mlruns"))
            subprocess.run([*CLI, "stage", "tokenize", "--run", str(packed), "--set",
                            f"tokenize.max_input_length={seq}"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
        layers = [x == "recomputed" for x in args.layers]
        cases = [(seq, 1, a, ckpt) for a in args.allocators for seq in args.lengths for ckpt in layers]
        cases += [(args.lengths[0], 2, a, False) for a in args.allocators if args.pairs]  # the same tokens, 2 blocks
        for seq, batch, allocator, ckpt in cases:
            if (row := measure(work, seq, batch, allocator, ckpt)) is None:
                continue
            rows.append(row)
            outcome = (f"FAILED at {row['peak_rss_gb']:.2f} GB, planned {row['planned_gb']} GB" if "failed" in row else
                       f"peak {row['peak_rss_gb']:6.2f} GB, planned {row['planned_gb']:6.2f} GB "
                       f"({row['plan_over_peak']:.2f}x)")  # fmt: skip
            print(f"{allocator:<9} {seq:>5}x{batch} {'recomputed' if ckpt else 'kept':<10} {outcome}", flush=True)
    import torch

    base = json.loads((args.run / "03_tokenize" / "stats.json").read_text())["base_model"]
    record = {"device": cpu_host(), "torch": torch.__version__, "model": Path(base["path"]).name,
              "run": str(args.run), "rows": rows}  # fmt: skip
    write_result(args.out, args.name, cpu_host(), record)
    print(f"\n{'allocator':<22} {'tokens':>9} {'layers':<11} {'peak GB':>8} {'plan GB':>8} {'plan/peak':>10} "
          f"{'s/step':>7}")  # fmt: skip
    for r in rows:
        ratio = "FAILED" if "failed" in r else f"{r['plan_over_peak']:.2f}"
        print(f"{r['allocator']:<22} {r['seq_len']:>5}x{r['batch']:<3} "
              f"{'recomputed' if r['gradient_checkpointing'] else 'kept':<11} {r['peak_rss_gb']:>8.2f} "
              f"{r['planned_gb'] or 0:>8.2f} {ratio:>10} {r.get('step_seconds') or 0:>7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
