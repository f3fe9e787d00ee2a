#!/usr/bin/env bash
# Issue 7's GPU checks in one device call, most wanted first, each under its share of the time left, every result
# written under $OUT as it lands (a step cut short keeps what it measured; bench/train_throughput.py rewrites its
# JSON after each run). Prepare here with `make gpu-carry`, then through the device tool, with .whl and .benchdata
# carried:
#
#     bash bench/gpu_session.sh 560        # seconds this call may use; the device call's timeout_s a bit above
#
# 1. the kernel tests on the GPU (correct before fast; 29 s on an H200 on 2026-11-30);
# 2. the Llama-2-7B shape against the baseline, ours fitted to 0.6x the baseline's peak (the target), then
#    ours with flex attention (block masks for the document mask), ours at the baseline's batch of 4 with every
#    layer recomputed (what the fit gains), then the two perplexity evaluations. On 2026-11-30 the 13.5 GB model's
#    build, the baseline and the fitted ours took 380 s (ours compiles for about 150 s), so the rest did not land;
# 3. bench/layer_kernels.py (fused RMSNorm, RoPE, SwiGLU against PyTorch; 21 s);
# 4. the SmolLM2-135M shape with the checkpointing sweep, if time is left.
set -u
BUDGET=${1:-560}
OUT=${OUT:-/tmp/gpu-session}
LOGS=$OUT/logs  # packed into $OUT/logs.tgz at the end: the device tool brings back 8 files at most
mkdir -p "$LOGS" && : > "$OUT/steps.txt"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$LOGS/pip.log" 2>&1 || { echo "the carried wheels did not install (make gpu-carry, carry .whl)"; exit 2; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The lock's transformers, peft and tokenizers travel (make gpu-carry); should they not import over the image's
# other packages, the image's own run instead, and fallback.txt says so.
IMPORTS="import transformers, peft, tokenizers, datasets, deepspeed, kernels.fused_linear_ce, tasks.finetune"
if ! python3 -c "$IMPORTS" > "$LOGS/imports.log" 2>&1; then
  echo "the carried transformers/peft/tokenizers/regex did not import (imports.log): the image's run instead" \
    | tee "$OUT/fallback.txt"
  rm -rf /tmp/site/transformers* /tmp/site/peft* /tmp/site/tokenizers* /tmp/site/regex*
  python3 -c "$IMPORTS" >> "$LOGS/imports.log" 2>&1 || { echo "no imports either way (imports.log)"; exit 2; }
fi
[ -d .benchdata/tt ] || { echo "no .benchdata/tt: run make gpu-carry here and carry .benchdata"; exit 2; }
{ nvidia-smi; python3 -c "import torch, transformers, peft, triton; print(torch.__version__, torch.cuda.get_device_name(),
transformers.__version__, peft.__version__, triton.__version__)"; } > "$LOGS/device.txt" 2>&1

# step NAME CAP COMMAND...: run COMMAND for at most CAP seconds or what is left, whichever is less (none below 60)
step() {
  local name=$1 cap=$2 t
  shift 2
  t=$(left)
  ((t > cap)) && t=$cap
  if ((t < 60)); then echo "$name: skipped, $(left) s left" | tee -a "$OUT/steps.txt"; return; fi
  local s=$(date +%s)
  timeout -k 10 "$t" "$@" > "$LOGS/$name.log" 2>&1
  echo "$name: rc $? in $(($(date +%s) - s)) s (limit $t s)" | tee -a "$OUT/steps.txt"
}

step kernel_tests 90 python3 -m pytest -q -rfE --noconftest -p no:cacheprovider tests/test_kernels.py \
  -k "matches or vocabulary or bias or ignored or frozen or refuses or rms_norm or swiglu or rope or fused_layers \
or lean_lora_down or under_autocast or no_grad or mfu"
step llama-2-7b 440 python3 bench/train_throughput.py --only llama-2-7b --data .benchdata/tt --no-ablation --steps 10 \
  --variants attention --checkpoint-sweep 1 --out "$OUT/llama-2-7b"
step layer_kernels 60 python3 bench/layer_kernels.py --out "$OUT/layer_kernels"
step smollm2-135m 240 python3 bench/train_throughput.py --only smollm2-135m --data .benchdata/tt --no-ablation \
  --steps 12 --checkpoint-sweep 1,0.5,0 --out "$OUT/smollm2-135m"

echo; cat "$OUT/fallback.txt" 2>/dev/null; tail -n 1 "$LOGS/device.txt"; cat "$OUT/steps.txt"
grep -E "^(FAILED|ERROR) " "$LOGS/kernel_tests.log" | cut -c1-200 | head -n 20; tail -n 1 "$LOGS/kernel_tests.log"
for m in llama-2-7b layer_kernels smollm2-135m; do
  [ -f "$LOGS/$m.log" ] && { echo "== $m"; grep -v -e "^\s*$" "$LOGS/$m.log" | tail -n 16 | cut -c1-300; }
done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
