#!/usr/bin/env bash
# Cached decoding on one GPU, in parts that each fit one device call (repo root; logs and JSON under $OUT):
#   PARTS="tests decode" bash bench/decode_gpu.sh   the decoding paths' tests compiled (mixers, fused norms, the
#                                                   kernels' self-tests), the whole-model check, then
#                                                   bench/decode_gpu.py: both sparse decoding paths and
#                                                   transformers' Llama at 8K and 128K
#   PARTS="bench kernels" bash bench/decode_gpu.sh  `salatrain bench` of the 1B hybrid against the same-shape Llama
#                                                   (8K-256K), then the whole kernel test suite
# The 1B bench models are built into $WORK (default /tmp/w) when missing (bench/train_bench.py build).
set -uo pipefail
log() { echo "[$(date +%T)] $*"; }
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/w}; PARTS=${PARTS:-"tests decode"}
mkdir -p "$OUT"
source bench/gpu_env.sh
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
if [ ! -f "$WORK/hybrid/config.json" ] || [ ! -f "$WORK/dense-llama/config.json" ]; then
  log "building the 1B bench models into $WORK"
  python3 bench/train_bench.py build --work "$WORK" --size full > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
fi
for part in $PARTS; do
  case $part in
    tests)
      log "decoding-path tests (compiled)"
      timeout ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider -rfs tests/test_mixers.py \
        tests/test_decode_graphs.py tests/kernels/test_lightning.py tests/kernels/test_selftest.py \
        tests/kernels/test_selftest_context.py -k "${TEST_K:-test_mixers or graphs or rms_norm or test_selftest}" \
        > "$OUT/decode_tests.log" 2>&1
      echo "decoding-path tests exit $?" >> "$OUT/decode_tests.log"; tail -n 6 "$OUT/decode_tests.log"
      [ "${MODEL_S:-150}" = 0 ] && continue
      log "whole-model check"
      timeout ${MODEL_S:-150} python3 bench/model_gpu.py > "$OUT/model_gpu.log" 2>&1
      echo "model check exit $?" >> "$OUT/model_gpu.log"; grep -v "^INFO" "$OUT/model_gpu.log" | tail -n 8 ;;
    decode)
      log "bench/decode_gpu.py"
      timeout ${DECODE_S:-300} python3 bench/decode_gpu.py --hybrid "$WORK/hybrid" --dense "$WORK/dense-llama" \
        --lengths ${LENGTHS:-8192 131072} --repeats ${REPEATS:-1} --out "$OUT/decode.json" 2>&1 \
        | grep -v "^INFO" | tee "$OUT/decode.log" ;;
    bench)
      log "salatrain bench"
      timeout ${BENCH_S:-330} salatrain bench model="$WORK/hybrid" compare="[$WORK/dense-llama]" names=[hybrid,llama] \
        lengths="${BENCH_LENGTHS:-[8K,32K,128K,256K]}" decode_tokens=32 output_dir="$OUT/bench" > "$OUT/bench.log" 2>&1
      echo "bench exit $?" >> "$OUT/bench.log"; grep -v "^INFO" "$OUT/bench.log" | tail -n 20 ;;
    kernels)
      log "kernel test suite"
      timeout ${KERNEL_S:-330} python3 -m pytest tests/kernels -q -p no:cacheprovider -rfs > "$OUT/kernel_tests.log" 2>&1
      echo "kernel tests exit $?" >> "$OUT/kernel_tests.log"; tail -n 12 "$OUT/kernel_tests.log" ;;
    *) echo "unknown part $part (tests, decode, bench, kernels)" >&2; exit 2 ;;
  esac
done
log "done"
