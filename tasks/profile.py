"""One optimizer step under torch.profiler (`train.profile_step`): where a step's time goes.

Tokens/s says how fast a run is, not why. The profiled step leaves, in the train stage's `profile/`, a Chrome
trace (open it in https://ui.perfetto.dev) and `summary.json`: the step's wall time, how much of it the GPU was
busy (the union of its kernels' intervals: the rest is launch overhead, data loading, synchronization), the kernel
launches, and the ops that took the most time. The register stage logs the folder to MLflow; the log shows the
summary as a table.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import time
from pathlib import Path

import torch

from tasks.io import atomic_write_json

log = logging.getLogger(__name__)

TOP = 15  # ops in the summary
# What a GPU's kernels do, by their names (first match wins; lower case): cuBLAS's (sm90_xmma_gemm_..., nvjet_...),
# CUTLASS's (the FP8 row-scaled matmul, cutlass::gemm::...) and inductor's matmul templates (triton_tem_...); the
# flash and memory-efficient attention kernels (pytorch_flash::flash_fwd_kernel, fmha_cutlassF_...), named before
# matmuls because some are CUTLASS kernels too; the loss's softmax over the vocabulary (PyTorch's, on materialized
# logits, or the fused loss's Triton kernel on each chunk's); copies and fills. The rest: elementwise, reductions,
# norms and the other Triton kernels.
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "attn")),
                ("loss", ("softmax", "nll_loss", "cross_entropy", "_ce_rows")),
                ("matmul", ("gemm", "gemv", "xmma", "nvjet", "cublas", "triton_tem", "scaled_mm", "f8f8")),
                ("memory", ("memcpy", "memset")))  # fmt: skip


def sync() -> None:
    """Wait for the GPU's queued work, if there is a GPU: step timers and the profiler time whole steps."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals in microseconds, in seconds: kernels on several streams
    may overlap, and an idle device is the time none runs."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e6


def kernel_kind(name: str) -> str:
    """`KERNEL_KINDS`' name for a GPU kernel's, or "other"."""
    low = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in low for m in marks)), "other")


def by_kind(kernels: list[tuple[str, float]]) -> dict[str, float]:
    """Milliseconds of kernel time by kind, from (name, microseconds) pairs. Kernels on several streams may
    overlap, so the kinds can add up to more than the device's busy time."""
    out = dict.fromkeys([kind for kind, _ in KERNEL_KINDS] + ["other"], 0.0)
    for name, us in kernels:
        out[kernel_kind(name)] += us / 1e3
    return out


def summarize(prof: torch.profiler.profile, wall: float) -> dict:
    """The profiled step in numbers: wall and device-busy seconds, kernel launches, the device's time by kind of
    kernel with the idle rest, and the TOP kernels by device time (on the CPU, where there are none: the TOP ops by
    self CPU time). Kernels only, not the PyTorch ops that launched them as well, which would count each
    millisecond twice."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = busy_seconds([(e.time_range.start, e.time_range.end) for e in kernels]) if kernels else None
    if kernels:
        ops = [a for a in prof.key_averages() if a.device_type == DeviceType.CUDA]
        ops = sorted(ops, key=lambda a: a.self_device_time_total, reverse=True)[:TOP]
        top = [{"op": a.key[:120], "calls": a.count, "self_ms": a.self_device_time_total / 1e3} for a in ops]
    else:
        ops = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:TOP]
        top = [{"op": a.key[:120], "calls": a.count, "self_ms": a.self_cpu_time_total / 1e3} for a in ops]
    kinds = by_kind([(e.name, e.time_range.end - e.time_range.start) for e in kernels]) if kernels else None
    return {
        "wall_s": wall,
        "device_busy_s": busy,
        "device_busy_share": busy / wall if busy is not None else None,
        "kernel_launches": len(kernels),
        # and `idle`: the wall time no kernel ran (launch gaps, the host's work, waits)
        "device_ms": kinds | {"idle": (wall - busy) * 1e3} if kinds else None,
        "top_by": "device time (kernels)" if kernels else "self CPU time",
        "top": top,
    }


def kinds_line(summary: dict) -> str:
    """"matmul 61%, attention 9%, ..., idle 12%" of the profiled step's wall time, or "" without a GPU."""
    ms = summary.get("device_ms")
    if not ms:
        return ""
    return ", ".join(f"{kind} {v / (summary['wall_s'] * 1e3):.0%}" for kind, v in ms.items())


def table(summary: dict) -> str:
    busy = ""
    if summary["device_busy_s"] is not None:
        busy = (f", the GPU busy {summary['device_busy_s']:.3f} s ({summary['device_busy_share']:.0%}) over "
                f"{summary['kernel_launches']} kernel launches ({kinds_line(summary)})")  # fmt: skip
    lines = [f"profiled step: {summary['wall_s']:.3f} s{busy}; top {'kernels' if busy else 'ops'} by "
             f"{summary['top_by']}:", f"  {'self ms':>9} {'calls':>7}  op"]  # fmt: skip
    lines += [f"  {t['self_ms']:>9.2f} {t['calls']:>7}  {t['op']}" for t in summary["top"]]
    return "\n".join(lines)


def step_profiler(step: int, out: Path):
    """A Trainer callback that profiles optimizer step `step` (1-based) on rank 0 and writes `out/trace.json.gz`
    and `out/summary.json` (each whole or not at all). The step's time counts in tokens/s like any other: the
    steady-state median leaves one slow step out."""
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self) -> None:
            self.summary: dict | None = None
            self._prof = None
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 != step or not state.is_world_process_zero or self._prof is not None:
                return
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            sync()
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._prof is None:
                return
            sync()
            wall = time.perf_counter() - self._start
            prof, self._prof = self._prof, None
            prof.__exit__(None, None, None)
            self.summary = summarize(prof, wall) | {"step": step}
            out.mkdir(parents=True, exist_ok=True)
            raw, gz = out / ".trace.json", out / ".trace.json.gz.tmp"
            prof.export_chrome_trace(str(raw))
            with raw.open("rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
            gz.replace(out / "trace.json.gz")
            atomic_write_json(out / "summary.json", self.summary)
            log.info("%s\n(trace: %s; open it in https://ui.perfetto.dev)", table(self.summary), out / "trace.json.gz")

    return StepProfiler()
