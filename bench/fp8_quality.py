"""What an FP8 base (`train.fp8_base`, kernels/fp8.py) costs in quality before any training: SmolLM2-135M's real
weights scored on held-out MD&A as they are and through FP8 matmuls, on the CPU (or a GPU, where there is one).

    python bench/fp8_quality.py            # a table and bench/results/<date>-fp8-quality-<device>.json

The text is Item 7 of Amazon's FY2021 10-K, bundled in data/ and parsed by tasks.sections; the first `--windows`
windows of 512 tokens, scored two at a time. The model loads once per precision (fp32, and bf16); perplexity is
taken, then `fp8_base` replaces every linear layer of its blocks and it is taken again. What training through an
FP8 base costs is `make demo` with `--set train.fp8_base=true` (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import cpu_host, write_result  # noqa: E402

FILING = REPO / "data/sec-edgar-filings/AMZN/10-K/0001018724-22-000005/primary-document.html.gz"  # FY2021


def mdna_ids(tokenizer, windows: int, length: int) -> torch.Tensor:
    from tasks.sections import parse_filing

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "amzn-fy2021.html"
        path.write_bytes(gzip.decompress(FILING.read_bytes()))
        text = parse_filing(path).items["7"].text
    ids = tokenizer(text)["input_ids"][: windows * length]
    if len(ids) < windows * length:
        raise SystemExit(f"the MD&A has {len(ids)} tokens, fewer than --windows {windows} x {length}")
    return torch.tensor(ids).view(windows, length)


def perplexity(model, ids: torch.Tensor, device: str) -> float:
    with torch.no_grad():
        losses = [model(input_ids=ids[i:i + 2].to(device), labels=ids[i:i + 2].to(device)).loss.item()
                  for i in range(0, len(ids), 2)]  # fmt: skip
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=8, help="windows of 512 tokens (even)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    from kernels.fp8 import fp8_base
    from tasks.models import load_causal_lm, load_tokenizer, smollm2_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = str(smollm2_dir())
    ids = mdna_ids(load_tokenizer(model_dir), args.windows, 512)
    rows = []
    for dtype in (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16,):  # CUDA's FP8: bf16 out
        model = load_causal_lm(model_dir, dtype=dtype).to(device).eval().requires_grad_(False)
        plain = perplexity(model, ids, device)
        layers = fp8_base(model)
        fp8 = perplexity(model, ids, device)
        rows.append({"dtype": str(dtype).split(".")[-1], "plain": plain, "fp8": fp8, "ratio": fp8 / plain,
                     "fp8_layers": layers})  # fmt: skip
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_host()
    print(f"\nSmolLM2-135M, {args.windows} x 512 tokens of AMZN FY2021 MD&A, {name}, torch {torch.__version__}")
    print(f"{'dtype':<9} {'plain':>9} {'FP8 base':>9} {'ratio':>7}")
    for r in rows:
        print(f"{r['dtype']:<9} {r['plain']:>9.4f} {r['fp8']:>9.4f} {r['ratio']:>7.4f}")
    record = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__, "tokens": ids.numel(),
              "rows": rows}  # fmt: skip
    write_result(args.out, "fp8-quality", name, record)


if __name__ == "__main__":
    main()
