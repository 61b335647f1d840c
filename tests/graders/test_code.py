"""The code grader: right and wrong programs, stdin/stdout cases, and hostile programs (infinite loop, fork
bomb, memory hog, network access, background children) killed or refused at their limits while the grader
process is unharmed and keeps grading."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from minirl_async.graders.base import Sample
from minirl_async.graders.code import CodeGrader, extract_code

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def grader() -> CodeGrader:
    return CodeGrader(timeout_s=2.0, memory_mb=256, max_processes=16)


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
    prog = ("import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 9))\n")
    reward, info = _grade(grader, prog, tests="pass")
    assert reward == 0.0 and ("PermissionError" in info["failure"] or "Connection" in info["failure"])


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


def test_tampering_with_the_harness_is_a_failure(grader: CodeGrader) -> None:
    hacks = [
        "import builtins\nbuiltins.exec = lambda *a, **k: None\n",  # skip the tests
        "import builtins\nbuiltins.compile = lambda *a, **k: compile('pass', 't', 'exec')\n",
        "open('tests.py', 'w').write('pass')\n",  # rewrite the tests on disk
        # read every other open descriptor and the command line, print all of it, leave
        "import os, sys\nfor fd in range(3, 64):\n    try:\n        print(os.read(fd, 4096))\n"
        "    except OSError:\n        pass\nprint(open('/proc/self/cmdline', 'rb').read(), sys.argv)\n"
        "os._exit(0)\n",
    ]
    for hack in hacks:
        reward, info = _grade(grader, "def add(a, b):\n    return a - b\n" + hack, tests=TESTS)
        assert reward == 0.0, (hack, info)


def test_programs_that_print_or_use_main_still_pass(grader: CodeGrader) -> None:
    prog = ADD + "print('hello', end='')\nif __name__ == '__main__':\n    print(add(1, 2))\n"
    assert _grade(grader, prog, tests=TESTS)[0] == 1.0
    # Tests that fail are still failures, whatever the program printed.
    reward, info = _grade(grader, prog, tests="assert add(1, 1) == 3\n")
    assert reward == 0.0 and "AssertionError" in info["failure"]
    # A program exiting after printing the right output is fine for stdin/stdout cases.
    cases = [{"input": "3\n", "output": "6"}]
    assert _grade(grader, "import sys\nprint(int(input()) * 2)\nsys.exit(0)\n", test_cases=cases)[0] == 1.0
