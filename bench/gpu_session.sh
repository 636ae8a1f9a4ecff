#!/usr/bin/env bash
# One GPU session: install the wheels the image lacks, then kernel tests, the model check and the kernel
# benchmark; logs under $OUT. Usage (on the GPU machine, repo root): bash bench/gpu_session.sh [kernels|train|quality|all]
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${1:-kernels}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ "$what" = kernels ] || [ "$what" = all ]; then
  timeout 240 python3 -m pytest tests/kernels -x -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log" | tail -25
  timeout 120 python3 bench/model_gpu.py 2>&1 | tee "$OUT/model_gpu.log" | grep -v "^INFO" | tail -12
  timeout 330 python3 bench/kernels.py --out "$OUT/perf.md" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
