#!/usr/bin/env bash
# SGLang samplers on one node: one process per GPU (sampler.sglang.tp_size GPUs each), sampler indices
# FIRST_INDEX, FIRST_INDEX+1, ... (unique across nodes: they are the samplers' ids at the learner).
#   FIRST_INDEX=0 GPUS_PER_NODE=8 deploy/multinode/samplers.sh CONFIG [key=value ...]
# Each connects to the hub's work/weights addresses and to every grader's rollout address (config).
set -euo pipefail
CONFIG="$1"; shift
FIRST_INDEX="${FIRST_INDEX:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP="${TP:-1}"
PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null || true; wait' EXIT INT TERM
for ((g = 0; g < GPUS_PER_NODE / TP; g++)); do
    DEVICES="$(seq -s, $((g * TP)) $((g * TP + TP - 1)))"
    CUDA_VISIBLE_DEVICES="$DEVICES" minirl-async sampler -c "$CONFIG" --index $((FIRST_INDEX + g)) "$@" &
    PIDS+=("$!")
done
wait
