#!/usr/bin/env bash
# The learner on one node of a multi-node job: torchrun, FSDP2 over NCCL; rank 0 (on the node with
# NODE_RANK=0) is the hub and binds network.work_addr / weights_addr / scored_addr of the config.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 deploy/multinode/learner.sh CONFIG [key=value ...]
# learner.world_size in the config must equal NNODES * GPUS_PER_NODE.
set -euo pipefail
CONFIG="$1"; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-minirl}" \
    -m minirl_async.cli learner -c "$CONFIG" "$@"
