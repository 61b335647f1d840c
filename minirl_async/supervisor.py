"""Process supervision for the launcher: start services as child processes, notice crashes, restart them
up to a budget, and stop them all cleanly.

Each child runs in its own session (process group), so a signal reaches the child AND whatever it started
(torchrun's workers, an engine's helpers), and a Ctrl-C in the terminal reaches only the launcher, which
then stops the children in order: SIGTERM to every group, wait `grace_s`, SIGKILL what is left.
stdout+stderr of each child go to `RUN_DIR/logs/<name>.log`; `RUN_DIR/status/pids.json` lists the live
pids (tests use it to kill a service mid-run).

    sup = Supervisor(run_dir, max_restarts=3, grace_s=10)
    sup.start(ServiceSpec("learner", [sys.executable, "-m", "minirl_async.cli", "learner", "-c", cfg_path]))
    for name, code in sup.poll(): ...      # exited children since the last poll
    sup.stop_all()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

EXIT_RESTART = 75  # a service asking to be restarted (not a crash); same as services.common.EXIT_RESTART


@dataclass
class ServiceSpec:
    """How to start one service."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables (thread counts, ...)."""


@dataclass
class _Child:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes]
    restarts: int = 0
    reported: bool = False


class Supervisor:
    def __init__(self, run_dir: str | Path, max_restarts: int = 3, grace_s: float = 10.0):
        self.run_dir = Path(run_dir)
        self.max_restarts, self.grace_s = max_restarts, grace_s
        self.children: dict[str, _Child] = {}
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "status").mkdir(parents=True, exist_ok=True)

    def _spawn(self, spec: ServiceSpec) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / "logs" / f"{spec.name}.log", "ab")
        try:
            return subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()  # the child holds its own descriptor

    def start(self, spec: ServiceSpec) -> None:
        if spec.name in self.children and self.children[spec.name].proc.poll() is None:
            raise ValueError(f"service {spec.name} is already running")
        (self.run_dir / "status" / f"{spec.name}.ready").unlink(missing_ok=True)
        restarts = self.children[spec.name].restarts if spec.name in self.children else 0
        self.children[spec.name] = _Child(spec, self._spawn(spec), restarts)
        self._write_pids()

    def _write_pids(self) -> None:
        pids = {n: c.proc.pid for n, c in self.children.items() if c.proc.poll() is None}
        tmp = self.run_dir / "status" / "pids.json.tmp"
        tmp.write_text(json.dumps(pids))
        tmp.replace(self.run_dir / "status" / "pids.json")

    def is_ready(self, name: str) -> bool:
        return (self.run_dir / "status" / f"{name}.ready").is_file()

    def poll(self) -> list[tuple[str, int]]:
        """(name, exit code) of every child that exited since the last poll (negative code: signal)."""
        out = []
        for name, c in self.children.items():
            code = c.proc.poll()
            if code is not None and not c.reported:
                c.reported = True
                out.append((name, code))
        if out:
            self._write_pids()
        return out

    def restart(self, name: str, crashed: bool = True) -> bool:
        """Start `name` again; False when its restart budget is spent (crashes only count)."""
        c = self.children[name]
        if crashed:
            if c.restarts >= self.max_restarts:
                return False
            c.restarts += 1
        self.start(c.spec)
        return True

    def restarts(self, name: str) -> int:
        return self.children[name].restarts

    def running(self, name: str) -> bool:
        return name in self.children and self.children[name].proc.poll() is None

    def _signal(self, c: _Child, sig: int) -> None:
        try:
            os.killpg(c.proc.pid, sig)  # the child's session: it and everything it started
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, names: list[str] | None = None, grace_s: float | None = None) -> dict[str, int | None]:
        """SIGTERM the named (default all) children's groups, SIGKILL after the grace period; exit codes."""
        grace = self.grace_s if grace_s is None else grace_s
        chosen = [self.children[n] for n in (names if names is not None else list(self.children))]
        for c in chosen:
            if c.proc.poll() is None:
                self._signal(c, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in chosen):
            time.sleep(0.05)
        for c in chosen:
            if c.proc.poll() is None:
                self._signal(c, signal.SIGKILL)
                c.proc.wait()
            else:
                self._signal(c, signal.SIGKILL)  # leftovers in its group (e.g. torchrun workers)
        self._write_pids()
        return {c.spec.name: c.proc.returncode for c in chosen}
