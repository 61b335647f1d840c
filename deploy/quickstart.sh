#!/usr/bin/env bash
# Fresh machine to a finished run: create .venv, install, run the tiny default pipeline on the CPU
# (cold-start SFT, then asynchronous MiniRL with an FP8 sampler, a grader and an FSDP2 learner as
# separate processes), and print where the results are. Extra arguments are config overrides.
set -euo pipefail
. "$(dirname "$0")/_env.sh"
RUN_DIR="${RUN_DIR:-runs/quickstart}"
case "$RUN_DIR" in /*) ;; *) RUN_DIR="$ROOT/$RUN_DIR" ;; esac
minirl-async run -c configs/tiny.toml run.dir="$RUN_DIR" "$@"
# (a run.dir=... argument overrides RUN_DIR: the launcher's last line names the directory it used)
echo
echo "Results: the run directory above  (metrics.jsonl, eval.json, report/summary.md, report/*.png, checkpoints/)"
