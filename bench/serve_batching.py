"""Serving requests that come together: `edgar-tune serve` batching them (`--max-batch 8`, the default) against
one generation at a time (`--max-batch 1`, as it served before 2026-12-05), same version, machine and run.

    python bench/serve_batching.py [--model runs/latest] [--clients 1 4 8] [--requests 16] [--max-tokens 64]

Each setting gets its own server (`edgar-tune serve --model M --max-batch B`, a process of its own). `--clients`
threads then send the same `--requests` greedy `POST /v1/completions` between them, each a request at a time:
prompts cut from the held-out MD&A of the run (the first words of its paragraphs, of 8 to 60 words), asking for a
quarter, half, three quarters or all of `--max-tokens` in turn (answers of different lengths). Throughput is
the completion tokens of all requests over the wall time from the first sent to the last answered; latency is each
request's, sent to answered. "same answers" counts the answers equal to the one-at-a-time server's for the same
prompt (greedy: equal, up to float rounding where two tokens are almost tied).

Prints a table and writes bench/results/<date>-serve-batching-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cpu_host, write_result  # noqa: E402
from tests.conftest import free_port, wait_http  # noqa: E402


def prompts_of(run: Path, count: int) -> list[str]:
    """`count` prompts: the first 8 to 60 words of the held-out MD&A's paragraphs, in order."""
    val = run / "02_parse" / "val.jsonl"
    if not val.is_file():
        raise SystemExit(f"no held-out text at {val}: give --prompts-from a run folder (`make demo` makes runs/latest)")
    said = []
    for line in val.open():
        for para in json.loads(line)["text"].split("\n"):
            words = para.split()
            if len(words) >= 8:
                said.append(" ".join(words[: 8 + len(said) * 13 % 53]))
            if len(said) == count:
                return said
    raise SystemExit(f"{val} has {len(said)} paragraphs of 8 words or more, fewer than --requests {count}")


def serve(model: str, max_batch: int, log: Path, *more: str) -> tuple[subprocess.Popen, str]:
    """`edgar-tune serve --model MODEL --max-batch MAX_BATCH MORE...` on loopback, its output in `log`."""
    port = free_port()
    cmd = [str(REPO / ".venv/bin/edgar-tune"), "serve", "--model", model, "--port", str(port),
           "--max-batch", str(max_batch), "--check-every", "0", *more]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=300, proc=proc)
    return proc, url


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=900) as answer:
        return json.load(answer)


def load(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """Sends every prompt once, from `clients` threads taking the next prompt as each is answered."""
    todo, lock, said = iter(enumerate(prompts)), threading.Lock(), {}

    def client() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            i, prompt = item
            sent = time.monotonic()
            asked = max(1, max_tokens * (1 + i % 4) // 4)
            got = post(url, {"prompt": prompt, "max_tokens": asked, "temperature": 0})
            said[i] = (got["choices"][0]["text"], got["usage"]["completion_tokens"], time.monotonic() - sent)

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    latency = sorted(s[2] for s in said.values())
    tokens = sum(s[1] for s in said.values())
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "latency_p50_s": statistics.median(latency), "latency_p90_s": latency[int(0.9 * (len(latency) - 1))],
            "texts": [said[i][0] for i in range(len(prompts))]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/latest", help="what `edgar-tune serve --model` takes (default "
                    "runs/latest: the version the last run registered)")  # fmt: skip
    ap.add_argument("--prompts-from", type=Path, default=REPO / "runs/latest", help="a run folder (its held-out MD&A)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="--max-batch values; the first is the "
                    "baseline (default 1 8)")  # fmt: skip
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = ap.parse_args()
    prompts = prompts_of(args.prompts_from, args.requests)
    rows, logs = [], Path(os.environ.get("TMPDIR", "/tmp"))
    for batch in args.batches:
        proc, url = serve(args.model, batch, logs / f"serve-batch{batch}.log")
        try:
            post(url, {"prompt": prompts[0], "max_tokens": 2})  # warm-up
            for clients in args.clients:
                rows.append({"max_batch": batch, "clients": clients, **load(url, prompts, clients, args.max_tokens)})
                print(f"max-batch {batch}, {clients} client(s): {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    base = {r["clients"]: r for r in rows if r["max_batch"] == args.batches[0]}
    print(f"\n{args.requests} requests of {args.max_tokens // 4} to {args.max_tokens} tokens, greedy, {args.model}, "
          f"{platform.machine()} {os.cpu_count()} CPU(s)\n")
    print("| clients | --max-batch | tokens | wall s | tokens/s | vs one at a time | p50 s | p90 s | same answers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[r["clients"]]
        r["vs_baseline"] = r["tokens_per_s"] / b["tokens_per_s"]
        r["same_answers"] = sum(x == y for x, y in zip(r["texts"], b["texts"], strict=True))
        print(f"| {r['clients']} | {r['max_batch']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | "
              f"**{r['vs_baseline']:.2f}x** | {r['latency_p50_s']:.2f} | {r['latency_p90_s']:.2f} | "
              f"{r['same_answers']}/{len(prompts)} |")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_host()
    from tasks.registry import git_commit

    write_result(args.out, "serve-batching", device, {
        "device": device, "torch": torch.__version__, "commit": git_commit(), "model": args.model,
        "requests": args.requests,
        "max_tokens": args.max_tokens, "rows": rows, "command": " ".join(sys.argv)})  # fmt: skip


if __name__ == "__main__":
    main()
