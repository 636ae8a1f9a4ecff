#!/usr/bin/env bash
# Training throughput of a small model, before and after, in one GPU session: align and distill of the
# SmolLM2-135M-shaped hybrid at 4K (bench/profile_train.py), each with a per-phase and per-kernel profile, run
# with this checkout and with the previous release (.before/, installed into /tmp/before). On a 2-GPU machine
# GPU 1 meanwhile runs the GPU tests of the start-up self-test, the fused losses and the mixers, and the ~1B
# regression check (bench/train_gpu.sh, 1 GPU, 4K and 32K). Everything lands in $OUT.
#
#   bash bench/profile_gpu.sh            # repo root, on the GPU machine; ~5 minutes on 2 GPUs
#   RUNS="distill distill-before" bash bench/profile_gpu.sh
#   RUNS="distill distill-before distill-loops distill#2 distill-before#2 distill-loops#2" \
#     EXTRA="trainer.micro_batch_size=16 trainer.max_steps=40" bash bench/profile_gpu.sh   # an A/B, alternated
#   RUNS="1b 1b-before 1b#2 1b-before#2" bash bench/profile_gpu.sh   # the ~1B hybrid (lm, 4K, 1 GPU), 20 steps each
#   RUNS="align align-m16 align#2 align-m16#2" EXTRA="trainer.max_steps=40" bash bench/profile_gpu.sh
#                                                  # align at 8 against 16 rows a micro-batch
#
# Needs .whl/ (../shared/tools/gpu-wheels.sh) and .gpu/smollm2-shape (config.json + tokenizer of SmolLM2-135M:
# `python bench/profile_train.py` copies nothing itself; see docs/perf.md for the two commands).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-$PWD/bench-out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/salatrain-profile}
log() { echo "[profile_gpu +$(( $(date +%s) - T0 ))s] $*"; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
source bench/gpu_env.sh
if [ -d .before ] && [ ! -d /tmp/before ]; then
  log "installing the previous release into /tmp/before"
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/before ./.before >/dev/null 2>&1 || log "before install failed"
fi
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

if [ "$NGPU" -ge 2 ]; then
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rfs tests/kernels/test_selftest_context.py \
      tests/kernels/test_logit_loss.py tests/test_train_losses.py tests/test_mixers.py > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests exit $?" >> "$OUT/gpu_tests.log"
    ONLY=${ONLY_1B:-dense-lm-zero2-short-1gpu,hybrid-lm-zero2-short-1gpu,hybrid-lm-zero2-long-1gpu} ACCUM=4 BUDGET_S=200 \
      OUT="$OUT" bash bench/train_gpu.sh > "$OUT/train_1b.log" 2>&1
    echo "1B bench exit $?" >> "$OUT/train_1b.log"
  ) &
  side=$!
fi

export CUDA_VISIBLE_DEVICES=0
log "building the dense model, corpus and hybrid"
timeout 240 python3 bench/profile_train.py build --work "$WORK" > "$OUT/profile_build.log" 2>&1 || { log "build failed"; tail -20 "$OUT/profile_build.log"; }
# A run named kind#n repeats kind (A/B pairs alternate to spread drift); EXTRA is appended to every run.
for r in ${RUNS:-distill distill-before align align-before distill-sparse}; do
  case ${r%%#*} in
    distill) args="--stage distill" ;;
    distill-before) args="--stage distill --before" ;;
    distill-loops) args="--stage distill deepspeed.fused_grad_checks=false" ;;
    align) args="--stage align" ;;
    align-before) args="--stage align --before" ;;
    align-m16) args="--stage align trainer.micro_batch_size=16" ;;  # 16 rows a micro-batch (2 a step)
    distill-sparse) args="--stage distill stage.sparse_attention=true" ;;
    1b|1b-before)  # the ~1B regression check (hybrid lm, 1 GPU, 4K), this checkout or .before/ (its own script:
                   # train_bench.py runs the code of the repository it sits in)
      root=.; [ "${r%%#*}" = 1b-before ] && root=.before
      dir="$WORK/runs/${r//#/-}"; mkdir -p "$dir"
      log "run $r"
      ONLY=hybrid-lm-zero2-short-1gpu STEPS=${STEPS_1B:-20} ACCUM=4 BUDGET_S=${BUDGET_1B:-240} OUT="$dir" \
        WORK="/tmp/salatrain-1b-${r//#/-}" timeout 300 bash $root/bench/train_gpu.sh > "$dir/run.log" 2>&1 \
        || log "$r failed"
      echo "$r $(grep -E '^\| hybrid' "$dir/train_bench.md" 2>/dev/null)" | tee -a "$OUT/profile_1b.md"
      continue ;;
    *) log "unknown run $r"; continue ;;
  esac
  log "run $r"
  timeout 200 python3 bench/profile_train.py run --work "$WORK" --name "${r//#/-}" $args trainer.loss_chunk_tokens=8192 \
    ${EXTRA:-}
done
python3 bench/profile_train.py report --work "$WORK" --out "$OUT/profile.md" > /dev/null
[ -n "${side:-}" ] && wait $side
# at most 8 files come back: the tables, and every log in one archive
tar czf "$OUT/logs.tgz" -C "$WORK" runs --exclude='*.safetensors' --exclude='checkpoints' 2>/dev/null
tar rzf "$OUT/logs.tgz" 2>/dev/null; (cd "$OUT" && tar czf side_logs.tgz profile_build.log train_1b.log \
  train_bench_results.jsonl 2>/dev/null && rm -f profile_build.log train_1b.log train_bench_results.jsonl)
log "done"
tail -n 6 "$OUT/gpu_tests.log" 2>/dev/null; grep -E "^\|" "$OUT/train_bench.md" 2>/dev/null | head -8
cat "$OUT/profile.md" | head -120
