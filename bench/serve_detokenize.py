"""Reading a generated answer's text as it grows: decoded a token at a time (tokenizers' DecodeStream, as the
batching engine does since 2026-12-05) against decoded whole at every step (as it did before), same tokenizer,
machine and run.

    python bench/serve_detokenize.py [--run runs/latest] [--lengths 256 1024 4096] [--rows 32]
                                     [--generate 8 512]

A streamed answer, or one with `stop` texts, has its text read at every step (`Generation.said`), for every row of
the batch. Part one times that reading alone, on SmolLM2's tokenizer and the token ids of the run's held-out MD&A
cut to each of `--lengths`: the host's time per step at the answer's last token for `--rows` such rows (what a
GPU's step waits on), and over a whole answer. Part two generates `--generate ROWS TOKENS` greedy streamed
answers with the run's model (SmolLM2 on the CPU here, whose step dwarfs the decoding) both ways, and checks the
text heard is the same.

Prints a table and writes bench/results/<date>-serve-detokenize-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cpu_host, write_result  # noqa: E402


def reading(tok, ids: list[int], whole: bool) -> list[float]:
    """Seconds to read the text after each token of `ids`, as `Generation.said` reads it."""
    from tasks.batching import Answer, Generating

    tok.decoded_whole = whole
    lm, a, took = Generating(None, tok), Answer(ids=None, settings={}, seed=0, closing=None), []
    for token in ids:
        a.tokens.append(token)
        start = time.perf_counter()
        lm.said(a)
        took.append(time.perf_counter() - start)
    return took


def generating(model, tok, prompts: list[str], tokens: int, whole: bool) -> tuple[float, list[list[str]]]:
    """Wall seconds to generate `tokens` greedy tokens after each of `prompts` together, their pieces heard as a
    stream hears them; and the pieces."""
    import torch

    from tasks.batching import Answer, Generating

    tok.decoded_whole = whole
    heard = [[] for _ in prompts]
    settings = {"do_sample": False, "max_new_tokens": tokens, "stop": [], "seed": 0}
    asked = [Answer({"input_ids": tok(p, return_tensors="pt")["input_ids"]}, settings, 0, None,
                    heard=lambda text, choice, i=i: text is not None and heard[i].append(text))
             for i, p in enumerate(prompts)]  # fmt: skip
    start = time.perf_counter()
    with torch.inference_mode():
        Generating(model, tok).generate_batch(asked)
    return time.perf_counter() - start, heard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "latest", help="a run of SmolLM2 (`make demo`)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--generate", type=int, nargs=2, default=[8, 512], metavar=("ROWS", "TOKENS"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    from tasks.models import load_tokenizer, smollm2_dir

    val = args.run / "02_parse" / "val.jsonl"
    if not val.is_file():
        raise SystemExit(f"no held-out text at {val}: give --run a run folder (`make demo` makes runs/latest)")
    texts = [json.loads(line)["text"] for line in val.open()]
    tok = load_tokenizer(str(smollm2_dir()))
    ids = tok("\n".join(texts), add_special_tokens=False)["input_ids"]
    if len(ids) < max(args.lengths):
        raise SystemExit(f"{val} holds {len(ids)} tokens, fewer than --lengths {max(args.lengths)}")

    rows = []
    print(f"{'tokens':>7} {'whole: ms/step at end':>22} {'stream':>8} {'ratio':>7}   {'whole: ms/answer':>17} "
          f"{'stream':>8} {'ratio':>7}")  # fmt: skip
    for n in args.lengths:
        whole, stream = reading(tok, ids[:n], True), reading(tok, ids[:n], False)
        end_whole = sum(whole[-16:]) / 16 * args.rows * 1e3  # the last 16 steps' mean, times the rows
        end_stream = sum(stream[-16:]) / 16 * args.rows * 1e3
        row = {"tokens": n, "rows": args.rows, "whole_ms_per_step_at_end": end_whole,
               "stream_ms_per_step_at_end": end_stream, "whole_ms_per_answer": sum(whole) * 1e3,
               "stream_ms_per_answer": sum(stream) * 1e3}  # fmt: skip
        rows.append(row)
        print(f"{n:>7} {end_whole:>22.2f} {end_stream:>8.3f} {end_whole / end_stream:>6.0f}x   "
              f"{row['whole_ms_per_answer']:>17.1f} {row['stream_ms_per_answer']:>8.2f} "
              f"{row['whole_ms_per_answer'] / row['stream_ms_per_answer']:>6.0f}x")  # fmt: skip

    from transformers import AutoModelForCausalLM

    count, tokens = args.generate
    model_dir = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [" ".join(t.split()[:40]) for t in (p for text in texts for p in text.split("\n") if len(p.split()) > 40)]
    prompts = prompts[:count]
    generating(model, tok, prompts[:1], 4, False)  # warm
    runs = {}
    for whole in (True, False, True, False):  # alternated: the machine's pace drifts
        seconds, heard = generating(model, tok, prompts, tokens, whole)
        runs.setdefault("whole" if whole else "stream", []).append((seconds, heard))
    texts_heard = {k: ["".join(pieces) for pieces in v[0][1]] for k, v in runs.items()}
    same = texts_heard["whole"] == texts_heard["stream"] and all(
        ["".join(p) for p in h] == texts_heard["whole"] for _, h in runs["whole"] + runs["stream"])
    best = {k: min(s for s, _ in v) for k, v in runs.items()}
    spread = {k: f"{min(s for s, _ in v):.1f} to {max(s for s, _ in v):.1f} s" for k, v in runs.items()}
    print(f"\ngenerating {count} streamed answers of {tokens} tokens together ({model_dir.name}, CPU): whole "
          f"{spread['whole']}, stream {spread['stream']} (best {best['whole'] / best['stream']:.3f}x; a step of the "
          f"model here, {best['stream'] / tokens * 1e3:.0f} ms, dwarfs it), the same text heard: {same}")  # fmt: skip
    record = {"device": cpu_host(), "host": platform.node(), "tokenizer": "smollm2-135m", "reading": rows,
              "generating": {"rows": count, "tokens": tokens, "whole_s": [s for s, _ in runs["whole"]],
                             "stream_s": [s for s, _ in runs["stream"]], "same_text": same,
                             "speedup": best["whole"] / best["stream"]}}  # fmt: skip
    write_result(args.out, "serve-detokenize", cpu_host(), record)


if __name__ == "__main__":
    main()
