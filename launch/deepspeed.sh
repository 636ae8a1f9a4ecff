#!/usr/bin/env bash
# One node (or several with HOSTFILE=launch/hostfile.example, over pdsh/ssh), launched by the deepspeed launcher:
#   launch/deepspeed.sh recipe=halo_align model.path=<dense> data.files=[...] output_dir=<dir>
#   NGPU=8 HOSTFILE=/path/hostfile launch/deepspeed.sh recipe=sala_longdecay ...
# --no_local_rank matters: without it the launcher appends --local_rank=N, which is not a key=value override.
set -euo pipefail
args=(--no_local_rank --module --master_port "${MASTER_PORT:-29500}")
[ -n "${NGPU:-}" ] && args+=(--num_gpus "$NGPU")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
exec deepspeed "${args[@]}" salatrain.cli train "$@"
