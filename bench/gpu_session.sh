#!/usr/bin/env bash
# Issue 7's GPU checks in one device call, most wanted first, each under its share of the time left, every result
# written under $OUT as it lands (a step cut short keeps what it measured; bench/train_throughput.py rewrites its
# JSON after each run). Prepare here with `make gpu-carry`, then through the device tool, with .whl and .benchdata
# carried:
#
#     bash bench/gpu_session.sh 560        # seconds this call may use; the device call's timeout_s a bit above
#
# 1. the kernel tests on the GPU (correct before fast);
# 2. the Llama-2-7B shape against the baseline, ours fitted to 0.6x the baseline's peak (the target);
# 3. the SmolLM2-135M shape with the checkpointing sweep;
# 4. bench/layer_kernels.py (fused RMSNorm, RoPE, SwiGLU against PyTorch), if time is left.
set -u
BUDGET=${1:-560}
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT" && : > "$OUT/steps.txt"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { echo "the carried wheels did not install (make gpu-carry, carry .whl)"; exit 2; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d .benchdata/tt ] || { echo "no .benchdata/tt: run make gpu-carry here and carry .benchdata"; exit 2; }
{ nvidia-smi; python3 -c "import torch, transformers, peft, triton; print(torch.__version__, torch.cuda.get_device_name(),
transformers.__version__, peft.__version__, triton.__version__)"; } > "$OUT/device.txt" 2>&1

# step NAME CAP COMMAND...: run COMMAND for at most CAP seconds or what is left, whichever is less (none below 60)
step() {
  local name=$1 cap=$2 t
  shift 2
  t=$(left)
  ((t > cap)) && t=$cap
  if ((t < 60)); then echo "$name: skipped, $(left) s left" | tee -a "$OUT/steps.txt"; return; fi
  local s=$(date +%s)
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc $? in $(($(date +%s) - s)) s (limit $t s)" | tee -a "$OUT/steps.txt"
}

step kernel_tests 120 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_kernels.py \
  -k "matches or vocabulary or bias or ignored or frozen or refuses or rms_norm or swiglu or rope or fused_layers \
or lean_lora_down or under_autocast or no_grad or mfu"
step llama-2-7b 400 python3 bench/train_throughput.py --only llama-2-7b --data .benchdata/tt --no-ablation --steps 10 \
  --checkpoint-sweep 1 --out "$OUT"
step smollm2-135m 240 python3 bench/train_throughput.py --only smollm2-135m --data .benchdata/tt --no-ablation \
  --steps 12 --checkpoint-sweep 1,0.5,0 --out "$OUT"
step layer_kernels 120 python3 bench/layer_kernels.py --out "$OUT"

echo; cat "$OUT/steps.txt"
tail -n 3 "$OUT/kernel_tests.log" 2>/dev/null
for m in llama-2-7b smollm2-135m layer_kernels; do
  [ -f "$OUT/$m.log" ] && { echo "== $m"; grep -v -e "^\s*$" "$OUT/$m.log" | tail -n 14; }
done
