#!/usr/bin/env bash
# Graders on one (CPU) node: grader i binds network.rollout_addr's port + i, so all graders of a run live
# on the node whose address is in network.rollout_addr; they push ScoredGroups to the hub.
#   NUM_GRADERS=4 deploy/multinode/graders.sh CONFIG [key=value ...]
set -euo pipefail
CONFIG="$1"; shift
NUM_GRADERS="${NUM_GRADERS:-4}"
PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null || true; wait' EXIT INT TERM
for ((i = 0; i < NUM_GRADERS; i++)); do
    OMP_NUM_THREADS=1 minirl-async grader -c "$CONFIG" --index "$i" "$@" &
    PIDS+=("$!")
done
wait
