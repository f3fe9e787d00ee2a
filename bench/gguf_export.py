"""GGUF export: edgar-tune's writer against llama.cpp's own converter, on the same model, machine and run.

    python bench/gguf_export.py --llama-cpp DIR [--shape llama-2-7b] [--types q8_0 f16] [--work /tmp/gguf-bench]

The model is saved once as a transformers folder: SmolLM2-135M (the demo's base), or a Llama-2-7B-shaped model with
random weights in bfloat16, as its checkpoint is stored (the speed of a conversion does not depend on the values; it
takes SmolLM2's byte-level BPE tokenizer, 49,152 tokens, for Llama-2's SentencePiece one, which the writer refuses).
Each side runs in a process of its own, from that folder, and its wall time and peak resident memory are read
from the kernel (wait4):

- llama.cpp's `convert_hf_to_gguf.py DIR --outtype TYPE`, from a checkout (DIR/build is not needed; its converter
  imports sentencepiece);
- edgar-tune: loads the folder as `edgar-tune export` holds the merged model, then `tasks.gguf.write_gguf` (the
  time to load is said apart).

The two files are then compared tensor by tensor, to the byte, and the tokenizer's and llama's keys one by one.
Prints a table and writes bench/results/<date>-gguf-export-<shape>-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cpu_host, write_result  # noqa: E402

OURS = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from tasks.gguf import write_gguf
start = time.monotonic()
model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype="auto")
loaded = time.monotonic() - start
info = write_gguf(model, Path({folder!r}), Path({out!r}), {kind!r}, {{"name": "bench"}})
print(json.dumps({{"load_s": loaded, "write_s": time.monotonic() - start - loaded, **info}}))
"""


def make_model(shape: str, folder: Path) -> str:
    """Save the model of `shape` into `folder` (once); returns what it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from tasks.models import smollm2_dir

    if (folder / "config.json").is_file():
        return shape
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    if shape == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir())
    else:  # Llama-2-7B's shape (bf16), SmolLM2's vocabulary
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             dtype="bfloat16")  # fmt: skip
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model = model.to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return shape


# Runs a command as its child and says the child's peak RSS: the kernel's figure for a process spawned by this one
# would start from this process's own (exec keeps the high-water mark of the memory it replaces), which holds the
# GGUF files it compared, or the 7B it built.
LAUNCH = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execvp(sys.argv[1], sys.argv[1:])\n"
          "_, status, usage = os.wait4(pid, 0)\nprint(f'maxrss_kb={usage.ru_maxrss}', file=sys.stderr)\n"
          "sys.exit(os.waitstatus_to_exitcode(status))")  # fmt: skip


def measured(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run `command`; its wall seconds, its peak resident GB (the kernel's, from a small launcher), its stdout."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", LAUNCH, *command], stdout=out, stderr=err, env=env)
        wall = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        said = err.read()
        if proc.returncode:
            raise SystemExit(f"{' '.join(command[:3])} failed ({proc.returncode}):\n{said[-3000:]}")
        return wall, int(said.rsplit("maxrss_kb=", 1)[1].split()[0]) / 2**20, out.read()


def same_files(ours: Path, theirs: Path) -> dict:
    """Tensors differing (type, shape or bytes) and keys differing (tokenizer.*, llama.*) between two GGUF files."""
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    mine, its = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    tensors = sorted(mine.keys() ^ its.keys()) + [
        n for n in mine.keys() & its.keys()
        if (mine[n].tensor_type, list(mine[n].shape)) != (its[n].tensor_type, list(its[n].shape))
        or not np.array_equal(np.asarray(mine[n].data).view(np.uint8), np.asarray(its[n].data).view(np.uint8))]
    keys = [k for k in b.fields if k.startswith(("tokenizer.", "llama."))
            and (k not in a.fields or a.fields[k].contents() != b.fields[k].contents())]  # fmt: skip
    return {"tensors_compared": len(its), "tensors_differing": tensors, "keys_differing": keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", required=True, type=Path, help="a llama.cpp checkout (convert_hf_to_gguf.py)")
    parser.add_argument("--shape", default="llama-2-7b", choices=["llama-2-7b", "smollm2-135m"])
    parser.add_argument("--types", nargs="+", default=["q8_0"], choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-bench"), help="room for the model and files")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    folder = args.work / args.shape
    start = time.monotonic()
    make_model(args.shape, folder)
    print(f"{args.shape} saved in {folder} ({time.monotonic() - start:.0f} s)", flush=True)
    path = os.pathsep.join([str(args.llama_cpp / "gguf-py"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    commit = subprocess.run(["git", "-C", str(args.llama_cpp), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"  # fmt: skip
    rows = []
    for kind in args.types:
        theirs = args.work / f"llama-cpp-{args.shape}-{kind}.gguf"
        ours = args.work / f"ours-{args.shape}-{kind}.gguf"
        t_wall, t_peak, _ = measured([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(folder),
                                      "--outtype", kind, "--outfile", str(theirs)], env)  # fmt: skip
        o_wall, o_peak, said = measured([sys.executable, "-c", OURS.format(repo=str(REPO), folder=str(folder),
                                                                           out=str(ours), kind=kind)])  # fmt: skip
        info = json.loads(said.strip().splitlines()[-1])
        check = same_files(ours, theirs)
        rows.append({"shape": args.shape, "type": kind, "file_gb": ours.stat().st_size / 1e9,
                     "llama_cpp": {"wall_s": t_wall, "peak_rss_gb": t_peak},
                     "ours": {"wall_s": o_wall, "load_s": info["load_s"], "write_s": info["write_s"],
                              "peak_rss_gb": o_peak}, **check})  # fmt: skip
        print(f"{kind}: llama.cpp {t_wall:.0f} s, {t_peak:.1f} GB; ours {o_wall:.0f} s (load {info['load_s']:.0f} s, "
              f"write {info['write_s']:.0f} s), {o_peak:.1f} GB; tensors differing {len(check['tensors_differing'])} "
              f"of {check['tensors_compared']}, keys differing {check['keys_differing']}", flush=True)  # fmt: skip
        theirs.unlink()
        ours.unlink()
    print(f"\n{'shape':<14}{'type':<6}{'file GB':>8}{'llama.cpp s':>12}{'GB':>6}{'ours s':>8}{'write s':>8}{'GB':>6}"
          f"{'ratio':>7}  same bytes")  # fmt: skip
    for r in rows:
        print(f"{r['shape']:<14}{r['type']:<6}{r['file_gb']:>8.2f}{r['llama_cpp']['wall_s']:>12.0f}"
              f"{r['llama_cpp']['peak_rss_gb']:>6.1f}{r['ours']['wall_s']:>8.0f}{r['ours']['write_s']:>8.0f}"
              f"{r['ours']['peak_rss_gb']:>6.1f}{r['llama_cpp']['wall_s'] / r['ours']['wall_s']:>6.2f}x  "
              f"{not r['tensors_differing'] and not r['keys_differing']}")  # fmt: skip
    record = {"device": f"{platform.machine()} {os.cpu_count()} cpu", "llama_cpp_commit": commit, "rows": rows}
    write_result(args.out, f"gguf-export-{args.shape}", cpu_host(), record)


if __name__ == "__main__":
    main()
