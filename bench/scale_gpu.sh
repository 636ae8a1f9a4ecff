#!/usr/bin/env bash
# Scaling of `salatrain train` on one node: 1 -> 2 -> 4 -> 8 GPUs (as many as the machine has), ZeRO-2 and ZeRO-3,
# 4K and 32K rows, the ~1B SALA-shape hybrid beside the same-shape dense model; the hybrid at 512K-token rows split
# over 8 GPUs (trainer.sequence_parallel=8); the 8B-class SALA shape (32 layers, hidden 4096, 32 query / 2 KV
# heads) at 32K with ZeRO-3 on 8 GPUs. Tokens/s, MFU and peak memory per configuration, and the scaling
# efficiency against one GPU. Each GPU count runs under torchrun (python -m torch.distributed.run, as
# launch/torchrun.sh launches `salatrain train`), every configuration through the same run_stage(compose_train(...))
# path `salatrain train` takes (bench/train_bench.py, SUITE=scale).
#
#   bash bench/scale_gpu.sh                  # an 8-GPU H100/H200 node; BUDGET_S (default 1500) bounds the whole run
#   SIZE=small bash bench/scale_gpu.sh       # CPU rehearsal: tiny models, gloo, 1/2/4 processes
#   ONLY=hybrid-lm-zero2-x512k-8gpu-sp8 bash bench/scale_gpu.sh
#
# Writes $OUT/scale_bench.md and $OUT/scale_bench_results.jsonl. Configurations run in priority order (the scaling
# endpoints first); what would pass the budget is recorded as skipped, an OOM as OOM, a crash or hang as such.
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
BUDGET_S=${BUDGET_S:-1500}
SIZE=${SIZE:-full}
OUT=${OUT:-$PWD/bench-out}
WORK=${WORK:-/tmp/salatrain-scale-bench-$SIZE}
mkdir -p "$OUT" "$WORK"
log() { echo "[scale_gpu +$(( $(date +%s) - T0 ))s] $*"; }
export SUITE=scale
export DEEPSPEED_TIMEOUT=${DEEPSPEED_TIMEOUT:-4}   # minutes: a rank stuck in a collective fails instead of hanging
source bench/gpu_env.sh

if [ "$SIZE" = small ]; then NGPU=${NGPU:-4}; else NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())"); fi
log "size $SIZE, $NGPU GPU(s), budget ${BUDGET_S}s, work dir $WORK"
WITH_8B=(); [ "$NGPU" -ge 8 ] && WITH_8B=(--with-8b)
log "building models and data"
python3 bench/train_bench.py build --work "$WORK" --size "$SIZE" "${WITH_8B[@]}"

# every GPU count gets a share of what is left, the larger counts more (they hold more configurations)
for gpus in 1 2 4 8; do
  [ "$gpus" -le "$NGPU" ] || { log "$gpus GPUs: more than this machine has; skipped"; continue; }
  left=$(( T0 + BUDGET_S - $(date +%s) ))
  case $gpus in 1) share=30 ;; 2) share=15 ;; 4) share=25 ;; 8) share=100 ;; esac
  [ "$gpus" -eq "$NGPU" ] && share=100
  DEADLINE=$(( $(date +%s) + left * share / 100 - 20 ))
  for attempt in 1 2 3; do
    budget=$(( DEADLINE - $(date +%s) + 30 ))
    [ "$budget" -gt 40 ] || break
    log "$gpus-GPU runs (attempt $attempt)"
    if timeout --signal=KILL "$budget" python3 -m torch.distributed.run --standalone --nproc_per_node "$gpus" \
        bench/train_bench.py run --work "$WORK" --gpus "$gpus" --deadline "$DEADLINE"; then
      break
    fi
    log "$gpus-GPU process ended early (crash, OOM or hang); continuing after the configuration it was in"
  done
done

python3 bench/train_bench.py report --work "$WORK" --out "$OUT/scale_bench.md"
cp "$WORK/results.jsonl" "$OUT/scale_bench_results.jsonl"
log "done: $OUT/scale_bench.md"
