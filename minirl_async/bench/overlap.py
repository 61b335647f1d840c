"""Bench `overlap`: the same number of steps of the tiny pipeline, synchronous (max_staleness = 0) and
asynchronous (max_staleness = 1), in one run. Both use real processes (`minirl-async run`) on loopback.

    minirl-async bench overlap [--quick] --json

The machine is shared, so the runs are interleaved and the 1-minute load average is reported: overlap
can only win when a core is free for each stage. Figures per mode: wall seconds of the measured steps (step 0 is excluded: it includes start-up), the
sampler busy fraction (time inside `generate` over that window) and the learner busy fraction (time inside
the train step). `ratio` = async wall / sync wall (ideal for two balanced stages on two cores: 0.5).
With the real engine and trainer importable the tiny model runs (random initial weights: throughput does
not depend on quality); otherwise the fakes of `run.fake_compute` stand in, each keeping one core busy per
batch / step, so the stages still compete for real CPU. `compute` says which.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _real_available() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("minirl_async.learner.trainer", "minirl_async.engine.torch_fp8"))


def tiny_config_path() -> str:
    """Absolute path of the repository's configs/tiny.toml: under the working directory, else next to this
    package's source tree (so the bench runs from any directory of a checkout or an editable install)."""
    here = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"
    for path in (Path.cwd() / "configs" / "tiny.toml", here):
        if path.is_file():
            return str(path)
    raise FileNotFoundError("bench overlap runs the repository's configs/tiny.toml, found neither under the "
                            f"working directory nor at {here}: run it from a checkout of minirl-async")


def _random_checkpoint(folder: Path) -> str:
    """A randomly initialised tiny model + tokenizer (no SFT: the bench measures time, not accuracy)."""
    from minirl_async.config import load_config
    from minirl_async.models.hf_io import save_hf
    from minirl_async.tasks.sft import build_model
    from minirl_async.tasks.tokenizer import load_tokenizer

    cfg = load_config(tiny_config_path())
    tok = load_tokenizer(cfg)
    model, mcfg = build_model(cfg, tok)
    save_hf(model, mcfg, folder)
    tok.save(folder)
    return str(folder)


def _busy_in(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in intervals)


def _one(mode: str, eta: int, steps: int, root: Path, extra: list[str]) -> dict[str, Any]:
    run_dir = root / mode
    p = _free_ports(4)
    cmd = [sys.executable, "-m", "minirl_async.cli", "run", "-c", tiny_config_path(), f"run.dir={run_dir}",
           f"learner.num_steps={steps}", f"staleness.max_staleness={eta}", "run.progress=false",
           "run.eval_after=false", "learner.checkpoint_every=0",
           f"network.work_addr=tcp://127.0.0.1:{p[0]}", f"network.weights_addr=tcp://127.0.0.1:{p[1]}",
           f"network.rollout_addr=tcp://127.0.0.1:{p[2]}", f"network.scored_addr=tcp://127.0.0.1:{p[3]}", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"bench overlap: {mode} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lo, hi = rows[0]["time"], rows[-1]["time"]  # from the end of step 0 to the end of the last step
    learner = [(r["time_train_start"], r["time_train_end"]) for r in rows[1:]]
    sampler: list[tuple[float, float]] = []
    for f in (run_dir / "status").glob("sampler-*.busy"):
        for line in f.read_text().splitlines():
            a, b, _ = line.split()
            sampler.append((float(a), float(b)))
    wall = hi - lo
    return {f"{mode}_wall_s": round(wall, 3),
            f"{mode}_sampler_busy_frac": round(_busy_in(sampler, lo, hi) / wall, 3),
            f"{mode}_learner_busy_frac": round(_busy_in(learner, lo, hi) / wall, 3),
            f"{mode}_max_version_lag": max(r["staleness/version_lag_max"] for r in rows)}


def run(quick: bool) -> dict[str, Any]:
    """Quick: one sync and one async run of 6 steps. Full: 12 steps, sync/async/async/sync interleaved (the
    machine's load drifts; interleaving spreads it evenly) and each figure averaged over the two runs."""
    steps = 6 if quick else 12
    order = [("sync", 0), ("async", 1)] if quick else [("sync", 0), ("async", 1), ("async", 1), ("sync", 0)]
    real = _real_available()
    with tempfile.TemporaryDirectory(prefix="minirl-overlap-") as tmp:
        root = Path(tmp)
        if real:
            extra = [f"run.sft_checkpoint={_random_checkpoint(root / 'init')}", "learner.threads=1",
                     "sampler.threads=1"]
        else:
            extra = ["run.fake_compute=true", f"run.fake_step_s={0.15 if quick else 0.3}"]
        t0 = time.monotonic()
        figures: dict[str, Any] = {"compute": "real" if real else "fake", "steps_measured": steps - 1,
                                   "runs_per_mode": len(order) // 2, "loadavg_1m_start": round(os.getloadavg()[0], 2)}
        runs: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
        for i, (mode, eta) in enumerate(order):
            runs[mode].append(_one(mode, eta, steps, root / str(i), extra))
        for results in runs.values():
            for key in results[0]:
                vals = [r[key] for r in results]
                figures[key] = round(sum(vals) / len(vals), 3) if key.endswith(("_s", "_frac")) else max(vals)
        figures["ratio"] = round(figures["async_wall_s"] / figures["sync_wall_s"], 3)
        figures["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
        figures["bench_s"] = round(time.monotonic() - t0, 1)
    return figures
