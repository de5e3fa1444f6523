#!/usr/bin/env bash
# GPU check for a lent H100/H200 with its own torch (>= 2.5; 2.11 expected), in under 5 minutes:
#   1. correctness: fp32 logits = HF Mixtral's; bf16 autocast logits within tolerance of fp32;
#      a short bf16 + torch.compile run whose loss falls          (experiments/bench_correctness.py)
#   2. training speed at the 249M (demo) shape, 16 x 1024 tokens a step: bf16 autocast, SDPA
#      restricted to flash attention, torch.compile on both models; MFU against the datasheet
#      bf16 dense peak (h64lm/train/mfu.py); goal >= 40% MFU and >= 1.5x HF
#   3. tiny shape, expert scaling 8..64 and KV-cache generation, bf16, eager (no compile)
#
#   bash experiments/gpu_check.sh [OUT_DIR]          (PYTHON=... picks the interpreter)
#
# Without CUDA the same three steps run on the CPU at the toy `smoke` size: a dry run of every
# code path but the device. Each step has its own time limit and the script goes on after a failed
# or timed-out step, so one problem still leaves the others' numbers; the exit status is the
# number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  DEVICE=cuda SIZE=demo CHECK=(--size tiny --steps 30) SMOKE=() TINY=(--sizes tiny)
  TRAIN_SHAPE=(--batch 16 --seq 1024) LIMITS=(70 150 70)
else
  DEVICE=cpu SIZE=smoke CHECK=(--size smoke --steps 20 --lr 1e-2) SMOKE=(--smoke) TINY=()
  TRAIN_SHAPE=() LIMITS=(180 240 120)
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "cuda",
torch.version.cuda, "transformers", transformers.__version__)'
} | tee "$OUT/env.txt"

failed=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  if timeout "$limit" "$@" 2>&1 | grep -v '^USDT' | tee "$OUT/$name.log"; then
    echo "== $name ok in $((SECONDS - start))s"
  else
    echo "== $name FAILED (exit ${PIPESTATUS[0]}) after $((SECONDS - start))s"
    failed=$((failed + 1))
  fi
}

step correctness "${LIMITS[0]}" "$PYTHON" experiments/bench_correctness.py \
  --device "$DEVICE" "${CHECK[@]}" --compile --out "$OUT/correctness"
step train "${LIMITS[1]}" "$PYTHON" experiments/bench.py --device "$DEVICE" --dtype bf16 \
  --sdpa flash --compile --sizes "$SIZE" "${TRAIN_SHAPE[@]}" --skip experts generate \
  --warmup 3 --rounds 10 "${SMOKE[@]}" --out "$OUT/train"
step experts_generate "${LIMITS[2]}" "$PYTHON" experiments/bench.py --device "$DEVICE" \
  --dtype bf16 "${TINY[@]}" --skip train --warmup 2 --rounds 5 "${SMOKE[@]}" \
  --out "$OUT/experts_generate"

cat "$OUT"/train/bench.md "$OUT"/experts_generate/bench.md 2>/dev/null > "$OUT/summary.md"
echo "== $failed step(s) failed; tables in $OUT/summary.md"
exit "$failed"
