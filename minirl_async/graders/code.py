"""The `code` grader: runs a response's program against tests in sandboxed subprocesses, never in-process.

Task metadata: `tests` (Python source, e.g. asserts, that uses the program's functions, classes and
constants; pass = it finishes without an exception) and/or `test_cases` ([{"input": stdin, "output":
expected stdout}], compared after stripping). The program is the last fenced code block of the response, or
the whole response. Reward 1.0 when every test passes (or the fraction passed with `partial=True`).

Tests mode runs two sandboxes that share nothing but two pipes (`_harness.py` has the protocol): the
program's, which runs the response and then answers calls on its objects, and the judge's, which runs the
tests and alone decides the verdict. The program never sees the tests (they reach the judge through a
descriptor, never a file), cannot reach the judge's memory, frames or modules, and what it returns arrives
as plain data that the judge rebuilds as its own objects, so every comparison runs on the judge's types: an
object whose __eq__ always says yes comes back as a proxy that equals nothing, and a program that exits,
crashes or prints a forged verdict has no effect on the judge's. The tests' names that are builtins or
standard-library modules are always the judge's own (a program defining `abs` or `math` does not change
what the tests call); any other name the tests neither define nor import comes from the program, so tests
should import what they use (`from math import isclose`) rather than rely on the program's imports. A proxy
compares (==, <, +, ...) only with another proxy, `x in proxy` iterates it in the judge, and a `with` on a
proxy never swallows an exception. Limits of this mode: a test comparing a program object with plain data
(an instance with a custom __eq__ against an int) fails, isinstance() against a program class is not
supported, and the program's functions named like builtins are not visible to the tests.

What is enforced (`CodeGrader.enforced` lists what this machine allows; see `_isolation._probe`):
- one deadline per sample: `timeout_s` per run, and every run of a sample ends within `total_timeout_s`
  (and within the budget `GraderRunner` sets through `fit_time_budget`, below its own per-sample limit), so
  a program that loops forever scores 0 instead of failing the grader; on expiry the whole process group is
  SIGKILLed (and the PID namespace with it, below);
- RLIMIT_CPU, RLIMIT_AS (`memory_mb`: allocation past it raises MemoryError), RLIMIT_FSIZE (output and
  files), RLIMIT_NOFILE, no core dumps, RLIMIT_NPROC (`max_processes` beyond the uid's current count).
  These are per PROCESS: a run that forks can hold up to `memory_mb` x (`max_processes` + 1) in all (4.5 GB
  with the defaults), times `grader.concurrency` runs at once; size them together for the machine (no
  cgroup is used, so there is no per-run total);
- a distinct identity per concurrent run when the grader is root: the program and the judge of each run
  get their own uids (`uid_base` upwards, uids with no passwd/group entry), so runs cannot signal, trace or
  touch each other, and their files and process counts are apart; unprivileged graders run everything as
  themselves (inside a user namespace when possible, with every capability dropped);
- `unshare --net --pid --ipc --mount --mount-proc --fork --kill-child` when available: no network interface
  (the kernel refuses any connection), a PID namespace (every descendant dies with the run, /proc shows only
  the run), private System V IPC, and a private root built by the harness: read-only binds of the
  interpreter's and the system's directories only (`/usr`, `/lib*`, a few `/etc` files), a minimal `/dev`,
  and a private size-limited tmpfs `/tmp` owned 0700 by the run's uid as working directory and HOME (its
  only writable place with `/dev/shm`). Project files, data sets and the host's /tmp and /proc are not
  there. Without mount namespaces (old util-linux, no privileges): `--net --pid` when possible, else none,
  and a fresh 0700 temporary directory owned by the run's uid; the host filesystem is then readable;
- always: PR_SET_NO_NEW_PRIVS, and an audit hook refusing socket connect/bind/sendto/getaddrinfo (a
  pure-Python second line behind the network namespace); `python -I`. A root grader runs the system
  `python3` when its own interpreter is not executable by other users (e.g. under /root);
- outputs are read through descriptors the grader opened on anonymous files (never reopened by path), at most
  `max_output_mb`; inputs (program, tests, stdin) reach the sandbox the same way.

    grader = CodeGrader(timeout_s=5, memory_mb=512)
    await grader(Sample("...", "```python\\nprint(int(input()) * 2)\\n```", {"test_cases": [...]}))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from minirl_async.graders._harness import HARNESS, MARKER
from minirl_async.graders._isolation import (
    UID_BASE,
    _kill_uid,
    _Mode,
    _probe,
    _uid_slot,
    _user_process_count,
    _world_executable,
)
from minirl_async.graders.base import GradeResult, Sample

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)
# The sandbox modes probed so far, per (python, root, uid_base) (a test empties it to probe afresh).
_PROBE_CACHE: dict[tuple[str, bool, int], _Mode] = {}


def extract_code(text: str) -> str:
    """The last fenced code block of a response, else the whole response."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


@dataclass
class RunResult:
    status: str  # "ok" (exit 0; with tests: the judge's verdict), "error" (failed / killed by a limit), "timeout"
    returncode: int | None
    stdout: str
    stderr: str


# ---------------------------------------------------------------------------------------------------------
# The grader
# ---------------------------------------------------------------------------------------------------------


class CodeGrader:
    """Grades programs by running them against the task's tests in a sandbox (see module docstring)."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 8,
                 max_output_mb: int = 16, python: str = "", partial: bool = False,
                 total_timeout_s: float | None = None, uid_base: int = UID_BASE):
        if timeout_s <= 0 or memory_mb < 64:
            raise ValueError("code grader needs timeout_s > 0 and memory_mb >= 64 (Python itself needs ~30 MB)")
        if total_timeout_s is not None and total_timeout_s <= 0:
            raise ValueError("code grader needs total_timeout_s > 0 (or None: no limit beyond the runner's)")
        self.timeout_s, self.memory_mb, self.max_processes = timeout_s, memory_mb, max_processes
        self.max_output = max_output_mb << 20
        self.partial = partial
        self.total_timeout_s = total_timeout_s
        self._budget: float | None = None
        self.is_root = os.geteuid() == 0
        py = python or sys.executable
        if self.is_root and not _world_executable(py):
            # A run's uid cannot run an interpreter under /root: use the system one if it is reachable.
            system = shutil.which("python3", path="/usr/bin:/bin")
            if system and _world_executable(system) and not python:
                py = system
        self.python = os.path.realpath(py)
        self.uid_base = uid_base
        self.mode = _probe(self.python, self.is_root, uid_base, _PROBE_CACHE)
        if self.is_root and not (self.mode.uids or self.mode.shared_uid is not None):
            raise ValueError(f"code grader: running as root, and no sandbox here could run {self.python} under an "
                             "unprivileged uid; untrusted programs are not run as root (pass python= an "
                             "interpreter other users can execute)")
        self.enforced = ["wall_time_kill_process_group", "sample_deadline", "rlimit_cpu", "rlimit_memory",
                         "rlimit_file_size", "rlimit_open_files", "audit_hook_network", "no_new_privs",
                         "private_workdir", "tests_in_separate_process", *self.mode.names]
        if self.mode.uids or self.mode.shared_uid is not None or not self.is_root:
            self.enforced.append("rlimit_processes")  # RLIMIT_NPROC does not bind uid 0

    # -- time --------------------------------------------------------------------------------------------

    def fit_time_budget(self, seconds: float) -> None:
        """Called by GraderRunner with its per-sample limit: every run of a sample ends a margin before it,
        so a program that never ends scores 0 here instead of failing the grader (and dropping its group)."""
        budget = max(0.05, seconds - min(1.0, 0.2 * seconds))
        self._budget = budget if self._budget is None else min(self._budget, budget)

    @property
    def sample_timeout_s(self) -> float:
        """Wall-clock budget for all runs of one sample (inf when neither total_timeout_s nor a runner set one)."""
        limits = [t for t in (self.total_timeout_s, self._budget) if t is not None]
        return min(limits) if limits else math.inf

    # -- one run -----------------------------------------------------------------------------------------

    def _limits(self, nproc: int, timeout_s: float) -> Any:
        mem, cpu, fsize = self.memory_mb << 20, int(timeout_s) + 1, self.max_output

        def apply() -> None:  # runs in the child between fork and exec
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

        return apply

    def _workdir(self, stack: contextlib.ExitStack, uid: int | None) -> str:
        if self.mode.fs:
            return "/tmp"  # the private tmpfs the harness mounts, owned 0700 by uid
        d = tempfile.mkdtemp(prefix="minirl_code_")  # 0700
        stack.callback(shutil.rmtree, d, True)
        if uid is not None and self.is_root:
            os.chown(d, uid, uid)
        return d

    async def _spawn(self, stack: contextlib.ExitStack, role: str, uid: int | None, timeout_s: float,
                     stdin: int, stdout: int, stderr: int, fds: dict[str, int]) -> asyncio.subprocess.Process:
        workdir = self._workdir(stack, uid)
        cfg = {"role": role, "fs": self.mode.fs, "userns": self.mode.userns, "uid": uid,
               "fs_uid": uid if uid is not None else 0, "fs_mb": max(8, 4 * (self.max_output >> 20)),
               "expose": list(self.mode.expose), "stage": self.mode.stage, "workdir": workdir,
               **{f"{k}_fd" if k in ("prog", "tests", "verdict") else k: v for k, v in fds.items()}}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        nproc = _user_process_count(uid if uid is not None else os.geteuid()) + self.max_processes
        cmd = [*self.mode.prefix, self.python, "-I", "-c", HARNESS, json.dumps(cfg)]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=stdin, stdout=stdout, stderr=stderr, cwd="/", env=env, start_new_session=True,
            preexec_fn=self._limits(nproc, timeout_s), pass_fds=tuple(fds.values()),
        )
        if uid is not None and self.is_root and not self.mode.prefix:
            stack.callback(_kill_uid, uid)  # no PID namespace: leftovers of this uid die with the run
        return proc

    def _read(self, fd: int) -> str:
        return os.pread(fd, self.max_output, 0).decode(errors="replace")

    async def run_program(self, code: str, stdin: str = "", tests: str | None = None,
                          timeout_s: float | None = None) -> RunResult:
        """Run `code` once in the sandbox with `stdin` (or against `tests`); never raises for anything the
        program does. With `tests` the status is the judge's verdict: "ok" only when the judge ran every
        test and wrote its marker; the program's own exit status does not matter."""
        limit = self.timeout_s if timeout_s is None else max(0.0, min(self.timeout_s, timeout_s))
        with contextlib.ExitStack() as stack:
            prog_uid: int | None
            judge_uid: int | None
            if self.mode.uids:
                prog_uid, judge_uid = stack.enter_context(_uid_slot(self.uid_base))
            else:
                prog_uid = judge_uid = self.mode.shared_uid

            def anon(data: bytes = b"") -> int:
                f = stack.enter_context(tempfile.TemporaryFile())  # unlinked: the sandbox cannot swap it by path
                f.write(data)
                f.flush()
                f.seek(0)  # stdin is read from the start
                return f.fileno()

            prog_fd, out_fd, err_fd = anon(code.encode(errors="replace")), anon(), anon()
            procs: list[asyncio.subprocess.Process] = []
            try:
                if tests is None:
                    procs.append(await self._spawn(stack, "script", prog_uid, limit, anon(stdin.encode(errors="replace")),
                                                   out_fd, err_fd, {"prog": prog_fd}))
                else:
                    tests_fd, verdict_fd, jout_fd, jerr_fd = anon(tests.encode(errors="replace")), anon(), anon(), anon()
                    to_prog, to_judge = os.pipe(), os.pipe()
                    pipe_ends = [*to_prog, *to_judge]
                    try:
                        procs.append(await self._spawn(
                            stack, "program", prog_uid, limit, anon(), out_fd, err_fd,
                            {"prog": prog_fd, "rpc_in": to_prog[0], "rpc_out": to_judge[1]}))
                        procs.append(await self._spawn(
                            stack, "judge", judge_uid, limit, anon(), jout_fd, jerr_fd,
                            {"tests": tests_fd, "rpc_in": to_judge[0], "rpc_out": to_prog[1], "verdict": verdict_fd}))
                    finally:
                        for fd in pipe_ends:  # only the sandboxes hold the pipes: an end closing is seen at once
                            os.close(fd)
                status = "ok"
                try:
                    await asyncio.wait_for(procs[-1].wait(), limit)
                except TimeoutError:
                    status = "timeout"
            finally:
                for p in procs:  # orphans left in the groups (background children) die with the run in every case
                    self._kill_group(p.pid)
                for p in procs:
                    await p.wait()
            main = procs[-1]
            stdout, stderr = self._read(out_fd), self._read(err_fd)
            if tests is None:
                if status == "ok" and main.returncode != 0:
                    status = "error"
                return RunResult(status, main.returncode, stdout, stderr)
            judge_err = self._read(jerr_fd)
            passed = main.returncode == 0 and os.pread(verdict_fd, len(MARKER), 0) == MARKER
            if status == "ok" and not passed:
                status = "error"
            # The judge's account last (what failed); the program's stderr before it (why, e.g. a traceback).
            both = (stderr.rstrip("\n") + "\n" if stderr.strip() else "") + judge_err
            return RunResult(status, main.returncode, stdout, both)
        raise AssertionError("unreachable")  # pragma: no cover - the with block returns

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # -- a sample ----------------------------------------------------------------------------------------

    async def __call__(self, sample: Sample) -> GradeResult:
        tests, cases = sample.meta.get("tests"), sample.meta.get("test_cases")
        if not tests and not cases:
            raise ValueError("code grader: task metadata needs 'tests' (Python source) or 'test_cases'")
        code = extract_code(sample.response_text)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.sample_timeout_s
        results: list[tuple[bool, str]] = []

        async def run(stdin: str = "", tests: str | None = None) -> RunResult | None:
            left = deadline - loop.time()
            if left <= 0.05:  # the sample's budget is spent: the remaining runs are timeouts, not run at all
                return None
            return await self.run_program(code, stdin, tests, timeout_s=min(self.timeout_s, left))

        if tests:
            r = await run(tests=str(tests))
            if r is None:
                results.append((False, "timeout"))
            else:
                results.append((r.status == "ok", r.status if r.status != "error" else r.stderr[-300:]))
        for case in cases or []:
            r = await run(str(case.get("input", "")))
            if r is None:
                results.append((False, "timeout"))
                continue
            ok = r.status == "ok" and r.stdout.strip() == str(case.get("output", "")).strip()
            results.append((ok, r.status if r.status != "ok" else ("wrong output" if not ok else "ok")))
        passed = sum(ok for ok, _ in results)
        reward = passed / len(results) if self.partial else float(passed == len(results))
        first_fail = next((why for ok, why in results if not ok), None)
        return GradeResult(reward, {"passed": passed, "total": len(results), "failure": first_fail})
