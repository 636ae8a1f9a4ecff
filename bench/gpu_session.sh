#!/usr/bin/env bash
# One GPU session for the kernels: install the wheels the image lacks, then — in parallel on a 2-GPU machine —
# the kernel test suite and the whole-model check on GPU 1 and the kernel benchmark on GPU 0 (so tests do not
# disturb the timings). Logs and the perf table go to $OUT.
#   bash bench/gpu_session.sh            (repo root, on the GPU machine)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
TEST_GPU=$(( NGPU > 1 ? 1 : 0 ))
(
  export CUDA_VISIBLE_DEVICES=$TEST_GPU
  timeout ${TEST_S:-330} python3 -m pytest tests/kernels -q -p no:cacheprovider -rfs > "$OUT/kernel_tests.log" 2>&1
  echo "kernel tests exit $?" >> "$OUT/kernel_tests.log"
  timeout 150 python3 bench/model_gpu.py > "$OUT/model_gpu.log" 2>&1
  echo "model check exit $?" >> "$OUT/model_gpu.log"
) &
tests=$!
if [ "$NGPU" -eq 1 ]; then wait $tests; fi
CUDA_VISIBLE_DEVICES=0 timeout ${BENCH_S:-480} python3 bench/kernels.py --out "$OUT/perf.md" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
wait $tests
tail -n 25 "$OUT/kernel_tests.log"; grep -v "^INFO" "$OUT/model_gpu.log" | tail -n 12; tail -n 45 "$OUT/bench.log"
