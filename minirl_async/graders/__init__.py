"""Rewards: the Grader protocol, its loader, built-in graders and the runner that contains their failures.

    base.py      Sample, GradeResult, load_grader("exact" | "pkg.mod:attr" | "/path/file.py:attr", kwargs)
    builtin.py   exact, numeric, math
    code.py      code: programs run against tests in sandboxed subprocesses (limits documented there)
    _sandbox.py  the harness code.py runs inside the sandbox (isolation, program/judge protocol); never imported
    runner.py    GraderRunner: concurrency, per-sample timeout, failure policy, error counts by kind
"""
