#!/usr/bin/env bash
# Start every service as its own process on this machine from one config, without the supervising
# launcher (for debugging a service, or as the template of a hand-made deployment):
#   deploy/local.sh [[-c] CONFIG] [key=value ...]        (default config: configs/tiny.toml)
# Cold-start SFT runs first when the config names no checkpoint (run.sft_checkpoint / model.path).
# Logs go to RUN_DIR/logs/<service>.log; Ctrl-C stops everything; the script returns the learner's status.
set -euo pipefail
CONFIG=configs/tiny.toml
if [ "${1:-}" = "-c" ]; then CONFIG="$2"; shift 2
elif [ $# -gt 0 ] && [[ "$1" != *=* ]]; then CONFIG="$1"; shift; fi
# a config path relative to where the script was called from (_env.sh changes to the repository)
if [ -e "$CONFIG" ]; then CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"; fi
. "$(dirname "$0")/_env.sh"
OVERRIDES=("$@")

# Read values of the resolved config (file + overrides) with the project's own loader.
cfg() { python - "$CONFIG" "$1" "${OVERRIDES[@]}" <<'PY'
import sys
from minirl_async.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[3:])
except ConfigError as e:
    sys.exit(f"[local] config error: {e}")
value = cfg
for part in sys.argv[2].split("."):
    value = getattr(value, part)
print(value)
PY
}
RUN_DIR="$(cfg run.dir)"
mkdir -p "$RUN_DIR/logs"
if [ -z "$(cfg run.sft_checkpoint)" ] && [ -z "$(cfg model.path)" ] && [ "$(cfg run.fake_compute)" != "True" ]; then
    if [ ! -f "$RUN_DIR/sft/config.json" ]; then
        echo "[local] cold-start SFT into $RUN_DIR/sft"
        minirl-async sft -c "$CONFIG" "${OVERRIDES[@]}" --out "$RUN_DIR/sft"
    fi
    OVERRIDES+=("run.sft_checkpoint=$RUN_DIR/sft")
fi
NUM_SAMPLERS="$(cfg sampler.num_samplers)"
NUM_GRADERS="$(cfg grader.num_graders)"
WORLD_SIZE="$(cfg learner.world_size)"

PIDS=()
stop() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait || true; }
trap stop EXIT INT TERM

if [ "$WORLD_SIZE" -gt 1 ]; then
    torchrun --standalone --nproc-per-node "$WORLD_SIZE" -m minirl_async.cli learner -c "$CONFIG" \
        "${OVERRIDES[@]}" >"$RUN_DIR/logs/learner.log" 2>&1 &
else
    minirl-async learner -c "$CONFIG" "${OVERRIDES[@]}" >"$RUN_DIR/logs/learner.log" 2>&1 &
fi
LEARNER=$!
PIDS+=("$LEARNER")
for ((i = 0; i < NUM_GRADERS; i++)); do
    minirl-async grader -c "$CONFIG" "${OVERRIDES[@]}" --index "$i" >"$RUN_DIR/logs/grader-$i.log" 2>&1 &
    PIDS+=("$!")
done
for ((i = 0; i < NUM_SAMPLERS; i++)); do
    minirl-async sampler -c "$CONFIG" "${OVERRIDES[@]}" --index "$i" >"$RUN_DIR/logs/sampler-$i.log" 2>&1 &
    PIDS+=("$!")
done
echo "[local] learner $LEARNER, $NUM_GRADERS grader(s), $NUM_SAMPLERS sampler(s); logs in $RUN_DIR/logs"
set +e
wait "$LEARNER"
STATUS=$?
set -e
echo "[local] learner exited with $STATUS; metrics in $RUN_DIR/metrics.jsonl"
exit "$STATUS"
