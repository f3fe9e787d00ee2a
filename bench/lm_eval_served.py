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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/latest", help="what `edgar-tune serve --model` takes (default "
                    "runs/latest: the version the last run registered)")  # fmt: skip
    ap.add_argument("--run", type=Path, default=REPO / "runs/latest", help="the run folder whose filings make the "
                    "tasks, and whose evaluate stage the MD&A's score is set beside")  # fmt: skip
    ap.add_argument("--lm-eval", default=shutil.which("lm-eval") or "lm-eval", help="lm-eval's command")
    ap.add_argument("--concurrent", type=int, default=4, help="requests the harness keeps in flight (the server "
                    "batches them)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = ap.parse_args()
    evaluated = json.loads((args.run / "05_evaluate" / "finetuned.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="lm-eval-served-"))
    held = tasks(args.run, work)
    proc, url = serve(args.model, 8, work / "serve.log")
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as listed:
            name = json.load(listed)["data"][0]["id"]
        cmd = [args.lm_eval, "run", "--model", "local-completions", "--tasks", "edgar_mdna", "edgar_items",
               "--include_path", str(work), "--output_path", str(work / "out"), "--model_args",
               f"model={name},base_url={url}/v1/completions,num_concurrent={args.concurrent},"
               f"max_length={evaluated['max_length']},tokenized_requests=True,max_retries=1"]  # fmt: skip
        start = time.monotonic()
        subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
        seconds = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(30)
    results = json.loads(max((work / "out").rglob("results_*.json"), key=lambda p: p.stat().st_mtime).read_text())
    mdna, items = results["results"]["edgar_mdna"], results["results"]["edgar_items"]
    ours = evaluated["nll"] / math.log(2) / held["mdna_bytes"]
    served = mdna["bits_per_byte,none"]
    chance = 1 / len(held["items"])
    print(f"\nlm-eval {results.get('lm_eval_version', '?')} against `edgar-tune serve --model {args.model}` "
          f"({name}), {args.concurrent} requests at once, {seconds:.0f} s\n")
    print("| task | what | lm-eval through the server | beside it |")
    print("|---|---|---|---|")
    print(f"| edgar_mdna ({held['mdna_documents']} held-out MD&A, windows of {evaluated['max_length']}) | bits per "
          f"byte | {served:.4f} | evaluate stage {ours:.4f} ({served / ours - 1:+.2%}) |")
    print(f"| edgar_mdna | word perplexity | {mdna['word_perplexity,none']:.2f} | |")
    print(f"| edgar_items ({held['questions']} passages, {len(held['items'])} Items) | accuracy | "
          f"{items['acc,none']:.3f} ± {items['acc_stderr,none']:.3f} | a guess {chance:.3f} |")
    print(f"| edgar_items | accuracy, length-normalized | {items['acc_norm,none']:.3f} | |")
    write_result(args.out, "lm-eval-served", cpu_host(), {
        "device": cpu_host(), "model": args.model, "served_as": name, "lm_eval": results.get("lm_eval_version"),
        "seconds": seconds, "held": held, "evaluate_bits_per_byte": ours, "results": {
            "edgar_mdna": mdna, "edgar_items": items}, "command": " ".join(sys.argv)})  # fmt: skip


if __name__ == "__main__":
    main()
