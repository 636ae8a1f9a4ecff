#!/usr/bin/env bash
# One node, N GPUs (default: all visible), launched by torchrun:
#   launch/torchrun.sh recipe=halo_distill model.path=<hybrid> teacher.path=<dense> data.files=[...] output_dir=<dir>
#   NGPU=4 launch/torchrun.sh recipe=sala_stable ...
# Any `salatrain train` overrides pass through. Re-running the same command resumes (resume=auto).
set -euo pipefail
if [ -z "${NGPU:-}" ]; then
  NGPU=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec python3 -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m salatrain.cli train "$@"
