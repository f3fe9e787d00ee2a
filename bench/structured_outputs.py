"""What `response_format` (a JSON schema, kept to step by step with llguidance) costs a generation step, and what it
gives: greedy answers of SmolLM2-135M to MD&A-like prompts ending "As JSON:", with and without a schema, same
model, machine and run; and what `tool_choice` "auto" costs an answer that is text (its lazy grammar asked every
step whether a call begins: what every chat request with tools pays).

    python bench/structured_outputs.py [--rows 1 8] [--tokens 48] [--device cpu]

For each batch size in `--rows`, generates the prompts (cycled) together, without a format, with the schema below,
and with the grammar of "auto" for a tool of that schema written as Hermes' `<tool_call>` tags (`TOOLS`), twice
each, alternated (the machine's pace drifts): the wall time per step (a batch's steps are its
longest answer's tokens), the time the mask itself took per step (`_Rows._form`: llguidance's next-token bitmask
for each row, unpacked and applied), and how many answers parse as JSON of the schema. A formatted answer ends once
its JSON is whole, so the two runs' step counts differ: per step is what compares.

Prints a table and writes bench/results/<date>-structured-outputs-<host>.json.
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

PROMPTS = [
    "Net sales increased 12% to $574.8 billion in 2023, compared with $514.0 billion in 2022. North America "
    "segment sales increased 12%. As JSON:",
    "Operating income was $36.9 billion in 2023, up from $12.2 billion in 2022, led by the AWS segment. As JSON:",
    "International segment sales increased 11% to $131.2 billion, while AWS sales grew 13%. As JSON:",
    "Free cash flow improved to $36.8 billion for the trailing twelve months. As JSON:",
]
SCHEMA = {"type": "object", "properties": {
    "segment": {"enum": ["North America", "International", "AWS", "Consolidated"]},
    "metric": {"type": "string", "maxLength": 40}, "billions": {"type": "number"}, "grew": {"type": "boolean"}},
    "required": ["segment", "metric", "billions", "grew"], "additionalProperties": False}  # fmt: skip
# a chat template that writes calls as Hermes' and Qwen's do (`edgar_tune.serve.CallForm` reads them from it)
TOOLS = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.tool_calls or [] %}<tool_call>\n"
         "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}"
         "{{ m.content or '' }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def valid(text: str) -> bool:
    try:
        said = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(said, dict) and set(said) == set(SCHEMA["required"]) and said["segment"] in SCHEMA[
        "properties"]["segment"]["enum"]  # fmt: skip


def generate(lm, tok, rows: int, tokens: int, fmt: dict | None, device: str) -> dict:
    import torch

    from tasks import batching
    from tasks.batching import Answer
    from tasks.registry import generation_settings

    masked = [0.0]
    form = batching._Rows._form

    def timed(self, scores):
        start = time.perf_counter()
        form(self, scores)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        masked[0] += time.perf_counter() - start

    settings = generation_settings({"max_new_tokens": tokens, "response_format": fmt})
    asked = [Answer(tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt").to(device), settings, 0, None)
             for i in range(rows)]  # fmt: skip
    batching._Rows._form = timed
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            lm.generate_batch(asked)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        batching._Rows._form = form
    steps = max(len(a.tokens) for a in asked)
    return {"seconds": seconds, "steps": steps, "ms_per_step": seconds / steps * 1e3,
            "mask_ms_per_step": masked[0] / steps * 1e3, "valid": sum(valid(a.choice["text"]) for a in asked),
            "texts": [a.choice["text"] for a in asked]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from edgar_tune.serve import CallForm, ToolCall
    from tasks.batching import Generating
    from tasks.models import load_tokenizer, smollm2_dir

    tok = load_tokenizer(str(smollm2_dir()))
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype).to(args.device).eval()
    lm = Generating(model, tok)
    fmt = {"type": "json_schema", "json_schema": {"name": "figure", "schema": SCHEMA}}
    tok.chat_template, plain_template = TOOLS, tok.chat_template
    form = CallForm.of(tok, None)
    tok.chat_template = plain_template
    auto = ToolCall([{"type": "function", "function": {"name": "figure", "parameters": SCHEMA}}], None, False,
                    form).format  # fmt: skip
    generate(lm, tok, 1, 4, fmt, args.device)  # warm: the tokenizer read for llguidance, the first steps
    results = []
    print(f"{'rows':>4} {'plain ms/step':>14} {'schema ms/step':>15} {'ratio':>6} {'mask ms/step':>13} "
          f"{'valid plain':>12} {'valid schema':>13} {'auto ms/step':>13} {'ratio':>6} {'mask':>5} "
          f"{'calls':>6}")  # fmt: skip
    for rows in args.rows:
        runs = {"plain": [], "schema": [], "auto": []}
        for _ in range(2):
            runs["plain"].append(generate(lm, tok, rows, args.tokens, None, args.device))
            runs["schema"].append(generate(lm, tok, rows, args.tokens, fmt, args.device))
            runs["auto"].append(generate(lm, tok, rows, args.tokens, auto, args.device))
        best = {k: min(v, key=lambda r: r["ms_per_step"]) for k, v in runs.items()}
        calls = sum(form.trigger in t for t in best["auto"]["texts"])
        row = {"rows": rows, "tokens": args.tokens, **runs, "calls": calls,
               "ratio": best["schema"]["ms_per_step"] / best["plain"]["ms_per_step"],
               "auto_ratio": best["auto"]["ms_per_step"] / best["plain"]["ms_per_step"]}  # fmt: skip
        results.append(row)
        print(f"{rows:>4} {best['plain']['ms_per_step']:>14.1f} {best['schema']['ms_per_step']:>15.1f} "
              f"{row['ratio']:>5.2f}x {best['schema']['mask_ms_per_step']:>13.2f} "
              f"{best['plain']['valid']:>6}/{rows:<5} {best['schema']['valid']:>7}/{rows:<5} "
              f"{best['auto']['ms_per_step']:>13.1f} {row['auto_ratio']:>5.2f}x "
              f"{best['auto']['mask_ms_per_step']:>5.2f} {calls:>3}/{rows:<2}")  # fmt: skip
    print(f"\na formatted answer, 1 row: {results[0]['schema'][0]['texts'][0]!r}")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_host()
    record = {"device": device, "host": platform.node(), "model": "smollm2-135m", "schema": SCHEMA,
              "tools_grammar": auto["grammar"], "results": results}  # fmt: skip
    write_result(args.out, "structured-outputs", device, record)


if __name__ == "__main__":
    main()
