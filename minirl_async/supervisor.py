"""Process supervision for the launcher: start services as child processes, notice crashes, restart them
up to a budget, and stop them all cleanly.

Each child runs in its own session (process group), so a Ctrl-C in the terminal reaches only the launcher,
which then stops the children in order: SIGTERM to every process of each service's tree, wait `grace_s`,
SIGKILL what is left.

A service's tree is more than its process group: torchrun starts its ranks with `start_new_session=True`,
so `killpg(torchrun)` never reaches them, and when a service's main process dies (SIGKILL, crash) its
children are reparented to init and are no longer its descendants. So every child is started with a
unique token appended to `MINIRL_SUPERVISOR_TOKENS` in its environment, which every descendant inherits
(torchrun and multiprocessing pass the environment on) and `/proc/<pid>/environ` keeps whatever the
process later does to `os.environ`. A service's tree (`_tree`) is then: the processes carrying one of its
tokens, those in the same process group or session as one of them, their descendants by parent pid, and
the pids recorded at the last `_track` (a descendant started with a clean environment is found through
its parent while the tree is intact, and remembered after that). Before a service is started again (a
restart) and at `stop()`, that whole tree -- the old generation's survivors included -- is terminated.

stdout+stderr of each child go to `RUN_DIR/logs/<name>.log`; `RUN_DIR/status/pids.json` lists the live
pids (tests use it to kill a service mid-run). Linux only (/proc).

    sup = Supervisor(run_dir, max_restarts=3, grace_s=10)
    sup.start(ServiceSpec("learner", [sys.executable, "-m", "minirl_async.cli", "learner", "-c", cfg_path]))
    for name, code in sup.poll(): ...      # exited children since the last poll
    sup.stop()
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

EXIT_RESTART = 75  # a service asking to be restarted (not a crash); same as services.common.EXIT_RESTART
TOKENS_VAR = "MINIRL_SUPERVISOR_TOKENS"
"""Colon-separated tokens of the supervised services a process descends from (nested launchers append)."""


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
    tokens: set[bytes] = field(default_factory=set)
    """This generation's token and those of earlier generations (their survivors are this service's too)."""
    known: dict[int, int] = field(default_factory=dict)
    """pid -> start time of the tree's processes at the last `_track` (a start time guards against pid reuse)."""


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks since boot (/proc/<pid>/stat field 22)
    zombie: bool
    tokens: frozenset[bytes]  # from its environment at exec (empty when unreadable: not ours)


def _processes() -> dict[int, _Proc]:
    """Every process on the machine (from /proc/<pid>/stat and /proc/<pid>/environ)."""
    out: dict[int, _Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            rest = data[data.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
            out[int(name)] = _Proc(int(name), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]),
                                   rest[0] in (b"Z", b"X"), _tokens_of(int(name)))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return out


_PREFIX = TOKENS_VAR.encode() + b"="


def _tokens_of(pid: int) -> frozenset[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:  # gone, or not ours to read
        return frozenset()
    if _PREFIX not in env:
        return frozenset()
    for entry in env.split(b"\0"):
        if entry.startswith(_PREFIX):
            return frozenset(entry[len(_PREFIX):].split(b":"))
    return frozenset()


class Supervisor:
    def __init__(self, run_dir: str | Path, max_restarts: int = 3, grace_s: float = 10.0, track_s: float = 1.0):
        self.run_dir = Path(run_dir)
        self.max_restarts, self.grace_s = max_restarts, grace_s
        self.track_s = track_s
        """How often `poll()` / `running()` record each service's tree (`_track`)."""
        self.children: dict[str, _Child] = {}
        self._last_track = 0.0
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "status").mkdir(parents=True, exist_ok=True)

    def _spawn(self, spec: ServiceSpec, token: bytes) -> subprocess.Popen[bytes]:
        env = {**os.environ, **spec.env}
        env[TOKENS_VAR] = ":".join(t for t in (os.environ.get(TOKENS_VAR, ""), token.decode()) if t)
        log = open(self.run_dir / "logs" / f"{spec.name}.log", "ab")
        try:
            return subprocess.Popen(spec.argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()  # the child holds its own descriptor

    def start(self, spec: ServiceSpec) -> None:
        old = self.children.get(spec.name)
        if old is not None and old.proc.poll() is None:
            raise ValueError(f"service {spec.name} is already running")
        if old is not None:  # what is left of the previous run (a crashed torchrun's ranks, ...)
            self._terminate([old], self.grace_s)
        (self.run_dir / "status" / f"{spec.name}.ready").unlink(missing_ok=True)
        token = secrets.token_hex(8).encode()
        tokens = (old.tokens if old is not None else set()) | {token}
        self.children[spec.name] = _Child(spec, self._spawn(spec, token), old.restarts if old else 0,
                                          tokens=tokens)
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
        self._maybe_track()
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
        """Start `name` again (after terminating what is left of it); False when its restart budget is spent
        (crashes only count)."""
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
        self._maybe_track()
        return name in self.children and self.children[name].proc.poll() is None

    # --- process trees ---------------------------------------------------------------------------------------

    def _tree(self, c: _Child, procs: dict[int, _Proc]) -> dict[int, int]:
        """pid -> start time of every live process of `c`'s service (all its generations)."""
        me = os.getpid()
        live = {p.pid: p for p in procs.values() if not p.zombie and p.pid != me}
        seeds = {pid for pid, p in live.items()
                 if c.known.get(pid) == p.start or not c.tokens.isdisjoint(p.tokens)}
        if c.proc.returncode is None and c.proc.pid in live:  # not reaped: the pid is still this child's
            seeds.add(c.proc.pid)
        # A group / session with one of the tree's live processes in it cannot have had its id reused.
        groups = {live[p].pgid for p in seeds} - {os.getpgrp()}
        sessions = {live[p].sid for p in seeds} - {os.getsid(0)}
        tree = seeds | {pid for pid, p in live.items() if p.pgid in groups or p.sid in sessions}
        kids: dict[int, list[int]] = {}
        for p in live.values():
            kids.setdefault(p.ppid, []).append(p.pid)
        stack = list(tree)
        while stack:
            for k in kids.get(stack.pop(), []):
                if k not in tree and k != me:
                    tree.add(k)
                    stack.append(k)
        return {pid: live[pid].start for pid in tree}

    def _track(self) -> None:
        """Record each service's tree, so a descendant is still known after its parent dies."""
        procs = _processes()
        for c in self.children.values():
            c.known = self._tree(c, procs)
        self._last_track = time.monotonic()

    def _maybe_track(self) -> None:
        if time.monotonic() - self._last_track >= self.track_s:
            self._track()

    def _terminate(self, chosen: list[_Child], grace: float) -> None:
        """SIGTERM every process of the chosen services' trees, SIGKILL what is left after `grace` seconds."""

        def sweep(sig: int, done: set[tuple[int, int]]) -> bool:
            procs = _processes()
            found = False
            for c in chosen:
                c.proc.poll()
                c.known = self._tree(c, procs)
                for pid, start in c.known.items():
                    found = True
                    if (pid, start) not in done:
                        try:
                            os.kill(pid, sig)
                        except (ProcessLookupError, PermissionError):
                            pass
                        done.add((pid, start))
            return found

        termed: set[tuple[int, int]] = set()
        deadline = time.monotonic() + grace
        while sweep(signal.SIGTERM, termed) and time.monotonic() < deadline:  # new processes get one too
            time.sleep(0.05)
        deadline = time.monotonic() + 5.0  # SIGKILL cannot be caught: this only catches forks in flight
        while sweep(signal.SIGKILL, set()) and time.monotonic() < deadline:
            time.sleep(0.02)
        for c in chosen:
            c.proc.wait()

    def stop(self, names: list[str] | None = None, grace_s: float | None = None) -> dict[str, int | None]:
        """SIGTERM the named (default all) services' process trees, SIGKILL after the grace period; exit
        codes of their main processes."""
        grace = self.grace_s if grace_s is None else grace_s
        chosen = [self.children[n] for n in (names if names is not None else list(self.children))]
        self._terminate(chosen, grace)
        self._write_pids()
        return {c.spec.name: c.proc.returncode for c in chosen}
