"""lm-evaluation-harness against `edgar-tune serve`: a served version scored by the harness finance teams already
run, through OpenAI's /v1/completions (`logprobs`, `echo`, prompts of token ids) and vLLM's /tokenize, as the
harness's `local-completions` model reads vLLM's or OpenAI's servers.

    python bench/lm_eval_served.py [--model runs/latest] [--run runs/latest] [--lm-eval PATH] [--concurrent 4]

Two tasks made from the run's own filings (nothing from a hub):
- `edgar_mdna`: the held-out MD&A's rolling log-likelihood (`loglikelihood_rolling`, as the harness scores
  wikitext), windows of the evaluate stage's `max_length`: its bits per byte beside the evaluate stage's, from
  that stage's own sum of negative log-likelihoods over the same documents.
- `edgar_items`: which Item of the 10-K a passage of the training text comes from (multiple choice over the Items'
  titles, three passages from each Item of each filing): accuracy, and against the chance of a guess.

Each task runs against a server that keeps no prompt's keys and values (`--prefix-cache-tokens 0`), the baseline,
then against one that keeps 4,096 tokens' (the default): lm-eval's wall time, each, and whether the figures agree.

lm-eval is not one of edgar-tune's dependencies: install it anywhere (`python -m venv /tmp/lm-eval &&
/tmp/lm-eval/bin/pip install "lm-eval[api]"`) and name its command with --lm-eval. Prints a table and writes
bench/results/<date>-lm-eval-served-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cpu_host, write_result  # noqa: E402
from bench.serve_batching import serve  # noqa: E402

PASSAGE_CHARS = 400  # of each passage, cut at words
QUESTION = "\nThe passage above is from the 10-K section titled:"


def tasks(run: Path, into: Path) -> dict:
    """Writes the two tasks' data and YAML into `into`; what they hold."""
    from tasks.datareport import ITEM_TITLES

    val = [json.loads(line) for line in (run / "02_parse" / "val.jsonl").open()]
    train = [json.loads(line) for line in (run / "02_parse" / "train.jsonl").open()]
    (into / "mdna.jsonl").write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in val))
    titles = sorted({d["item"] for d in train}, key=list(ITEM_TITLES).index)
    choices = [ITEM_TITLES[i].split(";")[0] for i in titles]
    questions = []
    for d in train:
        words = d["text"].split()
        for at in (0.25, 0.5, 0.75):
            passage, n = [], int(len(words) * at)
            while n < len(words) and len(" ".join(passage)) < PASSAGE_CHARS:
                passage.append(words[n])
                n += 1
            questions.append({"passage": " ".join(passage), "choices": choices, "answer": titles.index(d["item"])})
    (into / "items.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    common = "dataset_path: json\ntest_split: test\n"
    (into / "edgar_mdna.yaml").write_text(
        f"task: edgar_mdna\n{common}dataset_kwargs:\n  data_files:\n    test: {into / 'mdna.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (into / "edgar_items.yaml").write_text(
        f"task: edgar_items\n{common}dataset_kwargs:\n  data_files:\n    test: {into / 'items.jsonl'}\n"
        f"output_type: multiple_choice\ndoc_to_text: {json.dumps('{{passage}}' + QUESTION)}\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return {"mdna_documents": len(val), "mdna_bytes": sum(len(d["text"].encode()) for d in val),
            "items": titles, "questions": len(questions)}


def harness(args: argparse.Namespace, work: Path, max_length: int, prefix_tokens: int) -> dict:
    """Each task run by lm-eval against a server of its own keeping `prefix_tokens` (`--prefix-cache-tokens`):
    the served model's name, each task's results and lm-eval's wall time."""
    proc, url = serve(args.model, 8, work / f"serve-{prefix_tokens}.log", "--prefix-cache-tokens", str(prefix_tokens))
    said = {"prefix_cache_tokens": prefix_tokens, "results": {}, "seconds": {}}
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as listed:
            said["name"] = json.load(listed)["data"][0]["id"]
        for task in ("edgar_mdna", "edgar_items"):
            out = work / f"out-{prefix_tokens}-{task}"
            cmd = [args.lm_eval, "run", "--model", "local-completions", "--tasks", task, "--include_path", str(work),
                   "--output_path", str(out), "--model_args",
                   f"model={said['name']},base_url={url}/v1/completions,num_concurrent={args.concurrent},"
                   f"max_length={max_length},tokenized_requests=True,max_retries=1"]  # fmt: skip
            start = time.monotonic()
            subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
            said["seconds"][task] = time.monotonic() - start
            found = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
            results = json.loads(found.read_text())
            said["results"][task], said["lm_eval"] = results["results"][task], results.get("lm_eval_version")
    finally:
        proc.terminate()
        proc.wait(30)
    return said


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/latest", help="what `edgar-tune serve --model` takes (default "
                    "runs/latest: the version the last run registered)")  # fmt: skip
    ap.add_argument("--run", type=Path, default=REPO / "runs/latest", help="the run folder whose filings make the "
                    "tasks, and whose evaluate stage the MD&A's score is set beside")  # fmt: skip
    ap.add_argument("--lm-eval", default=shutil.which("lm-eval") or "lm-eval", help="lm-eval's command")
    ap.add_argument("--concurrent", type=int, default=4, help="requests the harness keeps in flight (the server "
                    "batches them)")  # fmt: skip
    ap.add_argument("--prefix-cache-tokens", type=int, nargs="+", default=[0, 4096], help="the servers' "
                    "--prefix-cache-tokens, one run each; the first is the baseline (default 0 4096)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = ap.parse_args()
    evaluated = json.loads((args.run / "05_evaluate" / "finetuned.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="lm-eval-served-"))
    held = tasks(args.run, work)
    runs = [harness(args, work, evaluated["max_length"], n) for n in args.prefix_cache_tokens]
    ours = evaluated["nll"] / math.log(2) / held["mdna_bytes"]
    last, base = runs[-1], runs[0]
    mdna, items = last["results"]["edgar_mdna"], last["results"]["edgar_items"]
    served = mdna["bits_per_byte,none"]
    chance = 1 / len(held["items"])
    print(f"\nlm-eval {last['lm_eval']} against `edgar-tune serve --model {args.model}` ({last['name']}), "
          f"{args.concurrent} requests at once\n")
    print("| task | what | lm-eval through the server | beside it |")
    print("|---|---|---|---|")
    print(f"| edgar_mdna ({held['mdna_documents']} held-out MD&A, windows of {evaluated['max_length']}) | bits per "
          f"byte | {served:.4f} | evaluate stage {ours:.4f} ({served / ours - 1:+.2%}) |")
    print(f"| edgar_mdna | word perplexity | {mdna['word_perplexity,none']:.2f} | |")
    print(f"| edgar_mdna | byte perplexity | {mdna['byte_perplexity,none']:.4f} | |")
    print(f"| edgar_items ({held['questions']} passages, {len(held['items'])} Items) | accuracy | "
          f"{items['acc,none']:.3f} ± {items['acc_stderr,none']:.3f} | a guess {chance:.3f} |")
    print(f"| edgar_items | accuracy, length-normalized | {items['acc_norm,none']:.3f} | |")
    print("\n| task | --prefix-cache-tokens | lm-eval's wall s | vs the first | same figures |")
    print("|---|---|---|---|---|")
    for run in runs:
        for task in ("edgar_mdna", "edgar_items"):
            figures = lambda said: {k: round(v, 4) for k, v in said.items() if isinstance(v, float)}  # noqa: E731
            same = figures(run["results"][task]) == figures(base["results"][task])  # to the 4th decimal
            print(f"| {task} | {run['prefix_cache_tokens']} | {run['seconds'][task]:.0f} | "
                  f"**{base['seconds'][task] / run['seconds'][task]:.2f}x** | {'yes' if same else 'no'} |")
    write_result(args.out, "lm-eval-served", cpu_host(), {
        "device": cpu_host(), "model": args.model, "served_as": last["name"], "lm_eval": last["lm_eval"],
        "held": held, "evaluate_bits_per_byte": ours, "runs": runs, "command": " ".join(sys.argv)})  # fmt: skip


if __name__ == "__main__":
    main()
