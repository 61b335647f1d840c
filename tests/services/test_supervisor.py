"""Supervisor: crash detection, the restart budget, restart-without-counting, and stopping a whole process
group (a child's own children included) with SIGTERM then SIGKILL."""

from __future__ import annotations

import json
import os
import sys
import time

from minirl_async.supervisor import EXIT_RESTART, ServiceSpec, Supervisor


def _wait_exit(sup, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = sup.poll()
        if ev:
            return ev
        time.sleep(0.02)
    raise AssertionError("no exit")


def test_restart_budget(tmp_path):
    sup = Supervisor(tmp_path, max_restarts=2, grace_s=1)
    sup.start(ServiceSpec("crashy", [sys.executable, "-c", "import sys; sys.exit(3)"]))
    assert _wait_exit(sup) == [("crashy", 3)]
    assert sup.restart("crashy") and sup.restarts("crashy") == 1
    assert _wait_exit(sup) == [("crashy", 3)]
    assert sup.restart("crashy")
    assert _wait_exit(sup) == [("crashy", 3)]
    assert not sup.restart("crashy")  # budget spent
    assert (tmp_path / "logs" / "crashy.log").is_file()


def test_requested_restart_is_not_a_crash(tmp_path):
    sup = Supervisor(tmp_path, max_restarts=0, grace_s=1)
    sup.start(ServiceSpec("s", [sys.executable, "-c", f"import sys; sys.exit({EXIT_RESTART})"]))
    assert _wait_exit(sup) == [("s", EXIT_RESTART)]
    assert sup.restart("s", crashed=False) and sup.restarts("s") == 0
    sup.stop()


def test_stop_kills_the_whole_group_even_if_sigterm_is_ignored(tmp_path):
    # the child ignores SIGTERM and has a grandchild: both must be gone after stop()
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(tmp_path / 'gc.pid')!r}, 'w').write(str(p.pid)); time.sleep(60)")
    sup = Supervisor(tmp_path, grace_s=0.5)
    sup.start(ServiceSpec("stubborn", [sys.executable, "-c", code]))
    deadline = time.monotonic() + 20
    while not (tmp_path / "gc.pid").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = json.loads((tmp_path / "status" / "pids.json").read_text())["stubborn"]
    grandchild = int((tmp_path / "gc.pid").read_text())
    codes = sup.stop()
    assert codes["stubborn"] == -9
    for p in (pid, grandchild):
        time.sleep(0.1)
        try:
            os.kill(p, 0)
            # a zombie grandchild (reaped by init later) is acceptable; a running one is not
            with open(f"/proc/{p}/stat") as f:
                assert f.read().split()[2] == "Z", f"process {p} survived"
        except ProcessLookupError:
            pass
