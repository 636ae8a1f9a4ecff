#!/usr/bin/env bash
# InfLLM-V2 at the shapes most converted models have: groups of fewer than 16 query heads per K/V head, where a
# query's heads fill part of a 16-row tile. Times the sparse op with small groups packed (the default,
# PACK_SMALL_GROUPS: neighbouring queries fill the tile and share their gathered blocks) against per-query tiles
# (every query its own padded tile: the row "per-query"), and the dense default (cuDNN on an H200), on random q/k and on q/k whose selections overlap as a real model's.
#   bash bench/small_groups_gpu.sh            (repo root, on a one-GPU machine; logs to $OUT)
# SHAPES="HQ,HKV,D:T1,T2 ..." picks the shapes and lengths (default: Llama-3-8B / Mistral-7B, Qwen2.5-7B, SmolLM2-135M,
# multi-head attention).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/small_groups.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/small_groups.log"
SHAPES=${SHAPES:-"32,8,128:16384,32768,131072 28,4,128:32768,131072 9,3,64:16384,32768 32,32,128:32768"}
for shape in $SHAPES; do
  heads=${shape%%:*}; lengths=${shape#*:}
  echo "=== heads $heads, T ${lengths//,/ } ===" | tee -a "$OUT/small_groups.log"
  timeout ${SHAPE_S:-240} python3 bench/bench_infllmv2.py --heads "$heads" --T ${lengths//,/ } --only per-query \
    --correlation-tokens 16 >> "$OUT/small_groups.log" 2>&1
  echo "exit $?" >> "$OUT/small_groups.log"
done
grep -E "^===|^\| infllmv2|gate|overlap|exit" "$OUT/small_groups.log" | cut -c1-400
