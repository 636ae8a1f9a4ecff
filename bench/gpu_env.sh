# Sourced by the bench/*_gpu.sh scripts (after `log` is defined, from the repo root): the environment every GPU
# bench runs in (offline, W&B off, NVLink multicast off, OMP threads unless set), then makes deepspeed,
# hydra-core and datasets importable (from .whl/, filled by ../shared/tools/gpu-wheels.sh, into /tmp/site when
# the image lacks them) and installs salatrain editable if it is not importable yet.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
if ! python3 -c "import deepspeed, hydra, datasets" >/dev/null 2>&1; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    log "installing .whl/ into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "deepspeed, hydra-core or datasets missing and no .whl/ (fill it with ../shared/tools/gpu-wheels.sh)" >&2
    exit 1
  fi
fi
if ! python3 -c "import salatrain, salatrain_kernels" >/dev/null 2>&1; then
  log "installing salatrain (editable)"
  python3 -m pip install -q --no-deps --no-build-isolation -e .
fi
