#!/usr/bin/env bash
# Fresh machine to a finished run: create .venv, install, run the tiny default pipeline on the CPU
# (cold-start SFT, then asynchronous MiniRL with an FP8 sampler, a grader and an FSDP2 learner as
# separate processes), and print where the results are. Extra arguments are config overrides.
set -euo pipefail
. "$(dirname "$0")/_env.sh"
RUN_DIR="${RUN_DIR:-runs/quickstart}"
case "$RUN_DIR" in /*) ;; *) RUN_DIR="$ROOT/$RUN_DIR" ;; esac
for arg in "$@"; do  # a run.dir=... argument wins over RUN_DIR (the launcher takes the last one)
    case "$arg" in run.dir=*) RUN_DIR="${arg#run.dir=}"; case "$RUN_DIR" in /*) ;; *) RUN_DIR="$ROOT/$RUN_DIR" ;; esac ;; esac
done
minirl-async run -c configs/tiny.toml run.dir="$RUN_DIR" "$@"
echo
echo "Results: $RUN_DIR  (metrics.jsonl, eval.json, report/summary.md, report/*.png, checkpoints/)"
