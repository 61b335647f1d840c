"""`minirl-async run`: the whole pipeline on this machine, supervised.

    minirl-async run -c configs/tiny.toml [key=value ...]

1. Refuses a config that cannot work (clashing addresses, ...), writes RUN_DIR/config.toml (resolved).
2. Cold start: without `run.sft_checkpoint` or `model.path`, runs the cold-start SFT into RUN_DIR/sft
   (reused if it is already there) and points the run at it.
3. Starts the learner (torchrun when `learner.world_size > 1`), `grader.num_graders` graders and
   `sampler.num_samplers` samplers as child processes, each with its own torch thread count (learner
   `learner.threads`, samplers `sampler.threads`, graders 1), and waits for each to be ready.
4. Shows live progress (step, reward, KL, staleness, replay mode, throughput) from metrics.jsonl,
   restarts a crashed service (up to `run.max_restarts` each), stops everything on Ctrl-C / SIGTERM or
   when the learner finishes.
5. Evaluates the cold-start and the final checkpoints (`run.eval_after`) into RUN_DIR/eval.json and
   writes RUN_DIR/report/.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from minirl_async.services.common import config_of, sanity_errors

from minirl_async.config import Config, ConfigError, save_config
from minirl_async.supervisor import EXIT_RESTART, ServiceSpec, Supervisor


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "minirl_async.cli", *args]


def service_specs(cfg: Config, cfg_path: Path) -> list[ServiceSpec]:
    """Learner first, then graders, then samplers (each connects to what is already bound)."""
    c = str(cfg_path)
    lr = cfg.learner
    learner_argv = _cli("learner", "-c", c)
    if lr.world_size > 1:
        learner_argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={lr.world_size}", "-m", "minirl_async.cli", "learner", "-c", c]
    specs = [ServiceSpec("learner", learner_argv, {"OMP_NUM_THREADS": str(lr.threads)})]
    specs += [ServiceSpec(f"grader-{i}", _cli("grader", "-c", c, "--index", str(i)), {"OMP_NUM_THREADS": "1"})
              for i in range(cfg.grader.num_graders)]
    specs += [ServiceSpec(f"sampler-{i}", _cli("sampler", "-c", c, "--index", str(i)),
                          {"OMP_NUM_THREADS": str(cfg.sampler.threads)}) for i in range(cfg.sampler.num_samplers)]
    return specs


def cold_start(cfg: Config, run_dir: Path) -> Config:
    """Point the run at a starting checkpoint, running the cold-start SFT first if there is none."""
    if cfg.run.sft_checkpoint or cfg.model.path or cfg.run.fake_compute:
        return cfg
    out = run_dir / "sft"
    if not (out / "config.json").is_file():
        from minirl_async.tasks.sft import train_sft

        print(f"[run] no checkpoint named: cold-start SFT into {out}", flush=True)
        summary = train_sft(cfg, out, progress=cfg.run.progress)
        print(f"[run] SFT done: {json.dumps(summary)}", flush=True)
    else:
        print(f"[run] reusing the cold-start checkpoint {out}", flush=True)
    cfg = cfg.model_copy(deep=True)
    cfg.run.sft_checkpoint = str(out)
    return cfg


class Progress:
    """Tails metrics.jsonl into a progress bar (or a plain line per step when progress is off)."""

    def __init__(self, path: Path, total: int, enabled: bool):
        from minirl_async.progress import progress_bar

        self.path, self.offset = path, path.stat().st_size if path.is_file() else 0
        self.bar = progress_bar(total=total, desc="rl", enabled=enabled)
        self.last: dict[str, Any] = {}
        self.enabled = enabled

    def update(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind("\n")
        if end < 0:
            return
        self.offset += len(chunk[: end + 1].encode())
        for line in chunk[: end + 1].splitlines():
            try:
                row = json.loads(line)
            except ValueError:   # a display must not take the run down; read_metrics reports bad lines
                continue
            self.last = row
            done = int(row.get("version", row.get("step", 0) + 1))
            mode = {0: "none", 2: "R2", 3: "R3"}.get(row.get("replay/mode", -1), "?")
            self.bar.set_postfix(reward=f"{row.get('reward/mean', 0):.3f}", kl=f"{row.get('kl/train_infer_k3', 0):.2e}",
                                 lag=row.get("staleness/lag_updates_max"), replay=mode,
                                 tok_s=f"{row.get('perf/sample_tok_s', 0):.0f}", refresh=False)
            self.bar.update(done - self.bar.n)  # redraws at the bar's own pace (a line every few s in a log)
            if not self.enabled:
                print(f"[run] step {row.get('step')} reward {row.get('reward/mean', 0):.3f} replay {mode}", flush=True)

    def close(self) -> None:
        self.bar.close()


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "    (no log)"


def _event(run_dir: Path, text: str) -> None:
    with open(run_dir / "events.log", "a") as ev:
        ev.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")


def supervise(cfg: Config, sup: Supervisor, specs: list[ServiceSpec], run_dir: Path) -> int:
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for spec in specs:
            sup.start(spec)
            deadline = time.monotonic() + cfg.run.ready_timeout_s
            while not sup.is_ready(spec.name):
                if stop["signal"]:
                    return 128 + stop["signal"]
                if not sup.running(spec.name) or time.monotonic() > deadline:
                    log_path = run_dir / "logs" / (spec.name + ".log")
                    print(f"[run] {spec.name} did not become ready; the end of {log_path}:", flush=True)
                    print(_tail(log_path), flush=True)   # a config error found at start-up is usually here
                    return 1
                time.sleep(0.05)
        print(f"[run] {len(specs)} services ready; logs in {run_dir / 'logs'}", flush=True)
        progress = Progress(run_dir / "metrics.jsonl", cfg.learner.num_steps, cfg.run.progress)
        try:
            while not stop["signal"]:
                progress.update()
                exited = sup.poll()
                if ("learner", 0) in exited:
                    progress.update()
                    print("[run] learner finished", flush=True)
                    return 0
                for name, code in exited:
                    # Exit 0: told to stop by the learner (the run is done; the learner exits right after).
                    # A service stopped by a signal mid-run exits 128 + signum (services.common.stop_code):
                    # restarted, counted against the budget like a crash.
                    if code == 0:
                        continue
                    if not sup.restart(name, crashed=code != EXIT_RESTART):
                        print(f"[run] {name} exited with {code}: it crashed more than run.max_restarts = "
                              f"{cfg.run.max_restarts} times; giving up (see {run_dir / 'logs' / (name + '.log')})",
                              flush=True)
                        _event(run_dir, f"launcher: {name} exited {code}, restart budget spent: giving up")
                        return 1
                    print(f"[run] {name} exited with {code}; restarted", flush=True)
                    _event(run_dir, f"launcher: {name} exited {code}, restarted")
                time.sleep(0.2)
            print(f"[run] stopped by signal {stop['signal']}", flush=True)
            return 128 + stop["signal"]
        finally:
            progress.close()
    finally:
        sup.stop()
        for s, h in old.items():
            signal.signal(s, h)


def finish(cfg: Config, run_dir: Path) -> None:
    """Eval of the cold start and the final policy (eval.json), then the report."""
    from minirl_async.report import write_report

    if cfg.run.eval_after and not cfg.run.fake_compute and (run_dir / "final" / "config.json").is_file():
        from minirl_async.tasks.evaluate import evaluate

        res: dict[str, Any] = {}
        for label, ckpt in (("cold_start", cfg.run.sft_checkpoint or cfg.model.path), ("final", str(run_dir / "final"))):
            if ckpt:
                r = evaluate(cfg, ckpt)
                res[f"{label} pass@1"], res[f"{label} greedy"] = r["pass@1"], r["greedy_acc"]
                print(f"[run] eval {label}: {json.dumps(r)}", flush=True)
        (run_dir / "eval.json").write_text(json.dumps(res, indent=1))
    if (run_dir / "metrics.jsonl").is_file():
        print(f"[run] report: {write_report(run_dir)}", flush=True)


def main(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    errors = sanity_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))
    run_dir = Path(cfg.run.dir).resolve()
    cfg = cfg.model_copy(deep=True)
    cfg.run.dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = cold_start(cfg, run_dir)
    cfg_path = run_dir / "config.toml"
    save_config(cfg, cfg_path)
    sup = Supervisor(run_dir, cfg.run.max_restarts, cfg.run.stop_grace_s)
    code = supervise(cfg, sup, service_specs(cfg, cfg_path), run_dir)
    if code == 0:
        finish(cfg, run_dir)
    print(f"[run] run directory: {run_dir}", flush=True)
    return code
