"""Helpers for integration tests: real `minirl-async` processes on loopback with random free ports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def net_overrides(num_graders: int = 1) -> list[str]:
    """Four addresses; the rollout port gets num_graders consecutive free ports if it can."""
    for _ in range(50):
        p = free_ports(3 + num_graders)
        base = p[2]
        if num_graders == 1 or all(_free(base + i) for i in range(1, num_graders)):
            return [f"network.work_addr=tcp://127.0.0.1:{p[0]}", f"network.weights_addr=tcp://127.0.0.1:{p[1]}",
                    f"network.rollout_addr=tcp://127.0.0.1:{base}", f"network.scored_addr=tcp://127.0.0.1:{p[-1]}"]
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


FAKE = ["run.fake_compute=true", "run.progress=false", "run.fake_step_s=0.02", "learner.groups_per_step=4",
        "learner.minibatch_groups=4", "algo.group_size=4", "sampler.max_batch_size=8", "staleness.lease_s=8"]


def run_cli(run_dir: Path, overrides: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "minirl_async.cli", "run", "-c", "configs/tiny.toml", f"run.dir={run_dir}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[2])


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def trained_ids_by_step(run_dir: Path) -> dict[int, list[str]]:
    """Group ids of each step from events.log; a step redone after a learner restart keeps its last record
    (the rolled-back one never reached the final model)."""
    out: dict[int, list[str]] = {}
    for line in (run_dir / "events.log").read_text().splitlines():
        parts = line.split()
        if len(parts) > 4 and parts[1] == "step" and parts[3] == "trained":
            out[int(parts[2])] = parts[4].split(",")
    return out
