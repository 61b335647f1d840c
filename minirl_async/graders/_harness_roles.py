"""The code grader's in-sandbox harness, part 5 of 5: the roles, and `main`, which isolates the process
(part 1) and then runs the role its config names. `_harness.py` joins the parts into one script (standard
library only, Python >= 3.8 at run time, never imported).

Roles:
- `script`: the program runs as __main__ with the case's stdin; its stdout is what is graded;
- `program` and `judge` (the `tests` mode), two sandboxes that share nothing but two pipes. `program`
  runs the response and then serves requests on its objects; `judge` reads the tests from a descriptor,
  runs them and writes `MARKER` to its verdict descriptor only after every statement passed. The tests see
  the program's functions, classes and constants through proxies (`Peer`, part 4);
- `probe`: isolate, then report what holds (uid, capabilities, what /proc and / show) as JSON.
"""

import builtins
import json
import os
import sys
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # one namespace in the joined script: these imports are for the type checker only
    from minirl_async.graders._harness_isolate import _capabilities, isolate
    from minirl_async.graders._harness_peer import Peer
    from minirl_async.graders._harness_wire import Channel, ChannelClosed, ProtocolError

MARKER = b"minirl-judge: every test passed\n"


def _read_all(fd: int) -> str:
    chunks, off = [], 0
    while True:
        b = os.pread(fd, 1 << 20, off)
        if not b:
            break
        chunks.append(b)
        off += len(b)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def _print_traceback(e: BaseException) -> None:
    """The traceback of `e` without the harness's own frames (they are noise in a failure message)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != "<string>"]
    sys.stderr.write("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
                     + "".join(traceback.format_exception_only(type(e), e)))


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass


def _write_program(cfg: dict) -> tuple[str, str]:
    src = _read_all(cfg["prog_fd"])
    path = os.path.join(os.getcwd(), "prog.py")
    with open(path, "w") as f:
        f.write(src)
    return src, path


def run_script(cfg: dict) -> None:
    import runpy

    _, path = _write_program(cfg)
    sys.argv = [path]
    runpy.run_path(path, run_name="__main__")


def run_program(cfg: dict) -> None:
    import types

    src, path = _write_program(cfg)
    peer = Peer(Channel(cfg["rpc_in"], cfg["rpc_out"]), restricted=False)
    _exit, err = os._exit, sys.stderr
    mod = types.ModuleType("__main__")
    mod.__file__, mod.__builtins__ = path, builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = mod
    sys.argv = [path]
    try:
        exec(compile(src, path, "exec"), mod.__dict__)
    except BaseException as e:  # noqa: BLE001 - reported to the judge and on stderr, then the program ends
        if isinstance(e, SystemExit):
            why = f"the program exited (SystemExit({e.code!r})) before the tests ran"
            err.write(why + "\n")
        else:
            why = f"the program failed before the tests ran: {type(e).__name__}: {e}"
            _print_traceback(e)
        try:
            peer.chan.send({"k": "fail", "msg": why[:2000]})
        except Exception:
            pass
        _flush()
        _exit(1)
    peer.chan.send({"k": "ready", "globals": peer.export(mod.__dict__)})
    peer.serve_forever()
    _flush()
    _exit(0)


def run_judge(cfg: dict) -> None:
    tests = _read_all(cfg["tests_fd"])
    verdict_fd, _exit = cfg["verdict_fd"], os._exit
    peer = Peer(Channel(cfg["rpc_in"], cfg["rpc_out"]), restricted=True)

    def fail(why: str) -> None:
        _flush()
        sys.stderr.write(why + "\n")
        _flush()
        _exit(1)

    try:
        msg = peer.chan.recv()
    except (ChannelClosed, ProtocolError) as e:
        return fail(f"the program ended before the tests could run ({e})")
    if msg.get("k") != "ready":
        return fail(str(msg.get("msg", "the program did not start"))[:2000])
    try:
        ns = peer.judge_namespace(msg.get("globals"))
    except ProtocolError as e:
        return fail(f"the program broke the protocol: {e}")
    try:
        exec(compile(tests, "tests.py", "exec"), ns)
    except SystemExit as e:
        return fail(f"SystemExit({e.code!r}) raised while the tests ran")
    except BaseException as e:  # noqa: BLE001 - a failed test: its traceback is the failure message
        _flush()
        _print_traceback(e)
        _flush()
        _exit(1)
    _flush()
    os.write(verdict_fd, MARKER)
    _exit(0)


def probe(cfg: dict) -> None:
    report = {"uid": os.getuid(), "euid": os.geteuid(), "caps": _capabilities(), "cwd": os.getcwd(),
              "root": sorted(os.listdir("/")), "pids": sorted(p for p in os.listdir("/proc") if p.isdigit())}
    sys.stdout.write(json.dumps(report) + "\n")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    isolate(cfg)
    role = cfg["role"]
    if role == "script":
        run_script(cfg)
    elif role == "program":
        run_program(cfg)
    elif role == "judge":
        run_judge(cfg)
    elif role == "probe":
        probe(cfg)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
