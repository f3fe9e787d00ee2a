"""The C allocator a training process runs with (`train.cpu_allocator`): the C library's malloc, or tcmalloc or
jemalloc preloaded into it.

PyTorch allocates a CPU tensor's memory with posix_memalign (64-byte alignment). glibc before 2.38 serves each such
request from a free chunk at least 96 bytes larger than the tensor, so the hole a freed tensor leaves does not fit
the next tensor of its size, and the heap grows instead: measured on this project's CPU training (glibc 2.36,
SmolLM2-135M with LoRA), the peak resident memory was 1.5x to 4.8x the tensors' (bench/RESULTS.md), and
`tasks.memory` plans for it. tcmalloc and jemalloc reuse those holes; preloading them takes effect without any
change to PyTorch (the training runs in a child process, `tasks.finetune._launch`).
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import platform
import re
import sys
from pathlib import Path

from edgar_tune.config import ConfigError

SYSTEM = "system"
# library names to look for, in order; tcmalloc_minimal has no heap profiler, which training does not need
LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
INSTALL = {
    "tcmalloc": "`apt install libtcmalloc-minimal4` (Debian, Ubuntu), `dnf install gperftools-libs` (Fedora, RHEL) "
                "or `conda install gperftools`",
    "jemalloc": "`apt install libjemalloc2` (Debian, Ubuntu), `dnf install jemalloc` (Fedora, RHEL) or "
                "`conda install jemalloc`",
}  # fmt: skip
# what the memory plan's refusal and an OOM-killed training's message tell a run that ran the system's malloc
TRY_TCMALLOC = f"train.cpu_allocator=tcmalloc ({INSTALL['tcmalloc']}, where it is not installed)"
_DIRS = ("/usr/local/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
         "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/lib64")  # fmt: skip


def _search_dirs() -> list[Path]:
    """Where to look: LD_LIBRARY_PATH, the environment's own lib/ (conda), then the system's folders."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    dirs += [os.environ["CONDA_PREFIX"] + "/lib"] if os.environ.get("CONDA_PREFIX") else []
    return [Path(d) for d in [*dirs, sys.prefix + "/lib", *_DIRS]]


def find(name: str) -> str | None:
    """The shared library of allocator `name` (tcmalloc or jemalloc) on this machine: a path, or None."""
    for lib in LIBRARIES[name]:
        for folder in _search_dirs():
            found = sorted(folder.glob(f"lib{lib}.so*"))
            if found:
                return str(found[0])
        if soname := _in_loader_cache(lib):
            return soname
    return None


@functools.cache
def _in_loader_cache(lib: str) -> str | None:
    """ldconfig's entry for `lib` (a soname, which LD_PRELOAD takes), looked up once a process (0.1 s: a subprocess)."""
    return ctypes.util.find_library(lib)


def resolve(choice: str, on_gpu: bool) -> tuple[str, str | None]:
    """(allocator, library to preload) for `train.cpu_allocator=choice`. auto: on the CPU, tcmalloc, else jemalloc,
    else the system's malloc; on GPUs (whose memory PyTorch's CUDA allocator manages) the system's.

    Raises:
        ConfigError: tcmalloc or jemalloc asked for and not found (or not Linux, where LD_PRELOAD works).
    """
    if choice == SYSTEM or (choice == "auto" and on_gpu):
        return SYSTEM, None
    linux = platform.system() == "Linux"
    preloaded = _allocator_of(os.environ.get("LD_PRELOAD", ""))
    if preloaded and choice in ("auto", preloaded):  # preloaded by the user already: the training inherits it
        return preloaded, None
    if choice == "auto":
        if linux:
            for name in LIBRARIES:
                if path := find(name):
                    return name, path
        return SYSTEM, None
    if not linux:
        raise ConfigError(f"train.cpu_allocator={choice}: preloading an allocator needs Linux (LD_PRELOAD); set "
                          f"train.cpu_allocator={SYSTEM}")  # fmt: skip
    if path := find(choice):
        return choice, path
    where = ", ".join(str(d) for d in _search_dirs())
    raise ConfigError(f"train.cpu_allocator={choice}: no lib{LIBRARIES[choice][0]}.so found (looked in "
                      f"LD_LIBRARY_PATH, {where} and ldconfig's cache). Install it: {INSTALL[choice]}; or set "
                      f"train.cpu_allocator=auto (tcmalloc or jemalloc where found, else the system's "
                      f"malloc)")  # fmt: skip


def _allocator_of(library: str) -> str | None:
    return next((name for name, libs in LIBRARIES.items() if any(f"lib{lib}.so" in library for lib in libs)), None)


def preload_env(name: str, path: str | None) -> dict[str, str]:
    """The environment a child process needs to run with allocator `name` (`resolve`'s): LD_PRELOAD as it was, less
    any other allocator's library (`system` runs none), with `path` first (None: nothing to add)."""
    before = os.environ.get("LD_PRELOAD")
    kept = [lib for lib in re.split(r"[\s:]+", before or "") if lib and _allocator_of(lib) in (None, name)]
    kept = ([path] if path else []) + kept
    return {"LD_PRELOAD": " ".join(kept)} if kept or before is not None else {}


def in_this_process() -> str:
    """Which allocator this process runs with: tcmalloc or jemalloc when one is mapped into it, else the system's
    (glibc's, with its version)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing can have been preloaded
        maps = ""
    for name, libs in LIBRARIES.items():
        if any(f"/lib{lib}.so" in maps for lib in libs):
            return name
    libc = platform.libc_ver()
    return f"{SYSTEM} ({libc[0]} {libc[1]})" if libc[0] else SYSTEM


def peak_rss_gb() -> float:
    """This process's peak resident memory, in GB (getrusage: kilobytes on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def check(asked: str) -> str:
    """In the training process: that it runs with the allocator the stage resolved (`resolve`), else raise.

    Raises:
        RuntimeError: tcmalloc or jemalloc was to be preloaded and is not in this process, or the system's malloc
            was asked for and another runs (never train under an allocator's name without it).
    """
    running = in_this_process()
    if (asked in LIBRARIES and running != asked) or (asked == SYSTEM and running in LIBRARIES):
        raise RuntimeError(f"train.cpu_allocator={asked} but the training process runs with {running} "
                           f"(LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r})")  # fmt: skip
    return running
