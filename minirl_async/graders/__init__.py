"""Rewards: the Grader protocol, its loader, built-in graders and the runner that contains their failures.

    base.py      Sample, GradeResult, load_grader("exact" | "pkg.mod:attr" | "/path/file.py:attr", kwargs)
    builtin.py   exact, numeric, math
    code.py      code: programs run against tests in a sandboxed subprocess (limits documented there)
    runner.py    GraderRunner: concurrency, per-sample timeout, failure policy, error counts by kind
"""
