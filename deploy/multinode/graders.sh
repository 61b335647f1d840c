#!/usr/bin/env bash
# The graders of a multi-node run, all on one (CPU) node: the host of network.rollout_addr, since grader i
# binds network.rollout_addr's port + i. Starts grader.num_graders graders (from the resolved config, the
# same count the samplers use to connect) that push ScoredGroups to the hub:
#   deploy/multinode/graders.sh CONFIG [key=value ...]
# MINIRL_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
. "$(dirname "$0")/_common.sh" "$@"
NUM="$(cfg grader.num_graders)"
same_as_config NUM_GRADERS "$NUM" grader.num_graders
trap stop_all EXIT
trap 'exit 143' TERM INT
for ((i = 0; i < NUM; i++)); do
    start env OMP_NUM_THREADS=1 minirl-async grader -c "$CONFIG" --index "$i" "${OVERRIDES[@]}"
done
wait
