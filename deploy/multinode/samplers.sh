#!/usr/bin/env bash
# SGLang samplers on one GPU node: GPUS_PER_NODE / TP processes of TP GPUs each, TP = sampler.sglang.tp_size
# of the resolved config, with sampler indices FIRST_INDEX, FIRST_INDEX+1, ... (unique across nodes: they are
# the samplers' ids at the learner), never beyond sampler.num_samplers - 1:
#   FIRST_INDEX=0 GPUS_PER_NODE=8 deploy/multinode/samplers.sh CONFIG [key=value ...]
# Each connects to the hub's work/weights addresses and to every grader's rollout address (config).
# MINIRL_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
. "$(dirname "$0")/_common.sh" "$@"
FIRST_INDEX="${FIRST_INDEX:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
V="$(cfg sampler.sglang.tp_size sampler.num_samplers)"; read -r TP_SIZE NUM <<<"$V"
same_as_config TP "$TP_SIZE" sampler.sglang.tp_size
(( GPUS_PER_NODE % TP_SIZE == 0 )) || die "GPUS_PER_NODE = $GPUS_PER_NODE is not a multiple of TP = $TP_SIZE"
(( FIRST_INDEX < NUM )) || die "FIRST_INDEX = $FIRST_INDEX but sampler.num_samplers = $NUM"
LAST=$((FIRST_INDEX + GPUS_PER_NODE / TP_SIZE))
(( LAST <= NUM )) || LAST=$NUM
trap stop_all EXIT
trap 'exit 143' TERM INT
for ((i = FIRST_INDEX; i < LAST; i++)); do
    g=$((i - FIRST_INDEX))
    start env CUDA_VISIBLE_DEVICES="$(seq -s, $((g * TP_SIZE)) $((g * TP_SIZE + TP_SIZE - 1)))" \
        minirl-async sampler -c "$CONFIG" --index "$i" "${OVERRIDES[@]}"
done
wait
