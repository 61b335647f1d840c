"""How the code grader sandboxes runs on this machine (code.py documents what is enforced).

- identities: a root grader gives each concurrent run a (program, judge) uid pair from `uid_base` upwards,
  process-wide, skipping uids that have a passwd or group entry; what a run leaves behind under its uid
  can be killed;
- probing: each candidate sandbox (`unshare` with a private root, namespaces only, none; per-run uids,
  nobody, or the grader's own identity) runs the harness's `probe` role end to end, and the strongest one
  that reports what it promised becomes the grader's `_Mode`.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minirl_async.graders._harness import HARNESS

NOBODY = 65534
UID_BASE = 61000
_MAX_SLOTS = 512

# What a private root exposes (read-only) besides the interpreter's own directories.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
                 "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd", "/etc/group",
                 "/etc/nsswitch.conf")
_STAGES = ("/tmp", "/mnt", "/media", "/srv", "/opt", "/run", "/var/tmp")


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



@dataclass(frozen=True)
class _Mode:
    """How runs are sandboxed on this machine (the strongest variant that worked, see `_probe`)."""

    prefix: tuple[str, ...]
    fs: bool  # private root (mount namespace)
    userns: bool  # unprivileged grader: root of a user namespace, capabilities dropped
    uids: bool  # root grader: a uid pair per concurrent run (else `shared_uid` for all, or the grader's own)
    shared_uid: int | None
    expose: tuple[str, ...]
    stage: str
    names: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------
# Identities: a (program, judge) uid pair per concurrent run, process-wide
# ---------------------------------------------------------------------------------------------------------

_SLOT_LOCK = threading.Lock()
_SLOTS_USED: set[int] = set()
_UID_FREE: dict[int, bool] = {}


def _uid_unassigned(uid: int) -> bool:
    """No account or group has this id (cached): using it cannot give a run anyone's files."""
    if uid not in _UID_FREE:
        free = True
        for lookup in (pwd.getpwuid, grp.getgrgid):
            try:
                lookup(uid)
                free = False
            except KeyError:
                pass
        _UID_FREE[uid] = free
    return _UID_FREE[uid]


@contextlib.contextmanager
def _uid_slot(base: int) -> Iterator[tuple[int, int]]:
    with _SLOT_LOCK:
        for slot in range(_MAX_SLOTS):
            uids = (base + 2 * slot, base + 2 * slot + 1)
            if slot not in _SLOTS_USED and all(_uid_unassigned(u) for u in uids):
                _SLOTS_USED.add(slot)
                break
        else:
            raise RuntimeError(f"code grader: no free sandbox uid pair from {base} (more than {_MAX_SLOTS} runs at once?)")
    try:
        yield uids
    finally:
        with _SLOT_LOCK:
            _SLOTS_USED.discard(slot)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (run as that uid: kill(-1) reaches exactly its processes)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[], timeout=10,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})



# ---------------------------------------------------------------------------------------------------------
# Probing what this machine allows
# ---------------------------------------------------------------------------------------------------------

_PROBE_LOCK = threading.Lock()


def _python_paths(python: str) -> list[str]:
    code = ("import sys, sysconfig, json; p = sysconfig.get_paths(); print(json.dumps([sys.prefix, sys.exec_prefix,"
            " sys.base_prefix, sys.base_exec_prefix] + [p.get(k, '') for k in ('stdlib', 'platstdlib', 'purelib',"
            " 'platlib')]))")
    try:
        r = subprocess.run([python, "-I", "-c", code], capture_output=True, timeout=30, check=True)
        paths = json.loads(r.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        paths = []
    return [os.path.dirname(python), *(p for p in paths if isinstance(p, str))]


def _expose_list(python: str) -> list[str]:
    """Absolute paths a private root binds read-only (symlinks are recreated, their targets exposed)."""
    cands: list[str] = []
    for p in (*_SYSTEM_PATHS, *_python_paths(python)):
        if not p or not os.path.isabs(p) or not os.path.lexists(p):
            continue
        p = os.path.normpath(p)
        if os.path.islink(p) and os.path.dirname(p) in ("/", "/etc"):
            cands.append(p)
        if os.path.exists(p):
            cands.append(os.path.realpath(p))
    out: list[str] = []
    for p in sorted(set(cands), key=lambda s: (s.count("/"), s)):
        if p == "/" or any(p == q or p.startswith(q.rstrip("/") + "/") for q in out if not os.path.islink(q)):
            continue
        out.append(p)
    return out


def _pick_stage(expose: list[str]) -> str:
    for cand in _STAGES:
        if os.path.isdir(cand) and not os.path.islink(cand) and \
                not any(p == cand or p.startswith(cand + "/") for p in expose):
            return cand
    return "/tmp"


def _probe(python: str, root: bool, uid_base: int, cache: dict[tuple[str, bool, int], _Mode]) -> _Mode:
    """The strongest sandbox that works here: each candidate runs the harness's `probe` role end to end
    (namespaces, private root, dropping privileges) and must report what it promised. Probed once per
    (python, root, uid_base) in `cache`."""
    key = (python, root, uid_base)
    with _PROBE_LOCK:
        if key in cache:
            return cache[key]
        expose = _expose_list(python)
        stage = _pick_stage(expose)
        full = ("--net", "--pid", "--ipc", "--mount", "--mount-proc", "--fork", "--kill-child")
        ns = ("--net", "--pid", "--fork", "--kill-child")
        ns_names = ("network_namespace", "pid_namespace")
        fs_names = ("ipc_namespace", "mount_namespace", "private_root", "private_tmp", "private_proc")
        cands: list[tuple[tuple[str, ...], bool, bool, tuple[str, ...]]] = []
        if shutil.which("unshare"):
            if root:
                cands += [(("unshare", *full), True, False, ns_names + fs_names), (("unshare", *ns), False, False, ns_names)]
            else:
                user = ("unshare", "--user", "--map-root-user")
                cands += [((*user, *full), True, True, ns_names + fs_names), ((*user, *ns), False, True, ns_names)]
        cands.append(((), False, False, ()))
        uid_choices: list[tuple[int | None, bool]] = [(uid_base, True), (NOBODY, False)] if root else [(None, False)]
        mode = None
        for prefix, fs, userns, names in cands:
            for uid, per_run in uid_choices:
                if _probe_one(python, prefix, fs, userns, uid, expose, stage):
                    extra = ("unprivileged_user", "per_run_uid") if per_run else ("unprivileged_user",) if root else ()
                    if userns:
                        extra = ("user_namespace", "no_capabilities")
                    mode = _Mode(prefix, fs, userns, per_run, None if per_run else uid, tuple(expose), stage,
                                 names + extra)
                    break
            if mode is not None:
                break
        if mode is None:  # nothing worked (not even dropping to nobody): run as ourselves, no namespaces
            mode = _Mode((), False, False, False, None, tuple(expose), stage, ())
        cache[key] = mode
        return mode


def _probe_one(python: str, prefix: tuple[str, ...], fs: bool, userns: bool, uid: int | None,
               expose: list[str], stage: str) -> bool:
    workdir = "/tmp" if fs else tempfile.mkdtemp(prefix="minirl_probe_")
    try:
        if not fs and uid is not None:
            os.chown(workdir, uid, uid)
        cfg = {"role": "probe", "fs": fs, "userns": userns, "uid": uid, "fs_uid": uid if uid is not None else 0,
               "fs_mb": 4, "expose": expose, "stage": stage, "workdir": workdir}
        r = subprocess.run([*prefix, python, "-I", "-c", HARNESS, json.dumps(cfg)], capture_output=True,
                           timeout=30, cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        if r.returncode != 0:
            return False
        rep = json.loads(r.stdout.decode().strip().splitlines()[-1])
        if uid is not None and (rep["uid"], rep["euid"]) != (uid, uid):
            return False
        if userns and rep["caps"] != 0:
            return False
        allowed = {p.split("/")[1] for p in expose} | {"dev", "proc", "tmp"}
        if fs and (len(rep["pids"]) > 2 or not set(rep["root"]) <= allowed or rep["cwd"] != "/tmp"):
            return False
        return True
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return False
    finally:
        if not fs:
            shutil.rmtree(workdir, ignore_errors=True)
