"""Supervisor: crash detection, the restart budget, restart-without-counting, and stopping a whole process
group (a child's own children included) with SIGTERM then SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
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


# --- process trees: a service's descendants in other sessions and orphans are stopped too ------------------

# A service like torchrun: it starts a "rank" in a NEW session (torchrun's workers use start_new_session=True),
# the rank starts a helper of its own, and every process appends "<role> <pid>" to `pids.txt`.
# RANK_ENV: the rank's environment (None: inherited; {}: a clean one, which hides the supervisor's token).
_SERVICE = """
import os, signal, subprocess, sys, time
out, ignore_term, rank_env = sys.argv[1], sys.argv[2] == "1", eval(sys.argv[3])
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
def note(role, pid):
    with open(out, "a") as f:
        f.write(f"{role} {pid}\\n")
rank = '''
import os, signal, subprocess, sys, time
if sys.argv[2] == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(sys.argv[1], "a") as f:
    f.write(f"rank {os.getpid()}\\\\nhelper {helper.pid}\\\\n")
time.sleep(60)
'''
subprocess.Popen([sys.executable, "-c", rank, out, sys.argv[2]], start_new_session=True, env=rank_env)
note("main", os.getpid())
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    """A zombie (exited, waiting for init to reap it) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _service(tmp_path, tag: str, ignore_term: bool = False, rank_env: dict | None = None) -> ServiceSpec:
    return ServiceSpec("svc", [sys.executable, "-c", _SERVICE, str(tmp_path / f"{tag}.txt"),
                               "1" if ignore_term else "0", repr(rank_env)])


def _pids(tmp_path, tag: str, timeout: float = 20.0) -> dict[str, int]:
    """{"main": pid, "rank": pid, "helper": pid} once every process of the tree has written its line."""
    path = tmp_path / f"{tag}.txt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            rows = dict(line.split() for line in path.read_text().splitlines() if line.count(" ") == 1)
            if len(rows) == 3:
                return {k: int(v) for k, v in rows.items()}
        time.sleep(0.02)
    raise AssertionError(f"the service tree did not start: {path.read_text() if path.is_file() else ''}")


def _all_gone(pids, timeout: float = 2.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.02)
    return [p for p in pids if _alive(p)]


def test_restart_and_stop_kill_a_sigkilled_services_orphans(tmp_path):
    # torchrun SIGKILLed: its rank (own session) and the rank's helper are orphaned but keep running; the
    # restart must kill them before starting the new generation, and stop() must kill the new one's too
    sup = Supervisor(tmp_path, max_restarts=3, grace_s=2)
    sup.start(_service(tmp_path, "gen1"))
    first = _pids(tmp_path, "gen1")
    os.kill(first["main"], signal.SIGKILL)
    assert _wait_exit(sup) == [("svc", -9)]
    assert _alive(first["rank"]) and _alive(first["helper"])  # what the reviewer saw: orphans survive
    sup.children["svc"].spec = _service(tmp_path, "gen2")  # the same service, its pids in another file
    t0 = time.monotonic()
    assert sup.restart("svc")
    assert time.monotonic() - t0 < 1.5  # the orphans die on SIGTERM: no wait for the grace period
    assert _all_gone(first.values(), timeout=0.5) == []
    second = _pids(tmp_path, "gen2")
    assert sup.running("svc")
    sup.stop()
    assert _all_gone([*first.values(), *second.values()], timeout=0.5) == []


def test_stop_escalates_to_sigkill_for_a_new_session_descendant(tmp_path):
    # everything ignores SIGTERM; the rank is in its own session, so killpg(main) would never reach it
    sup = Supervisor(tmp_path, grace_s=0.5)
    sup.start(_service(tmp_path, "t", ignore_term=True))
    pids = _pids(tmp_path, "t")
    t0 = time.monotonic()
    codes = sup.stop()
    assert codes["svc"] == -9
    assert time.monotonic() - t0 < 3
    assert _all_gone(pids.values(), timeout=0.5) == []


def test_stop_after_the_main_process_died_with_stubborn_orphans(tmp_path):
    # the main is SIGKILLed, its orphans ignore SIGTERM: stop() (no restart) must still SIGKILL them
    sup = Supervisor(tmp_path, grace_s=0.3)
    sup.start(_service(tmp_path, "t", ignore_term=True))
    pids = _pids(tmp_path, "t")
    os.kill(pids["main"], signal.SIGKILL)
    assert _wait_exit(sup) == [("svc", -9)]
    assert _alive(pids["rank"])
    sup.stop()
    assert _all_gone(pids.values(), timeout=0.5) == []


def test_a_descendant_with_a_clean_environment_is_tracked(tmp_path):
    # the rank drops the environment (and so the supervisor's token): it is found through its parent while
    # the tree is intact (poll() records the tree), and still killed after the main is SIGKILLed
    sup = Supervisor(tmp_path, grace_s=1, track_s=0)
    sup.start(_service(tmp_path, "t", rank_env={}))
    pids = _pids(tmp_path, "t")
    assert sup.poll() == []  # records the tree
    os.kill(pids["main"], signal.SIGKILL)
    assert _wait_exit(sup) == [("svc", -9)]
    assert _alive(pids["rank"]) and _alive(pids["helper"])
    sup.stop()
    assert _all_gone(pids.values(), timeout=0.5) == []


def test_stop_leaves_unrelated_processes_alone(tmp_path):
    # a process of the caller's own (even in its own session) is not a service's
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        sup = Supervisor(tmp_path, grace_s=0.5, track_s=0)
        sup.start(_service(tmp_path, "t"))
        pids = _pids(tmp_path, "t")
        sup.poll()
        sup.stop()
        assert _all_gone(pids.values(), timeout=0.5) == []
        assert other.poll() is None and _alive(other.pid)
    finally:
        other.kill()
        other.wait()
