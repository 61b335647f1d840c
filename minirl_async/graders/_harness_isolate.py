"""The code grader's in-sandbox harness, part 1 of 5: isolation at start-up. `_harness.py` joins the parts
into the one script the sandbox runs (`python -I -c <script> <json config>`, possibly by another interpreter
than the grader's): standard library only, Python >= 3.8 syntax at run time, never imported. This part opens
the script: its `from __future__ import annotations` covers every part.

Start-up, before anything of the program or the tests is read (`isolate`):
- with `cfg["fs"]` (a fresh mount namespace, still privileged in it): build a new root in a tmpfs that holds
  only read-only binds of the interpreter's and the system's directories (`cfg["expose"]`: /usr, /lib, ...),
  a minimal /dev (null, zero, full, random, urandom; a private /dev/shm), a /proc of the sandbox's own PID
  namespace, and a private size-limited tmpfs /tmp owned 0700 by the run's identity (the working directory);
  then chroot into it. Project files, data sets, the host's /tmp and /proc are not in that root;
- drop privileges: setgroups([]), setresgid/setresuid to the run's own uid when started as real root, or
  shed every capability (bounding set, ambient, capset, SECBIT_NOROOT) as the root of a user namespace;
  PR_SET_NO_NEW_PRIVS so no set-uid or file-capability binary gives any back;
- an audit hook refusing network calls (a second line behind the network namespace).
"""

from __future__ import annotations

import os
import sys


def _no_network(event: str, args: object) -> None:
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                 "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        raise PermissionError("network access is disabled in the code grader")


# ---------------------------------------------------------------------------------------------------------
# Isolation
# ---------------------------------------------------------------------------------------------------------

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21


def _libc() -> object:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount(libc: object, src: str | None, dst: str, fstype: str | None, flags: int, data: str = "") -> None:
    import ctypes

    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data or None)) != 0:  # type: ignore[attr-defined]
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src!r} on {dst!r}: {os.strerror(err)}")


def _bind_readonly(libc: object, src: str, dst: str) -> None:
    _mount(libc, src, dst, None, MS_BIND | MS_REC)
    # A read-only remount must keep the flags the source mount has (a user namespace may not clear them).
    f = os.statvfs(dst).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | (f & (MS_NODEV | MS_NOEXEC))
    for st, ms in ((1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME)):
        if f & st:
            flags |= ms
    _mount(libc, None, dst, None, flags)


def _build_root(cfg: dict) -> None:
    libc = _libc()
    uid, gid, mb = cfg["fs_uid"], cfg["fs_uid"], int(cfg["fs_mb"])
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    root = cfg["stage"]
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    for src in cfg["expose"]:
        dst = root + src
        if os.path.islink(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.lexists(dst):
                os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
            _bind_readonly(libc, src, dst)
        elif os.path.isfile(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
            _bind_readonly(libc, src, dst)
    dev = root + "/dev"
    os.makedirs(dev, exist_ok=True)
    _mount(libc, "tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + name):
            open(f"{dev}/{name}", "a").close()
            _mount(libc, "/dev/" + name, f"{dev}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(dev + "/shm")
    _mount(libc, "tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV,
           f"mode=0700,uid={uid},gid={gid},size={max(1, mb // 4)}m")
    os.makedirs(root + "/proc", exist_ok=True)
    _mount(libc, "proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/tmp", exist_ok=True)
    _mount(libc, "tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,uid={uid},gid={gid},size={mb}m")
    _mount(libc, None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    os.chroot(root)
    os.chdir("/")


def _prctl(libc: object, *args: int) -> int:
    import ctypes

    return libc.prctl(*(ctypes.c_ulong(a) for a in args))  # type: ignore[attr-defined, no-any-return]


def _drop_capabilities(libc: object) -> None:
    """As root of a user namespace (the only mapped uid): keep uid 0 there but hold no capability."""
    import ctypes

    PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 28, 47, 4
    SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1, 2
    if _prctl(libc, PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECUREBITS)")
    _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if _prctl(libc, PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    hdr, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capset(ctypes.byref(hdr), data) != 0:  # type: ignore[attr-defined]
        raise OSError(ctypes.get_errno(), "capset")


def _capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return -1


def isolate(cfg: dict) -> None:
    libc = None
    if cfg.get("fs"):
        _build_root(cfg)
    uid = cfg.get("uid")
    if uid is not None and not cfg.get("userns") and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
            raise RuntimeError("could not drop privileges")
    try:
        libc = _libc()
    except (ImportError, OSError):
        libc = None
    if cfg.get("userns"):
        if libc is None:
            raise RuntimeError("ctypes is needed to drop capabilities")
        _drop_capabilities(libc)
    if libc is not None:
        _prctl(libc, 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if uid is not None and uid != 0 and os.geteuid() == 0:
        raise RuntimeError("still root after dropping privileges")
    if cfg.get("userns") and _capabilities() != 0:
        raise RuntimeError("capabilities left after dropping them")
    os.chdir(cfg["workdir"])
    os.environ.update({"HOME": cfg["workdir"], "TMPDIR": cfg["workdir"]})
    sys.addaudithook(_no_network)
