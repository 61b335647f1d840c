#!/usr/bin/env bash
# The learner's processes on one node of a multi-node job (torchrun, FSDP2 over NCCL). Run it on every
# learner node, NODE_RANK=0 on the host of network.work_addr:
#   NNODES=2 NODE_RANK=0 deploy/multinode/learner.sh CONFIG [key=value ...]
# Static rendezvous (torchrun --rdzv-backend static): global rank = NODE_RANK * ranks-per-node + local rank,
# so rank 0, the hub that binds network.work_addr / weights_addr / scored_addr, runs on the NODE_RANK=0 node.
# (The c10d backend ignores --node-rank and may put rank 0 on any node.) Ranks per node =
# learner.world_size / NNODES of the resolved config. MASTER_ADDR (torch's store and NCCL bootstrap, on the
# NODE_RANK=0 node) defaults to the host of network.work_addr; MASTER_PORT to 29500.
# MINIRL_DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
. "$(dirname "$0")/_common.sh" "$@"
: "${NNODES:?set NNODES (learner nodes)}" "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
V="$(cfg learner.world_size network.work_addr)"; read -r WORLD WORK_ADDR <<<"$V"
HUB="$(addr_host "$WORK_ADDR")"
(( WORLD % NNODES == 0 )) || die "learner.world_size = $WORLD is not a multiple of NNODES = $NNODES"
(( NODE_RANK >= 0 && NODE_RANK < NNODES )) || die "NODE_RANK = $NODE_RANK is not in 0 .. $((NNODES - 1))"
MASTER_ADDR="${MASTER_ADDR:-$HUB}"
[ "$MASTER_ADDR" = "$HUB" ] || echo "[learner.sh] note: MASTER_ADDR=$MASTER_ADDR and network.work_addr's host" \
    "$HUB must be the same machine (the NODE_RANK=0 node)" >&2
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
run torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node $((WORLD / NNODES)) \
    --rdzv-backend static --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" \
    -m minirl_async.cli learner -c "$CONFIG" "${OVERRIDES[@]}"
