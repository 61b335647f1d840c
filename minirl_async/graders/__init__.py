"""Rewards: the Grader protocol, its loader, built-in graders and the runner that contains their failures.

    base.py        Sample, GradeResult, load_grader("exact" | "pkg.mod:attr" | "/path/file.py:attr", kwargs)
    builtin.py     exact, numeric, math
    code.py        code: programs run against tests in sandboxed subprocesses (limits documented there)
    _isolation.py  which sandbox works on this machine (probing), a uid pair per concurrent run
    _harness.py    the harness code.py runs inside the sandbox: _harness_{isolate,wire,proxy,peer,roles}.py
                   (isolation, program/judge protocol, roles) joined into one script; never imported there
    runner.py      GraderRunner: concurrency, per-sample timeout, failure policy, error counts by kind
"""
