#!/usr/bin/env bash
# Fresh machine to a finished run: create .venv, install, run the tiny default pipeline on the CPU
# (cold-start SFT, then asynchronous MiniRL with an FP8 sampler, a grader and an FSDP2 learner as
# separate processes), and print where the results are. Extra arguments are config overrides.
set -euo pipefail
. "$(dirname "$0")/_env.sh"
RUN_DIR="${RUN_DIR:-runs/quickstart}"
minirl-async run -c configs/tiny.toml run.dir="$RUN_DIR" "$@"
echo
echo "Results: $ROOT/$RUN_DIR  (metrics.jsonl, report/summary.md, report/*.png, checkpoints/)"
