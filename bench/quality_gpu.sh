#!/usr/bin/env bash
# GPU half of docs/quality.md: pretrain a small Llama-style teacher (16 query heads per KV head, context 1024) for
# a few minutes on the machine's Python library sources, then align -> select (HALO) and uniform -> convert ->
# distill both plans with equal tokens -> eval teacher / HALO / uniform at 1024 and 2048 tokens. Prints the
# markdown table; everything lands in $OUT/quality-gpu (results.json, table.md, each step's folder).
#
#   bash bench/quality_gpu.sh                   # one H100/H200, repo root or anywhere; < 9 minutes in all
#   OUT=/path BUDGET_S=500 bash bench/quality_gpu.sh
#   SIZE=small bash bench/quality_gpu.sh        # CPU rehearsal of the whole script (tiny teacher, ~2 minutes)
#
# Needs deepspeed, hydra-core, datasets: taken from .whl/ (../shared/tools/gpu-wheels.sh) into /tmp/site when
# the image lacks them. The distillation budget shrinks, equally for both plans, if the run falls behind.
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
BUDGET_S=${BUDGET_S:-510}
SIZE=${SIZE:-full}
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
log() { echo "[quality_gpu +$(( $(date +%s) - T0 ))s] $*"; }

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
source bench/gpu_env.sh

if [ "$SIZE" = small ]; then PRESET=small; DEVICE=cpu; else PRESET=gpu; DEVICE=cuda; fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"
DEADLINE=$(( T0 + BUDGET_S ))
log "preset $PRESET on $DEVICE, budget ${BUDGET_S}s, out $OUT/quality-$PRESET"
timeout --signal=KILL "$(( BUDGET_S + 30 - ( $(date +%s) - T0 ) ))" \
  python3 bench/quality.py --preset "$PRESET" --device "$DEVICE" --out "$OUT/quality-$PRESET" --deadline "$DEADLINE" \
  2>&1 | tee "$OUT/quality-$PRESET.log" | grep -v "it/s\]"
log "done; table: $OUT/quality-$PRESET/table.md"
