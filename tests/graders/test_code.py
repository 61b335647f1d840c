"""The code grader: right and wrong programs, stdin/stdout cases, and hostile programs (infinite loop, fork
bomb, memory hog, network access, background children) killed or refused at their limits while the grader
process is unharmed and keeps grading. Reward hacks against the tests mode (always-equal objects, digging in
the harness's frames, shadowing builtins, reading or rewriting the tests), runs attacking each other,
programs reading the host's files, swapping their output files for a FIFO or a symlink, and the per-sample
deadline under the runner. The main isolation tests run both with the strongest sandbox this machine allows
and with the fallback used when `unshare` is missing."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from minirl_async.graders import code
from minirl_async.graders.base import Sample
from minirl_async.graders.code import CodeGrader, extract_code
from minirl_async.graders.runner import GraderRunner

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def grader() -> CodeGrader:
    return CodeGrader(timeout_s=2.0, memory_mb=256, max_processes=16)


@pytest.fixture(scope="module")
def fallback_grader() -> Iterator[CodeGrader]:
    """The sandbox a machine without `unshare` gets (per-run uids when root, a private 0700 directory)."""
    real = shutil.which
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(code.shutil, "which", lambda name, *a, **k: None if name == "unshare" else real(name, *a, **k))
        mp.setattr(code, "_PROBE_CACHE", {})
        g = CodeGrader(timeout_s=2.0, memory_mb=256, max_processes=16)
    assert g.mode.prefix == () and not g.mode.fs
    yield g


def _grade(grader: CodeGrader, response: str, **meta: object) -> tuple[float, dict]:
    out = asyncio.run(grader(Sample("write add", response, dict(meta))))
    return out.reward, out.info


def test_extract_code() -> None:
    assert extract_code("text\n```python\nx = 1\n```\nmore ```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("print(1)") == "print(1)"


def test_correct_and_wrong_programs(grader: CodeGrader) -> None:
    assert _grade(grader, "```python\ndef add(a, b):\n    return a + b\n```", tests=TESTS)[0] == 1.0
    reward, info = _grade(grader, "def add(a, b):\n    return a - b\n", tests=TESTS)
    assert reward == 0.0 and "AssertionError" in info["failure"]


def test_stdin_stdout_cases_and_partial_credit(grader: CodeGrader) -> None:
    cases = [{"input": "3\n", "output": "6"}, {"input": "5\n", "output": "10"}, {"input": "1\n", "output": "3"}]
    prog = "print(int(input()) * 2)"
    assert _grade(grader, prog, test_cases=cases)[0] == 0.0
    partial = CodeGrader(timeout_s=2.0, memory_mb=256, partial=True)
    assert _grade(partial, prog, test_cases=cases)[0] == pytest.approx(2 / 3)


def test_infinite_loop_is_killed_at_the_time_limit(grader: CodeGrader) -> None:
    t0 = time.monotonic()
    reward, info = _grade(grader, "while True:\n    pass\n", tests=TESTS)
    assert reward == 0.0 and info["failure"] == "timeout"
    assert time.monotonic() - t0 < 10


def _children_of_me() -> int:
    me = str(os.getpid())
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    n += f.read().rsplit(")", 1)[1].split()[1] == me
            except OSError:
                pass
    return n


def test_fork_bomb_is_contained(grader: CodeGrader) -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    reward, info = _grade(grader, bomb, tests=TESTS)
    assert reward == 0.0
    time.sleep(0.2)
    assert _children_of_me() == 0  # nothing left behind
    assert _grade(grader, "def add(a, b):\n    return a + b\n", tests=TESTS)[0] == 1.0  # grader unharmed


def test_background_children_die_with_the_run(grader: CodeGrader, tmp_path: object) -> None:
    # A program that leaves a detached child sleeping: the child must not outlive the grading.
    prog = ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],"
            " start_new_session=True)\ndef add(a, b):\n    return a + b\n")
    assert _grade(grader, prog, tests=TESTS)[0] == 1.0
    time.sleep(0.3)
    if "pid_namespace" in grader.enforced:
        out = os.popen("pgrep -f 'time.sleep\\(30\\)'").read().split()
        assert out == []


def test_memory_hog_hits_the_memory_limit(grader: CodeGrader) -> None:
    reward, info = _grade(grader, "x = bytearray(2 * 1024**3)\n", tests=TESTS)
    assert reward == 0.0 and "MemoryError" in info["failure"]


def test_network_is_refused(grader: CodeGrader) -> None:
    # a listener of the host: without isolation the connection succeeds and the run passes
    import socket

    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        prog = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
        reward, info = _grade(grader, prog, tests="pass")
    assert reward == 0.0 and any(e in info["failure"] for e in ("PermissionError", "Connection", "unreachable"))


def test_network_namespace_has_no_interface(grader: CodeGrader) -> None:
    if "network_namespace" not in grader.enforced:
        pytest.skip("unshare is not available here: only the audit-hook guard applies")
    prog = "import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo'], socket.if_nameindex()\n"
    assert _grade(grader, prog, tests="pass")[0] == 1.0


def test_missing_tests_is_a_grader_error(grader: CodeGrader) -> None:
    with pytest.raises(ValueError, match="'tests'"):
        _grade(grader, "print(1)")


ADD = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("exit_stmt", [
    "import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n", "exit()\n", "quit(0)\n",
])
def test_exiting_before_the_tests_is_a_failure(grader: CodeGrader, exit_stmt: str) -> None:
    # The program is wrong (add subtracts) and leaves before the asserts can run: that must not pass.
    wrong = "def add(a, b):\n    return a - b\n"
    reward, info = _grade(grader, f"```python\n{wrong}{exit_stmt}```", tests=TESTS)
    assert reward == 0.0, info
    # Even a right program that exits early is not credited: the tests never ran.
    assert _grade(grader, ADD + exit_stmt, tests=TESTS)[0] == 0.0


@pytest.mark.parametrize("body", ["import os\n    os._exit(0)", "import sys\n    sys.exit(0)",
                                  "import atexit, os\n    atexit.register(os._exit, 0)\n    return 0"])
def test_exiting_from_inside_the_tested_function_is_a_failure(grader: CodeGrader, body: str) -> None:
    assert _grade(grader, f"def add(a, b):\n    {body}\n", tests=TESTS)[0] == 0.0


TAMPERING = [
    "import builtins\nbuiltins.exec = lambda *a, **k: None\n",  # skip the tests
    "import builtins\nbuiltins.compile = lambda *a, **k: compile('pass', 't', 'exec')\n",
    "open('tests.py', 'w').write('pass')\n",  # rewrite the tests on disk
    # read every other open descriptor and the command line, print all of it, leave
    "import os, sys\nfor fd in range(3, 64):\n    try:\n        print(os.read(fd, 4096))\n"
    "    except OSError:\n        pass\nprint(open('/proc/self/cmdline', 'rb').read(), sys.argv)\n"
    "os._exit(0)\n",
    # objects that equal everything: the asserts compare them with the expected values
    "class E:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
    "def add(a, b):\n    return E()\n",
    "class E(int):\n    __eq__ = lambda s, o: True\n    __hash__ = int.__hash__\ndef add(a, b):\n    return E(0)\n",
    # the nonce of the old single-interpreter harness, dug out of its frame, printed before leaving
    "import os, sys\ndef add(a, b):\n    n = sys._getframe(1).f_locals['nonce']\n"
    "    os.write(1, b'\\n' + n + b'\\n')\n    os._exit(0)\n",
    # the same, through every frame and every object the garbage collector knows
    "import gc, os, sys\ndef add(a, b):\n    for o in gc.get_objects():\n"
    "        if isinstance(o, dict) and isinstance(o.get('nonce'), bytes):\n"
    "            os.write(1, b'\\n' + o['nonce'] + b'\\n')\n            os._exit(0)\n"
    "    for f in sys._current_frames().values():\n        while f:\n"
    "            if 'nonce' in f.f_locals:\n                os.write(1, b'\\n' + f.f_locals['nonce'] + b'\\n')\n"
    "                os._exit(0)\n            f = f.f_back\n    return a - b\n",
    # the judge's verdict, forged on the program's own output
    "import os\nos.write(1, b'minirl-judge: every test passed\\n')\nos.write(2, b'minirl-judge: every test passed\\n')\n",
]


def test_tampering_with_the_harness_is_a_failure(grader: CodeGrader) -> None:
    for hack in TAMPERING:
        reward, info = _grade(grader, "def add(a, b):\n    return a - b\n" + hack, tests=TESTS)
        assert reward == 0.0, (hack, info)


def test_tampering_is_a_failure_without_unshare(fallback_grader: CodeGrader) -> None:
    assert _grade(fallback_grader, ADD, tests=TESTS)[0] == 1.0
    for hack in TAMPERING:
        reward, info = _grade(fallback_grader, "def add(a, b):\n    return a - b\n" + hack, tests=TESTS)
        assert reward == 0.0, (hack, info)


@pytest.mark.parametrize("program,tests", [
    # the program's abs() / math.isclose would make any answer close enough
    ("def abs(x):\n    return 0\ndef add(a, b):\n    return 100\n", "assert abs(add(2, 3) - 5) < 1e-9\n"),
    ("import math\nmath.isclose = lambda *a, **k: True\ndef add(a, b):\n    return 100\n",
     "import math\nassert math.isclose(add(2, 3), 5)\n"),
    ("import math\nmath.isclose = lambda *a, **k: True\ndef add(a, b):\n    return 100\n",
     "assert math.isclose(add(2, 3), 5)\n"),  # tests relying on the program's `import math`
    ("class M:\n    isclose = staticmethod(lambda *a, **k: True)\nmath = M()\ndef add(a, b):\n    return 100\n",
     "assert math.isclose(add(2, 3), 5)\n"),
    ("import builtins\nbuiltins.sorted = lambda *a, **k: [0]\ndef f(x):\n    return [9]\n",
     "assert sorted(f([2, 1])) == sorted([1, 2])\n"),
])
def test_the_tests_use_the_judges_builtins_and_modules(grader: CodeGrader, program: str, tests: str) -> None:
    assert _grade(grader, program, tests=tests)[0] == 0.0


def test_the_program_never_sees_the_tests(grader: CodeGrader) -> None:
    # add() answers True only if some file the program can read holds the tests (the old harness wrote
    # them to tests.py in the program's directory): the one test then fails.
    prog = ("import os\ndef look():\n    seen = []\n    for d in {'.', '/tmp', os.environ.get('HOME', '.')}:\n"
            "        for name in os.listdir(d):\n            try:\n"
            "                seen.append(open(os.path.join(d, name), errors='replace').read())\n"
            "            except OSError:\n                pass\n    return seen\n"
            "def add(a, b):\n    return 'zebra' + '-7391' in ''.join(look())\n")
    reward, info = _grade(grader, prog, tests="assert add(2, 3) is False  # zebra-7391\n")
    assert reward == 1.0, info


RPC_CASES = {
    "class": ("class Solution:\n    def two(self, nums, t):\n        seen = {}\n        for i, x in enumerate(nums):\n"
              "            if t - x in seen:\n                return [seen[t - x], i]\n            seen[x] = i\n",
              "assert Solution().two([2, 7, 11, 15], 9) == [0, 1]\ns = Solution()\nassert s.two([3, 3], 6) == [0, 1]\n"),
    "check(candidate)": ("def close(xs, t):\n    return any(abs(a - b) < t for i, a in enumerate(xs) for b in xs[i + 1:])\n",
                         "def check(candidate):\n    assert candidate([1.0, 2.0, 3.9], 0.3) == False\n"
                         "    assert candidate([1.0, 2.8, 3.0], 0.3) == True\ncheck(close)\n"),
    "in place": ("def srt(a):\n    a.sort()\ndef put(d):\n    d['k'] = 1\n",
                 "x = [3, 1, 2]\nsrt(x)\nassert x == [1, 2, 3]\nd = {}\nput(d)\nassert d == {'k': 1}\n"),
    "callback": ("def apply(f, xs):\n    return [f(x) for x in xs]\n", "assert apply(lambda v: v * 2, [1, 2]) == [2, 4]\n"),
    "generator": ("def g(n):\n    for i in range(n):\n        yield i * i\n",
                  "assert list(g(4)) == [0, 1, 4, 9]\nit = g(2)\nassert next(it) == 0\n"),
    "exceptions": ("class Bad(ValueError):\n    pass\ndef f(x):\n    if x < 0:\n        raise Bad('negative')\n"
                   "    return {}[x]\n",
                   "try:\n    f(-1)\n    assert False\nexcept Bad as e:\n    assert 'negative' in str(e)\n"
                   "try:\n    f(-1)\nexcept ValueError:\n    pass\ntry:\n    f(3)\nexcept KeyError as e:\n"
                   "    assert e.args == (3,)\n"),
    "plain data": ("from fractions import Fraction\nfrom collections import Counter, deque, namedtuple\nP = namedtuple('P', 'x y')\n"
                   "def f():\n    return (1, 2.5, 'x', b'y', {1: [2, (3,)]}, {4}, frozenset([5]), None, True, 3 + 4j,"
                   " Fraction(1, 3), Counter('aab'), deque([1]), 10 ** 30, float('inf'), P(1, 2))\n",
                   "from fractions import Fraction\nfrom collections import Counter, deque\n"
                   "assert f() == (1, 2.5, 'x', b'y', {1: [2, (3,)]}, {4}, frozenset([5]), None, True, 3 + 4j,"
                   " Fraction(1, 3), Counter('aab'), deque([1]), 10 ** 30, float('inf'), (1, 2))\n"),
    "objects": ("class Node:\n    def __init__(self, v, nxt=None):\n        self.v, self.nxt = v, nxt\n"
                "    def __eq__(self, o):\n        return isinstance(o, Node) and self.v == o.v\n"
                "    def __len__(self):\n        return 1 if self.nxt is None else 1 + len(self.nxt)\n"
                "def build(xs):\n    h = None\n    for x in reversed(xs):\n        h = Node(x, h)\n    return h\n",
                "h = build([1, 2, 3])\nassert h.v == 1 and h.nxt.v == 2 and len(h) == 3\nassert h == Node(1)\n"
                "h.v = 9\nassert h.v == 9\n"),
    # the judge's objects the program may use: instances of the tests' classes, a stream, a generator
    "judge objects": ("def walk(node, out):\n    while node is not None:\n        out.append(node.v)\n"
                      "        node.seen = True\n        node = node.nxt\n    return out\n"
                      "def first_line(f):\n    return f.readline().strip()\ndef total(it):\n    return sum(it)\n",
                      "import io\nclass N:\n    def __init__(self, v, nxt=None):\n        self.v, self.nxt = v, nxt\n"
                      "n = N(1, N(2))\nassert walk(n, []) == [1, 2] and n.seen and n.nxt.seen\n"
                      "assert first_line(io.StringIO('7 8\\n9')) == '7 8'\nassert total(x * x for x in range(4)) == 14\n"),
    "globals and imports": ("import math\nMOD = 10 ** 9 + 7\nTABLE = [1, 2, 3]\ndef f():\n    return MOD\n",
                            "assert f() == MOD and TABLE[1] == 2 and math.sqrt(4) == 2\n"),
}




# Ways from a judge object's public attributes back to the judge's builtins: each would run code in the
# judge (here: write the verdict and exit) if the program could follow it.
_FORGE = ("b.exec(\"import os, sys, json; c = json.loads(sys.argv[1]); os.write(c['verdict_fd'], "
          "b'minirl-judge: every test passed\\\\n'); os._exit(0)\", {})\n")
JUDGE_ESCAPES = {
    "generator frame": ("def total(it):\n    b = it.gi_frame.f_globals['__builtins__']\n    " + _FORGE + "    return -1\n",
                        "assert total(x * x for x in range(4)) == 14\nassert 1 == 2\n"),
    "callback's frame via a traceback": (
        "def total(f):\n    try:\n        f()\n    except Exception as e:\n        tb = e.__traceback__\n"
        "    return -1\n", "def boom():\n    raise ValueError('x')\nassert total(boom) == 14\nassert 1 == 2\n"),
    "class of a test object": ("def total(o):\n    m = o.helper.__class__\n    return -1\n",
                               "class T:\n    helper = len\nassert total(T()) == 14\nassert 1 == 2\n"),
    "a test's function object": ("def total(f):\n    g = f.__globals__['__builtins__']\n    return -1\n",
                                 "assert total(lambda: 0) == 14\nassert 1 == 2\n"),
    "module handed over": ("def total(m):\n    b = m.sys.modules['builtins']\n    " + _FORGE + "    return -1\n",
                           "import os\nassert total(os) == 14\nassert 1 == 2\n"),
}


@pytest.mark.parametrize("name,want", [(n, 1.0) for n in sorted(RPC_CASES)] + [(n, 0.0) for n in sorted(JUDGE_ESCAPES)])
def test_the_tests_use_the_program_through_plain_data_and_it_cannot_reach_the_judge(
        grader: CodeGrader, name: str, want: float) -> None:
    program, tests = {**RPC_CASES, **JUDGE_ESCAPES}[name]
    reward, info = _grade(grader, program, tests=tests)
    assert reward == want, info


def test_program_objects_never_equal_plain_data(grader: CodeGrader) -> None:
    # An object of the program is a proxy in the judge: equal to nothing but itself, whatever its __eq__.
    prog = "class V:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\ndef f():\n    return V()\n"
    tests = "v = f()\nassert v != 5 and not (v == [5]) and v not in [1, 2] and v == v\nassert f() == f()\n"
    assert _grade(grader, prog, tests=tests)[0] == 1.0  # two program objects compare with the program's __eq__
    # Nor can a program object answer membership or swallow a failed assert in a `with` block.
    hacks = [
        ("class C:\n    def __contains__(self, x):\n        return True\n    def __iter__(self):\n"
         "        return iter([])\ndef primes(n):\n    return C()\n", "assert 7 in primes(10)\n"),
        ("class C:\n    def __enter__(self):\n        return 0\n    def __exit__(self, *a):\n        return True\n"
         "def ctx():\n    return C()\n", "with ctx() as v:\n    assert v == 1\n"),
        # a StopIteration out of a call would end the map() early: all() of nothing is True
        ("def add(a, b):\n    raise StopIteration\n", "assert all(map(lambda c: add(*c[0]) == c[1], [((2, 3), 5)]))\n"),
    ]
    for prog, tests in hacks:
        assert _grade(grader, prog, tests=tests)[0] == 0.0, prog


def test_programs_that_print_or_use_main_still_pass(grader: CodeGrader) -> None:
    prog = ADD + "print('hello', end='')\nif __name__ == '__main__':\n    print(add(1, 2))\n"
    assert _grade(grader, prog, tests=TESTS)[0] == 1.0
    # Tests that fail are still failures, whatever the program printed.
    reward, info = _grade(grader, prog, tests="assert add(1, 1) == 3\n")
    assert reward == 0.0 and "AssertionError" in info["failure"]
    # A program exiting after printing the right output is fine for stdin/stdout cases.
    cases = [{"input": "3\n", "output": "6"}]
    assert _grade(grader, "import sys\nprint(int(input()) * 2)\nsys.exit(0)\n", test_cases=cases)[0] == 1.0


ATTACKER = """
import glob, os, signal, time
EVIL = (b"import os, sys\\nif len(sys.argv) > 3:\\n    os.write(1, b'\\\\n' + os.read(int(sys.argv[3]), 100) + b'\\\\n')\\n")
end, i = time.time() + 3.0, 0
while time.time() < end:
    # every other run's files it can find: rewrite the tests, replace the harness (one that prints the
    # nonce it is handed), blank the outputs
    patterns = ['/tmp/minirl_code_*/']
    if i % 25 == 0:
        patterns += ['/tmp/*/', '/var/tmp/*/', '/dev/shm/*/', '/proc/*/cwd/', '/proc/*/root/tmp/']
    i += 1
    for pattern in patterns:
        for d in glob.glob(pattern):
            for name, data in (('harness.py', EVIL), ('tests.py', b'pass\\n'), ('out.txt', b''), ('err.txt', b'')):
                target, tmp = os.path.join(d, name), os.path.join(d, '.minirl-attack')
                if not os.path.exists(target):
                    continue
                try:  # a file of its own renamed over theirs (a directory anyone may write to allows it)
                    with open(tmp, 'wb') as f:
                        f.write(data)
                    os.replace(tmp, target)
                except OSError:
                    try:
                        os.remove(tmp)
                    except OSError:
                        pass
    for sig in (signal.SIGKILL, signal.SIGSTOP):
        try:
            os.kill(-1, sig)  # every process this uid may signal
        except OSError:
            pass
print('done')
"""


def _concurrent_runs(g: CodeGrader) -> list[float]:
    wrong = "import time\ntime.sleep(0.3)\ndef add(a, b):\n    return a - b\n"
    slow_right = "import time\ntime.sleep(0.3)\n" + ADD

    async def main() -> list[float]:
        attack = asyncio.ensure_future(g(Sample("p", ATTACKER, {"test_cases": [{"input": "", "output": "done"}]})))
        await asyncio.sleep(0.5)  # the attacker is scanning when the others start
        others = []
        for i in range(10):
            others.append(asyncio.ensure_future(g(Sample("p", wrong if i % 2 == 0 else slow_right, {"tests": TESTS}))))
            await asyncio.sleep(0.15)
        outs = await asyncio.gather(*others)
        await attack
        return [o.reward for o in outs]

    return asyncio.run(main())


@pytest.mark.parametrize("which", ["grader", "fallback_grader"])
def test_concurrent_runs_cannot_change_each_others_reward(which: str, request: pytest.FixtureRequest) -> None:
    g: CodeGrader = request.getfixturevalue(which)
    if os.geteuid() != 0 and g.mode.prefix == ():
        pytest.skip("runs share the grader's own uid and filesystem here: nothing keeps them apart")
    assert _concurrent_runs(g) == [0.0, 1.0] * 5


def _mount_namespaces_work() -> bool:
    """Can this machine give a run a private mount and PID namespace (what the grader should then use)?"""
    if not shutil.which("unshare"):
        return False
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    try:
        return subprocess.run(["unshare", *user, "--mount", "--mount-proc", "--pid", "--fork", "--kill-child", "true"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_the_sandbox_sees_neither_the_hosts_proc_nor_its_files(grader: CodeGrader, tmp_path: Path) -> None:
    if not _mount_namespaces_work():
        pytest.skip("no mount namespaces here: the sandbox sees the host's filesystem")
    host_file = Path(tempfile.mkdtemp(prefix="minirl_host_")) / "secret.txt"  # in the host's /tmp
    host_file.write_text("host-secret-4417")
    host_file.parent.chmod(0o755)
    host_file.chmod(0o644)  # readable by anyone on the host
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        probe = f"minirl-probe-{os.getpid()}-{time.time_ns()}"
        prog = ("import os\ndef read(p):\n    try:\n        with open(p, 'rb') as f:\n            return f.read()\n"
                "    except OSError as e:\n        return type(e).__name__.encode()\n"
                f"print(read('/proc/1/cmdline'))\nprint(read({str(host_file)!r}))\nprint(read({__file__!r})[:40])\n"
                f"print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\nprint(os.path.exists({here!r}))\n"
                f"for d in ('/tmp', '/var/tmp', '/dev/shm', '/'):\n    try:\n        open(os.path.join(d, {probe!r}), 'w').close()\n"
                "        print('wrote', d)\n    except OSError as e:\n        print('refused', d)\n")
        r = asyncio.run(grader.run_program(prog))
        assert r.status == "ok", r
        lines = r.stdout.splitlines()
        with open("/proc/1/cmdline", "rb") as f:
            host_init = f.read()
        assert repr(host_init) not in lines[0] and "harness" in lines[0], lines  # its own pid 1: the harness
        assert lines[1] == "b'FileNotFoundError'" and lines[2] == "b'FileNotFoundError'", lines
        assert lines[3] == "['1']" and lines[4] == "False", lines
        assert lines[5:] == ["wrote /tmp", "refused /var/tmp", "wrote /dev/shm", "refused /"], lines
        assert not any(Path(d, probe).exists() for d in ("/tmp", "/var/tmp", "/dev/shm", "/"))
    finally:
        shutil.rmtree(host_file.parent)


def _in_thread_with_timeout(fn: Any, seconds: float) -> Any:
    """fn() in a daemon thread: a grader that blocks its event loop shows up as a timeout here, not a hang."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"grading did not finish within {seconds}s"
    return out[0]


def test_swapping_the_output_files_for_a_fifo_does_not_stall_the_grader(grader: CodeGrader) -> None:
    prog = ("import os\nfor name in ('out.txt', 'err.txt', 'stdin.txt'):\n    try:\n        os.rename(name, name + '.old')\n"
            "    except OSError:\n        pass\n    try:\n        os.mkfifo(name)\n    except OSError:\n        pass\n"
            "print(int(input()) * 2)\n")
    t0 = time.monotonic()
    reward, info = _in_thread_with_timeout(lambda: _grade(grader, prog, test_cases=[{"input": "3\n", "output": "6"}]),
                                           grader.timeout_s + 8)
    assert reward == 1.0, info
    assert time.monotonic() - t0 < grader.timeout_s + 5


def test_output_symlinks_leak_nothing(grader: CodeGrader) -> None:
    # A file the sandbox's identity cannot read; a program that swaps its output for a link to it (or to
    # /dev/zero) must neither get the file's content graded as its output nor make the grader read forever.
    secret_dir = Path(tempfile.mkdtemp(prefix="minirl_secret_"))  # 0700, the grader's
    secret = secret_dir / "key.txt"
    secret.write_text("root-only-5521\n")
    try:
        for target in (str(secret), "/dev/zero"):
            prog = ("import os, sys\nfor name in ('out.txt', 'err.txt'):\n    try:\n        os.remove(name)\n"
                    "    except OSError:\n        pass\n    try:\n"
                    f"        os.symlink({target!r}, name)\n    except OSError:\n        pass\n")
            cases = [{"input": "", "output": "root-only-5521"}]
            reward, info = _in_thread_with_timeout(lambda p=prog, c=cases: _grade(grader, p, test_cases=c), grader.timeout_s + 8)
            assert reward == 0.0, (target, info)
            r = asyncio.run(grader.run_program(prog + f"print(open({str(secret)!r}).read())\n"))
            assert "root-only-5521" not in r.stdout + r.stderr
    finally:
        shutil.rmtree(secret_dir)


def test_a_program_that_never_ends_scores_zero_under_the_runner() -> None:
    # tests + 2 cases, each run allowed 2 s: 6 s of runs against a runner allowing 3 s per sample. The
    # grader's own deadline (fitted below the runner's) must end them all: a 0, not a runner timeout.
    g = CodeGrader(timeout_s=2.0, memory_mb=256)
    runner = GraderRunner(g, concurrency=2, timeout_s=3.0, failure_policy="drop_group")
    cases = [{"input": "1\n", "output": "2"}, {"input": "2\n", "output": "4"}]
    loop_forever = "while True:\n    pass\n"
    samples = [Sample("p", loop_forever, {"tests": TESTS, "test_cases": cases}),
               Sample("p", ADD + "import sys\nfor x in sys.stdin.read().split():\n    print(int(x) * 2)\n",
                      {"tests": TESTS, "test_cases": cases})]
    t0 = time.monotonic()
    res = asyncio.run(runner.grade_group(samples))
    assert res.errors == [None, None] and not res.dropped, res
    assert res.rewards == [0.0, 1.0] and res.infos[0]["failure"] == "timeout"
    assert time.monotonic() - t0 < 3.5 and g.sample_timeout_s < 3.0
    # Without a runner, total_timeout_s bounds a sample alike.
    alone = CodeGrader(timeout_s=2.0, memory_mb=256, total_timeout_s=1.0)
    t0 = time.monotonic()
    assert _grade(alone, loop_forever, tests=TESTS, test_cases=cases)[0] == 0.0
    assert time.monotonic() - t0 < 2.0
