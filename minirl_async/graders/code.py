"""The `code` grader: runs a response's program against tests in a sandboxed subprocess, never in-process.

Task metadata: `tests` (Python source run after the program, in its namespace; pass = they finish without
an exception, e.g. asserts) and/or
`test_cases` ([{"input": stdin, "output": expected stdout}], compared after stripping). The program is the
last fenced code block of the response, or the whole response. Reward 1.0 when every test passes (or the
fraction passed with `partial=True`).

What is enforced (`CodeGrader.enforced` lists what this machine allows; see `_probe_prefix`):
- wall-clock `timeout_s`; on expiry the whole process group is SIGKILLed (and the PID namespace, below);
- RLIMIT_CPU, RLIMIT_AS (`memory_mb`: allocation past it raises MemoryError), RLIMIT_FSIZE (output and
  files), RLIMIT_NOFILE, no core dumps, RLIMIT_NPROC (`max_processes` beyond the user's current count:
  fork bombs hit it; root ignores NPROC, so when the grader runs as root the child runs as `nobody`);
- `unshare --net --pid --fork --kill-child` when available: a network namespace with no interface (the
  kernel refuses any connection) and a PID namespace, so every descendant (even one that left the process
  group) dies with the child; unprivileged users get it through a user namespace (`--map-root-user`);
- always, as a second line: an audit hook in the child refusing socket connect/bind/sendto/getaddrinfo
  (a pure-Python guard; native code could bypass it, the namespace cannot be bypassed);
- a fresh temporary directory as cwd and HOME, removed afterwards; `python -I` (no user site, no env vars);
- tests cannot be skipped by leaving early: the harness runs the program (a SystemExit there fails), then
  the tests, then prints a per-run random nonce that it read from a pipe and closed before the program
  started; the run passes only if that nonce is in stdout, so `sys.exit(0)`, `os._exit(0)`, an atexit hook
  or a signal before the tests end all fail. The program and the tests share one interpreter (the tests
  need its functions), so this stops exits and harness tampering through builtins, files and descriptors,
  not a program written to dig the nonce out of the harness's frames in memory.

    grader = CodeGrader(timeout_s=5, memory_mb=512)
    await grader(Sample("...", "```python\\nprint(int(input()) * 2)\\n```", {"test_cases": [...]}))
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minirl_async.graders.base import GradeResult, Sample

NOBODY = 65534

_HARNESS = r'''
import sys
def _no_network(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                 "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        raise PermissionError("network access is disabled in the code grader")
sys.addaudithook(_no_network)


def _run_script(prog):  # stdin/stdout cases: the program alone, as __main__; its output is what is graded
    import runpy
    sys.argv = [prog]
    runpy.run_path(prog, run_name="__main__")


def _run_with_tests(prog, tests_path, nonce_fd):
    # Everything the epilogue needs is read or bound here, before the program runs: the program may
    # rewrite the files, rebind builtins (exec, compile, print) or module attributes (os.write, sys.exit).
    import builtins, os, types
    _exec, _compile, _write, _exit, _settrace, _setprofile = exec, compile, os.write, os._exit, \
        sys.settrace, sys.setprofile
    with open(prog) as f:
        prog_src = f.read()
    with open(tests_path) as f:
        tests_src = f.read()
    with os.fdopen(nonce_fd, "rb") as f:  # closed now: the program cannot read it from the descriptor
        nonce = f.read()
    err = sys.stderr

    def fail(msg):
        try:
            sys.stdout.flush()
        except Exception:
            pass
        err.write(msg + "\n")
        err.flush()
        _exit(1)

    mod = types.ModuleType("__main__")
    mod.__file__, mod.__builtins__ = prog, builtins
    sys.modules["__main__"] = mod
    sys.argv = [prog]
    try:
        _exec(_compile(prog_src, prog, "exec"), mod.__dict__)
    except SystemExit as e:
        fail(f"the program exited (SystemExit({e.code!r})) before the tests ran")
    _settrace(None)  # a trace function could jump over the asserts
    _setprofile(None)
    try:
        _exec(_compile(tests_src, "tests.py", "exec"), mod.__dict__)
    except SystemExit as e:
        fail(f"SystemExit({e.code!r}) raised while the tests ran")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    # Reached only when every test ran and passed; an exit anywhere earlier (sys.exit, os._exit, a signal,
    # an atexit hook) never writes it, and the program cannot print it itself: it never saw the nonce.
    _write(1, b"\n" + nonce + b"\n")
    _exit(0)


if len(sys.argv) == 2:
    _run_script(sys.argv[1])
else:
    _run_with_tests(sys.argv[1], sys.argv[2], int(sys.argv[3]))
'''

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last fenced code block of a response, else the whole response."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _world_executable(path: str) -> bool:
    """Can an unprivileged user (nobody) execute `path` (every parent directory searchable)?"""
    p = Path(os.path.realpath(path))
    for d in p.parents:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return False
    mode = os.stat(p).st_mode
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


def _user_process_count(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                n += os.stat(f"/proc/{pid}").st_uid == uid
            except OSError:
                pass
    return n


@dataclass
class RunResult:
    status: str  # "ok" (exit 0), "error" (non-zero exit / killed by a limit), "timeout"
    returncode: int | None
    stdout: str
    stderr: str


_PROBE_CACHE: dict[tuple[str, bool], tuple[list[str], list[str]]] = {}


def _probe_prefix(python: str, drop_to_nobody: bool) -> tuple[list[str], list[str]]:
    """The strongest sandbox prefix that works here, and the names of what it enforces."""
    key = (python, drop_to_nobody)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    candidates: list[tuple[list[str], list[str]]] = []
    if shutil.which("unshare"):
        ns = ["--net", "--pid", "--fork", "--kill-child"]
        if os.geteuid() == 0:
            if drop_to_nobody:
                candidates.append((["unshare", *ns, "--setuid", str(NOBODY), "--setgid", str(NOBODY)],
                                   ["network_namespace", "pid_namespace", "unprivileged_user"]))
            candidates.append((["unshare", *ns], ["network_namespace", "pid_namespace"]))
        else:
            candidates.append((["unshare", "--user", "--map-root-user", *ns], ["network_namespace", "pid_namespace"]))
    for prefix, names in candidates:
        try:
            r = subprocess.run([*prefix, python, "-I", "-c", "pass"], capture_output=True, timeout=20)
            if r.returncode == 0:
                _PROBE_CACHE[key] = (prefix, names)
                return prefix, names
        except (OSError, subprocess.TimeoutExpired):
            pass
    _PROBE_CACHE[key] = ([], [])
    return [], []


class CodeGrader:
    """Grades programs by running them against the task's tests in a sandbox (see module docstring)."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 32,
                 max_output_mb: int = 16, python: str = "", partial: bool = False):
        if timeout_s <= 0 or memory_mb < 64:
            raise ValueError("code grader needs timeout_s > 0 and memory_mb >= 64 (Python itself needs ~30 MB)")
        self.timeout_s, self.memory_mb, self.max_processes = timeout_s, memory_mb, max_processes
        self.max_output = max_output_mb << 20
        self.partial = partial
        self.is_root = os.geteuid() == 0
        py = python or sys.executable
        if self.is_root and not _world_executable(py):
            # nobody cannot run an interpreter under /root: use the system one if it is reachable.
            system = shutil.which("python3", path="/usr/bin:/bin")
            if system and _world_executable(system) and not python:
                py = system
        self.python = os.path.realpath(py)
        self.prefix, ns_names = _probe_prefix(self.python, self.is_root and _world_executable(self.python))
        self.run_uid = NOBODY if "unprivileged_user" in ns_names else os.geteuid()
        self.enforced = ["wall_time_kill_process_group", "rlimit_cpu", "rlimit_memory", "rlimit_file_size",
                         "rlimit_open_files", "audit_hook_network", "temp_dir", *ns_names]
        if not self.is_root or self.run_uid != 0:
            self.enforced.append("rlimit_processes")  # RLIMIT_NPROC does not bind uid 0

    def _limits(self, nproc: int) -> Any:
        mem, cpu, fsize = self.memory_mb << 20, int(self.timeout_s) + 1, self.max_output

        def apply() -> None:  # runs in the child between fork and exec
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

        return apply

    async def run_program(self, code: str, stdin: str = "", tests: str | None = None) -> RunResult:
        """Run `code` once in the sandbox with `stdin`; never raises for anything the program does.

        With `tests`, the tests run after the program in its namespace, and the run is "ok" only when the
        harness printed this run's nonce after them (see `_run_with_tests` in the harness): a program that
        exits early, with any status, is an "error"."""
        tmp = Path(tempfile.mkdtemp(prefix="minirl_code_"))
        nonce_r = -1
        try:
            (tmp / "prog.py").write_text(code)
            (tmp / "harness.py").write_text(_HARNESS)
            (tmp / "stdin.txt").write_text(stdin)
            args = [str(tmp / "prog.py")]
            nonce = ""
            if tests is not None:
                (tmp / "tests.py").write_text(tests)
                # The nonce travels through a pipe the harness reads and closes before the program starts:
                # not on the command line, in the environment or in a file the program could read.
                nonce = f"minirl-tests-passed-{secrets.token_hex(16)}"
                nonce_r, nonce_w = os.pipe()
                os.write(nonce_w, nonce.encode())
                os.close(nonce_w)
                args += [str(tmp / "tests.py"), str(nonce_r)]
            if self.run_uid == NOBODY:
                os.chmod(tmp, 0o777)
                for f in tmp.iterdir():
                    os.chmod(f, 0o644)
            env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
            cmd = [*self.prefix, self.python, "-I", str(tmp / "harness.py"), *args]
            nproc = _user_process_count(self.run_uid) + self.max_processes
            with open(tmp / "stdin.txt", "rb") as fin, open(tmp / "out.txt", "wb") as fout, \
                    open(tmp / "err.txt", "wb") as ferr:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=tmp, env=env, start_new_session=True,
                    preexec_fn=self._limits(nproc), pass_fds=(nonce_r,) if nonce_r >= 0 else (),
                )
                if nonce_r >= 0:
                    os.close(nonce_r)
                    nonce_r = -1
                status = "ok"
                try:
                    await asyncio.wait_for(proc.wait(), self.timeout_s)
                except (TimeoutError, asyncio.CancelledError) as e:
                    status = "timeout"
                    self._kill_group(proc.pid)
                    await proc.wait()
                    if isinstance(e, asyncio.CancelledError):
                        raise
                # Orphans left in the group (background children) die with the run in every case.
                self._kill_group(proc.pid)
            read = lambda name: (tmp / name).read_bytes()[: self.max_output].decode(errors="replace")  # noqa: E731
            stdout, stderr = read("out.txt"), read("err.txt")
            if status == "ok" and proc.returncode != 0:
                status = "error"
            if tests is not None and status == "ok":
                if f"\n{nonce}\n" in stdout:
                    stdout = stdout.replace(f"\n{nonce}\n", "")
                else:
                    status = "error"
                    stderr = (stderr.rstrip("\n") + "\n" if stderr else "") + \
                        "the program ended with status 0 before the tests finished (exit / os._exit)"
            return RunResult(status, proc.returncode, stdout, stderr)
        finally:
            if nonce_r >= 0:
                os.close(nonce_r)
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def __call__(self, sample: Sample) -> GradeResult:
        tests, cases = sample.meta.get("tests"), sample.meta.get("test_cases")
        if not tests and not cases:
            raise ValueError("code grader: task metadata needs 'tests' (Python source) or 'test_cases'")
        code = extract_code(sample.response_text)
        results: list[tuple[bool, str]] = []
        if tests:
            r = await self.run_program(code, tests=str(tests))
            results.append((r.status == "ok", r.status if r.status != "error" else r.stderr[-300:]))
        for case in cases or []:
            r = await self.run_program(code, str(case.get("input", "")))
            ok = r.status == "ok" and r.stdout.strip() == str(case.get("output", "")).strip()
            results.append((ok, r.status if r.status != "ok" else ("wrong output" if not ok else "ok")))
        passed = sum(ok for ok, _ in results)
        reward = passed / len(results) if self.partial else float(passed == len(results))
        first_fail = next((why for ok, why in results if not ok), None)
        return GradeResult(reward, {"passed": passed, "total": len(results), "failure": first_fail})
